//! The typed job config: the field registry's keys (`fields/*.toml`), resolved and validated by
//! the caller (the `loft train` command or the queue), then read here.
//!
//! Every field has the default "off / not used" value, so a caller may leave out fields that
//! are hidden or greyed for the chosen options (the registry's *inactive* fields) and the
//! engine does not use them. Options the registry offers but this engine does not implement
//! are refused by [`TrainConfig::check_supported`] when set, never silently ignored.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::models::ModelFamily;
use crate::networks::{NetworkAlgo, NetworkOptions};

/// Everything a training run needs, under the registry's keys.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TrainConfig {
    // ---- model
    pub model_family: ModelFamily,
    pub pretrained_model_name_or_path: PathBuf,
    /// A separate VAE (diffusers `vae/` folder; Flux: also BFL's `ae.safetensors`); empty = the
    /// model's own.
    pub vae: PathBuf,
    /// Flux: CLIP-L as a single file (`clip_l.safetensors`); empty = the Flux folder's.
    pub clip_l: PathBuf,
    /// Flux: T5-XXL as a single file (`t5xxl_fp16.safetensors`, its `tokenizer.json` beside it);
    /// empty = the Flux folder's.
    pub t5xxl: PathBuf,
    /// LoRA files merged into the frozen model before training, in order (none = nothing
    /// merged). The form holds one path per line; sd-scripts' files a list.
    #[serde(deserialize_with = "paths_from_lines_or_list")]
    pub base_weights: Vec<PathBuf>,
    /// The strength of each `base_weights` file, in the same order; a file without one is
    /// merged at 1.0, as sd-scripts does. The form holds "1.0, 0.5"; sd-scripts' files a list.
    #[serde(deserialize_with = "numbers_from_text_or_list")]
    pub base_weights_multiplier: Vec<f64>,
    /// An earlier network file of the same algorithm to start from (empty = fresh adapters).
    pub network_weights: PathBuf,
    /// Take network/conv dim and alpha from `network_weights`.
    pub dim_from_weights: bool,
    pub v_parameterization: bool,
    pub clip_skip: usize,
    /// `no`, `fp16`, `bf16`: the dtype the frozen model is stored and computed in (trained
    /// variables stay f32). The CPU backend does fp16 but not bf16.
    /// `auto` (bf16 on GPUs that have it, fp16 on older GPUs, no on the CPU), `no`, `fp16`, `bf16`.
    pub mixed_precision: String,
    /// `auto`, `cpu`, `cuda`, `cuda:N` (see [`crate::device::select`]).
    pub device: String,
    /// Train the network's weights (and the optimizer's states) in fp16, not only the model:
    /// needs `mixed_precision = "fp16"`.
    pub full_fp16: bool,
    /// Store the frozen model's Linear/Conv2d weights as float8 e4m3 (needs fp16/bf16).
    pub fp8_base: bool,
    /// As `full_fp16`, in bf16 (needs `mixed_precision = "bf16"`, so a GPU).
    pub full_bf16: bool,
    pub no_half_vae: bool,

    // ---- dataset
    pub train_data_dir: PathBuf,
    pub reg_data_dir: PathBuf,
    pub class_tokens: String,
    pub num_repeats: u32,
    pub prior_loss_weight: f64,
    pub resolution: u32,
    pub min_bucket_reso: u32,
    pub max_bucket_reso: u32,
    pub bucket_reso_steps: u32,
    pub enable_bucket: bool,
    pub bucket_no_upscale: bool,
    pub train_batch_size: usize,
    pub caption_extension: String,
    pub caption_separator: String,
    pub keep_tokens: usize,
    pub keep_tokens_separator: String,
    pub secondary_separator: String,
    pub caption_prefix: String,
    pub caption_suffix: String,
    /// `75`, `150` or `225` (a choice in the registry, so a string).
    pub max_token_length: String,
    pub token_warmup_min: usize,
    pub token_warmup_step: f64,
    pub shuffle_caption: bool,
    /// `(word:1.2)` / `[word]` in captions weight the text encoder's output for those tokens.
    pub weighted_captions: bool,
    /// `{a|b|c}` wildcards and multi-line caption files (one line per step).
    pub enable_wildcard: bool,
    pub caption_dropout_rate: f64,
    pub caption_dropout_every_n_epochs: u32,
    pub caption_tag_dropout_rate: f64,
    pub flip_aug: bool,
    pub random_crop: bool,
    /// sd-scripts' weak colour augmentation (a hue shift or gamma one time in three).
    pub color_aug: bool,
    /// "min,max": crops around the face box in each image's file name (without buckets).
    pub face_crop_aug_range: String,
    /// Weight the loss per pixel by a mask (from `conditioning_data_dir`, or the alpha channel
    /// with `alpha_mask`).
    pub masked_loss: bool,
    /// Mask images named like the training images (with `masked_loss`); empty = none.
    pub conditioning_data_dir: PathBuf,
    /// Each image's alpha channel is its loss mask (masked loss without the switch).
    pub alpha_mask: bool,
    /// Share of each training subset held out for a validation loss (0 = none).
    pub validation_split: f64,
    /// Chooses the held-out images and the validation noise; 0 = `seed`.
    pub validation_seed: u64,
    /// Validate at the end of every N epochs; 0 = every epoch (sd-scripts' default).
    pub validate_every_n_epochs: u64,
    /// Also validate every N optimizer steps; 0 = not by steps.
    pub validate_every_n_steps: u64,
    /// At most this many validation batches per evaluation; 0 = all.
    pub max_validation_steps: u64,
    pub cache_latents: bool,
    pub cache_latents_to_disk: bool,
    pub cache_text_encoder_outputs: bool,
    pub cache_text_encoder_outputs_to_disk: bool,
    pub vae_batch_size: usize,
    /// A corrupt or unreadable image: skip it (reported by name) or stop the run.
    pub skip_bad_images: bool,

    // ---- network
    pub network_algo: NetworkAlgo,
    pub lycoris_preset: String,
    pub network_dim: usize,
    pub network_alpha: f64,
    pub conv_dim: Option<usize>,
    pub conv_alpha: Option<f64>,
    pub factor: i64,
    pub unbalanced_factorization: bool,
    pub full_matrix: bool,
    pub decompose_both: bool,
    pub block_size: usize,
    pub constraint: f64,
    pub use_constraint: bool,
    pub rescaled: bool,
    pub dora_wd: bool,
    pub wd_on_output: bool,
    pub use_tucker: bool,
    pub orthogonalize: bool,
    pub rs_lora: bool,
    pub use_scalar: bool,
    pub train_norm: bool,
    pub bypass_mode: bool,
    pub train_on_input: bool,
    pub network_dropout: f64,
    pub rank_dropout: f64,
    pub module_dropout: f64,
    pub network_train_unet_only: bool,
    pub network_train_text_encoder_only: bool,

    // ---- optimizer
    pub optimizer_type: String,
    pub optimizer_args: String,
    pub max_grad_norm: f64,
    pub learning_rate: f64,
    pub unet_lr: f64,
    pub text_encoder_lr: f64,
    pub lr_scheduler: String,
    pub lr_warmup_steps: u64,
    pub lr_scheduler_num_cycles: u64,
    pub lr_scheduler_power: f64,
    pub weight_decay: f64,
    pub d_coef: f64,
    pub decouple: bool,
    pub use_bias_correction: bool,
    pub safeguard_warmup: bool,
    pub relative_step: bool,
    pub scale_parameter: bool,
    pub warmup_init: bool,
    pub loraplus_lr_ratio: f64,
    pub loraplus_unet_lr_ratio: f64,
    pub loraplus_text_encoder_lr_ratio: f64,

    // ---- training
    pub max_train_epochs: u64,
    pub max_train_steps: u64,
    pub gradient_accumulation_steps: usize,
    pub seed: u64,
    pub gradient_checkpointing: bool,
    /// `none`: plain attention; `sdpa`, `xformers`, `mem_eff_attn`: the memory-efficient one.
    pub attention: String,
    pub loss_type: String,
    pub huber_schedule: String,
    pub huber_c: f64,
    pub huber_scale: f64,
    pub min_snr_gamma: f64,
    pub v_pred_like_loss: f64,
    pub debiased_estimation_loss: bool,
    pub scale_v_pred_loss_like_noise_pred: bool,
    pub scale_weight_norms: f64,
    pub noise_offset: f64,
    pub adaptive_noise_scale: f64,
    pub multires_noise_iterations: usize,
    pub multires_noise_discount: f64,
    pub ip_noise_gamma: f64,
    pub noise_offset_random_strength: bool,
    pub ip_noise_gamma_random_strength: bool,
    pub zero_terminal_snr: bool,
    pub min_timestep: usize,
    pub max_timestep: usize,

    // ---- flux (Flux.1 dev/schnell only: flow matching, sd-scripts' flux_train_network.py
    // names; the registry shows them for the Flux families only, and they must keep these
    // defaults for the others)
    /// The guidance value Flux.1 dev's guidance embedding gets on every step (schnell has none).
    pub guidance_scale: f64,
    /// How σ is drawn: `sigma`, `uniform`, `sigmoid`, `shift`, `flux_shift`.
    pub timestep_sampling: String,
    /// Scale of the normal draw before the sigmoid (`sigmoid`, `shift`, `flux_shift`).
    pub sigmoid_scale: f64,
    /// The flow schedule's shift (`sigma` and `shift` sampling).
    pub discrete_flow_shift: f64,
    /// What is done to the prediction before the loss: `raw`, `additive`, `sigma_scaled`.
    pub model_prediction_type: String,
    /// SD3's schemes: `uniform` (also `none`), `logit_normal`, `mode` (timestep density, with
    /// `sigma` sampling), `sigma_sqrt`, `cosmap` (loss weights, with `sigma_scaled`).
    pub weighting_scheme: String,
    pub logit_mean: f64,
    pub logit_std: f64,
    pub mode_scale: f64,
    /// T5-XXL tokens per caption (the registry's default: 512 for dev, 256 for schnell); 0 =
    /// the model's own.
    pub t5xxl_max_token_length: usize,
    /// Mask T5's padding tokens, in T5 and in the transformer's attention.
    pub apply_t5_attn_mask: bool,
    /// Also adapt T5-XXL when the text encoders are trained (kohya network_arg).
    pub train_t5xxl: bool,
    /// Which transformer blocks get adapters: `all`, `single`, `double` (kohya network_arg).
    pub train_blocks: String,
    /// kohya LoRA ranks for Flux's input layers, `[img, time, vector, guidance, txt]` (sd-scripts'
    /// `in_dims` network_arg; empty or 0 = not adapted).
    pub in_dims: String,
    /// kohya LoRA on Flux: one LoRA per q/k/v (and MLP) piece of the fused layers (kohya
    /// network_arg `split_qkv`).
    pub split_qkv: bool,

    // ---- sampling
    pub sample_prompts: String,
    pub sample_sampler: String,
    pub sample_every_n_epochs: u64,
    pub sample_every_n_steps: u64,
    pub sample_at_first: bool,

    // ---- saving
    pub output_name: String,
    pub output_dir: PathBuf,
    pub save_model_as: String,
    pub save_precision: String,
    pub save_every_n_epochs: u64,
    pub save_every_n_steps: u64,
    pub save_last_n_epochs: u64,
    pub save_last_n_steps: u64,
    pub save_state: bool,
    pub save_last_n_epochs_state: u64,
    pub save_last_n_steps_state: u64,
    pub save_state_on_train_end: bool,
    pub training_comment: String,
    pub metadata_title: String,
    pub metadata_author: String,
    pub metadata_description: String,
    pub metadata_license: String,
    pub metadata_tags: String,
    pub metadata_trigger_phrase: String,
    pub no_metadata: bool,

    // ---- logs
    /// TensorBoard logs go under this folder (empty = no logs).
    pub logging_dir: PathBuf,
    /// `auto` (TensorBoard when `logging_dir` is set, sd-scripts' unset) or `tensorboard`.
    pub log_with: String,
    /// Put before the time stamp of each run's log folder.
    pub log_prefix: String,
    /// The log folder's last part; empty = `network_train`.
    pub log_tracker_name: String,
}

