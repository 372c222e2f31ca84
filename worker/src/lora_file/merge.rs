//! Merging network files into a base model (`loft lora merge`): W′ = W + Σ mᵢ·ΔWᵢ for every
//! adapted UNet / text-encoder layer, written in the layout that was read.
//!
//! - **Layouts.** A diffusers folder gives a diffusers folder (everything copied, the changed
//!   `unet` / `text_encoder[_2]` weight files rewritten); a single-file checkpoint gives a
//!   single file with every key, the metadata and each tensor's dtype kept.
//! - **Names.** A module is found by the names the tools write: kohya / LyCORIS
//!   `lora_unet_` + the diffusers path with `.` → `_` (SD1.x/2.x; LyCORIS on a diffusers
//!   SDXL UNet too), `lora_unet_` + the LDM path (sd-scripts' SDXL trainer, see
//!   [`crate::models::ldm_names`]), LyCORIS's own `lycoris_` + the diffusers path, and
//!   `lora_te_` (one text encoder) or `lora_te1_` / `lora_te2_` (SDXL) + the transformers path.
//!   The layers and their kinds come from building each model on a weightless skeleton
//!   ([`skeleton_var_builder`]), so the merge knows exactly the layers training would adapt.
//! - **ΔW** comes from [`LoadedModule::delta`] against the original base weight (every
//!   algorithm, DoRA and the base-dependent ones included); with several files each ΔW is
//!   taken against the original weight and the scaled deltas are summed, so the order of the
//!   files does not matter. A file's `:weight` is its strength m, applied as LyCORIS does
//!   ([`MultiplierRule::Lycoris`]: inside DoRA's norm and the OFT/BOFT rotation, m·ΔW
//!   elsewhere) or as m·ΔW everywhere ([`MultiplierRule::Linear`]). OpenCLIP's
//!   fused q/k/v in a single file receive each projection's ΔW in their rows.
//! - **Memory.** One tensor at a time: base tensors are read from the memory-mapped file,
//!   merged in f32, cast back to the stored dtype and streamed to the output; unchanged
//!   tensors are copied byte for byte.
//!
//! Modules no layer matches are reported (a warning per file, listing them); a file of which
//! no module matches is an error.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};

use super::{LoadedModule, LoraFile, ModuleDelta, MultiplierRule};
use crate::models::config::{read_json, ClipTextConfig, UNetConfig};
use crate::models::ldm_names::UNetLayout;
use crate::models::safetensors_io::{candle_dtype, tensor_bytes, write_streaming, MappedFile, OutEntry};
use crate::models::single_file::{skeleton_var_builder, Checkpoint, Component, Stored};
use crate::models::{kohya_name, text_encoder_prefix, unet_module_names, weight_files, ClipTextModel, ModelFamily, ModelLayers, UNet2DConditionModel};
use crate::networks::{BaseLayer, LayerKind};

/// One network file, its multiplier and how the multiplier applies.
pub struct MergeInput {
    pub file: LoraFile,
    pub multiplier: f64,
    pub rule: MultiplierRule,
}

/// What one file contributed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileReport {
    pub path: PathBuf,
    pub multiplier: f64,
    pub matched: usize,
    /// Module names no layer of the base model has.
    pub unmatched: Vec<String>,
}

/// What a merge did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeReport {
    /// `single_file` or `diffusers`.
    pub layout: &'static str,
    pub family: ModelFamily,
    pub out: PathBuf,
    pub files: Vec<FileReport>,
    /// Stored tensors whose values changed.
    pub tensors_changed: usize,
    /// Anything the user should know (unmatched modules, dropped bias deltas, …).
    pub warnings: Vec<String>,
}

/// A layer a module can adapt.
#[derive(Clone, Debug)]
struct Target {
    component: Component,
    /// The diffusers / transformers module path.
    module: String,
    kind: LayerKind,
    has_bias: bool,
}

/// Where a layer's tensor is stored: which file, under which key, in which layout — several
/// places when the model stores the layer in pieces (a diffusers Flux folder's q/k/v);
/// empty when it has no such tensor.
type Locate = dyn Fn(Component, &str) -> Vec<(usize, Stored)>;

