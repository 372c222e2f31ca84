//! Fused rebuild-mode weights of LoHa and LoKr and their backward: the kernels of
//! worker/kernels/lowrank.cu, their CPU reference, and the ops that pick one by device.
//! The equations are in lowrank.cu's header.

use candle_core::{bail, DType, Result, Tensor};

use super::emulation::Dim3;

/// LoKr's factor sizes: w1 a×b, w2 c×e, the weight (a·c)×(b·e).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KronShape {
    pub a: usize,
    pub b: usize,
    pub c: usize,
    pub e: usize,
}

impl KronShape {
    fn numel(&self) -> usize {
        self.a * self.b * self.c * self.e
    }

    fn check(&self) -> Result<()> {
        if self.numel() > i32::MAX as usize {
            bail!("lokr kernels: {self:?} exceeds 2^31 elements");
        }
        Ok(())
    }
}

/// LoHa reference: `W + α·P1⊙P2` (f32 arithmetic).
pub fn reference_loha_merge(w: &[f32], p1: &[f32], p2: &[f32], alpha: f32) -> Vec<f32> {
    w.iter().zip(p1).zip(p2).map(|((&w, &a), &b)| w + alpha * (a * b)).collect()
}

/// LoHa reference backward: `(α·G⊙P2, α·G⊙P1)`.
pub fn reference_loha_grad(g: &[f32], p1: &[f32], p2: &[f32], alpha: f32) -> (Vec<f32>, Vec<f32>) {
    (g.iter().zip(p2).map(|(&g, &b)| alpha * g * b).collect(), g.iter().zip(p1).map(|(&g, &a)| alpha * g * a).collect())
}

/// LoKr reference: `W + α·kron(w1, w2)`.
pub fn reference_lokr_merge(w: &[f32], w1: &[f32], w2: &[f32], s: KronShape, alpha: f32) -> Vec<f32> {
    let cols = s.b * s.e;
    (0..w.len())
        .map(|idx| {
            let (row, col) = (idx / cols, idx % cols);
            let (i, k, j, q) = (row / s.c, row % s.c, col / s.e, col % s.e);
            w[idx] + alpha * (w1[i * s.b + j] * w2[k * s.e + q])
        })
        .collect()
}

