//! Fused multi-head attention forward and backward: the kernels of worker/kernels/attention.cu,
//! their CPU reference, and the ops that pick one by device.
//!
//! Tensors are the models' own `(B, N, H·d)` layout (no head split copies); the forward keeps
//! `out` and each query's log-sum-exp `(B, Nq, H)` f32 for the backward. The equations are in
//! attention.cu's header.

use candle_core::{bail, DType, Result, Tensor};

use super::emulation::{AttentionKernels, Dim3};

/// Head sizes with a compiled kernel (SD1.x: 40, 80, 160; SD2/SDXL: 64; Flux/SD3: 128).
pub const HEAD_SIZES: [usize; 5] = [40, 64, 80, 128, 160];

/// Queries per forward block, keys per backward block (attention.cu's FWD_ROWS, BWD_KEYS).
const FWD_ROWS: usize = 32;
const BWD_KEYS: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub nq: usize,
    pub nk: usize,
    /// Head size.
    pub d: usize,
}

impl AttentionShape {
    /// From `q (B, Nq, H·d)`, `k (B, Nk, H·d)`.
    pub fn of(q: &Tensor, k: &Tensor, heads: usize) -> Result<Self> {
        let (batch, nq, inner) = q.dims3()?;
        let (kb, nk, kinner) = k.dims3()?;
        if kb != batch || kinner != inner || heads == 0 || inner % heads != 0 || nk == 0 {
            bail!("attention: q {:?} and k {:?} do not fit {heads} heads", q.dims(), k.dims());
        }
        Ok(Self { batch, heads, nq, nk, d: inner / heads })
    }

    pub fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }

    /// Whether a kernel exists for this head size (other sizes keep the candle formulation
    /// on a GPU).
    pub fn has_kernel(&self) -> bool {
        HEAD_SIZES.contains(&self.d)
    }

    fn at(&self, b: usize, n: usize, n_len: usize, h: usize) -> usize {
        ((b * n_len + n) * self.heads + h) * self.d
    }

    fn rows_q(&self) -> usize {
        self.batch * self.nq * self.heads
    }

    fn check_v(&self, k: &Tensor, v: &Tensor) -> Result<()> {
        if v.dims() != k.dims() {
            bail!("attention: v {:?} is not shaped like k {:?}", v.dims(), k.dims());
        }
        Ok(())
    }

    fn check(&self, q: usize, k: usize) -> Result<()> {
        if q != self.rows_q() * self.d || k != self.batch * self.nk * self.heads * self.d {
            bail!("attention kernels: buffers of {q} and {k} elements do not match {self:?}");
        }
        if self.batch * self.heads > 65535 {
            bail!("attention kernels: {} × {} heads exceed the grid's 65535", self.batch, self.heads);
        }
        if q.max(k) > i32::MAX as usize / 2 {
            bail!("attention kernels: {self:?} is too large for 32-bit indexing of a row");
        }
        Ok(())
    }

    fn forward_geometry(&self) -> (Dim3, Dim3) {
        (Dim3::xy(self.nq.div_ceil(FWD_ROWS) as u32, (self.batch * self.heads) as u32), Dim3::x(FWD_ROWS as u32 * 4))
    }

    fn backward_geometry(&self) -> (Dim3, Dim3) {
        (Dim3::xy(self.nk.div_ceil(BWD_KEYS) as u32, (self.batch * self.heads) as u32), Dim3::x(BWD_KEYS as u32 * 4))
    }

    fn rowdot_geometry(&self) -> (Dim3, Dim3) {
        (Dim3::x(self.rows_q().div_ceil(128) as u32), Dim3::x(128))
    }
}

/// The reference forward, in f64: `(out, lse)`.
pub fn reference_forward(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape) -> (Vec<f32>, Vec<f32>) {
    let scale = 1.0 / (s.d as f64).sqrt();
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; s.rows_q()];
    let mut scores = vec![0f64; s.nk];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.nq {
                let qi = &q[s.at(b, i, s.nq, h)..][..s.d];
                for (j, score) in scores.iter_mut().enumerate() {
                    let kj = &k[s.at(b, j, s.nk, h)..][..s.d];
                    *score = scale * qi.iter().zip(kj).map(|(&a, &c)| a as f64 * c as f64).sum::<f64>();
                }
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|&x| (x - max).exp()).sum();
                let o = s.at(b, i, s.nq, h);
                for e in 0..s.d {
                    let acc: f64 = scores.iter().enumerate().map(|(j, &x)| (x - max).exp() * v[s.at(b, j, s.nk, h) + e] as f64).sum();
                    out[o + e] = (acc / sum) as f32;
                }
                lse[(b * s.nq + i) * s.heads + h] = (max + sum.ln()) as f32;
            }
        }
    }
    (out, lse)
}

