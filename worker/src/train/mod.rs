//! The training loop: a [`TrainConfig`] in, [`TrainEvent`]s out, kohya/LyCORIS network files
//! at the end of epochs and of the run.
//!
//! [`run`] reads top to bottom as sd-scripts' `train_network.py` does:
//! 1. load the model and freeze it; build the noise schedule;
//! 2. read the dataset and assign buckets; cache the VAE latents;
//! 3. attach the network's adapters to the selected layers;
//! 4. build the optimizer and the learning-rate schedule; resume from a saved state if asked;
//! 5. for each epoch, for each batch: captions → text states, latents → noise → the model's
//!    prediction → loss → gradients; every `gradient_accumulation_steps` batches one optimizer
//!    step; report; save and sample when due; stop when cancelled;
//! 6. save the final file.
//!
//! Every random draw is seeded from (seed, epoch, batch), so a run on CPU is deterministic and
//! a resumed run continues with exactly the numbers the uninterrupted run would have used.

pub mod config;
pub mod data;
pub mod events;
pub mod network;
pub mod param_groups;
pub mod preflight;
pub mod start_weights;
pub mod state;
pub mod tensorboard;
pub mod validation;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

pub use config::{ConfigError, TrainConfig};
pub use events::{CancelToken, CheckpointKind, EventLog, EventSink, TrainEvent};

use crate::data::images::Augment;
use crate::data::{process_caption, CaptionOptions};
use crate::grad_checkpoint::GradientCheckpointing;
use crate::lora_file::{parse_save_precision, BaseModelVersion, NetworkMetadata};
use crate::models::pipeline::{PromptEmbeds, StableDiffusion};
use crate::models::vae::AutoencoderKL;
use crate::networks::NetworkOptions;
use crate::models::ModelFamily;
use crate::noise::{diffusion_loss, sample_noise, sample_timesteps, LossOptions, NoiseOptions, NoiseSchedule};
use crate::optim::loss_scale::LossScale;
use crate::optim::{self, clip_grad_norm, GradAccumulator};
use crate::sample::{parse_prompts, sample_image, save_png, SampleRequest, Sampler};
use crate::schedule::{LrSchedule, ScheduleConfig, SchedulerKind};
use data::{derived_seed, LatentCache, TrainSet, SEED_STEP};
use network::Network;

const SEED_CAPTION: u64 = 3;

/// How to run a job (not part of the saved config).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Continue from the newest training state in `output_dir` (if there is one).
    pub resume: bool,
    /// The device to compute on; `None` = the config's `device` (auto, cpu, cuda, cuda:N).
    pub device: Option<Device>,
    /// Where VAE latents are cached on disk (shared across runs and jobs); `None` =
    /// `output_dir/.cache/latents` when `cache_latents_to_disk`, memory only otherwise.
    pub cache_dir: Option<PathBuf>,
    /// Stop (as if cancelled, without the cancel state) after this many optimizer steps of
    /// this run: tests use it to interrupt a run at a known point.
    pub stop_after_steps: Option<u64>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { resume: false, device: None, cache_dir: None, stop_after_steps: None }
    }
}

/// What a finished run produced.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutcome {
    pub final_step: u64,
    /// The final network file (`None` when stopped before the end).
    pub network_file: Option<PathBuf>,
    pub cancelled: bool,
}

/// Runs a training job to the end, or until `cancel`. Errors are also reported as a
/// [`TrainEvent::Failed`].
pub fn run(config: &TrainConfig, options: &RunOptions, sink: &mut dyn EventSink, cancel: &CancelToken) -> Result<TrainOutcome> {
    match run_inner(config, options, sink, cancel) {
        Ok(o) => Ok(o),
        Err(e) => {
            sink.emit(TrainEvent::Failed { error: format!("{e:#}") });
            Err(e)
        }
    }
}

fn log(sink: &mut dyn EventSink, level: &str, message: impl Into<String>) {
    sink.emit(TrainEvent::Log { level: level.into(), message: message.into() });
}

/// The settings a state must share with the run resuming it.
fn fingerprint(cfg: &TrainConfig) -> String {
    let key = format!(
        "{}|{}|{}|{}|{}|{}|{}|{}|{}",
        cfg.network_algo.name(),
        cfg.network_dim,
        cfg.lycoris_preset,
        cfg.optimizer_type,
        cfg.train_batch_size,
        cfg.gradient_accumulation_steps,
        cfg.seed,
        cfg.train_data_dir.display(),
        cfg.pretrained_model_name_or_path.display()
    );
    // The split changes which images train; runs without one keep their old fingerprints.
    let key = if cfg.validation_split > 0.0 { format!("{key}|validation={}:{}", cfg.validation_split, data::validation_seed(cfg)) } else { key };
    crate::lora_file::sha256_hex(key.as_bytes())[..16].to_string()
}

