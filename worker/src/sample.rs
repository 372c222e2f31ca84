//! Sampling images: Euler (k-diffusion's discrete Euler, diffusers' `EulerDiscreteScheduler`)
//! and DDIM (η = 0) with classifier-free guidance, on any [`StableDiffusion`]; and the
//! sd-scripts prompt-file syntax (`a cat --n blurry --w 512 --h 768 --d 42 --l 7 --s 28`).
//!
//! Both samplers use the model's training schedule and "leading" timestep spacing with
//! `steps_offset` (what SD 1.x/2.x/XL's scheduler configs ask for).

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use rand::SeedableRng;

use crate::models::pipeline::StableDiffusion;
use crate::noise::{randn, NoiseSchedule};

/// Which sampler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampler {
    Euler,
    Ddim,
}

impl Sampler {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "euler" | "k_euler" => Sampler::Euler,
            "ddim" => Sampler::Ddim,
            other => bail!("unknown sampler {other:?}: Loft samples with euler or ddim"),
        })
    }
}

/// One image to render.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleRequest {
    pub prompt: String,
    pub negative: String,
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    /// Classifier-free guidance scale (`--l`; Flux: true CFG with the negative prompt when ≠ 1).
    pub cfg: f64,
    pub seed: u64,
    /// Flux dev's distilled guidance (`--g`, 3.5 as sd-scripts); schnell ignores it.
    pub guidance: f64,
}

impl SampleRequest {
    pub fn new(prompt: &str) -> Self {
        SampleRequest { prompt: prompt.into(), negative: String::new(), width: 512, height: 512, steps: 20, cfg: 7.0, seed: 0, guidance: 3.5 }
    }
}

/// Parses one line of an sd-scripts prompt file: the prompt, then options `--n` negative,
/// `--w`/`--h` size, `--d` seed, `--l` CFG scale, `--s` steps. Unknown options are errors
/// naming the option. `defaults` supplies what the line leaves out.
pub fn parse_prompt_line(line: &str, defaults: &SampleRequest) -> Result<SampleRequest> {
    let mut parts = line.split(" --");
    let mut req = defaults.clone();
    req.prompt = parts.next().unwrap_or("").trim().to_string();
    for part in parts {
        let (flag, value) = part.split_once(' ').unwrap_or((part, ""));
        let value = value.trim();
        let num = |what: &str| -> Result<f64> {
            value.parse::<f64>().with_context(|| format!("sample prompt {line:?}: --{flag} needs a number for the {what}, got {value:?}"))
        };
        match flag {
            "n" => req.negative = value.to_string(),
            "w" => req.width = num("width")? as u32,
            "h" => req.height = num("height")? as u32,
            "d" => req.seed = num("seed")? as u64,
            "l" => req.cfg = num("CFG scale")?,
            "s" => req.steps = num("steps")? as usize,
            "g" => req.guidance = num("guidance scale")?,
            other => bail!("sample prompt {line:?}: unknown option --{other} (known: --n --w --h --d --l --s --g)"),
        }
    }
    if req.width % 8 != 0 || req.height % 8 != 0 || req.width == 0 || req.height == 0 {
        bail!("sample prompt {line:?}: width and height must be positive multiples of 8, got {}×{}", req.width, req.height);
    }
    if req.steps == 0 {
        bail!("sample prompt {line:?}: steps must be at least 1");
    }
    Ok(req)
}

/// Every non-empty, non-comment (`#`) line of a prompt list.
pub fn parse_prompts(text: &str, defaults: &SampleRequest) -> Result<Vec<SampleRequest>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| parse_prompt_line(l, defaults))
        .collect()
}

/// "leading" spacing: `steps` timesteps `T/steps` apart, from high to low, plus `offset`.
fn leading_timesteps(num_train: usize, steps: usize, offset: usize) -> Vec<usize> {
    let ratio = (num_train / steps).max(1);
    (0..steps).rev().map(|i| (i * ratio + offset).min(num_train - 1)).collect()
}

/// Renders one image; returns it as `(3, H, W)` f32 in [0, 1].
pub fn sample_image(model: &StableDiffusion, schedule: &NoiseSchedule, sampler: Sampler, req: &SampleRequest, clip_skip: usize) -> Result<Tensor> {
    let factor = 2usize.pow(model.vae.config.block_out_channels.len().saturating_sub(1) as u32);
    // Flux packs 2×2 latent patches: its sizes are rounded down to a multiple of 2·factor (16
    // pixels), as sd-scripts rounds them.
    let step = if model.family.is_flux() { 2 * factor } else { factor };
    let fit = |v: u32| ((v as usize / step).max(1) * step) / factor;
    let (h, w) = (fit(req.height), fit(req.width));
    let channels = model.denoiser.latent_channels();
    let mut rng = rand::rngs::StdRng::seed_from_u64(req.seed);
    let noise = randn(&mut rng, &[1, channels, h, w], model.device())?;
    sample_image_from_noise(model, schedule, sampler, req, clip_skip, noise)
}