/// A base model opened for merging, whatever its layout.
struct Base {
    family: ModelFamily,
    /// The files that hold UNet / text encoder weights.
    files: Vec<Arc<MappedFile>>,
    locate: Box<Locate>,
    targets: HashMap<String, Target>,
}

/// The layers of a model built on a weightless skeleton.
fn layers_of(build: impl FnOnce(candle_nn::VarBuilder<'static>) -> candle_core::Result<Vec<Arc<crate::models::Layer>>>) -> Result<Vec<(String, LayerKind, bool)>> {
    let (vb, _) = skeleton_var_builder();
    Ok(build(vb)?.iter().map(|l| (l.name().to_string(), l.kind().clone(), l.base().bias.is_some())).collect())
}

fn unet_layers(cfg: &UNetConfig) -> Result<Vec<(String, LayerKind, bool)>> {
    layers_of(|vb| Ok(UNet2DConditionModel::new(cfg, vb)?.layers().to_vec()))
}

fn te_layers(cfg: &ClipTextConfig, with_projection: bool) -> Result<Vec<(String, LayerKind, bool)>> {
    layers_of(|vb| Ok(ClipTextModel::new(cfg, vb, with_projection)?.layers().to_vec()))
}

/// Every kohya-style name of every adaptable layer.
fn targets(family: ModelFamily, unet: &UNetConfig, tes: &[ClipTextConfig]) -> Result<HashMap<String, Target>> {
    let mut out = HashMap::new();
    let layout = UNetLayout::from_config(unet);
    for (module, kind, has_bias) in unet_layers(unet)? {
        let t = Target { component: Component::Unet, module: module.clone(), kind, has_bias };
        for name in unet_module_names(family, &layout, &module) {
            out.insert(name, t.clone());
        }
    }
    for (i, cfg) in tes.iter().enumerate() {
        let prefix = text_encoder_prefix(i, tes.len());
        let with_projection = family == ModelFamily::Sdxl && i == 1;
        for (module, kind, has_bias) in te_layers(cfg, with_projection)? {
            let t = Target { component: Component::TextEncoder(i), module: module.clone(), kind, has_bias };
            out.insert(kohya_name(&prefix, &module), t);
        }
    }
    Ok(out)
}

impl Base {
    fn single_file(path: &Path, config_dir: Option<&Path>) -> Result<Self> {
        let ckpt = match config_dir {
            Some(d) => Checkpoint::open_with_config_dir(path, d),
            None => Checkpoint::open(path),
        }?;
        let targets = targets(ckpt.family, &ckpt.unet_config, &ckpt.text_encoder_configs)?;
        let keys = ckpt.key_map().clone();
        let file = ckpt.shared_file();
        let f2 = file.clone();
        let locate = Box::new(move |c: Component, name: &str| keys.stored(c, name).filter(|s| f2.contains(s.key())).map(|s| (0, s)).into_iter().collect());
        Ok(Self { family: ckpt.family, files: vec![file], locate, targets })
    }

    /// BFL's single-file Flux transformer (ComfyUI's `model.diffusion_model.` prefix kept):
    /// `lora_unet_` + the BFL path of every Linear. The text encoders live elsewhere, so
    /// `lora_te*` modules are reported unmatched.
    fn flux_file(path: &Path) -> Result<Self> {
        use crate::models::flux::{FluxConfig, FluxTransformer};
        let weights = crate::models::flux_weights::FluxWeights::bfl_file(path)?;
        let shapes = crate::models::safetensors_io::MappedFile::open(path)?;
        let prefix = if shapes.contains("model.diffusion_model.img_in.weight") { "model.diffusion_model." } else { "" };
        let head_dim = shapes.shape(&format!("{prefix}double_blocks.0.img_attn.norm.query_norm.scale")).and_then(|s| s.first().copied()).unwrap_or(128);
        // RoPE's axes change no layer; any valid split of the head size will do.
        let cfg: FluxConfig = weights.config_from_shapes(Some(vec![2, 2, head_dim.saturating_sub(4)]))?;
        let family = if cfg.guidance_embed { ModelFamily::FluxDev } else { ModelFamily::FluxSchnell };
        let layers = layers_of(|vb| Ok(FluxTransformer::new(&cfg, vb)?.layers().to_vec()))?;
        let mut targets = HashMap::new();
        for (module, kind, has_bias) in layers {
            targets.insert(kohya_name("lora_unet", &module), Target { component: Component::Unet, module, kind, has_bias });
        }
        let file = Arc::new(shapes);
        let f2 = file.clone();
        let prefix = prefix.to_string();
        let locate = Box::new(move |c: Component, name: &str| {
            let key = format!("{prefix}{name}");
            (c == Component::Unet && f2.contains(&key)).then(|| (0, Stored::Same(key))).into_iter().collect()
        });
        Ok(Self { family, files: vec![file], locate, targets })
    }

    /// A diffusers Flux folder: the transformer's layers under BFL's kohya names, each read from
    /// (and merged into) the diffusers tensors that hold it — fused layers in row slices, the
    /// final adaLN with its halves swapped; CLIP-L's under `lora_te1_`. T5 (`lora_te3_`) is not
    /// merged (reported unmatched).
    fn flux_diffusers(dir: &Path) -> Result<Self> {
        use crate::models::flux::{FluxConfig, FluxTransformer};
        let cfg = FluxConfig::from_diffusers_json(&dir.join("transformer/config.json"))?;
        let family = if cfg.guidance_embed { ModelFamily::FluxDev } else { ModelFamily::FluxSchnell };
        let mut targets = HashMap::new();
        for (module, kind, has_bias) in layers_of(|vb| Ok(FluxTransformer::new(&cfg, vb)?.layers().to_vec()))? {
            targets.insert(kohya_name("lora_unet", &module), Target { component: Component::Unet, module, kind, has_bias });
        }
        let te: ClipTextConfig = read_json(&dir.join("text_encoder/config.json"))?;
        for (module, kind, has_bias) in te_layers(&te, false)? {
            targets.insert(kohya_name("lora_te1", &module), Target { component: Component::TextEncoder(0), module, kind, has_bias });
        }
        let mut files = Vec::new();
        let mut owner: HashMap<(Component, String), usize> = HashMap::new();
        for (c, folder, stem) in [(Component::Unet, "transformer", "diffusion_pytorch_model"), (Component::TextEncoder(0), "text_encoder", "model")] {
            for p in weight_files(&dir.join(folder), stem)? {
                let f = MappedFile::open(&p)?;
                for n in f.names() {
                    owner.insert((c, n.clone()), files.len());
                }
                files.push(Arc::new(f));
            }
        }
        let hidden = cfg.hidden_size;
        let mlp = cfg.mlp_hidden;
        let locate = Box::new(move |c: Component, name: &str| -> Vec<(usize, Stored)> {
            let find = |key: &str| owner.get(&(c, key.to_string())).copied();
            if c != Component::Unet {
                return find(name).map(|i| (i, Stored::Same(name.to_string()))).into_iter().collect();
            }
            let Some((module, suffix)) = name.rsplit_once('.') else { return vec![] };
            let Some(source) = crate::models::flux_weights::diffusers_pieces(module, suffix) else { return vec![] };
            let (keys, swapped) = source;
            let sizes: Vec<usize> = match keys.len() {
                3 => vec![hidden; 3],
                4 => vec![hidden, hidden, hidden, mlp],
                _ => vec![0],
            };
            let total: usize = sizes.iter().sum();
            let mut start = 0;
            let mut out = vec![];
            for (key, len) in keys.iter().zip(&sizes) {
                let Some(i) = find(key) else { return vec![] };
                let stored = if keys.len() == 1 {
                    if swapped { Stored::SwappedHalves(key.clone()) } else { Stored::Same(key.clone()) }
                } else {
                    Stored::RowSlice { key: key.clone(), start, len: *len, total }
                };
                out.push((i, stored));
                start += len;
            }
            out
        });
        Ok(Self { family, files, locate, targets })
    }

    fn diffusers(dir: &Path) -> Result<Self> {
        let unet: UNetConfig = read_json(&dir.join("unet/config.json"))?;
        let mut tes: Vec<ClipTextConfig> = vec![read_json(&dir.join("text_encoder/config.json"))?];
        if dir.join("text_encoder_2/config.json").is_file() {
            tes.push(read_json(&dir.join("text_encoder_2/config.json"))?);
        }
        let family = ModelFamily::of_diffusers(tes.len(), &tes[0].hidden_act);
        let targets = targets(family, &unet, &tes)?;
        let mut files = Vec::new();
        let mut owner: HashMap<(Component, String), usize> = HashMap::new();
        let mut components = vec![(Component::Unet, "diffusion_pytorch_model")];
        for i in 0..tes.len() {
            components.push((Component::TextEncoder(i), "model"));
        }
        for (c, stem) in components {
            for p in weight_files(&dir.join(c.folder()), stem)? {
                let f = MappedFile::open(&p)?;
                for n in f.names() {
                    owner.insert((c, n.clone()), files.len());
                }
                files.push(Arc::new(f));
            }
        }
        let locate = Box::new(move |c: Component, name: &str| owner.get(&(c, name.to_string())).map(|&i| (i, Stored::Same(name.to_string()))).into_iter().collect());
        Ok(Self { family, files, locate, targets })
    }
}

/// A base model opened for looking up the layers network modules adapt (a diffusers folder
/// or a single-file checkpoint), for what needs base weights without merging
/// (`loft lora convert`).
pub struct BaseModel(Base);

impl BaseModel {
    /// Opens `path`; `config_dir` as for [`merge`].
    pub fn open(path: &Path, config_dir: Option<&Path>) -> Result<Self> {
        Ok(Self(if path.is_file() && crate::models::flux_weights::FluxWeights::is_flux_file(path) {
            Base::flux_file(path)?
        } else if path.is_dir() && crate::models::pipeline::is_flux_dir(path) {
            Base::flux_diffusers(path)?
        } else if path.is_dir() {
            if !path.join("unet/config.json").is_file() {
                bail!("{} is a folder but not a diffusers pipeline (no unet/config.json)", path.display());
            }
            Base::diffusers(path)?
        } else {
            Base::single_file(path, config_dir)?
        }))
    }

    /// The base layer (weight and bias, f32) that module `name` adapts, or `None` when the
    /// model has no layer of that name.
    pub fn layer_for(&self, m: &LoadedModule) -> Result<Option<BaseLayer>> {
        let Some(t) = self.0.targets.get(&m.name) else { return Ok(None) };
        if let Some(why) = misfit(m, t) {
            bail!("module {}: {why}", m.name);
        }
        base_layer(&self.0, t).map(Some)
    }
}

/// One contribution to a stored tensor.
#[derive(Clone, Debug)]
struct Contribution {
    input: usize,
    module: usize,
    /// The weight (false) or the bias (true) part of the module's delta.
    bias: bool,
    stored: Stored,
}

/// Merges `inputs` into the model at `base` (a diffusers folder or a single-file checkpoint)
/// and writes the result, in the same layout, to `out` (which must not exist yet).
/// `config_dir` gives a single file's configs (as [`Checkpoint::open_with_config_dir`]).
pub fn merge(base: &Path, inputs: &[MergeInput], out: &Path, config_dir: Option<&Path>) -> Result<MergeReport> {
    if inputs.is_empty() {
        bail!("nothing to merge: give at least one --lora file");
    }
    if out.exists() {
        bail!("{} already exists; merge writes a new file or folder", out.display());
    }
    let is_dir = base.is_dir();
    let b = BaseModel::open(base, config_dir)?.0;

    // Plan: which stored tensors change, and from which modules.
    let mut warnings = Vec::new();
    let mut reports = Vec::new();
    let mut plan: BTreeMap<(usize, String), Vec<Contribution>> = BTreeMap::new();
    let mut targets_of: HashMap<(usize, usize), Target> = HashMap::new();
    let mut misfits = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        if let Some(v) = input.file.base_model_version() {
            let made_for = if v.starts_with("sdxl") {
                Some(ModelFamily::Sdxl)
            } else if v.starts_with("sd_v2") {
                Some(ModelFamily::Sd2)
            } else if v.starts_with("sd_v1") {
                Some(ModelFamily::Sd15)
            } else {
                None
            };
            if made_for.is_some_and(|f| f != b.family) {
                warnings.push(format!("{} was made for {v}, the base model is {}", input.file.path.display(), b.family.name()));
            }
        }
        let mut unmatched = Vec::new();
        let mut matched = 0;
        for (j, m) in input.file.modules.iter().enumerate() {
            let Some(t) = b.targets.get(&m.name) else {
                unmatched.push(m.name.clone());
                continue;
            };
            if let Some(why) = misfit(m, t) {
                misfits.push(format!("{} ({}): {why}", m.name, input.file.path.display()));
                continue;
            }
            matched += 1;
            let weight = format!("{}.weight", t.module);
            let places = (b.locate)(t.component, &weight);
            if places.is_empty() {
                bail!("{}: the base model has no tensor {weight} for module {}", base.display(), m.name);
            }
            for (fw, sw) in places {
                plan.entry((fw, sw.key().to_string())).or_default().push(Contribution { input: i, module: j, bias: false, stored: sw });
            }
            if t.has_bias {
                let bias = format!("{}.bias", t.module);
                for (fb, sb) in (b.locate)(t.component, &bias) {
                    plan.entry((fb, sb.key().to_string())).or_default().push(Contribution { input: i, module: j, bias: true, stored: sb });
                }
            }
            targets_of.insert((i, j), t.clone());
        }
        if matched == 0 {
            let version = input.file.base_model_version().map(|v| format!(" (made for {v})")).unwrap_or_default();
            bail!(
                "{}{version}: none of its {} modules matches a layer of this {} model (e.g. {})",
                input.file.path.display(),
                input.file.modules.len(),
                b.family.name(),
                input.file.modules.first().map(|m| m.name.as_str()).unwrap_or("-")
            );
        }
        if !unmatched.is_empty() {
            let shown: Vec<&str> = unmatched.iter().take(8).map(|s| s.as_str()).collect();
            warnings.push(format!(
                "{}: {} of {} modules match no layer and were skipped: {}{}",
                input.file.path.display(),
                unmatched.len(),
                input.file.modules.len(),
                shown.join(", "),
                if unmatched.len() > shown.len() { ", …" } else { "" }
            ));
        }
        reports.push(FileReport { path: input.file.path.clone(), multiplier: input.multiplier, matched, unmatched });
    }
    if !misfits.is_empty() {
        let shown: Vec<&str> = misfits.iter().take(5).map(|s| s.as_str()).collect();
        bail!(
            "{} module(s) do not fit the base model's layers (a network made for another model?): {}{}",
            misfits.len(),
            shown.join("; "),
            if misfits.len() > shown.len() { "; …" } else { "" }
        );
    }

    // Deltas are computed once per module and kept only until both its weight and its bias
    // have been written.
    let mut cache: HashMap<(usize, usize), (ModuleDelta, usize)> = HashMap::new();
    let mut uses: HashMap<(usize, usize), usize> = HashMap::new();
    for cs in plan.values() {
        for c in cs {
            *uses.entry((c.input, c.module)).or_default() += 1;
        }
    }
    let mut delta_for = |c: &Contribution, warnings: &mut Vec<String>| -> Result<Option<Tensor>> {
        let key = (c.input, c.module);
        if let std::collections::hash_map::Entry::Vacant(slot) = cache.entry(key) {
            let t = &targets_of[&key];
            let m = &inputs[c.input].file.modules[c.module];
            let d = module_delta(&b, t, m, inputs[c.input].multiplier, inputs[c.input].rule)?;
            if d.db.is_some() && !t.has_bias {
                warnings.push(format!("{}: a bias delta for {}, which has no bias, was dropped", m.name, t.module));
            }
            slot.insert((d, uses[&key]));
        }
        let (d, left) = cache.get_mut(&key).expect("just inserted");
        let part = if c.bias { d.db.clone() } else { Some(d.dw.clone()) };
        *left -= 1;
        if *left == 0 {
            cache.remove(&key);
        }
        Ok(part)
    };

    let mut merged_meta: Vec<String> = inputs
        .iter()
        .map(|i| format!("{}:{}", i.file.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(), i.multiplier))
        .collect();
    merged_meta.dedup();

    // Write.
    let changed_files: Vec<usize> = {
        let mut v: Vec<usize> = plan.keys().map(|(f, _)| *f).collect();
        v.dedup();
        v
    };
    let dest_of = |f: usize| -> Result<PathBuf> {
        if is_dir {
            let rel = b.files[f].path().strip_prefix(base).context("weight file outside the base folder")?;
            Ok(out.join(rel))
        } else {
            Ok(out.to_path_buf())
        }
    };
    if is_dir {
        let skip: Vec<PathBuf> = changed_files.iter().map(|&f| b.files[f].path().to_path_buf()).collect();
        copy_tree(base, out, &skip)?;
    }
    let mut tensors_changed = 0;
    for &fi in &changed_files {
        let file = &b.files[fi];
        let dest = dest_of(fi)?;
        let entries: Vec<OutEntry> = file
            .names()
            .iter()
            .map(|n| {
                let e = file.entry(n).expect("listed");
                OutEntry { name: n.clone(), dtype: e.dtype, shape: e.shape.clone() }
            })
            .collect();
        let mut meta = file.metadata().clone();
        meta.insert("loft_merged_networks".into(), serde_json::to_string(&merged_meta)?);
        let result = write_streaming(&dest, &entries, &meta, |i, w| {
            let name = &entries[i].name;
            match plan.get(&(fi, name.clone())) {
                None => {
                    w.write_all(file.bytes(name).expect("listed"))?;
                    Ok(())
                }
                Some(cs) => {
                    let Some(stored_dtype) = candle_dtype(entries[i].dtype) else {
                        candle_core::bail!("{name}: dtype {:?} cannot be merged into", entries[i].dtype);
                    };
                    let mut acc = file.read(name, Some(DType::F32))?;
                    let mut changed = false;
                    for c in cs {
                        let d = delta_for(c, &mut warnings).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
                        if let Some(d) = d {
                            let d = c.stored.to_stored_layout(&fit(&d, c, &acc)?, acc.dims())?;
                            acc = (acc + d)?;
                            changed = true;
                        }
                    }
                    if changed {
                        tensors_changed += 1;
                        w.write_all(&tensor_bytes(&acc.to_dtype(stored_dtype)?)?)?;
                    } else {
                        // Only bias slots were planned and no module had a bias delta.
                        w.write_all(file.bytes(name).expect("listed"))?;
                    }
                    Ok(())
                }
            }
        });
        if let Err(e) = result {
            if is_dir {
                let _ = std::fs::remove_dir_all(out);
            }
            return Err(anyhow!("writing {}: {e}", dest.display()));
        }
    }
    Ok(MergeReport {
        layout: if is_dir { "diffusers" } else { "single_file" },
        family: b.family,
        out: out.to_path_buf(),
        files: reports,
        tensors_changed,
        warnings,
    })
}

