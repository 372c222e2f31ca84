//! The trained network: which layers get an adapter (kohya's module lists for LoRA/LoCon,
//! LyCORIS's presets for the rest), the adapters attached to the model as layer hooks, the
//! variables the optimizer trains, and saving the kohya/LyCORIS file.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};

use crate::lora_file::{save_network, NetworkMetadata};
use crate::models::layers::LayerHook;
use crate::models::pipeline::{NamedLayer, Part, StableDiffusion};
use crate::networks::{adapter_from_tensors_named, build_adapter, Adapter, BaseLayer, LayerKind, NetworkAlgo, NetworkOptions};

/// Which kind of module a layer sits in (diffusers module paths, what kohya's and LyCORIS's
/// class-name target lists select).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    /// Inside a `Transformer2DModel` (`…attentions.N…`); `attention` = inside its `Attention`.
    Transformer { attention: bool },
    /// Inside a `ResnetBlock2D`, `Downsample2D` or `Upsample2D`.
    ConvBlock,
    /// `conv_in`, `conv_out`, `time_embedding.linear_{1,2}` (LyCORIS's `full` target names).
    Named,
    /// Text encoder `CLIPAttention` / `CLIPMLP`.
    TeAttention,
    TeMlp,
    Other,
}

fn classify(part: Part, path: &str) -> Block {
    // Flux (BFL paths): sd-scripts' lora_flux and LyCORIS (its DoubleStreamBlock /
    // SingleStreamBlock targets) adapt every Linear of the double and single blocks; the input
    // embedders only through `in_dims`; T5's blocks are text modules.
    if path.starts_with("double_blocks.") || path.starts_with("single_blocks.") {
        return Block::Transformer { attention: path.contains("_attn.") || path.ends_with("linear1") };
    }
    if path.contains(".SelfAttention.") {
        return Block::TeAttention;
    }
    if path.contains(".DenseReluDense.") {
        return Block::TeMlp;
    }
    match part {
        Part::Unet => {
            if path.contains(".attentions.") {
                Block::Transformer { attention: path.contains(".attn1.") || path.contains(".attn2.") }
            } else if path.contains(".resnets.") || path.contains(".downsamplers.") || path.contains(".upsamplers.") {
                Block::ConvBlock
            } else if ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"].contains(&path) {
                Block::Named
            } else {
                Block::Other
            }
        }
        Part::TextEncoder(_) => {
            if path.contains(".self_attn.") {
                Block::TeAttention
            } else if path.contains(".mlp.") {
                Block::TeMlp
            } else {
                Block::Other
            }
        }
    }
}

/// A LyCORIS preset's targets: (U-Net module kinds, text-encoder modules, convolutions enabled).
fn preset_targets(preset: &str) -> (&'static [&'static str], bool, bool) {
    match preset {
        "full" => (&["transformer", "conv_block", "named"], true, true),
        "full-lin" => (&["transformer", "conv_block", "named"], true, false),
        "attn-mlp" => (&["transformer"], true, false),
        "attn-only" => (&["attention"], true, false),
        "unet-only" => (&["transformer", "conv_block", "named"], false, true),
        "unet-transformer-only" => (&["transformer"], false, false),
        "unet-convblock-only" => (&["conv_block"], false, true),
        _ => (&["transformer", "conv_block", "named"], true, true),
    }
}

/// Whether training `algo` with `preset` adapts `conv_in`, `conv_out` or the time embedding
/// (LyCORIS's named targets, which diffusers drops when it loads the file).
pub fn adapts_edge_modules(algo: NetworkAlgo, preset: &str, trains_unet: bool) -> bool {
    trains_unet && !algo.is_kohya() && preset != "ia3" && preset_targets(preset).0.contains(&"named")
}

