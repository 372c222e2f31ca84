//! What runs a claimed job. Production runs the real engine ([`EngineRunner`]); the queue's own
//! tests and the benchmark inject a stand-in through the same [`JobRunner`] trait, and the fault
//! tests (which need real processes) use [`SimulatedRunner`], a quick fake training loop with a
//! real checkpoint file and resume, selected by the hidden `--simulate` flag.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use loft_worker::candle_core::Device;
use loft_worker::train::{CancelToken, CheckpointKind, EventSink, RunOptions, TrainEvent, TrainOutcome};
use serde::{Deserialize, Serialize};

use super::config::engine_config;
use crate::registry::{Config, Registry};

/// A claimed job, ready to run on this machine.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub id: i64,
    pub name: String,
    /// The resolved configuration, with paths valid on this machine and `output_dir` set.
    pub config: Config,
    /// The job's own folder (outputs when `output_dir` was left empty, caches).
    pub job_dir: PathBuf,
    /// Continue from the newest saved training state.
    pub resume: bool,
}

/// An error that retrying cannot fix (an invalid configuration): the job fails at once.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Permanent(pub String);

pub trait JobRunner: Send + Sync + 'static {
    /// Runs the job to the end or until `cancel`, reporting through `sink`.
    fn run(&self, job: &JobSpec, sink: &mut dyn EventSink, cancel: &CancelToken) -> Result<TrainOutcome>;
}

/// The real engine, `loft_worker::train::run`.
pub struct EngineRunner {
    pub registry: Arc<Registry>,
    /// The worker's `--device`; `None`: each job's own `device` field.
    pub device: Option<Device>,
}

impl JobRunner for EngineRunner {
    fn run(&self, job: &JobSpec, sink: &mut dyn EventSink, cancel: &CancelToken) -> Result<TrainOutcome> {
        // A tagging job (a second kind beside training): the engine's tagger over the dataset.
        if let Some(tag) = crate::datasets::tagging::TagJob::from_config(&job.config) {
            let tag = tag.map_err(|e| anyhow!(Permanent(e)))?;
            return loft_worker::tagger::tag_folder(&tag.dataset_dir, &tag.model_dir, &tag.options, job.resume, sink, cancel);
        }
        let config = engine_config(&self.registry, &job.config).map_err(|errors| {
            let list: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            anyhow!(Permanent(format!("the configuration is not valid: {}", list.join("; "))))
        })?;
        // Latents are keyed by image content and every setting that changes them, so one cache
        // for all jobs (`DATA/cache/latents`, beside `DATA/jobs/<id>`) lets a re-run or a second
        // job on the same pictures skip the VAE.
        let shared = job.job_dir.parent().and_then(|jobs| jobs.parent()).map(|root| root.join("cache").join("latents"));
        let cache_dir = shared.unwrap_or_else(|| job.job_dir.join("cache"));
        let options = RunOptions { resume: job.resume, device: self.device.clone(), cache_dir: Some(cache_dir), ..RunOptions::default() };
        loft_worker::train::run(&config, &options, sink, cancel)
    }
}

/// A stand-in training loop for fault tests and demos of the queue itself: `steps` steps of
/// `step_ms` each over `epochs` epochs, a network file per epoch, a training state (a small JSON
/// file) per epoch, resume from that state, cancel within one step. Its files go where the
/// engine's would (`output_dir`).
#[derive(Clone, Debug)]
pub struct SimulatedRunner {
    pub steps: u64,
    pub epochs: u64,
    pub step_ms: u64,
}

impl SimulatedRunner {
    /// Parses `STEPS:STEP_MS` or `STEPS:STEP_MS:EPOCHS` (e.g. `60:50:3`).
    pub fn parse(spec: &str) -> Result<SimulatedRunner> {
        let parts: Vec<u64> = spec.split(':').map(|p| p.trim().parse()).collect::<Result<_, _>>().map_err(|_| {
            anyhow!("--simulate: expected STEPS:STEP_MS[:EPOCHS] (e.g. 60:50:3), got {spec:?}")
        })?;
        match parts[..] {
            [steps, step_ms] => Ok(SimulatedRunner { steps: steps.max(1), step_ms, epochs: 1 }),
            [steps, step_ms, epochs] => Ok(SimulatedRunner { steps: steps.max(1), step_ms, epochs: epochs.clamp(1, steps.max(1)) }),
            _ => Err(anyhow!("--simulate: expected STEPS:STEP_MS[:EPOCHS] (e.g. 60:50:3), got {spec:?}")),
        }
    }
}