fn run_inner(config: &TrainConfig, options: &RunOptions, sink: &mut dyn EventSink, cancel: &CancelToken) -> Result<TrainOutcome> {
    // `network_weights` first: with `dim_from_weights` the file decides the ranks everything
    // below (metadata included) uses.
    let start_file = start_weights::load_network_weights(config)?;
    let with_file_dims;
    let cfg = match &start_file {
        Some(file) if config.dim_from_weights => {
            with_file_dims = start_weights::with_dims_from(config, file)?;
            &with_file_dims
        }
        _ => config,
    };
    let problems = cfg.check_supported();
    if !problems.is_empty() {
        bail!("invalid config: {}", problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "));
    }
    // With a logging_dir every event's scalars also go to a TensorBoard event file (opened
    // after the checks, so a config that cannot run leaves no log folder behind).
    let mut logged = tensorboard::TensorBoardSink::open(cfg, &mut *sink)?;
    let sink: &mut dyn EventSink = match logged.as_mut() {
        Some(l) => l,
        None => sink,
    };
    let (device, device_line) = match &options.device {
        Some(d) => (d.clone(), format!("device: {}", crate::device::describe(d))),
        None => crate::device::select(&cfg.device).map_err(|e| anyhow::anyhow!("device: {e:#}"))?,
    };
    log(sink, "info", device_line);
    let started_at = unix_now();

    // ---- 1. The model, frozen, and the noise schedule.
    // Mixed precision: the frozen model is stored and computes in fp16/bf16; the trained
    // variables stay f32 unless full_fp16/full_bf16 (each adapter casts them for its call, as
    // autocast does), the loss is
    // computed in f32, and fp16 scales the loss so small gradients survive the half backward.
    // `auto` follows the device: bf16 where the GPU has it, fp16 on older GPUs, f32 on the CPU.
    let mixed_precision: &'static str = match cfg.mixed_precision.as_str() {
        "auto" => crate::device::preferred_mixed_precision(&device),
        "no" => "no",
        "fp16" => "fp16",
        "bf16" => "bf16",
        other => bail!("mixed_precision = {other:?}: expected \"auto\", \"no\", \"fp16\" or \"bf16\""),
    };
    log(sink, "info", format!("mixed precision: {mixed_precision}"));
    let dtype = match mixed_precision {
        "fp16" => DType::F16,
        "bf16" if device.is_cpu() => {
            bail!("mixed_precision = \"bf16\": candle's CPU backend cannot multiply bf16 matrices; use \"fp16\", \"no\" or \"auto\" on the CPU")
        }
        "bf16" => DType::BF16,
        _ => DType::F32,
    };
    // full_fp16 / full_bf16: the trained tensors (and the optimizer's states) in the half dtype
    // too, as sd-scripts' `network.to(weight_dtype)`; fp16 keeps the loss scale below.
    let param_dtype = match (cfg.full_fp16, cfg.full_bf16) {
        (false, false) => None,
        (fp16, _) => {
            let (key, wanted) = if fp16 { ("full_fp16", DType::F16) } else { ("full_bf16", DType::BF16) };
            if dtype != wanted {
                let why = if wanted == DType::BF16 && device.is_cpu() { " (the CPU backend has no bf16 matrix multiply: full_bf16 needs a GPU)" } else { "" };
                bail!("{key} trains the network in {} and needs mixed precision in it, but mixed_precision {:?} is {mixed_precision:?} on this device{why}", wanted.as_str(), cfg.mixed_precision);
            }
            log(sink, "info", format!("{key}: the network's weights, gradients and optimizer states in {}", wanted.as_str()));
            Some(wanted)
        }
    };
    if device.is_cpu() && dtype == DType::F16 {
        log(sink, "info", "mixed_precision fp16 on the CPU halves the model's memory but runs slower than \"no\" (most CPUs have no fp16 arithmetic)");
    }
    // Flux's transformer is read straight into fp8 with fp8_base (a 12B model never exists in
    // 16 bits); the other parts are cast below, as for the UNet families.
    let frozen_dtype = (cfg.fp8_base && cfg.model_family.is_flux() && dtype != DType::F32).then_some(DType::F8E4M3);
    let some = |p: &Path| (!p.as_os_str().is_empty()).then(|| p.to_path_buf());
    // Flux's parts as sd-scripts' separate files (`vae` is its `ae`).
    let flux_files = if cfg.model_family.is_flux() {
        crate::models::pipeline::FluxFiles { clip_l: some(&cfg.clip_l), t5xxl: some(&cfg.t5xxl), ae: some(&cfg.vae) }
    } else {
        crate::models::pipeline::FluxFiles::default()
    };
    let mut model = StableDiffusion::load_with(&cfg.pretrained_model_name_or_path, &flux_files, dtype, &device, frozen_dtype)
        .with_context(|| format!("pretrained_model_name_or_path {}", cfg.pretrained_model_name_or_path.display()))?;
    if model.family != cfg.model_family {
        bail!(
            "model_family is {} but {} is an {} model",
            cfg.model_family.name(),
            cfg.pretrained_model_name_or_path.display(),
            model.family.name()
        );
    }
    model.denoiser.set_memory_efficient_attention(cfg.attention != "none");
    // base_weights are merged before train_blocks narrows the layers offered to the network.
    if let Some(line) = start_weights::merge_base_weights(&mut model, cfg)? {
        log(sink, "info", line);
    }
    if let Some(text) = model.flux_text.as_mut() {
        if cfg.t5xxl_max_token_length > 0 {
            text.max_length = cfg.t5xxl_max_token_length;
        }
        text.apply_mask = cfg.apply_t5_attn_mask;
        text.trainable = cfg.train_t5xxl;
        text.train_blocks = cfg.train_blocks.clone();
        text.input_dims = cfg.flux_in_dims().map_err(|e| anyhow::anyhow!("in_dims {e}"))?;
        text.split_qkv = cfg.split_qkv;
    }
    let flow = cfg.model_family.is_flux().then(|| cfg.flow_options());
    if let Some(flow) = &flow {
        flow.check()?;
    }
    if cfg.fp8_base {
        // As sd-scripts: fp8 storage, fp16/bf16 computation (after any base_weights merge).
        if dtype == DType::F32 {
            bail!("fp8_base stores the frozen model in fp8 and computes in fp16 or bf16: set mixed_precision to \"fp16\" (or \"bf16\" on a GPU); it is {mixed_precision:?} now");
        }
        let n = model.store_frozen_weights_in(DType::F8E4M3)?;
        let what = if model.family.is_flux() { "transformer" } else { "U-Net" };
        log(sink, "info", format!("fp8_base: {n} frozen Linear/Conv2d weights of the {what} and text encoders stored as float8 e4m3"));
    }
    let vae_dtype = if cfg.no_half_vae { DType::F32 } else { dtype };
    if !cfg.vae.as_os_str().is_empty() && !cfg.model_family.is_flux() {
        model.vae = AutoencoderKL::from_diffusers_dir(&cfg.vae, vae_dtype, &device).with_context(|| format!("vae {}", cfg.vae.display()))?;
    } else if vae_dtype != dtype {
        model.reload_vae(vae_dtype).context("no_half_vae: loading the VAE in f32")?;
    }
    let v_prediction = cfg.v_parameterization || model.scheduler.v_prediction();
    let schedule = NoiseSchedule::new(&model.scheduler, v_prediction, cfg.zero_terminal_snr)?;
    if cfg.max_timestep > schedule.num_timesteps() {
        bail!("max_timestep {} is past the model's {} timesteps", cfg.max_timestep, schedule.num_timesteps());
    }

    // ---- 2. The dataset and its latents.
    let set = TrainSet::load(cfg)?;
    for b in &set.bad {
        log(sink, "warn", format!("skipped {}: {}", b.path.display(), b.reason));
    }
    let caption_opts = CaptionOptions {
        caption_prefix: cfg.caption_prefix.clone(),
        caption_suffix: cfg.caption_suffix.clone(),
        caption_separator: cfg.caption_separator.clone(),
        secondary_separator: cfg.secondary_separator.clone(),
        shuffle_caption: cfg.shuffle_caption,
        keep_tokens: cfg.keep_tokens,
        keep_tokens_separator: cfg.keep_tokens_separator.clone(),
        caption_dropout_rate: cfg.caption_dropout_rate,
        caption_dropout_every_n_epochs: cfg.caption_dropout_every_n_epochs,
        caption_tag_dropout_rate: cfg.caption_tag_dropout_rate,
        enable_wildcard: cfg.enable_wildcard,
        ..CaptionOptions::default()
    };
    let cache_dir = if cfg.cache_latents_to_disk {
        Some(options.cache_dir.clone().unwrap_or_else(|| cfg.output_dir.join(".cache/latents")))
    } else {
        options.cache_dir.clone()
    };
    let vae_id = format!("{}|{}|{:?}", cfg.pretrained_model_name_or_path.display(), cfg.vae.display(), vae_dtype);
    // Augmentations that change an image every time it is used leave nothing to cache.
    let augment = Augment {
        random_crop: cfg.random_crop,
        color_aug: cfg.color_aug,
        face_crop: if cfg.enable_bucket { None } else { cfg.face_crop_range() },
    };
    let use_latent_cache = cfg.cache_latents && augment == Augment::default();
    if cfg.cache_latents && !use_latent_cache {
        let set: Vec<&str> = [("random_crop", augment.random_crop), ("color_aug", augment.color_aug), ("face_crop_aug_range", augment.face_crop.is_some())]
            .into_iter()
            .filter_map(|(name, on)| on.then_some(name))
            .collect();
        log(sink, "info", format!("latents are encoded every step: {} change the image each time", set.join(", ")));
    }
    let mut latent_cache = LatentCache::new(if use_latent_cache { cache_dir } else { None }, vae_id)?;
    if use_latent_cache {
        let flips: &[bool] = if cfg.flip_aug { &[false, true] } else { &[false] };
        for img in &set.images {
            for &flip in flips {
                latent_cache.latents(&model.vae, img, flip, &device)?;
            }
        }
        for img in &set.validation {
            latent_cache.latents(&model.vae, img, false, &device)?;
        }
        log(sink, "info", format!("latents: {} cached, {} encoded", latent_cache.hits, latent_cache.misses));
    }

    // ---- 3. The network.
    let net_opts = NetworkOptions { param_dtype, ..cfg.network_options() };
    let start_state = match &start_file {
        Some(file) => {
            let (state, unmatched) = start_weights::adapter_state(cfg, &model, file, &device, cfg.dim_from_weights)?;
            let mut line = format!("network_weights: {} modules from {}", state.len(), cfg.network_weights.display());
            if let Some(first) = unmatched.first() {
                line += &format!("; {} match no layer of this model (first: {first})", unmatched.len());
            }
            log(sink, "info", line);
            Some(state)
        }
        None => None,
    };
    let network = Network::attach_with(
        &model,
        cfg.network_algo,
        &net_opts,
        &cfg.lycoris_preset,
        cfg.trains_unet(),
        cfg.trains_text_encoder(),
        start_state.as_ref(),
    )?;
    let train_te = !network.trainable(false).is_empty();
    if let Some((first, why)) = network.skipped.first() {
        log(sink, "warn", format!("{} layers left without an adapter, e.g. {first}: {why}", network.skipped.len()));
    }
    log(sink, "info", format!("{}: {} modules, {} trained parameters", cfg.network_algo.name(), network.adapters.len(), network.parameter_count()));

    // ---- 4. Optimizer, schedule, and where to start.
    let batches_per_epoch = set.epoch_batches(cfg, 0).len();
    let accum = cfg.gradient_accumulation_steps.max(1);
    let steps_per_epoch = batches_per_epoch.div_ceil(accum) as u64;
    let (total_steps, total_epochs) = if cfg.max_train_epochs > 0 {
        (cfg.max_train_epochs * steps_per_epoch, cfg.max_train_epochs)
    } else {
        (cfg.max_train_steps, cfg.max_train_steps.div_ceil(steps_per_epoch))
    };
    let (groups, loraplus_warning) = param_groups::build(cfg, &network);
    if let Some(warning) = loraplus_warning {
        log(sink, "warn", warning);
    }
    let group_records = param_groups::GroupRecord::of(&groups);
    if groups.iter().any(|g| g.name.ends_with("_plus")) {
        let list: Vec<String> = groups.iter().map(|g| format!("{} ({} tensors, lr {:e})", g.name, g.params.len(), g.lr)).collect();
        log(sink, "info", format!("LoRA+ parameter groups: {}", list.join(", ")));
    }
    let mut optimizer = optim::build(&cfg.optimizer_type, groups, &optimizer_args(cfg)?)?;
    let lr_schedule = LrSchedule::new(ScheduleConfig {
        lr_scheduler: SchedulerKind::parse(&cfg.lr_scheduler)?,
        lr_warmup_steps: cfg.lr_warmup_steps,
        max_train_steps: total_steps,
        lr_scheduler_num_cycles: cfg.lr_scheduler_num_cycles.max(1),
        lr_scheduler_power: cfg.lr_scheduler_power,
        learning_rate: cfg.learning_rate,
        lr_end: 1e-7,
    })?;
    let vars = network.all_trainable();
    let mut progress = state::Progress {
        step: 0,
        epoch: 0,
        batch: 0,
        recent_losses: vec![],
        saved_epoch_files: vec![],
        saved_step_files: vec![],
        fingerprint: fingerprint(cfg),
        loss_scale: (dtype == DType::F16).then(LossScale::default),
        groups: group_records,
        last_validation: None,
    };
    if options.resume {
        if let Some(dir) = state::list(&cfg.output_dir).pop() {
            let loaded = state::load(&dir, &device)?;
            if loaded.progress.fingerprint != progress.fingerprint {
                bail!("resume: the state in {} was saved by a run with other network/data settings", dir.display());
            }
            // The optimizer state follows the groups (Prodigy's and Adafactor's scalars are per
            // group): another layout (LoRA+ switched on or off, a part added) cannot resume. A
            // changed learning rate or ratio can, as before; the log says so. States written
            // before the groups were recorded have none to compare.
            let saved = &loaded.progress.groups;
            let layout = |g: &[param_groups::GroupRecord]| g.iter().map(|g| (g.name.clone(), g.params)).collect::<Vec<_>>();
            let show = |g: &[param_groups::GroupRecord]| g.iter().map(|g| format!("{} (lr {:e}, {} tensors)", g.name, g.lr, g.params)).collect::<Vec<_>>().join(", ");
            if !saved.is_empty() && layout(saved) != layout(&progress.groups) {
                bail!(
                    "resume: the state in {} was saved with the optimizer groups {}, this run has {} (LoRA+ switched on or off, or other parts trained)",
                    dir.display(),
                    show(saved),
                    show(&progress.groups)
                );
            }
            if !saved.is_empty() && saved != &progress.groups {
                log(sink, "info", format!("resuming with the learning rates {} (the state was saved with {})", show(&progress.groups), show(saved)));
            }
            state::restore_vars(&vars, &loaded.network, &dir)?;
            optimizer.load_state(&loaded.optimizer).with_context(|| format!("resume: optimizer state in {}", dir.display()))?;
            progress = loaded.progress;
            if dtype == DType::F16 && progress.loss_scale.is_none() {
                progress.loss_scale = Some(LossScale::default());
            }
            log(sink, "info", format!("resumed from {} (step {}, epoch {})", dir.display(), progress.step, progress.epoch + 1));
        } else {
            log(sink, "info", "resume: no saved state yet, starting from the beginning");
        }
    }
    sink.emit(TrainEvent::Started { total_steps, total_epochs, start_step: progress.step, steps_per_epoch, images: set.images.len() });

    let sampler = Sampler::parse(&cfg.sample_sampler).unwrap_or(Sampler::Ddim);
    // Flux samples without a negative pass (CFG 1) unless a prompt asks (`--l`), as sd-scripts.
    let sample_defaults = SampleRequest {
        width: cfg.resolution,
        height: cfg.resolution,
        cfg: if cfg.model_family.is_flux() { 1.0 } else { 7.0 },
        ..SampleRequest::new("")
    };
    let sample_requests = parse_prompts(&cfg.sample_prompts, &sample_defaults).context("sample_prompts")?;
    let loss_opts = LossOptions {
        loss_type: cfg.loss_type.clone(),
        huber_schedule: cfg.huber_schedule.clone(),
        huber_c: cfg.huber_c,
        huber_scale: cfg.huber_scale,
        min_snr_gamma: cfg.min_snr_gamma,
        scale_v_pred_loss_like_noise_pred: cfg.scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss: cfg.v_pred_like_loss,
        debiased_estimation_loss: cfg.debiased_estimation_loss,
    };
    // Flux with cache_text_encoder_outputs: T5's states of every caption and sample prompt are
    // computed once and T5-XXL is freed (sd-scripts' caching; ~9 GB of bf16 weights).
    if cfg.model_family.is_flux() && cfg.cache_text_encoder_outputs {
        if network.adapters.iter().any(|a| a.kohya_name.starts_with("lora_te3_")) {
            bail!("cache_text_encoder_outputs frees T5-XXL, which train_t5xxl trains: turn one of them off");
        }
        if let Some(key) = caption_variation(cfg) {
            bail!("cache_text_encoder_outputs needs captions that never change, and {key} changes them: turn one of them off");
        }
        let mut rng = StdRng::seed_from_u64(0);
        let mut prompts: Vec<String> = set.images.iter().chain(&set.validation).map(|img| process_caption(&caption_opts, &img.entry.caption, 1, 0, &mut rng)).collect();
        prompts.extend(sample_requests.iter().flat_map(|r| [r.prompt.clone(), r.negative.clone()]));
        prompts.sort();
        prompts.dedup();
        let n = model.cache_t5_and_drop(&prompts)?;
        log(sink, "info", format!("cache_text_encoder_outputs: T5-XXL states of {n} captions and sample prompts cached; T5-XXL freed"));
    }
    let ctx = RunContext {
        cfg,
        model: &model,
        schedule: &schedule,
        network: &network,
        set: &set,
        started_at,
        mixed_precision,
        dtype,
        loss_opts,
        sampler,
        sample_requests,
        flow: flow.clone(),
    };
    if cfg.sample_at_first && progress.step == 0 && !options.resume {
        ctx.write_samples(sink, 0, 0)?;
    }

    // ---- 5. The loop.
    // Flux (sd-scripts' flux_train_network) draws plain Gaussian noise: no offset or pyramid.
    let ddpm = !cfg.model_family.is_flux();
    let noise_opts = NoiseOptions {
        noise_offset: if ddpm { cfg.noise_offset } else { 0.0 },
        noise_offset_random_strength: cfg.noise_offset_random_strength,
        adaptive_noise_scale: cfg.adaptive_noise_scale,
        multires_noise_iterations: if ddpm { cfg.multires_noise_iterations } else { 0 },
        multires_noise_discount: cfg.multires_noise_discount,
        ip_noise_gamma: cfg.ip_noise_gamma,
        ip_noise_gamma_random_strength: cfg.ip_noise_gamma_random_strength,
    };
    // Text states of fixed captions, when the text encoder is frozen and captions never vary.
    let captions_vary = caption_variation(cfg).is_some();
    let cache_text = !train_te && !captions_vary;
    let mut text_cache: HashMap<String, PromptEmbeds> = HashMap::new();
    let trained_vars: Vec<candle_core::Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let mut accumulator = GradAccumulator::new(trained_vars.clone());
    let mut recent: VecDeque<f64> = progress.recent_losses.iter().copied().collect();
    let window = (steps_per_epoch as usize).max(1);
    let run_start = Instant::now();
    let first_step = progress.step;
    let mut micro_losses: Vec<f64> = vec![];
    let checkpointing = if cfg.gradient_checkpointing { Some(GradientCheckpointing::new(&device, &trained_vars)?) } else { None };

    let mut validation = validation::Validation::new(cfg, &set.validation, &caption_opts);
    if let Some(v) = &validation {
        log(
            sink,
            "info",
            format!("validation: {} images held out, {} batches at timesteps {:?} per evaluation", set.validation.len(), v.batches(), v.timesteps),
        );
    } else if cfg.validation_split > 0.0 {
        log(sink, "warn", format!("validation_split {}: no image held out (each subset keeps at least one training image); no validation loss", cfg.validation_split));
    }

    network.set_training(true);
    while progress.epoch < total_epochs && progress.step < total_steps {
        let epoch = progress.epoch;
        let batches = set.epoch_batches(cfg, epoch);
        while progress.batch < batches.len() && progress.step < total_steps {
            let bi = progress.batch;
            let batch = &batches[bi];
            let mut rng = StdRng::seed_from_u64(derived_seed(cfg.seed, SEED_STEP, epoch, bi as u64));
            let mut caption_rng = StdRng::seed_from_u64(derived_seed(cfg.seed, SEED_CAPTION, epoch, bi as u64));

            // Captions → text-encoder states.
            let captions: Vec<String> = batch
                .iter()
                .map(|it| process_caption(&caption_opts, &set.images[it.image].entry.caption, epoch as u32 + 1, progress.step, &mut caption_rng))
                .collect();
            // With gradient checkpointing, the blocks of a trained model keep only their
            // inputs and outputs here and are recomputed in the backward.
            let embeds = match &checkpointing {
                Some(c) if train_te => c.forward(|| ctx.text_states(&captions, cache_text, &mut text_cache))?,
                _ => ctx.text_states(&captions, cache_text, &mut text_cache)?,
            };

            // Images → latents (and loss masks) → noise at random timesteps → the model's
            // prediction → the loss.
            let images: Vec<(&data::TrainImage, bool)> = batch.iter().map(|it| (&set.images[it.image], it.flip)).collect();
            let (latents, masks) = ctx.encode_batch(&images, use_latent_cache, &augment, &mut latent_cache, &mut rng, &device)?;
            let (noise, applied_noise) = sample_noise(&noise_opts, &latents, &mut rng)?;
            // DDPM: integer timesteps; Flux: σ ∈ (0, 1) from the flow's sampling scheme.
            let (timesteps, sigmas) = match &flow {
                Some(flow) => {
                    let (_, _, h, w) = latents.dims4()?;
                    let sigmas = flow.sigmas(&crate::flow::Draws::sample(&mut rng, batch.len()), h, w);
                    (crate::flow::timestep_indices(&sigmas), Some(sigmas))
                }
                None => (sample_timesteps(&mut rng, batch.len(), cfg.min_timestep, cfg.max_timestep), None),
            };
            let images: Vec<&data::TrainImage> = images.into_iter().map(|(img, _)| img).collect();
            let sample_weights: Vec<f64> = images.iter().map(|img| if img.entry.is_reg { cfg.prior_loss_weight } else { 1.0 }).collect();
            let forward_span = crate::profile::span(crate::profile::Kind::Forward);
            let loss = ctx.loss(&images, &latents, masks.as_ref(), &noise, &applied_noise, &timesteps, sigmas.as_deref(), &embeds, &sample_weights, checkpointing.as_ref())?;
            drop(forward_span);
            let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !loss_value.is_finite() {
                bail!("the loss became {loss_value} at step {} (epoch {}): lower the learning rate", progress.step + 1, epoch + 1);
            }
            micro_losses.push(loss_value);
            let scaled_loss = match &progress.loss_scale {
                Some(s) => (&loss * s.scale)?,
                None => loss.clone(),
            };
            let backward_span = crate::profile::span(crate::profile::Kind::Backward);
            let grads = match &checkpointing {
                Some(c) => c.backward(&scaled_loss)?,
                None => scaled_loss.backward()?,
            };
            accumulator.add(&grads)?;
            drop(grads);
            drop(backward_span);
            progress.batch += 1;

            // Every `accum` batches (and at the end of the epoch): one optimizer step.
            if accumulator.count() < accum && progress.batch < batches.len() {
                continue;
            }
            let optimizer_span = crate::profile::span(crate::profile::Kind::Optimizer);
            let mut grads = accumulator.take(true)?;
            let mut apply_step = true;
            if let Some(scale) = &mut progress.loss_scale {
                apply_step = scale.unscale(&trained_vars, &mut grads)?;
                if !apply_step {
                    log(sink, "warn", format!("fp16: gradients overflowed at loss scale {}; step {} skipped, scale now {}", scale.scale, progress.step + 1, scale.scale / 2.0));
                }
                scale.update(apply_step);
            }
            let lr_scale = lr_schedule.lr_at(progress.step);
            if apply_step {
                if cfg.max_grad_norm > 0.0 {
                    clip_grad_norm(&trained_vars, &mut grads, cfg.max_grad_norm)?;
                }
                optimizer.step(&grads, lr_scale)?;
                if cfg.scale_weight_norms > 0.0 {
                    network.scale_weight_norms(cfg.scale_weight_norms)?;
                }
            }
            drop(optimizer_span);
            progress.step += 1;
            let step_loss = micro_losses.iter().sum::<f64>() / micro_losses.len() as f64;
            micro_losses.clear();
            recent.push_back(step_loss);
            while recent.len() > window {
                recent.pop_front();
            }
            let avg_loss = recent.iter().sum::<f64>() / recent.len() as f64;
            let elapsed = run_start.elapsed().as_secs_f64();
            let done_here = (progress.step - first_step) as f64;
            let it_per_sec = if elapsed > 0.0 { done_here / elapsed } else { 0.0 };
            let eta_secs = if it_per_sec > 0.0 { (total_steps - progress.step) as f64 / it_per_sec } else { 0.0 };
            let lrs: Vec<(String, f64)> = optimizer.groups().iter().map(|g| g.name.clone()).zip(optimizer.effective_lrs(lr_scale)).collect();
            let lr = lrs.first().map_or(0.0, |(_, lr)| *lr);
            sink.emit(TrainEvent::Step { step: progress.step, total_steps, epoch: epoch + 1, loss: step_loss, avg_loss, lr, lrs, it_per_sec, eta_secs });
            progress.recent_losses = recent.iter().copied().collect();
            if let Some(v) = validation.as_mut().filter(|_| validation::Validation::due_after_step(cfg, progress.step)) {
                let loss = v.evaluate(&ctx, &noise_opts, use_latent_cache, train_te, &mut latent_cache, &device)?;
                progress.last_validation = Some((progress.step, loss));
                sink.emit(TrainEvent::Validation { step: progress.step, epoch: epoch + 1, loss, divergence: loss - avg_loss, at_epoch_end: false });
            }

            if cfg.save_every_n_steps > 0 && progress.step % cfg.save_every_n_steps == 0 && progress.step < total_steps {
                ctx.save_network_file(sink, &mut progress, CheckpointKind::Step)?;
                if cfg.save_state {
                    ctx.save_state(sink, &progress, &vars, optimizer.as_ref(), true)?;
                }
            }
            if cfg.sample_every_n_steps > 0 && progress.step % cfg.sample_every_n_steps == 0 {
                ctx.write_samples(sink, progress.step, epoch + 1)?;
            }
            if cancel.is_cancelled() {
                ctx.save_state(sink, &progress, &vars, optimizer.as_ref(), false)?;
                log(sink, "info", format!("cancelled at step {}", progress.step));
                sink.emit(TrainEvent::Finished { step: progress.step, path: None, cancelled: true });
                return Ok(TrainOutcome { final_step: progress.step, network_file: None, cancelled: true });
            }
            if options.stop_after_steps.is_some_and(|n| progress.step - first_step >= n) {
                return Ok(TrainOutcome { final_step: progress.step, network_file: None, cancelled: true });
            }
        }
        // The epoch's validation, also when total_steps ends the run mid-epoch (as sd-scripts).
        let avg = if recent.is_empty() { 0.0 } else { recent.iter().sum::<f64>() / recent.len() as f64 };
        if let Some(v) = validation.as_mut().filter(|_| validation::Validation::due_after_epoch(cfg, epoch + 1)) {
            // A step validation at this very step already measured the same network.
            let loss = match progress.last_validation {
                Some((step, loss)) if step == progress.step => loss,
                _ => v.evaluate(&ctx, &noise_opts, use_latent_cache, train_te, &mut latent_cache, &device)?,
            };
            progress.last_validation = Some((progress.step, loss));
            sink.emit(TrainEvent::Validation { step: progress.step, epoch: epoch + 1, loss, divergence: loss - avg, at_epoch_end: true });
        }
        if progress.batch < batches.len() {
            break; // total_steps reached mid-epoch
        }
        // End of epoch.
        let finished_epoch = epoch + 1;
        progress.epoch += 1;
        progress.batch = 0;
        sink.emit(TrainEvent::Epoch { epoch: finished_epoch, total_epochs, avg_loss: avg });
        let last_epoch = finished_epoch >= total_epochs || progress.step >= total_steps;
        if !last_epoch && cfg.save_every_n_epochs > 0 && finished_epoch % cfg.save_every_n_epochs == 0 {
            ctx.save_network_file(sink, &mut progress, CheckpointKind::Epoch)?;
        }
        if !last_epoch {
            // A state at every epoch end lets a crashed or lease-expired job resume.
            ctx.save_state(sink, &progress, &vars, optimizer.as_ref(), cfg.save_state)?;
        }
        if cfg.sample_every_n_epochs > 0 && finished_epoch % cfg.sample_every_n_epochs == 0 {
            ctx.write_samples(sink, progress.step, finished_epoch)?;
        }
    }

    // ---- 6. The final file.
    network.set_training(false);
    let final_path = ctx.save_network_file(sink, &mut progress, CheckpointKind::Final)?;
    if cfg.save_state || cfg.save_state_on_train_end {
        ctx.save_state(sink, &progress, &vars, optimizer.as_ref(), true)?;
    } else {
        // The run is complete: its automatic resume states are not needed any more.
        for dir in state::list(&cfg.output_dir) {
            std::fs::remove_dir_all(&dir).ok();
        }
    }
    sink.emit(TrainEvent::Finished { step: progress.step, path: Some(final_path.clone()), cancelled: false });
    Ok(TrainOutcome { final_step: progress.step, network_file: Some(final_path), cancelled: false })
}

