//! Network files: save a trained network as the safetensors file sd-scripts / LyCORIS write,
//! and load any kohya / LyCORIS file back (algorithm detected per module from its tensors).
//!
//! # Layout (`reference/algorithms.md` §2, §3)
//! - Keys are `<module>.<tensor>`, with `<module>` the kohya name
//!   (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`, `lora_te1_…`) and
//!   `<tensor>` the adapter's state-dict name (`lora_down.weight`, `hada_w1_a`, `alpha`, …) as
//!   [`Adapter::state_tensors`] gives them: `alpha` a 0-d tensor, `use_scalar` folded in.
//! - Metadata values are all strings (`ss_*`, written from [`NetworkMetadata`]), plus
//!   `sshs_model_hash`: the sha256 of the file's tensor data section, as sd-scripts'
//!   `precalculate_safetensors_hashes` / `addnet_hash_safetensors` compute it.
//!
//! # Loading
//! [`LoraFile::load`] groups keys by module, detects each module's algorithm from its tensor
//! names and shapes ([`FileAlgo`]), recovers rank / alpha / Tucker / DoRA, and
//! [`LoadedModule::delta`] computes ΔW = W′ − W (and Δb) through the adapters of
//! [`crate::networks`]. Algorithms whose ΔW depends on the base weight (IA3, DIAG-OFT, BOFT,
//! GLoRA, GLoRA-Ex, anything with DoRA) need it passed in; the others compute ΔW from the file
//! alone. Every problem — unreadable file, bad header, truncation, unknown layout, wrong shapes,
//! missing tensors — is an error naming the file and the key; nothing panics on bad input.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::networks::{
    adapter_from_tensors_named, Adapter, BaseLayer, LayerKind, NetworkAlgo, NetworkOptions,
};

// ---------------------------------------------------------------------------------------------
// Metadata
// ---------------------------------------------------------------------------------------------

/// `ss_network_module`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum NetworkModule {
    /// sd-scripts LoRA / LoCon: `networks.lora`.
    KohyaLora,
    /// sd-scripts DyLoRA: `networks.dylora`.
    KohyaDylora,
    /// LyCORIS: `lycoris.kohya`.
    Lycoris,
    /// sd-scripts' Flux LoRA: `networks.lora_flux`.
    KohyaLoraFlux,
}

impl NetworkModule {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkModule::KohyaLora => "networks.lora",
            NetworkModule::KohyaDylora => "networks.dylora",
            NetworkModule::Lycoris => "lycoris.kohya",
            NetworkModule::KohyaLoraFlux => "networks.lora_flux",
        }
    }

    /// The module that trains `algo` in Loft (Loft's DyLoRA is LyCORIS's).
    pub fn for_algo(algo: NetworkAlgo) -> Self {
        if algo.is_kohya() {
            NetworkModule::KohyaLora
        } else {
            NetworkModule::Lycoris
        }
    }
}

/// `ss_base_model_version`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum BaseModelVersion {
    SdV1,
    SdV2,
    /// SD 2.x with v-parameterization (`sd_v2_v`).
    SdV2V,
    SdxlBase,
    /// Flux.1 dev or schnell (`flux1`, sd-scripts' `MODEL_VERSION_FLUX_V1`).
    Flux1,
}

impl BaseModelVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            BaseModelVersion::SdV1 => "sd_v1",
            BaseModelVersion::SdV2 => "sd_v2",
            BaseModelVersion::SdV2V => "sd_v2_v",
            BaseModelVersion::SdxlBase => "sdxl_base_v1-0",
            BaseModelVersion::Flux1 => "flux1",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "sd_v1" => BaseModelVersion::SdV1,
            "sd_v2" => BaseModelVersion::SdV2,
            "sd_v2_v" => BaseModelVersion::SdV2V,
            "sdxl_base_v1-0" => BaseModelVersion::SdxlBase,
            "flux1" => BaseModelVersion::Flux1,
            _ => return None,
        })
    }
}

/// The `ss_*` metadata a saved network carries. Known values are typed; anything the caller
/// does not know stays `None` and is omitted (never written as a made-up value).
#[derive(Clone, Debug, Default)]
pub struct NetworkMetadata {
    /// `ss_network_module`; `None` omits it.
    pub network_module: Option<NetworkModule>,
    /// `ss_network_dim`.
    pub network_dim: Option<usize>,
    /// `ss_network_alpha`.
    pub network_alpha: Option<f64>,
    /// `ss_network_args`, in order, values as strings (written as Python's `json.dumps`);
    /// empty = omitted, as sd-scripts does without `--network_args`.
    pub network_args: Vec<(String, String)>,
    /// `ss_network_dropout`.
    pub network_dropout: Option<f64>,
    /// `ss_base_model_version` (also sets `ss_v2`).
    pub base_model_version: Option<BaseModelVersion>,
    pub session_id: Option<String>,
    pub output_name: Option<String>,
    pub training_comment: Option<String>,
    /// Unix seconds.
    pub training_started_at: Option<f64>,
    pub training_finished_at: Option<f64>,
    pub steps: Option<u64>,
    pub epoch: Option<u64>,
    pub seed: Option<u64>,
    pub learning_rate: Option<f64>,
    pub unet_lr: Option<f64>,
    pub text_encoder_lr: Option<f64>,
    pub lr_scheduler: Option<String>,
    pub lr_warmup_steps: Option<u64>,
    pub optimizer: Option<String>,
    pub mixed_precision: Option<String>,
    pub num_train_images: Option<u64>,
    pub num_reg_images: Option<u64>,
    pub num_epochs: Option<u64>,
    pub max_train_steps: Option<u64>,
    pub gradient_accumulation_steps: Option<u64>,
    pub gradient_checkpointing: Option<bool>,
    pub clip_skip: Option<u64>,
    pub noise_offset: Option<f64>,
    pub min_snr_gamma: Option<f64>,
    pub sd_model_name: Option<String>,
    /// Any other keys (e.g. `ss_resolution`, `ss_datasets`, `modelspec.*`), written as given.
    pub extra: BTreeMap<String, String>,
}

/// Python's `str(float)`: `2.0`, `0.5`, `0.0001`, `1e-05`, `1e+16`.
pub fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let a = x.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        let s = format!("{x:e}"); // e.g. 1e-5, 1.5e16
        let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        return format!("{mant}e{sign}{digits:0>2}");
    }
    if x.fract() == 0.0 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// Python's `str(bool)`.
