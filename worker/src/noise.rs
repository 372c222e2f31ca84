//! The diffusion objective as sd-scripts trains it: the DDPM noise schedule (with the optional
//! zero-terminal-SNR rescale), the noise (offset, multires pyramid, input perturbation), the
//! target (epsilon or v), and the per-sample loss weights (min-SNR-γ, v-pred-like, debiased
//! estimation) and loss functions (L2, L1, Huber, smooth L1 with the Huber schedules).
//!
//! Randomness comes from the caller's seeded RNG (never a global one), so a CPU run with a
//! seed is deterministic and resumable.

use candle_core::{bail, DType, Device, Result, Tensor, D};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::models::pipeline::SchedulerConfig;

/// ᾱ_t for t = 0 … T−1 and what follows from it.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    pub alphas_cumprod: Vec<f64>,
    pub v_prediction: bool,
}

impl NoiseSchedule {
    /// From the model's scheduler config; `zero_terminal_snr` rescales the betas so the last
    /// step is pure noise (Lin et al. 2023, sd-scripts' `fix_noise_scheduler_betas_for_zero_terminal_snr`).
    pub fn new(cfg: &SchedulerConfig, v_prediction: bool, zero_terminal_snr: bool) -> Result<Self> {
        let n = cfg.num_train_timesteps;
        if n < 2 {
            bail!("num_train_timesteps must be at least 2");
        }
        let lin = |a: f64, b: f64| -> Vec<f64> { (0..n).map(|i| a + (b - a) * i as f64 / (n - 1) as f64).collect() };
        let betas: Vec<f64> = match cfg.beta_schedule.as_str() {
            "scaled_linear" => lin(cfg.beta_start.sqrt(), cfg.beta_end.sqrt()).into_iter().map(|b| b * b).collect(),
            "linear" => lin(cfg.beta_start, cfg.beta_end),
            other => bail!("unsupported beta_schedule {other:?} (Loft knows scaled_linear and linear)"),
        };
        let mut alphas_cumprod = Vec::with_capacity(n);
        let mut acc = 1.0;
        for b in &betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        if zero_terminal_snr {
            // Shift √ᾱ so the last is 0, scale so the first keeps its value.
            let sqrt: Vec<f64> = alphas_cumprod.iter().map(|a| a.sqrt()).collect();
            let (s0, st) = (sqrt[0], sqrt[n - 1]);
            alphas_cumprod = sqrt.iter().map(|s| ((s - st) * s0 / (s0 - st)).powi(2)).collect();
        }
        Ok(Self { alphas_cumprod, v_prediction })
    }

    pub fn num_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Signal-to-noise ratio ᾱ/(1−ᾱ) at `t`.
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t];
        a / (1.0 - a)
    }

    /// `(√ᾱ_t, √(1−ᾱ_t))` per sample as `(B,1,1,1)` tensors.
    fn coefficients(&self, timesteps: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let b = timesteps.len();
        let a: Vec<f32> = timesteps.iter().map(|&t| self.alphas_cumprod[t].sqrt() as f32).collect();
        let s: Vec<f32> = timesteps.iter().map(|&t| (1.0 - self.alphas_cumprod[t]).sqrt() as f32).collect();
        Ok((Tensor::from_vec(a, (b, 1, 1, 1), device)?, Tensor::from_vec(s, (b, 1, 1, 1), device)?))
    }

    /// x_t = √ᾱ·x₀ + √(1−ᾱ)·ε (diffusers' `add_noise`).
    pub fn add_noise(&self, latents: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (a, s) = self.coefficients(timesteps, latents.device())?;
        let dt = latents.dtype();
        latents.broadcast_mul(&a.to_dtype(dt)?)? + noise.broadcast_mul(&s.to_dtype(dt)?)?
    }

    /// v = √ᾱ·ε − √(1−ᾱ)·x₀ (diffusers' `get_velocity`).
    pub fn velocity(&self, latents: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (a, s) = self.coefficients(timesteps, latents.device())?;
        let dt = latents.dtype();
        noise.broadcast_mul(&a.to_dtype(dt)?)? - latents.broadcast_mul(&s.to_dtype(dt)?)?
    }

    /// What the model learns to predict: ε, or v for v-prediction models.
    pub fn target(&self, latents: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        if self.v_prediction {
            self.velocity(latents, noise, timesteps)
        } else {
            Ok(noise.clone())
        }
    }
}

