//! Rectified flow (flow matching) for Flux, as sd-scripts' `flux_train_network.py` trains it:
//! the noisy input is `(1 − σ)·x + σ·noise`, the target `noise − x`, σ drawn by one of
//! sd-scripts' `timestep_sampling` schemes, the prediction optionally re-expressed
//! (`model_prediction_type`) and the loss weighted by σ (`weighting_scheme`). Sampling uses the
//! same schedule's Euler steps (`get_schedule` with the resolution-dependent shift).
//!
//! The functions take the uniform and normal draws as inputs, so a test can feed them the
//! draws sd-scripts' functions were run with (`tests/parity/make_flux_fixtures.py`).

use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// The flow-matching settings of a run (registry keys, sd-scripts' names).
#[derive(Clone, Debug, PartialEq)]
pub struct FlowOptions {
    /// `sigma`, `uniform`, `sigmoid`, `shift`, `flux_shift`.
    pub timestep_sampling: String,
    pub sigmoid_scale: f64,
    pub discrete_flow_shift: f64,
    /// `uniform`, `logit_normal`, `mode`, `sigma_sqrt`, `cosmap`.
    pub weighting_scheme: String,
    pub logit_mean: f64,
    pub logit_std: f64,
    pub mode_scale: f64,
    /// `raw`, `additive`, `sigma_scaled`.
    pub model_prediction_type: String,
}