/// The optimizer arguments: `optimizer_args` text plus the registry's dedicated fields that
/// sd-scripts passes as optimizer args (weight decay, Prodigy's and Adafactor's switches).
fn optimizer_args(cfg: &TrainConfig) -> Result<std::collections::BTreeMap<String, String>> {
    let mut args = optim::parse_optimizer_args(&cfg.optimizer_args).context("optimizer_args")?;
    let py = |b: bool| if b { "True".to_string() } else { "False".to_string() };
    let mut put = |k: &str, v: String| {
        args.entry(k.to_string()).or_insert(v);
    };
    put("weight_decay", cfg.weight_decay.to_string());
    match cfg.optimizer_type.as_str() {
        "Prodigy" => {
            put("d_coef", cfg.d_coef.to_string());
            put("decouple", py(cfg.decouple));
            put("use_bias_correction", py(cfg.use_bias_correction));
            put("safeguard_warmup", py(cfg.safeguard_warmup));
        }
        "Adafactor" => {
            put("relative_step", py(cfg.relative_step));
            put("scale_parameter", py(cfg.scale_parameter));
            put("warmup_init", py(cfg.warmup_init));
        }
        _ => {}
    }
    Ok(args)
}

/// The first option that makes a caption differ between uses (shuffling, wildcards, dropout),
/// if any: the text states of such captions cannot be cached.
fn caption_variation(cfg: &TrainConfig) -> Option<&'static str> {
    [
        ("shuffle_caption", cfg.shuffle_caption),
        ("enable_wildcard", cfg.enable_wildcard),
        ("caption_dropout_rate", cfg.caption_dropout_rate > 0.0),
        ("caption_tag_dropout_rate", cfg.caption_tag_dropout_rate > 0.0),
        ("caption_dropout_every_n_epochs", cfg.caption_dropout_every_n_epochs > 0),
    ]
    .into_iter()
    .find_map(|(key, on)| on.then_some(key))
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// What the helpers of the loop share.
struct RunContext<'a> {
    cfg: &'a TrainConfig,
    model: &'a StableDiffusion,
    schedule: &'a NoiseSchedule,
    network: &'a Network,
    set: &'a TrainSet,
    started_at: f64,
    /// `no`, `fp16` or `bf16` (`auto` resolved for the device).
    mixed_precision: &'static str,
    /// The frozen model's dtype.
    dtype: DType,
    loss_opts: LossOptions,
    sampler: Sampler,
    sample_requests: Vec<SampleRequest>,
    /// Flux: the flow-matching objective.
    flow: Option<crate::flow::FlowOptions>,
}