/// Why module `m` cannot adapt layer `t`, judged from the shapes its tensors give: the
/// weight's element count where the file tells the whole shape, its output width for
/// DIAG-OFT / BOFT, nothing for IA3 (which tells one width only, and `delta` checks it).
fn misfit(m: &LoadedModule, t: &Target) -> Option<String> {
    use super::FileAlgo;
    let want = t.kind.weight_shape();
    let got = &m.weight_shape;
    let bad = match m.algo {
        FileAlgo::Ia3 => false,
        FileAlgo::DiagOft | FileAlgo::Boft => got.first() != want.first(),
        _ => got.iter().product::<usize>() != want.iter().product::<usize>(),
    };
    bad.then(|| format!("its weight is {got:?}, the layer {} is {want:?}", t.module))
}

/// A delta shaped like the diffusers tensor the contribution targets: ΔW of a LoRA on a
/// 1×1 conv may come as a matrix (and vice versa); same element count, same values.
fn fit(d: &Tensor, c: &Contribution, stored: &Tensor) -> candle_core::Result<Tensor> {
    let want: Vec<usize> = match &c.stored {
        Stored::Same(_) => stored.dims().to_vec(),
        Stored::Transposed(_) => stored.dims().iter().rev().copied().collect(),
        Stored::Conv1x1(_) => stored.dims()[..2].to_vec(),
        Stored::Rows { parts, .. } => {
            let mut s = stored.dims().to_vec();
            s[0] /= parts;
            s
        }
        Stored::RowSlice { total, .. } => {
            let mut s = stored.dims().to_vec();
            s[0] = *total;
            s
        }
        Stored::SwappedHalves(_) => stored.dims().to_vec(),
    };
    if d.dims() == want.as_slice() {
        Ok(d.clone())
    } else if d.elem_count() == want.iter().product::<usize>() {
        d.reshape(want)
    } else {
        candle_core::bail!("{}: a delta of shape {:?} does not fit {:?}", c.stored.key(), d.dims(), want)
    }
}