/// The reference backward, in f64, from the forward's `out` and `lse`: `(dq, dk, dv)`.
pub fn reference_backward(q: &[f32], k: &[f32], v: &[f32], out: &[f32], lse: &[f32], dout: &[f32], s: AttentionShape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let scale = 1.0 / (s.d as f64).sqrt();
    let (mut dq, mut dk, mut dv) = (vec![0f64; q.len()], vec![0f64; k.len()], vec![0f64; k.len()]);
    let dot = |a: &[f32], c: &[f32]| a.iter().zip(c).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>();
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.nq {
                let oi = s.at(b, i, s.nq, h);
                let rowdot = dot(&dout[oi..oi + s.d], &out[oi..oi + s.d]);
                let l = lse[(b * s.nq + i) * s.heads + h] as f64;
                for j in 0..s.nk {
                    let kj = s.at(b, j, s.nk, h);
                    let p = (scale * dot(&q[oi..oi + s.d], &k[kj..kj + s.d]) - l).exp();
                    let dp = dot(&dout[oi..oi + s.d], &v[kj..kj + s.d]);
                    let ds = p * (dp - rowdot);
                    for e in 0..s.d {
                        dv[kj + e] += p * dout[oi + e] as f64;
                        dk[kj + e] += scale * ds * q[oi + e] as f64;
                        dq[oi + e] += scale * ds * k[kj + e] as f64;
                    }
                }
            }
        }
    }
    let narrow = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    (narrow(dq), narrow(dk), narrow(dv))
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// `softmax(q·kᵀ/√d)·v` per head and each query's log-sum-exp: the kernel on a CUDA tensor
/// (head sizes in [`HEAD_SIZES`]), the reference elsewhere. q, k, v share a dtype.
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<(Tensor, Tensor)> {
    super::count_op_call();
    let s = AttentionShape::of(q, k, heads)?;
    s.check_v(k, v)?;
    s.check(q.elem_count(), k.elem_count())?;
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return cuda::forward(q, k, v, s);
    }
    let (out, lse) = reference_forward(&host_f32(q)?, &host_f32(k)?, &host_f32(v)?, s);
    Ok((Tensor::from_vec(out, q.shape(), q.device())?.to_dtype(q.dtype())?, Tensor::from_vec(lse, (s.batch, s.nq, s.heads), q.device())?))
}

/// The backward of [`forward`]: `(dq, dk, dv)` in q's dtype.
pub fn backward(q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, lse: &Tensor, dout: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let s = AttentionShape::of(q, k, heads)?;
    s.check_v(k, v)?;
    if dout.dims() != q.dims() || out.dims() != q.dims() {
        bail!("attention backward: out {:?} / gradient {:?} for q {:?}", out.dims(), dout.dims(), q.dims());
    }
    s.check(q.elem_count(), k.elem_count())?;
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return cuda::backward(q, k, v, out, lse, dout, s);
    }
    let (dq, dk, dv) = reference_backward(&host_f32(q)?, &host_f32(k)?, &host_f32(v)?, &host_f32(out)?, &host_f32(lse)?, &host_f32(dout)?, s);
    let dev = q.device();
    Ok((
        Tensor::from_vec(dq, q.shape(), dev)?.to_dtype(q.dtype())?,
        Tensor::from_vec(dk, k.shape(), dev)?.to_dtype(q.dtype())?,
        Tensor::from_vec(dv, v.shape(), dev)?.to_dtype(q.dtype())?,
    ))
}

/// Runs the forward kernel under the CPU emulation (tests): `(out, lse)`, both starting as NaN.
pub fn emulated_forward<T: AttentionKernels>(q: &[T], k: &[T], v: &[T], s: AttentionShape) -> Result<(Vec<T>, Vec<f32>)> {
    s.check(q.len(), k.len())?;
    if !s.has_kernel() {
        bail!("no attention kernel for head size {}", s.d);
    }
    let mut out = vec![T::from_f32(f32::NAN); q.len()];
    let mut lse = vec![f32::NAN; s.rows_q()];
    let (grid, block) = s.forward_geometry();
    unsafe { T::attention_fwd(grid, block, s.d as i32, q.as_ptr(), k.as_ptr(), v.as_ptr(), out.as_mut_ptr(), lse.as_mut_ptr(), s.heads as i32, s.nq as i32, s.nk as i32, s.scale()) };
    Ok((out, lse))
}

