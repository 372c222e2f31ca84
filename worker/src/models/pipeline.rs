//! A whole Stable Diffusion model — UNet, text encoder(s), tokenizer(s), VAE and the noise
//! schedule's settings — loaded from a diffusers folder (`model_index.json`) or a single-file
//! LDM checkpoint, plus what training and sampling need on top of the parts: prompt
//! encoding per family (clip skip, SDXL's two encoders, sd-scripts' long prompts), the kohya
//! names of every adaptable layer, and applying saved networks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor};
use serde::Deserialize;

use super::clip::ClipTextModel;
use super::flux::{FluxConfig, FluxTransformer};
use super::flux_weights::FluxWeights;
use super::t5::{T5EncoderModel, T5Tokenizer};
use super::config::read_json;
use super::layers::Layer;
use super::ldm_names::UNetLayout;
use super::tokenizer::{join_chunks, ClipTokenizer};
use super::unet::{AddedCond, UNet2DConditionModel};
use super::vae::AutoencoderKL;
use super::{kohya_name, text_encoder_prefix, unet_module_names, ModelFamily, ModelLayers};
use crate::lora_file::{LoraFile, MultiplierRule};
use crate::networks::BaseLayer;

/// The noise schedule a model was trained with (diffusers `scheduler_config.json`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct SchedulerConfig {
    #[serde(default = "default_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    /// `epsilon` or `v_prediction`.
    #[serde(default = "default_prediction")]
    pub prediction_type: String,
    #[serde(default = "default_steps_offset")]
    pub steps_offset: usize,
}

fn default_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.00085
}
fn default_beta_end() -> f64 {
    0.012
}
fn default_beta_schedule() -> String {
    "scaled_linear".into()
}
fn default_prediction() -> String {
    "epsilon".into()
}
fn default_steps_offset() -> usize {
    1
}

impl Default for SchedulerConfig {
    /// Stable Diffusion's schedule (all families): scaled-linear betas 0.00085 → 0.012 over 1000
    /// steps, epsilon prediction.
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

impl SchedulerConfig {
    pub fn v_prediction(&self) -> bool {
        self.prediction_type == "v_prediction"
    }
}

/// Which network part a layer belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    Unet,
    /// Text encoder `i` (0, or 1 for SDXL's second).
    TextEncoder(usize),
}

/// An adaptable layer under the kohya module name sd-scripts gives it.
#[derive(Clone, Debug)]
pub struct NamedLayer {
    pub kohya_name: String,
    pub part: Part,
    pub layer: Arc<Layer>,
}

/// Encoded prompts, ready for the UNet or the Flux transformer.
#[derive(Clone, Debug)]
pub struct PromptEmbeds {
    /// `(B, N, cross_attention_dim)`; Flux: T5's states `(B, L, 4096)`.
    pub hidden: Tensor,
    /// SDXL: the second encoder's projected pooled output `(B, 1280)`; Flux: CLIP-L's pooled
    /// output `(B, 768)`.
    pub pooled: Option<Tensor>,
    /// Flux with `apply_t5_attn_mask`: T5's `(B, L)` token mask (1 = token, 0 = padding).
    pub mask: Option<Tensor>,
}

impl PromptEmbeds {
    /// Detached copies (for caching).
    pub fn detach(&self) -> Self {
        PromptEmbeds { hidden: self.hidden.detach(), pooled: self.pooled.as_ref().map(|p| p.detach()), mask: self.mask.as_ref().map(|m| m.detach()) }
    }

    /// The batch of several encodings, in order.
    pub fn cat(parts: &[PromptEmbeds]) -> Result<Self> {
        let hidden = Tensor::cat(&parts.iter().map(|p| p.hidden.clone()).collect::<Vec<_>>(), 0)?;
        let some = |v: Vec<Option<Tensor>>| -> Result<Option<Tensor>> {
            if v.iter().all(|t| t.is_some()) && !v.is_empty() {
                Ok(Some(Tensor::cat(&v.into_iter().flatten().collect::<Vec<_>>(), 0)?))
            } else {
                Ok(None)
            }
        };
        Ok(PromptEmbeds {
            hidden,
            pooled: some(parts.iter().map(|p| p.pooled.clone()).collect())?,
            mask: some(parts.iter().map(|p| p.mask.clone()).collect())?,
        })
    }
}

/// The denoiser of a model: a UNet (SD 1.x/2.x/XL) or the Flux transformer.
pub enum Denoiser {
    Unet(UNet2DConditionModel),
    Flux(FluxTransformer),
}

impl Denoiser {
    pub fn device(&self) -> &Device {
        match self {
            Denoiser::Unet(u) => u.device(),
            Denoiser::Flux(f) => f.device(),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Denoiser::Unet(u) => u.dtype(),
            Denoiser::Flux(f) => f.dtype(),
        }
    }

    pub fn layers(&self) -> &[Arc<Layer>] {
        match self {
            Denoiser::Unet(u) => u.layers(),
            Denoiser::Flux(f) => f.layers(),
        }
    }