impl Default for TrainConfig {
    /// sd-scripts' defaults (the registry's, for SD 1.5), with every optional feature off.
    fn default() -> Self {
        TrainConfig {
            model_family: ModelFamily::Sd15,
            pretrained_model_name_or_path: PathBuf::new(),
            vae: PathBuf::new(),
            clip_l: PathBuf::new(),
            t5xxl: PathBuf::new(),
            base_weights: vec![],
            base_weights_multiplier: vec![1.0],
            network_weights: PathBuf::new(),
            dim_from_weights: false,
            v_parameterization: false,
            clip_skip: 1,
            mixed_precision: "auto".into(),
            device: "auto".into(),
            full_fp16: false,
            fp8_base: false,
            full_bf16: false,
            no_half_vae: false,
            train_data_dir: PathBuf::new(),
            reg_data_dir: PathBuf::new(),
            class_tokens: String::new(),
            num_repeats: 1,
            prior_loss_weight: 1.0,
            resolution: 512,
            min_bucket_reso: 256,
            max_bucket_reso: 1024,
            bucket_reso_steps: 64,
            enable_bucket: true,
            bucket_no_upscale: false,
            train_batch_size: 1,
            caption_extension: ".txt".into(),
            caption_separator: ",".into(),
            keep_tokens: 0,
            keep_tokens_separator: String::new(),
            secondary_separator: String::new(),
            caption_prefix: String::new(),
            caption_suffix: String::new(),
            max_token_length: "75".into(),
            token_warmup_min: 1,
            token_warmup_step: 0.0,
            shuffle_caption: false,
            weighted_captions: false,
            enable_wildcard: false,
            caption_dropout_rate: 0.0,
            caption_dropout_every_n_epochs: 0,
            caption_tag_dropout_rate: 0.0,
            flip_aug: false,
            random_crop: false,
            color_aug: false,
            face_crop_aug_range: String::new(),
            masked_loss: false,
            conditioning_data_dir: PathBuf::new(),
            alpha_mask: false,
            validation_split: 0.0,
            validation_seed: 0,
            validate_every_n_epochs: 0,
            validate_every_n_steps: 0,
            max_validation_steps: 0,
            cache_latents: true,
            cache_latents_to_disk: false,
            cache_text_encoder_outputs: false,
            cache_text_encoder_outputs_to_disk: false,
            vae_batch_size: 1,
            skip_bad_images: true,
            network_algo: NetworkAlgo::Lora,
            lycoris_preset: "full".into(),
            network_dim: 8,
            network_alpha: 1.0,
            conv_dim: None,
            conv_alpha: None,
            factor: -1,
            unbalanced_factorization: false,
            full_matrix: false,
            decompose_both: false,
            block_size: 4,
            constraint: 1e-4,
            use_constraint: false,
            rescaled: false,
            dora_wd: false,
            wd_on_output: false,
            use_tucker: false,
            orthogonalize: false,
            rs_lora: false,
            use_scalar: false,
            train_norm: false,
            bypass_mode: false,
            train_on_input: false,
            network_dropout: 0.0,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            network_train_unet_only: false,
            network_train_text_encoder_only: false,
            optimizer_type: "AdamW".into(),
            optimizer_args: String::new(),
            max_grad_norm: 1.0,
            learning_rate: 1e-4,
            unet_lr: 0.0,
            text_encoder_lr: 0.0,
            lr_scheduler: "constant".into(),
            lr_warmup_steps: 0,
            lr_scheduler_num_cycles: 1,
            lr_scheduler_power: 1.0,
            weight_decay: 0.01,
            d_coef: 1.0,
            decouple: true,
            use_bias_correction: false,
            safeguard_warmup: false,
            relative_step: false,
            scale_parameter: false,
            warmup_init: false,
            loraplus_lr_ratio: 0.0,
            loraplus_unet_lr_ratio: 0.0,
            loraplus_text_encoder_lr_ratio: 0.0,
            max_train_epochs: 10,
            max_train_steps: 1600,
            gradient_accumulation_steps: 1,
            seed: 0,
            gradient_checkpointing: false,
            attention: "sdpa".into(),
            loss_type: "l2".into(),
            huber_schedule: "snr".into(),
            huber_c: 0.1,
            huber_scale: 1.0,
            min_snr_gamma: 0.0,
            v_pred_like_loss: 0.0,
            debiased_estimation_loss: false,
            scale_v_pred_loss_like_noise_pred: false,
            scale_weight_norms: 0.0,
            noise_offset: 0.0,
            adaptive_noise_scale: 0.0,
            multires_noise_iterations: 0,
            multires_noise_discount: 0.3,
            ip_noise_gamma: 0.0,
            noise_offset_random_strength: false,
            ip_noise_gamma_random_strength: false,
            zero_terminal_snr: false,
            min_timestep: 0,
            max_timestep: 1000,
            guidance_scale: 3.5,
            timestep_sampling: "sigma".into(),
            sigmoid_scale: 1.0,
            discrete_flow_shift: 3.0,
            model_prediction_type: "sigma_scaled".into(),
            weighting_scheme: "uniform".into(),
            logit_mean: 0.0,
            logit_std: 1.0,
            mode_scale: 1.29,
            t5xxl_max_token_length: 512,
            apply_t5_attn_mask: false,
            train_t5xxl: false,
            train_blocks: "all".into(),
            in_dims: String::new(),
            split_qkv: false,
            sample_prompts: String::new(),
            sample_sampler: "ddim".into(),
            sample_every_n_epochs: 0,
            sample_every_n_steps: 0,
            sample_at_first: false,
            output_name: "loft_lora".into(),
            output_dir: PathBuf::new(),
            save_model_as: "safetensors".into(),
            save_precision: "fp16".into(),
            save_every_n_epochs: 1,
            save_every_n_steps: 0,
            save_last_n_epochs: 0,
            save_last_n_steps: 0,
            save_state: false,
            save_last_n_epochs_state: 0,
            save_last_n_steps_state: 0,
            save_state_on_train_end: false,
            training_comment: String::new(),
            metadata_title: String::new(),
            metadata_author: String::new(),
            metadata_description: String::new(),
            metadata_license: String::new(),
            metadata_tags: String::new(),
            metadata_trigger_phrase: String::new(),
            no_metadata: false,
            logging_dir: PathBuf::new(),
            log_with: "auto".into(),
            log_prefix: String::new(),
            log_tracker_name: String::new(),
        }
    }
}