/// A small picture that changes with the epoch, standing in for a sample image.
fn simulated_sample(epoch: u64) -> image::RgbImage {
    image::RgbImage::from_fn(64, 64, |x, y| {
        let t = (epoch * 60 % 255) as u8;
        image::Rgb([(x * 4) as u8, (y * 4) as u8, t])
    })
}

#[derive(Serialize, Deserialize)]
struct SimState {
    step: u64,
    epoch: u64,
}

impl JobRunner for SimulatedRunner {
    fn run(&self, job: &JobSpec, sink: &mut dyn EventSink, cancel: &CancelToken) -> Result<TrainOutcome> {
        let out = job.config.get("output_dir").and_then(|v| v.as_str()).map(PathBuf::from).unwrap_or_else(|| job.job_dir.clone());
        let name = job.config.get("output_name").and_then(|v| v.as_str()).unwrap_or("loft_lora").to_string();
        std::fs::create_dir_all(&out)?;
        let state_path = out.join(format!("{name}-state.json"));
        let steps_per_epoch = self.steps.div_ceil(self.epochs);
        let (mut step, mut epoch) = (0, 0);
        if job.resume {
            if let Ok(text) = std::fs::read_to_string(&state_path) {
                let s: SimState = serde_json::from_str(&text)?;
                (step, epoch) = (s.step, s.epoch);
            }
        }
        sink.emit(TrainEvent::Started { total_steps: self.steps, total_epochs: self.epochs, start_step: step, steps_per_epoch, images: 4 });
        let started = Instant::now();
        let first = step;
        while step < self.steps {
            std::thread::sleep(Duration::from_millis(self.step_ms));
            step += 1;
            let loss = 0.2 + 0.1 * (-(step as f64) / 20.0).exp() + 0.02 * ((step * 7919) % 13) as f64 / 13.0;
            let rate = (step - first) as f64 / started.elapsed().as_secs_f64().max(1e-6);
            let lr = 1e-3 * (1.0 - step as f64 / self.steps as f64);
            let eta = (self.steps - step) as f64 / rate.max(1e-9);
            sink.emit(TrainEvent::Step {
                step,
                total_steps: self.steps,
                epoch: epoch + 1,
                loss,
                avg_loss: loss,
                lr,
                lrs: vec![("unet".into(), lr)],
                it_per_sec: rate,
                eta_secs: eta,
            });
            if step % steps_per_epoch == 0 || step == self.steps {
                epoch += 1;
                sink.emit(TrainEvent::Epoch { epoch, total_epochs: self.epochs, avg_loss: loss });
                let file = if step == self.steps { out.join(format!("{name}.safetensors")) } else { out.join(format!("{name}-{epoch:06}.safetensors")) };
                std::fs::write(&file, format!("simulated network after step {step}"))?;
                std::fs::write(&state_path, serde_json::to_string(&SimState { step, epoch })?)?;
                let kind = if step == self.steps { CheckpointKind::Final } else { CheckpointKind::Epoch };
                sink.emit(TrainEvent::Checkpoint { step, epoch, checkpoint: kind, path: file.clone() });
                let sample = out.join("sample").join(format!("{name}_e{epoch:06}_00.png"));
                std::fs::create_dir_all(out.join("sample"))?;
                simulated_sample(epoch).save(&sample)?;
                sink.emit(TrainEvent::Sample { step, epoch, index: 0, prompt: "simulated sample".into(), path: sample });
                if step == self.steps {
                    sink.emit(TrainEvent::Finished { step, path: Some(file.clone()), cancelled: false });
                    return Ok(TrainOutcome { final_step: step, network_file: Some(file), cancelled: false });
                }
            }
            if cancel.is_cancelled() {
                std::fs::write(&state_path, serde_json::to_string(&SimState { step, epoch })?)?;
                sink.emit(TrainEvent::Log { level: "info".into(), message: format!("stopped at step {step}: cancelled") });
                sink.emit(TrainEvent::Finished { step, path: None, cancelled: true });
                return Ok(TrainOutcome { final_step: step, network_file: None, cancelled: true });
            }
        }
        let file = out.join(format!("{name}.safetensors"));
        Ok(TrainOutcome { final_step: step, network_file: file.exists().then_some(file), cancelled: false })
    }
}