pub fn py_bool(b: bool) -> String {
    if b { "True" } else { "False" }.into()
}

/// `json.dumps` of a flat string→string dict (`{"algo": "locon", "use_tucker": "True"}`).
pub fn py_json_dict(pairs: &[(String, String)]) -> String {
    let items: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{}: {}",
                serde_json::to_string(k).unwrap(),
                serde_json::to_string(v).unwrap()
            )
        })
        .collect();
    format!("{{{}}}", items.join(", "))
}

/// The algorithm name LyCORIS's `algo=` uses (`None` for kohya's own LoRA / LoCon).
pub fn lycoris_algo_name(algo: NetworkAlgo) -> Option<&'static str> {
    Some(match algo {
        NetworkAlgo::Lora | NetworkAlgo::Locon => return None,
        NetworkAlgo::LycorisLocon => "locon",
        NetworkAlgo::Loha => "loha",
        NetworkAlgo::Ia3 => "ia3",
        NetworkAlgo::Lokr => "lokr",
        NetworkAlgo::Dylora => "dylora",
        NetworkAlgo::DiagOft => "diag-oft",
        NetworkAlgo::Boft => "boft",
        NetworkAlgo::Glora => "glora",
        NetworkAlgo::GloraEx => "glora-ex",
        NetworkAlgo::Abba => "abba",
        NetworkAlgo::Full => "full",
    })
}

/// The `network_args` sd-scripts / LyCORIS would record for `opts`: `algo` first (LyCORIS),
/// then every option that differs from its upstream default, values as Python prints them.
pub fn network_args_for(algo: NetworkAlgo, opts: &NetworkOptions) -> Vec<(String, String)> {
    let d = NetworkOptions::default();
    let mut v: Vec<(String, String)> = Vec::new();
    let mut push = |k: &str, val: String| v.push((k.to_string(), val));
    if let Some(name) = lycoris_algo_name(algo) {
        push("algo", name.into());
    }
    if let Some(cd) = opts.conv_dim {
        push("conv_dim", cd.to_string());
    }
    if let Some(ca) = opts.conv_alpha {
        push("conv_alpha", py_float(ca));
    }
    if opts.rank_dropout != 0.0 {
        push("rank_dropout", py_float(opts.rank_dropout));
    }
    if opts.module_dropout != 0.0 {
        push("module_dropout", py_float(opts.module_dropout));
    }
    if algo.is_kohya() {
        return v;
    }
    if opts.rank_dropout_scale {
        push("rank_dropout_scale", py_bool(true));
    }
    if algo == NetworkAlgo::Lokr {
        push("factor", opts.factor.to_string());
        for (k, on) in [
            ("full_matrix", opts.full_matrix),
            ("decompose_both", opts.decompose_both),
            ("unbalanced_factorization", opts.unbalanced_factorization),
        ] {
            if on {
                push(k, py_bool(true));
            }
        }
    }
    if algo == NetworkAlgo::Dylora {
        push("block_size", opts.block_size.to_string());
    }
    if matches!(algo, NetworkAlgo::DiagOft | NetworkAlgo::Boft) {
        if opts.constraint != d.constraint {
            push("constraint", py_float(opts.constraint));
        }
        if opts.rescaled {
            push("rescaled", py_bool(true));
        }
    }
    if algo == NetworkAlgo::Ia3 && opts.train_on_input {
        push("train_on_input", py_bool(true));
    }
    for (k, on) in [
        ("use_tucker", opts.use_tucker),
        ("use_scalar", opts.use_scalar),
        ("rs_lora", opts.rs_lora),
        ("train_norm", opts.train_norm),
        ("bypass_mode", opts.bypass_mode),
    ] {
        if on {
            push(k, py_bool(true));
        }
    }
    if opts.dora_wd {
        push("dora_wd", py_bool(true));
        push("wd_on_output", py_bool(opts.wd_on_output));
    }
    v
}

impl NetworkMetadata {
    /// Metadata for a network of `algo` trained with `opts` (module, dim, alpha, args,
    /// dropout); the caller fills in the rest.
    pub fn for_network(algo: NetworkAlgo, opts: &NetworkOptions) -> Self {
        Self {
            network_module: Some(NetworkModule::for_algo(algo)),
            network_dim: Some(opts.dim),
            network_alpha: Some(opts.alpha),
            network_args: network_args_for(algo, opts),
            network_dropout: Some(opts.dropout),
            ..Default::default()
        }
    }

    /// The header's string map (without `sshs_model_hash`, which [`save_tensors`] adds).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put(
            "ss_network_module",
            self.network_module.map(|x| x.as_str().to_string()),
        );
        put("ss_network_dim", self.network_dim.map(|x| x.to_string()));
        put("ss_network_alpha", self.network_alpha.map(py_float));
        put(
            "ss_network_args",
            if self.network_args.is_empty() {
                None
            } else {
                Some(py_json_dict(&self.network_args))
            },
        );
        put("ss_network_dropout", self.network_dropout.map(py_float));
        put(
            "ss_base_model_version",
            self.base_model_version.map(|b| b.as_str().to_string()),
        );
        put(
            "ss_v2",
            self.base_model_version.map(|b| {
                py_bool(matches!(
                    b,
                    BaseModelVersion::SdV2 | BaseModelVersion::SdV2V
                ))
            }),
        );
        put("ss_session_id", self.session_id.clone());
        put("ss_output_name", self.output_name.clone());
        put("ss_training_comment", self.training_comment.clone());
        put(
            "ss_training_started_at",
            self.training_started_at.map(py_float),
        );
        put(
            "ss_training_finished_at",
            self.training_finished_at.map(py_float),
        );
        put("ss_steps", self.steps.map(|x| x.to_string()));
        put("ss_epoch", self.epoch.map(|x| x.to_string()));
        put("ss_seed", self.seed.map(|x| x.to_string()));
        put("ss_learning_rate", self.learning_rate.map(py_float));
        put("ss_unet_lr", self.unet_lr.map(py_float));
        put("ss_text_encoder_lr", self.text_encoder_lr.map(py_float));
        put("ss_lr_scheduler", self.lr_scheduler.clone());
        put(
            "ss_lr_warmup_steps",
            self.lr_warmup_steps.map(|x| x.to_string()),
        );
        put("ss_optimizer", self.optimizer.clone());
        put("ss_mixed_precision", self.mixed_precision.clone());
        put(
            "ss_num_train_images",
            self.num_train_images.map(|x| x.to_string()),
        );
        put(
            "ss_num_reg_images",
            self.num_reg_images.map(|x| x.to_string()),
        );
        put("ss_num_epochs", self.num_epochs.map(|x| x.to_string()));
        put(
            "ss_max_train_steps",
            self.max_train_steps.map(|x| x.to_string()),
        );
        put(
            "ss_gradient_accumulation_steps",
            self.gradient_accumulation_steps.map(|x| x.to_string()),
        );
        put(
            "ss_gradient_checkpointing",
            self.gradient_checkpointing.map(py_bool),
        );
        put("ss_clip_skip", self.clip_skip.map(|x| x.to_string()));
        put("ss_noise_offset", self.noise_offset.map(py_float));
        put("ss_min_snr_gamma", self.min_snr_gamma.map(py_float));
        put("ss_sd_model_name", self.sd_model_name.clone());
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        m
    }
}