/// [`sample_image`] from given initial noise `(1, C, H/f, W/f)` (unit variance; the Euler
/// sampler scales it to its first σ) instead of the request's seed.
pub fn sample_image_from_noise(
    model: &StableDiffusion,
    schedule: &NoiseSchedule,
    sampler: Sampler,
    req: &SampleRequest,
    clip_skip: usize,
    noise: Tensor,
) -> Result<Tensor> {
    if model.family.is_flux() {
        return flux_sample(model, req, noise);
    }
    let device = model.device().clone();
    let dtype = model.dtype();
    let guided = req.cfg != 1.0;
    let prompts = if guided { vec![req.negative.clone(), req.prompt.clone()] } else { vec![req.prompt.clone()] };
    let embeds = model.encode_prompts(&prompts, clip_skip, 75)?;
    let n = prompts.len();
    let size = [[req.height as f32, req.width as f32, 0.0, 0.0, req.height as f32, req.width as f32]];
    let added = model.added_cond(embeds.pooled.as_ref(), &vec![size[0]; n])?;

    let noise = noise.to_dtype(DType::F32)?;
    let num_train = schedule.num_timesteps();
    let timesteps = leading_timesteps(num_train, req.steps, model.scheduler.steps_offset);
    let ac = &schedule.alphas_cumprod;

    // The model's output for latents x at timestep t, with guidance.
    let predict = |x: &Tensor, t: usize| -> Result<Tensor> {
        let xin = if guided { Tensor::cat(&[x, x], 0)? } else { x.clone() };
        let ts = Tensor::new(vec![t as f32; n], &device)?;
        let out = model.unet().forward(&xin.to_dtype(dtype)?, &ts, &embeds.hidden, added.as_ref())?.to_dtype(DType::F32)?;
        if guided {
            let (u, c) = (out.narrow(0, 0, 1)?, out.narrow(0, 1, 1)?);
            Ok((&u + ((c - &u)? * req.cfg)?)?)
        } else {
            Ok(out)
        }
    };

    let latents = match sampler {
        Sampler::Euler => {
            // σ_t = √((1−ᾱ)/ᾱ); x starts at σ_max·noise (scaled by √(σ²+1) as diffusers'
            // init_noise_sigma for "leading").
            let sigma = |t: usize| ((1.0 - ac[t]) / ac[t]).sqrt();
            let mut x = (noise * (sigma(timesteps[0]).powi(2) + 1.0).sqrt())?;
            for (i, &t) in timesteps.iter().enumerate() {
                let s = sigma(t);
                let c_in = 1.0 / (s * s + 1.0).sqrt();
                let out = predict(&(&x * c_in)?, t)?;
                let denoised = if schedule.v_prediction {
                    ((&x * (1.0 / (s * s + 1.0)))? - (out * (s / (s * s + 1.0).sqrt()))?)?
                } else {
                    (&x - (out * s)?)?
                };
                let s_next = timesteps.get(i + 1).map(|&tn| sigma(tn)).unwrap_or(0.0);
                let d = ((&x - denoised)? / s)?;
                x = (x + (d * (s_next - s))?)?;
            }
            x
        }
        Sampler::Ddim => {
            let mut x = noise;
            for (i, &t) in timesteps.iter().enumerate() {
                let out = predict(&x, t)?;
                let (a, a_prev) = (ac[t], timesteps.get(i + 1).map(|&tp| ac[tp]).unwrap_or(ac[0]));
                let (x0, eps) = if schedule.v_prediction {
                    let x0 = ((&x * a.sqrt())? - (&out * (1.0 - a).sqrt())?)?;
                    let eps = ((&out * a.sqrt())? + (&x * (1.0 - a).sqrt())?)?;
                    (x0, eps)
                } else {
                    (((&x - (&out * (1.0 - a).sqrt())?)? / a.sqrt())?, out)
                };
                x = ((x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?)?;
            }
            x
        }
    };
    let z = model.vae.from_model_latents(&latents)?;
    let image = model.vae.decode(&z.to_dtype(dtype)?)?.to_dtype(DType::F32)?;
    Ok(((image.squeeze(0)? + 1.0)? / 2.0)?.clamp(0.0, 1.0)?)
}

/// Flux: encodes the prompt (and the negative one for true CFG when `cfg` ≠ 1), runs
/// [`flux_denoise`] from the packed noise, unpacks and decodes.
fn flux_sample(model: &StableDiffusion, req: &SampleRequest, noise: Tensor) -> Result<Tensor> {
    let Some(flux) = model.flux() else { bail!("not a Flux model") };
    let dtype = model.dtype();
    let (_, _, h, w) = noise.dims4()?;
    let guided = req.cfg != 1.0;
    let prompts = if guided { vec![req.negative.clone(), req.prompt.clone()] } else { vec![req.prompt.clone()] };
    let embeds = model.encode_prompts(&prompts, 1, 75)?;
    let Some(pooled) = embeds.pooled.clone() else { bail!("flux: no pooled text embedding") };
    let x = crate::models::flux::pack_latents(&noise.to_dtype(DType::F32)?)?;
    let cond = FluxCond { txt: &embeds.hidden, pooled: &pooled, mask: embeds.mask.as_ref(), grid: (h / 2, w / 2), dtype };
    let x = flux_denoise(flux, x, &cond, req.steps, req.guidance, req.cfg)?;
    let latents = crate::models::flux::unpack_latents(&x, h, w)?;
    let z = model.vae.from_model_latents(&latents)?;
    let image = model.vae.decode(&z.to_dtype(dtype)?)?.to_dtype(DType::F32)?;
    Ok(((image.squeeze(0)? + 1.0)? / 2.0)?.clamp(0.0, 1.0)?)
}

/// The conditions of a Flux sample: T5 states and pooled CLIP output (batch 1, or 2 = negative
/// then positive for true CFG), the T5 mask, the packed grid and the compute dtype.
pub struct FluxCond<'a> {
    pub txt: &'a Tensor,
    pub pooled: &'a Tensor,
    pub mask: Option<&'a Tensor>,
    pub grid: (usize, usize),
    pub dtype: DType,
}

