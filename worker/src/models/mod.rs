//! The models Loft trains on, written in candle so that adapters can wrap their layers:
//!
//! - [`unet`]: diffusers' `UNet2DConditionModel` (SD1.x, SD2.x, SDXL), per-sample timesteps;
//! - [`clip`]: transformers' CLIP text encoder (last / penultimate / pooled outputs);
//! - [`vae`]: diffusers' `AutoencoderKL`;
//! - [`config`]: serde structs for their `config.json` files;
//! - [`layers`]: the hookable [`Layer`] every Linear / Conv2d / LayerNorm / GroupNorm is, and
//!   the differentiable ops (softmax, attention, upsampling) the models share.
//!
//! Every model lists its layers ([`ModelLayers::layers`]) in build order under their
//! diffusers / transformers module paths; [`kohya_name`] turns a path into the kohya module
//! name (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`). Attaching an
//! adapter is `layer.set_hook(Some(hook))`.
//!
//! Only ops with a backward are used (DESIGN.md, "Facts about the stack"), and
//! `tests/model_parity.rs` checks that every UNet parameter receives a gradient.
//!
//! Parity: `cargo test -p loft-worker --test model_parity` against the fixtures of
//! `tests/parity/make_model_fixtures.py` (a tiny diffusers SD1.5 pipeline).

pub mod clip;
pub mod config;
pub mod flux;
pub mod flux_weights;
pub mod layers;
pub mod ldm_names;
pub mod safetensors_io;
pub mod single_file;
pub mod t5;
pub mod synthetic;
pub mod pipeline;
pub mod tokenizer;
pub mod unet;
pub mod vae;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{bail, DType, Device, Result};
use candle_nn::VarBuilder;

pub use clip::{ClipOutput, ClipTextModel};
pub use config::{ClipTextConfig, UNetConfig, VaeConfig};
pub use layers::{Layer, LayerHook};
pub use unet::{AddedCond, UNet2DConditionModel};
pub use vae::AutoencoderKL;

/// The Stable Diffusion generations Loft trains on, named as the field registry's
/// `model_family` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFamily {
    /// SD 1.x: one CLIP-L text encoder, 768-wide cross-attention.
    Sd15,
    /// SD 2.x: OpenCLIP ViT-H text encoder (penultimate layer), linear projections,
    /// v-prediction for the 768 models.
    Sd2,
    /// SDXL: CLIP-L + OpenCLIP ViT-bigG, `text_time` added conditions.
    Sdxl,
    /// Flux.1 dev: the flow-matching transformer with a guidance embedding; T5-XXL + CLIP-L's
    /// pooled output; 16-channel VAE.
    #[serde(rename = "flux_dev")]
    FluxDev,
    /// Flux.1 schnell: as dev without the guidance embedding.
    #[serde(rename = "flux_schnell")]
    FluxSchnell,
}

impl ModelFamily {
    pub fn name(self) -> &'static str {
        match self {
            ModelFamily::Sd15 => "sd15",
            ModelFamily::Sd2 => "sd2",
            ModelFamily::Sdxl => "sdxl",
            ModelFamily::FluxDev => "flux_dev",
            ModelFamily::FluxSchnell => "flux_schnell",
        }
    }

    /// Flux.1 (dev or schnell): a transformer trained by flow matching, not a DDPM UNet.
    pub fn is_flux(self) -> bool {
        matches!(self, ModelFamily::FluxDev | ModelFamily::FluxSchnell)
    }

    /// The family of a diffusers pipeline from its text encoders: two means SDXL; OpenCLIP's
    /// `gelu` (CLIP-L uses `quick_gelu`) means SD 2.x.
    pub fn of_diffusers(text_encoders: usize, first_hidden_act: &str) -> Self {
        if text_encoders >= 2 {
            ModelFamily::Sdxl
        } else if first_hidden_act == "gelu" {
            ModelFamily::Sd2
        } else {
            ModelFamily::Sd15
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "sd15" | "sd1" | "sd1.5" | "v1" => Some(ModelFamily::Sd15),
            "sd2" | "sd21" | "v2" => Some(ModelFamily::Sd2),
            "sdxl" => Some(ModelFamily::Sdxl),
            "flux_dev" | "flux" | "flux1" | "flux-dev" => Some(ModelFamily::FluxDev),
            "flux_schnell" | "flux-schnell" => Some(ModelFamily::FluxSchnell),
            _ => None,
        }
    }
}

