//! The device check of Loft's hand-written kernels (worker/kernels): every kernel on the device
//! against its CPU reference, with fresh random inputs in every supported dtype and output
//! buffers filled with NaN before each launch; every optimizer device vs host; the tiny
//! training loop with the kernels on and off; then each kernel's speed at the sizes users train,
//! beside the copy bandwidth measured on the same card. `loft bench kernels` runs it, and so does
//! worker/tests/kernels.rs when its test device is a GPU. On the CPU the ops run their
//! references, so the comparisons only show that it runs.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use crate::kernels;
use crate::optim::{Adafactor, AdafactorConfig, AdamW, AdamW8bit, AdamW8bitConfig, AdamWConfig, Lion, LionConfig, Optimizer, ParamGroup, Prodigy, ProdigyConfig};

/// Relative tolerance (max |a − b| / max |reference|) per dtype.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 4e-3,
        _ => 3e-2,
    }
}

fn randn(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1f32, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?)
}

/// max |a − b| / max(|b|, tiny), both read as f32 on the host.
fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?;
    let scale = b.abs()?.max(0)?.to_scalar::<f32>()?.max(1e-30) as f64;
    let diff = (a - &b)?.abs()?.max(0)?.to_scalar::<f32>()? as f64; // NaN propagates
    Ok(if diff.is_nan() { f64::INFINITY } else { diff / scale })
}

struct Report {
    failed: usize,
}

impl Report {
    fn row(&mut self, case: &str, diff: f64, tol: f64) {
        let ok = diff <= tol;
        self.failed += usize::from(!ok);
        println!("| {case} | {diff:.2e} | {} |", if ok { format!("{tol:e}") } else { "NO".into() });
    }
}

/// The median time of `f` over five runs after a warm-up, synchronising the device.
fn time(device: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    device.synchronize()?;
    let mut times = vec![];
    for _ in 0..5 {
        let t0 = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[2])
}

/// 20 steps of LoRA and LoHa training on the tiny SD 1.5 fixture on `device`, kernels on and
/// off: every step's loss within `tol` (relative). Returns the worst difference.
fn training_on_off(device_spec: &str, fixtures: &std::path::Path, algo: crate::networks::NetworkAlgo) -> Result<f64> {
    use crate::train::{run, CancelToken, EventLog, RunOptions, TrainConfig, TrainEvent};
    let root = std::env::temp_dir().join(format!("loft-kernel-check-{}-{}", std::process::id(), algo.name()));
    let data = root.join("data/4_shapes");
    std::fs::create_dir_all(&data)?;
    for i in 0..2u32 {
        let img = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb(if x >= 8 + i && x < 20 + i && (10..24).contains(&y) { [230, 90 * i as u8, 20] } else { [60 * i as u8, 40, 200] }));
        img.save(data.join(format!("img{i}.png")))?;
        std::fs::write(data.join(format!("img{i}.txt")), format!("a photo of a shape, number {i}"))?;
    }
    let losses = |on: bool, sub: &str| -> Result<Vec<f64>> {
        let cfg = TrainConfig {
            pretrained_model_name_or_path: fixtures.join("tiny-sd15"),
            train_data_dir: root.join("data"),
            output_dir: root.join(sub),
            resolution: 32,
            min_bucket_reso: 16,
            max_bucket_reso: 64,
            bucket_reso_steps: 8,
            network_algo: algo,
            network_dim: 4,
            network_alpha: 4.0,
            conv_dim: Some(4),
            conv_alpha: Some(2.0),
            learning_rate: 1e-2,
            max_train_epochs: 0,
            max_train_steps: 20,
            save_every_n_epochs: 0,
            seed: 7,
            save_precision: "float".into(),
            device: device_spec.into(),
            ..TrainConfig::default()
        };
        let mut events = EventLog::default();
        kernels::with_kernels(on, || run(&cfg, &RunOptions::default(), &mut events, &CancelToken::new())).with_context(|| format!("training with the kernels {}", if on { "on" } else { "off" }))?;
        Ok(events.0.iter().filter_map(|e| if let TrainEvent::Step { loss, .. } = e { Some(*loss) } else { None }).collect())
    };
    let (on, off) = (losses(true, "on")?, losses(false, "off")?);
    let _ = std::fs::remove_dir_all(&root);
    if on.len() != 20 || off.len() != 20 {
        bail!("expected 20 steps, got {} and {}", on.len(), off.len());
    }
    Ok(on.iter().zip(&off).map(|(a, b)| (a - b).abs() / b.abs().max(1e-6)).fold(0.0, f64::max))
}