    pub fn set_memory_efficient_attention(&self, on: bool) {
        match self {
            Denoiser::Unet(u) => u.set_memory_efficient_attention(on),
            Denoiser::Flux(f) => f.set_memory_efficient_attention(on),
        }
    }

    /// Latent channels the denoiser works on (Flux: before packing).
    pub fn latent_channels(&self) -> usize {
        match self {
            Denoiser::Unet(u) => u.config.in_channels,
            Denoiser::Flux(f) => f.config.in_channels / 4,
        }
    }
}

/// Flux's T5 encoder, how prompts go through it, and the Flux-only choices of which layers a
/// network is offered (they live here because every Flux-specific setting of a model does).
pub struct FluxText {
    /// T5-XXL; `None` once [`StableDiffusion::cache_t5_and_drop`] has cached every prompt's
    /// states and freed it.
    pub t5: Option<T5EncoderModel>,
    /// T5's states (and mask) per prompt, kept when T5 is dropped.
    pub t5_cache: HashMap<String, (Tensor, Tensor)>,
    pub tokenizer: T5Tokenizer,
    /// T5 tokens per prompt (`t5xxl_max_token_length`: 512 dev, 256 schnell).
    pub max_length: usize,
    /// `apply_t5_attn_mask`: padding gets no attention in T5 and in the transformer.
    pub apply_mask: bool,
    /// `train_t5xxl`: T5's layers are offered to the network (`lora_te3_…`).
    pub trainable: bool,
    /// `train_blocks`: which transformer blocks are offered to the network (`all`, `double`,
    /// `single`; sd-scripts' `lora_flux` network argument).
    pub train_blocks: String,
    /// kohya LoRA ranks of the input layers `[img, time, vector, guidance, txt]` (`in_dims`).
    pub input_dims: [usize; 5],
    /// `split_qkv`: a kohya LoRA on a fused layer is one LoRA per piece.
    pub split_qkv: bool,
    /// The separate files the parts came from (for reloading the autoencoder).
    pub files: FluxFiles,
}

/// Flux's parts as separate files, as sd-scripts takes them (`clip_l`, `t5xxl`, `ae`): each
/// one given replaces the diffusers folder's part.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FluxFiles {
    pub clip_l: Option<PathBuf>,
    pub t5xxl: Option<PathBuf>,
    /// BFL's `ae.safetensors` (or a diffusers `vae/` folder).
    pub ae: Option<PathBuf>,
}

impl FluxText {
    /// The `in_dims` rank of an input layer (`img_in`, `time_in.*`, `vector_in.*`,
    /// `guidance_in.*`, `txt_in`); `None` for any other layer.
    pub fn input_dim(&self, path: &str) -> Option<usize> {
        let index = match path.split('.').next()? {
            "img_in" => 0,
            "time_in" => 1,
            "vector_in" => 2,
            "guidance_in" => 3,
            "txt_in" => 4,
            _ => return None,
        };
        Some(self.input_dims[index])
    }

    /// With `split_qkv`, the output rows of each piece of a fused layer: a double block's
    /// `qkv` (q, k, v) or a single block's `linear1` (q, k, v, MLP); `None` for other layers.
    pub fn split_rows(&self, path: &str, out: usize, hidden: usize) -> Option<Vec<usize>> {
        if !self.split_qkv {
            return None;
        }
        if path.starts_with("double_blocks.") && path.ends_with("_attn.qkv") {
            Some(vec![out / 3; 3])
        } else if path.starts_with("single_blocks.") && path.ends_with(".linear1") && out > 3 * hidden {
            Some(vec![hidden, hidden, hidden, out - 3 * hidden])
        } else {
            None
        }
    }
}

/// A loaded Stable Diffusion model.
pub struct StableDiffusion {
    pub family: ModelFamily,
    pub denoiser: Denoiser,
    /// CLIP encoders (Flux: CLIP-L, for its pooled output).
    pub text_encoders: Vec<ClipTextModel>,
    /// Flux: T5-XXL.
    pub flux_text: Option<FluxText>,
    pub tokenizers: Vec<ClipTokenizer>,
    pub vae: AutoencoderKL,
    pub scheduler: SchedulerConfig,
    /// Where it was loaded from.
    pub source: PathBuf,
    /// The dtype activations are computed in (the weights' dtype unless
    /// [`StableDiffusion::set_compute_dtype`] says otherwise).
    compute_dtype: Option<DType>,
}

impl std::fmt::Debug for StableDiffusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableDiffusion").field("family", &self.family).field("source", &self.source).finish()
    }
}

