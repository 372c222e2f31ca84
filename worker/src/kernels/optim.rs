//! Multi-tensor optimizer steps and gradient statistics: the kernels of worker/kernels/optim.cu.
//!
//! The references are the optimizers' own host loops (optim/adamw.rs, optim/lion.rs) and
//! `optim::clip_grad_norm`'s sums; worker/tests/kernels.rs runs both on the same numbers.

use super::emulation::Dim3;

/// Elements per block on a GPU.
pub const CHUNK: usize = 65536;
/// Threads per block (optim.cu's THREADS).
const THREADS: u32 = 256;

/// The work split of a launch: (tensor index, first element) per block, flattened.
pub fn chunk_table(numel: &[usize], chunk_len: usize) -> Vec<i64> {
    let mut out = vec![];
    for (t, &n) in numel.iter().enumerate() {
        let mut start = 0;
        while start < n {
            out.push(t as i64);
            out.push(start as i64);
            start += chunk_len;
        }
    }
    out
}

/// AdamW's hyper-parameters shared by every tensor of a launch.
#[derive(Clone, Copy, Debug)]
pub struct AdamWHyper {
    /// 1 − β1 (lerp weight), β2, 1 − β2, ε, whether weight decay applies.
    pub w1: f32,
    pub b2: f32,
    pub w2: f32,
    pub eps: f32,
    pub decay_on: bool,
}

impl AdamWHyper {
    /// From torch's hyper-parameters, rounded to f32 as the host loop rounds them.
    pub fn new(betas: (f64, f64), eps: f64, weight_decay: f64) -> Self {
        Self { w1: (1.0 - betas.0) as f32, b2: betas.1 as f32, w2: (1.0 - betas.1) as f32, eps: eps as f32, decay_on: weight_decay != 0.0 }
    }
}

/// AdamW's per-tensor scalars: 1 − lr·wd, lr/bc1, √bc2.
pub type AdamWScalars = [f32; 3];

/// A tensor's AdamW scalars at its `step` (1 for the first), as the host loop computes them.
pub fn adamw_scalars(lr: f64, weight_decay: f64, betas: (f64, f64), step: f64) -> AdamWScalars {
    let bc1 = 1.0 - betas.0.powf(step);
    let bc2 = 1.0 - betas.1.powf(step);
    [(1.0 - lr * weight_decay) as f32, (lr / bc1) as f32, bc2.sqrt() as f32]
}

/// Lion's shared hyper-parameters: β1, 1 − β1, β2, 1 − β2.
#[derive(Clone, Copy, Debug)]
pub struct LionHyper {
    pub b1: f32,
    pub w1: f32,
    pub b2: f32,
    pub w2: f32,
}

impl LionHyper {
    pub fn new(betas: (f64, f64)) -> Self {
        Self { b1: betas.0 as f32, w1: (1.0 - betas.0) as f32, b2: betas.1 as f32, w2: (1.0 - betas.1) as f32 }
    }
}

/// Lion's per-tensor scalars: 1 − lr·wd, −lr.
pub type LionScalars = [f32; 2];

pub fn lion_scalars(lr: f64, weight_decay: f64) -> LionScalars {
    [(1.0 - lr * weight_decay) as f32, -lr as f32]
}

/// One AdamW tensor on the host (tests): parameter, gradient, exp_avg, exp_avg_sq and
/// max_exp_avg_sq (empty without amsgrad).
pub struct HostAdamW<'a> {
    pub param: &'a mut [f32],
    pub grad: &'a [f32],
    pub exp_avg: &'a mut [f32],
    pub exp_avg_sq: &'a mut [f32],
    pub max_exp_avg_sq: Option<&'a mut [f32]>,
    pub scalars: AdamWScalars,
}

/// AdamW8bit's per-tensor scalars: 1 − lr·wd, then for 8-bit moments −lr/bc1 and √bc2, for
/// 32-bit ones −lr·√bc2/bc1 and ε·√bc2 (as optim/adamw8bit.rs computes them).
pub fn adamw8bit_scalars(lr: f64, weight_decay: f64, betas: (f64, f64), eps: f64, step: f64, bits8: bool) -> [f32; 3] {
    let correction1 = 1.0 - betas.0.powf(step);
    let correction2 = (1.0 - betas.1.powf(step)).sqrt();
    let decay = (1.0 - lr * weight_decay) as f32;
    if bits8 {
        [decay, (-lr / correction1) as f32, correction2 as f32]
    } else {
        [decay, (-lr * correction2 / correction1) as f32, (eps * correction2) as f32]
    }
}

/// One AdamW8bit tensor with 8-bit moments on the host (tests): codes and per-256 absmax.
pub struct HostAdamW8bit<'a> {
    pub param: &'a mut [f32],
    pub grad: &'a [f32],
    pub m_codes: &'a mut [u8],
    pub m_absmax: &'a mut [f32],
    pub v_codes: &'a mut [u8],
    pub v_absmax: &'a mut [f32],
    pub scalars: [f32; 3],
}

/// The RMS of a tensor from its Σx² as `optim::adafactor` computes it (torch: an f32 norm
/// divided by √n).
pub fn rms_from_sumsq(sumsq: f64, n: usize) -> f64 {
    (sumsq.sqrt() as f32 / (n as f64).sqrt() as f32) as f64
}

/// One Adafactor tensor on the host (tests): `dims` (lead, r, c) with r = 0 when not factored;
/// row/col (factored) or exp_avg_sq (not), exp_avg with β1.
pub struct HostAdafactor<'a> {
    pub param: &'a mut [f32],
    pub grad: &'a [f32],
    pub dims: (usize, usize, usize),
    pub row: &'a mut [f32],
    pub col: &'a mut [f32],
    pub exp_avg_sq: &'a mut [f32],
    pub exp_avg: Option<&'a mut [f32]>,
}

/// Adafactor's shared settings for a launch: ε1, clip_threshold, β1, whether decay applies.
#[derive(Clone, Copy, Debug)]
pub struct AdafactorHyper {
    pub eps1: f32,
    pub clip_threshold: f32,
    pub beta1: Option<f64>,
    pub decay_on: bool,
}

