//! Loft's CUDA kernels run under the CPU emulation (worker/kernels/cpu_emulation.h), compared
//! with their CPU references; and the emulator's own tests. No GPU needed: the same .cu source
//! that nvcc compiles to PTX in the `cuda` build is compiled here with the host C++ compiler.

use half::{bf16, f16};
use loft_worker::kernels::emulation::{self, Dim3, Element, NormKernels};
use loft_worker::kernels::norm::{self, NormShape};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn random(n: usize, seed: u64, scale: f32, offset: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0)).collect()
}

fn convert<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

fn widen<T: Element>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Max |a − b| / (atol + rtol·|b|) ≤ 1, naming the first element that fails.
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= atol + rtol * w.abs();
        assert!(ok, "{what}: element {i} is {g}, the reference {w} (atol {atol}, rtol {rtol})");
    }
}

/// Runs `f` with the emulator in forward order, then in reverse order.
fn both_orders(mut f: impl FnMut(&str)) {
    let _serial = ORDER.lock().unwrap_or_else(|e| e.into_inner());
    emulation::set_reverse_order(false);
    f("forward order");
    emulation::set_reverse_order(true);
    f("reverse order");
    emulation::set_reverse_order(false);
}

/// The emulator's thread order is process-wide: tests that set it run one at a time.
static ORDER: std::sync::Mutex<()> = std::sync::Mutex::new(());

// ----------------------------------------------------------------------------------------------
// The emulator itself.

#[test]
fn the_emulator_converts_to_half_and_bfloat16_as_the_half_crate() {
    let mut values: Vec<f32> = random(20000, 1, 70000.0, 0.0);
    values.extend(random(5000, 2, 1e-4, 0.0)); // f16 subnormals
    values.extend([0.0, -0.0, 65504.0, 65519.0, 65520.0, 65536.0, f32::INFINITY, -f32::INFINITY, 5.9604645e-8, 2.9802322e-8, 8.940697e-8, 1.0009766, 1.0004883, 1.0014648]);
    for &v in &values {
        assert_eq!(emulation::f32_to_f16_bits(v), f16::from_f32(v).to_bits(), "f16 of {v:e}");
        assert_eq!(emulation::f32_to_bf16_bits(v), bf16::from_f32(v).to_bits(), "bf16 of {v:e}");
        let h = f16::from_f32(v);
        assert_eq!(emulation::f16_bits_to_f32(h.to_bits()).to_bits(), h.to_f32().to_bits(), "f16 {h} back to f32");
    }
    assert!(f16::from_bits(emulation::f32_to_f16_bits(f32::NAN)).is_nan());
    assert!(bf16::from_bits(emulation::f32_to_bf16_bits(f32::NAN)).is_nan());
}

#[test]
fn a_reduction_with_barriers_sums_in_either_thread_order() {
    let n = 1000;
    let x = random(n, 3, 1.0, 0.5);
    let blocks = n.div_ceil(256);
    let want: Vec<f32> = x.chunks(256).map(|c| c.iter().sum()).collect();
    both_orders(|order| {
        let mut out = vec![f32::NAN; blocks];
        unsafe { emulation::emu_selftest_tree_sum(Dim3::x(blocks as u32), Dim3::x(256), x.as_ptr(), out.as_mut_ptr(), n as i32) };
        assert_close(&format!("tree sum, {order}"), &out, &want, 1e-4, 1e-5);
    });
}

#[test]
fn the_emulator_exposes_a_missing_barrier_as_a_wrong_result() {
    let n = 1024;
    let x = random(n, 4, 1.0, 1.0); // positive: every partial sum matters
    let want: Vec<f32> = x.chunks(256).map(|c| c.iter().sum()).collect();
    let _serial = ORDER.lock().unwrap_or_else(|e| e.into_inner());
    emulation::set_reverse_order(false);
    let mut out = vec![f32::NAN; 4];
    unsafe { emulation::emu_selftest_tree_sum_racy(Dim3::x(4), Dim3::x(256), x.as_ptr(), out.as_mut_ptr(), n as i32) };
    for (b, (&got, &w)) in out.iter().zip(&want).enumerate() {
        assert!((got - w).abs() > 1.0, "block {b}: the racy reduction gave the right sum {got}; the emulator hid the race");
    }
}