impl StableDiffusion {
    /// Loads a model from a diffusers folder or a single-file checkpoint, its weights
    /// memory-mapped and cast to `dtype`.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(path, &FluxFiles::default(), dtype, device, None)
    }

    /// As [`Self::load`]; Flux's parts come from separate files where `files` gives them, and a
    /// Flux transformer's Linear weights are stored in `frozen_weight_dtype` (fp8_base) straight
    /// from the file.
    pub fn load_with(path: &Path, files: &FluxFiles, dtype: DType, device: &Device, frozen_weight_dtype: Option<DType>) -> Result<Self> {
        if path.is_dir() && is_flux_dir(path) {
            Self::from_flux_parts(Some(path), None, files, dtype, device, frozen_weight_dtype)
        } else if path.is_file() && FluxWeights::is_flux_file(path) {
            // The other parts: from the files given, else a diffusers Flux folder named like the file.
            let parts = path.with_extension("");
            Self::from_flux_parts(parts.is_dir().then_some(parts.as_path()), Some(path), files, dtype, device, frozen_weight_dtype)
        } else if path.is_dir() {
            Self::from_diffusers_dir(path, dtype, device)
        } else if path.is_file() {
            Self::from_single_file(path, dtype, device)
        } else {
            bail!("base model {}: no such file or folder", path.display())
        }
    }

    /// A diffusers folder: `model_index.json`, `unet/`, `text_encoder(_2)/`, `tokenizer(_2)/`,
    /// `vae/`, `scheduler/`.
    pub fn from_diffusers_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let index_path = dir.join("model_index.json");
        if !index_path.is_file() {
            bail!("{}: not a diffusers model folder (no model_index.json)", dir.display());
        }
        let index: serde_json::Value = read_json(&index_path)?;
        let te_config: super::ClipTextConfig = read_json(&dir.join("text_encoder/config.json"))?;
        let class = index.get("_class_name").and_then(|c| c.as_str()).unwrap_or("");
        let has_second = class.contains("XL") || index.get("text_encoder_2").is_some_and(|v| v.is_array() && !v[0].is_null());
        let family = ModelFamily::of_diffusers(if has_second { 2 } else { 1 }, &te_config.hidden_act);
        let unet = UNet2DConditionModel::from_diffusers_dir(&dir.join("unet"), dtype, device)?;
        let vae = AutoencoderKL::from_diffusers_dir(&dir.join("vae"), dtype, device)?;
        let mut text_encoders = vec![ClipTextModel::from_transformers_dir(&dir.join("text_encoder"), dtype, device)?];
        // A folder without its tokenizer files (Loft's synthetic benchmark models) gets the
        // built-in CLIP tokenizer, as a single file does; OpenCLIP encoders pad with "!".
        let tokenizer = |name: &str, openclip: bool| {
            let folder = dir.join(name);
            if folder.exists() {
                ClipTokenizer::from_dir(&folder)
            } else {
                ClipTokenizer::embedded_clip(openclip)
            }
        };
        let mut tokenizers = vec![tokenizer("tokenizer", family == ModelFamily::Sd2)?];
        if family == ModelFamily::Sdxl {
            text_encoders.push(ClipTextModel::from_transformers_dir(&dir.join("text_encoder_2"), dtype, device)?);
            tokenizers.push(tokenizer("tokenizer_2", true)?);
        }
        let sched_path = dir.join("scheduler/scheduler_config.json");
        let scheduler = if sched_path.is_file() { read_json(&sched_path)? } else { SchedulerConfig::default() };
        Ok(Self { family, denoiser: Denoiser::Unet(unet), text_encoders, tokenizers, flux_text: None, vae, scheduler, source: dir.to_path_buf(), compute_dtype: None })
    }

    /// Flux from its parts: the transformer from `transformer_file` (BFL) or `dir/transformer`;
    /// CLIP-L, T5 and the autoencoder from `files` where given (sd-scripts' `clip_l`, `t5xxl`,
    /// `ae` single files), else from the diffusers folder `dir`.
    pub fn from_flux_parts(
        dir: Option<&Path>,
        transformer_file: Option<&Path>,
        files: &FluxFiles,
        dtype: DType,
        device: &Device,
        frozen_weight_dtype: Option<DType>,
    ) -> Result<Self> {
        let sub = |name: &str| dir.map(|d| d.join(name)).filter(|p| p.exists());
        let missing = |what: &str, key: &str| {
            candle_core::Error::Msg(format!(
                "Flux's {what}: set {key} (a single file) or give a diffusers Flux folder{}",
                transformer_file.map(|f| format!(" named like the transformer file ({})", f.with_extension("").display())).unwrap_or_default()
            ))
        };
        let config_json = sub("transformer/config.json");
        let (config, weights) = match transformer_file {
            Some(file) => {
                let weights = FluxWeights::bfl_file(file)?;
                let axes = match &config_json {
                    Some(j) => Some(FluxConfig::from_diffusers_json(j)?.axes_dim),
                    None => None,
                };
                (weights.config_from_shapes(axes)?, weights)
            }
            None => {
                let Some(j) = config_json else { return Err(missing("transformer", "pretrained_model_name_or_path")) };
                (FluxConfig::from_diffusers_json(&j)?, FluxWeights::diffusers_dir(j.parent().unwrap_or(Path::new(".")))?)
            }
        };
        let family = if config.guidance_embed { ModelFamily::FluxDev } else { ModelFamily::FluxSchnell };
        let transformer = FluxTransformer::new(&config, weights.with_frozen_weight_dtype(frozen_weight_dtype).var_builder(dtype, device))?;
        let clip = match (&files.clip_l, sub("text_encoder")) {
            // A folder's config.json (without weights) may describe the file's model.
            (Some(f), d) => ClipTextModel::from_file(f, d.map(|d| read_json(&d.join("config.json"))).transpose()?, dtype, device)?,
            (None, Some(d)) => ClipTextModel::from_transformers_dir(&d, dtype, device)?,
            (None, None) => return Err(missing("CLIP-L text encoder", "clip_l")),
        };
        // A folder's own CLIP tokenizer, else the built-in CLIP-L one (as for single files).
        let tokenizer = match sub("tokenizer") {
            Some(d) => ClipTokenizer::from_dir(&d)?,
            None => ClipTokenizer::embedded_clip(false)?,
        };
        let t5 = match (&files.t5xxl, sub("text_encoder_2")) {
            (Some(f), d) => T5EncoderModel::from_file(f, d.map(|d| read_json(&d.join("config.json"))).transpose()?, dtype, device)?,
            (None, Some(d)) => T5EncoderModel::from_transformers_dir(&d, dtype, device)?,
            (None, None) => return Err(missing("T5-XXL text encoder", "t5xxl")),
        };
        let t5_tokenizer = match sub("tokenizer_2") {
            Some(d) => T5Tokenizer::from_dir(&d)?,
            None => {
                // Beside the t5xxl file: its tokenizer.json, or a t5_tokenizer/ or tokenizer_2/ folder.
                let near = files.t5xxl.as_ref().and_then(|f| f.parent()).map(Path::to_path_buf).unwrap_or_default();
                let found = [near.clone(), near.join("t5_tokenizer"), near.join("tokenizer_2")].into_iter().find(|d| d.join("tokenizer.json").is_file());
                match found {
                    Some(d) => T5Tokenizer::from_dir(&d)?,
                    None => bail!(
                        "Flux's T5 tokenizer: no tokenizer.json beside {} (nor in t5_tokenizer/ or tokenizer_2/ there): copy google/t5-v1_1-xxl's tokenizer.json (ComfyUI ships it as comfy/text_encoders/t5_tokenizer/) next to the T5 file",
                        near.display()
                    ),
                }
            }
        };
        let vae = match (&files.ae, sub("vae")) {
            (Some(f), d) if f.is_file() => super::single_file::load_flux_ae(f, d.map(|d| read_json(&d.join("config.json"))).transpose()?, dtype, device)?,
            (Some(d), _) => AutoencoderKL::from_diffusers_dir(d, dtype, device)?,
            (None, Some(d)) => AutoencoderKL::from_diffusers_dir(&d, dtype, device)?,
            (None, None) => return Err(missing("autoencoder", "vae (ae.safetensors)")),
        };
        let max_length = if family == ModelFamily::FluxDev { 512 } else { 256 };
        let source = transformer_file.or(dir).unwrap_or(Path::new("")).to_path_buf();
        Ok(Self {
            family,
            denoiser: Denoiser::Flux(transformer),
            text_encoders: vec![clip],
            tokenizers: vec![tokenizer],
            flux_text: Some(FluxText {
                t5: Some(t5),
                t5_cache: HashMap::new(),
                tokenizer: t5_tokenizer,
                max_length,
                apply_mask: false,
                trainable: false,
                train_blocks: "all".into(),
                input_dims: [0; 5],
                split_qkv: false,
                files: files.clone(),
            }),
            vae,
            scheduler: SchedulerConfig::default(),
            source,
            compute_dtype: None,
        })
    }

    /// The UNet (SD 1.x/2.x/XL). Panics on a Flux model: code serving every family matches on
    /// [`Self::denoiser`].
    pub fn unet(&self) -> &UNet2DConditionModel {
        match &self.denoiser {
            Denoiser::Unet(u) => u,
            Denoiser::Flux(_) => panic!("a Flux model has no UNet"),
        }
    }

    /// The Flux transformer, if this is a Flux model.
    pub fn flux(&self) -> Option<&FluxTransformer> {
        match &self.denoiser {
            Denoiser::Flux(f) => Some(f),
            Denoiser::Unet(_) => None,
        }
    }

    /// A single-file checkpoint with the original LDM key names. Such files carry no
    /// tokenizer: a `tokenizer/` (and `tokenizer_2/`) folder beside the file is used when
    /// present, else Loft's built-in CLIP tokenizer. The schedule is Stable Diffusion's
    /// (epsilon prediction unless the caller says v).
    pub fn from_single_file(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        // A diffusers folder named like the file (`model/` beside `model.safetensors`) may give
        // the configs (needed for architectures the shapes alone do not pin down).
        let config_dir = path.with_extension("");
        let checkpoint = if config_dir.join("unet/config.json").is_file() {
            super::single_file::Checkpoint::open_with_config_dir(path, &config_dir)?
        } else {
            super::single_file::Checkpoint::open(path)?
        };
        let parts = checkpoint.load(dtype, device)?;
        let beside = path.parent().unwrap_or(Path::new("."));
        // A diffusers-style folder named like the file (`model/` for `model.safetensors`), or
        // the file's own folder, may hold the tokenizer files.
        let roots = [path.with_extension(""), beside.to_path_buf()];
        let n = parts.text_encoders.len();
        let mut tokenizers = vec![];
        for (i, te) in parts.text_encoders.iter().enumerate() {
            let name = if i == 0 { "tokenizer" } else { "tokenizer_2" };
            let folder = roots.iter().map(|r| r.join(name)).find(|f| f.join("vocab.json").is_file() || f.join("tokenizer.json").is_file());
            // OpenCLIP encoders (SD 2.x, SDXL's second) pad with "!".
            let openclip = parts.family == ModelFamily::Sd2 || i == 1;
            let tok = match folder {
                Some(f) => ClipTokenizer::from_dir(&f)?,
                None => ClipTokenizer::embedded_clip(openclip)?,
            };
            if tok.eos as usize >= te.config.vocab_size {
                bail!(
                    "{}: text encoder {} has {} tokens but the tokenizer uses ids up to {}: put the model's {name}/ folder beside the file",
                    path.display(),
                    i + 1,
                    te.config.vocab_size,
                    tok.eos
                );
            }
            tokenizers.push(tok);
        }
        debug_assert_eq!(tokenizers.len(), n);
        Ok(Self {
            family: parts.family,
            denoiser: Denoiser::Unet(parts.unet),
            text_encoders: parts.text_encoders,
            tokenizers,
            flux_text: None,
            vae: parts.vae,
            scheduler: SchedulerConfig::default(),
            source: path.to_path_buf(),
            compute_dtype: None,
        })
    }

    pub fn device(&self) -> &Device {
        self.denoiser.device()
    }

    /// Loads the VAE again from the model's source in `dtype` (e.g. f32 while the rest stays
    /// f16: sd-scripts' `--no_half_vae`, as SDXL's VAE overflows in fp16).
    pub fn reload_vae(&mut self, dtype: DType) -> Result<()> {
        let device = self.device().clone();
        let flux_ae = self.flux_text.as_ref().and_then(|t| t.files.ae.clone());
        self.vae = if let Some(dir) = flux_ae.as_ref().filter(|f| f.is_dir()) {
            AutoencoderKL::from_diffusers_dir(dir, dtype, &device)?
        } else if let Some(ae) = flux_ae.filter(|f| f.is_file()) {
            let dir = if self.source.is_dir() { self.source.clone() } else { self.source.with_extension("") };
            let config = dir.join("vae/config.json");
            super::single_file::load_flux_ae(&ae, config.is_file().then(|| read_json(&config)).transpose()?, dtype, &device)?
        } else if self.family.is_flux() {
            let dir = if self.source.is_dir() { self.source.clone() } else { self.source.with_extension("") };
            AutoencoderKL::from_diffusers_dir(&dir.join("vae"), dtype, &device)?
        } else if self.source.is_dir() {
            AutoencoderKL::from_diffusers_dir(&self.source.join("vae"), dtype, &device)?
        } else {
            let config_dir = self.source.with_extension("");
            let checkpoint = if config_dir.join("unet/config.json").is_file() {
                super::single_file::Checkpoint::open_with_config_dir(&self.source, &config_dir)?
            } else {
                super::single_file::Checkpoint::open(&self.source)?
            };
            checkpoint.load_vae(dtype, &device)?
        };
        Ok(())
    }

    /// The dtype the model computes in.
    pub fn dtype(&self) -> DType {
        self.compute_dtype.unwrap_or_else(|| self.denoiser.dtype())
    }

    /// Keeps the weights in the dtype they were loaded in (e.g. f16, half the memory) and
    /// computes in `dtype` (e.g. f32): each layer casts its weight for the call.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute_dtype = Some(dtype);
        for te in &mut self.text_encoders {
            te.set_compute_dtype(dtype);
        }
    }

    /// Encodes prompts as the family's trainer does (sd-scripts): SD 1.x/2.x use the last
    /// layer, or with `clip_skip` k > 1 layer −k through the final layer norm; SDXL
    /// concatenates both encoders' penultimate layers (no final norm) and pools the second.
    /// `max_token_length` (75, 150, 225) is the prompt length in tokens; longer prompts are cut.
    pub fn encode_prompts(&self, prompts: &[String], clip_skip: usize, max_token_length: usize) -> Result<PromptEmbeds> {
        self.encode_prompts_with(prompts, clip_skip, max_token_length, false)
    }

    /// [`Self::encode_prompts`] with sd-scripts' `weighted_captions`: `(word:1.2)` and `[word]`
    /// are read as attention weights (not text) and each token's output state is multiplied by
    /// its weight, as sd-scripts' `encode_tokens_with_weights` (the pooled embedding is not).
    pub fn encode_weighted_prompts(&self, prompts: &[String], clip_skip: usize, max_token_length: usize) -> Result<PromptEmbeds> {
        self.encode_prompts_with(prompts, clip_skip, max_token_length, true)
    }

    fn encode_prompts_with(&self, prompts: &[String], clip_skip: usize, max_token_length: usize, weighted: bool) -> Result<PromptEmbeds> {
        if let Some(text) = &self.flux_text {
            return self.encode_flux_prompts(text, prompts);
        }
        let n_chunks = max_token_length / super::tokenizer::WINDOW_TOKENS;
        let device = self.device();
        let mut per_encoder = vec![];
        let mut pooled = None;
        for (i, (te, tok)) in self.text_encoders.iter().zip(&self.tokenizers).enumerate() {
            let mut rows = vec![];
            let mut position_weights: Vec<f32> = vec![];
            for p in prompts {
                let chunks = if weighted {
                    let (chunks, weights) = tok.encode_weighted_chunks(p, max_token_length)?;
                    position_weights.extend(weights);
                    chunks
                } else {
                    tok.encode_chunks(p, max_token_length)?
                };
                for chunk in chunks {
                    rows.push(Tensor::new(chunk, device)?);
                }
            }
            let ids = Tensor::stack(&rows, 0)?;
            let out = te.forward(&ids)?;
            let hs = &out.hidden_states;
            let states = match self.family {
                ModelFamily::Sdxl => hs[hs.len() - 2].clone(),
                _ if clip_skip > 1 => te.final_layer_norm(&hs[hs.len() - clip_skip])?,
                _ => out.last_hidden_state.clone(),
            };
            let states = join_chunks(&states, n_chunks)?;
            let states = if weighted {
                let w = Tensor::from_vec(position_weights, (prompts.len(), max_token_length + 2, 1), device)?.to_dtype(states.dtype())?;
                states.broadcast_mul(&w)?
            } else {
                states
            };
            per_encoder.push(states);
            if i == 1 {
                // SDXL pools the first window of each prompt.
                let te_pooled = out.text_embeds.clone().unwrap_or(out.pooled.clone());
                let idx: Vec<u32> = (0..prompts.len()).map(|b| (b * n_chunks) as u32).collect();
                pooled = Some(te_pooled.index_select(&Tensor::new(idx, device)?, 0)?);
            }
        }
        let hidden = if per_encoder.len() == 1 { per_encoder.remove(0) } else { Tensor::cat(&per_encoder, 2)? };
        Ok(PromptEmbeds { hidden, pooled, mask: None })
    }

    /// Flux's prompt encoding (sd-scripts' `FluxTextEncodingStrategy`): CLIP-L's pooled output
    /// of the 77-token prompt, and T5's last states of the `max_length`-token prompt (its mask
    /// passed to T5, and returned for the transformer, with `apply_t5_attn_mask`).
    fn encode_flux_prompts(&self, text: &FluxText, prompts: &[String]) -> Result<PromptEmbeds> {
        let device = self.device();
        let clip_rows = prompts
            .iter()
            .map(|p| Ok(Tensor::new(self.tokenizers[0].encode_chunks(p, super::tokenizer::WINDOW_TOKENS)?.remove(0), device)?))
            .collect::<Result<Vec<_>>>()?;
        let pooled = self.text_encoders[0].forward(&Tensor::stack(&clip_rows, 0)?)?.pooled;
        let Some(t5) = &text.t5 else {
            // T5 was freed after caching: every prompt must be in the cache.
            let mut hidden = vec![];
            let mut masks = vec![];
            for p in prompts {
                let Some((h, m)) = text.t5_cache.get(p) else {
                    bail!("T5-XXL was freed after caching the text encoder outputs, and prompt {p:?} was not among the cached ones");
                };
                hidden.push(h.to_device(device)?);
                masks.push(m.to_device(device)?);
            }
            let mask = if text.apply_mask { Some(Tensor::cat(&masks, 0)?) } else { None };
            return Ok(PromptEmbeds { hidden: Tensor::cat(&hidden, 0)?, pooled: Some(pooled), mask });
        };
        let mut ids = vec![];
        let mut mask = vec![];
        for p in prompts {
            let (i, m) = text.tokenizer.encode(p, text.max_length)?;
            ids.extend(i);
            mask.extend(m);
        }
        let ids = Tensor::from_vec(ids, (prompts.len(), text.max_length), device)?;
        let mask = Tensor::from_vec(mask, (prompts.len(), text.max_length), device)?;
        let mask = text.apply_mask.then_some(mask);
        let hidden = t5.forward(&ids, mask.as_ref())?;
        Ok(PromptEmbeds { hidden, pooled: Some(pooled), mask })
    }

    /// Flux: encodes every one of `prompts` with T5 once, keeps the states, and frees T5-XXL
    /// (sd-scripts' `cache_text_encoder_outputs`: ~9 GB in bf16 that training no longer holds).
    /// Later prompt encodings read the cache; a prompt not in it is an error. Returns how many
    /// prompts were cached.
    pub fn cache_t5_and_drop(&mut self, prompts: &[String]) -> Result<usize> {
        let Some(text) = self.flux_text.as_mut() else { bail!("only Flux has a T5 encoder to cache") };
        let Some(t5) = text.t5.take() else { return Ok(text.t5_cache.len()) };
        let device = t5.device().clone();
        for p in prompts {
            if text.t5_cache.contains_key(p) {
                continue;
            }
            let (ids, mask) = text.tokenizer.encode(p, text.max_length)?;
            let ids = Tensor::from_vec(ids, (1, text.max_length), &device)?;
            let mask = Tensor::from_vec(mask, (1, text.max_length), &device)?;
            // Kept in host memory: at 512 tokens a caption's states are 4 MB in bf16.
            let hidden = t5.forward(&ids, text.apply_mask.then_some(&mask))?.detach().to_device(&Device::Cpu)?;
            text.t5_cache.insert(p.clone(), (hidden, mask.to_device(&Device::Cpu)?));
        }
        Ok(text.t5_cache.len())
    }

    /// Stores the frozen Linear/Conv2d weights of the U-Net and text encoders in `dtype`
    /// (`fp8_base`: float8 e4m3); biases and norms keep theirs. Each layer casts its weight to
    /// the activations' dtype for each call ([`super::layers::forward_in_dtype`]), so only one
    /// layer's weight is ever held in the compute dtype at a time. Returns how many weights.
    pub fn store_frozen_weights_in(&self, dtype: DType) -> Result<usize> {
        use super::ModelLayers;
        let mut count = 0;
        let t5 = self.flux_text.iter().flat_map(|t| t.t5.iter()).flat_map(|t5| t5.layers().iter());
        let layers = self.denoiser.layers().iter().chain(self.text_encoders.iter().flat_map(|te| te.layers().iter())).chain(t5);
        for layer in layers {
            if !(layer.is_linear() || layer.is_conv()) {
                continue;
            }
            let mut base = layer.base();
            base.weight = base.weight.to_dtype(dtype)?;
            layer.set_base(base)?;
            count += 1;
        }
        Ok(count)
    }

    /// SDXL's added conditions for a batch: `pooled` text embeds and per-sample
    /// `(original h, w, crop top, left, target h, w)`.
    pub fn added_cond(&self, pooled: Option<&Tensor>, time_ids: &[[f32; 6]]) -> Result<Option<AddedCond>> {
        if self.family != ModelFamily::Sdxl {
            return Ok(None);
        }
        let Some(pooled) = pooled else { bail!("SDXL needs the pooled text embedding") };
        let flat: Vec<f32> = time_ids.iter().flatten().copied().collect();
        let time_ids = Tensor::from_vec(flat, (time_ids.len(), 6), self.device())?;
        Ok(Some(AddedCond { text_embeds: pooled.clone(), time_ids }))
    }

    /// The UNet layout SDXL's LDM names need.
    fn unet_layout(&self) -> UNetLayout {
        UNetLayout::from_config(&self.unet().config)
    }

    /// Every UNet and text-encoder layer under the kohya module name sd-scripts writes for it:
    /// SD 1.x/2.x use the diffusers paths (`lora_unet_down_blocks_…`, `lora_te_text_model_…`),
    /// SDXL the LDM UNet names (`lora_unet_input_blocks_4_1_…`) and `lora_te1_` / `lora_te2_`.
    pub fn named_layers(&self) -> Vec<NamedLayer> {
        self.layer_names().into_iter().map(|(mut names, part, layer)| NamedLayer { kohya_name: names.remove(0), part, layer }).collect()
    }

    /// Each layer with every name a file may use for it (the written one first; see
    /// [`super::unet_module_names`]).
    pub(crate) fn layer_names(&self) -> Vec<(Vec<String>, Part, Arc<Layer>)> {
        if self.family.is_flux() {
            return self.flux_layer_names();
        }
        let mut out = vec![];
        let layout = self.unet_layout();
        for l in self.unet().layers() {
            out.push((unet_module_names(self.family, &layout, l.name()), Part::Unet, l.clone()));
        }
        let n_te = self.text_encoders.len();
        for (i, te) in self.text_encoders.iter().enumerate() {
            let prefix = text_encoder_prefix(i, n_te);
            for l in te.layers() {
                out.push((vec![kohya_name(&prefix, l.name())], Part::TextEncoder(i), l.clone()));
            }
        }
        out
    }

    /// Flux's layers under sd-scripts' `lora_flux` names: the transformer's BFL paths under
    /// `lora_unet_`, CLIP-L under `lora_te1_`, T5 (when offered) under `lora_te3_`.
    fn flux_layer_names(&self) -> Vec<(Vec<String>, Part, Arc<Layer>)> {
        let mut out = vec![];
        let blocks = self.flux_text.as_ref().map_or("all", |t| t.train_blocks.as_str());
        for l in self.denoiser.layers() {
            let offered = match blocks {
                "double" => !l.name().starts_with("single_blocks."),
                "single" => !l.name().starts_with("double_blocks."),
                _ => true,
            };
            if offered {
                out.push((vec![kohya_name("lora_unet", l.name()), kohya_name("lycoris", l.name())], Part::Unet, l.clone()));
            }
        }
        for l in self.text_encoders[0].layers() {
            out.push((vec![kohya_name("lora_te1", l.name())], Part::TextEncoder(0), l.clone()));
        }
        if let Some(text) = self.flux_text.as_ref().filter(|t| t.trainable) {
            for l in text.t5.iter().flat_map(|t5| t5.layers()) {
                out.push((vec![kohya_name("lora_te3", l.name())], Part::TextEncoder(1), l.clone()));
            }
        }
        out
    }

    /// Applies saved networks for inference: each `(file, weight)` adds its change at strength
    /// `weight` — as LyCORIS applies it ([`MultiplierRule::Lycoris`]) — to the layers it names, through a hook on the layer (the model files stay untouched).
    /// Returns the module names no layer matched; fails when a file matches nothing.
    pub fn apply_networks(&self, networks: &[(&LoraFile, f64)]) -> Result<Vec<String>> {
        self.apply_networks_with(networks, MultiplierRule::Lycoris)
    }

    /// As [`Self::apply_networks`], with the strength applied under `rule`.
    pub fn apply_networks_with(&self, networks: &[(&LoraFile, f64)], rule: MultiplierRule) -> Result<Vec<String>> {
        self.patch_layers(networks, rule, false)
    }

    /// As [`StableDiffusion::apply_networks_with`], but merged into the frozen weights
    /// themselves (no hooks; `clear_hooks` keeps them): `base_weights`, under the adapters a
    /// run then trains.
    pub fn merge_networks(&self, networks: &[(&LoraFile, f64)], rule: MultiplierRule) -> Result<Vec<String>> {
        self.patch_layers(networks, rule, true)
    }

    fn patch_layers(&self, networks: &[(&LoraFile, f64)], rule: MultiplierRule, into_weights: bool) -> Result<Vec<String>> {
        let layers: HashMap<String, Arc<Layer>> = self
            .layer_names()
            .into_iter()
            .flat_map(|(names, _, layer)| names.into_iter().map(move |n| (n, layer.clone())))
            .collect();
        // Accumulate per layer so several files stack.
        let mut deltas: HashMap<usize, (Arc<Layer>, Tensor, Option<Tensor>)> = HashMap::new();
        let mut unmatched = vec![];
        for (file, weight) in networks {
            let mut matched = 0;
            for m in &file.modules {
                let Some(layer) = layers.get(&m.name) else {
                    unmatched.push(m.name.clone());
                    continue;
                };
                matched += 1;
                let d = m.delta_at(Some(&layer.base()), *weight, rule).map_err(|e| candle_core::Error::Msg(format!("{}: {e:#}", file.path.display())))?;
                let dw = d.dw.to_dtype(DType::F32)?;
                let db = d.db.map(|b| b.to_dtype(DType::F32)).transpose()?;
                // Keyed by the layer itself (SDXL's two text encoders share module paths), so two
                // spellings of one layer's name stack.
                let key = Arc::as_ptr(layer) as usize;
                match deltas.get_mut(&key) {
                    Some((_, w, b)) => {
                        *w = (&*w + dw)?;
                        *b = match (b.take(), db) {
                            (Some(x), Some(y)) => Some((x + y)?),
                            (x, y) => x.or(y),
                        };
                    }
                    None => {
                        deltas.insert(key, (layer.clone(), dw, db));
                    }
                }
            }
            if matched == 0 && !file.modules.is_empty() {
                bail!(
                    "{}: none of its {} modules matches a layer of this {} model (first: {})",
                    file.path.display(),
                    file.modules.len(),
                    self.family.name(),
                    file.modules[0].name
                );
            }
        }
        for (_, (layer, dw, db)) in deltas {
            let base = layer.base();
            let w = (base.weight.to_dtype(DType::F32)? + dw.reshape(base.weight.dims())?)?.to_dtype(base.weight.dtype())?;
            let b = match (&base.bias, db) {
                (Some(b0), Some(d)) => Some((b0.to_dtype(DType::F32)? + d)?.to_dtype(b0.dtype())?),
                (None, Some(d)) => Some(d.to_dtype(base.weight.dtype())?),
                (b0, None) => b0.clone(),
            };
            let merged = BaseLayer { kind: base.kind.clone(), weight: w, bias: b };
            if into_weights {
                layer.set_base(merged)?;
                continue;
            }
            layer.set_hook(Some(Arc::new(move |_: &BaseLayer, x: &Tensor| super::layers::forward_in_dtype(&merged, x))));
        }
        Ok(unmatched)
    }

    /// Removes every hook from every part.
    pub fn clear_hooks(&self) {
        for l in self.denoiser.layers() {
            l.set_hook(None);
        }
        for te in &self.text_encoders {
            te.clear_hooks();
        }
        if let Some(text) = &self.flux_text {
            if let Some(t5) = &text.t5 {
                t5.clear_hooks();
            }
        }
        self.vae.clear_hooks();
    }
}

/// Whether a diffusers folder holds a Flux pipeline (`FluxPipeline` in model_index.json, or a
/// `transformer/` with a Flux config).
pub fn is_flux_dir(dir: &Path) -> bool {
    let class = read_json::<serde_json::Value>(&dir.join("model_index.json"))
        .ok()
        .and_then(|v| v.get("_class_name").and_then(|c| c.as_str()).map(str::to_string))
        .unwrap_or_default();
    if !class.is_empty() {
        return class.starts_with("Flux");
    }
    // No model_index.json: a transformer/ whose config is Flux's.
    read_json::<serde_json::Value>(&dir.join("transformer/config.json"))
        .ok()
        .is_some_and(|c| c.get("_class_name").and_then(|n| n.as_str()) == Some("FluxTransformer2DModel") || c.get("axes_dims_rope").is_some() && c.get("guidance_embeds").is_some())
}