// ---------------------------------------------------------------------------------------------
// Hash and writing
// ---------------------------------------------------------------------------------------------

/// SHA-256 (FIPS 180-4), hex digest. Small and dependency-free; tested against the standard
/// vectors.
pub fn sha256_hex(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let bit_len = (data.len() as u64).wrapping_mul(8);
    let mut tail = data[data.len() - data.len() % 64..].to_vec();
    tail.push(0x80);
    while tail.len() % 64 != 56 {
        tail.push(0);
    }
    tail.extend_from_slice(&bit_len.to_be_bytes());
    let full = &data[..data.len() - data.len() % 64];
    for block in full.chunks_exact(64).chain(tail.chunks_exact(64)) {
        let mut w = [0u32; 64];
        for i in 0..16 {
            w[i] = u32::from_be_bytes([
                block[4 * i],
                block[4 * i + 1],
                block[4 * i + 2],
                block[4 * i + 3],
            ]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

/// sd-scripts' `addnet_hash_safetensors`: sha256 of everything after the header.
pub fn addnet_hash(file_bytes: &[u8]) -> Result<String> {
    let n = file_bytes
        .get(..8)
        .ok_or_else(|| anyhow!("safetensors data shorter than its 8-byte header length"))?;
    let n = u64::from_le_bytes(n.try_into().unwrap()) as usize;
    let start = n
        .checked_add(8)
        .filter(|s| *s <= file_bytes.len())
        .ok_or_else(|| anyhow!("header length {n} runs past the end"))?;
    Ok(sha256_hex(&file_bytes[start..]))
}

/// Serialises tensors with `metadata` plus `sshs_model_hash` (sd-scripts' addnet hash of the
/// tensor data) into safetensors bytes.
pub fn serialize_tensors(
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut seen = BTreeSet::new();
    let mut views = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        if !seen.insert(k.clone()) {
            bail!("tensor key `{k}` appears twice");
        }
        views.push((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?));
    }
    // The data section does not depend on the header, so hash a header-less serialisation.
    let bare = safetensors::serialize(views.iter().map(|(k, v)| (k.as_str(), v)), None)
        .map_err(|e| anyhow!("serialising tensors: {e}"))?;
    let hash = addnet_hash(&bare)?;
    let mut meta: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.insert("sshs_model_hash".into(), hash);
    safetensors::serialize(views.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
        .map_err(|e| anyhow!("serialising tensors: {e}"))
}

/// Writes tensors and metadata (plus `sshs_model_hash`) to `path` atomically (temp + rename).
pub fn save_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let bytes = serialize_tensors(tensors, metadata)
        .with_context(|| format!("saving {}", path.display()))?;
    let tmp = path.with_extension("safetensors.part");
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// The file's tensors for a trained network: `<module>.<tensor>` for every adapter, floats cast
/// to `dtype` (`None` keeps them; sd-scripts casts `alpha` too), integer buffers unchanged.
pub fn network_tensors(
    modules: &[(String, &dyn Adapter)],
    dtype: Option<DType>,
) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for (name, adapter) in modules {
        if name.is_empty() || name.contains('.') {
            bail!("module name `{name}` must be a non-empty kohya name without dots");
        }
        for (k, t) in adapter
            .state_tensors()
            .with_context(|| format!("module {name}"))?
        {
            let t = match dtype {
                Some(d) if t.dtype().is_float() && t.dtype() != d => t.to_dtype(d)?,
                _ => t,
            };
            out.push((format!("{name}.{k}"), t));
        }
    }
    Ok(out)
}

/// sd-scripts' `--save_precision` names: `float` (or `fp32`), `fp16`, `bf16`.
pub fn parse_save_precision(name: &str) -> Result<DType> {
    Ok(match name {
        "float" | "fp32" | "f32" => DType::F32,
        "fp16" | "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("save precision must be float, fp16 or bf16, not `{other}`"),
    })
}

/// Saves a trained network (kohya module name, adapter) as sd-scripts / LyCORIS do.
pub fn save_network(
    path: &Path,
    modules: &[(String, &dyn Adapter)],
    metadata: &NetworkMetadata,
    dtype: Option<DType>,
) -> Result<()> {
    let tensors =
        network_tensors(modules, dtype).with_context(|| format!("saving {}", path.display()))?;
    save_tensors(path, &tensors, &metadata.to_map())
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// A module's algorithm as detected from its tensors (and the file's metadata).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileAlgo {
    /// kohya LoRA (`networks.lora`; Linear / 1×1 conv).
    Lora,
    /// kohya LoCon (`networks.lora` on a k×k conv).
    Locon,
    /// LyCORIS LoCon (`algo=locon`/`lora`; Tucker / DoRA).
    LycorisLocon,
    Dylora,
    Loha,
    Lokr,
    Ia3,
    DiagOft,
    Boft,
    Glora,
    GloraEx,
    Abba,
    Full,
    /// train_norm (`w_norm`, `b_norm`).
    Norm,
}

impl FileAlgo {
    /// The name LyCORIS spells (`locon`, `diag-oft`, …; kohya's are `lora` / `locon`).
    pub fn name(self) -> &'static str {
        match self {
            FileAlgo::Lora => "lora",
            FileAlgo::Locon | FileAlgo::LycorisLocon => "locon",
            FileAlgo::Dylora => "dylora",
            FileAlgo::Loha => "loha",
            FileAlgo::Lokr => "lokr",
            FileAlgo::Ia3 => "ia3",
            FileAlgo::DiagOft => "diag-oft",
            FileAlgo::Boft => "boft",
            FileAlgo::Glora => "glora",
            FileAlgo::GloraEx => "glora-ex",
            FileAlgo::Abba => "abba",
            FileAlgo::Full => "full",
            FileAlgo::Norm => "norm",
        }
    }

    /// What Loft writes for a module of `algo` (`kxk_conv`: the layer is a k×k convolution,
    /// where kohya's LoRA module is a LoCon).
    pub fn written_by(algo: NetworkAlgo, kxk_conv: bool) -> Self {
        match algo {
            NetworkAlgo::Lora | NetworkAlgo::Locon if kxk_conv => FileAlgo::Locon,
            NetworkAlgo::Lora | NetworkAlgo::Locon => FileAlgo::Lora,
            NetworkAlgo::LycorisLocon => FileAlgo::LycorisLocon,
            NetworkAlgo::Loha => FileAlgo::Loha,
            NetworkAlgo::Ia3 => FileAlgo::Ia3,
            NetworkAlgo::Lokr => FileAlgo::Lokr,
            NetworkAlgo::Dylora => FileAlgo::Dylora,
            NetworkAlgo::DiagOft => FileAlgo::DiagOft,
            NetworkAlgo::Boft => FileAlgo::Boft,
            NetworkAlgo::Glora => FileAlgo::Glora,
            NetworkAlgo::GloraEx => FileAlgo::GloraEx,
            NetworkAlgo::Abba => FileAlgo::Abba,
            NetworkAlgo::Full => FileAlgo::Full,
        }
    }

    /// The Loft algorithm that computes this module's ΔW (`None` for norms, which any
    /// algorithm reads through the norm adapter).
    pub fn network_algo(self) -> Option<NetworkAlgo> {
        Some(match self {
            // One reader for the LoRA family: it accepts plain, Tucker, DoRA and the 2-D `up`
            // of conv DyLoRA, and every loader reads them all with scale alpha/r.
            FileAlgo::Lora | FileAlgo::Locon | FileAlgo::LycorisLocon | FileAlgo::Dylora => {
                NetworkAlgo::LycorisLocon
            }
            FileAlgo::Loha => NetworkAlgo::Loha,
            FileAlgo::Lokr => NetworkAlgo::Lokr,
            FileAlgo::Ia3 => NetworkAlgo::Ia3,
            FileAlgo::DiagOft => NetworkAlgo::DiagOft,
            FileAlgo::Boft => NetworkAlgo::Boft,
            FileAlgo::Glora => NetworkAlgo::Glora,
            FileAlgo::GloraEx => NetworkAlgo::GloraEx,
            FileAlgo::Abba => NetworkAlgo::Abba,
            FileAlgo::Full => NetworkAlgo::Full,
            FileAlgo::Norm => return None,
        })
    }
}

/// One module of a loaded file.
#[derive(Clone, Debug)]
pub struct LoadedModule {
    /// The kohya module name (`lora_unet_…`).
    pub name: String,
    pub algo: FileAlgo,
    /// Its tensors, relative names (`lora_up.weight`), as stored (dtype included).
    pub tensors: BTreeMap<String, Tensor>,
    /// Rank (`None` where the algorithm has none: IA3, OFT, FULL, norms, LoKr with both sides full).
    pub rank: Option<usize>,
    /// The stored `alpha` (for DIAG-OFT / BOFT the raw constraint).
    pub alpha: Option<f64>,
    pub tucker: bool,
    pub dora: bool,
    /// With DoRA: whether `dora_scale` is per output row (`wd_on_output`).
    pub wd_on_output: Option<bool>,
    /// The base weight's shape as far as the tensors tell it. For LoHa / LoKr without Tucker on
    /// a k×k conv the kernel is folded into the input width (`[out, in·k·k]`).
    pub weight_shape: Vec<usize>,
}

/// How a file's strength m (`FILE:m`) is applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MultiplierRule {
    /// As LyCORIS (and Loft's training) defines it: m inside DoRA's weight norm and inside the
    /// DIAG-OFT/BOFT rotation, m·ΔW for every other algorithm.
    #[default]
    Lycoris,
    /// m·ΔW(m = 1) for every algorithm: what ComfyUI's strength slider does (`--linear-multiplier`).
    Linear,
}

/// ΔW = W′ − W and Δb at multiplier 1.
#[derive(Clone, Debug)]
pub struct ModuleDelta {
    pub dw: Tensor,
    pub db: Option<Tensor>,
}

impl LoadedModule {
    /// ΔW depends on the base weight (multiplicative or rotating algorithms, DoRA, GLoRA).
    pub fn needs_base(&self) -> bool {
        self.dora
            || matches!(
                self.algo,
                FileAlgo::Ia3
                    | FileAlgo::DiagOft
                    | FileAlgo::Boft
                    | FileAlgo::Glora
                    | FileAlgo::GloraEx
            )
    }

    fn f32_tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.tensors
            .iter()
            .map(|(k, t)| {
                Ok((
                    k.clone(),
                    if t.dtype().is_float() {
                        t.to_dtype(DType::F32)?
                    } else {
                        t.clone()
                    },
                ))
            })
            .collect()
    }

    /// Whether LyCORIS applies the strength inside the math (DoRA's norm, the OFT rotation), so
    /// that W′(m) − W is not m·ΔW(1).
    pub fn multiplier_is_nonlinear(&self) -> bool {
        self.dora || matches!(self.algo, FileAlgo::DiagOft | FileAlgo::Boft)
    }

    /// ΔW and Δb at strength `m` under `rule` (see [`MultiplierRule`]); `base` as for
    /// [`Self::delta`].
    pub fn delta_at(&self, base: Option<&BaseLayer>, m: f64, rule: MultiplierRule) -> Result<ModuleDelta> {
        if m == 1.0 || rule == MultiplierRule::Linear || !self.multiplier_is_nonlinear() {
            let d = self.delta(base)?;
            return Ok(ModuleDelta { dw: d.dw.affine(m, 0.0)?, db: d.db.map(|b| b.affine(m, 0.0)).transpose()? });
        }
        let (mut adapter, base) = self.adapter_on(base)?;
        adapter.set_multiplier(m);
        let name = &self.name;
        let merged = adapter.merged_weight(&base).map_err(|e| anyhow!("module {name}: {e}"))?;
        let dw = (merged.to_dtype(DType::F32)? - base.weight.to_dtype(DType::F32)?)?;
        let db = match (adapter.merged_bias(&base).map_err(|e| anyhow!("module {name}: {e}"))?, &base.bias) {
            (Some(b1), Some(b0)) => Some((b1.to_dtype(DType::F32)? - b0.to_dtype(DType::F32)?)?),
            (Some(b1), None) => Some(b1.to_dtype(DType::F32)?),
            (None, _) => None,
        };
        Ok(ModuleDelta { dw, db })
    }

    /// ΔW (shaped like the base weight) and Δb. `base` is the layer the module adapts; it is
    /// required when [`Self::needs_base`], otherwise optional (without it a zero base of
    /// [`Self::weight_shape`] is used and ΔW has that shape).
    pub fn delta(&self, base: Option<&BaseLayer>) -> Result<ModuleDelta> {
        let name = &self.name;
        let (adapter, _) = self.adapter_on(base)?;
        let dw = adapter
            .delta_weight()
            .map_err(|e| anyhow!("module {name}: {e}"))?;
        let db = adapter
            .delta_bias()
            .map_err(|e| anyhow!("module {name}: {e}"))?;
        Ok(ModuleDelta { dw, db })
    }

    /// The module as an adapter on `base` (converted to f32), with that base.
    fn adapter_on(&self, base: Option<&BaseLayer>) -> Result<(Box<dyn Adapter>, BaseLayer)> {
        let name = &self.name;
        let owned;
        let base = match base {
            Some(b) => {
                let conv = |t: &Tensor| -> Result<Tensor> {
                    Ok(if t.dtype() == DType::F64 {
                        t.clone()
                    } else {
                        t.to_dtype(DType::F32)?
                    })
                };
                owned = BaseLayer {
                    kind: b.kind.clone(),
                    weight: conv(&b.weight)?,
                    bias: b.bias.as_ref().map(conv).transpose()?,
                };
                &owned
            }
            None => {
                if self.needs_base() {
                    bail!(
                        "module {name} ({}{}) changes the weight in a way that depends on it: ΔW needs the base weight",
                        self.algo.name(),
                        if self.dora { " with DoRA" } else { "" }
                    );
                }
                owned = self.zero_base()?;
                &owned
            }
        };
        let tensors = self.f32_tensors()?;
        let opts = NetworkOptions {
            block_size: 1,
            ..Default::default()
        };
        let adapter = match self.algo.network_algo() {
            Some(a) => adapter_from_tensors_named(a, &opts, base, &tensors, name),
            None => adapter_from_tensors_named(NetworkAlgo::Lora, &opts, base, &tensors, name),
        }
        .map_err(|e| anyhow!("{e}"))?;
        Ok((adapter, base.clone()))
    }

    fn zero_base(&self) -> Result<BaseLayer> {
        let dev = Device::Cpu;
        let needs_bias = self.tensors.contains_key("diff_b") || self.tensors.contains_key("b_norm");
        let s = &self.weight_shape;
        let bias = if needs_bias {
            Some(Tensor::zeros(s[0], DType::F32, &dev)?)
        } else {
            None
        };
        let w = Tensor::zeros(s.as_slice(), DType::F32, &dev)?;
        Ok(match s.len() {
            1 => BaseLayer {
                kind: LayerKind::LayerNorm {
                    features: s[0],
                    eps: 1e-5,
                },
                weight: w,
                bias,
            },
            2 => BaseLayer::linear(w, bias)?,
            4 => BaseLayer::conv2d(w, bias, 1, 0)?,
            _ => bail!(
                "module {}: cannot build a base layer of shape {s:?}",
                self.name
            ),
        })
    }
}

