//! What a training run reports while it runs. The engine knows no terminal, web or database:
//! it hands [`TrainEvent`]s to an [`EventSink`]. `loft train` draws a progress bar from them;
//! the queue worker stores each as a row and the dashboard streams them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What kind of file a checkpoint event announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// A kohya/LyCORIS network file saved at the end of an epoch.
    Epoch,
    /// A network file saved every N steps.
    Step,
    /// The final network file.
    Final,
    /// A resumable training state (adapter, optimizer, scheduler, RNG, data order).
    State,
}

/// One event of a training run. Serialized with a `kind` tag (`{"kind":"step",…}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TrainEvent {
    /// Training starts (or resumes at `start_step`).
    Started { total_steps: u64, total_epochs: u64, start_step: u64, steps_per_epoch: u64, images: usize },
    /// One optimizer step done. `loss` is this step's, `avg_loss` the running mean over the
    /// last epoch's worth of steps; `it_per_sec` and `eta_secs` are measured on this run.
    /// `lr` is the first group's learning rate, `lrs` every group's (`unet`, `unet_plus`,
    /// `text_encoder`, …) as the optimizer applies it this step.
    Step {
        step: u64,
        total_steps: u64,
        epoch: u64,
        loss: f64,
        avg_loss: f64,
        lr: f64,
        #[serde(default)]
        lrs: Vec<(String, f64)>,
        it_per_sec: f64,
        eta_secs: f64,
    },
    /// An epoch finished.
    Epoch { epoch: u64, total_epochs: u64, avg_loss: f64 },
    /// The validation loss after `step` (the held-out images at fixed timesteps and noise);
    /// `divergence` is it minus the running training loss (sd-scripts' `loss/validation/*`).
    /// `at_epoch_end`: the epoch's evaluation (else one every `validate_every_n_steps`).
    Validation {
        step: u64,
        epoch: u64,
        loss: f64,
        divergence: f64,
        #[serde(default)]
        at_epoch_end: bool,
    },
    /// A sample image was written.
    Sample { step: u64, epoch: u64, index: usize, prompt: String, path: PathBuf },
    /// A file was saved.
    Checkpoint { step: u64, epoch: u64, checkpoint: CheckpointKind, path: PathBuf },
    /// A file was removed by keep-last-N pruning.
    Pruned { path: PathBuf },
    /// A message for the log (`info`, `warn`).
    Log { level: String, message: String },
    /// The run ended normally (or was cancelled after saving, with `cancelled`).
    Finished { step: u64, path: Option<PathBuf>, cancelled: bool },
    /// The run failed.
    Failed { error: String },
}

/// Receives events. Implementations must be quick (the loop waits for them).
pub trait EventSink: Send {
    fn emit(&mut self, event: TrainEvent);
}

/// Any closure taking an event is a sink.
impl<F: FnMut(TrainEvent) + Send> EventSink for F {
    fn emit(&mut self, event: TrainEvent) {
        self(event)
    }
}

/// Collects events (tests).
#[derive(Default, Debug)]
pub struct EventLog(pub Vec<TrainEvent>);

impl EventSink for EventLog {
    fn emit(&mut self, event: TrainEvent) {
        self.0.push(event)
    }
}

/// Cancellation from outside the run: the loop checks it after every step, saves what the
/// cancel policy asks for, and returns with `Finished { cancelled: true }`.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst)
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