#[test]
fn warp_shuffles_votes_and_atomics_reduce_across_warps_and_blocks() {
    let n = 1000; // the last block is partly out of range
    let x = random(n, 5, 1.0, 0.0);
    let blocks = n.div_ceil(128);
    let want: Vec<f32> = x.chunks(128).map(|c| c.iter().sum()).collect();
    let negatives = x.iter().filter(|&&v| v < 0.0).count() as u32;
    both_orders(|order| {
        let mut sums = vec![f32::NAN; blocks];
        let mut total = 0f32;
        let mut count = 0u32;
        unsafe { emulation::emu_selftest_shuffle_sum(Dim3::x(blocks as u32), Dim3::x(128), x.as_ptr(), sums.as_mut_ptr(), &mut total, &mut count, n as i32) };
        assert_close(&format!("shuffle sums, {order}"), &sums, &want, 1e-4, 1e-5);
        assert_close(&format!("atomic total, {order}"), &[total], &[x.iter().sum()], 1e-3, 1e-5);
        assert_eq!(count, negatives, "ballot count of negatives, {order}");
    });
}

#[test]
fn a_barrier_that_only_some_threads_reach_is_reported_not_hung() {
    if std::env::var_os("LOFT_EMU_DIVERGENT_CHILD").is_some() {
        let mut out = vec![0f32; 32];
        unsafe { emulation::emu_selftest_divergent_barrier(Dim3::x(1), Dim3::x(32), out.as_mut_ptr()) };
        return; // not reached: the emulator aborts
    }
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_barrier_that_only_some_threads_reach_is_reported_not_hung", "--nocapture", "--test-threads=1"])
        .env("LOFT_EMU_DIVERGENT_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&child.stderr);
    assert!(!child.status.success(), "the divergent barrier ran to the end: {stderr}");
    assert!(stderr.contains("cpu_emulation: deadlock"), "no deadlock report: {stderr}");
}

// ----------------------------------------------------------------------------------------------
// GroupNorm / LayerNorm (+ SiLU).

struct NormCase {
    name: &'static str,
    dims: Vec<usize>,
    groups: Option<usize>, // None: LayerNorm
}

fn norm_cases() -> Vec<NormCase> {
    vec![
        // An odd 5×7 map, two channels a group: 70 elements a row (a partial warp).
        NormCase { name: "group norm 2×8×5×7, 4 groups", dims: vec![2, 8, 5, 7], groups: Some(4) },
        // Rows longer than a block (each thread loops).
        NormCase { name: "group norm 1×32×16×20, 4 groups", dims: vec![1, 32, 16, 20], groups: Some(4) },
        // LayerNorm over 320 channels; and over 40, a partial column tile.
        NormCase { name: "layer norm 2×5×320", dims: vec![2, 5, 320], groups: None },
        NormCase { name: "layer norm 3×11×40", dims: vec![3, 11, 40], groups: None },
    ]
}

fn shape_of(case: &NormCase) -> NormShape {
    match case.groups {
        Some(g) => NormShape::group(&case.dims, g).unwrap(),
        None => NormShape::layer(&case.dims).unwrap(),
    }
}

/// (atol, rtol) of a kernel output in dtype T against the f64 reference.
fn tolerance<T: Element>() -> (f32, f32) {
    match T::SUFFIX {
        "f32" => (2e-5, 2e-5),
        "f16" => (4e-3, 2e-3),
        _ => (3e-2, 1.6e-2),
    }
}

fn check_norm<T: NormKernels>(case: &NormCase, silu: bool, bias: bool, order: &str) {
    let s = shape_of(case);
    let len: usize = case.dims.iter().product();
    let c = s.channels();
    // Inputs rounded to T first, so kernel and reference see the same numbers.
    let x = convert::<T>(&random(len, 10, 2.0, 0.7));
    let gamma = convert::<T>(&random(c, 11, 0.5, 1.0));
    let beta = convert::<T>(&random(c, 12, 0.5, 0.0));
    let dy = convert::<T>(&random(len, 13, 1.0, 0.0));
    let beta_t = bias.then_some(beta.as_slice());
    let (xf, gf, bf, dyf) = (widen(&x), widen(&gamma), widen(&beta), widen(&dy));
    let bf = bias.then_some(bf.as_slice());
    let what = format!("{} {} silu={silu} bias={bias} {order}", case.name, T::SUFFIX);
    let (atol, rtol) = tolerance::<T>();

    let (y, mean, rstd) = norm::emulated_forward(&x, &gamma, beta_t, s, 1e-5, silu).unwrap();
    let (y_ref, mean_ref, rstd_ref) = norm::reference_forward(&xf, &gf, bf, s, 1e-5, silu);
    assert_close(&format!("{what}: mean"), &mean, &mean_ref, 1e-5, 1e-5);
    assert_close(&format!("{what}: rstd"), &rstd, &rstd_ref, 1e-5, 1e-4);
    assert_close(&format!("{what}: y"), &widen(&y), &y_ref, atol, rtol);

    // The backward from the reference statistics, so that only the backward is compared.
    let (dx, dgamma, dbeta) = norm::emulated_backward(&x, &gamma, beta_t, &mean_ref, &rstd_ref, &dy, s, silu).unwrap();
    let (dx_ref, dgamma_ref, dbeta_ref) = norm::reference_backward(&xf, &gf, bf, &mean_ref, &rstd_ref, &dyf, s, silu);
    assert_close(&format!("{what}: dx"), &widen(&dx), &dx_ref, atol * 4.0, rtol * 2.0);
    // Sums over up to ~150 elements accumulated in f32.
    let scale = (len / c) as f32;
    assert_close(&format!("{what}: dgamma"), &dgamma, &dgamma_ref, 1e-4 * scale, 1e-4);
    assert_close(&format!("{what}: dbeta"), &dbeta, &dbeta_ref, 1e-4 * scale, 1e-4);
}

#[test]
fn norm_kernels_equal_the_reference_in_f32_in_either_thread_order() {
    // Every kernel (the SiLU variants run the same code plus the activation) in both orders,
    // the plain and bias-free variants once.
    both_orders(|order| {
        for case in norm_cases() {
            check_norm::<f32>(&case, true, true, order);
        }
    });
    let _serial = ORDER.lock().unwrap_or_else(|e| e.into_inner());
    for case in norm_cases() {
        check_norm::<f32>(&case, false, true, "forward order");
        check_norm::<f32>(&case, false, false, "forward order");
    }
}

#[test]
fn norm_kernels_equal_the_reference_in_f16_and_bf16() {
    let _serial = ORDER.lock().unwrap_or_else(|e| e.into_inner());
    for case in norm_cases() {
        for silu in [false, true] {
            check_norm::<f16>(&case, silu, true, "forward order");
            check_norm::<bf16>(&case, silu, true, "forward order");
        }
    }
}

/// The reference the kernels are held to equals the engine's candle formulation of the norm
/// (the one checked against diffusers), forward and every gradient.
#[test]
fn the_norm_reference_equals_the_engines_candle_norm() {
    use candle_core::{Device, Tensor, Var};
    use loft_worker::ops;
    for case in norm_cases() {
        let s = shape_of(&case);
        let len: usize = case.dims.iter().product();
        let c = s.channels();
        let x = Var::from_vec(random(len, 20, 2.0, 0.3), case.dims.as_slice(), &Device::Cpu).unwrap();
        let w = Var::from_vec(random(c, 21, 0.5, 1.0), c, &Device::Cpu).unwrap();
        let b = Var::from_vec(random(c, 22, 0.5, 0.0), c, &Device::Cpu).unwrap();
        let dy = Tensor::from_vec(random(len, 23, 1.0, 0.0), case.dims.as_slice(), &Device::Cpu).unwrap();
        let run = |kernels: bool| {
            loft_worker::kernels::with_kernels(kernels, || {
                let y = match case.groups {
                    Some(g) => ops::group_norm(&x, g, &w, Some(&b), 1e-5),
                    None => ops::layer_norm(&x, &w, Some(&b), 1e-5),
                }
                .unwrap();
                let grads = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                (flat(&y), flat(grads.get(&x).unwrap()), flat(grads.get(&w).unwrap()), flat(grads.get(&b).unwrap()))
            })
        };
        let (candle, kernel_op) = (run(false), run(true));
        assert_close(&format!("{}: y", case.name), &kernel_op.0, &candle.0, 2e-5, 1e-4);
        assert_close(&format!("{}: dx", case.name), &kernel_op.1, &candle.1, 5e-5, 1e-3);
        assert_close(&format!("{}: dgamma", case.name), &kernel_op.2, &candle.2, 1e-3, 1e-4);
        assert_close(&format!("{}: dbeta", case.name), &kernel_op.3, &candle.3, 1e-3, 1e-4);
    }
}

// ----------------------------------------------------------------------------------------------
// Attention.

use loft_worker::kernels::attention::{self, AttentionShape};
use loft_worker::kernels::emulation::AttentionKernels;

fn check_attention<T: AttentionKernels>(s: AttentionShape, order: &str) {
    let (lq, lk) = (s.batch * s.nq * s.heads * s.d, s.batch * s.nk * s.heads * s.d);
    let q = convert::<T>(&random(lq, 30 + s.d as u64, 1.5, 0.0));
    let k = convert::<T>(&random(lk, 31 + s.d as u64, 1.5, 0.0));
    let v = convert::<T>(&random(lk, 32 + s.d as u64, 1.0, 0.2));
    let dout = convert::<T>(&random(lq, 33 + s.d as u64, 1.0, 0.0));
    let (qf, kf, vf, dof) = (widen(&q), widen(&k), widen(&v), widen(&dout));
    let what = format!("attention {s:?} {} {order}", T::SUFFIX);
    let (atol, rtol) = tolerance::<T>();

    let (out, lse) = attention::emulated_forward(&q, &k, &v, s).unwrap();
    let (out_ref, lse_ref) = attention::reference_forward(&qf, &kf, &vf, s);
    assert_close(&format!("{what}: lse"), &lse, &lse_ref, 1e-4, 1e-5);
    assert_close(&format!("{what}: out"), &widen(&out), &out_ref, atol, rtol);

    // The backward from the reference forward (out rounded to T, as the op keeps it).
    let out_t = convert::<T>(&out_ref);
    let (dq, dk, dv) = attention::emulated_backward(&q, &k, &v, &out_t, &lse_ref, &dout, s).unwrap();
    let (dq_ref, dk_ref, dv_ref) = attention::reference_backward(&qf, &kf, &vf, &widen(&out_t), &lse_ref, &dof, s);
    assert_close(&format!("{what}: dq"), &dq, &dq_ref, 2e-4, 1e-3);
    assert_close(&format!("{what}: dk"), &widen(&dk), &dk_ref, atol.max(2e-4), rtol.max(1e-3));
    assert_close(&format!("{what}: dv"), &widen(&dv), &dv_ref, atol.max(2e-4), rtol.max(1e-3));
}

fn attention_cases(d: usize) -> Vec<AttentionShape> {
    vec![
        // Self-attention with partial query and key tiles.
        AttentionShape { batch: 1, heads: 2, nq: 45, nk: 45, d },
        // Cross-attention: 77 text tokens, two samples.
        AttentionShape { batch: 2, heads: 1, nq: 33, nk: 77, d },
    ]
}

#[test]
fn attention_kernels_equal_the_reference_for_every_head_size_in_f32_in_either_thread_order() {
    both_orders(|order| {
        for d in attention::HEAD_SIZES {
            for s in attention_cases(d) {
                check_attention::<f32>(s, order);
            }
        }
    });
}

#[test]
fn attention_kernels_equal_the_reference_in_f16_and_bf16() {
    let _serial = ORDER.lock().unwrap_or_else(|e| e.into_inner());
    for d in [40, 64, 160] {
        let s = attention_cases(d)[1];
        check_attention::<f16>(s, "forward order");
        check_attention::<bf16>(s, "forward order");
    }
}

/// The attention reference equals the engine's candle attention (checked against diffusers),
/// output and every gradient, through the op with its kernel path (the reference on the CPU).
#[test]
fn the_attention_reference_equals_the_engines_candle_attention() {
    use candle_core::{Device, Tensor, Var};
    for (nq, nk, heads, d) in [(19, 19, 2, 8), (7, 77, 3, 4)] {
        let inner = heads * d;
        let q = Var::from_vec(random(2 * nq * inner, 40, 1.5, 0.0), (2, nq, inner), &Device::Cpu).unwrap();
        let k = Var::from_vec(random(2 * nk * inner, 41, 1.5, 0.0), (2, nk, inner), &Device::Cpu).unwrap();
        let v = Var::from_vec(random(2 * nk * inner, 42, 1.0, 0.0), (2, nk, inner), &Device::Cpu).unwrap();
        let dy = Tensor::from_vec(random(2 * nq * inner, 43, 1.0, 0.0), (2, nq, inner), &Device::Cpu).unwrap();
        let run = |kernels: bool| {
            loft_worker::kernels::with_kernels(kernels, || {
                let y = loft_worker::ops::attention(&q, &k, &v, heads).unwrap();
                let grads = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                [flat(&y), flat(grads.get(&q).unwrap()), flat(grads.get(&k).unwrap()), flat(grads.get(&v).unwrap())]
            })
        };
        let (candle, kernel_op) = (run(false), run(true));
        for (name, (got, want)) in ["out", "dq", "dk", "dv"].iter().zip(kernel_op.iter().zip(&candle)) {
            assert_close(&format!("attention {nq}×{nk}, {heads} heads of {d}: {name}"), got, want, 2e-5, 1e-4);
        }
    }
}
