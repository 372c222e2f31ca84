//! Resumable training states: everything needed to continue a run exactly where it stopped —
//! the trained variables, the optimizer's buffers, and the position (step, epoch, batch).
//! The learning-rate schedule is a function of the step, and every random draw is seeded from
//! (seed, epoch, batch), so nothing else needs saving.
//!
//! Layout: `output_dir/state/step-00000042/{network,optimizer}.safetensors + progress.json`,
//! written to a `.part` folder and renamed, so a crash never leaves a half state behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

/// Where the run stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps done.
    pub step: u64,
    /// The epoch in progress (0-based) and the next batch of it to train.
    pub epoch: u64,
    pub batch: usize,
    /// Recent step losses (for the running average).
    pub recent_losses: Vec<f64>,
    /// Epoch files written so far (for keep-last-N pruning).
    pub saved_epoch_files: Vec<PathBuf>,
    pub saved_step_files: Vec<PathBuf>,
    /// A fingerprint of the settings that must not change between a state and its resume.
    pub fingerprint: String,
    /// fp16 mixed precision's loss scale (none in other precisions).
    #[serde(default)]
    pub loss_scale: Option<crate::optim::loss_scale::LossScale>,
    /// The optimizer's parameter groups (name, base learning rate, size); a resume must match.
    #[serde(default)]
    pub groups: Vec<super::param_groups::GroupRecord>,
    /// The latest validation loss (step, loss), for the file's metadata.
    #[serde(default)]
    pub last_validation: Option<(u64, f64)>,
}

pub fn state_root(output_dir: &Path) -> PathBuf {
    output_dir.join("state")
}

/// Saves a state; returns its folder.
pub fn save(output_dir: &Path, progress: &Progress, vars: &[(String, Var)], optimizer: &[(String, Tensor)]) -> Result<PathBuf> {
    let root = state_root(output_dir);
    let dir = root.join(format!("step-{:08}", progress.step));
    let tmp = root.join(format!("step-{:08}.part", progress.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let net: HashMap<String, Tensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    candle_core::safetensors::save(&net, tmp.join("network.safetensors"))?;
    let opt: HashMap<String, Tensor> = optimizer.iter().cloned().collect();
    candle_core::safetensors::save(&opt, tmp.join("optimizer.safetensors"))?;
    std::fs::write(tmp.join("progress.json"), serde_json::to_vec_pretty(progress)?)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).ok();
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("cannot move the state into {}", dir.display()))?;
    Ok(dir)
}

/// The saved states, oldest first.
pub fn list(output_dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(state_root(output_dir))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-") && !n.to_string_lossy().ends_with(".part")))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// A loaded state.
pub struct Loaded {
    pub dir: PathBuf,
    pub progress: Progress,
    pub network: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

pub fn load(dir: &Path, device: &Device) -> Result<Loaded> {
    let progress: Progress = serde_json::from_slice(&std::fs::read(dir.join("progress.json")).with_context(|| format!("{}: no progress.json", dir.display()))?)
        .with_context(|| format!("{}: progress.json is not a Loft training state", dir.display()))?;
    let network = candle_core::safetensors::load(dir.join("network.safetensors"), device).with_context(|| format!("{}: network.safetensors", dir.display()))?;
    let optimizer = candle_core::safetensors::load(dir.join("optimizer.safetensors"), device).with_context(|| format!("{}: optimizer.safetensors", dir.display()))?;
    Ok(Loaded { dir: dir.to_path_buf(), progress, network, optimizer })
}

/// Copies saved values into the run's variables; every variable must be in the state with its
/// shape (a state from another network config is refused).
pub fn restore_vars(vars: &[(String, Var)], saved: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
    if vars.len() != saved.len() {
        bail!("{}: the state has {} trained tensors but this network has {} (was the network config changed?)", dir.display(), saved.len(), vars.len());
    }
    for (name, var) in vars {
        let Some(t) = saved.get(name) else { bail!("{}: the state has no tensor {name} (was the network config changed?)", dir.display()) };
        if t.dims() != var.dims() {
            bail!("{}: tensor {name} has shape {:?} in the state but {:?} in this network", dir.display(), t.dims(), var.dims());
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}
