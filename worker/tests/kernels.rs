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
    let gamma = random(c, 11, 0.5, 1.0); // γ and β stay f32 whatever x's dtype
    let beta = random(c, 12, 0.5, 0.0);
    let dy = convert::<T>(&random(len, 13, 1.0, 0.0));
    let beta_t = bias.then_some(beta.as_slice());
    let (xf, gf, bf, dyf) = (widen(&x), gamma.clone(), beta.clone(), widen(&dy));
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

// ----------------------------------------------------------------------------------------------
// Multi-tensor optimizer steps and gradient statistics.

use loft_worker::kernels::optim as multi;
use loft_worker::optim::{AdamW, AdamWConfig, Lion, LionConfig, Optimizer, ParamGroup};

/// Tensor sizes that straddle the (short, test-sized) chunks: 1, under one chunk, several.
const OPT_SIZES: [usize; 4] = [1, 37, 300, 1000];
const OPT_CHUNK: usize = 128;

fn host_params(seed: u64) -> Vec<Vec<f32>> {
    OPT_SIZES.iter().enumerate().map(|(i, &n)| random(n, seed + i as u64, 1.0, 0.0)).collect()
}

fn grad_store(vars: &[candle_core::Var], grads: &[Vec<f32>]) -> candle_core::backprop::GradStore {
    use candle_core::Tensor;
    // A GradStore holding exactly these gradients: the backward of Σ vᵢ·gᵢ.
    let mut total: Option<Tensor> = None;
    for (v, g) in vars.iter().zip(grads) {
        let g = Tensor::from_vec(g.clone(), g.len(), &candle_core::Device::Cpu).unwrap();
        let term = (v.as_tensor() * &g).unwrap().sum_all().unwrap();
        total = Some(match total {
            Some(t) => (t + term).unwrap(),
            None => term,
        });
    }
    total.unwrap().backward().unwrap()
}