/// A loaded kohya / LyCORIS network file.
#[derive(Clone, Debug)]
pub struct LoraFile {
    pub path: PathBuf,
    /// The header metadata (all strings).
    pub metadata: BTreeMap<String, String>,
    /// Modules in name order.
    pub modules: Vec<LoadedModule>,
}

fn tensor_from_view(key: &str, v: &safetensors::tensor::TensorView<'_>) -> Result<Tensor> {
    use safetensors::Dtype as S;
    let dtype = match v.dtype() {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::I64 => DType::I64,
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I32 => {
            // candle has no i32 everywhere: widen.
            let vals: Vec<i64> = v
                .data()
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect();
            return Ok(Tensor::from_vec(vals, v.shape(), &Device::Cpu)?);
        }
        S::BOOL => {
            return Ok(Tensor::from_vec(
                v.data().to_vec(),
                v.shape(),
                &Device::Cpu,
            )?);
        }
        other => bail!("tensor `{key}` has dtype {other:?}, which network files do not use"),
    };
    Tensor::from_raw_buffer(v.data(), dtype, v.shape(), &Device::Cpu)
        .map_err(|e| anyhow!("tensor `{key}`: {e}"))
}

impl LoraFile {
    /// Reads and parses a file; every error names the file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_bytes(path, &bytes)
            .with_context(|| format!("{} is not a valid LoRA/LyCORIS file", path.display()))
    }

    /// Parses safetensors bytes (`path` is only recorded).
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| anyhow!("bad safetensors data: {e}"))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| anyhow!("bad safetensors header: {e}"))?;
        let metadata: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let keys: Vec<&str> = st.names().into_iter().map(|k| &k[..]).collect();
        if flux_diffusers::is_diffusers_flux(&keys) {
            // diffusers' / PEFT's Flux layout: read as kohya's (fused layers joined).
            let tensors = st.iter().map(|(k, v)| Ok((k.to_string(), tensor_from_view(&k, &v)?))).collect::<Result<Vec<_>>>()?;
            let groups = flux_diffusers::to_kohya(tensors)?;
            let hints = FileHints::from_metadata(&metadata);
            let modules = groups.into_iter().map(|(name, tensors)| detect_module(name, tensors, &hints)).collect::<Result<Vec<_>>>()?;
            return Ok(Self { path: path.to_path_buf(), metadata, modules });
        }
        let mut groups: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
        for (key, view) in st.iter() {
            let Some((module, tensor)) = key.split_once('.') else {
                bail!("key `{key}` has no `<module>.<tensor>` form");
            };
            if module.is_empty() || tensor.is_empty() {
                bail!("key `{key}` has no `<module>.<tensor>` form");
            }
            let t = tensor_from_view(key, &view)?;
            groups
                .entry(module.to_string())
                .or_default()
                .insert(tensor.to_string(), t);
        }
        if groups.is_empty() {
            bail!("the file holds no tensors");
        }
        let hints = FileHints::from_metadata(&metadata);
        let modules = groups
            .into_iter()
            .map(|(name, tensors)| detect_module(name, tensors, &hints))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            path: path.to_path_buf(),
            metadata,
            modules,
        })
    }

    pub fn module(&self, name: &str) -> Option<&LoadedModule> {
        self.modules.iter().find(|m| m.name == name)
    }

    pub fn base_model_version(&self) -> Option<&str> {
        self.metadata
            .get("ss_base_model_version")
            .map(|s| s.as_str())
    }

    /// The `ss_network_args` JSON, parsed (`None` if absent or not a JSON object).
    pub fn network_args(&self) -> Option<serde_json::Map<String, serde_json::Value>> {
        serde_json::from_str(self.metadata.get("ss_network_args")?).ok()
    }

    /// Algorithms present, in order.
    pub fn algorithms(&self) -> Vec<FileAlgo> {
        self.modules
            .iter()
            .map(|m| m.algo)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }
}