impl RunContext<'_> {
    /// Text-encoder states for the batch's captions (from the cache when allowed).
    fn text_states(&self, captions: &[String], use_cache: bool, cache: &mut HashMap<String, PromptEmbeds>) -> Result<PromptEmbeds> {
        let cfg = self.cfg;
        let encode = |captions: &[String]| {
            if cfg.weighted_captions && !cfg.model_family.is_flux() {
                self.model.encode_weighted_prompts(captions, cfg.clip_skip, cfg.max_tokens())
            } else {
                self.model.encode_prompts(captions, cfg.clip_skip, cfg.max_tokens())
            }
        };
        if !use_cache {
            return Ok(encode(captions)?);
        }
        let mut parts = vec![];
        for c in captions {
            if !cache.contains_key(c) {
                let e = encode(std::slice::from_ref(c))?;
                cache.insert(c.clone(), e.detach());
            }
            parts.push(cache[c].clone());
        }
        Ok(PromptEmbeds::cat(&parts)?)
    }

    /// The latents `(B, C, h, w)` of images (each flipped or not) and, when any of them has a
    /// loss mask, the masks `(B, 1, h, w)` (1 everywhere for an image without one, as sd-scripts
    /// fills them).
    fn encode_batch(
        &self,
        images: &[(&data::TrainImage, bool)],
        cached: bool,
        aug: &Augment,
        cache: &mut LatentCache,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut rows = vec![];
        for &(img, flip) in images {
            rows.push(if cached {
                cache.latents(&self.model.vae, img, flip, device)?
            } else {
                data::encode_image(&self.model.vae, img, aug, flip, Some(rng), device)?
            });
        }
        let latents = Tensor::stack(&rows.iter().map(|r| r.latents.clone()).collect::<Vec<_>>(), 0)?;
        if rows.iter().all(|r| r.mask.is_none()) {
            return Ok((latents, None));
        }
        let (_, _, h, w) = latents.dims4()?;
        let masks = rows
            .iter()
            .map(|r| match &r.mask {
                Some(m) => Ok(m.clone()),
                None => Tensor::ones((1, h, w), DType::F32, device),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((latents, Some(Tensor::stack(&masks, 0)?)))
    }

    /// [`prediction_loss`] for these images (their SDXL size conditions).
    #[allow(clippy::too_many_arguments)]
    fn loss(
        &self,
        images: &[&data::TrainImage],
        latents: &Tensor,
        masks: Option<&Tensor>,
        noise: &Tensor,
        applied_noise: &Tensor,
        timesteps: &[usize],
        sigmas: Option<&[f64]>,
        embeds: &PromptEmbeds,
        sample_weights: &[f64],
        checkpointing: Option<&GradientCheckpointing>,
    ) -> Result<Tensor> {
        if let (Some(flow), Some(sigmas)) = (&self.flow, sigmas) {
            let inputs = FlowInputs { latents, masks, noise, applied_noise, sigmas, embeds, guidance: self.cfg.guidance_scale, sample_weights };
            return flow_loss(self.model, flow, &self.loss_opts, self.schedule, self.dtype, &inputs, checkpointing);
        }
        let added = self.model.added_cond(embeds.pooled.as_ref(), &self.time_ids(images))?;
        let inputs = LossInputs { latents, masks, noise, applied_noise, timesteps, hidden: &embeds.hidden, added: added.as_ref(), sample_weights };
        prediction_loss(self.model, self.schedule, &self.loss_opts, self.dtype, &inputs, checkpointing)
    }

    /// SDXL's size conditions per sample: original size, crop top-left, target size.
    fn time_ids(&self, images: &[&data::TrainImage]) -> Vec<[f32; 6]> {
        images
            .iter()
            .map(|img| {
                let b = &img.bucket;
                let crop_top = (b.resized.1 - b.bucket.1) / 2;
                let crop_left = (b.resized.0 - b.bucket.0) / 2;
                [img.entry.height as f32, img.entry.width as f32, crop_top as f32, crop_left as f32, b.bucket.1 as f32, b.bucket.0 as f32]
            })
            .collect()
    }

    fn metadata(&self, step: u64, epoch: u64, last_validation: Option<(u64, f64)>) -> NetworkMetadata {
        let cfg = self.cfg;
        if cfg.no_metadata {
            return NetworkMetadata::default();
        }
        let mut m = NetworkMetadata::for_network(cfg.network_algo, &cfg.network_options());
        if !cfg.network_algo.is_kohya() {
            m.network_args.push(("preset".into(), cfg.lycoris_preset.clone()));
        }
        m.base_model_version = Some(match (cfg.model_family, self.schedule.v_prediction) {
            (ModelFamily::Sd15, _) => BaseModelVersion::SdV1,
            (ModelFamily::Sd2, false) => BaseModelVersion::SdV2,
            (ModelFamily::Sd2, true) => BaseModelVersion::SdV2V,
            (ModelFamily::Sdxl, _) => BaseModelVersion::SdxlBase,
            (ModelFamily::FluxDev | ModelFamily::FluxSchnell, _) => BaseModelVersion::Flux1,
        });
        m.output_name = Some(cfg.output_name.clone());
        m.training_comment = (!cfg.training_comment.is_empty()).then(|| cfg.training_comment.clone());
        m.training_started_at = Some(self.started_at);
        m.training_finished_at = Some(unix_now());
        m.steps = Some(step);
        m.epoch = Some(epoch);
        m.seed = Some(cfg.seed);
        m.learning_rate = Some(cfg.learning_rate);
        m.unet_lr = Some(cfg.unet_learning_rate());
        m.text_encoder_lr = Some(cfg.text_encoder_learning_rate());
        m.lr_scheduler = Some(cfg.lr_scheduler.clone());
        m.lr_warmup_steps = Some(cfg.lr_warmup_steps);
        m.optimizer = Some(cfg.optimizer_type.clone());
        m.mixed_precision = Some(self.mixed_precision.to_string());
        m.num_train_images = Some(self.set.num_train_images as u64);
        m.num_reg_images = Some(self.set.num_reg_images as u64);
        m.gradient_accumulation_steps = Some(cfg.gradient_accumulation_steps as u64);
        m.gradient_checkpointing = Some(cfg.gradient_checkpointing);
        m.clip_skip = Some(cfg.clip_skip as u64);
        m.noise_offset = (cfg.noise_offset > 0.0).then_some(cfg.noise_offset);
        m.min_snr_gamma = (cfg.min_snr_gamma > 0.0).then_some(cfg.min_snr_gamma);
        m.sd_model_name = cfg.pretrained_model_name_or_path.file_name().map(|n| n.to_string_lossy().into_owned());
        if cfg.model_family.is_flux() {
            // flux_train_network.py's keys.
            let py = crate::lora_file::py_float;
            m.extra.insert("ss_model_type".into(), "flux".into());
            if cfg.network_algo.is_kohya() {
                m.network_module = Some(crate::lora_file::NetworkModule::KohyaLoraFlux);
            }
            let variant = if cfg.model_family == ModelFamily::FluxDev { "dev" } else { "schnell" };
            m.extra.insert("modelspec.architecture".into(), format!("flux-1-{variant}/lora"));
            m.extra.insert("modelspec.implementation".into(), "https://github.com/black-forest-labs/flux".into());
            m.extra.insert("ss_apply_t5_attn_mask".into(), crate::lora_file::py_bool(cfg.apply_t5_attn_mask));
            m.extra.insert("ss_weighting_scheme".into(), cfg.weighting_scheme.clone());
            m.extra.insert("ss_logit_mean".into(), py(cfg.logit_mean));
            m.extra.insert("ss_logit_std".into(), py(cfg.logit_std));
            m.extra.insert("ss_mode_scale".into(), py(cfg.mode_scale));
            m.extra.insert("ss_guidance_scale".into(), py(cfg.guidance_scale));
            m.extra.insert("ss_timestep_sampling".into(), cfg.timestep_sampling.clone());
            m.extra.insert("ss_sigmoid_scale".into(), py(cfg.sigmoid_scale));
            m.extra.insert("ss_model_prediction_type".into(), cfg.model_prediction_type.clone());
            m.extra.insert("ss_discrete_flow_shift".into(), py(cfg.discrete_flow_shift));
        }
        m.extra.insert("ss_resolution".into(), format!("({}, {})", cfg.resolution, cfg.resolution));
        m.extra.insert("ss_enable_bucket".into(), crate::lora_file::py_bool(cfg.enable_bucket));
        m.extra.insert("ss_min_bucket_reso".into(), cfg.min_bucket_reso.to_string());
        m.extra.insert("ss_max_bucket_reso".into(), cfg.max_bucket_reso.to_string());
        m.extra.insert("ss_caption_dropout_rate".into(), crate::lora_file::py_float(cfg.caption_dropout_rate));
        m.extra.insert("ss_shuffle_caption".into(), crate::lora_file::py_bool(cfg.shuffle_caption));
        m.extra.insert("ss_keep_tokens".into(), cfg.keep_tokens.to_string());
        m.extra.insert("ss_flip_aug".into(), crate::lora_file::py_bool(cfg.flip_aug));
        m.extra.insert("ss_zero_terminal_snr".into(), crate::lora_file::py_bool(cfg.zero_terminal_snr));
        m.extra.insert("ss_fp8_base".into(), crate::lora_file::py_bool(cfg.fp8_base));
        m.extra.insert("ss_full_fp16".into(), crate::lora_file::py_bool(cfg.full_fp16));
        m.extra.insert("ss_full_bf16".into(), crate::lora_file::py_bool(cfg.full_bf16));
        m.extra.insert("ss_loss_type".into(), cfg.loss_type.clone());
        m.extra.insert("ss_max_grad_norm".into(), crate::lora_file::py_float(cfg.max_grad_norm));
        m.extra.insert("ss_prior_loss_weight".into(), crate::lora_file::py_float(cfg.prior_loss_weight));
        m.extra.insert("ss_tag_frequency".into(), serde_json::to_string(&self.set.tag_frequency(&cfg.caption_separator)).unwrap_or_default());
        let dirs: serde_json::Map<String, serde_json::Value> = self
            .set
            .subsets
            .iter()
            .map(|s| {
                let name = s.image_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let count = self.set.images.iter().filter(|i| i.entry.path.parent() == Some(s.image_dir.as_path())).count();
                (name, serde_json::json!({"n_repeats": s.num_repeats, "img_count": count}))
            })
            .collect();
        m.extra.insert("ss_dataset_dirs".into(), serde_json::Value::Object(dirs).to_string());
        if cfg.validation_split > 0.0 {
            m.extra.insert("ss_validation_split".into(), crate::lora_file::py_float(cfg.validation_split));
            m.extra.insert("ss_validation_seed".into(), data::validation_seed(cfg).to_string());
            m.extra.insert("ss_num_validation_images".into(), self.set.validation.len().to_string());
            if cfg.max_validation_steps > 0 {
                m.extra.insert("ss_max_validation_steps".into(), cfg.max_validation_steps.to_string());
            }
            if let Some((step, loss)) = last_validation {
                m.extra.insert("loft_validation_loss".into(), crate::lora_file::py_float(loss));
                m.extra.insert("loft_validation_step".into(), step.to_string());
            }
        }
        let mut modelspec = |k: &str, v: &str| {
            if !v.is_empty() {
                m.extra.insert(format!("modelspec.{k}"), v.to_string());
            }
        };
        modelspec("title", &cfg.metadata_title);
        modelspec("author", &cfg.metadata_author);
        modelspec("description", &cfg.metadata_description);
        modelspec("license", &cfg.metadata_license);
        modelspec("tags", &cfg.metadata_tags);
        modelspec("trigger_phrase", &cfg.metadata_trigger_phrase);
        m
    }

    /// Saves a network file (epoch, step or final), pruning old ones as configured.
    fn save_network_file(&self, sink: &mut dyn EventSink, progress: &mut state::Progress, kind: CheckpointKind) -> Result<PathBuf> {
        let cfg = self.cfg;
        let epoch = progress.epoch;
        let name = match kind {
            CheckpointKind::Epoch => format!("{}-{:06}.safetensors", cfg.output_name, epoch),
            CheckpointKind::Step => format!("{}-step{:08}.safetensors", cfg.output_name, progress.step),
            _ => format!("{}.safetensors", cfg.output_name),
        };
        let path = cfg.output_dir.join(name);
        self.network.save(&path, &self.metadata(progress.step, epoch, progress.last_validation), parse_save_precision(&cfg.save_precision)?)?;
        sink.emit(TrainEvent::Checkpoint { step: progress.step, epoch, checkpoint: kind, path: path.clone() });
        let (list, keep) = match kind {
            CheckpointKind::Epoch => (&mut progress.saved_epoch_files, cfg.save_last_n_epochs),
            CheckpointKind::Step => (&mut progress.saved_step_files, cfg.save_last_n_steps),
            _ => return Ok(path),
        };
        list.push(path.clone());
        if keep > 0 {
            while list.len() as u64 > keep {
                let old = list.remove(0);
                if std::fs::remove_file(&old).is_ok() {
                    sink.emit(TrainEvent::Pruned { path: old });
                }
            }
        }
        Ok(path)
    }

    /// Saves a resumable state. A `kept` state stays (pruned by the save_last_n_*_state
    /// settings); an automatic one replaces the previous automatic one.
    fn save_state(&self, sink: &mut dyn EventSink, progress: &state::Progress, vars: &[(String, candle_core::Var)], optimizer: &dyn optim::Optimizer, kept: bool) -> Result<()> {
        let cfg = self.cfg;
        let before = state::list(&cfg.output_dir);
        let dir = state::save(&cfg.output_dir, progress, vars, &optimizer.state()?)?;
        sink.emit(TrainEvent::Checkpoint { step: progress.step, epoch: progress.epoch, checkpoint: CheckpointKind::State, path: dir.clone() });
        // 0 = keep every kept state; an automatic state replaces all earlier ones.
        let keep = if kept { cfg.save_last_n_epochs_state.max(cfg.save_last_n_steps_state) } else { 1 };
        if keep > 0 {
            let mut all: Vec<PathBuf> = before.into_iter().filter(|d| d != &dir).collect();
            all.push(dir);
            while all.len() as u64 > keep {
                std::fs::remove_dir_all(all.remove(0)).ok();
            }
        }
        Ok(())
    }

    /// Renders the configured sample prompts with the adapters applied.
    fn write_samples(&self, sink: &mut dyn EventSink, step: u64, epoch: u64) -> Result<()> {
        if self.sample_requests.is_empty() {
            return Ok(());
        }
        self.network.set_training(false);
        for (i, req) in self.sample_requests.iter().enumerate() {
            let image = sample_image(self.model, self.schedule, self.sampler, req, self.cfg.clip_skip)?;
            let path = self.cfg.output_dir.join("sample").join(format!("{}_{:06}_{:02}_{}.png", self.cfg.output_name, step, i, req.seed));
            save_png(&image, &path)?;
            sink.emit(TrainEvent::Sample { step, epoch, index: i, prompt: req.prompt.clone(), path });
        }
        self.network.set_training(true);
        Ok(())
    }
}

/// What one loss evaluation needs: the clean latents `(B, C, h, w)`, their loss masks, the
/// target noise and the noise actually added (they differ with noise offset and input
/// perturbation), the timesteps, the text states and the model's extra conditions (SDXL).
pub struct LossInputs<'a> {
    pub latents: &'a Tensor,
    pub masks: Option<&'a Tensor>,
    pub noise: &'a Tensor,
    pub applied_noise: &'a Tensor,
    pub timesteps: &'a [usize],
    pub hidden: &'a Tensor,
    pub added: Option<&'a crate::models::unet::AddedCond>,
    pub sample_weights: &'a [f64],
}

