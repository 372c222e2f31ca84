//! Learning-rate schedulers with the semantics of diffusers' `get_scheduler` (which sd-scripts
//! uses): each gives a multiplier `lr_at(step)` of the base learning rate, as torch's
//! `LambdaLR` does (`lr = base_lr · lambda(step)`), where `step` counts optimizer steps taken
//! (0 before the first).
//!
//! | `lr_scheduler` | multiplier after `lr_warmup_steps` W of linear warmup `step/W` |
//! |---|---|
//! | `constant` | 1 (no warmup) |
//! | `constant_with_warmup` | 1 |
//! | `linear` | `max(0, (T − step)/(T − W))` |
//! | `cosine` | `max(0, ½(1 + cos(π·2·cycles·progress)))`, cycles = 0.5 (diffusers' default) |
//! | `cosine_with_restarts` | `½(1 + cos(π·((cycles·progress) mod 1)))`, 0 once progress ≥ 1; cycles = `lr_scheduler_num_cycles` |
//! | `polynomial` | `((lr0 − lr_end)·(1 − progress)^power + lr_end)/lr0`, `lr_end/lr0` past T; lr_end = 1e-7 |
//!
//! with `T = max_train_steps` and `progress = (step − W)/max(1, T − W)`.
//! The state is the step counter (plus the settings, which are serialisable too).

use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    CosineWithRestarts,
    Polynomial,
}

impl SchedulerKind {
    /// The registry's `lr_scheduler` value.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            "cosine_with_restarts" => Self::CosineWithRestarts,
            "polynomial" => Self::Polynomial,
            other => bail!(
                "unknown lr_scheduler {other:?} (constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial)"
            ),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::ConstantWithWarmup => "constant_with_warmup",
            Self::Linear => "linear",
            Self::Cosine => "cosine",
            Self::CosineWithRestarts => "cosine_with_restarts",
            Self::Polynomial => "polynomial",
        }
    }
}

/// A scheduler's settings, under the registry's names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleConfig {
    pub lr_scheduler: SchedulerKind,
    pub lr_warmup_steps: u64,
    /// Total optimizer steps of the run (sd-scripts' max_train_steps).
    pub max_train_steps: u64,
    /// `cosine_with_restarts` only (default 1; plain `cosine` always uses 0.5, as diffusers).
    pub lr_scheduler_num_cycles: u64,
    /// `polynomial` only (default 1.0).
    pub lr_scheduler_power: f64,
    /// `polynomial` only: the base learning rate `lr0` (diffusers reads the optimizer's default
    /// lr) and the final one (1e-7).
    pub learning_rate: f64,
    pub lr_end: f64,
}

impl ScheduleConfig {
    pub fn new(kind: SchedulerKind, warmup: u64, total: u64) -> Self {
        Self {
            lr_scheduler: kind,
            lr_warmup_steps: warmup,
            max_train_steps: total,
            lr_scheduler_num_cycles: 1,
            lr_scheduler_power: 1.0,
            learning_rate: 1e-4,
            lr_end: 1e-7,
        }
    }
}

/// A scheduler and where it stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub config: ScheduleConfig,
    /// Optimizer steps taken so far.
    pub step: u64,
}

impl LrSchedule {
    pub fn new(config: ScheduleConfig) -> Result<Self> {
        let c = &config;
        let lr_ok = c.learning_rate > c.lr_end; // false for NaN too
        if c.lr_scheduler == SchedulerKind::Polynomial && !lr_ok {
            bail!(
                "lr_end ({}) must be smaller than the learning rate ({})",
                c.lr_end,
                c.learning_rate
            );
        }
        if c.lr_scheduler_power.is_nan() || c.lr_scheduler_power < 0.0 {
            bail!(
                "lr_scheduler_power must be ≥ 0, got {}",
                c.lr_scheduler_power
            );
        }
        Ok(Self { config, step: 0 })
    }

    /// The multiplier at the current step.
    pub fn multiplier(&self) -> f64 {
        self.lr_at(self.step)
    }

    /// Moves to the next step (call after each optimizer step).
    pub fn advance(&mut self) {
        self.step += 1;
    }

    /// The multiplier of the base learning rate at `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        let c = &self.config;
        let (w, t) = (c.lr_warmup_steps, c.max_train_steps);
        let cur = step as f64;
        let warmup = |div: f64| cur / div;
        if c.lr_scheduler == SchedulerKind::Constant {
            return 1.0;
        }
        if step < w {
            // diffusers: float(max(1.0, W)) for constant_with_warmup, float(max(1, W)) elsewhere: the same.
            return warmup((w.max(1)) as f64);
        }
        let progress = (cur - w as f64) / (t.saturating_sub(w).max(1)) as f64;
        match c.lr_scheduler {
            SchedulerKind::Constant | SchedulerKind::ConstantWithWarmup => 1.0,
            SchedulerKind::Linear => {
                let denom = t.saturating_sub(w).max(1) as f64;
                (0f64).max((t as f64 - cur) / denom)
            }
            SchedulerKind::Cosine => {
                let cycles = 0.5f64;
                (0f64).max(0.5 * (1.0 + (std::f64::consts::PI * cycles * 2.0 * progress).cos()))
            }
            SchedulerKind::CosineWithRestarts => {
                if progress >= 1.0 {
                    return 0.0;
                }
                let cycles = c.lr_scheduler_num_cycles as f64;
                (0f64).max(
                    0.5 * (1.0 + (std::f64::consts::PI * py_mod(cycles * progress, 1.0)).cos()),
                )
            }
            SchedulerKind::Polynomial => {
                let (lr0, lr_end) = (c.learning_rate, c.lr_end);
                if step > t {
                    lr_end / lr0
                } else {
                    let range = lr0 - lr_end;
                    // (diffusers divides by zero when T = W; Loft uses 1 there)
                    let decay_steps = (t as f64 - w as f64).max(1.0);
                    let pct_remaining = 1.0 - (cur - w as f64) / decay_steps;
                    let decay = range * pct_remaining.powf(c.lr_scheduler_power) + lr_end;
                    decay / lr0
                }
            }
        }
    }
}

/// Python's float `%` (result has the divisor's sign).
fn py_mod(a: f64, b: f64) -> f64 {
    let r = a % b;
    if r != 0.0 && (r < 0.0) != (b < 0.0) {
        r + b
    } else {
        r
    }
}
