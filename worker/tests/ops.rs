//! The ops with their own backward (`loft_worker::ops`) against candle's own autograd of the
//! same formulas (`with_reference_ops`): outputs and the gradient of every input, on random
//! tensors and through whole SD1.5 / SDXL fixture models with LoRA, LoCon (conv adapters) and
//! `full` trained.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use loft_worker::models::pipeline::StableDiffusion;
use loft_worker::networks::NetworkAlgo;
use loft_worker::noise::randn;
use loft_worker::ops::{self, with_reference_ops};
use loft_worker::train::network::Network;
use loft_worker::train::TrainConfig;
use rand::rngs::StdRng;
use rand::SeedableRng;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(name)
}

/// max |a − b| / max |a|.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let scale: f32 = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
    let diff: f32 = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
    assert!(scale > 0.0, "a zero tensor");
    diff / scale
}

/// Output and input gradients of `f` on fresh variables holding `inputs`, under a fixed
/// random projection of the output (so every output element matters).
fn value_and_grads(inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Option<Tensor>>) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let mut rng = StdRng::seed_from_u64(99);
    let proj = randn(&mut rng, out.dims(), out.device()).unwrap();
    let grads = out.mul(&proj).unwrap().sum_all().unwrap().backward().unwrap();
    (out.detach(), vars.iter().map(|v| grads.get(v).cloned()).collect())
}

fn assert_same(name: &str, inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor, tol: f32) {
    let (out_ref, grads_ref) = with_reference_ops(|| value_and_grads(inputs, f));
    let (out, grads) = value_and_grads(inputs, f);
    let d = rel_diff(&out_ref, &out);
    assert!(d <= tol, "{name}: outputs differ by {d:e}");
    for (i, (a, b)) in grads_ref.iter().zip(&grads).enumerate() {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap_or_else(|| panic!("{name}: input {i} lost its gradient")));
        let d = rel_diff(a, b);
        assert!(d <= tol, "{name}: gradient of input {i} differs by {d:e}");
    }
}

#[test]
fn linear_equals_candles_autograd() {
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(1);
    let x = randn(&mut rng, &[2, 5, 12], &dev).unwrap();
    let w = randn(&mut rng, &[7, 12], &dev).unwrap();
    let b = randn(&mut rng, &[7], &dev).unwrap();
    assert_same("linear+bias", &[x.clone(), w.clone(), b], &|t| ops::linear(&t[0], &t[1], Some(&t[2])).unwrap(), 1e-6);
    assert_same("linear", &[x, w], &|t| ops::linear(&t[0], &t[1], None).unwrap(), 1e-6);
}

#[test]
fn conv2d_equals_candles_autograd() {
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(2);
    // (kernel, stride, padding, height, width): the UNet's 3×3 "same" convs, its stride-2
    // downsamplers on even and odd sizes (non-square), 1×1 convs, and an unpadded 3×3.
    for (k, s, p, h, w) in [(3, 1, 1, 9, 7), (3, 2, 1, 8, 8), (3, 2, 1, 9, 6), (1, 1, 0, 5, 6), (3, 1, 0, 7, 8), (1, 2, 0, 7, 6)] {
        let x = randn(&mut rng, &[2, 3, h, w], &dev).unwrap();
        let wt = randn(&mut rng, &[4, 3, k, k], &dev).unwrap();
        let b = randn(&mut rng, &[4], &dev).unwrap();
        let name = format!("conv {k}×{k} stride {s} padding {p} on {h}×{w}");
        assert_same(&name, &[x.clone(), wt.clone(), b], &|t| ops::conv2d(&t[0], &t[1], Some(&t[2]), s, p).unwrap(), 1e-5);
        assert_same(&name, &[x, wt], &|t| ops::conv2d(&t[0], &t[1], None, s, p).unwrap(), 1e-5);
    }
}

#[test]
fn frozen_weights_get_no_gradient() {
    // A frozen (untracked) weight and bias: only x's gradient is computed.
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(3);
    let x = Var::from_tensor(&randn(&mut rng, &[1, 3, 6, 6], &dev).unwrap()).unwrap();
    let w = randn(&mut rng, &[4, 3, 3, 3], &dev).unwrap();
    let b = randn(&mut rng, &[4], &dev).unwrap();
    let y = ops::conv2d(x.as_tensor(), &w, Some(&b), 1, 1).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    assert!(grads.get(&w).is_none() && grads.get(&b).is_none(), "a frozen weight got a gradient");
    // Nothing tracked: no node at all (the output is the forward's own tensor).
    let y = ops::linear(&randn(&mut rng, &[3, 4], &dev).unwrap(), &randn(&mut rng, &[2, 4], &dev).unwrap(), None).unwrap();
    assert!(!y.track_op());
}

#[test]
fn attention_equals_plain_attention() {
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(4);
    // Head sizes of SD1.x (40, 80, 160) and SD2/SDXL (64); self-attention over more tokens
    // than one block (1024) holds, and cross-attention over 77·k text tokens.
    for (heads, d, nq, nk, self_attention) in [(2, 40, 1100, 1100, true), (1, 80, 300, 77, false), (2, 160, 64, 154, false), (2, 64, 1030, 1030, true), (3, 64, 50, 77, false)] {
        let q = randn(&mut rng, &[2, nq, heads * d], &dev).unwrap();
        let k = randn(&mut rng, &[2, nk, heads * d], &dev).unwrap();
        let v = randn(&mut rng, &[2, nk, heads * d], &dev).unwrap();
        let name = format!("{} attention, {heads} heads of {d}, {nq}×{nk} tokens", if self_attention { "self" } else { "cross" });
        assert_same(&name, &[q, k, v], &|t| ops::attention(&t[0], &t[1], &t[2], heads).unwrap(), 1e-5);
    }
}