/// A model whose wrappable layers can be listed.
pub trait ModelLayers {
    /// Every Linear / Conv2d / LayerNorm / GroupNorm layer, in build order.
    fn layers(&self) -> &[Arc<Layer>];

    /// The layer at a module path (`down_blocks.0.resnets.0.conv1`).
    fn layer(&self, name: &str) -> Option<&Arc<Layer>> {
        self.layers().iter().find(|l| l.name() == name)
    }

    /// Removes every hook.
    fn clear_hooks(&self) {
        for l in self.layers() {
            l.set_hook(None);
        }
    }
}

/// The kohya module name of a layer: `prefix` (`lora_unet`, `lora_te`, `lora_te1`, …) + `_` +
/// the module path with `.` replaced by `_`.
pub fn kohya_name(prefix: &str, module_path: &str) -> String {
    format!("{prefix}_{}", module_path.replace('.', "_"))
}

/// Every kohya module name a network file may use for a UNet layer, the one sd-scripts writes
/// for this family first: SDXL files use the LDM names (`lora_unet_input_blocks_4_1_…`), SD 1.x/2.x
/// the diffusers paths; both spellings and LyCORIS's `lycoris_` prefix are accepted on reading.
pub fn unet_module_names(family: ModelFamily, layout: &ldm_names::UNetLayout, path: &str) -> Vec<String> {
    let diffusers = kohya_name("lora_unet", path);
    let ldm = ldm_names::sdxl_kohya_unet_name(path, layout);
    let mut names = match (family, ldm) {
        (ModelFamily::Sdxl, Some(ldm)) => vec![ldm, diffusers],
        (_, Some(ldm)) => vec![diffusers, ldm],
        (_, None) => vec![diffusers],
    };
    names.push(kohya_name("lycoris", path));
    names
}

/// The kohya prefix of text encoder `index` of `count` (`lora_te`, or `lora_te1`/`lora_te2`).
pub fn text_encoder_prefix(index: usize, count: usize) -> String {
    if count == 1 {
        "lora_te".to_string()
    } else {
        format!("lora_te{}", index + 1)
    }
}

/// The safetensors file(s) of a diffusers / transformers model folder for weight file stem
/// `stem` (`diffusion_pytorch_model` or `model`): `stem.safetensors`, a sharded
/// `stem.safetensors.index.json`, or the `stem.fp16.safetensors` variant.
pub fn weight_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let single = dir.join(format!("{stem}.safetensors"));
    if single.is_file() {
        return Ok(vec![single]);
    }
    for index_name in [format!("{stem}.safetensors.index.json"), format!("{stem}.fp16.safetensors.index.json")] {
        let index = dir.join(&index_name);
        if index.is_file() {
            let v: serde_json::Value = config::read_json(&index)?;
            let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
                bail!("{}: no weight_map", index.display());
            };
            let mut files: Vec<PathBuf> = map.values().filter_map(|f| f.as_str()).map(|f| dir.join(f)).collect();
            files.sort();
            files.dedup();
            return Ok(files);
        }
    }
    let fp16 = dir.join(format!("{stem}.fp16.safetensors"));
    if fp16.is_file() {
        return Ok(vec![fp16]);
    }
    let found: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    bail!(
        "{}: no {stem}.safetensors (or sharded / fp16 variant) found; the folder holds {:?} \
         (PyTorch .bin weights are not supported: convert them to safetensors)",
        dir.display(),
        found
    )
}

/// A memory-mapped [`VarBuilder`] over a model folder's weights; every tensor is cast to
/// `dtype` when read.
pub fn var_builder(dir: &Path, stem: &str, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let files = weight_files(dir, stem)?;
    // SAFETY: the files are mapped read-only; Loft never writes to a model file while a model
    // built from it is alive.
    unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
}