/// Prodigy's pass-1 scalars (optim/prodigy.rs computes them): coupled weight decay (0 when
/// decoupled), β1, d(1 − β1), β2, d²(1 − β2), α (s's step), β3.
#[derive(Clone, Copy, Debug)]
pub struct ProdigyPass1 {
    pub coupled_wd: f32,
    pub b1: f32,
    pub a1: f32,
    pub b2: f32,
    pub a2: f32,
    pub alpha: f32,
    pub b3: f32,
}

/// Prodigy's pass-2 scalars: coupled weight decay, −wd·dlr (decoupled, else 0), ε·d_new,
/// −dlr, −dlr·d_new.
#[derive(Clone, Copy, Debug)]
pub struct ProdigyPass2 {
    pub coupled_wd: f32,
    pub decoupled_decay: f32,
    pub eps_d: f32,
    pub neg_dlr: f32,
    pub neg_dlr_d: f32,
}

/// One Prodigy tensor on the host (tests): param, grad, p0 and s (every slice_p-th element),
/// exp_avg (empty without β1), exp_avg_sq.
pub struct HostProdigy<'a> {
    pub param: &'a mut [f32],
    pub grad: &'a [f32],
    pub p0: &'a [f32],
    pub s: &'a mut [f32],
    pub exp_avg: Option<&'a mut [f32]>,
    pub exp_avg_sq: &'a mut [f32],
}

extern "C" {
    fn emu_loft_adafactor_sums_f32(grid: Dim3, block: Dim3, ptrs: *const u64, dims: *const i64, numel: *const i64, chunks: *const i64, chunk_len: i64, eps1: f32, param_sumsq: *mut f64);
    fn emu_loft_adafactor_factors_f32(grid: Dim3, block: Dim3, ptrs: *const u64, dims: *const i64, scalars: *const f32, tensors: *const i32);
    #[allow(clippy::too_many_arguments)]
    fn emu_loft_adafactor_update_f32(grid: Dim3, block: Dim3, ptrs: *const u64, dims: *const i64, scalars: *const f32, numel: *const i64, chunks: *const i64, chunk_len: i64, eps1: f32, update_sumsq: *mut f64);
    #[allow(clippy::too_many_arguments)]
    fn emu_loft_adafactor_apply_f32(grid: Dim3, block: Dim3, ptrs: *const u64, scalars: *const f32, numel: *const i64, chunks: *const i64, chunk_len: i64, update_sumsq: *const f64, clip_threshold: f32, b1: f32, w1: f32, beta1_on: i32, decay_on: i32);
    #[allow(clippy::too_many_arguments)]
    fn emu_loft_adamw8bit_blocks_f32(grid: Dim3, block: Dim3, ptrs: *const u64, scalars: *const f32, numel: *const i64, chunks: *const i64, signed_code: *const f32, unsigned_code: *const f32, signed_lut: *const u8, unsigned_lut: *const u8, b1: f32, w1: f32, b2: f32, w2: f32, eps: f32, decay_on: i32);
    #[allow(clippy::too_many_arguments)]
    fn emu_loft_adamw8bit_full_f32(grid: Dim3, block: Dim3, ptrs: *const u64, scalars: *const f32, numel: *const i64, chunks: *const i64, chunk_len: i64, b1: f32, w1: f32, b2: f32, w2: f32, decay_on: i32);
    #[allow(clippy::too_many_arguments)]
    fn emu_loft_prodigy_pass1_f32(grid: Dim3, block: Dim3, ptrs: *const u64, numel: *const i64, chunks: *const i64, chunk_len: i64, slice_p: i32, coupled_wd: f32, b1: f32, a1: f32, b2: f32, a2: f32, alpha: f32, b3: f32, dots: *mut f64, abs_sums: *mut f64);
    #[allow(clippy::too_many_arguments)]
    fn emu_loft_prodigy_pass2_f32(grid: Dim3, block: Dim3, ptrs: *const u64, numel: *const i64, chunks: *const i64, chunk_len: i64, coupled_wd: f32, decoupled_decay: f32, eps_d: f32, neg_dlr: f32, neg_dlr_d: f32);
    #[allow(clippy::too_many_arguments)]
    fn emu_loft_multi_adamw_f32(grid: Dim3, block: Dim3, ptrs: *const u64, scalars: *const f32, numel: *const i64, chunks: *const i64, chunk_len: i64, w1: f32, b2: f32, w2: f32, eps: f32, decay_on: i32, grad_scale: *const f32, skip: *const u32);
    #[allow(clippy::too_many_arguments)]
    fn emu_loft_multi_lion_f32(grid: Dim3, block: Dim3, ptrs: *const u64, scalars: *const f32, numel: *const i64, chunks: *const i64, chunk_len: i64, b1: f32, w1: f32, b2: f32, w2: f32, grad_scale: *const f32, skip: *const u32);
    fn emu_loft_multi_grad_stats_f32(grid: Dim3, block: Dim3, ptrs: *const u64, numel: *const i64, chunks: *const i64, chunk_len: i64, sumsq: *mut f64, nonfinite: *mut u32);
}

/// The sizes as i64, the chunk table and the grid of an emulated launch over tensors of `numel`
/// elements.
fn host_tables(numel: &[usize], chunk_len: usize) -> (Vec<i64>, Vec<i64>, Dim3) {
    let chunks = chunk_table(numel, chunk_len);
    let grid = Dim3::x((chunks.len() / 2) as u32);
    (numel.iter().map(|&n| n as i64).collect(), chunks, grid)
}

fn opt_ptr<T>(v: Option<&T>) -> *const T {
    v.map_or(std::ptr::null(), |v| v as *const T)
}