/// Whether `layer` gets an adapter for this algorithm and preset, and (IA3 preset) whether it
/// scales its input.
fn selects(algo: NetworkAlgo, opts: &NetworkOptions, preset: &str, part: Part, path: &str, kind: &LayerKind) -> Option<bool> {
    let block = classify(part, path);
    let is_norm = kind.is_norm();
    let is_conv_kxk = matches!(kind, LayerKind::Conv2d { .. }) && kind.weight_shape().get(2).copied().unwrap_or(1) > 1;
    if algo.is_kohya() {
        // kohya: Linear and 1×1 convs of the target modules; k×k convs (and the conv blocks at
        // all) only with conv_dim; never norms.
        if is_norm {
            return None;
        }
        let conv = opts.conv_dim.is_some();
        let ok = match block {
            Block::Transformer { .. } | Block::TeAttention | Block::TeMlp => !is_conv_kxk || conv,
            Block::ConvBlock => conv,
            _ => false,
        };
        return ok.then_some(false);
    }
    if preset == "ia3" {
        // LyCORIS's ia3 preset: keys, values and the MLP output (scaled on its input).
        let on_input = path.ends_with("ff.net.2") || path.ends_with("mlp.fc2");
        let ok = path.ends_with("to_k") || path.ends_with("to_v") || path.ends_with("k_proj") || path.ends_with("v_proj") || on_input;
        return (ok && !is_norm).then_some(on_input);
    }
    let (unet_blocks, te, enable_conv) = preset_targets(preset);
    let in_unet = match block {
        Block::Transformer { attention } => unet_blocks.contains(&"transformer") || (attention && unet_blocks.contains(&"attention")),
        Block::ConvBlock => unet_blocks.contains(&"conv_block"),
        Block::Named => unet_blocks.contains(&"named"),
        _ => false,
    };
    let in_te = match block {
        Block::TeAttention => te,
        Block::TeMlp => te && preset != "attn-only",
        _ => false,
    };
    if !(in_unet || in_te) {
        return None;
    }
    if is_norm {
        return opts.train_norm.then_some(false);
    }
    if matches!(kind, LayerKind::Conv2d { .. }) && !enable_conv {
        return None;
    }
    Some(false)
}

/// A module training would create, as a LyCORIS preset names it.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedModule {
    /// The kohya name written to the file.
    pub name: String,
    pub part: Part,
    /// The layer's path in the model sd-scripts trains (diffusers paths for SD 1.x/2.x, the
    /// original LDM paths for SDXL; transformers paths in the text encoders).
    pub path: String,
    /// IA3 scales this layer's input (the ia3 preset's MLP-out layers).
    pub on_input: bool,
}

/// The modules training `algo` with `preset` would create on a model of these configs — in
/// file order — and the layers it leaves out with why, found on a weightless skeleton (no
/// weights read or allocated), so it can be asked at full size. `encoders`: each text encoder's
/// config and whether it has a projection. The sd-scripts export lists them in a LyCORIS preset
/// file, and a test checks that LyCORIS builds the same set from it.
#[allow(clippy::too_many_arguments)]
pub fn planned_modules(
    family: crate::models::ModelFamily,
    unet: &crate::models::config::UNetConfig,
    encoders: &[(crate::models::config::ClipTextConfig, bool)],
    algo: NetworkAlgo,
    options: &NetworkOptions,
    preset: &str,
    train_unet: bool,
    train_text_encoder: bool,
) -> Result<(Vec<PlannedModule>, Vec<(String, String)>)> {
    use crate::models::{kohya_name, text_encoder_prefix, unet_module_names, ClipTextModel, ModelFamily, ModelLayers, UNet2DConditionModel};
    let (vb, _) = crate::models::single_file::skeleton_var_builder();
    // (kohya name, part, sd-scripts path, layer)
    let mut layers: Vec<(String, Part, String, Arc<crate::models::Layer>)> = vec![];
    if train_unet {
        let layout = crate::models::ldm_names::UNetLayout::from_config(unet);
        for l in UNet2DConditionModel::new(unet, vb.clone())?.layers() {
            let path = match family {
                ModelFamily::Sdxl => crate::models::ldm_names::unet_ldm_path(l.name(), &layout).unwrap_or_else(|| l.name().to_string()),
                _ => l.name().to_string(),
            };
            layers.push((unet_module_names(family, &layout, l.name()).remove(0), Part::Unet, path, l.clone()));
        }
    }
    if train_text_encoder {
        for (i, (cfg, projection)) in encoders.iter().enumerate() {
            let prefix = text_encoder_prefix(i, encoders.len());
            for l in ClipTextModel::new(cfg, vb.clone(), *projection)?.layers() {
                layers.push((kohya_name(&prefix, l.name()), Part::TextEncoder(i), l.name().to_string(), l.clone()));
            }
        }
    }
    let (mut planned, mut skipped) = (vec![], vec![]);
    // Whether a layer can be adapted depends only on its kind (shape) and the options, and a
    // full-size model has hundreds of layers but a few dozen kinds: build one adapter per kind.
    // The value: the layer the answer was found on, and the error if it was refused.
    let mut verdict_by_kind: HashMap<String, (String, Option<String>)> = HashMap::new();
    for (name, part, path, layer) in layers {
        let Some(on_input) = selects(algo, options, preset, part, layer.name(), layer.kind()) else { continue };
        // Whether the algorithm can adapt the layer is what building the adapter says; a full
        // fine-tune adapts every selected layer (and would allocate a full-size copy to find out).
        if algo != NetworkAlgo::Full {
            let (found_on, refused) = verdict_by_kind.entry(format!("{:?}/{on_input}", layer.kind())).or_insert_with(|| {
                let mut opts = options.clone();
                opts.train_on_input |= on_input;
                (name.clone(), build_adapter(algo, &opts, &layer.base(), &name).err().map(|e| e.to_string()))
            });
            if let Some(why) = refused {
                skipped.push((name.clone(), why.replace(found_on.as_str(), &name)));
                continue;
            }
        }
        planned.push(PlannedModule { name, part, path, on_input });
    }
    Ok((planned, skipped))
}

