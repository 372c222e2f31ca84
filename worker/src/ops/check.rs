//! The ops on a device against the reference on the CPU: what the GPU machine's check runs
//! (`loft bench check-device`), and what the tests run on whichever device
//! [`crate::device::test_device`] gives.
//!
//! Each case draws fixed random inputs on the CPU, computes the output and the gradient of
//! every input under a fixed random projection with the reference formulation on the CPU
//! ([`super::with_reference_ops`]) and with the ops on `device`, and reports the largest
//! relative difference (max |a − b| / max |a|) over the output and all gradients.

use candle_core::{Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::noise::randn;

/// One compared case: its name and the largest relative difference found.
pub struct CheckRow {
    pub name: String,
    pub rel_diff: f32,
}

type OpFn = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

/// (name, input shapes, the op) of every case.
fn cases() -> Vec<(String, Vec<Vec<usize>>, OpFn)> {
    let mut out: Vec<(String, Vec<Vec<usize>>, OpFn)> = vec![];
    out.push(("linear + bias".into(), vec![vec![2, 5, 12], vec![7, 12], vec![7]], Box::new(|t| super::linear(&t[0], &t[1], Some(&t[2])))));
    out.push(("linear".into(), vec![vec![2, 5, 12], vec![7, 12]], Box::new(|t| super::linear(&t[0], &t[1], None))));
    // The UNet's 3×3 "same" convs, its stride-2 downsamplers on even and odd (non-square)
    // sizes, 1×1 convs, an unpadded 3×3 and a strided 1×1.
    for (k, s, p, h, w) in [(3, 1, 1, 9, 7), (3, 2, 1, 8, 8), (3, 2, 1, 9, 6), (1, 1, 0, 5, 6), (3, 1, 0, 7, 8), (1, 2, 0, 7, 6)] {
        out.push((
            format!("conv {k}x{k} stride {s} padding {p} on {h}x{w} + bias"),
            vec![vec![2, 3, h, w], vec![4, 3, k, k], vec![4]],
            Box::new(move |t| super::conv2d(&t[0], &t[1], Some(&t[2]), s, p)),
        ));
        out.push((format!("conv {k}x{k} stride {s} padding {p} on {h}x{w}"), vec![vec![2, 3, h, w], vec![4, 3, k, k]], Box::new(move |t| super::conv2d(&t[0], &t[1], None, s, p))));
    }
    out.push(("silu".into(), vec![vec![2, 3, 5, 7]], Box::new(|t| super::silu(&t[0]))));
    out.push(("gelu (erf)".into(), vec![vec![4, 77, 9]], Box::new(|t| super::gelu_erf(&t[0]))));
    out.push(("group norm + bias".into(), vec![vec![2, 8, 5, 6], vec![8], vec![8]], Box::new(|t| super::group_norm(&t[0], 4, &t[1], Some(&t[2]), 1e-5))));
    out.push(("group norm".into(), vec![vec![2, 6, 7], vec![6]], Box::new(|t| super::group_norm(&t[0], 3, &t[1], None, 1e-6))));
    out.push(("layer norm + bias".into(), vec![vec![2, 5, 12], vec![12], vec![12]], Box::new(|t| super::layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5))));
    // Head sizes of SD1.x (40, 80, 160) and SD2/SDXL (64); self-attention over more queries
    // than one block holds, cross-attention over 77·k text tokens, and more keys than one
    // block holds (the online softmax).
    for (heads, d, nq, nk) in [(2, 40, 1100, 1100), (1, 80, 300, 77), (2, 160, 64, 154), (2, 64, 1030, 1030), (3, 64, 50, 77), (1, 40, 200, 4500)] {
        let kind = if nq == nk { "self" } else if nk > 4096 { "long" } else { "cross" };
        out.push((
            format!("{kind}-attention {heads} heads of {d}, {nq}x{nk} tokens"),
            vec![vec![2, nq, heads * d], vec![2, nk, heads * d], vec![2, nk, heads * d]],
            Box::new(move |t| super::attention(&t[0], &t[1], &t[2], heads)),
        ));
    }
    out
}

/// Output and input gradients of `f` on fresh variables holding `inputs`, under a fixed
/// random projection of the output, all returned on the CPU.
fn value_and_grads(inputs: &[Tensor], f: &OpFn) -> Result<Vec<Tensor>> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts)?;
    let mut rng = StdRng::seed_from_u64(99);
    let proj = randn(&mut rng, out.dims(), &Device::Cpu)?.to_device(out.device())?;
    let grads = out.mul(&proj)?.sum_all()?.backward()?;
    let mut all = vec![out.detach().to_device(&Device::Cpu)?];
    for (i, v) in vars.iter().enumerate() {
        match grads.get(v) {
            Some(g) => all.push(g.to_device(&Device::Cpu)?),
            None => candle_core::bail!("input {i} got no gradient"),
        }
    }
    Ok(all)
}

/// max |a − b| / max |a|.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let scale: f32 = a.abs()?.flatten_all()?.max(0)?.to_scalar()?;
    let diff: f32 = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar()?;
    Ok(if scale > 0.0 { diff / scale } else { diff })
}