/// Runs the multi-tensor AdamW kernel under the CPU emulation (tests), in place.
pub fn emulated_adamw(tensors: &mut [HostAdamW], hyper: AdamWHyper, grad_scale: Option<f32>, skip: Option<u32>, chunk_len: usize) {
    let mut ptrs = vec![];
    let mut scalars = vec![];
    let mut numel = vec![];
    for t in tensors.iter_mut() {
        ptrs.extend([t.param.as_mut_ptr() as u64, t.grad.as_ptr() as u64, t.exp_avg.as_mut_ptr() as u64, t.exp_avg_sq.as_mut_ptr() as u64, t.max_exp_avg_sq.as_mut().map_or(0, |m| m.as_mut_ptr() as u64)]);
        scalars.extend(t.scalars);
        numel.push(t.param.len());
    }
    let (numel, chunks, grid) = host_tables(&numel, chunk_len);
    unsafe {
        emu_loft_multi_adamw_f32(grid, Dim3::x(THREADS), ptrs.as_ptr(), scalars.as_ptr(), numel.as_ptr(), chunks.as_ptr(), chunk_len as i64, hyper.w1, hyper.b2, hyper.w2, hyper.eps, hyper.decay_on as i32, opt_ptr(grad_scale.as_ref()), opt_ptr(skip.as_ref()))
    }
}

/// Runs the multi-tensor Lion kernel under the CPU emulation (tests), in place:
/// `(param, grad, exp_avg, scalars)` per tensor.
pub fn emulated_lion(tensors: &mut [(&mut [f32], &[f32], &mut [f32], LionScalars)], hyper: LionHyper, grad_scale: Option<f32>, skip: Option<u32>, chunk_len: usize) {
    let mut ptrs = vec![];
    let mut scalars = vec![];
    let mut numel = vec![];
    for (p, g, m, s) in tensors.iter_mut() {
        ptrs.extend([p.as_mut_ptr() as u64, g.as_ptr() as u64, m.as_mut_ptr() as u64]);
        scalars.extend(*s);
        numel.push(p.len());
    }
    let (numel, chunks, grid) = host_tables(&numel, chunk_len);
    unsafe {
        emu_loft_multi_lion_f32(grid, Dim3::x(THREADS), ptrs.as_ptr(), scalars.as_ptr(), numel.as_ptr(), chunks.as_ptr(), chunk_len as i64, hyper.b1, hyper.w1, hyper.b2, hyper.w2, opt_ptr(grad_scale.as_ref()), opt_ptr(skip.as_ref()))
    }
}

/// Runs the gradient-statistics kernel under the CPU emulation (tests): Σg² per tensor and
/// whether any element is not finite.
pub fn emulated_grad_stats(grads: &[&[f32]], chunk_len: usize) -> (Vec<f64>, bool) {
    let ptrs: Vec<u64> = grads.iter().map(|g| g.as_ptr() as u64).collect();
    let (numel, chunks, grid) = host_tables(&grads.iter().map(|g| g.len()).collect::<Vec<_>>(), chunk_len);
    let mut sumsq = vec![0f64; grads.len()];
    let mut nonfinite = 0u32;
    if !chunks.is_empty() {
        unsafe { emu_loft_multi_grad_stats_f32(grid, Dim3::x(THREADS), ptrs.as_ptr(), numel.as_ptr(), chunks.as_ptr(), chunk_len as i64, sumsq.as_mut_ptr(), &mut nonfinite) };
    }
    (sumsq, nonfinite != 0)
}

/// AdamW8bit's 8-bit kernel under the CPU emulation (tests), in place; `betas`, `eps` and
/// whether weight decay applies as the optimizer has them.
pub fn emulated_adamw8bit_blocks(tensors: &mut [HostAdamW8bit], betas: (f64, f64), eps: f64, decay_on: bool) {
    let mut ptrs = vec![];
    let mut scalars = vec![];
    let mut numel = vec![];
    for t in tensors.iter_mut() {
        ptrs.extend([t.param.as_mut_ptr() as u64, t.grad.as_ptr() as u64, t.m_codes.as_mut_ptr() as u64, t.m_absmax.as_mut_ptr() as u64, t.v_codes.as_mut_ptr() as u64, t.v_absmax.as_mut_ptr() as u64]);
        scalars.extend(t.scalars);
        numel.push(t.param.len());
    }
    let (numel, chunks, grid) = host_tables(&numel, 256);
    let ((sc, sl), (uc, ul)) = (crate::optim::adamw8bit::codebook_tables(true), crate::optim::adamw8bit::codebook_tables(false));
    let h = LionHyper::new(betas); // β1, 1 − β1, β2, 1 − β2 in f32
    unsafe {
        emu_loft_adamw8bit_blocks_f32(grid, Dim3::x(THREADS), ptrs.as_ptr(), scalars.as_ptr(), numel.as_ptr(), chunks.as_ptr(), sc.as_ptr(), uc.as_ptr(), sl.as_ptr(), ul.as_ptr(), h.b1, h.w1, h.b2, h.w2, eps as f32, decay_on as i32)
    }
}

/// AdamW8bit's 32-bit kernel under the CPU emulation (tests), in place:
/// `(param, grad, m, v, scalars)` per tensor.
pub fn emulated_adamw8bit_full(tensors: &mut [(&mut [f32], &[f32], &mut [f32], &mut [f32], [f32; 3])], betas: (f64, f64), decay_on: bool, chunk_len: usize) {
    let mut ptrs = vec![];
    let mut scalars = vec![];
    let mut numel = vec![];
    for (p, g, m, v, s) in tensors.iter_mut() {
        ptrs.extend([p.as_mut_ptr() as u64, g.as_ptr() as u64, m.as_mut_ptr() as u64, v.as_mut_ptr() as u64]);
        scalars.extend(*s);
        numel.push(p.len());
    }
    let (numel, chunks, grid) = host_tables(&numel, chunk_len);
    let h = LionHyper::new(betas);
    unsafe { emu_loft_adamw8bit_full_f32(grid, Dim3::x(THREADS), ptrs.as_ptr(), scalars.as_ptr(), numel.as_ptr(), chunks.as_ptr(), chunk_len as i64, h.b1, h.w1, h.b2, h.w2, decay_on as i32) }
}