/// Three steps of the optimizer's host loop and of the kernel on the same numbers, with two
/// learning-rate groups, a tensor that misses a step (its step count lags), a gradient scale.
fn run_optimizer_pair(kind: &str) {
    use candle_core::{Device, Var};
    let params = host_params(50);
    let vars: Vec<Var> = params.iter().map(|p| Var::from_vec(p.clone(), p.len(), &Device::Cpu).unwrap()).collect();
    let named = |range: std::ops::Range<usize>| range.map(|i| (format!("t{i}"), vars[i].clone())).collect::<Vec<_>>();
    let groups = vec![ParamGroup::new("unet", 1e-2, named(0..2)), ParamGroup::new("te", 3e-3, named(2..4))];
    let (betas, eps, wd) = ((0.9, 0.99), 1e-8, 0.05);
    let mut reference: Box<dyn Optimizer> = match kind {
        "AdamW" => Box::new(AdamW::new(groups, AdamWConfig { betas, eps, weight_decay: wd, amsgrad: true }).unwrap()),
        _ => Box::new(Lion::new(groups, LionConfig { betas, weight_decay: wd }).unwrap()),
    };
    let lrs = [1e-2, 1e-2, 3e-3, 3e-3];
    let mut kp = params.clone();
    let mut m: Vec<Vec<f32>> = OPT_SIZES.iter().map(|&n| vec![0.0; n]).collect();
    let mut v = m.clone();
    let mut vmax = m.clone();
    let mut steps = [0f64; 4];
    for step in 0..3u64 {
        let lr_scale = 1.0 - 0.25 * step as f64;
        // Tensor 1 has no gradient at the second step.
        let active: Vec<usize> = (0..4).filter(|&i| !(step == 1 && i == 1)).collect();
        let grads: Vec<Vec<f32>> = OPT_SIZES.iter().enumerate().map(|(i, &n)| random(n, 100 + 10 * step + i as u64, 0.5, 0.0)).collect();
        let scale = 0.75f32; // the clipping coefficient × 1/loss scale, applied by the kernel
        let scaled: Vec<Vec<f32>> = grads.iter().map(|g| g.iter().map(|&x| x * scale).collect()).collect();
        let active_vars: Vec<Var> = active.iter().map(|&i| vars[i].clone()).collect();
        let active_grads: Vec<Vec<f32>> = active.iter().map(|&i| scaled[i].clone()).collect();
        reference.step(&grad_store(&active_vars, &active_grads), lr_scale).unwrap();

        match kind {
            "AdamW" => {
                let mut tensors = vec![];
                let (mut kp_it, mut m_it, mut v_it, mut vm_it) = (kp.iter_mut(), m.iter_mut(), v.iter_mut(), vmax.iter_mut());
                for i in 0..4 {
                    let (p, mm, vv, vm) = (kp_it.next().unwrap(), m_it.next().unwrap(), v_it.next().unwrap(), vm_it.next().unwrap());
                    if !active.contains(&i) {
                        continue;
                    }
                    steps[i] += 1.0;
                    let scalars = multi::adamw_scalars(lrs[i] * lr_scale, wd, betas, steps[i]);
                    tensors.push(multi::HostAdamW { param: p, grad: &grads[i], exp_avg: mm, exp_avg_sq: vv, max_exp_avg_sq: Some(vm), scalars });
                }
                multi::emulated_adamw(&mut tensors, multi::AdamWHyper::new(betas, eps, wd), Some(scale), None, OPT_CHUNK);
            }
            _ => {
                let mut tensors = vec![];
                for (i, (p, mm)) in kp.iter_mut().zip(m.iter_mut()).enumerate() {
                    if active.contains(&i) {
                        tensors.push((p.as_mut_slice(), grads[i].as_slice(), mm.as_mut_slice(), multi::lion_scalars(lrs[i] * lr_scale, wd)));
                    }
                }
                multi::emulated_lion(&mut tensors, multi::LionHyper::new(betas), Some(scale), None, OPT_CHUNK);
            }
        }
    }
    for (i, var) in vars.iter().enumerate() {
        let want = var.as_tensor().to_vec1::<f32>().unwrap();
        // The kernel's order of operations is the host loop's: equal to the bit.
        assert_eq!(kp[i].iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{kind}: tensor {i} after 3 steps");
    }
}

#[test]
fn the_multi_tensor_adamw_step_equals_the_host_loop_to_the_bit() {
    run_optimizer_pair("AdamW");
}

#[test]
fn the_multi_tensor_lion_step_equals_the_host_loop_to_the_bit() {
    run_optimizer_pair("Lion");
}

#[test]
fn a_skipped_step_changes_nothing() {
    let mut p = random(300, 60, 1.0, 0.0);
    let before = p.clone();
    let g = vec![f32::NAN; 300];
    let (mut m, mut v) = (vec![0f32; 300], vec![0f32; 300]);
    let mut tensors = vec![multi::HostAdamW { param: &mut p, grad: &g, exp_avg: &mut m, exp_avg_sq: &mut v, max_exp_avg_sq: None, scalars: multi::adamw_scalars(1e-3, 0.01, (0.9, 0.999), 1.0) }];
    multi::emulated_adamw(&mut tensors, multi::AdamWHyper::new((0.9, 0.999), 1e-8, 0.01), None, Some(1), OPT_CHUNK);
    assert_eq!(p, before);
    assert!(m.iter().chain(&v).all(|&x| x == 0.0));
}

#[test]
fn gradient_statistics_sum_every_tensor_and_flag_non_finite_values() {
    let grads = host_params(70);
    let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
    let (sumsq, nonfinite) = multi::emulated_grad_stats(&refs, OPT_CHUNK);
    assert!(!nonfinite);
    for (i, g) in grads.iter().enumerate() {
        let want: f64 = g.iter().map(|&x| x as f64 * x as f64).sum();
        assert!((sumsq[i] - want).abs() <= 1e-12 * want.max(1.0), "tensor {i}: Σg² {} vs {want}", sumsq[i]);
    }
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut g = grads[3].clone();
        g[777] = bad;
        let (_, nonfinite) = multi::emulated_grad_stats(&[&grads[0], &g], OPT_CHUNK);
        assert!(nonfinite, "{bad} not flagged");
    }
}

// ----------------------------------------------------------------------------------------------
// LoHa / LoKr rebuilds, the Cayley transform.

use loft_worker::kernels::{cayley, lowrank};

