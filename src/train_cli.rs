//! `loft train CONFIG.toml [--resume]` and `loft sample …`: the engine from the terminal.
//!
//! `loft train` reads a TOML file with the field registry's keys (the same keys the web form
//! and `/api/validate` use), validates it exactly as the form does, and runs the training loop
//! with a progress bar. Ctrl-C stops after the current step and saves a state that `--resume`
//! continues from.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use loft_worker::candle_core::DType;
use loft_worker::lora_file::merge::parse_lora_arg;
use loft_worker::lora_file::{LoraFile, MultiplierRule};
use loft_worker::models::pipeline::StableDiffusion;
use loft_worker::noise::NoiseSchedule;
use loft_worker::sample::{sample_image, save_png, SampleRequest, Sampler};
use loft_worker::train::{run, CancelToken, RunOptions, TrainConfig, TrainEvent};

use crate::jobs::config::engine_config;
use crate::registry::{Config, Registry};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A TOML file with the registry's keys (`loft fields` lists them), e.g.
    /// `pretrained_model_name_or_path = "models/sd15"`.
    pub config: PathBuf,
    /// Continue from the newest training state in the config's output_dir.
    #[arg(long)]
    pub resume: bool,
    /// Where to cache VAE latents across runs (default: OUTPUT_DIR/.cache/latents when
    /// cache_latents_to_disk is on).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N (default: the config's `device`, `auto` unless set).
    #[arg(long)]
    pub device: Option<String>,
}

/// Reads a TOML config into a registry configuration (key → JSON value).
pub fn read_config_file(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the config {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let value = serde_json::to_value(table).context("config to JSON")?;
    match value {
        serde_json::Value::Object(map) => Ok(map),
        _ => bail!("{}: expected key = value pairs", path.display()),
    }
}

/// Validates a config file with the registry and the engine; every problem names its key.
pub fn load_train_config(path: &Path) -> Result<TrainConfig> {
    let registry = Registry::embedded()?;
    let config = read_config_file(path)?;
    engine_config(&registry, &config).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(|e| format!("  {}: {}", e.field, e.message)).collect();
        anyhow::anyhow!("{} has {} problem(s); nothing was run:\n{}", path.display(), errors.len(), lines.join("\n"))
    })
}