/// LoKr reference backward, in f64: `(dw1, dw2)`.
pub fn reference_lokr_grad(g: &[f32], w1: &[f32], w2: &[f32], s: KronShape, alpha: f32) -> (Vec<f32>, Vec<f32>) {
    let cols = s.b * s.e;
    let (mut dw1, mut dw2) = (vec![0f64; s.a * s.b], vec![0f64; s.c * s.e]);
    for i in 0..s.a {
        for k in 0..s.c {
            for j in 0..s.b {
                for q in 0..s.e {
                    let gv = g[(i * s.c + k) * cols + j * s.e + q] as f64;
                    dw1[i * s.b + j] += gv * w2[k * s.e + q] as f64;
                    dw2[k * s.e + q] += gv * w1[i * s.b + j] as f64;
                }
            }
        }
    }
    let scale = |v: Vec<f64>| v.into_iter().map(|x| (alpha as f64 * x) as f32).collect();
    (scale(dw1), scale(dw2))
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

fn same_dtype(ts: &[&Tensor]) -> Result<()> {
    if ts.iter().any(|t| t.dtype() != ts[0].dtype()) {
        bail!("lowrank kernels: the tensors must share a dtype");
    }
    Ok(())
}

/// `W + α·P1⊙P2` in W's dtype and shape (P1, P2 with W's element count).
pub fn loha_merge(w: &Tensor, p1: &Tensor, p2: &Tensor, alpha: f64) -> Result<Tensor> {
    super::count_op_call();
    if p1.elem_count() != w.elem_count() || p2.elem_count() != w.elem_count() {
        bail!("loha merge: {:?}, {:?} and {:?} differ in size", w.dims(), p1.dims(), p2.dims());
    }
    same_dtype(&[w, p1, p2])?;
    #[cfg(feature = "cuda")]
    if w.device().is_cuda() {
        return cuda::loha_merge(w, p1, p2, alpha);
    }
    let out = reference_loha_merge(&host_f32(w)?, &host_f32(p1)?, &host_f32(p2)?, alpha as f32);
    Tensor::from_vec(out, w.shape(), w.device())?.to_dtype(w.dtype())
}

/// LoHa's backward: `(dP1, dP2)` shaped like P1 and P2.
pub fn loha_grad(g: &Tensor, p1: &Tensor, p2: &Tensor, alpha: f64) -> Result<(Tensor, Tensor)> {
    same_dtype(&[g, p1, p2])?;
    #[cfg(feature = "cuda")]
    if g.device().is_cuda() {
        return cuda::loha_grad(g, p1, p2, alpha);
    }
    let (d1, d2) = reference_loha_grad(&host_f32(g)?, &host_f32(p1)?, &host_f32(p2)?, alpha as f32);
    Ok((Tensor::from_vec(d1, p1.shape(), g.device())?.to_dtype(p1.dtype())?, Tensor::from_vec(d2, p2.shape(), g.device())?.to_dtype(p2.dtype())?))
}

fn kron_shape(w: &Tensor, w1: &Tensor, w2: &Tensor) -> Result<KronShape> {
    let (a, b) = w1.dims2()?;
    let c = w2.dim(0)?;
    let e = w2.elem_count() / c.max(1);
    let s = KronShape { a, b, c, e };
    if s.numel() != w.elem_count() || w.dim(0)? != a * c {
        bail!("lokr merge: w1 {:?} ⊗ w2 {:?} does not make {:?}", w1.dims(), w2.dims(), w.dims());
    }
    s.check()?;
    Ok(s)
}

/// `W + α·kron(w1, w2)` in W's dtype and shape (w2 of any rank, read as c × rest).
pub fn lokr_merge(w: &Tensor, w1: &Tensor, w2: &Tensor, alpha: f64) -> Result<Tensor> {
    super::count_op_call();
    same_dtype(&[w, w1, w2])?;
    let s = kron_shape(w, w1, w2)?;
    #[cfg(feature = "cuda")]
    if w.device().is_cuda() {
        return cuda::lokr_merge(w, w1, w2, s, alpha);
    }
    let out = reference_lokr_merge(&host_f32(w)?, &host_f32(w1)?, &host_f32(w2)?, s, alpha as f32);
    Tensor::from_vec(out, w.shape(), w.device())?.to_dtype(w.dtype())
}

/// LoKr's backward: `(dw1, dw2)` shaped and typed like w1 and w2.
pub fn lokr_grad(g: &Tensor, w1: &Tensor, w2: &Tensor, alpha: f64) -> Result<(Tensor, Tensor)> {
    same_dtype(&[g, w1, w2])?;
    let s = kron_shape(g, w1, w2)?;
    #[cfg(feature = "cuda")]
    if g.device().is_cuda() {
        return cuda::lokr_grad(g, w1, w2, s, alpha);
    }
    let (d1, d2) = reference_lokr_grad(&host_f32(g)?, &host_f32(w1)?, &host_f32(w2)?, s, alpha as f32);
    Ok((Tensor::from_vec(d1, w1.shape(), g.device())?.to_dtype(w1.dtype())?, Tensor::from_vec(d2, w2.shape(), g.device())?.to_dtype(w2.dtype())?))
}

/// Threads and blocks of the element-wise kernels.
fn elementwise(n: usize) -> (Dim3, Dim3) {
    (Dim3::x(n.div_ceil(256).clamp(1, 65535) as u32), Dim3::x(256))
}

fn lokr_w2_geometry(s: KronShape) -> (Dim3, Dim3) {
    (Dim3::x((s.c * s.e).div_ceil(128) as u32), Dim3::x(128))
}

extern "C" {
    fn emu_loft_loha_merge_f32(grid: Dim3, block: Dim3, w: *const f32, p1: *const f32, p2: *const f32, out: *mut f32, n: i64, alpha: f32);
    fn emu_loft_loha_grad_f32(grid: Dim3, block: Dim3, g: *const f32, p1: *const f32, p2: *const f32, dp1: *mut f32, dp2: *mut f32, n: i64, alpha: f32);
    fn emu_loft_lokr_merge_f32(grid: Dim3, block: Dim3, w: *const f32, w1: *const f32, w2: *const f32, out: *mut f32, a: i32, b: i32, c: i32, e: i32, alpha: f32);
    fn emu_loft_lokr_grad_w1_f32(grid: Dim3, block: Dim3, g: *const f32, w2: *const f32, dw1: *mut f32, a: i32, b: i32, c: i32, e: i32, alpha: f32);
    fn emu_loft_lokr_grad_w2_f32(grid: Dim3, block: Dim3, g: *const f32, w1: *const f32, dw2: *mut f32, a: i32, b: i32, c: i32, e: i32, alpha: f32);
}

/// The LoHa kernels under the CPU emulation (tests, f32): `(merged, dP1, dP2)`.
pub fn emulated_loha(w: &[f32], p1: &[f32], p2: &[f32], g: &[f32], alpha: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = w.len();
    let (grid, block) = elementwise(n);
    let (mut out, mut d1, mut d2) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
    unsafe {
        emu_loft_loha_merge_f32(grid, block, w.as_ptr(), p1.as_ptr(), p2.as_ptr(), out.as_mut_ptr(), n as i64, alpha);
        emu_loft_loha_grad_f32(grid, block, g.as_ptr(), p1.as_ptr(), p2.as_ptr(), d1.as_mut_ptr(), d2.as_mut_ptr(), n as i64, alpha);
    }
    (out, d1, d2)
}

/// The LoKr kernels under the CPU emulation (tests, f32): `(merged, dw1, dw2)`.
pub fn emulated_lokr(w: &[f32], w1: &[f32], w2: &[f32], g: &[f32], s: KronShape, alpha: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (grid, block) = elementwise(s.numel());
    let mut out = vec![f32::NAN; s.numel()];
    let (mut d1, mut d2) = (vec![f32::NAN; s.a * s.b], vec![f32::NAN; s.c * s.e]);
    let dims = (s.a as i32, s.b as i32, s.c as i32, s.e as i32);
    let (w2_grid, w2_block) = lokr_w2_geometry(s);
    unsafe {
        emu_loft_lokr_merge_f32(grid, block, w.as_ptr(), w1.as_ptr(), w2.as_ptr(), out.as_mut_ptr(), dims.0, dims.1, dims.2, dims.3, alpha);
        emu_loft_lokr_grad_w1_f32(Dim3::x((s.a * s.b) as u32), Dim3::x(128), g.as_ptr(), w2.as_ptr(), d1.as_mut_ptr(), dims.0, dims.1, dims.2, dims.3, alpha);
        emu_loft_lokr_grad_w2_f32(w2_grid, w2_block, g.as_ptr(), w1.as_ptr(), d2.as_mut_ptr(), dims.0, dims.1, dims.2, dims.3, alpha);
    }
    (out, d1, d2)
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::kernels::cuda::{device, launch, ptr, suffix, Arg, LOWRANK_PTX};

    fn dims(d: Dim3) -> (u32, u32, u32) {
        (d.x, d.y, d.z)
    }

    pub(super) fn loha_merge(w: &Tensor, p1: &Tensor, p2: &Tensor, alpha: f64) -> Result<Tensor> {
        let dev = device(w)?;
        let (w, p1, p2) = (w.contiguous()?, p1.contiguous()?, p2.contiguous()?);
        let out = crate::kernels::output(w.shape(), w.dtype(), w.device())?;
        let n = w.elem_count();
        let (grid, block) = elementwise(n);
        launch(&dev, "loft_lowrank", LOWRANK_PTX, &format!("loft_loha_merge_{}", suffix(w.dtype())?), dims(grid), dims(block), &[Arg::Ptr(ptr(&w)?), Arg::Ptr(ptr(&p1)?), Arg::Ptr(ptr(&p2)?), Arg::Ptr(ptr(&out)?), Arg::I64(n as i64), Arg::F32(alpha as f32)])?;
        Ok(out)
    }

    pub(super) fn loha_grad(g: &Tensor, p1: &Tensor, p2: &Tensor, alpha: f64) -> Result<(Tensor, Tensor)> {
        let dev = device(g)?;
        let (g, p1, p2) = (g.contiguous()?, p1.contiguous()?, p2.contiguous()?);
        let d1 = crate::kernels::output(p1.shape(), p1.dtype(), p1.device())?;
        let d2 = crate::kernels::output(p2.shape(), p2.dtype(), p2.device())?;
        let n = g.elem_count();
        let (grid, block) = elementwise(n);
        launch(&dev, "loft_lowrank", LOWRANK_PTX, &format!("loft_loha_grad_{}", suffix(g.dtype())?), dims(grid), dims(block), &[Arg::Ptr(ptr(&g)?), Arg::Ptr(ptr(&p1)?), Arg::Ptr(ptr(&p2)?), Arg::Ptr(ptr(&d1)?), Arg::Ptr(ptr(&d2)?), Arg::I64(n as i64), Arg::F32(alpha as f32)])?;
        Ok((d1, d2))
    }

    fn kron_args(s: KronShape) -> [Arg; 4] {
        [Arg::I32(s.a as i32), Arg::I32(s.b as i32), Arg::I32(s.c as i32), Arg::I32(s.e as i32)]
    }

    pub(super) fn lokr_merge(w: &Tensor, w1: &Tensor, w2: &Tensor, s: KronShape, alpha: f64) -> Result<Tensor> {
        let dev = device(w)?;
        let (w, w1, w2) = (w.contiguous()?, w1.contiguous()?, w2.contiguous()?);
        let out = crate::kernels::output(w.shape(), w.dtype(), w.device())?;
        let (grid, block) = elementwise(s.numel());
        let mut args = vec![Arg::Ptr(ptr(&w)?), Arg::Ptr(ptr(&w1)?), Arg::Ptr(ptr(&w2)?), Arg::Ptr(ptr(&out)?)];
        args.extend(kron_args(s));
        args.push(Arg::F32(alpha as f32));
        launch(&dev, "loft_lowrank", LOWRANK_PTX, &format!("loft_lokr_merge_{}", suffix(w.dtype())?), dims(grid), dims(block), &args)?;
        Ok(out)
    }

    pub(super) fn lokr_grad(g: &Tensor, w1: &Tensor, w2: &Tensor, s: KronShape, alpha: f64) -> Result<(Tensor, Tensor)> {
        let dev = device(g)?;
        let sfx = suffix(g.dtype())?;
        let (g, w1c, w2c) = (g.contiguous()?, w1.contiguous()?, w2.contiguous()?);
        let d1 = crate::kernels::output(s.a * s.b, DType::F32, g.device())?;
        let d2 = crate::kernels::output(s.c * s.e, DType::F32, g.device())?;
        let mut args = vec![Arg::Ptr(ptr(&g)?), Arg::Ptr(ptr(&w2c)?), Arg::Ptr(ptr(&d1)?)];
        args.extend(kron_args(s));
        args.push(Arg::F32(alpha as f32));
        launch(&dev, "loft_lowrank", LOWRANK_PTX, &format!("loft_lokr_grad_w1_{sfx}"), ((s.a * s.b) as u32, 1, 1), (128, 1, 1), &args)?;
        let mut args = vec![Arg::Ptr(ptr(&g)?), Arg::Ptr(ptr(&w1c)?), Arg::Ptr(ptr(&d2)?)];
        args.extend(kron_args(s));
        args.push(Arg::F32(alpha as f32));
        let (grid, block) = lokr_w2_geometry(s);
        launch(&dev, "loft_lowrank", LOWRANK_PTX, &format!("loft_lokr_grad_w2_{sfx}"), dims(grid), dims(block), &args)?;
        Ok((d1.reshape(w1.shape())?.to_dtype(w1.dtype())?, d2.reshape(w2.shape())?.to_dtype(w2.dtype())?))
    }
}
