//! Validation loss (sd-scripts' `validation_split`): the loss on held-out images, measured the
//! same way every time so that its curve shows over-fitting rather than noise.
//!
//! As in sd-scripts' `train_network.py`: every evaluation runs each validation batch (at most
//! `max_validation_steps` of them) at four fixed timesteps, `linspace(min_timestep,
//! max_timestep, 6)[1:-1]` (200, 400, 600, 800 by default), with noise drawn from the validation
//! seed afresh each evaluation, through the training loss (masks, SNR weighting and all), with
//! the network in eval mode (no dropout); the value is the mean over batches × timesteps. It
//! runs at the end of every `validate_every_n_epochs`-th epoch (0 = every epoch) and every
//! `validate_every_n_steps` steps. Captions are used as written (no shuffle or dropout) and
//! images are not flipped, so nothing but the network changes between evaluations.

use std::collections::{BTreeMap, HashMap};

use anyhow::Result;
use candle_core::{DType, Device};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::data::{derived_seed, validation_seed, LatentCache, TrainImage};
use super::{RunContext, TrainConfig};
use crate::data::images::Augment;
use crate::data::{process_caption, CaptionOptions};
use crate::noise::{sample_noise, NoiseOptions};

const SEED_VALIDATION: u64 = 4;
const NUM_VALIDATION_TIMESTEPS: usize = 4;

/// `numpy.linspace(min, max, NUM + 2, dtype=int)[1:-1]`: evenly spaced, truncated to integers.
pub fn validation_timesteps(min: usize, max: usize) -> Vec<usize> {
    let step = (max as f64 - min as f64) / (NUM_VALIDATION_TIMESTEPS + 1) as f64;
    // numpy computes i·step + start, then truncates; the last timestep the model knows is max − 1.
    (1..=NUM_VALIDATION_TIMESTEPS).map(|i| ((i as f64 * step + min as f64) as usize).min(max.saturating_sub(1))).collect()
}

/// The held-out batches and how to evaluate them.
pub struct Validation {
    /// Indices into the training set's `validation` images, grouped by bucket.
    batches: Vec<Vec<usize>>,
    pub timesteps: Vec<usize>,
    seed: u64,
    captions: CaptionOptions,
    /// Text-encoder states of the (fixed) validation captions, when the text encoder is frozen.
    text_cache: HashMap<String, crate::models::pipeline::PromptEmbeds>,
}

impl Validation {
    /// `None` without a validation split or when it holds no image.
    pub fn new(cfg: &TrainConfig, validation: &[TrainImage], captions: &CaptionOptions) -> Option<Self> {
        if cfg.validation_split <= 0.0 || validation.is_empty() {
            return None;
        }
        let mut by_bucket: BTreeMap<(u32, u32), Vec<usize>> = BTreeMap::new();
        for (i, img) in validation.iter().enumerate() {
            by_bucket.entry(img.bucket.bucket).or_default().push(i);
        }
        let mut batches: Vec<Vec<usize>> = by_bucket.values().flat_map(|m| m.chunks(cfg.train_batch_size.max(1)).map(<[usize]>::to_vec)).collect();
        if cfg.max_validation_steps > 0 {
            batches.truncate(cfg.max_validation_steps as usize);
        }
        let captions = CaptionOptions {
            shuffle_caption: false,
            caption_dropout_rate: 0.0,
            caption_dropout_every_n_epochs: 0,
            caption_tag_dropout_rate: 0.0,
            ..captions.clone()
        };
        Some(Validation {
            batches,
            timesteps: validation_timesteps(cfg.min_timestep, cfg.max_timestep),
            seed: validation_seed(cfg),
            captions,
            text_cache: HashMap::new(),
        })
    }

    pub fn batches(&self) -> usize {
        self.batches.len()
    }

    pub fn due_after_step(cfg: &TrainConfig, step: u64) -> bool {
        cfg.validate_every_n_steps > 0 && step % cfg.validate_every_n_steps == 0
    }

    pub fn due_after_epoch(cfg: &TrainConfig, epoch: u64) -> bool {
        cfg.validate_every_n_epochs == 0 || epoch % cfg.validate_every_n_epochs == 0
    }

    /// The validation loss of the network as it is now (in eval mode: no dropout).
    pub(super) fn evaluate(
        &mut self,
        ctx: &RunContext,
        noise_opts: &NoiseOptions,
        cached_latents: bool,
        train_te: bool,
        latent_cache: &mut LatentCache,
        device: &Device,
    ) -> Result<f64> {
        /// Puts the network back in training mode however the evaluation ends.
        struct EvalMode<'a>(&'a super::network::Network);
        impl Drop for EvalMode<'_> {
            fn drop(&mut self) {
                self.0.set_training(true);
            }
        }
        ctx.network.set_training(false);
        let _eval = EvalMode(ctx.network);
        let mut losses = vec![];
        for (bi, batch) in self.batches.iter().enumerate() {
            let images: Vec<&TrainImage> = batch.iter().map(|&i| &ctx.set.validation[i]).collect();
            let mut rng = StdRng::seed_from_u64(derived_seed(self.seed, SEED_VALIDATION, bi as u64, 0));
            let captions: Vec<String> = images.iter().map(|img| process_caption(&self.captions, &img.entry.caption, 1, 0, &mut rng)).collect();
            let embeds = ctx.text_states(&captions, !train_te, &mut self.text_cache)?;
            let unflipped: Vec<(&TrainImage, bool)> = images.iter().map(|img| (*img, false)).collect();
            let (latents, masks) = ctx.encode_batch(&unflipped, cached_latents, &Augment::default(), latent_cache, &mut rng, device)?;
            let weights = vec![1.0; images.len()];
            for (ti, &t) in self.timesteps.iter().enumerate() {
                let mut rng = StdRng::seed_from_u64(derived_seed(self.seed, SEED_VALIDATION, bi as u64, 1 + ti as u64));
                let (noise, applied_noise) = sample_noise(noise_opts, &latents, &mut rng)?;
                let timesteps = vec![t; images.len()];
                // Flux: the same fixed points as σ = t/1000.
                let sigmas: Option<Vec<f64>> = ctx.flow.as_ref().map(|_| timesteps.iter().map(|&t| t as f64 / 1000.0).collect());
                let loss = ctx.loss(&images, &latents, masks.as_ref(), &noise, &applied_noise, &timesteps, sigmas.as_deref(), &embeds, &weights, None)?;
                losses.push(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?);
            }
        }
        Ok(losses.iter().sum::<f64>() / losses.len().max(1) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_are_numpys_linspace() {
        // np.linspace(0, 1000, 6, dtype=int)[1:-1], np.linspace(100, 900, 6, dtype=int)[1:-1],
        // np.linspace(0, 999, 6, dtype=int)[1:-1]
        assert_eq!(validation_timesteps(0, 1000), [200, 400, 600, 800]);
        assert_eq!(validation_timesteps(100, 900), [260, 420, 580, 740]);
        assert_eq!(validation_timesteps(0, 999), [199, 399, 599, 799]);
    }
}