/// The gradient of every trained variable through a whole fixture model (UNet and text
/// encoders) equals candle's own autograd of the plain formulas.
#[test]
fn models_give_the_reference_gradients() {
    for (name, preset) in [("tiny-sd15", "full"), ("tiny-sdxl", "full")] {
        for algo in [NetworkAlgo::Lora, NetworkAlgo::Locon, NetworkAlgo::Full] {
            let dev = Device::Cpu;
            let model = StableDiffusion::load(&fixture(name), DType::F32, &dev).unwrap();
            // kohya LoRA without conv_dim: linears and 1×1 convs; LoCon: also the 3×3 convs.
            let conv = (algo != NetworkAlgo::Lora).then_some(4);
            let cfg = TrainConfig { network_algo: algo, network_dim: 4, network_alpha: 4.0, conv_dim: conv, conv_alpha: conv.map(|c| c as f64), ..TrainConfig::default() };
            let network = Network::attach(&model, algo, &cfg.network_options(), preset, true, true).unwrap();
            network.set_training(true);
            let vars: Vec<(String, Var)> = network.all_trainable();
            // Non-zero factors everywhere, so no gradient is zero by construction.
            let mut rng = StdRng::seed_from_u64(5);
            for (_, v) in &vars {
                if algo != NetworkAlgo::Full {
                    let dims = v.dims().to_vec();
                    v.set(&(randn(&mut rng, &dims, &dev).unwrap() * 0.1).unwrap()).unwrap();
                }
            }
            if algo == NetworkAlgo::Locon {
                assert!(vars.iter().any(|(n, _)| n.contains("_conv1") || n.contains("_in_layers_2")), "{name}: LoCon has conv adapters inside the resnets");
            }
            let captions = vec!["a red square".to_string(), "a blue circle".to_string()];
            let latents = randn(&mut rng, &[2, 4, 16, 16], &dev).unwrap();
            let t = Tensor::new(&[300f32, 700.], &dev).unwrap();
            let time_ids = [[128f32, 128., 0., 0., 128., 128.]; 2];
            let loss = || {
                let e = model.encode_prompts(&captions, 1, 75).unwrap();
                let added = model.added_cond(e.pooled.as_ref(), &time_ids).unwrap();
                let pred = model.unet.forward(&latents, &t, &e.hidden, added.as_ref()).unwrap();
                pred.sqr().unwrap().mean_all().unwrap().backward().unwrap()
            };
            let reference = with_reference_ops(loss);
            let ours = loss();
            // Gradients that are zero in exact arithmetic (a key projection's bias shifts every
            // score of a row equally: softmax ignores it) are rounding noise in both; they are
            // compared against the largest gradient instead of their own size.
            let max_abs = |t: &Tensor| -> f32 { t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap() };
            let floor = vars.iter().filter_map(|(_, v)| reference.get(v)).map(max_abs).fold(0f32, f32::max) * 1e-5;
            let mut worst = 0f32;
            for (layer, v) in &vars {
                let Some(a) = reference.get(v) else {
                    assert!(ours.get(v).is_none(), "{name}: {layer} has a gradient only with the ops");
                    continue;
                };
                let b = ours.get(v).unwrap_or_else(|| panic!("{name} {}: {layer} lost its gradient", algo.name()));
                let d = max_abs(&(a - b).unwrap()) / max_abs(a).max(floor);
                worst = worst.max(d);
                assert!(d <= 1e-4, "{name} {}: {layer} gradient differs by {d:e}", algo.name());
            }
            eprintln!("{name} {}: {} gradients, worst relative difference {worst:.2e}", algo.name(), vars.len());
        }
    }
}

/// Forward and backward time of the conv op at SD1.5 sizes (256² images: 32×32 latents).
/// `cargo test --release -p loft-worker --test ops -- --ignored --nocapture bench_conv`
#[test]
#[ignore]
fn bench_conv() {
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(6);
    for (c, hw) in [(320, 32), (640, 16), (1280, 8), (1280, 4)] {
        let x = Var::from_tensor(&randn(&mut rng, &[1, c, hw, hw], &dev).unwrap()).unwrap();
        let w = randn(&mut rng, &[c, c, 3, 3], &dev).unwrap();
        let t0 = std::time::Instant::now();
        let y = ops::conv2d(x.as_tensor(), &w, None, 1, 1).unwrap();
        let fwd = t0.elapsed();
        let t1 = std::time::Instant::now();
        let _ = y.sum_all().unwrap().backward().unwrap();
        let bwd = t1.elapsed();
        let k = w.transpose(0, 1).unwrap().contiguous().unwrap();
        let t3 = std::time::Instant::now();
        let _ = y.conv2d(&k, 1, 1, 1, 1).unwrap();
        let conv = t3.elapsed();
        eprintln!("{c}ch {hw}×{hw}: forward {fwd:.1?}, backward {bwd:.1?} (of which a dX-sized conv: {conv:.1?})");
    }
}