/// One Adafactor step under the CPU emulation (tests), the four launches with the host's part
/// between them: `scalars_of(tensor, param_rms)` gives that tensor's (β2t, lr, −wd·lr).
pub fn emulated_adafactor_step(tensors: &mut [HostAdafactor], hyper: AdafactorHyper, scalars_of: impl Fn(usize, f64) -> (f64, f64, f32), chunk_len: usize) {
    let nt = tensors.len();
    let mut row_sums: Vec<Vec<f64>> = tensors.iter().map(|t| vec![0.0; t.dims.0 * t.dims.1]).collect();
    let mut col_sums: Vec<Vec<f64>> = tensors.iter().map(|t| vec![0.0; if t.dims.1 > 0 { t.dims.0 * t.dims.2 } else { 0 }]).collect();
    let mut row_means: Vec<Vec<f32>> = tensors.iter().map(|t| vec![0.0; t.dims.0]).collect();
    let mut updates: Vec<Vec<f32>> = tensors.iter().map(|t| vec![f32::NAN; t.param.len()]).collect();
    let mut ptrs = vec![];
    let mut dims = vec![];
    let mut numel = vec![];
    for (i, t) in tensors.iter_mut().enumerate() {
        ptrs.extend([
            t.param.as_mut_ptr() as u64,
            t.grad.as_ptr() as u64,
            t.row.as_mut_ptr() as u64,
            t.col.as_mut_ptr() as u64,
            row_sums[i].as_mut_ptr() as u64,
            col_sums[i].as_mut_ptr() as u64,
            row_means[i].as_mut_ptr() as u64,
            t.exp_avg_sq.as_mut_ptr() as u64,
            updates[i].as_mut_ptr() as u64,
            t.exp_avg.as_mut().map_or(0, |m| m.as_mut_ptr() as u64),
        ]);
        dims.extend([t.dims.0 as i64, t.dims.1 as i64, t.dims.2 as i64]);
        numel.push(t.param.len());
    }
    let (numel_i, chunks, grid) = host_tables(&numel, chunk_len);
    let mut param_sumsq = vec![0f64; nt];
    unsafe { emu_loft_adafactor_sums_f32(grid, Dim3::x(THREADS), ptrs.as_ptr(), dims.as_ptr(), numel_i.as_ptr(), chunks.as_ptr(), chunk_len as i64, hyper.eps1, param_sumsq.as_mut_ptr()) };
    let mut scalars = vec![];
    for (i, &n) in numel.iter().enumerate() {
        let (beta2t, lr, decay) = scalars_of(i, rms_from_sumsq(param_sumsq[i], n));
        scalars.extend([beta2t as f32, (1.0 - beta2t) as f32, lr as f32, decay]);
    }
    let factored: Vec<i32> = tensors.iter().enumerate().filter(|(_, t)| t.dims.1 > 0).map(|(i, _)| i as i32).collect();
    let mut update_sumsq = vec![0f64; nt];
    let (b1, w1) = hyper.beta1.map_or((0.0, 0.0), |b| (b as f32, (1.0 - b) as f32));
    unsafe {
        if !factored.is_empty() {
            emu_loft_adafactor_factors_f32(Dim3::x(factored.len() as u32), Dim3::x(THREADS), ptrs.as_ptr(), dims.as_ptr(), scalars.as_ptr(), factored.as_ptr());
        }
        emu_loft_adafactor_update_f32(grid, Dim3::x(THREADS), ptrs.as_ptr(), dims.as_ptr(), scalars.as_ptr(), numel_i.as_ptr(), chunks.as_ptr(), chunk_len as i64, hyper.eps1, update_sumsq.as_mut_ptr());
        emu_loft_adafactor_apply_f32(grid, Dim3::x(THREADS), ptrs.as_ptr(), scalars.as_ptr(), numel_i.as_ptr(), chunks.as_ptr(), chunk_len as i64, update_sumsq.as_ptr(), hyper.clip_threshold, b1, w1, hyper.beta1.is_some() as i32, hyper.decay_on as i32);
    }
}

/// Prodigy's pass 1 under the CPU emulation (tests), in place: per-tensor (dot, |s| sum).
pub fn emulated_prodigy_pass1(tensors: &mut [HostProdigy], slice_p: usize, k: ProdigyPass1, chunk_len: usize) -> (Vec<f64>, Vec<f64>) {
    let mut ptrs = vec![];
    let mut numel = vec![];
    for t in tensors.iter_mut() {
        ptrs.extend([t.param.as_ptr() as u64, t.grad.as_ptr() as u64, t.p0.as_ptr() as u64, t.s.as_mut_ptr() as u64, t.exp_avg.as_mut().map_or(0, |m| m.as_mut_ptr() as u64), t.exp_avg_sq.as_mut_ptr() as u64]);
        numel.push(t.param.len());
    }
    let (numel, chunks, grid) = host_tables(&numel, chunk_len);
    let (mut dots, mut abs_sums) = (vec![0f64; tensors.len()], vec![0f64; tensors.len()]);
    unsafe {
        emu_loft_prodigy_pass1_f32(grid, Dim3::x(THREADS), ptrs.as_ptr(), numel.as_ptr(), chunks.as_ptr(), chunk_len as i64, slice_p as i32, k.coupled_wd, k.b1, k.a1, k.b2, k.a2, k.alpha, k.b3, dots.as_mut_ptr(), abs_sums.as_mut_ptr())
    };
    (dots, abs_sums)
}