/// Every check and (on a GPU) the speeds on the device `spec` names.
pub fn run(spec: &str, fixtures: &std::path::Path) -> Result<()> {
    let (device, line) = crate::device::select(spec).map_err(|e| anyhow::anyhow!("--device: {e:#}"))?;
    println!("{line}");
    run_on(&device, spec, fixtures, true)
}

/// The checks on `device` (`spec` names it for the training runs), then the speeds if asked and
/// on a GPU.
pub fn run_on(device: &Device, spec: &str, fixtures: &std::path::Path, with_speeds: bool) -> Result<()> {
    let device = device.clone();
    if device.is_cpu() {
        println!("(on the CPU every kernel op runs its reference: the comparisons below are of the reference with itself)");
    }
    kernels::set_poison_outputs(true);
    let mut report = Report { failed: 0 };
    println!("| kernel check | max relative difference | within |");
    println!("|---|---|---|");
    check_norms(&device, &mut report)?;
    check_attention(&device, &mut report)?;
    check_lowrank(&device, &mut report)?;
    check_optimizers(&device, &mut report)?;
    kernels::set_poison_outputs(false);
    for algo in [crate::networks::NetworkAlgo::Lora, crate::networks::NetworkAlgo::Loha] {
        // f32 steps; a GPU's libraries sum in other orders with the kernels off (cuBLAS, candle).
        let tol = if device.is_cpu() { 1e-4 } else { 1e-3 };
        let worst = training_on_off(spec, fixtures, algo).with_context(|| format!("tiny-sd15 {} training", algo.name()))?;
        report.row(&format!("tiny-sd15 {} training, 20 steps' losses, kernels on vs off", algo.name()), worst, tol);
    }
    if device.is_cpu() {
        println!("(speeds are measured on a GPU only)");
    } else if with_speeds {
        speeds(&device)?;
    }
    if report.failed > 0 {
        bail!("{} kernel check(s) beyond tolerance on {}", report.failed, crate::device::describe(&device));
    }
    println!("every kernel check within tolerance on {}", crate::device::describe(&device));
    Ok(())
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn check_norms(device: &Device, report: &mut Report) -> Result<()> {
    use kernels::norm::{backward, forward, NormShape};
    for dtype in DTYPES {
        for (name, dims, groups) in [("group norm 2×320×33×31", vec![2, 320, 33, 31], Some(32)), ("layer norm 2×77×768", vec![2, 77, 768], None)] {
            let s = match groups {
                Some(g) => NormShape::group(&dims, g)?,
                None => NormShape::layer(&dims)?,
            };
            let c = s.channels();
            for silu in [false, true] {
                let x = randn(&dims, dtype, device)?;
                let (gamma, beta, dy) = (randn(&[c], dtype, device)?, randn(&[c], dtype, device)?, randn(&dims, dtype, device)?);
                let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
                let (y, stats) = forward(&x, &gamma, Some(&beta), s, 1e-5, silu)?;
                let (y_ref, stats_ref) = forward(&cpu(&x)?, &cpu(&gamma)?, Some(&cpu(&beta)?), s, 1e-5, silu)?;
                let case = format!("{name} silu={silu} {dtype:?}");
                report.row(&format!("{case}: y"), rel_diff(&y, &y_ref)?, tolerance(dtype));
                report.row(&format!("{case}: rstd"), rel_diff(&stats.rstd, &stats_ref.rstd)?, 1e-4);
                let g = backward(&x, &gamma, Some(&beta), &stats, &dy, s, silu, [true, true, true])?;
                let g_ref = backward(&cpu(&x)?, &cpu(&gamma)?, Some(&cpu(&beta)?), &stats_ref, &cpu(&dy)?, s, silu, [true, true, true])?;
                report.row(&format!("{case}: dx"), rel_diff(g.dx.as_ref().unwrap(), g_ref.dx.as_ref().unwrap())?, tolerance(dtype) * 4.0);
                report.row(&format!("{case}: dgamma"), rel_diff(g.dgamma.as_ref().unwrap(), g_ref.dgamma.as_ref().unwrap())?, 1e-3);
                report.row(&format!("{case}: dbeta"), rel_diff(g.dbeta.as_ref().unwrap(), g_ref.dbeta.as_ref().unwrap())?, 1e-3);
            }
        }
    }
    Ok(())
}

fn check_attention(device: &Device, report: &mut Report) -> Result<()> {
    use kernels::attention::{backward, forward, HEAD_SIZES};
    for dtype in DTYPES {
        for d in HEAD_SIZES {
            // Self-attention and cross-attention to 77 tokens, odd lengths (partial tiles).
            for (nq, nk) in [(333, 333), (301, 77)] {
                let heads = 2;
                let (q, k, v, dout) = (randn(&[2, nq, heads * d], dtype, device)?, randn(&[2, nk, heads * d], dtype, device)?, randn(&[2, nk, heads * d], dtype, device)?, randn(&[2, nq, heads * d], dtype, device)?);
                let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
                let (out, lse) = forward(&q, &k, &v, heads)?;
                let (out_ref, lse_ref) = forward(&cpu(&q)?, &cpu(&k)?, &cpu(&v)?, heads)?;
                let case = format!("attention d={d} {nq}×{nk} {dtype:?}");
                report.row(&format!("{case}: out"), rel_diff(&out, &out_ref)?, tolerance(dtype));
                report.row(&format!("{case}: lse"), rel_diff(&lse, &lse_ref)?, 1e-4);
                let (dq, dk, dv) = backward(&q, &k, &v, &out, &lse, &dout, heads)?;
                let (dq_r, dk_r, dv_r) = backward(&cpu(&q)?, &cpu(&k)?, &cpu(&v)?, &cpu(&out)?, &cpu(&lse)?, &cpu(&dout)?, heads)?;
                for (what, a, b) in [("dq", &dq, &dq_r), ("dk", &dk, &dk_r), ("dv", &dv, &dv_r)] {
                    report.row(&format!("{case}: {what}"), rel_diff(a, b)?, tolerance(dtype) * 4.0);
                }
            }
        }
    }
    Ok(())
}

fn check_lowrank(device: &Device, report: &mut Report) -> Result<()> {
    use kernels::lowrank::{loha_grad, loha_merge, lokr_grad, lokr_merge};
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
    for dtype in DTYPES {
        let (w, p1, p2, g) = (randn(&[640, 640, 3, 3], dtype, device)?, randn(&[640, 5760], dtype, device)?, randn(&[640, 5760], dtype, device)?, randn(&[640, 640, 3, 3], dtype, device)?);
        report.row(&format!("loha merge 640×640×3×3 {dtype:?}"), rel_diff(&loha_merge(&w, &p1, &p2, 0.5)?, &loha_merge(&cpu(&w)?, &cpu(&p1)?, &cpu(&p2)?, 0.5)?)?, tolerance(dtype));
        let (d1, d2) = loha_grad(&g, &p1, &p2, 0.5)?;
        let (r1, r2) = loha_grad(&cpu(&g)?, &cpu(&p1)?, &cpu(&p2)?, 0.5)?;
        report.row(&format!("loha grad {dtype:?}"), rel_diff(&d1, &r1)?.max(rel_diff(&d2, &r2)?), tolerance(dtype));
        let (w, w1, w2, g) = (randn(&[1280, 1280], dtype, device)?, randn(&[8, 4], dtype, device)?, randn(&[160, 320], dtype, device)?, randn(&[1280, 1280], dtype, device)?);
        report.row(&format!("lokr merge 1280×1280 {dtype:?}"), rel_diff(&lokr_merge(&w, &w1, &w2, 0.5)?, &lokr_merge(&cpu(&w)?, &cpu(&w1)?, &cpu(&w2)?, 0.5)?)?, tolerance(dtype));
        let (d1, d2) = lokr_grad(&g, &w1, &w2, 0.5)?;
        let (r1, r2) = lokr_grad(&cpu(&g)?, &cpu(&w1)?, &cpu(&w2)?, 0.5)?;
        report.row(&format!("lokr grads {dtype:?}"), rel_diff(&d1, &r1)?.max(rel_diff(&d2, &r2)?), 1e-3);
    }
    let q = randn(&[80, 32, 32], DType::F32, device)?;
    let q = ((&q - q.transpose(1, 2)?)? * 0.1)?;
    let (r, inv) = kernels::cayley::forward(&q)?;
    let (r_ref, inv_ref) = kernels::cayley::forward(&cpu(&q)?)?;
    report.row("cayley 80×32×32", rel_diff(&r, &r_ref)?.max(rel_diff(&inv, &inv_ref)?), 1e-10);
    Ok(())
}

/// Three steps of AdamW and Lion over LoRA-shaped tensors: the device (one multi-tensor launch
/// a step) against the host loop, and clip_grad_norm's norm.
fn check_optimizers(device: &Device, report: &mut Report) -> Result<()> {
    let shapes: Vec<[usize; 2]> = (0..64).map(|i| if i % 2 == 0 { [16, 320 + 64 * (i % 5)] } else { [768 + 320 * (i % 3), 16] }).collect();
    let initial: Vec<Tensor> = shapes.iter().map(|s| Ok(Tensor::randn(0f32, 0.1, s.as_slice(), &Device::Cpu)?)).collect::<Result<_>>()?;
    for kind in ["AdamW", "Lion", "AdamW8bit", "Prodigy", "Adafactor"] {
        let make = |dev: &Device| -> Result<(Vec<Var>, Box<dyn Optimizer>)> {
            let vars: Vec<Var> = initial.iter().map(|t| Ok(Var::from_tensor(&t.to_device(dev)?)?)).collect::<Result<_>>()?;
            let params = vars.iter().enumerate().map(|(i, v)| (format!("t{i}"), v.clone())).collect();
            let groups = vec![ParamGroup::new("unet", 1e-3, params)];
            let opt: Box<dyn Optimizer> = match kind {
                "AdamW" => Box::new(AdamW::new(groups, AdamWConfig::default())?),
                "Lion" => Box::new(Lion::new(groups, LionConfig { betas: (0.9, 0.99), weight_decay: 0.01 })?),
                // Small enough that most tensors keep 8-bit moments.
                "AdamW8bit" => Box::new(AdamW8bit::new(groups, AdamW8bitConfig { min_8bit_size: 4096, ..AdamW8bitConfig::default() })?),
                "Prodigy" => Box::new(Prodigy::new(groups, ProdigyConfig { d0: 1e-3, weight_decay: 0.01, ..ProdigyConfig::default() })?),
                _ => Box::new(Adafactor::new(groups, AdafactorConfig { beta1: Some(0.9), ..AdafactorConfig::default() })?),
            };
            Ok((vars, opt))
        };
        let (dev_vars, mut dev_opt) = make(device)?;
        let (cpu_vars, mut cpu_opt) = make(&Device::Cpu)?;
        let mut norms = (0.0, 0.0);
        for step in 0..3 {
            let grads: Vec<Tensor> = shapes.iter().map(|s| Ok(Tensor::randn(0f32, 1.0, s.as_slice(), &Device::Cpu)?)).collect::<Result<_>>()?;
            for (vars, opt, dev, norm) in [(&dev_vars, &mut dev_opt, device, &mut norms.0), (&cpu_vars, &mut cpu_opt, &Device::Cpu, &mut norms.1)] {
                let mut loss: Option<Tensor> = None;
                for (v, g) in vars.iter().zip(&grads) {
                    let term = (v.as_tensor() * g.to_device(dev)?)?.sum_all()?;
                    loss = Some(match loss {
                        Some(l) => (l + term)?,
                        None => term,
                    });
                }
                let mut store = loss.context("no tensors")?.backward()?;
                *norm = crate::optim::clip_grad_norm(vars, &mut store, 1.0)?;
                opt.step(&store, 1.0 - 0.1 * step as f64)?;
            }
        }
        report.row(&format!("{kind} gradient norm (clip_grad_norm)"), (norms.0 - norms.1).abs() / norms.1, 1e-5);
        let worst = dev_vars.iter().zip(&cpu_vars).map(|(a, b)| rel_diff(a.as_tensor(), b.as_tensor())).collect::<Result<Vec<f64>>>()?.into_iter().fold(0.0, f64::max);
        // AdamW8bit's requantisation can land a value on the neighbouring code when the GPU's
        // fused multiply-adds round differently: its tolerance is one code step's effect.
        let tol = if kind == "AdamW8bit" { 1e-3 } else { 1e-5 };
        report.row(&format!("{kind} multi-tensor step, 64 tensors × 3 steps"), worst, tol);
    }
    Ok(())
}

/// Speeds at SD sizes: GB/s for the bandwidth-bound kernels (beside the copy bandwidth),
/// TFLOPS for attention.
fn speeds(device: &Device) -> Result<()> {
    let copy_src = Tensor::zeros(256 * 1024 * 1024, DType::F32, device)?; // 1 GiB
    let copy_s = time(device, || Ok(drop(copy_src.copy()?)))?;
    let copy_gbs = 2.0 * 1024f64.powi(3) / copy_s / 1e9;
    drop(copy_src);
    println!();
    println!("copy bandwidth: {copy_gbs:.0} GB/s");
    println!("| kernel (bf16) | time | achieved | of copy bandwidth |");
    println!("|---|---|---|---|");
    let dtype = DType::BF16;
    let gb = |bytes: f64, s: f64| bytes / s / 1e9;
    // GroupNorm + SiLU at SD1.5's 64×64 with 320 channels, batch 4: read x, write y (forward);
    // read x and dy, write dx (backward's dx kernel, which dominates).
    let dims = [4usize, 320, 64, 64];
    let s = kernels::norm::NormShape::group(&dims, 32)?;
    let x = randn(&dims, dtype, device)?;
    let (gamma, beta, dy) = (randn(&[320], dtype, device)?, randn(&[320], dtype, device)?, randn(&dims, dtype, device)?);
    let bytes = (x.elem_count() * 2) as f64;
    let t = time(device, || Ok(drop(kernels::norm::forward(&x, &gamma, Some(&beta), s, 1e-5, true)?)))?;
    println!("| group norm + SiLU forward 4×320×64×64 | {:.3} ms | {:.0} GB/s | {:.0} % |", t * 1e3, gb(2.0 * bytes, t), 100.0 * gb(2.0 * bytes, t) / copy_gbs);
    let (_, stats) = kernels::norm::forward(&x, &gamma, Some(&beta), s, 1e-5, true)?;
    let t = time(device, || Ok(drop(kernels::norm::backward(&x, &gamma, Some(&beta), &stats, &dy, s, true, [true, false, false])?)))?;
    println!("| group norm + SiLU backward (dx) | {:.3} ms | {:.0} GB/s | {:.0} % |", t * 1e3, gb(3.0 * bytes, t), 100.0 * gb(3.0 * bytes, t) / copy_gbs);
    // LoHa merge of a 1280×1280×3×3 conv: read W, P1, P2, write W′.
    let n = [1280usize, 1280, 3, 3];
    let (w, p1, p2) = (randn(&n, dtype, device)?, randn(&n, dtype, device)?, randn(&n, dtype, device)?);
    let t = time(device, || Ok(drop(kernels::lowrank::loha_merge(&w, &p1, &p2, 0.5)?)))?;
    let bytes = 4.0 * (w.elem_count() * 2) as f64;
    println!("| loha merge 1280×1280×3×3 | {:.3} ms | {:.0} GB/s | {:.0} % |", t * 1e3, gb(bytes, t), 100.0 * gb(bytes, t) / copy_gbs);
    println!();
    println!("| attention (bf16) | forward | backward | forward TFLOPS |");
    println!("|---|---|---|---|");
    for (label, b, n, nk, heads, d) in [("SD1.5 64² self, batch 4", 4, 4096, 4096, 8, 40), ("SD1.5 64² cross", 4, 4096, 77, 8, 40), ("SDXL 32² self", 2, 1024, 1024, 10, 64), ("SD1.5 32² self", 4, 1024, 1024, 8, 80), ("SD1.5 16² self", 4, 256, 256, 8, 160), ("Flux-sized 1024 tokens", 1, 1024, 1024, 24, 128)] {
        let (q, k, v) = (randn(&[b, n, heads * d], dtype, device)?, randn(&[b, nk, heads * d], dtype, device)?, randn(&[b, nk, heads * d], dtype, device)?);
        let tf = time(device, || Ok(drop(kernels::attention::forward(&q, &k, &v, heads)?)))?;
        let (out, lse) = kernels::attention::forward(&q, &k, &v, heads)?;
        let tb = time(device, || Ok(drop(kernels::attention::backward(&q, &k, &v, &out, &lse, &out, heads)?)))?;
        let flops = 4.0 * (b * heads * n * nk * d) as f64;
        println!("| {label} (d={d}) | {:.2} ms | {:.2} ms | {:.1} |", tf * 1e3, tb * 1e3, flops / tf / 1e12);
    }
    Ok(())
}