/// A LyCORIS preset file (TOML, for `preset=FILE`) that builds exactly `modules`: every layer
/// listed by its path, no class targets. LyCORIS's built-in presets do not always build what
/// their names promise on sd-scripts' models (4.1.3: `full` matches the SD time embedding twice
/// and fails, SDXL's conv_in/conv_out/time embedding have other paths, 1×1 convolutions are
/// taken by the linear-only presets, `ia3` matches nothing), so Loft's export names the layers.
pub fn lycoris_preset_toml(modules: &[PlannedModule], comment: &str) -> String {
    let list = |part_is_unet: bool| -> String {
        let mut paths: Vec<&str> = modules.iter().filter(|m| matches!(m.part, Part::Unet) == part_is_unet).map(|m| m.path.as_str()).collect();
        // SDXL's two text encoders share their layer paths.
        paths.sort();
        paths.dedup();
        paths.iter().map(|p| format!("  \"{p}\",\n")).collect()
    };
    let mut out = String::new();
    for line in comment.lines() {
        out += &format!("# {line}\n");
    }
    // Exact names: LyCORIS otherwise reads each as a regular expression matched at the start
    // of every module path (and recompiles them past its cache of 512).
    out += "use_fnmatch = true\nenable_conv = true\nunet_target_module = []\n";
    out += &format!("unet_target_name = [\n{}]\n", list(true));
    out += "text_encoder_target_module = []\n";
    out += &format!("text_encoder_target_name = [\n{}]\n", list(false));
    let mut on_input: Vec<&str> = modules.iter().filter(|m| m.on_input).map(|m| m.path.as_str()).collect();
    on_input.sort();
    on_input.dedup();
    if !on_input.is_empty() {
        out += "\n# IA3: these layers scale their input (LyCORIS's ia3 preset does the same).\n";
        for p in on_input {
            out += &format!("[name_algo_map.\"{p}\"]\ntrain_on_input = true\n");
        }
    }
    out
}

/// An adapter attached to a model layer. The hook reads `training` to switch dropouts on.
pub struct AttachedAdapter {
    pub kohya_name: String,
    pub part: Part,
    pub adapter: Arc<dyn Adapter>,
}

struct Hook {
    adapter: Arc<dyn Adapter>,
    training: Arc<AtomicBool>,
}

impl LayerHook for Hook {
    fn forward(&self, base: &BaseLayer, x: &Tensor) -> candle_core::Result<Tensor> {
        self.adapter.forward(base, x, self.training.load(Ordering::Relaxed))
    }
}

/// The network being trained.
pub struct Network {
    pub algo: NetworkAlgo,
    pub options: NetworkOptions,
    pub preset: String,
    pub adapters: Vec<AttachedAdapter>,
    /// Selected layers the algorithm could not adapt, with the reason.
    pub skipped: Vec<(String, String)>,
    training: Arc<AtomicBool>,
}

impl Network {
    /// Builds fresh adapters on the selected layers of `model` and hooks them in. `unet` /
    /// `text_encoder` say which parts are trained.
    pub fn attach(model: &StableDiffusion, algo: NetworkAlgo, options: &NetworkOptions, preset: &str, unet: bool, text_encoder: bool) -> Result<Self> {
        Self::attach_with(model, algo, options, preset, unet, text_encoder, None)
    }

