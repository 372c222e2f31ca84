//! Single-file checkpoints: one `.safetensors` with the original LDM / SGM key names, the
//! format most shared SD checkpoints use.
//!
//! | part | SD 1.x | SD 2.x | SDXL |
//! |---|---|---|---|
//! | UNet | `model.diffusion_model.*` | same | same (+ `label_emb`) |
//! | text encoder | `cond_stage_model.transformer.[text_model.]*` (CLIP-L, transformers names) | `cond_stage_model.model.*` (OpenCLIP-H) | `conditioner.embedders.0.transformer.*` (CLIP-L) and `conditioner.embedders.1.model.*` (OpenCLIP-bigG) |
//! | VAE | `first_stage_model.*` | same | same |
//!
//! Loft's models take diffusers / transformers names, so a checkpoint is read through a
//! [`KeyMap`]: for every tensor a model asks for (`down_blocks.0.resnets.0.conv1.weight`), where
//! it is stored ([`Stored`]) — the same tensor under its LDM name, one third of OpenCLIP's fused
//! `in_proj_weight`, the transpose of OpenCLIP's `text_projection`, or a 1×1 conv the LDM VAE's
//! attention uses where diffusers has a Linear. The same map written backwards is [`save`].
//! Tensors are read from the memory-mapped file one at a time and cast on read
//! ([`MappedFile`]), so f16 / bf16 / f32 files load into any compute dtype.
//!
//! **Family** ([`detect_family`]): `conditioner.embedders.1` → SDXL, `cond_stage_model.model`
//! → SD2.x, `cond_stage_model.transformer` → SD1.x. v-prediction (SD2 768-v) is not in the
//! keys: it is the training config's business.
//!
//! **Configs.** A checkpoint carries no config. [`Checkpoint::open`] reads every size the
//! shapes give (block channels, resnets per block, transformer depth per block, linear or
//! conv projections, cross-attention width, SDXL's added-condition width; text encoder width,
//! depth, MLP width, vocabulary; VAE channels and depth) and takes the rest from the family's
//! rules, which hold for every released SD model: SD1.x has 8 attention heads, SD2.x / SDXL
//! and every CLIP have 64-wide heads, GroupNorm uses 32 groups, CLIP-L uses quick-GELU and
//! OpenCLIP GELU, SD2's text encoder keeps 23 of OpenCLIP-H's 24 layers (it conditions on the
//! penultimate one, as diffusers' config), the VAE scaling factor is 0.18215 (0.13025 for
//! SDXL). A model outside those rules (the tiny test fixtures, a custom model) is opened with
//! [`Checkpoint::open_with_config_dir`] and a diffusers folder's `config.json` files, as
//! diffusers' `from_single_file(config=…)`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::config::{read_json, ClipTextConfig, PerBlock, UNetConfig, VaeConfig};
use super::ldm_names::{unet_ldm_path, UNetLayout};
use super::safetensors_io::{st_dtype, write_streaming, MappedFile, OutEntry};
use super::{AutoencoderKL, ClipTextModel, ModelFamily, UNet2DConditionModel};

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const SD1_CLIP: &str = "cond_stage_model.transformer.";
const SD2_OPENCLIP: &str = "cond_stage_model.model.";
const SDXL_CLIP: &str = "conditioner.embedders.0.transformer.";
const SDXL_OPENCLIP: &str = "conditioner.embedders.1.model.";

/// A model inside a pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    /// Text encoder 0 (CLIP-L, or SD2's OpenCLIP-H) or 1 (SDXL's OpenCLIP-bigG).
    TextEncoder(usize),
    Vae,
}

impl Component {
    /// The diffusers sub-folder (`unet`, `text_encoder`, `text_encoder_2`, `vae`).
    pub fn folder(self) -> String {
        match self {
            Component::Unet => "unet".into(),
            Component::TextEncoder(0) => "text_encoder".into(),
            Component::TextEncoder(i) => format!("text_encoder_{}", i + 1),
            Component::Vae => "vae".into(),
        }
    }
}

/// Where a diffusers-named tensor is stored in a checkpoint, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stored {
    /// The same tensor under another name.
    Same(String),
    /// Rows `[part·n/parts, (part+1)·n/parts)` of a fused tensor: OpenCLIP keeps q, k and v
    /// stacked in `attn.in_proj_weight` / `in_proj_bias`.
    Rows { key: String, part: usize, parts: usize },
    /// The transpose: OpenCLIP applies `text_projection` as `x @ P`, a Linear as `x @ Wᵀ`.
    Transposed(String),
    /// A 1×1 conv weight `[o, i, 1, 1]` that diffusers holds as a Linear `[o, i]` (the LDM
    /// VAE's mid-block attention). Read as stored when it is already 2-D.
    Conv1x1(String),
    /// The stored tensor is rows `[start, start + len)` of the layer's `total`-row tensor: a
    /// diffusers Flux folder keeps `to_q`/`to_k`/`to_v` (and `proj_mlp`) apart where BFL's
    /// layer fuses them (`qkv`, `linear1`).
    RowSlice { key: String, start: usize, len: usize, total: usize },
    /// The stored tensor is the layer's with its two row halves swapped (diffusers'
    /// `norm_out.linear`: scale, shift; BFL's final adaLN: shift, scale).
    SwappedHalves(String),
}

impl Stored {
    pub fn key(&self) -> &str {
        match self {
            Stored::Same(k) | Stored::Transposed(k) | Stored::Conv1x1(k) | Stored::SwappedHalves(k) => k,
            Stored::Rows { key, .. } | Stored::RowSlice { key, .. } => key,
        }
    }

    /// Swaps the two row halves of `t` (its own inverse).
    fn swap_halves(t: &Tensor) -> Result<Tensor> {
        let half = t.dim(0)? / 2;
        Tensor::cat(&[t.narrow(0, half, half)?, t.narrow(0, 0, half)?], 0)
    }

