//! The training loop: `TrainConfig` in, [`TrainEvent`]s out, a kohya/LyCORIS file at the end.

pub mod config;
pub mod events;

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::Device;

pub use config::{ConfigError, TrainConfig};
pub use events::{CancelToken, CheckpointKind, EventLog, EventSink, TrainEvent};

/// How to run a job (not part of the saved config).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Continue from the newest training state in `output_dir` (if there is one).
    pub resume: bool,
    pub device: Device,
    /// Where latents and text-encoder outputs are cached (shared across runs and jobs);
    /// `None` = `output_dir/.cache`.
    pub cache_dir: Option<PathBuf>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { resume: false, device: Device::Cpu, cache_dir: None }
    }
}

/// What a finished run produced.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutcome {
    pub final_step: u64,
    /// The final network file (`None` when cancelled before anything was saved).
    pub network_file: Option<PathBuf>,
    pub cancelled: bool,
}

/// Runs a training job to the end (or until `cancel`).
pub fn run(config: &TrainConfig, options: &RunOptions, sink: &mut dyn EventSink, cancel: &CancelToken) -> Result<TrainOutcome> {
    let _ = (config, options, sink, cancel);
    bail!("the training loop is being written")
}