    /// As [`Network::attach`], with the adapters' tensors taken from `state` (kohya name →
    /// tensors by file name) where given: resuming, or `network_weights`. A layer whose given
    /// tensors do not build its adapter is an error.
    pub fn attach_with(
        model: &StableDiffusion,
        algo: NetworkAlgo,
        options: &NetworkOptions,
        preset: &str,
        unet: bool,
        text_encoder: bool,
        state: Option<&HashMap<String, HashMap<String, Tensor>>>,
    ) -> Result<Self> {
        let training = Arc::new(AtomicBool::new(false));
        let mut adapters = vec![];
        let mut skipped: Vec<(String, String)> = vec![];
        for NamedLayer { kohya_name, part, layer } in model.named_layers() {
            let wanted = match part {
                Part::Unet => unet,
                Part::TextEncoder(_) => text_encoder,
            };
            if !wanted {
                continue;
            }
            // Flux's input layers with an `in_dims` rank (kohya LoRA): adapted at that rank.
            let in_dim = if algo.is_kohya() { model.flux_text.as_ref().and_then(|t| t.input_dim(layer.name())).filter(|&d| d > 0) } else { None };
            let on_input = match in_dim {
                Some(_) => false,
                None => match selects(algo, options, preset, part, layer.name(), layer.kind()) {
                    Some(on_input) => on_input,
                    None => continue,
                },
            };
            // split_qkv (kohya LoRA on Flux's fused layers): one LoRA per piece of these rows.
            let split_rows = |layer: &crate::models::Layer| -> Option<Vec<usize>> {
                let base = layer.base();
                let (out, hidden) = (base.weight.dim(0).ok()?, base.weight.dim(1).ok()?);
                (algo == NetworkAlgo::Lora && in_dim.is_none()).then(|| model.flux_text.as_ref().and_then(|t| t.split_rows(layer.name(), out, hidden))).flatten()
            };
            let mut opts = options.clone();
            if let Some(d) = in_dim {
                opts.dim = d;
            }
            if on_input {
                opts.train_on_input = true;
            }
            let built = match state.and_then(|s| s.get(&kohya_name)) {
                // Given tensors that do not fit are an error, not a layer to leave out: the
                // user asked for these weights.
                Some(tensors) => match split_rows(&layer) {
                    Some(rows) => Ok(crate::networks::split_lora_from_tensors(&opts, &layer.base(), tensors, &kohya_name, &rows)?),
                    None => Ok(adapter_from_tensors_named(algo, &opts, &layer.base(), tensors, &kohya_name)?),
                },
                None => match split_rows(&layer) {
                    Some(rows) => crate::networks::build_split_lora(&opts, &layer.base(), &kohya_name, &rows),
                    None => build_adapter(algo, &opts, &layer.base(), &kohya_name),
                },
            };
            // A layer the algorithm cannot adapt with these options (a 4-channel conv_out for
            // OFT's blocks, …) is left out and reported, as LyCORIS leaves out what it cannot wrap.
            let adapter = match built {
                Ok(a) => a,
                Err(e) => {
                    skipped.push((kohya_name, e.to_string()));
                    continue;
                }
            };
            let adapter: Arc<dyn Adapter> = Arc::from(adapter);
            layer.set_hook(Some(Arc::new(Hook { adapter: adapter.clone(), training: training.clone() })));
            adapters.push(AttachedAdapter { kohya_name, part, adapter });
        }
        if adapters.is_empty() {
            bail!(
                "network_algo {} with preset {preset:?} adapts no layer of this model{}",
                algo.name(),
                match skipped.first() {
                    Some((_, why)) => format!(": {why}"),
                    None if !unet && !text_encoder => " (neither the UNet nor the text encoder is trained)".to_string(),
                    None => String::new(),
                }
            );
        }
        Ok(Self { algo, options: options.clone(), preset: preset.to_string(), adapters, skipped, training })
    }

    /// Switches dropouts (network, rank, module) on for training, off for samples.
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    /// The trained variables of one part, named `<kohya name>.<tensor>`.
    pub fn trainable(&self, unet: bool) -> Vec<(String, Var)> {
        self.adapters
            .iter()
            .filter(|a| matches!(a.part, Part::Unet) == unet)
            .flat_map(|a| a.adapter.trainable().into_iter().map(move |(n, v)| (format!("{}.{n}", a.kohya_name), v)))
            .collect()
    }

    /// Every trained variable (for checkpoints).
    pub fn all_trainable(&self) -> Vec<(String, Var)> {
        let mut v = self.trainable(true);
        v.extend(self.trainable(false));
        v
    }

    pub fn parameter_count(&self) -> usize {
        self.all_trainable().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Writes the kohya/LyCORIS network file.
    pub fn save(&self, path: &Path, metadata: &NetworkMetadata, dtype: DType) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let modules: Vec<(String, &dyn Adapter)> = self.adapters.iter().map(|a| (a.kohya_name.clone(), a.adapter.as_ref())).collect();
        save_network(path, &modules, metadata, Some(dtype))
    }