/// A tensor of standard normal values drawn from `rng`.
pub fn randn(rng: &mut impl Rng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(v, shape, device)
}

/// The noise settings of a run (registry keys).
#[derive(Clone, Debug, Default)]
pub struct NoiseOptions {
    pub noise_offset: f64,
    pub noise_offset_random_strength: bool,
    pub adaptive_noise_scale: f64,
    pub multires_noise_iterations: usize,
    pub multires_noise_discount: f64,
    pub ip_noise_gamma: f64,
    pub ip_noise_gamma_random_strength: bool,
}

/// The noise for one batch of latents `(B, C, H, W)`, and the noise actually added to make
/// x_t (which differs from the target noise only with input perturbation, `ip_noise_gamma`).
pub fn sample_noise(opts: &NoiseOptions, latents: &Tensor, rng: &mut impl Rng) -> Result<(Tensor, Tensor)> {
    let (b, c, h, w) = latents.dims4()?;
    let device = latents.device();
    let mut noise = randn(rng, &[b, c, h, w], device)?;
    if opts.noise_offset > 0.0 {
        // A per-channel constant shift lets the model learn overall brightness.
        let strength = if opts.noise_offset_random_strength { rng.random::<f64>() * opts.noise_offset } else { opts.noise_offset };
        let offset = if opts.adaptive_noise_scale != 0.0 {
            let mean = latents.to_dtype(DType::F32)?.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?.abs()?;
            ((mean * opts.adaptive_noise_scale)? + strength)?.clamp(0.0, f64::INFINITY)?
        } else {
            Tensor::full(strength as f32, (b, c, 1, 1), device)?
        };
        noise = (noise + offset.mul(&randn(rng, &[b, c, 1, 1], device)?)?.broadcast_as((b, c, h, w))?)?;
    }
    if opts.multires_noise_iterations > 0 {
        noise = pyramid_noise(&noise, opts.multires_noise_iterations, opts.multires_noise_discount, rng)?;
    }
    let applied = if opts.ip_noise_gamma > 0.0 {
        let gamma = if opts.ip_noise_gamma_random_strength { rng.random::<f64>() * opts.ip_noise_gamma } else { opts.ip_noise_gamma };
        (&noise + (randn(rng, &[b, c, h, w], device)? * gamma)?)?
    } else {
        noise.clone()
    };
    Ok((noise, applied))
}

/// Multires ("pyramid") noise: adds bilinearly upscaled low-resolution noise at shrinking
/// scales (random factor 2–4 per level) with weight `discount^i`, then renormalises to unit
/// standard deviation (sd-scripts' `pyramid_noise_like`).
pub fn pyramid_noise(noise: &Tensor, iterations: usize, discount: f64, rng: &mut impl Rng) -> Result<Tensor> {
    let (b, c, h, w) = noise.dims4()?;
    let mut acc: Vec<f32> = noise.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    for i in 0..iterations {
        let r: f64 = rng.random::<f64>() * 2.0 + 2.0;
        let scale = r.powi(i as i32);
        let hn = ((h as f64 / scale) as usize).max(1);
        let wn = ((w as f64 / scale) as usize).max(1);
        let small: Vec<f32> = (0..b * c * hn * wn).map(|_| StandardNormal.sample(rng)).collect();
        let weight = discount.powi(i as i32) as f32;
        for plane in 0..b * c {
            let src = &small[plane * hn * wn..(plane + 1) * hn * wn];
            for y in 0..h {
                let (y0, y1, fy) = bilinear_index(y, h, hn);
                for x in 0..w {
                    let (x0, x1, fx) = bilinear_index(x, w, wn);
                    let top = src[y0 * wn + x0] * (1.0 - fx) + src[y0 * wn + x1] * fx;
                    let bottom = src[y1 * wn + x0] * (1.0 - fx) + src[y1 * wn + x1] * fx;
                    acc[plane * h * w + y * w + x] += (top * (1.0 - fy) + bottom * fy) * weight;
                }
            }
        }
        if wn == 1 || hn == 1 {
            break;
        }
    }
    let n = acc.len() as f64;
    let mean = acc.iter().map(|&v| v as f64).sum::<f64>() / n;
    // torch.std is the unbiased estimate.
    let var = acc.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let std = var.sqrt() as f32;
    let out: Vec<f32> = acc.into_iter().map(|v| v / std).collect();
    Tensor::from_vec(out, (b, c, h, w), noise.device())?.to_dtype(noise.dtype())
}