#[test]
fn loha_and_lokr_kernels_equal_the_reference() {
    // A conv-shaped LoHa weight (8 × 3·3·3) and LoKr factors for a (4·5) × (3·6) weight.
    let n = 8 * 27;
    let (w, p1, p2, g) = (random(n, 80, 1.0, 0.0), random(n, 81, 0.5, 0.0), random(n, 82, 0.5, 0.0), random(n, 83, 1.0, 0.0));
    let (out, d1, d2) = lowrank::emulated_loha(&w, &p1, &p2, &g, 0.75);
    assert_close("loha merge", &out, &lowrank::reference_loha_merge(&w, &p1, &p2, 0.75), 0.0, 0.0);
    let (r1, r2) = lowrank::reference_loha_grad(&g, &p1, &p2, 0.75);
    assert_close("loha dP1", &d1, &r1, 0.0, 0.0);
    assert_close("loha dP2", &d2, &r2, 0.0, 0.0);

    let s = lowrank::KronShape { a: 4, b: 3, c: 5, e: 6 };
    let n = 4 * 3 * 5 * 6;
    let (w, w1, w2, g) = (random(n, 84, 1.0, 0.0), random(12, 85, 1.0, 0.0), random(30, 86, 1.0, 0.0), random(n, 87, 1.0, 0.0));
    let (out, d1, d2) = lowrank::emulated_lokr(&w, &w1, &w2, &g, s, 0.5);
    assert_close("lokr merge", &out, &lowrank::reference_lokr_merge(&w, &w1, &w2, s, 0.5), 0.0, 0.0);
    let (r1, r2) = lowrank::reference_lokr_grad(&g, &w1, &w2, s, 0.5);
    assert_close("lokr dw1", &d1, &r1, 1e-5, 1e-5);
    assert_close("lokr dw2", &d2, &r2, 1e-5, 1e-5);
}

#[test]
fn the_cayley_kernel_equals_the_reference_in_either_thread_order() {
    for (n, b) in [(3usize, 4usize), (2, 17), (1, 40)] {
        let blocks = random(n * b * b, 90 + b as u64, 0.3, 0.0);
        // Q = B − Bᵀ per matrix.
        let mut q = vec![0f32; n * b * b];
        for m in 0..n {
            for r in 0..b {
                for c in 0..b {
                    q[(m * b + r) * b + c] = blocks[(m * b + r) * b + c] - blocks[(m * b + c) * b + r];
                }
            }
        }
        let (r_ref, inv_ref) = cayley::reference(&q.iter().map(|&x| x as f64).collect::<Vec<_>>(), n, b);
        both_orders(|order| {
            let (r, inv) = cayley::emulated(&q, n, b);
            for (what, got, want) in [("R", &r, &r_ref), ("(I − Q)⁻¹", &inv, &inv_ref)] {
                for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
                    assert!((g - w).abs() <= 1e-12, "cayley {n}×{b}×{b} {order}: {what}[{i}] {g} vs {w}");
                }
            }
        });
        // R is orthogonal.
        for m in 0..n {
            for i in 0..b {
                for j in 0..b {
                    let dot: f64 = (0..b).map(|k| r_ref[(m * b + k) * b + i] * r_ref[(m * b + k) * b + j]).sum();
                    assert!((dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9, "RᵀR ≠ I");
                }
            }
        }
    }
}

// ----------------------------------------------------------------------------------------------
// The training loop through the kernel ops.

mod common;

/// 20 steps of the tiny SD 1.5 run with the kernel ops (their CPU references here; on a GPU the
/// device script runs the same comparison with the kernels) equal the run with candle's ops:
/// every step's loss within 1e-4 (relative) and the file's tensors within 1e-3.
#[test]
fn the_training_loop_through_the_kernel_ops_equals_the_candle_loop() {
    use loft_worker::networks::NetworkAlgo;
    for algo in [NetworkAlgo::Lora, NetworkAlgo::Loha] {
        let dir = tempfile::tempdir().unwrap();
        let run = |on: bool, sub: &str| {
            let root = dir.path().join(sub);
            let cfg = loft_worker::train::TrainConfig { max_train_steps: 20, ..common::tiny_run::config(&root, algo) };
            loft_worker::kernels::with_kernels(on, || common::tiny_run::train(&cfg))
        };
        let (file_off, losses_off) = run(false, "off");
        let calls = loft_worker::kernels::op_calls();
        let (file_on, losses_on) = run(true, "on");
        assert!(loft_worker::kernels::op_calls() > calls + 20, "{algo:?}: the run did not go through the kernel ops");
        assert_eq!(losses_on.len(), 20);
        for (i, (a, b)) in losses_on.iter().zip(&losses_off).enumerate() {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1e-3), "{algo:?} step {i}: loss {a} with the kernel ops, {b} without");
        }
        let (on, off) = (common::tiny_run::tensors(&file_on), common::tiny_run::tensors(&file_off));
        assert_eq!(on.len(), off.len());
        for (name, t) in &off {
            let diff = (t - &on[name]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-3, "{algo:?} {name}: differs by {diff}");
        }
    }
}