impl Default for FlowOptions {
    /// sd-scripts' defaults.
    fn default() -> Self {
        FlowOptions {
            timestep_sampling: "sigma".into(),
            sigmoid_scale: 1.0,
            discrete_flow_shift: 3.0,
            weighting_scheme: "uniform".into(),
            logit_mean: 0.0,
            logit_std: 1.0,
            mode_scale: 1.29,
            model_prediction_type: "sigma_scaled".into(),
        }
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `exp(μ) / (exp(μ) + (1/t − 1)^σ)` (sd-scripts' `time_shift`, σ = 1).
pub fn time_shift(mu: f64, t: f64) -> f64 {
    mu.exp() / (mu.exp() + (1.0 / t - 1.0))
}

/// The shift μ for `image_seq_len` packed tokens: the line through (256, 0.5) and (4096, 1.15).
pub fn flux_mu(image_seq_len: usize) -> f64 {
    let m = (1.15 - 0.5) / (4096.0 - 256.0);
    m * image_seq_len as f64 + (0.5 - m * 256.0)
}

/// The sampling schedule: `steps + 1` times from 1 to 0, shifted for the image size
/// (sd-scripts' `get_schedule(steps, seq_len, shift=True)`), in f32 as torch computes it.
pub fn sampling_schedule(steps: usize, image_seq_len: usize, shift: bool) -> Vec<f64> {
    let mu = flux_mu(image_seq_len);
    (0..=steps)
        .map(|i| {
            // torch.linspace(1, 0, n) in f32
            let t = (1.0 - i as f64 / steps as f64) as f32;
            if !shift {
                return t as f64;
            }
            let e = (mu.exp()) as f32;
            (e / (e + (1.0 / t - 1.0))) as f64
        })
        .collect()
}

/// The draws one batch's σ needs.
pub struct Draws {
    pub uniform: Vec<f64>,
    pub normal: Vec<f64>,
}

impl Draws {
    pub fn sample(rng: &mut impl Rng, batch: usize) -> Self {
        Draws {
            uniform: (0..batch).map(|_| rng.random::<f64>()).collect(),
            normal: (0..batch).map(|_| StandardNormal.sample(rng)).collect(),
        }
    }
}

impl FlowOptions {
    pub fn check(&self) -> Result<()> {
        if !["sigma", "uniform", "sigmoid", "shift", "flux_shift"].contains(&self.timestep_sampling.as_str()) {
            bail!("timestep_sampling {:?}: expected sigma, uniform, sigmoid, shift or flux_shift", self.timestep_sampling);
        }
        if !["uniform", "logit_normal", "mode", "sigma_sqrt", "cosmap", "none"].contains(&self.weighting_scheme.as_str()) {
            bail!("weighting_scheme {:?}: expected uniform (or none), logit_normal, mode, sigma_sqrt or cosmap", self.weighting_scheme);
        }
        if !["raw", "additive", "sigma_scaled"].contains(&self.model_prediction_type.as_str()) {
            bail!("model_prediction_type {:?}: expected raw, additive or sigma_scaled", self.model_prediction_type);
        }
        Ok(())
    }

    /// Each sample's σ for latents of `h`×`w` (unpacked) from the draws, as sd-scripts'
    /// `get_noisy_model_input_and_timesteps`: `uniform` σ = u; `sigmoid` σ = sigmoid(s·n);
    /// `shift` the sigmoid shifted by `discrete_flow_shift`; `flux_shift` by the resolution's μ;
    /// `sigma` the shifted 1000-step scheduler's σ at ⌊u·1000⌋ with u from `weighting_scheme`'s
    /// density. f32 where sd-scripts computes in f32.
    pub fn sigmas(&self, draws: &Draws, h: usize, w: usize) -> Vec<f64> {
        let f = |x: f64| x as f32 as f64;
        let n = draws.uniform.len();
        (0..n)
            .map(|i| {
                let (u, z) = (draws.uniform[i], draws.normal[i]);
                match self.timestep_sampling.as_str() {
                    "uniform" => u,
                    "sigmoid" => f(sigmoid(f(self.sigmoid_scale * z))),
                    "shift" => {
                        let s = f(sigmoid(f(z * self.sigmoid_scale)));
                        let shift = self.discrete_flow_shift;
                        f(f(s * shift) / f(1.0 + (shift - 1.0) * s))
                    }
                    "flux_shift" => {
                        let s = f(sigmoid(f(z * self.sigmoid_scale)));
                        f(time_shift(flux_mu((h / 2) * (w / 2)), s))
                    }
                    _ => {
                        let density = match self.weighting_scheme.as_str() {
                            "logit_normal" => f(sigmoid(f(self.logit_mean + self.logit_std * z))),
                            "mode" => f(1.0 - u - self.mode_scale * ((std::f64::consts::PI * u / 2.0).cos().powi(2) - 1.0 + u)),
                            _ => u,
                        };
                        let index = ((density * 1000.0) as f32 as i64).clamp(0, 999) as usize;
                        scheduler_sigma(index, self.discrete_flow_shift)
                    }
                }
            })
            .collect()
    }

    /// The loss weight of σ (`sigma_scaled` only, as sd-scripts): σ⁻² for `sigma_sqrt`,
    /// `2/(π(1 − 2σ + 2σ²))` for `cosmap`, else 1.
    pub fn weighting(&self, sigma: f64) -> f64 {
        if self.model_prediction_type != "sigma_scaled" {
            return 1.0;
        }
        match self.weighting_scheme.as_str() {
            "sigma_sqrt" => sigma.powi(-2),
            "cosmap" => 2.0 / (std::f64::consts::PI * (1.0 - 2.0 * sigma + 2.0 * sigma * sigma)),
            _ => 1.0,
        }
    }

    /// The model's output as the loss sees it: `raw` as is, `additive` + the noisy input,
    /// `sigma_scaled` `pred·(−σ) + noisy` (sd-scripts' `apply_model_prediction_type`).
    /// `sigmas` broadcast as `(B, 1, 1, 1)`.
    pub fn apply_prediction_type(&self, pred: &Tensor, noisy: &Tensor, sigmas: &Tensor) -> candle_core::Result<Tensor> {
        match self.model_prediction_type.as_str() {
            "additive" => pred + noisy,
            "sigma_scaled" => pred.broadcast_mul(&sigmas.neg()?)? + noisy,
            _ => Ok(pred.clone()),
        }
    }
}

/// σ at index `i` of diffusers' `FlowMatchEulerDiscreteScheduler(1000, shift)`: its timesteps
/// `linspace(1, 1000, 1000)` reversed, over 1000, shifted (all in f32 as the scheduler).
pub fn scheduler_sigma(i: usize, shift: f64) -> f64 {
    // numpy's linspace in f64, reversed, then cast to f32 by torch.from_numpy(...).to(f32)
    let t = 1.0 + (999 - i) as f64 * (999.0 / 999.0);
    let s = (t as f32 / 1000.0) as f64;
    let shift32 = shift as f32 as f64;
    let num = (shift32 * s) as f32 as f64;
    let den = (1.0 + (shift32 - 1.0) * s) as f32 as f64;
    (num / den) as f32 as f64
}

/// The 1000-step timestep index of each σ (⌊1000σ⌋, at most 999), for what is keyed by
/// timestep (the loss's Huber schedule, validation's fixed points).
pub fn timestep_indices(sigmas: &[f64]) -> Vec<usize> {
    sigmas.iter().map(|s| ((s * 1000.0) as usize).min(999)).collect()
}

/// `(1 − σ)·latents + σ·noise`, σ `(B, 1, 1, 1)`.
pub fn noisy_input(latents: &Tensor, noise: &Tensor, sigmas: &Tensor) -> candle_core::Result<Tensor> {
    let keep = (sigmas.neg()? + 1.0)?;
    latents.broadcast_mul(&keep)? + noise.broadcast_mul(sigmas)?
}