/// `base_weights`: a text of paths, one per line (blank lines skipped), or a list of paths.
fn paths_from_lines_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    use serde::de::Error;
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(text) => Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(PathBuf::from).collect()),
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(|v| v.as_str().map(PathBuf::from).ok_or_else(|| D::Error::custom(format!("base_weights: {v} is not a path"))))
            .collect(),
        other => Err(D::Error::custom(format!("base_weights: {other} is not a list of paths"))),
    }
}

/// `base_weights_multiplier`: one number, a text of numbers separated by commas or spaces, or
/// a list of numbers.
fn numbers_from_text_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    use serde::de::Error;
    let bad = |v: &dyn std::fmt::Display| D::Error::custom(format!("base_weights_multiplier: {v} is not a number"));
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Number(n) => Ok(vec![n.as_f64().ok_or_else(|| bad(&n))?]),
        serde_json::Value::String(text) => text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|t| !t.is_empty())
            .map(|t| t.parse::<f64>().map_err(|_| bad(&format!("{t:?}"))))
            .collect(),
        serde_json::Value::Array(items) => items.iter().map(|v| v.as_f64().ok_or_else(|| bad(v))).collect(),
        other => Err(bad(&other)),
    }
}

/// Registry keys this engine does not implement, with the value that means "off". A config
/// that sets one of them to anything else is refused, naming the key. Empty today: every
/// option the form offers trains. What the hardware cannot do (bf16 on the CPU) is refused
/// where the run meets the device, naming the reason.
pub const UNSUPPORTED_WHEN_SET: &[(&str, &str)] = &[];

