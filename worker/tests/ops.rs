//! The ops with their own backward (`loft_worker::ops`) against candle's own autograd of the
//! same formulas on the CPU (`with_reference_ops`): outputs and the gradient of every input, on
//! random tensors and through whole SD1.5 / SDXL fixture models with LoRA, LoCon (conv
//! adapters) and `full` trained. The ops run on `device::test_device()`: CUDA when the binary
//! has it and a device answers, else the CPU.

use std::path::{Path, PathBuf};

use candle_core::{Device, Var};
use loft_worker::device::test_device;
use loft_worker::networks::NetworkAlgo;
use loft_worker::noise::randn;
use loft_worker::ops::{self, check};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(name)
}

/// f32 on the CPU: rounding only. On a GPU the libraries sum in other orders.
fn tolerance(device: &Device, cpu: f32) -> f32 {
    if device.is_cpu() {
        cpu
    } else {
        cpu * 10.0
    }
}

/// Linear (with and without bias), conv2d (3×3 "same", stride-2 downsamplers on even, odd and
/// non-square sizes, 1×1, unpadded, strided 1×1) and attention (head sizes 40/80/160/64,
/// self-attention over more than one key block, cross-attention over 77·k tokens): output and
/// every input gradient within 1e-5 of candle's autograd of the plain formulas.
#[test]
fn ops_equal_candles_autograd() {
    let device = test_device();
    let tol = tolerance(&device, 1e-5);
    let rows = check::check_ops(&device).unwrap();
    assert!(rows.len() >= 15);
    for r in rows {
        assert!(r.rel_diff <= tol, "{}: differs by {:e}", r.name, r.rel_diff);
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

/// The gradient of every trained variable through a whole fixture model (UNet and text
/// encoders) equals candle's own autograd of the plain formulas.
#[test]
fn models_give_the_reference_gradients() {
    let device = test_device();
    for name in ["tiny-sd15", "tiny-sdxl"] {
        let mut counts = vec![];
        for algo in [NetworkAlgo::Lora, NetworkAlgo::Locon, NetworkAlgo::Full] {
            let (n, worst) = check::check_model_gradients(&fixture(name), algo, &device).unwrap();
            eprintln!("{name} {}: {n} gradients, worst relative difference {worst:.2e}", algo.name());
            // f32 sums over thousands of terms with cancellation (full's weight gradients) in two GEMM
            // orders: seen up to 1.1e-4.
            assert!(worst <= tolerance(&device, 2e-4), "{name} {}: gradients differ by {worst:e}", algo.name());
            counts.push(n);
        }
        assert!(counts[1] > counts[0], "{name}: LoCon adapts the 3×3 convs LoRA leaves alone");
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