    /// Reads the tensor as the diffusers model holds it, cast to `dtype`.
    pub fn read(&self, file: &MappedFile, dtype: Option<DType>) -> Result<Tensor> {
        let t = file.read(self.key(), dtype)?;
        match self {
            Stored::Same(_) => Ok(t),
            Stored::Rows { part, parts, key } => {
                let n = t.dim(0)?;
                if n % parts != 0 {
                    bail!("{key}: {n} rows do not split into {parts}");
                }
                t.narrow(0, part * n / parts, n / parts)?.contiguous()
            }
            Stored::Transposed(_) => t.t()?.contiguous(),
            Stored::Conv1x1(_) => match t.dims() {
                [o, i, 1, 1] => t.reshape((*o, *i)),
                _ => Ok(t),
            },
            // A slice alone is only part of the layer: the caller joins the slices.
            Stored::RowSlice { .. } => Ok(t),
            Stored::SwappedHalves(_) => Self::swap_halves(&t),
        }
    }

    /// `t` (diffusers layout) in the stored layout, for the stored tensor of shape
    /// `stored_shape`: a Rows part is placed in its rows with zeros elsewhere, so adding it
    /// to the stored tensor adds `t` to that part.
    pub fn to_stored_layout(&self, t: &Tensor, stored_shape: &[usize]) -> Result<Tensor> {
        match self {
            Stored::Same(_) => Ok(t.clone()),
            Stored::Transposed(_) => t.t()?.contiguous(),
            Stored::Conv1x1(_) => t.reshape(stored_shape),
            Stored::RowSlice { start, len, .. } => t.narrow(0, *start, *len)?.contiguous(),
            Stored::SwappedHalves(_) => Self::swap_halves(t),
            Stored::Rows { part, parts, .. } => {
                let n = stored_shape[0] / parts;
                let mut pieces = Vec::with_capacity(*parts);
                for p in 0..*parts {
                    if p == *part {
                        pieces.push(t.clone());
                    } else {
                        pieces.push(t.zeros_like()?);
                    }
                }
                debug_assert_eq!(t.dim(0)?, n);
                Tensor::cat(&pieces, 0)
            }
        }
    }
}

/// How a text encoder's keys are stored.
#[derive(Clone, Debug, PartialEq, Eq)]
enum TextKeys {
    /// transformers' CLIPTextModel names under `prefix`; old SD1 files omit `text_model.`.
    Clip { prefix: String, text_model: bool },
    /// OpenCLIP names under `prefix`.
    OpenClip { prefix: String },
}

/// The diffusers → checkpoint key mapping of one checkpoint layout.
#[derive(Clone, Debug)]
pub struct KeyMap {
    pub family: ModelFamily,
    unet: UNetLayout,
    vae_blocks: usize,
    text: Vec<TextKeys>,
}

impl KeyMap {
    /// The mapping for `family`'s usual key names (what [`save`] writes).
    pub fn for_family(family: ModelFamily, unet: &UNetConfig, vae: &VaeConfig) -> Self {
        let text = match family {
            ModelFamily::Sd15 => vec![TextKeys::Clip { prefix: SD1_CLIP.into(), text_model: true }],
            ModelFamily::Sd2 => vec![TextKeys::OpenClip { prefix: SD2_OPENCLIP.into() }],
            ModelFamily::Sdxl => vec![
                TextKeys::Clip { prefix: SDXL_CLIP.into(), text_model: true },
                TextKeys::OpenClip { prefix: SDXL_OPENCLIP.into() },
            ],
            // Flux files are read by models::flux_weights, not through LDM key maps.
            ModelFamily::FluxDev | ModelFamily::FluxSchnell => vec![],
        };
        Self { family, unet: UNetLayout::from_config(unet), vae_blocks: vae.block_out_channels.len(), text }
    }

    /// The mapping for the keys `file` actually uses (SD1 files with or without `text_model.`).
    fn for_file(family: ModelFamily, unet: &UNetConfig, vae: &VaeConfig, file: &MappedFile) -> Self {
        let mut m = Self::for_family(family, unet, vae);
        if family == ModelFamily::Sd15 && !file.names().iter().any(|k| k.starts_with("cond_stage_model.transformer.text_model.")) {
            m.text[0] = TextKeys::Clip { prefix: SD1_CLIP.into(), text_model: false };
        }
        m
    }

    pub fn text_encoders(&self) -> usize {
        self.text.len()
    }

    /// Where the diffusers tensor `name` of `component` is stored, or None when this layout
    /// has no such tensor.
    pub fn stored(&self, component: Component, name: &str) -> Option<Stored> {
        match component {
            Component::Unet => {
                let (module, param) = name.rsplit_once('.')?;
                let ldm = unet_ldm_path(module, &self.unet)?;
                Some(Stored::Same(format!("{UNET}{ldm}.{param}")))
            }
            Component::TextEncoder(i) => match self.text.get(i)? {
                TextKeys::Clip { prefix, text_model } => {
                    let name = if *text_model { name } else { name.strip_prefix("text_model.")? };
                    Some(Stored::Same(format!("{prefix}{name}")))
                }
                TextKeys::OpenClip { prefix } => open_clip_stored(name, prefix),
            },
            Component::Vae => vae_stored(name, self.vae_blocks).map(|s| match s {
                Stored::Same(k) => Stored::Same(format!("{VAE}{k}")),
                Stored::Conv1x1(k) => Stored::Conv1x1(format!("{VAE}{k}")),
                other => other,
            }),
        }
    }
}