/// A config problem, naming the key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { field: field.into(), message: message.into() }
}

/// Adds an error naming `key` unless `value` is one of `allowed`.
fn check_choice(errors: &mut Vec<ConfigError>, key: &str, value: &str, allowed: &[&str]) {
    if !allowed.contains(&value) {
        errors.push(err(key, format!("{value:?} is not one of {}", allowed.join(", "))));
    }
}

impl TrainConfig {
    /// Reads a resolved registry config (key → JSON value). Keys of
    /// [`UNSUPPORTED_WHEN_SET`] set to a non-off value are errors; other keys this engine has
    /// no use for (UI-only options such as data-loader workers) are ignored.
    pub fn from_map(map: &serde_json::Map<String, serde_json::Value>) -> Result<TrainConfig, Vec<ConfigError>> {
        let mut errors = vec![];
        for (key, off) in UNSUPPORTED_WHEN_SET {
            if let Some(v) = map.get(*key) {
                let off: serde_json::Value = serde_json::from_str(off).expect("valid off value");
                let is_off = match (v.as_f64(), off.as_f64()) {
                    (Some(a), Some(b)) => a == b,
                    _ => v == &off || v.is_null(),
                };
                if !is_off {
                    errors.push(err(key, format!("is set to {v}, but Loft's training engine does not support this option yet; leave it at {off}")));
                }
            }
        }
        let config = match TrainConfig::read_fields(map) {
            Ok(c) => c,
            Err(e) => {
                errors.push(e);
                return Err(errors);
            }
        };
        errors.extend(config.check_supported());
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }

    /// Reads the fields this engine knows from a resolved registry config, without checking that
    /// the run is possible: what the form uses to describe a draft (its network, say) before
    /// every required value is filled in. Training goes through [`TrainConfig::from_map`].
    pub fn read_fields(map: &serde_json::Map<String, serde_json::Value>) -> Result<TrainConfig, ConfigError> {
        let mut known = serde_json::Map::new();
        let fields = serde_json::to_value(TrainConfig::default()).expect("serializable");
        let fields = fields.as_object().expect("object");
        for (k, v) in map {
            if fields.contains_key(k) && !v.is_null() {
                known.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(serde_json::Value::Object(known)).map_err(|e| {
            // Our own readers start their messages with the key; serde's do not name it.
            let message = e.to_string();
            let field = message.split_once(':').map(|(k, _)| k).filter(|k| fields.contains_key(*k)).unwrap_or("config").to_string();
            err(&field, message)
        })
    }

    /// Checks that the run is one this engine can do, before any work.
    pub fn check_supported(&self) -> Vec<ConfigError> {
        let mut errors = vec![];
        if self.pretrained_model_name_or_path.as_os_str().is_empty() {
            errors.push(err("pretrained_model_name_or_path", "is required: a diffusers folder or a .safetensors checkpoint"));
        }
        if self.train_data_dir.as_os_str().is_empty() {
            errors.push(err("train_data_dir", "is required: a folder of N_name subfolders with images and captions"));
        }
        if self.output_dir.as_os_str().is_empty() {
            errors.push(err("output_dir", "is required"));
        }
        if self.save_model_as != "safetensors" {
            errors.push(err("save_model_as", format!("Loft writes safetensors only, not {:?}", self.save_model_as)));
        }
        if self.optimizer_type == "Prodigy" {
            let set = [
                ("loraplus_lr_ratio", self.loraplus_lr_ratio),
                ("loraplus_unet_lr_ratio", self.loraplus_unet_lr_ratio),
                ("loraplus_text_encoder_lr_ratio", self.loraplus_text_encoder_lr_ratio),
            ];
            if let Some((key, _)) = set.iter().find(|(_, r)| *r > 0.0) {
                errors.push(err(key, "LoRA+ gives the up matrices their own learning rate, and Prodigy needs one learning rate for every group (as in prodigyopt and sd-scripts); use another optimizer or leave it at 0"));
            }
        }
        let has_mask_dir = !self.conditioning_data_dir.as_os_str().is_empty();
        if self.masked_loss && !has_mask_dir && !self.alpha_mask {
            errors.push(err("masked_loss", "needs masks: set conditioning_data_dir (mask images named like the training images) or turn alpha_mask on"));
        }
        if has_mask_dir && !self.masked_loss {
            errors.push(err("conditioning_data_dir", "holds masks for masked loss, which is off: turn masked_loss on or clear this folder"));
        }
        if has_mask_dir && self.masked_loss && !self.conditioning_data_dir.is_dir() {
            errors.push(err("conditioning_data_dir", format!("{} is not a folder", self.conditioning_data_dir.display())));
        }
        if !matches!(self.log_with.as_str(), "auto" | "tensorboard") {
            errors.push(err("log_with", format!("is {:?}: Loft writes TensorBoard logs (\"tensorboard\", or \"auto\" = TensorBoard when logging_dir is set)", self.log_with)));
        }
        if !(0.0..1.0).contains(&self.validation_split) {
            errors.push(err("validation_split", format!("is {}: a share of the images from 0 (no validation) to below 1", self.validation_split)));
        }
        if !self.face_crop_aug_range.trim().is_empty() {
            if let Err(e) = crate::data::augment::parse_face_range(&self.face_crop_aug_range) {
                errors.push(err("face_crop_aug_range", e));
            } else if self.enable_bucket {
                errors.push(err("face_crop_aug_range", "crops around faces without buckets only (as in sd-scripts, which ignores it with buckets): turn enable_bucket off, or clear this"));
            }
        }
        if !self.base_weights.is_empty() && self.base_weights_multiplier.len() > self.base_weights.len() {
            errors.push(err(
                "base_weights_multiplier",
                format!("has {} values for {} base_weights files: give one per file, in the same order (a file without one is merged at 1.0)", self.base_weights_multiplier.len(), self.base_weights.len()),
            ));
        }
        if self.full_fp16 && self.full_bf16 {
            errors.push(err("full_bf16", "cannot be on together with full_fp16: the trained weights are either fp16 or bf16"));
        }
        for (key, on, wanted) in [("full_fp16", self.full_fp16, "fp16"), ("full_bf16", self.full_bf16, "bf16")] {
            if on && !["auto", wanted].contains(&self.mixed_precision.as_str()) {
                errors.push(err(key, format!("trains the network's weights in {wanted} and needs mixed_precision = \"{wanted}\" (sd-scripts asserts the same); it is {:?}", self.mixed_precision)));
            }
        }
        // torch's AdamW and prodigyopt keep their moments in the weights' dtype and Loft steps
        // fp16 weights the same way (the optimizer fixtures check it); with these two that
        // divides by zero at LoRA gradient sizes, so the run is refused before it starts.
        if self.full_fp16 && self.optimizer_type == "Prodigy" {
            errors.push(err("full_fp16", "cannot train with Prodigy: prodigyopt keeps its moments in the weights' dtype, and its d²-scaled second moment (d starts at 1e-6) and its eps·d underflow fp16 to zero, so the first step divides zero by zero; use AdamW8bit, Lion or Adafactor (they compute in f32), full_bf16 on a GPU, or leave full_fp16 off"));
        }
        if self.full_fp16 && self.optimizer_type == "AdamW" {
            let eps = crate::optim::parse_optimizer_args(&self.optimizer_args)
                .ok()
                .and_then(|a| a.get("eps").and_then(|e| e.parse::<f64>().ok()))
                .unwrap_or(crate::optim::AdamWConfig::default().eps);
            // Half of fp16's smallest subnormal: below it eps rounds to 0.
            if eps < 2f64.powi(-25) {
                errors.push(err("full_fp16", format!("cannot train with AdamW at eps {eps:e}: torch's AdamW keeps its moments in fp16, where eps rounds to 0 and a gradient below ~1e-3 squares to 0, so the step divides by zero (inf); use AdamW8bit, Lion or Adafactor (they compute in f32), set eps=1e-7 or more in optimizer_args, or leave full_fp16 off")));
            }
        }
        if self.weighted_captions && self.shuffle_caption {
            errors.push(err("weighted_captions", "cannot be combined with shuffle_caption: shuffling cuts captions at their commas, so a weighted phrase such as (red hair, blue eyes:1.2) would lose its brackets (sd-scripts warns of the same); turn one of them off"));
        }
        if self.token_warmup_step > 0.0 {
            errors.push(err("token_warmup_step", "token warm-up is not supported by Loft's engine yet; leave it at 0"));
        }
        if !["ddim", "euler", "k_euler"].contains(&self.sample_sampler.as_str()) && !self.sample_prompts.trim().is_empty() {
            errors.push(err("sample_sampler", format!("Loft samples with ddim or euler (k_euler), not {:?}", self.sample_sampler)));
        }
        if !["75", "150", "225"].contains(&self.max_token_length.as_str()) {
            errors.push(err("max_token_length", "must be 75, 150 or 225"));
        }
        if !["auto", "no", "fp16", "bf16"].contains(&self.mixed_precision.as_str()) {
            errors.push(err("mixed_precision", format!("{:?} is not one of auto, no, fp16, bf16", self.mixed_precision)));
        }
        let device_ok = match self.device.as_str() {
            "auto" | "cpu" | "cuda" => true,
            d => d.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok()),
        };
        if !device_ok {
            errors.push(err("device", format!("{:?} is not auto, cpu, cuda or cuda:N", self.device)));
        }
        if !["sdpa", "xformers", "mem_eff_attn", "none"].contains(&self.attention.as_str()) {
            errors.push(err("attention", format!("{:?} is not one of sdpa, xformers, mem_eff_attn, none", self.attention)));
        }
        if !["l2", "l1", "huber", "smooth_l1"].contains(&self.loss_type.as_str()) {
            errors.push(err("loss_type", format!("unknown loss {:?}", self.loss_type)));
        }
        if self.network_train_unet_only && self.network_train_text_encoder_only {
            errors.push(err("network_train_text_encoder_only", "cannot be on together with network_train_unet_only"));
        }
        if self.train_batch_size == 0 {
            errors.push(err("train_batch_size", "must be at least 1"));
        }
        if self.max_timestep <= self.min_timestep {
            errors.push(err("max_timestep", "must be greater than min_timestep"));
        }
        if let Err(e) = self.network_options().validate(self.network_algo) {
            errors.push(err("network_algo", e.to_string()));
        }
        errors.extend(self.check_flux());
        errors
    }

    /// For a Flux.1 family: the Flux options' values, the image sizes its 2×2 latent patches
    /// allow, and that no DDPM-only or convolution option is set (refused, not ignored).
    fn check_flux(&self) -> Vec<ConfigError> {
        let mut errors = vec![];
        let family = self.model_family.name();
        if !self.model_family.is_flux() {
            // Like every option hidden for a choice, the Flux options are not used for the
            // other families (the registry never sends them).
            return errors;
        }
        check_choice(&mut errors, "timestep_sampling", &self.timestep_sampling, &["sigma", "uniform", "sigmoid", "shift", "flux_shift"]);
        check_choice(&mut errors, "model_prediction_type", &self.model_prediction_type, &["raw", "additive", "sigma_scaled"]);
        // sd-scripts' "none" is its "uniform".
        check_choice(&mut errors, "weighting_scheme", &self.weighting_scheme, &["uniform", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap"]);
        check_choice(&mut errors, "train_blocks", &self.train_blocks, &["all", "single", "double"]);
        if let Err(e) = self.flux_in_dims() {
            errors.push(err("in_dims", e));
        }
        let positive = [("sigmoid_scale", self.sigmoid_scale), ("discrete_flow_shift", self.discrete_flow_shift), ("logit_std", self.logit_std)];
        for (key, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                errors.push(err(key, format!("is {v}: must be above 0")));
            }
        }
        if !(self.guidance_scale.is_finite() && self.guidance_scale >= 0.0) {
            errors.push(err("guidance_scale", format!("is {}: must be 0 or more", self.guidance_scale)));
        }
        if !(self.logit_mean.is_finite() && self.mode_scale.is_finite()) {
            errors.push(err(if self.logit_mean.is_finite() { "mode_scale" } else { "logit_mean" }, "must be a finite number"));
        }
        if self.t5xxl_max_token_length > 512 {
            errors.push(err("t5xxl_max_token_length", format!("is {}: T5-XXL takes at most 512 tokens", self.t5xxl_max_token_length)));
        }
        if self.train_t5xxl && self.network_train_unet_only {
            errors.push(err("train_t5xxl", "adapts T5-XXL, a text encoder, and network_train_unet_only is on: turn one of them off"));
        }
        // The latents (1/8 of the image) are cut into 2×2 patches: image sides must be
        // multiples of 16.
        if self.enable_bucket && self.bucket_reso_steps % 16 != 0 {
            errors.push(err("bucket_reso_steps", format!("is {}: Flux.1 packs the latents in 2×2 patches, so bucket sides must be multiples of 16 (sd-scripts asks for 32)", self.bucket_reso_steps)));
        }
        if !self.enable_bucket && self.resolution % 16 != 0 {
            errors.push(err("resolution", format!("is {}: Flux.1 packs the latents in 2×2 patches, so the image side must be a multiple of 16", self.resolution)));
        }
        // DDPM-only options: Flux is trained by flow matching, where they mean nothing
        // (sd-scripts' Flux trainer ignores them); refused rather than silently ignored.
        let ddpm_only = [
            ("v_parameterization", self.v_parameterization),
            ("clip_skip", self.clip_skip != 1),
            ("max_token_length", self.max_token_length != "75"),
            ("weighted_captions", self.weighted_captions),
            ("zero_terminal_snr", self.zero_terminal_snr),
            ("noise_offset", self.noise_offset != 0.0),
            ("adaptive_noise_scale", self.adaptive_noise_scale != 0.0),
            ("noise_offset_random_strength", self.noise_offset_random_strength),
            ("multires_noise_iterations", self.multires_noise_iterations != 0),
            ("min_snr_gamma", self.min_snr_gamma != 0.0),
            ("v_pred_like_loss", self.v_pred_like_loss != 0.0),
            ("debiased_estimation_loss", self.debiased_estimation_loss),
            ("scale_v_pred_loss_like_noise_pred", self.scale_v_pred_loss_like_noise_pred),
            ("min_timestep", self.min_timestep != 0),
            ("max_timestep", self.max_timestep != 1000),
        ];
        for (key, _) in ddpm_only.iter().filter(|(_, on)| *on) {
            errors.push(err(key, format!("is a DDPM (Stable Diffusion) option with no meaning for {family}, which trains by flow matching: leave it at its default (the Flux group has Flux's timestep and loss options)")));
        }
        if matches!(self.loss_type.as_str(), "huber" | "smooth_l1") && self.huber_schedule == "snr" {
            errors.push(err("huber_schedule", "snr needs a DDPM noise schedule's SNR, which Flux.1 has not (sd-scripts refuses it too): use exponential or constant"));
        }
        if self.network_algo == NetworkAlgo::Locon {
            errors.push(err("network_algo", "kohya LoCon adds adapters to convolutions, and the Flux.1 transformer has none: use lora"));
        }
        for (key, on) in [("conv_dim", self.conv_dim.is_some()), ("conv_alpha", self.conv_alpha.is_some()), ("use_tucker", self.use_tucker)] {
            if on {
                errors.push(err(key, "applies to convolutions, and the Flux.1 transformer has none: leave it unset"));
            }
        }
        errors
    }

    /// The flow-matching settings of a Flux run.
    /// `in_dims` as five ranks `[img, time, vector, guidance, txt]` (all 0 when empty).
    pub fn flux_in_dims(&self) -> Result<[usize; 5], String> {
        let text = self.in_dims.trim().trim_start_matches('[').trim_end_matches(']');
        if text.trim().is_empty() {
            return Ok([0; 5]);
        }
        let dims: Vec<usize> = text
            .split(',')
            .map(|d| d.trim().parse::<usize>().map_err(|_| format!("is {:?}: five ranks like [4,0,0,0,4] (img, time, vector, guidance, txt)", self.in_dims)))
            .collect::<Result<_, _>>()?;
        <[usize; 5]>::try_from(dims).map_err(|d| format!("has {} ranks: give five (img, time, vector, guidance, txt)", d.len()))
    }

    pub fn flow_options(&self) -> crate::flow::FlowOptions {
        crate::flow::FlowOptions {
            timestep_sampling: self.timestep_sampling.clone(),
            sigmoid_scale: self.sigmoid_scale,
            discrete_flow_shift: self.discrete_flow_shift,
            weighting_scheme: self.weighting_scheme.clone(),
            logit_mean: self.logit_mean,
            logit_std: self.logit_std,
            mode_scale: self.mode_scale,
            model_prediction_type: self.model_prediction_type.clone(),
        }
    }

    /// The adapter options the network modules take.
    pub fn network_options(&self) -> NetworkOptions {
        NetworkOptions {
            dim: self.network_dim,
            alpha: self.network_alpha,
            conv_dim: self.conv_dim,
            conv_alpha: self.conv_alpha,
            dropout: self.network_dropout,
            rank_dropout: self.rank_dropout,
            module_dropout: self.module_dropout,
            dora_wd: self.dora_wd,
            wd_on_output: self.wd_on_output,
            use_tucker: self.use_tucker,
            orthogonalize: self.orthogonalize,
            rs_lora: self.rs_lora,
            train_norm: self.train_norm,
            use_scalar: self.use_scalar,
            bypass_mode: self.bypass_mode,
            train_on_input: self.train_on_input,
            factor: self.factor,
            unbalanced_factorization: self.unbalanced_factorization,
            full_matrix: self.full_matrix,
            decompose_both: self.decompose_both,
            block_size: self.block_size,
            constraint: if self.use_constraint { self.constraint } else { 0.0 },
            rescaled: self.rescaled,
            seed: self.seed,
            ..NetworkOptions::default()
        }
    }

    /// What ComfyUI, A1111/Forge and diffusers will make of the file this run writes, and whether
    /// converting it to a plain LoRA afterwards would help (the Network tab shows this before
    /// training).
    pub fn client_verdicts(&self) -> (Vec<crate::lora_file::compat::Verdict>, bool) {
        use crate::lora_file::compat;
        let edge = crate::train::network::adapts_edge_modules(self.network_algo, &self.lycoris_preset, self.trains_unet());
        let opts = self.network_options();
        let verdicts = compat::of_config(self.network_algo, &opts, edge);
        let convert = compat::needs_conversion(&verdicts, &compat::config_traits(self.network_algo, &opts, edge));
        (verdicts, convert)
    }

    /// The prompt length in tokens.
    pub fn max_tokens(&self) -> usize {
        self.max_token_length.parse().unwrap_or(75)
    }

    /// `face_crop_aug_range` as (min, max), when set and valid.
    pub fn face_crop_range(&self) -> Option<(f64, f64)> {
        if self.face_crop_aug_range.trim().is_empty() {
            return None;
        }
        crate::data::augment::parse_face_range(&self.face_crop_aug_range).ok()
    }

    /// The UNet learning rate (`unet_lr`, else `learning_rate`).
    pub fn unet_learning_rate(&self) -> f64 {
        if self.unet_lr > 0.0 {
            self.unet_lr
        } else {
            self.learning_rate
        }
    }

    /// The text-encoder learning rate (`text_encoder_lr`, else `learning_rate`).
    pub fn text_encoder_learning_rate(&self) -> f64 {
        if self.text_encoder_lr > 0.0 {
            self.text_encoder_lr
        } else {
            self.learning_rate
        }
    }

    /// Whether text-encoder adapters are trained.
    pub fn trains_text_encoder(&self) -> bool {
        !self.network_train_unet_only
    }

    /// Whether UNet adapters are trained.
    pub fn trains_unet(&self) -> bool {
        !self.network_train_text_encoder_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bad_device_precision_and_attention_are_named() {
        let map = json!({
            "pretrained_model_name_or_path": "/m", "train_data_dir": "/d", "output_dir": "/o",
            "device": "gpu", "mixed_precision": "fp8", "attention": "flash",
        });
        let errors = TrainConfig::from_map(map.as_object().unwrap()).unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["mixed_precision", "device", "attention"], "{errors:?}");
        let ok = json!({"pretrained_model_name_or_path": "/m", "train_data_dir": "/d", "output_dir": "/o", "device": "cuda:1"});
        assert!(TrainConfig::from_map(ok.as_object().unwrap()).is_ok());
    }

    #[test]
    fn reads_registry_keys_and_refuses_unsupported_options() {
        let map = json!({
            "pretrained_model_name_or_path": "/m", "train_data_dir": "/d", "output_dir": "/o",
            "network_algo": "lokr", "network_dim": 16, "factor": 8, "learning_rate": 0.001,
            "model_family": "sdxl", "attention": "sdpa", "conv_dim": null
        });
        let c = TrainConfig::from_map(map.as_object().unwrap()).unwrap();
        assert_eq!(c.network_algo, NetworkAlgo::Lokr);
        assert_eq!(c.model_family, ModelFamily::Sdxl);
        assert_eq!((c.network_dim, c.factor, c.conv_dim), (16, 8, None));

        let map = json!({"pretrained_model_name_or_path": "/m", "train_data_dir": "/d", "output_dir": "/o",
                         "full_fp16": true, "mixed_precision": "no"});
        let errs = TrainConfig::from_map(map.as_object().unwrap()).unwrap_err();
        assert!(errs.iter().any(|e| e.field == "full_fp16" && e.message.contains("mixed_precision = \"fp16\"")), "{errs:?}");
        let map = json!({"pretrained_model_name_or_path": "/m", "train_data_dir": "/d", "output_dir": "/o", "network_dim": "eight"});
        let errs = TrainConfig::from_map(map.as_object().unwrap()).unwrap_err();
        assert!(errs.iter().any(|e| e.message.contains("network_dim") || e.message.contains("invalid type")), "{errs:?}");

        let errs = TrainConfig::from_map(&serde_json::Map::new()).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["pretrained_model_name_or_path", "train_data_dir", "output_dir"]);
    }
}