/// sd-scripts' `denoise`: Euler steps `x += (t_next − t)·v` over the shifted schedule
/// (`get_schedule(steps, tokens, shift=True)`), the distilled `guidance` embedded (dev), and
/// with `cfg` ≠ 1 true CFG `v = neg + (pos − neg)·cfg` from one batched call. `x` is the packed
/// noise `(1, N, 64)`; returns the packed latents.
pub fn flux_denoise(flux: &crate::models::flux::FluxTransformer, mut x: Tensor, cond: &FluxCond, steps: usize, guidance: f64, cfg: f64) -> Result<Tensor> {
    let guided = cfg != 1.0;
    let n = if guided { 2 } else { 1 };
    let schedule = crate::flow::sampling_schedule(steps, x.dim(1)?, true);
    let guidance = vec![guidance as f32; n];
    for pair in schedule.windows(2) {
        let (t, t_next) = (pair[0], pair[1]);
        let xin = if guided { Tensor::cat(&[&x, &x], 0)? } else { x.clone() };
        let inputs = crate::models::flux::FluxInputs {
            txt: cond.txt,
            pooled: cond.pooled,
            timesteps: &vec![t as f32; n],
            guidance: Some(&guidance),
            grid: cond.grid,
            txt_mask: cond.mask,
        };
        let out = flux.forward(&xin.to_dtype(cond.dtype)?, &inputs)?.to_dtype(DType::F32)?;
        let v = if guided {
            let (u, c) = (out.narrow(0, 0, 1)?, out.narrow(0, 1, 1)?);
            (&u + ((c - &u)? * cfg)?)?
        } else {
            out
        };
        x = (x + (v * (t_next - t))?)?;
    }
    Ok(x)
}

/// Writes a `(3, H, W)` image in [0, 1] as PNG.
pub fn save_png(image: &Tensor, path: &Path) -> Result<()> {
    let (c, h, w) = image.dims3()?;
    if c != 3 {
        bail!("expected a 3-channel image, got {c}");
    }
    let data: Vec<u8> = (image.permute((1, 2, 0))? * 255.0)?
        .round()?
        .clamp(0.0, 255.0)?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1()?;
    let buf = image::RgbImage::from_raw(w as u32, h as u32, data).context("image buffer")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    buf.save(path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_lines_parse_like_sd_scripts() {
        let d = SampleRequest::new("");
        let r = parse_prompt_line("a cat, sitting --n blurry, bad --w 256 --h 384 --d 42 --l 5.5 --s 12", &d).unwrap();
        assert_eq!(r.prompt, "a cat, sitting");
        assert_eq!(r.negative, "blurry, bad");
        assert_eq!((r.width, r.height, r.seed, r.steps), (256, 384, 42, 12));
        assert_eq!(r.cfg, 5.5);
        let e = parse_prompt_line("x --q 3", &d).unwrap_err().to_string();
        assert!(e.contains("--q"), "{e}");
        let e = parse_prompt_line("x --w 100", &d).unwrap_err().to_string();
        assert!(e.contains("multiples of 8"), "{e}");
        let all = parse_prompts("# comment\n\na dog\n a cat --s 3\n", &d).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].steps, 3);
    }

    #[test]
    fn leading_spacing_matches_diffusers() {
        // diffusers DDIM, 1000 steps, 10 inference steps, steps_offset 1: [901, 801, …, 1].
        assert_eq!(leading_timesteps(1000, 10, 1), vec![901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
    }
}