/// Prodigy's pass 2 under the CPU emulation (tests), in place.
pub fn emulated_prodigy_pass2(tensors: &mut [HostProdigy], k: ProdigyPass2, chunk_len: usize) {
    let mut ptrs = vec![];
    let mut numel = vec![];
    for t in tensors.iter_mut() {
        ptrs.extend([t.param.as_mut_ptr() as u64, t.grad.as_ptr() as u64, t.exp_avg.as_mut().map_or(0, |m| m.as_mut_ptr() as u64), t.exp_avg_sq.as_mut_ptr() as u64]);
        numel.push(t.param.len());
    }
    let (numel, chunks, grid) = host_tables(&numel, chunk_len);
    unsafe {
        emu_loft_prodigy_pass2_f32(grid, Dim3::x(THREADS), ptrs.as_ptr(), numel.as_ptr(), chunks.as_ptr(), chunk_len as i64, k.coupled_wd, k.decoupled_decay, k.eps_d, k.neg_dlr, k.neg_dlr_d)
    }
}

#[cfg(feature = "cuda")]
pub(crate) use cuda::{adafactor_step, DeviceAdafactor, adamw8bit_step, adamw_step, grad_stats, lion_step, prodigy_pass1, prodigy_pass2, DeviceAdamW, DeviceAdamW8bit, DeviceLion, DeviceProdigy};

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::kernels::cuda::{device, launch, ptr, suffix, Arg, OPTIM_PTX};
    use candle_core::{bail, DType, Result, Tensor};

    /// One AdamW tensor on the device, every buffer f32 and contiguous; the parameter is a
    /// Var's own storage and is updated in place (as `Var::set` would).
    pub(crate) struct DeviceAdamW<'a> {
        pub param: &'a Tensor,
        pub grad: &'a Tensor,
        pub exp_avg: &'a Tensor,
        pub exp_avg_sq: &'a Tensor,
        pub max_exp_avg_sq: Option<&'a Tensor>,
        pub scalars: AdamWScalars,
    }

    /// One Lion tensor on the device (as [`DeviceAdamW`]).
    pub(crate) struct DeviceLion<'a> {
        pub param: &'a Tensor,
        pub grad: &'a Tensor,
        pub exp_avg: &'a Tensor,
        pub scalars: LionScalars,
    }

    fn f32_buffer(t: &Tensor) -> Result<i64> {
        if t.dtype() != DType::F32 || !t.is_contiguous() {
            bail!("multi-tensor optimizer: a {:?} {:?} buffer (f32 and contiguous expected)", t.dtype(), t.dims());
        }
        Ok(ptr(t)? as i64)
    }

    fn upload<T: candle_core::WithDType>(v: Vec<T>, like: &Tensor) -> Result<Tensor> {
        let n = v.len();
        Tensor::from_vec(v, n, like.device())
    }

    /// The device tables of a launch over tensors of `numel` elements: pointers, per-tensor
    /// scalars, sizes, chunks, and the block count.
    fn tables(like: &Tensor, ptrs: Vec<i64>, scalars: Vec<f32>, numel: &[usize], chunk_len: usize) -> Result<(Tensor, Tensor, Tensor, Tensor, u32)> {
        let chunks = chunk_table(numel, chunk_len);
        let blocks = (chunks.len() / 2) as u32;
        Ok((upload(ptrs, like)?, upload(scalars, like)?, upload(numel.iter().map(|&n| n as i64).collect(), like)?, upload(chunks, like)?, blocks))
    }

    fn optional(t: Option<&Tensor>) -> Result<u64> {
        t.map(ptr).transpose().map(|p| p.unwrap_or(0))
    }

    /// One launch of the multi-tensor AdamW step over `tensors`.
    pub(crate) fn adamw_step(tensors: &[DeviceAdamW], hyper: AdamWHyper, grad_scale: Option<&Tensor>, skip: Option<&Tensor>) -> Result<()> {
        let Some(first) = tensors.first() else { return Ok(()) };
        let dev = device(first.param)?;
        let (mut ptrs, mut scalars, mut numel) = (vec![], vec![], vec![]);
        for t in tensors {
            ptrs.extend([f32_buffer(t.param)?, f32_buffer(t.grad)?, f32_buffer(t.exp_avg)?, f32_buffer(t.exp_avg_sq)?, t.max_exp_avg_sq.map(f32_buffer).transpose()?.unwrap_or(0)]);
            scalars.extend(t.scalars);
            numel.push(t.param.elem_count());
        }
        let (ptrs, scalars, numel, chunks, blocks) = tables(first.param, ptrs, scalars, &numel, CHUNK)?;
        launch(
            &dev,
            "loft_optim",
            OPTIM_PTX,
            "loft_multi_adamw_f32",
            (blocks, 1, 1),
            (THREADS, 1, 1),
            &[
                Arg::Ptr(ptr(&ptrs)?),
                Arg::Ptr(ptr(&scalars)?),
                Arg::Ptr(ptr(&numel)?),
                Arg::Ptr(ptr(&chunks)?),
                Arg::I64(CHUNK as i64),
                Arg::F32(hyper.w1),
                Arg::F32(hyper.b2),
                Arg::F32(hyper.w2),
                Arg::F32(hyper.eps),
                Arg::I32(hyper.decay_on as i32),
                Arg::Ptr(optional(grad_scale)?),
                Arg::Ptr(optional(skip)?),
            ],
        )
    }

    /// One launch of the multi-tensor Lion step over `tensors`.
    pub(crate) fn lion_step(tensors: &[DeviceLion], hyper: LionHyper, grad_scale: Option<&Tensor>, skip: Option<&Tensor>) -> Result<()> {
        let Some(first) = tensors.first() else { return Ok(()) };
        let dev = device(first.param)?;
        let (mut ptrs, mut scalars, mut numel) = (vec![], vec![], vec![]);
        for t in tensors {
            ptrs.extend([f32_buffer(t.param)?, f32_buffer(t.grad)?, f32_buffer(t.exp_avg)?]);
            scalars.extend(t.scalars);
            numel.push(t.param.elem_count());
        }
        let (ptrs, scalars, numel, chunks, blocks) = tables(first.param, ptrs, scalars, &numel, CHUNK)?;
        launch(
            &dev,
            "loft_optim",
            OPTIM_PTX,
            "loft_multi_lion_f32",
            (blocks, 1, 1),
            (THREADS, 1, 1),
            &[
                Arg::Ptr(ptr(&ptrs)?),
                Arg::Ptr(ptr(&scalars)?),
                Arg::Ptr(ptr(&numel)?),
                Arg::Ptr(ptr(&chunks)?),
                Arg::I64(CHUNK as i64),
                Arg::F32(hyper.b1),
                Arg::F32(hyper.w1),
                Arg::F32(hyper.b2),
                Arg::F32(hyper.w2),
                Arg::Ptr(optional(grad_scale)?),
                Arg::Ptr(optional(skip)?),
            ],
        )
    }

    /// One AdamW8bit tensor on the device: 8-bit moments (u8 codes, f32 absmax per 256) or
    /// 32-bit ones, and its scalars ([`adamw8bit_scalars`]).
    pub(crate) enum DeviceAdamW8bit<'a> {
        Bits8 { param: &'a Tensor, grad: &'a Tensor, m_codes: &'a Tensor, m_absmax: &'a Tensor, v_codes: &'a Tensor, v_absmax: &'a Tensor, scalars: [f32; 3] },
        Full { param: &'a Tensor, grad: &'a Tensor, m: &'a Tensor, v: &'a Tensor, scalars: [f32; 3] },
    }

    fn u8_buffer(t: &Tensor) -> Result<i64> {
        if t.dtype() != DType::U8 || !t.is_contiguous() {
            bail!("AdamW8bit: a {:?} code buffer (u8 and contiguous expected)", t.dtype());
        }
        Ok(ptr(t)? as i64)
    }

    /// The AdamW8bit step: one launch over every 8-bit block, one over the 32-bit tensors.
    pub(crate) fn adamw8bit_step(tensors: &[DeviceAdamW8bit], betas: (f64, f64), eps: f64, decay_on: bool) -> Result<()> {
        let h = LionHyper::new(betas);
        let (mut b_ptrs, mut b_scalars, mut b_numel, mut f_ptrs, mut f_scalars, mut f_numel) = (vec![], vec![], vec![], vec![], vec![], vec![]);
        let mut like = None;
        for t in tensors {
            match t {
                DeviceAdamW8bit::Bits8 { param, grad, m_codes, m_absmax, v_codes, v_absmax, scalars } => {
                    b_ptrs.extend([f32_buffer(param)?, f32_buffer(grad)?, u8_buffer(m_codes)?, f32_buffer(m_absmax)?, u8_buffer(v_codes)?, f32_buffer(v_absmax)?]);
                    b_scalars.extend(*scalars);
                    b_numel.push(param.elem_count());
                    like = Some(*param);
                }
                DeviceAdamW8bit::Full { param, grad, m, v, scalars } => {
                    f_ptrs.extend([f32_buffer(param)?, f32_buffer(grad)?, f32_buffer(m)?, f32_buffer(v)?]);
                    f_scalars.extend(*scalars);
                    f_numel.push(param.elem_count());
                    like = Some(*param);
                }
            }
        }
        let Some(like) = like else { return Ok(()) };
        let dev = device(like)?;
        if !b_numel.is_empty() {
            let ((sc, sl), (uc, ul)) = (crate::optim::adamw8bit::codebook_tables(true), crate::optim::adamw8bit::codebook_tables(false));
            let tables = [upload(sc.to_vec(), like)?, upload(uc.to_vec(), like)?, upload(sl.to_vec(), like)?, upload(ul.to_vec(), like)?];
            let chunks = chunk_table(&b_numel, THREADS as usize);
            let blocks = (chunks.len() / 2) as u32;
            let (ptrs, scalars) = (upload(b_ptrs, like)?, upload(b_scalars, like)?);
            let (numel, chunks) = (upload(b_numel.iter().map(|&n| n as i64).collect(), like)?, upload(chunks, like)?);
            launch(
                &dev,
                "loft_optim",
                OPTIM_PTX,
                "loft_adamw8bit_blocks_f32",
                (blocks, 1, 1),
                (THREADS, 1, 1),
                &[
                    Arg::Ptr(ptr(&ptrs)?),
                    Arg::Ptr(ptr(&scalars)?),
                    Arg::Ptr(ptr(&numel)?),
                    Arg::Ptr(ptr(&chunks)?),
                    Arg::Ptr(ptr(&tables[0])?),
                    Arg::Ptr(ptr(&tables[1])?),
                    Arg::Ptr(ptr(&tables[2])?),
                    Arg::Ptr(ptr(&tables[3])?),
                    Arg::F32(h.b1),
                    Arg::F32(h.w1),
                    Arg::F32(h.b2),
                    Arg::F32(h.w2),
                    Arg::F32(eps as f32),
                    Arg::I32(decay_on as i32),
                ],
            )?;
        }
        if !f_numel.is_empty() {
            let chunks = chunk_table(&f_numel, CHUNK);
            let blocks = (chunks.len() / 2) as u32;
            let (ptrs, scalars) = (upload(f_ptrs, like)?, upload(f_scalars, like)?);
            let (numel, chunks) = (upload(f_numel.iter().map(|&n| n as i64).collect(), like)?, upload(chunks, like)?);
            launch(
                &dev,
                "loft_optim",
                OPTIM_PTX,
                "loft_adamw8bit_full_f32",
                (blocks, 1, 1),
                (THREADS, 1, 1),
                &[Arg::Ptr(ptr(&ptrs)?), Arg::Ptr(ptr(&scalars)?), Arg::Ptr(ptr(&numel)?), Arg::Ptr(ptr(&chunks)?), Arg::I64(CHUNK as i64), Arg::F32(h.b1), Arg::F32(h.w1), Arg::F32(h.b2), Arg::F32(h.w2), Arg::I32(decay_on as i32)],
            )?;
        }
        Ok(())
    }

    /// One Adafactor tensor on the device (f32, contiguous): `dims` (lead, r, c), r = 0 when
    /// not factored (row/col, or exp_avg_sq, are then one-element placeholders).
    pub(crate) struct DeviceAdafactor<'a> {
        pub param: &'a Tensor,
        pub grad: &'a Tensor,
        pub dims: (usize, usize, usize),
        pub row: &'a Tensor,
        pub col: &'a Tensor,
        pub exp_avg_sq: &'a Tensor,
        pub exp_avg: Option<&'a Tensor>,
    }

    /// One Adafactor step: four launches, with one read of every tensor's Σp² between the
    /// first two (`scalars_of(tensor, param_rms)` → (β2t, lr, −wd·lr)). Returns each tensor's lr.
    pub(crate) fn adafactor_step(tensors: &[DeviceAdafactor], hyper: AdafactorHyper, scalars_of: impl Fn(usize, f64) -> (f64, f64, f32)) -> Result<Vec<f64>> {
        let Some(first) = tensors.first() else { return Ok(vec![]) };
        let dev = device(first.param)?;
        let like = first.param;
        let mut scratch = vec![]; // row sums, col sums, row means, updates: kept alive to the end
        let mut ptrs = vec![];
        let mut dims = vec![];
        let mut numel = vec![];
        for t in tensors {
            let n = t.param.elem_count();
            let (lead, r, c) = t.dims;
            let row_sum = Tensor::zeros((lead * r).max(1), DType::F64, like.device())?;
            let col_sum = Tensor::zeros(if r > 0 { lead * c } else { 1 }, DType::F64, like.device())?;
            let row_mean = Tensor::zeros(lead.max(1), DType::F32, like.device())?;
            let update = crate::kernels::output(n, DType::F32, like.device())?;
            ptrs.extend([
                f32_buffer(t.param)?,
                f32_buffer(t.grad)?,
                f32_buffer(t.row)?,
                f32_buffer(t.col)?,
                ptr(&row_sum)? as i64,
                ptr(&col_sum)? as i64,
                f32_buffer(&row_mean)?,
                f32_buffer(t.exp_avg_sq)?,
                f32_buffer(&update)?,
                t.exp_avg.map(f32_buffer).transpose()?.unwrap_or(0),
            ]);
            scratch.extend([row_sum, col_sum, row_mean, update]);
            dims.extend([lead as i64, r as i64, c as i64]);
            numel.push(n);
        }
        let chunks = chunk_table(&numel, CHUNK);
        let blocks = (chunks.len() / 2) as u32;
        let (ptrs, dims_t) = (upload(ptrs, like)?, upload(dims, like)?);
        let (numel_t, chunks) = (upload(numel.iter().map(|&n| n as i64).collect(), like)?, upload(chunks, like)?);
        let param_sumsq = Tensor::zeros(tensors.len(), DType::F64, like.device())?;
        launch(&dev, "loft_optim", OPTIM_PTX, "loft_adafactor_sums_f32", (blocks, 1, 1), (THREADS, 1, 1), &[Arg::Ptr(ptr(&ptrs)?), Arg::Ptr(ptr(&dims_t)?), Arg::Ptr(ptr(&numel_t)?), Arg::Ptr(ptr(&chunks)?), Arg::I64(CHUNK as i64), Arg::F32(hyper.eps1), Arg::Ptr(ptr(&param_sumsq)?)])?;
        let sums: Vec<f64> = param_sumsq.to_vec1()?;
        let (mut scalars, mut lrs) = (vec![], vec![]);
        for (i, &n) in numel.iter().enumerate() {
            let (beta2t, lr, decay) = scalars_of(i, rms_from_sumsq(sums[i], n));
            scalars.extend([beta2t as f32, (1.0 - beta2t) as f32, lr as f32, decay]);
            lrs.push(lr);
        }
        let scalars = upload(scalars, like)?;
        let factored: Vec<i32> = tensors.iter().enumerate().filter(|(_, t)| t.dims.1 > 0).map(|(i, _)| i as i32).collect();
        if !factored.is_empty() {
            let count = factored.len() as u32;
            let factored = upload(factored, like)?;
            launch(&dev, "loft_optim", OPTIM_PTX, "loft_adafactor_factors_f32", (count, 1, 1), (THREADS, 1, 1), &[Arg::Ptr(ptr(&ptrs)?), Arg::Ptr(ptr(&dims_t)?), Arg::Ptr(ptr(&scalars)?), Arg::Ptr(ptr(&factored)?)])?;
        }
        let update_sumsq = Tensor::zeros(tensors.len(), DType::F64, like.device())?;
        launch(&dev, "loft_optim", OPTIM_PTX, "loft_adafactor_update_f32", (blocks, 1, 1), (THREADS, 1, 1), &[Arg::Ptr(ptr(&ptrs)?), Arg::Ptr(ptr(&dims_t)?), Arg::Ptr(ptr(&scalars)?), Arg::Ptr(ptr(&numel_t)?), Arg::Ptr(ptr(&chunks)?), Arg::I64(CHUNK as i64), Arg::F32(hyper.eps1), Arg::Ptr(ptr(&update_sumsq)?)])?;
        let (b1, w1) = hyper.beta1.map_or((0.0, 0.0), |b| (b as f32, (1.0 - b) as f32));
        launch(
            &dev,
            "loft_optim",
            OPTIM_PTX,
            "loft_adafactor_apply_f32",
            (blocks, 1, 1),
            (THREADS, 1, 1),
            &[
                Arg::Ptr(ptr(&ptrs)?),
                Arg::Ptr(ptr(&scalars)?),
                Arg::Ptr(ptr(&numel_t)?),
                Arg::Ptr(ptr(&chunks)?),
                Arg::I64(CHUNK as i64),
                Arg::Ptr(ptr(&update_sumsq)?),
                Arg::F32(hyper.clip_threshold),
                Arg::F32(b1),
                Arg::F32(w1),
                Arg::I32(hyper.beta1.is_some() as i32),
                Arg::I32(hyper.decay_on as i32),
            ],
        )?;
        drop(scratch);
        Ok(lrs)
    }

    /// One Prodigy tensor on the device (f32, contiguous; the parameter updated in place).
    pub(crate) struct DeviceProdigy<'a> {
        pub param: &'a Tensor,
        pub grad: &'a Tensor,
        pub p0: &'a Tensor,
        pub s: &'a Tensor,
        pub exp_avg: Option<&'a Tensor>,
        pub exp_avg_sq: &'a Tensor,
    }

    fn launch_tables(first: &Tensor, ptrs: Vec<i64>, numel: &[usize]) -> Result<(Tensor, Tensor, Tensor, u32)> {
        let chunks = chunk_table(numel, CHUNK);
        let blocks = (chunks.len() / 2) as u32;
        Ok((upload(ptrs, first)?, upload(numel.iter().map(|&n| n as i64).collect(), first)?, upload(chunks, first)?, blocks))
    }

    /// Prodigy's pass 1 in one launch: per-tensor (dot, |s| sum), read back once.
    pub(crate) fn prodigy_pass1(tensors: &[DeviceProdigy], slice_p: usize, k: ProdigyPass1) -> Result<(Vec<f64>, Vec<f64>)> {
        let Some(first) = tensors.first() else { return Ok((vec![], vec![])) };
        let dev = device(first.param)?;
        let mut ptrs = vec![];
        for t in tensors {
            ptrs.extend([f32_buffer(t.param)?, f32_buffer(t.grad)?, f32_buffer(t.p0)?, f32_buffer(t.s)?, t.exp_avg.map(f32_buffer).transpose()?.unwrap_or(0), f32_buffer(t.exp_avg_sq)?]);
        }
        let numel: Vec<usize> = tensors.iter().map(|t| t.param.elem_count()).collect();
        let (ptrs, numel, chunks, blocks) = launch_tables(first.param, ptrs, &numel)?;
        let dots = Tensor::zeros(tensors.len(), DType::F64, first.param.device())?;
        let abs_sums = Tensor::zeros(tensors.len(), DType::F64, first.param.device())?;
        launch(
            &dev,
            "loft_optim",
            OPTIM_PTX,
            "loft_prodigy_pass1_f32",
            (blocks, 1, 1),
            (THREADS, 1, 1),
            &[
                Arg::Ptr(ptr(&ptrs)?),
                Arg::Ptr(ptr(&numel)?),
                Arg::Ptr(ptr(&chunks)?),
                Arg::I64(CHUNK as i64),
                Arg::I32(slice_p as i32),
                Arg::F32(k.coupled_wd),
                Arg::F32(k.b1),
                Arg::F32(k.a1),
                Arg::F32(k.b2),
                Arg::F32(k.a2),
                Arg::F32(k.alpha),
                Arg::F32(k.b3),
                Arg::Ptr(ptr(&dots)?),
                Arg::Ptr(ptr(&abs_sums)?),
            ],
        )?;
        Ok((dots.to_vec1()?, abs_sums.to_vec1()?))
    }

    /// Prodigy's pass 2 in one launch.
    pub(crate) fn prodigy_pass2(tensors: &[DeviceProdigy], k: ProdigyPass2) -> Result<()> {
        let Some(first) = tensors.first() else { return Ok(()) };
        let dev = device(first.param)?;
        let mut ptrs = vec![];
        for t in tensors {
            ptrs.extend([f32_buffer(t.param)?, f32_buffer(t.grad)?, t.exp_avg.map(f32_buffer).transpose()?.unwrap_or(0), f32_buffer(t.exp_avg_sq)?]);
        }
        let numel: Vec<usize> = tensors.iter().map(|t| t.param.elem_count()).collect();
        let (ptrs, numel, chunks, blocks) = launch_tables(first.param, ptrs, &numel)?;
        launch(
            &dev,
            "loft_optim",
            OPTIM_PTX,
            "loft_prodigy_pass2_f32",
            (blocks, 1, 1),
            (THREADS, 1, 1),
            &[Arg::Ptr(ptr(&ptrs)?), Arg::Ptr(ptr(&numel)?), Arg::Ptr(ptr(&chunks)?), Arg::I64(CHUNK as i64), Arg::F32(k.coupled_wd), Arg::F32(k.decoupled_decay), Arg::F32(k.eps_d), Arg::F32(k.neg_dlr), Arg::F32(k.neg_dlr_d)],
        )
    }

    /// Σg² per gradient (f64) and whether any element is not finite, in one launch and one
    /// read-back. The gradients share a dtype and are contiguous.
    pub(crate) fn grad_stats(grads: &[Tensor]) -> Result<(Vec<f64>, bool)> {
        let Some(first) = grads.first() else { return Ok((vec![], false)) };
        let dev = device(first)?;
        let mut ptrs = vec![];
        for g in grads {
            if g.dtype() != first.dtype() || !g.is_contiguous() {
                bail!("gradient statistics: mixed dtypes or a non-contiguous gradient");
            }
            ptrs.push(ptr(g)? as i64);
        }
        let numel: Vec<usize> = grads.iter().map(|g| g.elem_count()).collect();
        let chunks = chunk_table(&numel, CHUNK);
        let blocks = (chunks.len() / 2) as u32;
        let sumsq = Tensor::zeros(grads.len(), DType::F64, first.device())?;
        let nonfinite = Tensor::zeros(1, DType::U32, first.device())?;
        if blocks > 0 {
            let ptrs = upload(ptrs, first)?;
            let (numel, chunks) = (upload(numel.iter().map(|&n| n as i64).collect(), first)?, upload(chunks, first)?);
            launch(
                &dev,
                "loft_optim",
                OPTIM_PTX,
                &format!("loft_multi_grad_stats_{}", suffix(first.dtype())?),
                (blocks, 1, 1),
                (THREADS, 1, 1),
                &[Arg::Ptr(ptr(&ptrs)?), Arg::Ptr(ptr(&numel)?), Arg::Ptr(ptr(&chunks)?), Arg::I64(CHUNK as i64), Arg::Ptr(ptr(&sumsq)?), Arg::Ptr(ptr(&nonfinite)?)],
            )?;
        }
        Ok((sumsq.to_vec1()?, nonfinite.to_vec1::<u32>()?[0] != 0))
    }
}