/// Every case on `device` against the CPU reference.
pub fn check_ops(device: &Device) -> Result<Vec<CheckRow>> {
    let mut rows = vec![];
    let mut rng = StdRng::seed_from_u64(1);
    for (name, shapes, f) in cases() {
        let inputs: Vec<Tensor> = shapes.iter().map(|s| randn(&mut rng, s, &Device::Cpu)).collect::<Result<_>>()?;
        let reference = super::with_reference_ops(|| value_and_grads(&inputs, &f))?;
        let on_device: Vec<Tensor> = inputs.iter().map(|t| t.to_device(device)).collect::<Result<_>>()?;
        let ours = value_and_grads(&on_device, &f)?;
        let mut worst = 0f32;
        for (a, b) in reference.iter().zip(&ours) {
            worst = worst.max(rel_diff(a, b)?);
        }
        rows.push(CheckRow { name: name.clone(), rel_diff: worst });
        if device.is_cpu() {
            // The device-generic code a GPU runs, here on the CPU.
            let generic = super::with_device_generic_ops(|| value_and_grads(&on_device, &f))?;
            let mut worst = 0f32;
            for (a, b) in reference.iter().zip(&generic) {
                worst = worst.max(rel_diff(a, b)?);
            }
            rows.push(CheckRow { name: format!("{name} (device-generic code)"), rel_diff: worst });
        }
    }
    Ok(rows)
}

/// The gradients of every trained variable of `algo` (rank 4; LoCon also on the 3×3 convs)
/// on the UNet and text encoders of the model in `model_dir`, computed with the ops on
/// `device`, against the reference on the CPU: (how many variables, the largest relative
/// difference). Gradients that are zero in exact arithmetic (a key projection's bias shifts
/// every score of a row equally, which softmax ignores) are rounding noise in both and are
/// compared against 1e-5 × the largest gradient instead of their own size.
pub fn check_model_gradients(model_dir: &std::path::Path, algo: crate::networks::NetworkAlgo, device: &Device) -> anyhow::Result<(usize, f32)> {
    use crate::models::pipeline::StableDiffusion;
    use crate::networks::NetworkAlgo;
    use crate::train::network::Network;
    use candle_core::DType;
    let conv = (algo != NetworkAlgo::Lora).then_some(4);
    let cfg = crate::train::TrainConfig {
        network_algo: algo,
        network_dim: 4,
        network_alpha: 4.0,
        conv_dim: conv,
        conv_alpha: conv.map(|c| c as f64),
        ..crate::train::TrainConfig::default()
    };
    let grads_on = |dev: &Device, reference: bool| -> anyhow::Result<Vec<Option<Tensor>>> {
        let model = StableDiffusion::load(model_dir, DType::F32, dev)?;
        let network = Network::attach(&model, algo, &cfg.network_options(), "full", true, true)?;
        network.set_training(true);
        let vars = network.all_trainable();
        // Non-zero factors everywhere (drawn on the CPU: the same on every device), so no
        // gradient is zero by construction.
        let mut rng = StdRng::seed_from_u64(5);
        for (_, v) in &vars {
            if algo != NetworkAlgo::Full {
                let dims = v.dims().to_vec();
                v.set(&(randn(&mut rng, &dims, &Device::Cpu)? * 0.1)?.to_device(dev)?)?;
            }
        }
        let captions = vec!["a red square".to_string(), "a blue circle".to_string()];
        let latents = randn(&mut rng, &[2, 4, 16, 16], &Device::Cpu)?.to_device(dev)?;
        let t = Tensor::new(&[300f32, 700.], dev)?;
        let time_ids = [[128f32, 128., 0., 0., 128., 128.]; 2];
        let loss = || -> anyhow::Result<candle_core::backprop::GradStore> {
            let e = model.encode_prompts(&captions, 1, 75)?;
            let added = model.added_cond(e.pooled.as_ref(), &time_ids)?;
            let pred = model.unet().forward(&latents, &t, &e.hidden, added.as_ref())?;
            Ok(pred.sqr()?.mean_all()?.backward()?)
        };
        let grads = if reference { super::with_reference_ops(loss)? } else { loss()? };
        vars.iter().map(|(_, v)| grads.get(v).map(|g| g.to_device(&Device::Cpu)).transpose().map_err(Into::into)).collect()
    };
    let reference = grads_on(&Device::Cpu, true)?;
    let ours = grads_on(device, false)?;
    let max_abs = |t: &Tensor| -> Result<f32> { t.abs()?.flatten_all()?.max(0)?.to_scalar() };
    let mut floor = 0f32;
    for g in reference.iter().flatten() {
        floor = floor.max(max_abs(g)?);
    }
    floor *= 1e-5;
    let mut worst = 0f32;
    for (i, (a, b)) in reference.iter().zip(&ours).enumerate() {
        match (a, b) {
            (Some(a), Some(b)) => worst = worst.max(max_abs(&(a - b)?)? / max_abs(a)?.max(floor)),
            (None, None) => {}
            _ => anyhow::bail!("trained variable {i}: a gradient on one side only"),
        }
    }
    Ok((reference.len(), worst))
}