/// The training (and validation) loss: `latents` noised at `timesteps` by the schedule, the
/// U-Net's prediction in `dtype`, [`diffusion_loss`] against the schedule's target. With
/// gradient checkpointing the U-Net keeps only its blocks' inputs and outputs and recomputes
/// them in the backward.
pub fn prediction_loss(
    model: &StableDiffusion,
    schedule: &NoiseSchedule,
    loss_opts: &LossOptions,
    dtype: DType,
    inputs: &LossInputs,
    checkpointing: Option<&GradientCheckpointing>,
) -> Result<Tensor> {
    let LossInputs { latents, masks, noise, applied_noise, timesteps, hidden, added, sample_weights } = *inputs;
    let noisy = schedule.add_noise(latents, applied_noise, timesteps)?;
    let target = schedule.target(latents, noise, timesteps)?;
    let ts = Tensor::new(timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(), latents.device())?;
    let unet_forward = || model.unet().forward(&noisy.to_dtype(dtype)?, &ts, &hidden.to_dtype(dtype)?, added);
    let pred = match checkpointing {
        Some(c) => c.forward(unet_forward)?,
        None => unet_forward()?,
    };
    Ok(diffusion_loss(loss_opts, schedule, &pred, &target, timesteps, sample_weights, masks)?)
}