pub fn train(args: TrainArgs) -> Result<()> {
    let config = load_train_config(&args.config)?;
    let cancel = CancelToken::new();
    // Ctrl-C or SIGTERM: finish the current step, save a state, stop.
    crate::signal::cancel_on_signal(&cancel, "stopping after this step (a state is saved; continue with --resume)…");
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} epoch {prefix} [{bar:30}] {pos}/{len} steps [{elapsed}<{eta}] {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let printer = bar.clone();
    // Without a terminal (a log file, a service) the bar is hidden: print plain lines instead,
    // a step line every 5 % of the run.
    let say = move |p: &ProgressBar, line: String| {
        if p.is_hidden() {
            eprintln!("{line}");
        } else {
            p.println(line);
        }
    };
    let mut total_epochs_seen = 0;
    let mut sink = move |event: TrainEvent| match event {
        TrainEvent::Started { total_steps, total_epochs, start_step, images, .. } => {
            total_epochs_seen = total_epochs;
            printer.set_length(total_steps);
            printer.set_position(start_step);
            printer.set_prefix(format!("1/{total_epochs}"));
            say(&printer, format!("training on {images} images for {total_steps} steps ({total_epochs} epochs), from step {start_step}"));
        }
        TrainEvent::Step { step, total_steps, epoch, loss, avg_loss, lr, it_per_sec, eta_secs, .. } => {
            printer.set_position(step);
            printer.set_prefix(format!("{epoch}/{total_epochs_seen}"));
            let stats = format!("loss {loss:.4} avg {avg_loss:.4} lr {lr:.2e} {it_per_sec:.2} it/s");
            if printer.is_hidden() && (step % (total_steps / 20).max(1) == 0 || step == total_steps) {
                eprintln!("step {step}/{total_steps} epoch {epoch}/{total_epochs_seen} {stats} eta {eta_secs:.0}s");
            }
            printer.set_message(stats);
        }
        TrainEvent::Epoch { epoch, total_epochs, avg_loss } => say(&printer, format!("epoch {epoch}/{total_epochs} done, average loss {avg_loss:.4}")),
        TrainEvent::Validation { step, loss, divergence, .. } => say(&printer, format!("validation loss {loss:.4} at step {step} ({divergence:+.4} against the training loss)")),
        TrainEvent::Sample { path, prompt, .. } => say(&printer, format!("sample  {} ({prompt})", path.display())),
        TrainEvent::Checkpoint { path, checkpoint, .. } => say(&printer, format!("saved   {} ({checkpoint:?})", path.display())),
        TrainEvent::Pruned { path } => say(&printer, format!("removed {}", path.display())),
        TrainEvent::Log { level, message } => say(&printer, format!("{level}: {message}")),
        TrainEvent::Finished { path: Some(p), .. } => say(&printer, format!("done: {}", p.display())),
        TrainEvent::Finished { step, .. } => say(&printer, format!("stopped at step {step}")),
        TrainEvent::Failed { error } => say(&printer, format!("failed: {error}")),
    };
    let device = match &args.device {
        Some(spec) => Some(loft_worker::device::select(spec).map_err(|e| anyhow::anyhow!("--device: {e:#}"))?.0),
        None => None,
    };
    let options = RunOptions { resume: args.resume, cache_dir: args.cache_dir, device, ..RunOptions::default() };
    let result = run(&config, &options, &mut sink, &cancel);
    bar.finish_and_clear();
    let outcome = result?;
    if outcome.cancelled {
        println!("Stopped at step {}. Continue with: loft train {} --resume", outcome.final_step, args.config.display());
    } else if let Some(p) = outcome.network_file {
        println!("{}", p.display());
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// A diffusers folder or a single-file .safetensors checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// A network file to apply, optionally with a strength: `my.safetensors:0.8` (repeatable).
    /// The strength follows LyCORIS's definition: inside DoRA's weight norm and the
    /// DIAG-OFT/BOFT rotation, a plain scale of ΔW for every other algorithm.
    #[arg(long = "lora")]
    pub loras: Vec<String>,
    /// Scale every file's ΔW(1) by its strength instead (what ComfyUI's strength slider does);
    /// differs from the default only for DoRA, DIAG-OFT and BOFT at strengths other than 1.
    #[arg(long)]
    pub linear_multiplier: bool,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative: String,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Classifier-free guidance scale (default 7; Flux: 1, i.e. no negative prompt pass).
    #[arg(long)]
    pub cfg: Option<f64>,
    /// Flux dev's embedded guidance scale (sd-scripts' `--g`).
    #[arg(long, default_value_t = 3.5)]
    pub guidance: f64,
    /// Flux: CLIP-L as one file (instead of the Flux folder's text_encoder/).
    #[arg(long)]
    pub clip_l: Option<PathBuf>,
    /// Flux: T5-XXL as one file, its tokenizer.json beside it.
    #[arg(long)]
    pub t5xxl: Option<PathBuf>,
    /// Flux: the autoencoder as one file (BFL's ae.safetensors) or a diffusers vae/ folder.
    #[arg(long)]
    pub ae: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Defaults to the family's resolution (512, 768 for SD 2.x, 1024 for SDXL).
    #[arg(long)]
    pub width: Option<u32>,
    #[arg(long)]
    pub height: Option<u32>,
    /// `euler` or `ddim`.
    #[arg(long, default_value = "euler")]
    pub sampler: String,
    #[arg(long, default_value_t = 1)]
    pub clip_skip: usize,
    /// The model predicts v (SD 2.x 768-v models loaded from a single file).
    #[arg(long)]
    pub v_prediction: bool,
    /// Keep the weights in f16 (half the memory of f32) and compute in f32.
    #[arg(long)]
    pub half_weights: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn sample(args: SampleArgs) -> Result<()> {
    let sampler = Sampler::parse(&args.sampler)?;
    let storage = if args.half_weights { DType::F16 } else { DType::F32 };
    let (device, line) = loft_worker::device::select(&args.device).map_err(|e| anyhow::anyhow!("--device: {e:#}"))?;
    eprintln!("{line}");
    let files = loft_worker::models::pipeline::FluxFiles { clip_l: args.clip_l.clone(), t5xxl: args.t5xxl.clone(), ae: args.ae.clone() };
    let mut model = StableDiffusion::load_with(&args.model, &files, storage, &device, None).with_context(|| format!("--model {}", args.model.display()))?;
    if !model.family.is_flux() && files != Default::default() {
        bail!("--clip-l, --t5xxl and --ae are Flux's parts; {} is an {} model", args.model.display(), model.family.name());
    }
    model.set_compute_dtype(DType::F32);
    let mut files = vec![];
    for arg in &args.loras {
        let (path, weight) = parse_lora_arg(arg);
        files.push((LoraFile::load(&path)?, weight));
    }
    let refs: Vec<(&LoraFile, f64)> = files.iter().map(|(f, w)| (f, *w)).collect();
    let rule = if args.linear_multiplier { MultiplierRule::Linear } else { MultiplierRule::Lycoris };
    let unmatched = model.apply_networks_with(&refs, rule)?;
    if !unmatched.is_empty() {
        eprintln!("warning: {} network modules match no layer of this model, e.g. {}", unmatched.len(), unmatched[0]);
    }
    let default_size = match model.family {
        loft_worker::models::ModelFamily::Sd15 => 512,
        loft_worker::models::ModelFamily::Sd2 => 768,
        loft_worker::models::ModelFamily::Sdxl => 1024,
        loft_worker::models::ModelFamily::FluxDev | loft_worker::models::ModelFamily::FluxSchnell => 1024,
    };
    let request = SampleRequest {
        prompt: args.prompt.clone(),
        negative: args.negative.clone(),
        width: args.width.unwrap_or(default_size),
        height: args.height.unwrap_or(default_size),
        steps: args.steps,
        cfg: args.cfg.unwrap_or(if model.family.is_flux() { 1.0 } else { 7.0 }),
        seed: args.seed,
        guidance: args.guidance,
    };
    if request.width % 8 != 0 || request.height % 8 != 0 {
        bail!("--width and --height must be multiples of 8");
    }
    let schedule = NoiseSchedule::new(&model.scheduler, args.v_prediction || model.scheduler.v_prediction(), false)?;
    let image = sample_image(&model, &schedule, sampler, &request, args.clip_skip)?;
    save_png(&image, &args.out)?;
    println!("{}", args.out.display());
    Ok(())
}