/// transformers CLIP name → OpenCLIP name (under `prefix`).
fn open_clip_stored(name: &str, prefix: &str) -> Option<Stored> {
    let same = |k: String| Some(Stored::Same(format!("{prefix}{k}")));
    match name {
        "text_model.embeddings.token_embedding.weight" => return same("token_embedding.weight".into()),
        "text_model.embeddings.position_embedding.weight" => return same("positional_embedding".into()),
        "text_model.final_layer_norm.weight" => return same("ln_final.weight".into()),
        "text_model.final_layer_norm.bias" => return same("ln_final.bias".into()),
        "text_projection.weight" => return Some(Stored::Transposed(format!("{prefix}text_projection"))),
        _ => {}
    }
    let rest = name.strip_prefix("text_model.encoder.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    let block = format!("{prefix}transformer.resblocks.{layer}");
    let qkv = |part: usize| Some(Stored::Rows { key: format!("{block}.attn.in_proj_{param}"), part, parts: 3 });
    let open = match module {
        "self_attn.q_proj" => return qkv(0),
        "self_attn.k_proj" => return qkv(1),
        "self_attn.v_proj" => return qkv(2),
        "self_attn.out_proj" => "attn.out_proj",
        "layer_norm1" => "ln_1",
        "layer_norm2" => "ln_2",
        "mlp.fc1" => "mlp.c_fc",
        "mlp.fc2" => "mlp.c_proj",
        _ => return None,
    };
    Some(Stored::Same(format!("{block}.{open}.{param}")))
}

/// diffusers AutoencoderKL name → LDM name (without `first_stage_model.`). LDM numbers the
/// decoder's up blocks from the lowest resolution's end (`up.{n-1-i}`), keeps each resnet's
/// inner names but calls the shortcut `nin_shortcut`, and uses 1×1 convs in attention.
/// Where an LDM-layout VAE file without a prefix (BFL's `ae.safetensors`) keeps diffusers VAE
/// tensor `name` (for a VAE of `n_blocks` levels).
pub fn bare_vae_stored(name: &str, n_blocks: usize) -> Option<Stored> {
    vae_stored(name, n_blocks)
}

/// BFL's Flux autoencoder file (`ae.safetensors`: the LDM VAE layout without the
/// `first_stage_model.` prefix, 16 latent channels, no quant convs), with Flux's scaling 0.3611
/// and shift 0.1159; the sizes are read from its shapes unless `config` gives them (the group
/// count is not in the shapes: Flux's is 32).
pub fn load_flux_ae(path: &Path, config: Option<VaeConfig>, dtype: DType, device: &Device) -> Result<AutoencoderKL> {
    let file = Arc::new(MappedFile::open(path)?);
    let n = count(&file, |i| format!("encoder.down.{i}.block.0.conv1.weight"));
    if n == 0 {
        bail!("{}: not a Flux autoencoder file (no encoder.down.0.block.0.conv1.weight)", path.display());
    }
    let channels: Vec<usize> = (0..n).map(|i| shape(&file, &format!("encoder.down.{i}.block.0.conv1.weight")).map(|s| s[0])).collect::<Result<_>>()?;
    let inferred: VaeConfig = parse(serde_json::json!({
        "in_channels": shape(&file, "encoder.conv_in.weight")?[1],
        "out_channels": shape(&file, "decoder.conv_out.weight")?[0],
        "down_block_types": vec!["DownEncoderBlock2D"; n],
        "up_block_types": vec!["UpDecoderBlock2D"; n],
        "block_out_channels": channels,
        "layers_per_block": count(&file, |j| format!("encoder.down.0.block.{j}.conv1.weight")),
        "latent_channels": shape(&file, "decoder.conv_in.weight")?[1],
        "norm_num_groups": 32.min(channels[0]),
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": file.contains("quant_conv.weight"),
        "use_post_quant_conv": file.contains("post_quant_conv.weight"),
        "mid_block_add_attention": file.contains("encoder.mid.attn_1.q.weight"),
    }))?;
    let config = config.unwrap_or(inferred);
    let backend = BareVaeBackend { file, n_blocks: n };
    AutoencoderKL::new(&config, VarBuilder::from_backend(Box::new(backend), dtype, device.clone()))
}

/// Serves diffusers VAE names from a prefix-less LDM VAE file.
struct BareVaeBackend {
    file: Arc<MappedFile>,
    n_blocks: usize,
}

impl candle_nn::var_builder::SimpleBackend for BareVaeBackend {
    fn get(&self, s: candle_core::Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            bail!("{}: {name} has shape {:?}, the VAE expects {:?}", self.file.path().display(), t.dims(), s.dims());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let Some(stored) = vae_stored(name, self.n_blocks).filter(|s| self.file.contains(s.key())) else {
            bail!("{}: no tensor for VAE weight {name}", self.file.path().display());
        };
        stored.read(&self.file, Some(dtype))?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        vae_stored(name, self.n_blocks).is_some_and(|s| self.file.contains(s.key()))
    }
}

fn vae_stored(name: &str, n_blocks: usize) -> Option<Stored> {
    let (module, param) = name.rsplit_once('.')?;
    let resnet = |r: &str| -> Option<String> {
        match r {
            "norm1" | "conv1" | "norm2" | "conv2" => Some(r.to_string()),
            "conv_shortcut" => Some("nin_shortcut".into()),
            _ => None,
        }
    };
    let idx = |s: &str| -> Option<(usize, String)> {
        let (n, rest) = s.split_once('.')?;
        Some((n.parse().ok()?, rest.to_string()))
    };
    let (coder, rest) = module.split_once('.').unwrap_or((module, ""));
    let ldm = match (coder, rest) {
        ("quant_conv", "") | ("post_quant_conv", "") => module.to_string(),
        ("encoder" | "decoder", "conv_in" | "conv_out") => module.to_string(),
        ("encoder" | "decoder", "conv_norm_out") => format!("{coder}.norm_out"),
        ("encoder" | "decoder", r) if r.starts_with("mid_block.") => {
            let r = r.strip_prefix("mid_block.")?;
            if let Some(r) = r.strip_prefix("resnets.") {
                let (j, inner) = idx(r)?;
                format!("{coder}.mid.block_{}.{}", j + 1, resnet(&inner)?)
            } else {
                let inner = r.strip_prefix("attentions.0.")?;
                let (part, conv) = match inner {
                    "group_norm" => ("norm", false),
                    "to_q" => ("q", true),
                    "to_k" => ("k", true),
                    "to_v" => ("v", true),
                    "to_out.0" => ("proj_out", true),
                    _ => return None,
                };
                let key = format!("{coder}.mid.attn_1.{part}.{param}");
                return Some(if conv && param == "weight" { Stored::Conv1x1(key) } else { Stored::Same(key) });
            }
        }
        ("encoder", r) if r.starts_with("down_blocks.") => {
            let (i, r) = idx(r.strip_prefix("down_blocks.")?)?;
            if let Some(r) = r.strip_prefix("resnets.") {
                let (j, inner) = idx(r)?;
                format!("encoder.down.{i}.block.{j}.{}", resnet(&inner)?)
            } else if r == "downsamplers.0.conv" {
                format!("encoder.down.{i}.downsample.conv")
            } else {
                return None;
            }
        }
        ("decoder", r) if r.starts_with("up_blocks.") => {
            let (i, r) = idx(r.strip_prefix("up_blocks.")?)?;
            let level = n_blocks.checked_sub(1 + i)?;
            if let Some(r) = r.strip_prefix("resnets.") {
                let (j, inner) = idx(r)?;
                format!("decoder.up.{level}.block.{j}.{}", resnet(&inner)?)
            } else if r == "upsamplers.0.conv" {
                format!("decoder.up.{level}.upsample.conv")
            } else {
                return None;
            }
        }
        _ => return None,
    };
    Some(Stored::Same(format!("{ldm}.{param}")))
}

// ---------------------------------------------------------------------------------------------
// What a file is
// ---------------------------------------------------------------------------------------------

/// The family of a checkpoint's keys, or an error that says what the file is instead.
pub fn family_of(file: &MappedFile) -> Result<ModelFamily> {
    let names = file.names();
    let any = |p: &str| names.iter().any(|k| k.starts_with(p));
    let has_unet = any(UNET);
    let family = if any("conditioner.embedders.1.model.") {
        Some(ModelFamily::Sdxl)
    } else if any("conditioner.embedders.0.model.") && !any("conditioner.embedders.1.") {
        bail!("{} looks like the SDXL refiner (one OpenCLIP-bigG text encoder), which Loft does not train", file.path().display())
    } else if any(SD2_OPENCLIP) {
        Some(ModelFamily::Sd2)
    } else if any(SD1_CLIP) {
        Some(ModelFamily::Sd15)
    } else {
        None
    };
    match family {
        Some(f) if has_unet && any(VAE) => Ok(f),
        Some(f) => bail!(
            "{}: a {} checkpoint without {}: Loft needs the UNet, text encoder(s) and VAE in one file",
            file.path().display(),
            f.name(),
            if has_unet { "its VAE (first_stage_model.*)" } else { "its UNet (model.diffusion_model.*)" }
        ),
        None => bail!("{}: not an SD1.x / SD2.x / SDXL checkpoint: {}", file.path().display(), what_it_looks_like(names)),
    }
}

/// A short description of a non-checkpoint file from its keys.
fn what_it_looks_like(names: &[String]) -> String {
    let any = |p: &str| names.iter().any(|k| k.starts_with(p));
    let contains = |p: &str| names.iter().any(|k| k.contains(p));
    if names.is_empty() {
        return "the file holds no tensors".into();
    }
    if any("lora_unet_") || any("lora_te") || any("lycoris_") || contains(".lora_down.") || contains(".hada_w1") || contains(".lokr_w1") {
        let example = names.iter().find(|k| k.starts_with("lora_")).unwrap_or(&names[0]);
        return format!(
            "it looks like a LoRA/LyCORIS network file (lora_unet_… keys, e.g. `{example}`), not a base model; \
             `loft lora inspect` shows what it holds and `loft lora merge` merges it into a model"
        );
    }
    if (any(VAE) || any("encoder.down.") || any("encoder.down_blocks.")) && !any(UNET) && !any("down_blocks.") {
        return "it looks like a VAE-only file (encoder/decoder keys, no UNet or text encoder)".into();
    }
    if any("down_blocks.") && any("conv_in.") {
        return "it looks like one diffusers UNet weight file; pass the diffusers folder (with model_index.json) instead".into();
    }
    if any("text_model.") {
        return "it looks like one text encoder weight file; pass the whole model".into();
    }
    if any(UNET) {
        return "it has a UNet (model.diffusion_model.*) but no text encoder Loft knows".into();
    }
    if contains("double_blocks.") || contains("joint_blocks.") || contains("single_blocks.") {
        return "it looks like a Flux / SD3 transformer, which Loft does not train yet".into();
    }
    let shown: Vec<&str> = names.iter().take(3).map(|s| s.as_str()).collect();
    format!("unrecognised keys (e.g. {})", shown.join(", "))
}

/// The model family of the checkpoint at `path`.
pub fn detect_family(path: &Path) -> Result<ModelFamily> {
    family_of(&MappedFile::open(path)?)
}

// ---------------------------------------------------------------------------------------------
// Configs from shapes
// ---------------------------------------------------------------------------------------------

fn shape<'a>(file: &'a MappedFile, key: &str) -> Result<&'a [usize]> {
    file.shape(key).ok_or_else(|| candle_core::Error::Msg(format!("{}: no tensor {key}", file.path().display())))
}