struct FileHints {
    kohya: bool,
    dylora: bool,
}

impl FileHints {
    fn from_metadata(meta: &BTreeMap<String, String>) -> Self {
        let module = meta
            .get("ss_network_module")
            .map(|s| s.as_str())
            .unwrap_or("");
        let args: Option<serde_json::Value> = meta
            .get("ss_network_args")
            .and_then(|s| serde_json::from_str(s).ok());
        let algo = args
            .as_ref()
            .and_then(|a| a.get("algo"))
            .and_then(|a| a.as_str())
            .unwrap_or("")
            .to_lowercase();
        Self {
            kohya: module != "lycoris.kohya",
            dylora: module == "networks.dylora" || algo == "dylora",
        }
    }
}

const LORA_KEYS: &[&str] = &[
    "lora_down.weight",
    "lora_up.weight",
    "lora_mid.weight",
    "alpha",
    "dora_scale",
    "scalar",
];
const LOHA_KEYS: &[&str] = &[
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "alpha",
    "dora_scale",
];
const LOKR_KEYS: &[&str] = &[
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
    "alpha",
    "dora_scale",
];
const IA3_KEYS: &[&str] = &["weight", "on_input"];
const OFT_KEYS: &[&str] = &["oft_blocks", "rescale", "alpha"];
const GLORA_KEYS: &[&str] = &["a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"];
const GLORA_EX_KEYS: &[&str] = &[
    "a1.weight",
    "a2.weight",
    "b1.weight",
    "b2.weight",
    "c1.weight",
    "c2.weight",
    "d_param",
    "e_param",
    "alpha",
];
const ABBA_KEYS: &[&str] = &[
    "lora_down1.weight",
    "lora_up1.weight",
    "lora_down2.weight",
    "lora_up2.weight",
    "alpha",
    "dora_scale",
];
const FULL_KEYS: &[&str] = &["diff", "diff_b"];
const NORM_KEYS: &[&str] = &["w_norm", "b_norm"];