    /// Each adapter's file tensors (f32), for training states: resuming rebuilds the adapters
    /// from these with [`Network::attach_with`].
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![];
        for a in &self.adapters {
            for (k, t) in a.adapter.state_tensors()? {
                out.push((format!("{}.{k}", a.kohya_name), t));
            }
        }
        Ok(out)
    }

    /// sd-scripts' `--scale_weight_norms`: rescales each module whose ΔW norm exceeds
    /// `max_norm` back to it (LoRA-style down/up pairs only, as sd-scripts). Returns how many
    /// were scaled and the mean norm.
    pub fn scale_weight_norms(&self, max_norm: f64) -> Result<(usize, f64)> {
        let mut scaled = 0;
        let mut total = 0.0;
        let mut count = 0usize;
        for a in &self.adapters {
            let vars = a.adapter.trainable();
            let (Some(down), Some(up)) = (
                vars.iter().find(|(n, _)| n == "lora_down.weight"),
                vars.iter().find(|(n, _)| n == "lora_up.weight"),
            ) else {
                continue;
            };
            let norm: f64 = a.adapter.delta_weight()?.to_dtype(DType::F64)?.sqr()?.sum_all()?.sqrt()?.to_scalar()?;
            total += norm;
            count += 1;
            if norm > max_norm {
                // Split the scale evenly between the two factors, as sd-scripts does.
                let ratio = (max_norm / norm).sqrt();
                down.1.set(&(down.1.as_tensor() * ratio)?)?;
                up.1.set(&(up.1.as_tensor() * ratio)?)?;
                scaled += 1;
            }
        }
        Ok((scaled, if count > 0 { total / count as f64 } else { 0.0 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linear() -> LayerKind {
        LayerKind::Linear { in_features: 8, out_features: 8 }
    }

    fn conv3() -> LayerKind {
        LayerKind::Conv2d { in_channels: 8, out_channels: 8, kernel: (3, 3), stride: 1, padding: 1 }
    }

    #[test]
    fn kohya_and_lycoris_presets_select_the_right_layers() {
        let o = NetworkOptions::default();
        let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        let ff = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2";
        let res = "down_blocks.0.resnets.0.conv1";
        let te = "text_model.encoder.layers.0.mlp.fc1";
        let u = Part::Unet;
        let t = Part::TextEncoder(0);
        // kohya LoRA: attention + transformer linears + TE; resnets only with conv_dim.
        assert!(selects(NetworkAlgo::Lora, &o, "full", u, q, &linear()).is_some());
        assert!(selects(NetworkAlgo::Lora, &o, "full", u, res, &conv3()).is_none());
        let with_conv = NetworkOptions { conv_dim: Some(4), ..o.clone() };
        assert!(selects(NetworkAlgo::Locon, &with_conv, "full", u, res, &conv3()).is_some());
        assert!(selects(NetworkAlgo::Lora, &o, "full", t, te, &linear()).is_some());
        // LyCORIS presets.
        assert!(selects(NetworkAlgo::Loha, &o, "attn-only", u, ff, &linear()).is_none());
        assert!(selects(NetworkAlgo::Loha, &o, "attn-only", u, q, &linear()).is_some());
        assert!(selects(NetworkAlgo::Loha, &o, "attn-mlp", u, ff, &linear()).is_some());
        assert!(selects(NetworkAlgo::Loha, &o, "full", u, res, &conv3()).is_some());
        assert!(selects(NetworkAlgo::Loha, &o, "full-lin", u, res, &conv3()).is_none());
        assert!(selects(NetworkAlgo::Loha, &o, "unet-only", t, te, &linear()).is_none());
        assert!(selects(NetworkAlgo::Loha, &o, "full", u, "conv_in", &conv3()).is_some());
        assert_eq!(selects(NetworkAlgo::Ia3, &o, "ia3", u, ff, &linear()), Some(true));
        assert_eq!(selects(NetworkAlgo::Ia3, &o, "ia3", u, q, &linear()), None);
        // Norms only with train_norm.
        let norm = LayerKind::LayerNorm { features: 8, eps: 1e-5 };
        let n1 = "down_blocks.0.attentions.0.transformer_blocks.0.norm1";
        assert!(selects(NetworkAlgo::Lokr, &o, "full", u, n1, &norm).is_none());
        let tn = NetworkOptions { train_norm: true, ..o };
        assert!(selects(NetworkAlgo::Lokr, &tn, "full", u, n1, &norm).is_some());
    }
}