/// PyTorch's bilinear source coordinates (`align_corners=False`) for output index `i` of
/// `n_out` from `n_in`: the two neighbours and the weight of the second.
fn bilinear_index(i: usize, n_out: usize, n_in: usize) -> (usize, usize, f32) {
    let scale = n_in as f32 / n_out as f32;
    let src = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
    let i0 = (src.floor() as usize).min(n_in - 1);
    let i1 = (i0 + 1).min(n_in - 1);
    (i0, i1, src - i0 as f32)
}

/// Timesteps for a batch, uniform in `[min, max)` (sd-scripts' `torch.randint(min, max)`).
pub fn sample_timesteps(rng: &mut impl Rng, batch: usize, min: usize, max: usize) -> Vec<usize> {
    (0..batch).map(|_| rng.random_range(min..max)).collect()
}

/// The loss settings of a run (registry keys).
#[derive(Clone, Debug)]
pub struct LossOptions {
    /// `l2`, `l1`, `huber`, `smooth_l1`.
    pub loss_type: String,
    /// `snr`, `exponential`, `constant`.
    pub huber_schedule: String,
    pub huber_c: f64,
    pub huber_scale: f64,
    pub min_snr_gamma: f64,
    pub scale_v_pred_loss_like_noise_pred: bool,
    pub v_pred_like_loss: f64,
    pub debiased_estimation_loss: bool,
}

impl Default for LossOptions {
    fn default() -> Self {
        LossOptions {
            loss_type: "l2".into(),
            huber_schedule: "snr".into(),
            huber_c: 0.1,
            huber_scale: 1.0,
            min_snr_gamma: 0.0,
            scale_v_pred_loss_like_noise_pred: false,
            v_pred_like_loss: 0.0,
            debiased_estimation_loss: false,
        }
    }
}

/// The Huber threshold c for timestep `t` (sd-scripts' `get_huber_threshold_if_needed`).
pub fn huber_c(opts: &LossOptions, schedule: &NoiseSchedule, t: usize) -> f64 {
    let c = match opts.huber_schedule.as_str() {
        "exponential" => {
            let alpha = -opts.huber_c.ln() / schedule.num_timesteps() as f64;
            (-alpha * t as f64).exp()
        }
        "snr" => {
            let a = schedule.alphas_cumprod[t];
            let sigma = ((1.0 - a) / a).sqrt();
            (1.0 - opts.huber_c) / (1.0 + sigma).powi(2) + opts.huber_c
        }
        _ => opts.huber_c,
    };
    c * opts.huber_scale
}

/// SNR clipped at 1000 (t = 0 has a huge SNR), as sd-scripts' `get_snr_scale` and debiased
/// estimation use it.
fn clipped_snr(schedule: &NoiseSchedule, t: usize) -> f64 {
    schedule.snr(t).min(1000.0)
}

/// The per-sample loss weight from min-SNR-γ, v-pred-like loss and debiased estimation, in
/// sd-scripts' order (`loss_weight` for prior preservation is applied by the caller).
pub fn timestep_weight(opts: &LossOptions, schedule: &NoiseSchedule, t: usize) -> f64 {
    let mut w = 1.0;
    if opts.min_snr_gamma > 0.0 {
        let snr = schedule.snr(t);
        let min = snr.min(opts.min_snr_gamma);
        w *= if schedule.v_prediction { min / (snr + 1.0) } else { min / snr };
    }
    if opts.scale_v_pred_loss_like_noise_pred {
        let s = clipped_snr(schedule, t);
        w *= s / (s + 1.0);
    }
    if opts.v_pred_like_loss > 0.0 {
        // loss + loss/scale·k with scale = snr/(snr+1)
        let s = clipped_snr(schedule, t);
        w *= 1.0 + opts.v_pred_like_loss * (s + 1.0) / s;
    }
    if opts.debiased_estimation_loss {
        w *= 1.0 / clipped_snr(schedule, t).sqrt();
    }
    w
}