fn detect_module(
    name: String,
    tensors: BTreeMap<String, Tensor>,
    hints: &FileHints,
) -> Result<LoadedModule> {
    let has = |k: &str| tensors.contains_key(k);
    let (algo, allowed): (FileAlgo, &[&str]) = if has("lora_down1.weight") || has("lora_up1.weight")
    {
        (FileAlgo::Abba, ABBA_KEYS)
    } else if has("lora_down.weight") || has("lora_up.weight") {
        (FileAlgo::Lora, LORA_KEYS)
    } else if tensors.keys().any(|k| k.starts_with("hada_")) {
        (FileAlgo::Loha, LOHA_KEYS)
    } else if tensors.keys().any(|k| k.starts_with("lokr_")) {
        (FileAlgo::Lokr, LOKR_KEYS)
    } else if has("oft_blocks") {
        let nd = tensors["oft_blocks"].rank();
        match nd {
            3 => (FileAlgo::DiagOft, OFT_KEYS),
            4 => (FileAlgo::Boft, OFT_KEYS),
            _ => bail!("`{name}.oft_blocks` is {nd}-D; DIAG-OFT stores 3-D and BOFT 4-D blocks"),
        }
    } else if has("c1.weight") || has("c2.weight") || has("d_param") || has("e_param") {
        (FileAlgo::GloraEx, GLORA_EX_KEYS)
    } else if has("a1.weight") || has("b1.weight") {
        (FileAlgo::Glora, GLORA_KEYS)
    } else if has("diff") || has("diff_b") {
        (FileAlgo::Full, FULL_KEYS)
    } else if has("w_norm") || has("b_norm") {
        (FileAlgo::Norm, NORM_KEYS)
    } else if has("weight") {
        (FileAlgo::Ia3, IA3_KEYS)
    } else {
        let keys: Vec<String> = tensors.keys().map(|k| format!("`{name}.{k}`")).collect();
        bail!(
            "unknown tensor layout for module {name}: {}",
            keys.join(", ")
        );
    };
    for k in tensors.keys() {
        if !allowed.contains(&k.as_str()) {
            bail!("`{name}.{k}`: unknown tensor for a {} module", algo.name());
        }
    }
    let get = |k: &str| -> Result<&Tensor> {
        tensors
            .get(k)
            .ok_or_else(|| anyhow!("`{name}.{k}` is missing ({} module)", algo.name()))
    };
    let dims = |k: &str| -> Result<Vec<usize>> { Ok(get(k)?.dims().to_vec()) };
    let bad = |k: &str, why: String| -> anyhow::Error {
        anyhow!("`{name}.{k}` has a wrong shape: {why}")
    };
    let alpha = match tensors.get("alpha") {
        Some(t) => {
            if t.elem_count() != 1 {
                return Err(bad("alpha", format!("{:?}, expected a scalar", t.dims())));
            }
            Some(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0])
        }
        None => None,
    };
    let mut algo = algo;
    let mut rank = None;
    let mut tucker = false;
    let weight_shape: Vec<usize>;
    match algo {
        FileAlgo::Lora => {
            let (d, u) = (dims("lora_down.weight")?, dims("lora_up.weight")?);
            let r = d[0];
            if !(d.len() == 2 || d.len() == 4) {
                return Err(bad("lora_down.weight", format!("{d:?} (needs 2-D or 4-D)")));
            }
            if u.len() < 2 || u[1] != r || u[2..].iter().any(|&x| x != 1) {
                return Err(bad(
                    "lora_up.weight",
                    format!("{u:?} does not match rank {r} of lora_down {d:?}"),
                ));
            }
            rank = Some(r);
            if let Some(m) = tensors.get("lora_mid.weight") {
                let m = m.dims();
                if m.len() != 4 || m[0] != r || m[1] != r || d.len() != 4 {
                    return Err(bad(
                        "lora_mid.weight",
                        format!("{m:?} needs ({r}, {r}, kh, kw) with a 4-D lora_down"),
                    ));
                }
                tucker = true;
                weight_shape = vec![u[0], d[1], m[2], m[3]];
            } else if d.len() == 4 {
                weight_shape = vec![u[0], d[1], d[2], d[3]];
            } else {
                weight_shape = vec![u[0], d[1]];
            }
            let kxk = weight_shape.len() == 4 && weight_shape[2..] != [1, 1];
            algo = if hints.dylora || (u.len() == 2 && d.len() == 4) {
                FileAlgo::Dylora
            } else if tucker || has("dora_scale") || !hints.kohya {
                FileAlgo::LycorisLocon
            } else if kxk {
                FileAlgo::Locon
            } else {
                FileAlgo::Lora
            };
        }
        FileAlgo::Loha => {
            let (w1a, w1b) = (dims("hada_w1_a")?, dims("hada_w1_b")?);
            let (w2a, w2b) = (dims("hada_w2_a")?, dims("hada_w2_b")?);
            if w1a.len() != 2 || w1b.len() != 2 || w2a != w1a || w2b != w1b {
                return Err(bad(
                    "hada_w2_a",
                    format!("w1_a {w1a:?}, w1_b {w1b:?}, w2_a {w2a:?}, w2_b {w2b:?} disagree"),
                ));
            }
            let r = w1b[0];
            rank = Some(r);
            match (tensors.get("hada_t1"), tensors.get("hada_t2")) {
                (Some(t1), Some(t2)) => {
                    if t1.dims() != t2.dims()
                        || t1.rank() != 4
                        || t1.dims()[..2] != [r, r]
                        || w1a[0] != r
                    {
                        return Err(bad(
                            "hada_t1",
                            format!("{:?} (Tucker core needs ({r}, {r}, kh, kw))", t1.dims()),
                        ));
                    }
                    tucker = true;
                    weight_shape = vec![w1a[1], w1b[1], t1.dims()[2], t1.dims()[3]];
                }
                (None, None) => {
                    if w1a[1] != r {
                        return Err(bad(
                            "hada_w1_a",
                            format!("{w1a:?} does not match rank {r} of hada_w1_b {w1b:?}"),
                        ));
                    }
                    weight_shape = vec![w1a[0], w1b[1]];
                }
                (Some(_), None) => bail!("`{name}.hada_t2` is missing (hada_t1 is present)"),
                (None, Some(_)) => bail!("`{name}.hada_t1` is missing (hada_t2 is present)"),
            }
        }
        FileAlgo::Lokr => {
            let (a, c) = match tensors.get("lokr_w1") {
                Some(w) if w.rank() == 2 => (w.dims()[0], w.dims()[1]),
                Some(w) => return Err(bad("lokr_w1", format!("{:?} (needs 2-D)", w.dims()))),
                None => {
                    let (x, y) = (dims("lokr_w1_a")?, dims("lokr_w1_b")?);
                    if x.len() != 2 || y.len() != 2 || x[1] != y[0] {
                        return Err(bad(
                            "lokr_w1_b",
                            format!("{y:?} does not follow lokr_w1_a {x:?}"),
                        ));
                    }
                    rank = Some(x[1]);
                    (x[0], y[1])
                }
            };
            let w2_shape: Vec<usize> = match (tensors.get("lokr_w2"), tensors.get("lokr_t2")) {
                (Some(w), _) => {
                    if !(w.rank() == 2 || w.rank() == 4) {
                        return Err(bad("lokr_w2", format!("{:?} (needs 2-D or 4-D)", w.dims())));
                    }
                    w.dims().to_vec()
                }
                (None, Some(t)) => {
                    let (x, y) = (dims("lokr_w2_a")?, dims("lokr_w2_b")?);
                    let r = x[0];
                    if x.len() != 2
                        || y.len() != 2
                        || y[0] != r
                        || t.rank() != 4
                        || t.dims()[..2] != [r, r]
                    {
                        return Err(bad(
                            "lokr_t2",
                            format!("{:?} with w2_a {x:?}, w2_b {y:?}", t.dims()),
                        ));
                    }
                    tucker = true;
                    rank = rank.or(Some(r));
                    vec![x[1], y[1], t.dims()[2], t.dims()[3]]
                }
                (None, None) => {
                    let (x, y) = (dims("lokr_w2_a")?, dims("lokr_w2_b")?);
                    if x.len() != 2 || y.len() < 2 || x[1] != y[0] {
                        return Err(bad(
                            "lokr_w2_b",
                            format!("{y:?} does not follow lokr_w2_a {x:?}"),
                        ));
                    }
                    rank = rank.or(Some(x[1]));
                    vec![x[0], y[1..].iter().product()]
                }
            };
            let mut s = vec![a * w2_shape[0], c * w2_shape[1]];
            s.extend_from_slice(&w2_shape[2..]);
            weight_shape = s;
        }
        FileAlgo::Ia3 => {
            let w = dims("weight")?;
            let on_input = match tensors.get("on_input") {
                Some(t) => {
                    t.to_dtype(DType::F64)?
                        .flatten_all()?
                        .to_vec1::<f64>()?
                        .first()
                        .copied()
                        .unwrap_or(0.0)
                        != 0.0
                }
                None => false,
            };
            let n = match w.as_slice() {
                [n] => *n,
                [1, n, 1, 1] => *n,
                _ => {
                    return Err(bad(
                        "weight",
                        format!("{w:?} (IA3 needs (n,) or (1, n, 1, 1))"),
                    ))
                }
            };
            // The other width is unknown without the base weight.
            weight_shape = if w.len() == 4 {
                vec![n, n, 1, 1]
            } else {
                vec![n, n]
            };
            let _ = on_input;
        }
        FileAlgo::DiagOft => {
            let b = dims("oft_blocks")?;
            if b[1] != b[2] {
                return Err(bad("oft_blocks", format!("{b:?} (blocks must be square)")));
            }
            rank = Some(b[1]);
            weight_shape = vec![b[0] * b[1], b[0] * b[1]];
        }
        FileAlgo::Boft => {
            let b = dims("oft_blocks")?;
            if b[2] != b[3] {
                return Err(bad("oft_blocks", format!("{b:?} (blocks must be square)")));
            }
            rank = Some(b[2]);
            weight_shape = vec![b[1] * b[2], b[1] * b[2]];
        }
        FileAlgo::Glora => {
            let (a1, a2, b1, b2) = (
                dims("a1.weight")?,
                dims("a2.weight")?,
                dims("b1.weight")?,
                dims("b2.weight")?,
            );
            let r = a2[0];
            if a1.len() < 2
                || a1[1] != r
                || b1.len() < 2
                || b1[1] != r
                || b2[0] != r
                || b2.len() < 2
            {
                return Err(bad(
                    "b1.weight",
                    format!("a1 {a1:?}, a2 {a2:?}, b1 {b1:?}, b2 {b2:?} disagree on the rank"),
                ));
            }
            rank = Some(r);
            let mut s = vec![b1[0], b2[1]];
            s.extend_from_slice(&b2[2..]);
            weight_shape = s;
        }
        FileAlgo::GloraEx => {
            let (a1, b1, b2) = (dims("a1.weight")?, dims("b1.weight")?, dims("b2.weight")?);
            dims("a2.weight")?;
            let r = a1[0];
            if b1[0] != r || b2.len() < 2 || b2[1] != r || b1.len() < 2 {
                return Err(bad(
                    "b2.weight",
                    format!("a1 {a1:?}, b1 {b1:?}, b2 {b2:?} disagree on the rank"),
                ));
            }
            rank = Some(r);
            let mut s = vec![b2[0], b1[1]];
            s.extend_from_slice(&b1[2..]);
            weight_shape = s;
        }
        FileAlgo::Abba => {
            let (d1, u1, d2, u2) = (
                dims("lora_down1.weight")?,
                dims("lora_up1.weight")?,
                dims("lora_down2.weight")?,
                dims("lora_up2.weight")?,
            );
            if u1.len() < 2
                || u1[1] != d1[0]
                || u2.len() < 2
                || u2[1] != d2[0]
                || u1[0] != u2[0]
                || d1[1..] != d2[1..]
            {
                return Err(bad(
                    "lora_up2.weight",
                    format!("down1 {d1:?}, up1 {u1:?}, down2 {d2:?}, up2 {u2:?} disagree"),
                ));
            }
            rank = Some(d1[0] + d2[0]);
            let mut s = vec![u1[0]];
            s.extend_from_slice(&d1[1..]);
            weight_shape = s;
        }
        FileAlgo::Full => {
            let d = dims("diff")?;
            if let Some(b) = tensors.get("diff_b") {
                if b.dims() != [d[0]] {
                    return Err(bad(
                        "diff_b",
                        format!("{:?}, expected [{}]", b.dims(), d[0]),
                    ));
                }
            }
            weight_shape = d;
        }
        FileAlgo::Norm => {
            let w = dims("w_norm")?;
            if w.len() != 1 {
                return Err(bad("w_norm", format!("{w:?} (needs 1-D)")));
            }
            if let Some(b) = tensors.get("b_norm") {
                if b.dims() != w.as_slice() {
                    return Err(bad("b_norm", format!("{:?}, expected {w:?}", b.dims())));
                }
            }
            weight_shape = w;
        }
        _ => unreachable!("detection yields only the cases above"),
    }
    let (dora, wd_on_output) = match tensors.get("dora_scale") {
        Some(t) => {
            let d = t.dims();
            let on_output = d.len() >= 2 && d[0] != 1 || (d.len() >= 2 && d[0] == 1 && d[1] == 1);
            if d.len() < 2 || d.iter().product::<usize>() != d[0].max(d[1]) {
                return Err(bad(
                    "dora_scale",
                    format!("{d:?} (needs (out, 1, …) or (1, in, …))"),
                ));
            }
            (true, Some(on_output))
        }
        None => (false, None),
    };
    if weight_shape.iter().any(|&x| x == 0) || rank == Some(0) {
        bail!("module {name}: empty tensors (shape {weight_shape:?})");
    }
    Ok(LoadedModule {
        name,
        algo,
        tensors,
        rank,
        alpha,
        tucker,
        dora,
        wd_on_output,
        weight_shape,
    })
}

