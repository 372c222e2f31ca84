//! The optimizer's parameter groups, as sd-scripts' `LoRANetwork.prepare_optimizer_params`
//! builds them: one group per part (U-Net, text encoder) at that part's learning rate, and with
//! LoRA+ (`loraplus_lr_ratio`, or the per-part `loraplus_unet_lr_ratio` /
//! `loraplus_text_encoder_lr_ratio` that override it) each part's `lora_up` matrices in a second
//! group at `ratio × lr` — the LoRA+ paper's point is that B (up) wants a much larger step than
//! A (down). sd-scripts picks the "plus" parameters by name (`"lora_up" in name`), so algorithms
//! without up matrices (the LyCORIS family) keep one group per part; the run says so in its log.
//! `tests/parity/make_loraplus_fixtures.py` records sd-scripts' groups for the test.

use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::network::Network;
use crate::optim::ParamGroup;

/// What the resumable state records of each group, so that a resume with another layout
/// (LoRA+ switched on or off) is refused instead of loading the optimizer state into the wrong
/// groups.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub name: String,
    pub lr: f64,
    pub params: usize,
}

impl GroupRecord {
    pub fn of(groups: &[ParamGroup]) -> Vec<GroupRecord> {
        groups.iter().map(|g| GroupRecord { name: g.name.clone(), lr: g.lr, params: g.params.len() }).collect()
    }
}

/// The LoRA+ ratio for one part: the part's own ratio, else the shared one; 0 means unset (as
/// Python's `a or b` treats 0.0 and None alike).
pub fn loraplus_ratio(part_ratio: f64, shared_ratio: f64) -> Option<f64> {
    [part_ratio, shared_ratio].into_iter().find(|r| *r > 0.0)
}

/// The groups of one part (`unet`, `text_encoder`): every parameter at `lr`, or with a LoRA+
/// ratio the `lora_up` parameters apart as `<part>_plus` at `lr × ratio`. Empty groups are
/// left out. (sd-scripts also leaves out a group whose learning rate is 0; Loft keeps it, which
/// trains it the same way — not at all — and keeps `learning_rate = 0` runs well-formed.)
pub fn assemble<T: Clone>(part: &str, lr: f64, ratio: Option<f64>, params: &[(String, T)]) -> Vec<(String, f64, Vec<(String, T)>)> {
    let (plus, rest): (Vec<_>, Vec<_>) = params.iter().cloned().partition(|(name, _)| ratio.is_some() && name.contains("lora_up"));
    let mut groups = vec![];
    if !rest.is_empty() {
        groups.push((part.to_string(), lr, rest));
    }
    if let (Some(ratio), false) = (ratio, plus.is_empty()) {
        groups.push((format!("{part}_plus"), lr * ratio, plus));
    }
    groups
}

/// Every group of a run, and a warning when LoRA+ is asked for but finds no up matrices.
pub fn build(cfg: &TrainConfig, network: &Network) -> (Vec<ParamGroup>, Option<String>) {
    let parts = [
        ("unet", cfg.unet_learning_rate(), loraplus_ratio(cfg.loraplus_unet_lr_ratio, cfg.loraplus_lr_ratio), network.trainable(true)),
        (
            "text_encoder",
            cfg.text_encoder_learning_rate(),
            loraplus_ratio(cfg.loraplus_text_encoder_lr_ratio, cfg.loraplus_lr_ratio),
            network.trainable(false),
        ),
    ];
    let mut groups = vec![];
    let mut wants_plus = false;
    for (part, lr, ratio, params) in parts {
        wants_plus |= ratio.is_some() && !params.is_empty();
        groups.extend(assemble(part, lr, ratio, &params).into_iter().map(|(name, lr, params)| ParamGroup::new(name, lr, params)));
    }
    let has_plus = groups.iter().any(|g| g.name.ends_with("_plus"));
    let warning = (wants_plus && !has_plus).then(|| {
        format!(
            "LoRA+ ratio set, but {} has no lora_up matrices: every parameter keeps the base learning rate (sd-scripts ignores LoRA+ for it too)",
            cfg.network_algo.name()
        )
    });
    (groups, warning)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(groups: &[(String, f64, Vec<(String, ())>)]) -> Vec<(String, f64, usize)> {
        groups.iter().map(|(n, lr, p)| (n.clone(), *lr, p.len())).collect()
    }

    #[test]
    fn up_matrices_go_apart_only_with_a_ratio() {
        let params: Vec<(String, ())> = ["a.lora_down.weight", "a.lora_up.weight", "a.alpha_scale", "b.lora_up.weight"].iter().map(|n| (n.to_string(), ())).collect();
        assert_eq!(names(&assemble("unet", 1e-4, None, &params)), vec![("unet".into(), 1e-4, 4)]);
        assert_eq!(names(&assemble("unet", 1e-4, Some(16.0), &params)), vec![("unet".into(), 1e-4, 2), ("unet_plus".into(), 16e-4, 2)]);
        assert_eq!(loraplus_ratio(0.0, 16.0), Some(16.0));
        assert_eq!(loraplus_ratio(4.0, 16.0), Some(4.0));
        assert_eq!(loraplus_ratio(0.0, 0.0), None);
    }
}