/// Three Prodigy steps: the host loop against the two kernel passes, with the d update between
/// them written out here as prodigyopt does it (slice_p 2, decoupled weight decay).
#[test]
fn the_multi_tensor_prodigy_passes_equal_the_host_loop() {
    use candle_core::{Device, Var};
    use loft_worker::optim::{Prodigy, ProdigyConfig};
    let params = host_params(120);
    let vars: Vec<Var> = params.iter().map(|p| Var::from_vec(p.clone(), p.len(), &Device::Cpu).unwrap()).collect();
    // d0 large enough that three steps move the parameters well beyond the tolerance.
    let cfg = ProdigyConfig { weight_decay: 0.01, slice_p: 2, d0: 1e-2, ..ProdigyConfig::default() };
    let group = ParamGroup::new("unet", 1.0, vars.iter().enumerate().map(|(i, v)| (format!("t{i}"), v.clone())).collect());
    let mut reference = Prodigy::new(vec![group], cfg.clone()).unwrap();

    let (beta1, beta2) = cfg.betas;
    let beta3 = beta2.sqrt();
    let (d0, mut d, mut d_max, mut d_numerator) = (cfg.d0, cfg.d0, cfg.d0, 0.0f64);
    let mut kp = params.clone();
    let p0: Vec<Vec<f32>> = params.iter().map(|p| p.iter().step_by(2).copied().collect()).collect();
    let mut s: Vec<Vec<f32>> = p0.iter().map(|p| vec![0.0; p.len()]).collect();
    let mut m: Vec<Vec<f32>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
    let mut v = m.clone();
    for step in 0..3u64 {
        let lr = 1.0 - 0.25 * step as f64;
        let grads: Vec<Vec<f32>> = OPT_SIZES.iter().enumerate().map(|(i, &n)| random(n, 130 + 10 * step + i as u64, 0.5, 0.0)).collect();
        reference.step(&grad_store(&vars, &grads), lr).unwrap();

        let dlr = d * lr;
        d_numerator *= beta3;
        let pass1 = multi::ProdigyPass1 { coupled_wd: 0.0, b1: beta1 as f32, a1: (d * (1.0 - beta1)) as f32, b2: beta2 as f32, a2: (d * d * (1.0 - beta2)) as f32, alpha: ((d / d0) * dlr) as f32, b3: beta3 as f32 };
        let mut tensors: Vec<multi::HostProdigy> = kp
            .iter_mut()
            .zip(&grads)
            .zip(&p0)
            .zip(s.iter_mut())
            .zip(m.iter_mut())
            .zip(v.iter_mut())
            .map(|(((((p, g), p0), s), m), v)| multi::HostProdigy { param: p, grad: g, p0, s, exp_avg: Some(m), exp_avg_sq: v })
            .collect();
        let (dots, abs_sums) = multi::emulated_prodigy_pass1(&mut tensors, 2, pass1, OPT_CHUNK);
        let delta: f64 = dots.iter().map(|&x| (d / d0) * dlr * (x as f32 as f64)).sum();
        let denom: f64 = abs_sums.iter().map(|&x| x as f32 as f64).sum();
        d_numerator += delta;
        let d_hat = d_numerator / denom;
        let mut d_new = if d == d0 { d.max(d_hat) } else { d };
        d_max = d_max.max(d_hat);
        d_new = d_max.min(d_new * f64::INFINITY);
        let pass2 = multi::ProdigyPass2 { coupled_wd: 0.0, decoupled_decay: (-0.01 * dlr) as f32, eps_d: (d_new * cfg.eps) as f32, neg_dlr: -dlr as f32, neg_dlr_d: (-dlr * d_new) as f32 };
        multi::emulated_prodigy_pass2(&mut tensors, pass2, OPT_CHUNK);
        d = d_new;
    }
    for (i, var) in vars.iter().enumerate() {
        let want = var.as_tensor().to_vec1::<f32>().unwrap();
        assert_close(&format!("Prodigy tensor {i} after 3 steps"), &kp[i], &want, 1e-6, 1e-5);
        let moved = kp[i].iter().zip(&params[i]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(moved > 1e-3, "tensor {i} moved only {moved}");
    }
}

/// Three AdamW8bit steps: the host loop against the kernels (8-bit blocks for the tensors of at
/// least min_8bit_size elements, 32-bit moments for the rest), equal to the bit.
#[test]
fn the_multi_tensor_adamw8bit_step_equals_the_host_loop_to_the_bit() {
    use candle_core::{Device, Var};
    use loft_worker::optim::{AdamW8bit, AdamW8bitConfig};
    let params = host_params(150);
    let vars: Vec<Var> = params.iter().map(|p| Var::from_vec(p.clone(), p.len(), &Device::Cpu).unwrap()).collect();
    let cfg = AdamW8bitConfig { min_8bit_size: 100, weight_decay: 0.05, ..AdamW8bitConfig::default() };
    let named = |range: std::ops::Range<usize>| range.map(|i| (format!("t{i}"), vars[i].clone())).collect::<Vec<_>>();
    let groups = vec![ParamGroup::new("unet", 1e-2, named(0..2)), ParamGroup::new("te", 3e-3, named(2..4))];
    let mut reference = AdamW8bit::new(groups, cfg.clone()).unwrap();
    let lrs = [1e-2, 1e-2, 3e-3, 3e-3];
    let mut kp = params.clone();
    let n8 = |i: usize| OPT_SIZES[i] >= cfg.min_8bit_size;
    let mut codes: Vec<(Vec<u8>, Vec<f32>, Vec<u8>, Vec<f32>)> = OPT_SIZES.iter().map(|&n| (vec![0u8; n], vec![0f32; n.div_ceil(256)], vec![0u8; n], vec![0f32; n.div_ceil(256)])).collect();
    let mut full: Vec<(Vec<f32>, Vec<f32>)> = OPT_SIZES.iter().map(|&n| (vec![0f32; n], vec![0f32; n])).collect();
    for step in 0..3u64 {
        let lr_scale = 1.0 - 0.25 * step as f64;
        let grads: Vec<Vec<f32>> = OPT_SIZES.iter().enumerate().map(|(i, &n)| random(n, 160 + 10 * step + i as u64, 0.5, 0.0)).collect();
        reference.step(&grad_store(&vars, &grads), lr_scale).unwrap();
        let scalars = |i: usize| multi::adamw8bit_scalars(lrs[i] * lr_scale, cfg.weight_decay, cfg.betas, cfg.eps, (step + 1) as f64, n8(i));
        let mut blocks = vec![];
        let mut small = vec![];
        for (i, ((p, (mc, ma, vc, va)), (m, v))) in kp.iter_mut().zip(codes.iter_mut()).zip(full.iter_mut()).enumerate() {
            if n8(i) {
                blocks.push(multi::HostAdamW8bit { param: p, grad: &grads[i], m_codes: mc, m_absmax: ma, v_codes: vc, v_absmax: va, scalars: scalars(i) });
            } else {
                small.push((p.as_mut_slice(), grads[i].as_slice(), m.as_mut_slice(), v.as_mut_slice(), scalars(i)));
            }
        }
        multi::emulated_adamw8bit_blocks(&mut blocks, cfg.betas, cfg.eps, true);
        multi::emulated_adamw8bit_full(&mut small, cfg.betas, true, OPT_CHUNK);
    }
    for (i, var) in vars.iter().enumerate() {
        let want = var.as_tensor().to_vec1::<f32>().unwrap();
        assert_eq!(kp[i].iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "AdamW8bit tensor {i} after 3 steps");
    }
}

/// Three Adafactor steps on 1-D (full second moment) and 2-D/3-D (factored) tensors: the host
/// loop against the four kernel launches, with the lr of each tensor from its RMS between them.
#[test]
fn the_multi_tensor_adafactor_step_equals_the_host_loop() {
    use candle_core::{Device, Var};
    use loft_worker::optim::{Adafactor, AdafactorConfig};
    let shapes: [&[usize]; 4] = [&[1], &[37], &[12, 25], &[2, 20, 25]];
    let params: Vec<Vec<f32>> = shapes.iter().enumerate().map(|(i, s)| random(s.iter().product(), 170 + i as u64, 1.0, 0.0)).collect();
    let vars: Vec<Var> = params.iter().zip(shapes).map(|(p, s)| Var::from_vec(p.clone(), s, &Device::Cpu).unwrap()).collect();
    let cfg = AdafactorConfig { beta1: Some(0.9), weight_decay: 0.01, ..AdafactorConfig::default() };
    let group = ParamGroup::new("unet", 1e-3, vars.iter().enumerate().map(|(i, v)| (format!("t{i}"), v.clone())).collect());
    let mut reference = Adafactor::new(vec![group], cfg.clone()).unwrap();
    let dims = |s: &[usize]| if s.len() < 2 { (1, 0, 0) } else { (s[..s.len() - 2].iter().product(), s[s.len() - 2], s[s.len() - 1]) };
    let mut kp = params.clone();
    let mut rows: Vec<Vec<f32>> = shapes.iter().map(|s| { let (l, r, _) = dims(s); vec![0.0; (l * r).max(1)] }).collect();
    let mut cols: Vec<Vec<f32>> = shapes.iter().map(|s| { let (l, r, c) = dims(s); vec![0.0; if r > 0 { l * c } else { 1 }] }).collect();
    let mut vs: Vec<Vec<f32>> = shapes.iter().map(|s| vec![0.0; s.iter().product()]).collect();
    let mut ms = vs.clone();
    for step in 1..=3u64 {
        let grads: Vec<Vec<f32>> = params.iter().enumerate().map(|(i, p)| random(p.len(), 180 + 10 * step + i as u64, 0.5, 0.0)).collect();
        let store = {
            use candle_core::Tensor;
            let mut total: Option<Tensor> = None;
            for (v, g) in vars.iter().zip(&grads) {
                let g = Tensor::from_vec(g.clone(), v.dims(), &Device::Cpu).unwrap();
                let term = (v.as_tensor() * &g).unwrap().sum_all().unwrap();
                total = Some(match total { Some(t) => (t + term).unwrap(), None => term });
            }
            total.unwrap().backward().unwrap()
        };
        reference.step(&store, 1.0).unwrap();
        let mut tensors: Vec<multi::HostAdafactor> = kp
            .iter_mut()
            .zip(&grads)
            .zip(shapes)
            .zip(rows.iter_mut().zip(cols.iter_mut()))
            .zip(vs.iter_mut().zip(ms.iter_mut()))
            .map(|((((p, g), s), (row, col)), (v, m))| multi::HostAdafactor { param: p, grad: g, dims: dims(s), row, col, exp_avg_sq: v, exp_avg: Some(m) })
            .collect();
        let hyper = multi::AdafactorHyper { eps1: cfg.eps.0 as f32, clip_threshold: cfg.clip_threshold as f32, beta1: cfg.beta1, decay_on: true };
        multi::emulated_adafactor_step(
            &mut tensors,
            hyper,
            |_, param_rms| {
                let lr = cfg.step_lr(1e-3, step as f64, param_rms);
                (cfg.beta2t(step as f64), lr, (-cfg.weight_decay * lr) as f32)
            },
            OPT_CHUNK,
        );
    }
    for (i, var) in vars.iter().enumerate() {
        let want = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_close(&format!("Adafactor tensor {i} {:?} after 3 steps", shapes[i]), &kp[i], &want, 1e-7, 1e-6);
        let moved = kp[i].iter().zip(&params[i]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(moved > 1e-5, "tensor {i} moved only {moved}"); // ≫ the tolerance above
    }
}

/// On a GPU (the CUDA build with a device answering): every kernel against its CPU reference in
/// every dtype with NaN-filled outputs, every optimizer device vs host, and the tiny training loop
/// with the kernels on and off (`loft_worker::kernels::check`, also `loft bench kernels`).
/// Skipped, saying why, when the test device is the CPU.
#[test]
fn the_kernels_on_the_test_gpu_equal_their_references() {
    let device = loft_worker::device::test_device();
    if device.is_cpu() {
        eprintln!("skipped: the test device is the CPU (a CPU build, or no GPU answers); the kernels ran under the emulation in the other tests");
        return;
    }
    let spec = std::env::var("LOFT_TEST_DEVICE").unwrap_or_else(|_| "cuda".into());
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    loft_worker::kernels::check::run_on(&device, &spec, &fixtures, false).unwrap_or_else(|e| panic!("{e:#}"));
}