// ---------------------------------------------------------------------------------------------
// Module names
// ---------------------------------------------------------------------------------------------

/// Where a module sits: the network part (`unet`, `te`, `te1`, `te2`, `lycoris`, other) and a
/// block label (`down_blocks_0`, `mid_block`, `input_blocks_4`, `layers_3`, …).
pub fn module_group(name: &str) -> (String, String) {
    let (part, rest) = if let Some(r) = name.strip_prefix("lora_unet_") {
        ("unet", r)
    } else if let Some(r) = name.strip_prefix("lora_te1_") {
        ("te1", r)
    } else if let Some(r) = name.strip_prefix("lora_te2_") {
        ("te2", r)
    } else if let Some(r) = name.strip_prefix("lora_te3_") {
        ("te3", r)
    } else if let Some(r) = name.strip_prefix("lora_te_") {
        ("te", r)
    } else if let Some(r) = name.strip_prefix("lycoris_") {
        ("lycoris", r)
    } else {
        ("other", name)
    };
    let parts: Vec<&str> = rest.split('_').collect();
    let block = if let Some(i) = rest.find("layers_") {
        // text encoders: text_model_encoder_layers_{i}_…
        let tail = &rest[i + 7..];
        format!("layers_{}", tail.split('_').next().unwrap_or(""))
    } else {
        match parts.as_slice() {
            ["double", "blocks", n, ..] => format!("double_blocks_{n}"),
            ["single", "blocks", n, ..] => format!("single_blocks_{n}"),
            ["down", "blocks", n, ..] => format!("down_blocks_{n}"),
            ["up", "blocks", n, ..] => format!("up_blocks_{n}"),
            ["mid", "block", ..] => "mid_block".into(),
            ["input", "blocks", n, ..] => format!("input_blocks_{n}"),
            ["output", "blocks", n, ..] => format!("output_blocks_{n}"),
            ["middle", "block", ..] => "middle_block".into(),
            [a, b, ..] if *a == "time" || *a == "label" => format!("{a}_{b}"),
            [a, b, ..] if *a == "conv" => format!("{a}_{b}"),
            [a, ..] => (*a).to_string(),
            [] => String::new(),
        }
    };
    (part.to_string(), block)
}

pub mod compat;
pub mod convert;
pub mod flux_diffusers;
pub mod merge;
pub mod resize;

#[cfg(test)]
mod tests;