fn count(file: &MappedFile, f: impl Fn(usize) -> String) -> usize {
    (0..).take_while(|&i| file.contains(&f(i))).count()
}

fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T> {
    serde_json::from_value(v).map_err(candle_core::Error::wrap)
}

/// Head count with 64-wide heads, as SD2.x, SDXL and CLIP use.
fn heads64(width: usize, what: &str) -> Result<usize> {
    if !width.is_multiple_of(64) || width == 0 {
        bail!("{what} is {width} wide, not a multiple of the 64-wide attention heads every released model uses; pass a diffusers config folder");
    }
    Ok(width / 64)
}

/// The UNet config the checkpoint's shapes give, with the family's rules for the rest.
pub fn infer_unet_config(family: ModelFamily, file: &MappedFile) -> Result<UNetConfig> {
    let k = |s: &str| format!("{UNET}{s}");
    let conv_in = shape(file, &k("input_blocks.0.0.weight"))?.to_vec();
    let out_channels = shape(file, &k("out.2.weight"))?[0];
    // Walk input_blocks: resnets (in_layers) and attentions per level, a downsampler (op)
    // closes a level.
    struct Level {
        channels: usize,
        resnets: usize,
        attention: Option<(usize, bool, usize)>, // depth, linear projection, context width
    }
    let attention_at = |prefix: &str| -> Result<Option<(usize, bool, usize)>> {
        let proj_in = format!("{prefix}.proj_in.weight");
        let Some(p) = file.shape(&proj_in) else { return Ok(None) };
        let depth = count(file, |t| format!("{prefix}.transformer_blocks.{t}.attn1.to_q.weight"));
        let ctx = shape(file, &format!("{prefix}.transformer_blocks.0.attn2.to_k.weight"))?[1];
        Ok(Some((depth, p.len() == 2, ctx)))
    };
    let mut levels: Vec<Level> = Vec::new();
    let mut cur = Level { channels: conv_in[0], resnets: 0, attention: None };
    for i in 1.. {
        let block = k(&format!("input_blocks.{i}"));
        if file.contains(&format!("{block}.0.op.weight")) {
            levels.push(std::mem::replace(&mut cur, Level { channels: 0, resnets: 0, attention: None }));
        } else if let Some(s) = file.shape(&format!("{block}.0.in_layers.2.weight")) {
            cur.channels = s[0];
            cur.resnets += 1;
            let a = attention_at(&format!("{block}.1"))?;
            if cur.resnets > 1 && a != cur.attention {
                bail!("{block}: attention differs within one block");
            }
            cur.attention = a;
        } else {
            break;
        }
    }
    levels.push(cur);
    let n = levels.len();
    let lpb = levels[0].resnets;
    if lpb == 0 || levels.iter().any(|l| l.resnets != lpb) {
        bail!("{}: the UNet's blocks have different resnet counts, which Loft does not support", file.path().display());
    }
    let mid = attention_at(&k("middle_block.1"))?;
    let mut linear = None;
    let mut context = None;
    for (depth, lin, ctx) in levels.iter().filter_map(|l| l.attention).chain(mid) {
        let _ = depth;
        if linear.is_some_and(|l| l != lin) || context.is_some_and(|c| c != ctx) {
            bail!("{}: the UNet mixes projection kinds or context widths", file.path().display());
        }
        linear = Some(lin);
        context = Some(ctx);
    }
    let Some(context) = context else { bail!("{}: the UNet has no cross-attention", file.path().display()) };
    let mid_depth = mid.map(|m| m.0);
    let mut tlpb = Vec::with_capacity(n);
    for (i, l) in levels.iter().enumerate() {
        tlpb.push(match (l.attention, i + 1 == n) {
            (Some((d, _, _)), true) if mid_depth.is_some_and(|m| m != d) => {
                bail!("{}: the mid block's transformer depth differs from the last block's", file.path().display())
            }
            (Some((d, _, _)), _) => d,
            (None, true) => mid_depth.unwrap_or(1),
            (None, false) => 1,
        });
    }
    let channels: Vec<usize> = levels.iter().map(|l| l.channels).collect();
    let heads = match family {
        ModelFamily::Sd15 => PerBlock::One(8),
        _ => PerBlock::Each(channels.iter().map(|&c| heads64(c, "a UNet block")).collect::<Result<_>>()?),
    };
    let down: Vec<&str> = levels.iter().map(|l| if l.attention.is_some() { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect();
    let up: Vec<&str> = levels.iter().rev().map(|l| if l.attention.is_some() { "CrossAttnUpBlock2D" } else { "UpBlock2D" }).collect();
    let time_embed = shape(file, &k("time_embed.0.weight"))?[0];
    let mut cfg = serde_json::json!({
        "in_channels": conv_in[1],
        "out_channels": out_channels,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": if mid.is_some() { serde_json::json!("UNetMidBlock2DCrossAttn") } else { serde_json::Value::Null },
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "transformer_layers_per_block": tlpb,
        "cross_attention_dim": context,
        "attention_head_dim": heads,
        "use_linear_projection": linear.unwrap_or(false),
        "conv_in_kernel": conv_in[2],
        "conv_out_kernel": shape(file, &k("out.2.weight"))?[2],
        "sample_size": match family { ModelFamily::Sd15 => 64, ModelFamily::Sd2 => 96, _ => 128 },
        "upcast_attention": family == ModelFamily::Sd2,
    });
    if time_embed != channels[0] * 4 {
        cfg["time_embedding_dim"] = time_embed.into();
    }
    if let Some(s) = file.shape(&k("label_emb.0.0.weight")) {
        // SDXL: [pooled text embedding ‖ 6 sinusoidal time ids], the pooled width being te2's
        // projection width.
        let input = s[1];
        let pooled = file.shape(&format!("{SDXL_OPENCLIP}text_projection")).map(|p| p[1]).unwrap_or(1280);
        if input <= pooled || !(input - pooled).is_multiple_of(6) {
            bail!("{}: label_emb takes {input} inputs, which is not {pooled} + 6 time ids", file.path().display());
        }
        cfg["addition_embed_type"] = "text_time".into();
        cfg["addition_time_embed_dim"] = ((input - pooled) / 6).into();
        cfg["projection_class_embeddings_input_dim"] = input.into();
    }
    parse(cfg)
}

/// Text encoder `index`'s config from the checkpoint's shapes and the family's rules.
pub fn infer_text_encoder_config(family: ModelFamily, index: usize, file: &MappedFile) -> Result<ClipTextConfig> {
    let map = KeyMap::for_file(family, &dummy_unet(), &dummy_vae(), file);
    let st = |name: &str| -> Result<Vec<usize>> {
        let Some(s) = map.stored(Component::TextEncoder(index), name) else { bail!("no text encoder {index}") };
        let sh = shape(file, s.key())?.to_vec();
        Ok(match s {
            Stored::Transposed(_) => sh.into_iter().rev().collect(),
            _ => sh,
        })
    };
    let tok = st("text_model.embeddings.token_embedding.weight")?;
    let pos = st("text_model.embeddings.position_embedding.weight")?;
    let (vocab, hidden) = (tok[0], tok[1]);
    let mut layers = count(file, |i| {
        map.stored(Component::TextEncoder(index), &format!("text_model.encoder.layers.{i}.mlp.fc1.weight"))
            .map(|s| s.key().to_string())
            .unwrap_or_default()
    });
    let open_clip = matches!(map.text[index], TextKeys::OpenClip { .. });
    if family == ModelFamily::Sd2 {
        // diffusers' SD2 text encoder has 23 layers: OpenCLIP-H's last one is never used.
        layers = layers.min(23);
    }
    let inter = st("text_model.encoder.layers.0.mlp.fc1.weight")?[0];
    let projection = if open_clip { st("text_projection.weight").ok().map(|s| s[0]) } else { None };
    let with_projection = family == ModelFamily::Sdxl && index == 1;
    parse(serde_json::json!({
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads64(hidden, "the text encoder")?,
        "max_position_embeddings": pos[0],
        "hidden_act": if open_clip { "gelu" } else { "quick_gelu" },
        "layer_norm_eps": 1e-5,
        "projection_dim": projection.unwrap_or(hidden),
        // CLIP's end-of-text token is the last id of its vocabulary (49407 of 49408); pooling
        // takes the first one.
        "eos_token_id": vocab - 1,
        "bos_token_id": vocab - 2,
        "architectures": [if with_projection { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }],
    }))
}

/// The VAE config from the checkpoint's shapes and the family's rules.
pub fn infer_vae_config(family: ModelFamily, file: &MappedFile) -> Result<VaeConfig> {
    let k = |s: &str| format!("{VAE}{s}");
    let n = count(file, |i| k(&format!("encoder.down.{i}.block.0.conv1.weight")));
    if n == 0 {
        bail!("{}: no VAE encoder blocks (first_stage_model.encoder.down.*)", file.path().display());
    }
    let channels: Vec<usize> =
        (0..n).map(|i| shape(file, &k(&format!("encoder.down.{i}.block.0.conv1.weight"))).map(|s| s[0])).collect::<Result<_>>()?;
    let lpb = count(file, |j| k(&format!("encoder.down.0.block.{j}.conv1.weight")));
    parse(serde_json::json!({
        "in_channels": shape(file, &k("encoder.conv_in.weight"))?[1],
        "out_channels": shape(file, &k("decoder.conv_out.weight"))?[0],
        "down_block_types": vec!["DownEncoderBlock2D"; n],
        "up_block_types": vec!["UpDecoderBlock2D"; n],
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "latent_channels": shape(file, &k("decoder.conv_in.weight"))?[1],
        "scaling_factor": if family == ModelFamily::Sdxl { 0.13025 } else { 0.18215 },
        "use_quant_conv": file.contains(&k("quant_conv.weight")),
        "use_post_quant_conv": file.contains(&k("post_quant_conv.weight")),
        "mid_block_add_attention": file.contains(&k("encoder.mid.attn_1.q.weight")),
        "sample_size": if family == ModelFamily::Sdxl { 1024 } else { 512 },
    }))
}

/// Configs only for building a [`KeyMap`] whose text-encoder part is all that is used.
fn dummy_unet() -> UNetConfig {
    parse(serde_json::json!({"down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"], "block_out_channels": [1],
        "cross_attention_dim": 1, "layers_per_block": 1}))
    .expect("static config")
}

fn dummy_vae() -> VaeConfig {
    parse(serde_json::json!({"down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [1]}))
        .expect("static config")
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// An opened checkpoint: its family, configs and key mapping; models are built on demand.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub family: ModelFamily,
    pub unet_config: UNetConfig,
    pub text_encoder_configs: Vec<ClipTextConfig>,
    pub vae_config: VaeConfig,
    file: Arc<MappedFile>,
    keys: Arc<KeyMap>,
}

/// Every model of a single-file checkpoint.
#[derive(Debug)]
pub struct SingleFileModel {
    pub family: ModelFamily,
    pub unet: UNet2DConditionModel,
    /// One text encoder (SD1.x, SD2.x) or two (SDXL: CLIP-L, then OpenCLIP-bigG with its
    /// projection).
    pub text_encoders: Vec<ClipTextModel>,
    pub vae: AutoencoderKL,
}

impl Checkpoint {
    /// Opens a checkpoint, detects its family and infers its configs (module docs).
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_inner(path, None)
    }

    /// Opens a checkpoint with the configs of a diffusers folder (`unet/config.json`,
    /// `text_encoder[_2]/config.json`, `vae/config.json`; weights there are not read), as
    /// diffusers' `from_single_file(config=…)`. A missing config falls back to inference.
    pub fn open_with_config_dir(path: &Path, config_dir: &Path) -> Result<Self> {
        Self::open_inner(path, Some(config_dir))
    }

    fn open_inner(path: &Path, config_dir: Option<&Path>) -> Result<Self> {
        let file = MappedFile::open(path)?;
        let family = family_of(&file)?;
        let from_dir = |c: Component| config_dir.map(|d| d.join(c.folder()).join("config.json")).filter(|p| p.is_file());
        let unet_config = match from_dir(Component::Unet) {
            Some(p) => read_json(&p)?,
            None => infer_unet_config(family, &file)?,
        };
        let vae_config = match from_dir(Component::Vae) {
            Some(p) => read_json(&p)?,
            None => infer_vae_config(family, &file)?,
        };
        let n_te = if family == ModelFamily::Sdxl { 2 } else { 1 };
        let text_encoder_configs = (0..n_te)
            .map(|i| match from_dir(Component::TextEncoder(i)) {
                Some(p) => read_json(&p),
                None => infer_text_encoder_config(family, i, &file),
            })
            .collect::<Result<Vec<_>>>()?;
        let keys = KeyMap::for_file(family, &unet_config, &vae_config, &file);
        Ok(Self { family, unet_config, text_encoder_configs, vae_config, file: Arc::new(file), keys: Arc::new(keys) })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn file(&self) -> &MappedFile {
        &self.file
    }

    /// The mapped file, shared.
    pub fn shared_file(&self) -> Arc<MappedFile> {
        self.file.clone()
    }

    pub fn key_map(&self) -> &KeyMap {
        &self.keys
    }

    /// A builder that serves `component`'s diffusers names from the checkpoint, cast to
    /// `dtype` on `device`.
    pub fn var_builder(&self, component: Component, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend = CheckpointBackend { file: self.file.clone(), keys: self.keys.clone(), component };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    pub fn load_unet(&self, dtype: DType, device: &Device) -> Result<UNet2DConditionModel> {
        UNet2DConditionModel::new(&self.unet_config, self.var_builder(Component::Unet, dtype, device))
    }

    /// Text encoder `index` (SDXL's second one with its projection).
    pub fn load_text_encoder(&self, index: usize, dtype: DType, device: &Device) -> Result<ClipTextModel> {
        let Some(cfg) = self.text_encoder_configs.get(index) else {
            bail!("{}: a {} checkpoint has no text encoder {index}", self.path().display(), self.family.name())
        };
        let with_projection = self.family == ModelFamily::Sdxl && index == 1;
        ClipTextModel::new(cfg, self.var_builder(Component::TextEncoder(index), dtype, device), with_projection)
    }

    pub fn load_vae(&self, dtype: DType, device: &Device) -> Result<AutoencoderKL> {
        AutoencoderKL::new(&self.vae_config, self.var_builder(Component::Vae, dtype, device))
    }

    /// Builds every model.
    pub fn load(&self, dtype: DType, device: &Device) -> Result<SingleFileModel> {
        Ok(SingleFileModel {
            family: self.family,
            unet: self.load_unet(dtype, device)?,
            text_encoders: (0..self.text_encoder_configs.len())
                .map(|i| self.load_text_encoder(i, dtype, device))
                .collect::<Result<_>>()?,
            vae: self.load_vae(dtype, device)?,
        })
    }
}

/// Loads every model of the checkpoint at `path` (configs inferred, module docs).
pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<SingleFileModel> {
    Checkpoint::open(path)?.load(dtype, device)
}

/// Serves one component's diffusers names from a checkpoint.
struct CheckpointBackend {
    file: Arc<MappedFile>,
    keys: Arc<KeyMap>,
    component: Component,
}

impl CheckpointBackend {
    fn stored(&self, name: &str) -> Result<Stored> {
        match self.keys.stored(self.component, name) {
            Some(s) if self.file.contains(s.key()) => Ok(s),
            Some(s) => bail!(
                "{}: the {} needs {name}, stored as {}, which the file does not have (a config that does not fit the checkpoint?)",
                self.file.path().display(),
                self.component.folder(),
                s.key()
            ),
            None => bail!("{}: no checkpoint key is known for {} tensor {name}", self.file.path().display(), self.component.folder()),
        }
    }
}

impl SimpleBackend for CheckpointBackend {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let stored = self.stored(name)?;
        let t = stored.read(&self.file, Some(dtype))?;
        if t.shape() != &s {
            bail!(
                "{}: {} tensor {name} (stored as {}) has shape {:?} but the config needs {:?}",
                self.file.path().display(),
                self.component.folder(),
                stored.key(),
                t.dims(),
                s.dims()
            );
        }
        t.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.stored(name)?.read(&self.file, Some(dtype))?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.stored(name).is_ok()
    }
}

/// The tensors a skeleton builder was asked for: (name, shape), in build order.
pub type AskedTensors = Arc<std::sync::Mutex<Vec<(String, Vec<usize>)>>>;

/// A builder whose every tensor is a zero broadcast to the requested shape (no memory),
/// recording what was asked. A model built on it lists its tensors and layers (names, kinds,
/// shapes) without reading or allocating any weights: what merging, writing synthetic
/// checkpoints and config checks need.
pub fn skeleton_var_builder() -> (VarBuilder<'static>, AskedTensors) {
    let asked = AskedTensors::default();
    let backend = Skeleton { asked: asked.clone() };
    (VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu), asked)
}

struct Skeleton {
    asked: AskedTensors,
}

impl SimpleBackend for Skeleton {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.asked.lock().unwrap_or_else(|e| e.into_inner()).push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        bail!("skeleton builder: {name} was asked without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// The diffusers-named weights of a pipeline, for [`save`].
pub struct PipelineWeights<'a> {
    pub family: ModelFamily,
    pub unet_config: &'a UNetConfig,
    pub vae_config: &'a VaeConfig,
    pub unet: &'a HashMap<String, Tensor>,
    pub text_encoders: Vec<&'a HashMap<String, Tensor>>,
    pub vae: &'a HashMap<String, Tensor>,
}

/// Writes diffusers-named weights as one LDM checkpoint (the family's usual key names, each
/// tensor in its own dtype, OpenCLIP q/k/v fused again). Tensors the layout has no name for
/// (e.g. `position_ids`) are left out; `metadata` goes into the header.
pub fn save(path: &Path, w: &PipelineWeights, metadata: &BTreeMap<String, String>) -> Result<()> {
    let keys = KeyMap::for_family(w.family, w.unet_config, w.vae_config);
    if w.text_encoders.len() != keys.text_encoders() {
        bail!("a {} checkpoint has {} text encoders, not {}", w.family.name(), keys.text_encoders(), w.text_encoders.len());
    }
    // stored key -> the diffusers tensors that go into it
    let mut out: BTreeMap<String, Vec<(Stored, &Tensor)>> = BTreeMap::new();
    let mut parts: Vec<(Component, &HashMap<String, Tensor>)> = vec![(Component::Unet, w.unet), (Component::Vae, w.vae)];
    for (i, t) in w.text_encoders.iter().enumerate() {
        parts.push((Component::TextEncoder(i), t));
    }
    for (c, tensors) in parts {
        for (name, t) in tensors {
            if let Some(s) = keys.stored(c, name) {
                out.entry(s.key().to_string()).or_default().push((s, t));
            }
        }
    }
    let mut entries = Vec::with_capacity(out.len());
    let mut tensors = Vec::with_capacity(out.len());
    for (key, pieces) in out {
        let t = match &pieces[0].0 {
            Stored::Same(_) => pieces[0].1.clone(),
            Stored::Transposed(_) => pieces[0].1.t()?.contiguous()?,
            Stored::Conv1x1(_) => {
                let (o, i) = pieces[0].1.dims2()?;
                pieces[0].1.reshape((o, i, 1, 1))?
            }
            Stored::Rows { parts, .. } => {
                let mut rows: Vec<Option<&Tensor>> = vec![None; *parts];
                for (s, t) in &pieces {
                    if let Stored::Rows { part, .. } = s {
                        rows[*part] = Some(t);
                    }
                }
                let Some(rows) = rows.into_iter().collect::<Option<Vec<_>>>() else {
                    bail!("{key}: q, k and v are not all given");
                };
                Tensor::cat(&rows, 0)?
            }
            Stored::RowSlice { .. } | Stored::SwappedHalves(_) => bail!("{key}: Flux layouts are not written as LDM single files"),
        };
        entries.push(OutEntry { name: key, dtype: st_dtype(t.dtype())?, shape: t.dims().to_vec() });
        tensors.push(t);
    }
    write_streaming(path, &entries, metadata, |i, out| {
        out.write_all(&super::safetensors_io::tensor_bytes(&tensors[i])?)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> (UNetConfig, VaeConfig) {
        let unet: UNetConfig = parse(serde_json::json!({
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768
        }))
        .unwrap();
        let vae: VaeConfig = parse(serde_json::json!({
            "down_block_types": vec!["DownEncoderBlock2D"; 4], "up_block_types": vec!["UpDecoderBlock2D"; 4],
            "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2
        }))
        .unwrap();
        (unet, vae)
    }

    /// Names as diffusers' convert_diffusers_to_original_stable_diffusion.py writes them.
    #[test]
    fn sd15_names_match_the_reference_conversion() {
        let (unet, vae) = layout();
        let m = KeyMap::for_family(ModelFamily::Sd15, &unet, &vae);
        let same = |s: &str| Some(Stored::Same(s.to_string()));
        let u = |n: &str| m.stored(Component::Unet, n);
        assert_eq!(u("up_blocks.0.upsamplers.0.conv.weight"), same("model.diffusion_model.output_blocks.2.1.conv.weight"));
        assert_eq!(u("up_blocks.1.upsamplers.0.conv.bias"), same("model.diffusion_model.output_blocks.5.2.conv.bias"));
        assert_eq!(u("up_blocks.3.resnets.2.conv_shortcut.weight"), same("model.diffusion_model.output_blocks.11.0.skip_connection.weight"));
        assert_eq!(
            u("down_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj.weight"),
            same("model.diffusion_model.input_blocks.5.1.transformer_blocks.0.ff.net.0.proj.weight")
        );
        assert_eq!(u("mid_block.resnets.1.norm1.weight"), same("model.diffusion_model.middle_block.2.in_layers.0.weight"));
        assert_eq!(u("time_embedding.linear_2.bias"), same("model.diffusion_model.time_embed.2.bias"));
        let v = |n: &str| m.stored(Component::Vae, n);
        assert_eq!(v("decoder.up_blocks.0.resnets.2.conv1.weight"), same("first_stage_model.decoder.up.3.block.2.conv1.weight"));
        assert_eq!(v("decoder.up_blocks.3.resnets.0.conv_shortcut.bias"), same("first_stage_model.decoder.up.0.block.0.nin_shortcut.bias"));
        assert_eq!(v("decoder.up_blocks.1.upsamplers.0.conv.weight"), same("first_stage_model.decoder.up.2.upsample.conv.weight"));
        assert_eq!(v("encoder.down_blocks.2.downsamplers.0.conv.bias"), same("first_stage_model.encoder.down.2.downsample.conv.bias"));
        assert_eq!(v("encoder.conv_norm_out.weight"), same("first_stage_model.encoder.norm_out.weight"));
        assert_eq!(v("encoder.mid_block.resnets.1.conv2.weight"), same("first_stage_model.encoder.mid.block_2.conv2.weight"));
        assert_eq!(v("decoder.mid_block.attentions.0.to_out.0.weight"), Some(Stored::Conv1x1("first_stage_model.decoder.mid.attn_1.proj_out.weight".into())));
        assert_eq!(v("decoder.mid_block.attentions.0.to_q.bias"), same("first_stage_model.decoder.mid.attn_1.q.bias"));
        assert_eq!(v("decoder.mid_block.attentions.0.group_norm.weight"), same("first_stage_model.decoder.mid.attn_1.norm.weight"));
        assert_eq!(
            m.stored(Component::TextEncoder(0), "text_model.encoder.layers.11.mlp.fc2.bias"),
            same("cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias")
        );
        assert_eq!(m.stored(Component::TextEncoder(1), "text_model.final_layer_norm.weight"), None);
        assert_eq!(u("down_blocks.0.bogus.weight"), None);
    }

    #[test]
    fn open_clip_names_match_the_reference_conversion() {
        let (unet, vae) = layout();
        let m = KeyMap::for_family(ModelFamily::Sdxl, &unet, &vae);
        let t = |n: &str| m.stored(Component::TextEncoder(1), n);
        let p = "conditioner.embedders.1.model.";
        assert_eq!(t("text_model.encoder.layers.3.self_attn.k_proj.weight"), Some(Stored::Rows { key: format!("{p}transformer.resblocks.3.attn.in_proj_weight"), part: 1, parts: 3 }));
        assert_eq!(t("text_model.encoder.layers.3.self_attn.v_proj.bias"), Some(Stored::Rows { key: format!("{p}transformer.resblocks.3.attn.in_proj_bias"), part: 2, parts: 3 }));
        assert_eq!(t("text_model.encoder.layers.0.self_attn.out_proj.weight"), Some(Stored::Same(format!("{p}transformer.resblocks.0.attn.out_proj.weight"))));
        assert_eq!(t("text_model.encoder.layers.31.mlp.fc1.bias"), Some(Stored::Same(format!("{p}transformer.resblocks.31.mlp.c_fc.bias"))));
        assert_eq!(t("text_model.encoder.layers.31.layer_norm2.weight"), Some(Stored::Same(format!("{p}transformer.resblocks.31.ln_2.weight"))));
        assert_eq!(t("text_model.embeddings.position_embedding.weight"), Some(Stored::Same(format!("{p}positional_embedding"))));
        assert_eq!(t("text_projection.weight"), Some(Stored::Transposed(format!("{p}text_projection"))));
        assert_eq!(
            m.stored(Component::TextEncoder(0), "text_model.embeddings.token_embedding.weight"),
            Some(Stored::Same("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight".into()))
        );
        // SDXL's UNet upsampler slots: attention in up blocks 0 and 1 (of 3).
        let (mut unet, _) = layout();
        unet.up_block_types = vec!["CrossAttnUpBlock2D".into(), "CrossAttnUpBlock2D".into(), "UpBlock2D".into()];
        unet.down_block_types = vec!["DownBlock2D".into(), "CrossAttnDownBlock2D".into(), "CrossAttnDownBlock2D".into()];
        unet.block_out_channels = vec![320, 640, 1280];
        let m = KeyMap::for_family(ModelFamily::Sdxl, &unet, &vae);
        assert_eq!(
            m.stored(Component::Unet, "up_blocks.0.upsamplers.0.conv.weight"),
            Some(Stored::Same("model.diffusion_model.output_blocks.2.2.conv.weight".into()))
        );
        assert_eq!(
            m.stored(Component::Unet, "add_embedding.linear_1.weight"),
            Some(Stored::Same("model.diffusion_model.label_emb.0.0.weight".into()))
        );
    }

    #[test]
    fn rows_round_trip() {
        let dev = Device::Cpu;
        let full = Tensor::arange(0f32, 18.0, &dev).unwrap().reshape((6, 3)).unwrap();
        let s = Stored::Rows { key: "k".into(), part: 1, parts: 3 };
        let part = Tensor::ones((2, 3), DType::F32, &dev).unwrap();
        let placed = s.to_stored_layout(&part, &[6, 3]).unwrap();
        let sum: Vec<Vec<f32>> = (full + placed).unwrap().to_vec2().unwrap();
        assert_eq!(sum[1], vec![3.0, 4.0, 5.0]);
        assert_eq!(sum[2], vec![7.0, 8.0, 9.0]);
        assert_eq!(sum[4], vec![12.0, 13.0, 14.0]);
    }
}