/// What one Flux loss evaluation needs: clean latents `(B, 16, h, w)`, masks, the target noise
/// and the noise actually added (input perturbation), each sample's σ, the prompts' encodings,
/// dev's guidance scale, and the per-sample weights.
pub struct FlowInputs<'a> {
    pub latents: &'a Tensor,
    pub masks: Option<&'a Tensor>,
    pub noise: &'a Tensor,
    pub applied_noise: &'a Tensor,
    pub sigmas: &'a [f64],
    pub embeds: &'a PromptEmbeds,
    pub guidance: f64,
    pub sample_weights: &'a [f64],
}

/// Flux's training loss as sd-scripts' `flux_train_network.py`: noisy = (1 − σ)·x + σ·noise,
/// the transformer's velocity on the packed input at t = σ (dev: with the guidance scale),
/// unpacked and re-expressed by `model_prediction_type`, against `noise − x`; the element loss
/// (`loss_type`) weighted per sample by `weighting_scheme` and the prior-loss weight. With
/// gradient checkpointing each transformer block is recomputed in the backward.
pub fn flow_loss(
    model: &StableDiffusion,
    flow: &crate::flow::FlowOptions,
    loss_opts: &LossOptions,
    schedule: &NoiseSchedule,
    dtype: DType,
    inputs: &FlowInputs,
    checkpointing: Option<&GradientCheckpointing>,
) -> Result<Tensor> {
    let Some(flux) = model.flux() else { bail!("flow_loss needs a Flux model") };
    let FlowInputs { latents, masks, noise, applied_noise, sigmas, embeds, guidance, sample_weights } = *inputs;
    let device = latents.device();
    let (b, _, h, w) = latents.dims4()?;
    let sigma_t = Tensor::from_vec(sigmas.iter().map(|&s| s as f32).collect::<Vec<_>>(), (b, 1, 1, 1), device)?;
    let noisy = crate::flow::noisy_input(latents, applied_noise, &sigma_t)?;
    let target = (noise - latents)?;
    let ts: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
    let guidance = vec![guidance as f32; b];
    let Some(pooled) = embeds.pooled.as_ref() else { bail!("flux: the prompts have no pooled CLIP output") };
    let flux_forward = || -> candle_core::Result<Tensor> {
        let packed = crate::models::flux::pack_latents(&noisy.to_dtype(dtype)?)?;
        let inputs = crate::models::flux::FluxInputs {
            txt: &embeds.hidden.to_dtype(dtype)?,
            pooled: &pooled.to_dtype(dtype)?,
            timesteps: &ts,
            guidance: Some(&guidance),
            grid: (h / 2, w / 2),
            txt_mask: embeds.mask.as_ref(),
        };
        crate::models::flux::unpack_latents(&flux.forward(&packed, &inputs)?, h, w)
    };
    let pred = match checkpointing {
        Some(c) => c.forward(flux_forward)?,
        None => flux_forward()?,
    };
    let pred = flow.apply_prediction_type(&pred.to_dtype(DType::F32)?, &noisy, &sigma_t)?;
    // σ's weighting is one number per sample, so it joins the prior-loss weight.
    let weights: Vec<f64> = sigmas.iter().zip(sample_weights).map(|(&s, &sw)| flow.weighting(s) * sw).collect();
    let timesteps = crate::flow::timestep_indices(sigmas);
    let plain = LossOptions { min_snr_gamma: 0.0, scale_v_pred_loss_like_noise_pred: false, v_pred_like_loss: 0.0, debiased_estimation_loss: false, ..loss_opts.clone() };
    Ok(diffusion_loss(&plain, schedule, &pred, &target, &timesteps, &weights, masks)?)
}

/// Whether `output_dir` holds a state to resume from.
pub fn has_state(output_dir: &Path) -> bool {
    !state::list(output_dir).is_empty()
}