/// The batch loss: element-wise loss of `pred` vs `target` `(B, C, H, W)` (in f32), mean per
/// sample, times each sample's timestep weight and `sample_weights` (prior-loss weight), mean
/// over the batch. Differentiable in `pred`.
pub fn diffusion_loss(
    opts: &LossOptions,
    schedule: &NoiseSchedule,
    pred: &Tensor,
    target: &Tensor,
    timesteps: &[usize],
    sample_weights: &[f64],
    masks: Option<&Tensor>,
) -> Result<Tensor> {
    let pred = pred.to_dtype(DType::F32)?;
    let target = target.to_dtype(DType::F32)?.detach();
    let b = timesteps.len();
    let device = pred.device();
    let diff = (&pred - &target)?;
    let per_elem = match opts.loss_type.as_str() {
        "l2" => diff.sqr()?,
        "l1" => diff.abs()?,
        "huber" | "smooth_l1" => {
            let cs: Vec<f32> = timesteps.iter().map(|&t| huber_c(opts, schedule, t) as f32).collect();
            let c = Tensor::from_vec(cs, (b, 1, 1, 1), device)?;
            // huber: 2c(√(d²+c²) − c); smooth_l1: 2(√(d²+c²) − c)
            let root = diff.sqr()?.broadcast_add(&c.sqr()?)?.sqrt()?.broadcast_sub(&c)?;
            if opts.loss_type == "huber" {
                (root.broadcast_mul(&c)? * 2.0)?
            } else {
                (root * 2.0)?
            }
        }
        other => bail!("unknown loss_type {other:?}"),
    };
    // A loss mask (B, 1, h, w) weights each element; the mean below still divides by every
    // element, masked or not, as sd-scripts' apply_masked_loss and its caller do.
    let per_elem = match masks {
        Some(m) => per_elem.broadcast_mul(&m.to_dtype(DType::F32)?)?,
        None => per_elem,
    };
    let per_sample = per_elem.flatten_from(1)?.mean(1)?; // (B,)
    let weights: Vec<f32> = timesteps
        .iter()
        .zip(sample_weights)
        .map(|(&t, &sw)| (timestep_weight(opts, schedule, t) * sw) as f32)
        .collect();
    let weights = Tensor::from_vec(weights, b, device)?;
    (per_sample * weights)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn sd_schedule(ztsnr: bool) -> NoiseSchedule {
        NoiseSchedule::new(&SchedulerConfig::default(), false, ztsnr).unwrap()
    }

    #[test]
    fn schedule_matches_known_stable_diffusion_values() {
        let s = sd_schedule(false);
        // diffusers DDPMScheduler(scaled_linear, 0.00085, 0.012): ᾱ_0 = 1 − 0.00085, ᾱ_999 ≈ 0.0047.
        assert!((s.alphas_cumprod[0] - 0.99915).abs() < 1e-9);
        assert!((s.alphas_cumprod[999] - 0.004660).abs() < 2e-5, "{}", s.alphas_cumprod[999]);
        let z = sd_schedule(true);
        assert_eq!(z.alphas_cumprod[999], 0.0, "zero terminal SNR");
        assert!((z.alphas_cumprod[0] - s.alphas_cumprod[0]).abs() < 1e-12, "first step kept");
        assert!(z.alphas_cumprod.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn noise_target_and_velocity_follow_the_definitions() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let x0 = randn(&mut rng, &[2, 4, 3, 3], &dev)?;
        let eps = randn(&mut rng, &[2, 4, 3, 3], &dev)?;
        let s = sd_schedule(false);
        let ts = [10, 900];
        let xt = s.add_noise(&x0, &eps, &ts)?;
        let v = s.velocity(&x0, &eps, &ts)?;
        // x₀ = √ᾱ·x_t − √(1−ᾱ)·v for both samples.
        for (i, &t) in ts.iter().enumerate() {
            let a = s.alphas_cumprod[t];
            let back = ((xt.get(i)? * a.sqrt())? - (v.get(i)? * (1.0 - a).sqrt())?)?;
            let err: f32 = (back - x0.get(i)?)?.abs()?.max_all()?.to_scalar()?;
            assert!(err < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn loss_weights_follow_sd_scripts() {
        let s = sd_schedule(false);
        let opts = LossOptions { min_snr_gamma: 5.0, ..Default::default() };
        // Low t: SNR ≫ γ so weight γ/SNR; high t: SNR < γ so weight 1.
        let t = 5;
        assert!((timestep_weight(&opts, &s, t) - 5.0 / s.snr(t)).abs() < 1e-12);
        assert!((timestep_weight(&opts, &s, 900) - 1.0).abs() < 1e-12);
        let deb = LossOptions { debiased_estimation_loss: true, ..Default::default() };
        assert!((timestep_weight(&deb, &s, 500) - 1.0 / s.snr(500).sqrt()).abs() < 1e-12);
        // Huber thresholds: constant is c·scale; snr schedule goes from ≈1 at t=0 toward c.
        let h = LossOptions { huber_schedule: "constant".into(), huber_c: 0.2, huber_scale: 2.0, ..Default::default() };
        assert!((huber_c(&h, &s, 500) - 0.4).abs() < 1e-12);
        let h = LossOptions { huber_schedule: "snr".into(), ..Default::default() };
        assert!(huber_c(&h, &s, 0) > 0.9 && huber_c(&h, &s, 999) < 0.2);
        let h = LossOptions { huber_schedule: "exponential".into(), huber_c: 0.1, ..Default::default() };
        assert!((huber_c(&h, &s, 0) - 1.0).abs() < 1e-12 && (huber_c(&h, &s, 1000) - 0.1).abs() < 1e-9);
    }

    #[test]
    fn losses_have_the_right_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let s = sd_schedule(false);
        let pred = candle_core::Var::from_vec(vec![1.0f32, -1.0, 0.5, 0.0], (1, 1, 2, 2), &dev)?;
        let target = Tensor::zeros((1, 1, 2, 2), DType::F32, &dev)?;
        let l2 = diffusion_loss(&LossOptions::default(), &s, pred.as_tensor(), &target, &[100], &[1.0], None)?;
        assert!((l2.to_scalar::<f32>()? - (1.0 + 1.0 + 0.25) / 4.0).abs() < 1e-6);
        let g = l2.backward()?;
        let grad: Vec<f32> = g.get(&pred).unwrap().flatten_all()?.to_vec1()?;
        assert_eq!(grad, vec![0.5, -0.5, 0.25, 0.0]); // 2·d/4
        let l1 = diffusion_loss(&LossOptions { loss_type: "l1".into(), ..Default::default() }, &s, pred.as_tensor(), &target, &[100], &[2.0], None)?;
        assert!((l1.to_scalar::<f32>()? - 2.0 * 2.5 / 4.0).abs() < 1e-6, "prior weight 2 doubles it");
        let hopts = LossOptions { loss_type: "huber".into(), huber_schedule: "constant".into(), huber_c: 0.5, ..Default::default() };
        let h = diffusion_loss(&hopts, &s, pred.as_tensor(), &target, &[100], &[1.0], None)?;
        let want: f64 = [1.0f64, 1.0, 0.5, 0.0].iter().map(|d| 2.0 * 0.5 * ((d * d + 0.25f64).sqrt() - 0.5)).sum::<f64>() / 4.0;
        assert!((h.to_scalar::<f32>()? as f64 - want).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn noise_options_change_the_noise_reproducibly() -> Result<()> {
        let dev = Device::Cpu;
        let latents = Tensor::ones((2, 4, 8, 8), DType::F32, &dev)?;
        let draw = |opts: &NoiseOptions| -> Result<(Vec<f32>, Vec<f32>)> {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let (n, a) = sample_noise(opts, &latents, &mut rng)?;
            Ok((n.flatten_all()?.to_vec1()?, a.flatten_all()?.to_vec1()?))
        };
        let plain = draw(&NoiseOptions::default())?;
        assert_eq!(plain, draw(&NoiseOptions::default())?, "seeded");
        assert_eq!(plain.0, plain.1);
        let offset = draw(&NoiseOptions { noise_offset: 0.1, ..Default::default() })?;
        assert_ne!(offset.0, plain.0);
        let multires = draw(&NoiseOptions { multires_noise_iterations: 6, multires_noise_discount: 0.3, ..Default::default() })?;
        let n = multires.0.len() as f64;
        let mean = multires.0.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (multires.0.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        assert!((std - 1.0).abs() < 1e-4, "pyramid noise is renormalised: {std}");
        let ip = draw(&NoiseOptions { ip_noise_gamma: 0.1, ..Default::default() })?;
        assert_eq!(ip.0, plain.0, "target noise unchanged");
        assert_ne!(ip.1, plain.1, "applied noise perturbed");
        Ok(())
    }
}