/// The base layer `t` as stored in the model (f32).
fn base_layer(b: &Base, t: &Target) -> Result<BaseLayer> {
    let read = |suffix: &str| -> Result<Option<Tensor>> {
        let name = format!("{}.{suffix}", t.module);
        let pieces = (b.locate)(t.component, &name)
            .into_iter()
            .map(|(f, s)| Ok(s.read(&b.files[f], Some(DType::F32))?))
            .collect::<Result<Vec<_>>>()?;
        // Row slices are listed in row order; one piece is the whole tensor.
        match pieces.len() {
            0 => Ok(None),
            1 => Ok(pieces.into_iter().next()),
            _ => Ok(Some(Tensor::cat(&pieces, 0)?)),
        }
    };
    let weight = read("weight")?.ok_or_else(|| anyhow!("no weight for {}", t.module))?;
    let bias = if t.has_bias { read("bias")? } else { None };
    let base = BaseLayer { kind: t.kind.clone(), weight, bias };
    base.check().map_err(|e| anyhow!("{}: {e}", t.module))?;
    Ok(base)
}

/// ΔW (and Δb) of module `m` on the base layer `t`, at `multiplier` under `rule`.
fn module_delta(b: &Base, t: &Target, m: &LoadedModule, multiplier: f64, rule: MultiplierRule) -> Result<ModuleDelta> {
    let base = base_layer(b, t)?;
    m.delta_at(Some(&base), multiplier, rule).with_context(|| format!("merging module {} into {}", m.name, t.module))
}