/// Runs the backward kernels under the CPU emulation (tests): `(dq f32, dk, dv)`.
#[allow(clippy::too_many_arguments)]
pub fn emulated_backward<T: AttentionKernels>(q: &[T], k: &[T], v: &[T], out: &[T], lse: &[f32], dout: &[T], s: AttentionShape) -> Result<(Vec<f32>, Vec<T>, Vec<T>)> {
    s.check(q.len(), k.len())?;
    if !s.has_kernel() {
        bail!("no attention kernel for head size {}", s.d);
    }
    let mut rowdot = vec![f32::NAN; s.rows_q()];
    let (grid, block) = s.rowdot_geometry();
    unsafe { T::attention_rowdot(grid, block, out.as_ptr(), dout.as_ptr(), rowdot.as_mut_ptr(), s.rows_q() as i64, s.d as i32) };
    let mut dq = vec![0f32; q.len()]; // accumulated with atomicAdd: starts at zero
    let mut dk = vec![T::from_f32(f32::NAN); k.len()];
    let mut dv = vec![T::from_f32(f32::NAN); k.len()];
    let (grid, block) = s.backward_geometry();
    unsafe {
        T::attention_bwd(grid, block, s.d as i32, q.as_ptr(), k.as_ptr(), v.as_ptr(), dout.as_ptr(), lse.as_ptr(), rowdot.as_ptr(), dq.as_mut_ptr(), dk.as_mut_ptr(), dv.as_mut_ptr(), s.heads as i32, s.nq as i32, s.nk as i32, s.scale())
    };
    Ok((dq, dk, dv))
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::kernels::cuda::{device, launch, ptr, suffix, Arg, ATTENTION_PTX};

    fn dims(d: Dim3) -> (u32, u32, u32) {
        (d.x, d.y, d.z)
    }

    fn head_size(s: &AttentionShape) -> Result<()> {
        if !s.has_kernel() {
            bail!("no attention kernel for head size {} (compiled: {:?})", s.d, HEAD_SIZES);
        }
        Ok(())
    }

    pub(super) fn forward(q: &Tensor, k: &Tensor, v: &Tensor, s: AttentionShape) -> Result<(Tensor, Tensor)> {
        head_size(&s)?;
        let dev = device(q)?;
        let (q, k, v) = (q.contiguous()?, k.to_dtype(q.dtype())?.contiguous()?, v.to_dtype(q.dtype())?.contiguous()?);
        let out = crate::kernels::output(q.shape(), q.dtype(), q.device())?;
        let lse = crate::kernels::output((s.batch, s.nq, s.heads), DType::F32, q.device())?;
        let (grid, block) = s.forward_geometry();
        launch(
            &dev,
            "loft_attention",
            ATTENTION_PTX,
            &format!("loft_attention_fwd_{}_d{}", suffix(q.dtype())?, s.d),
            dims(grid),
            dims(block),
            &[Arg::Ptr(ptr(&q)?), Arg::Ptr(ptr(&k)?), Arg::Ptr(ptr(&v)?), Arg::Ptr(ptr(&out)?), Arg::Ptr(ptr(&lse)?), Arg::I32(s.heads as i32), Arg::I32(s.nq as i32), Arg::I32(s.nk as i32), Arg::F32(s.scale())],
        )?;
        Ok((out, lse))
    }

    pub(super) fn backward(q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, lse: &Tensor, dout: &Tensor, s: AttentionShape) -> Result<(Tensor, Tensor, Tensor)> {
        head_size(&s)?;
        let dev = device(q)?;
        let dtype = q.dtype();
        let sfx = suffix(dtype)?;
        let (q, k, v) = (q.contiguous()?, k.to_dtype(dtype)?.contiguous()?, v.to_dtype(dtype)?.contiguous()?);
        let (out, dout, lse) = (out.to_dtype(dtype)?.contiguous()?, dout.to_dtype(dtype)?.contiguous()?, lse.contiguous()?);
        let rowdot = crate::kernels::output((s.batch, s.nq, s.heads), DType::F32, q.device())?;
        let (grid, block) = s.rowdot_geometry();
        launch(&dev, "loft_attention", ATTENTION_PTX, &format!("loft_attention_rowdot_{sfx}"), dims(grid), dims(block), &[Arg::Ptr(ptr(&out)?), Arg::Ptr(ptr(&dout)?), Arg::Ptr(ptr(&rowdot)?), Arg::I64(s.rows_q() as i64), Arg::I32(s.d as i32)])?;
        let dq = Tensor::zeros(q.shape(), DType::F32, q.device())?; // accumulated: zeros
        let dk = crate::kernels::output(k.shape(), dtype, q.device())?;
        let dv = crate::kernels::output(v.shape(), dtype, q.device())?;
        let (grid, block) = s.backward_geometry();
        launch(
            &dev,
            "loft_attention",
            ATTENTION_PTX,
            &format!("loft_attention_bwd_{sfx}_d{}", s.d),
            dims(grid),
            dims(block),
            &[
                Arg::Ptr(ptr(&q)?),
                Arg::Ptr(ptr(&k)?),
                Arg::Ptr(ptr(&v)?),
                Arg::Ptr(ptr(&dout)?),
                Arg::Ptr(ptr(&lse)?),
                Arg::Ptr(ptr(&rowdot)?),
                Arg::Ptr(ptr(&dq)?),
                Arg::Ptr(ptr(&dk)?),
                Arg::Ptr(ptr(&dv)?),
                Arg::I32(s.heads as i32),
                Arg::I32(s.nq as i32),
                Arg::I32(s.nk as i32),
                Arg::F32(s.scale()),
            ],
        )?;
        Ok((dq.to_dtype(dtype)?, dk, dv))
    }
}