/// Copies a folder tree, leaving out the files in `skip`.
fn copy_tree(src: &Path, dst: &Path, skip: &[PathBuf]) -> Result<()> {
    std::fs::create_dir_all(dst).with_context(|| format!("cannot create {}", dst.display()))?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let p = e.path();
        let to = dst.join(e.file_name());
        if p.is_dir() {
            copy_tree(&p, &to, skip)?;
        } else if !skip.contains(&p) {
            std::fs::copy(&p, &to).with_context(|| format!("cannot copy {} to {}", p.display(), to.display()))?;
        }
    }
    Ok(())
}

/// Parses `FILE[:weight]` (the weight defaults to 1; a `:` not followed by a number is part
/// of the path).
pub fn parse_lora_arg(arg: &str) -> (PathBuf, f64) {
    if let Some((path, w)) = arg.rsplit_once(':') {
        if let Ok(w) = w.parse::<f64>() {
            if !path.is_empty() {
                return (PathBuf::from(path), w);
            }
        }
    }
    (PathBuf::from(arg), 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_args_split_off_a_numeric_weight_only() {
        assert_eq!(parse_lora_arg("a.safetensors"), (PathBuf::from("a.safetensors"), 1.0));
        assert_eq!(parse_lora_arg("a.safetensors:0.7"), (PathBuf::from("a.safetensors"), 0.7));
        assert_eq!(parse_lora_arg("dir/a.safetensors:-1"), (PathBuf::from("dir/a.safetensors"), -1.0));
        assert_eq!(parse_lora_arg("C:\\x\\a.safetensors"), (PathBuf::from("C:\\x\\a.safetensors"), 1.0));
    }
}
