//! GroupNorm / LayerNorm (+ SiLU) forward and backward: the kernels of worker/kernels/norm.cu,
//! their CPU reference, and the ops that pick one by device.
//!
//! The equations are in norm.cu's header. The forward keeps only the per-row mean and 1/std
//! (f32) for the backward, instead of candle's half-dozen activation-sized intermediates.

use candle_core::{bail, DType, Result, Tensor};

use super::emulation::{Dim3, NormKernels};

/// How a tensor splits into rows of statistics and channels of the affine (norm.cu's layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormShape {
    /// Rows of statistics (GroupNorm: B·G; LayerNorm: the tokens).
    pub rows: usize,
    /// Elements per row.
    pub n: usize,
    /// Groups (LayerNorm: 1).
    pub groups: usize,
    /// Channels per group (LayerNorm: C).
    pub cpg: usize,
    /// Elements per channel within a row (GroupNorm: H·W; LayerNorm: 1).
    pub inner: usize,
}

impl NormShape {
    /// GroupNorm over `(B, C, …)`.
    pub fn group(dims: &[usize], groups: usize) -> Result<Self> {
        if dims.len() < 2 || groups == 0 || dims[1] % groups != 0 {
            bail!("group norm: {groups} groups do not divide the channels of a {dims:?} tensor");
        }
        let inner: usize = dims[2..].iter().product();
        let cpg = dims[1] / groups;
        Ok(Self { rows: dims[0] * groups, n: cpg * inner, groups, cpg, inner })
    }

    /// LayerNorm over the last dimension.
    pub fn layer(dims: &[usize]) -> Result<Self> {
        let Some(&c) = dims.last() else { bail!("layer norm of a scalar") };
        Ok(Self { rows: dims.iter().product::<usize>() / c.max(1), n: c, groups: 1, cpg: c, inner: 1 })
    }

    pub fn channels(&self) -> usize {
        self.groups * self.cpg
    }

    /// Samples (GroupNorm's B; LayerNorm's rows).
    fn samples(&self) -> usize {
        self.rows / self.groups
    }

    fn channel(&self, row: usize, i: usize) -> usize {
        (row % self.groups) * self.cpg + i / self.inner
    }

    /// Whether the affine gradients take the column kernel (one channel per element of a row).
    fn columns(&self) -> bool {
        self.groups == 1 && self.inner == 1
    }

    /// Threads per block of the row kernels: a multiple of 32, at most 256.
    fn row_threads(&self) -> u32 {
        (self.n.div_ceil(32) * 32).clamp(32, 256) as u32
    }

    fn check_affine(&self, gamma: &Tensor, beta: Option<&Tensor>) -> Result<()> {
        if gamma.elem_count() != self.channels() || beta.is_some_and(|b| b.elem_count() != self.channels()) {
            bail!("norm kernels: weight {:?} / bias {:?} for {} channels", gamma.dims(), beta.map(|b| b.dims().to_vec()), self.channels());
        }
        Ok(())
    }

    fn check(&self, len: usize) -> Result<()> {
        if self.rows * self.n != len || self.rows * self.n > i32::MAX as usize {
            bail!("norm kernels: {len} elements do not match {self:?} (or exceed 2^31)");
        }
        Ok(())
    }
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// The reference forward, in f64: `(y, mean, rstd)`.
pub fn reference_forward(x: &[f32], gamma: &[f32], beta: Option<&[f32]>, s: NormShape, eps: f32, silu: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut y = vec![0f32; x.len()];
    let (mut means, mut rstds) = (vec![0f32; s.rows], vec![0f32; s.rows]);
    for r in 0..s.rows {
        let row = &x[r * s.n..(r + 1) * s.n];
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / s.n as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / s.n as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        means[r] = mean as f32;
        rstds[r] = rstd as f32;
        for (i, &v) in row.iter().enumerate() {
            let c = s.channel(r, i);
            let z = (v as f64 - mean) * rstd * gamma[c] as f64 + beta.map_or(0.0, |b| b[c] as f64);
            y[r * s.n + i] = if silu { z * sigmoid(z) } else { z } as f32;
        }
    }
    (y, means, rstds)
}

/// The reference backward, in f64, from the saved statistics: `(dx, dgamma, dbeta)`.
#[allow(clippy::too_many_arguments)]
pub fn reference_backward(x: &[f32], gamma: &[f32], beta: Option<&[f32]>, mean: &[f32], rstd: &[f32], dy: &[f32], s: NormShape, silu: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = vec![0f32; x.len()];
    let (mut dgamma, mut dbeta) = (vec![0f64; s.channels()], vec![0f64; s.channels()]);
    let mut g = vec![0f64; s.n];
    let mut xhat = vec![0f64; s.n];
    for r in 0..s.rows {
        let (m, rs) = (mean[r] as f64, rstd[r] as f64);
        let (mut sum_g, mut sum_gx) = (0.0, 0.0);
        for i in 0..s.n {
            let c = s.channel(r, i);
            let k = r * s.n + i;
            xhat[i] = (x[k] as f64 - m) * rs;
            let mut gi = dy[k] as f64;
            if silu {
                let z = xhat[i] * gamma[c] as f64 + beta.map_or(0.0, |b| b[c] as f64);
                let sg = sigmoid(z);
                gi *= sg * (1.0 + z * (1.0 - sg));
            }
            g[i] = gi;
            dgamma[c] += gi * xhat[i];
            dbeta[c] += gi;
            let ghat = gi * gamma[c] as f64;
            sum_g += ghat;
            sum_gx += ghat * xhat[i];
        }
        let (mean_g, mean_gx) = (sum_g / s.n as f64, sum_gx / s.n as f64);
        for i in 0..s.n {
            let ghat = g[i] * gamma[s.channel(r, i)] as f64;
            dx[r * s.n + i] = (rs * (ghat - mean_g - xhat[i] * mean_gx)) as f32;
        }
    }
    (dx, dgamma.into_iter().map(|v| v as f32).collect(), dbeta.into_iter().map(|v| v as f32).collect())
}

/// What the forward keeps for the backward: per-row mean and 1/std, f32.
#[derive(Clone, Debug)]
pub struct NormStats {
    pub mean: Tensor,
    pub rstd: Tensor,
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// `y = [silu](norm(x)·γ + β)` and the statistics; x contiguous in `s`'s layout; γ and β of
/// any float dtype (used in f32). On a CUDA tensor the kernel, elsewhere the reference.
pub fn forward(x: &Tensor, gamma: &Tensor, beta: Option<&Tensor>, s: NormShape, eps: f64, silu: bool) -> Result<(Tensor, NormStats)> {
    super::count_op_call();
    s.check(x.elem_count())?;
    s.check_affine(gamma, beta)?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::forward(x, gamma, beta, s, eps, silu);
    }
    let beta_host = beta.map(host_f32).transpose()?;
    let (y, mean, rstd) = reference_forward(&host_f32(x)?, &host_f32(gamma)?, beta_host.as_deref(), s, eps as f32, silu);
    let dev = x.device();
    Ok((
        Tensor::from_vec(y, x.shape(), dev)?.to_dtype(x.dtype())?,
        NormStats { mean: Tensor::from_vec(mean, s.rows, dev)?, rstd: Tensor::from_vec(rstd, s.rows, dev)? },
    ))
}

/// The gradients the caller asks for: dx (x's dtype), dγ and dβ (f32, per channel).
pub struct NormGrads {
    pub dx: Option<Tensor>,
    pub dgamma: Option<Tensor>,
    pub dbeta: Option<Tensor>,
}

/// The backward of [`forward`] from its statistics.
#[allow(clippy::too_many_arguments)]
pub fn backward(x: &Tensor, gamma: &Tensor, beta: Option<&Tensor>, stats: &NormStats, dy: &Tensor, s: NormShape, silu: bool, needs: [bool; 3]) -> Result<NormGrads> {
    s.check(x.elem_count())?;
    s.check_affine(gamma, beta)?;
    if dy.elem_count() != x.elem_count() {
        bail!("norm backward: gradient {:?} for input {:?}", dy.dims(), x.dims());
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::backward(x, gamma, beta, stats, dy, s, silu, needs);
    }
    let beta_host = beta.map(host_f32).transpose()?;
    let (dx, dgamma, dbeta) = reference_backward(&host_f32(x)?, &host_f32(gamma)?, beta_host.as_deref(), &host_f32(&stats.mean)?, &host_f32(&stats.rstd)?, &host_f32(dy)?, s, silu);
    let dev = x.device();
    Ok(NormGrads {
        dx: if needs[0] { Some(Tensor::from_vec(dx, x.shape(), dev)?.to_dtype(x.dtype())?) } else { None },
        dgamma: if needs[1] { Some(Tensor::from_vec(dgamma, s.channels(), dev)?) } else { None },
        dbeta: if needs[2] { Some(Tensor::from_vec(dbeta, s.channels(), dev)?) } else { None },
    })
}

/// Whether the affine gradients take the column kernel (LayerNorm without a SiLU).
fn column_affine(s: NormShape, silu: bool) -> bool {
    s.columns() && !silu
}

/// Launch geometry shared by the CUDA launches and the emulated ones: the row kernels' grid
/// and block, then the affine-gradient kernel's.
fn geometry(s: NormShape, silu: bool) -> (Dim3, Dim3, Dim3, Dim3) {
    let rows = (Dim3::x(s.rows as u32), Dim3::x(s.row_threads()));
    let affine = if column_affine(s, silu) {
        (Dim3::x(s.channels().div_ceil(32) as u32), Dim3::xy(32, 8))
    } else {
        let threads = ((s.samples() * s.inner).div_ceil(32) * 32).clamp(32, 256) as u32;
        (Dim3::x(s.channels() as u32), Dim3::x(threads))
    };
    (rows.0, rows.1, affine.0, affine.1)
}

fn or_null<T>(v: Option<&[T]>) -> *const T {
    v.map_or(std::ptr::null(), |v| v.as_ptr())
}

/// Runs the forward kernel under the CPU emulation (tests): `(y, mean, rstd)`; outputs start
/// as NaN, so an element the kernel never writes shows.
pub fn emulated_forward<T: NormKernels>(x: &[T], gamma: &[f32], beta: Option<&[f32]>, s: NormShape, eps: f32, silu: bool) -> Result<(Vec<T>, Vec<f32>, Vec<f32>)> {
    s.check(x.len())?;
    let mut y = vec![T::from_f32(f32::NAN); x.len()];
    let (mut mean, mut rstd) = (vec![f32::NAN; s.rows], vec![f32::NAN; s.rows]);
    let (grid, block, _, _) = geometry(s, silu);
    unsafe {
        T::norm_fwd(silu, grid, block, x.as_ptr(), gamma.as_ptr(), or_null(beta), y.as_mut_ptr(), mean.as_mut_ptr(), rstd.as_mut_ptr(), s.n as i32, s.groups as i32, s.cpg as i32, s.inner as i32, eps)
    };
    Ok((y, mean, rstd))
}

/// Runs the backward kernels under the CPU emulation (tests): `(dx, dgamma, dbeta)`.
#[allow(clippy::too_many_arguments)]
pub fn emulated_backward<T: NormKernels>(x: &[T], gamma: &[f32], beta: Option<&[f32]>, mean: &[f32], rstd: &[f32], dy: &[T], s: NormShape, silu: bool) -> Result<(Vec<T>, Vec<f32>, Vec<f32>)> {
    s.check(x.len())?;
    let mut dx = vec![T::from_f32(f32::NAN); x.len()];
    let (mut dgamma, mut dbeta) = (vec![f32::NAN; s.channels()], vec![f32::NAN; s.channels()]);
    let (grid, block, agrid, ablock) = geometry(s, silu);
    unsafe {
        T::norm_bwd_dx(silu, grid, block, x.as_ptr(), gamma.as_ptr(), or_null(beta), mean.as_ptr(), rstd.as_ptr(), dy.as_ptr(), dx.as_mut_ptr(), s.n as i32, s.groups as i32, s.cpg as i32, s.inner as i32);
        if column_affine(s, silu) {
            T::layer_norm_bwd_affine(agrid, ablock, x.as_ptr(), mean.as_ptr(), rstd.as_ptr(), dy.as_ptr(), dgamma.as_mut_ptr(), dbeta.as_mut_ptr(), s.rows as i32, s.channels() as i32);
        } else {
            T::group_norm_bwd_affine(silu, agrid, ablock, x.as_ptr(), gamma.as_ptr(), or_null(beta), mean.as_ptr(), rstd.as_ptr(), dy.as_ptr(), dgamma.as_mut_ptr(), dbeta.as_mut_ptr(), s.samples() as i32, s.channels() as i32, s.groups as i32, s.inner as i32);
        }
    }
    Ok((dx, dgamma, dbeta))
}


#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::kernels::cuda::{device, launch, ptr, suffix, Arg, NORM_PTX};

    fn dims(d: Dim3) -> (u32, u32, u32) {
        (d.x, d.y, d.z)
    }

    pub(super) fn forward(x: &Tensor, gamma: &Tensor, beta: Option<&Tensor>, s: NormShape, eps: f64, silu: bool) -> Result<(Tensor, NormStats)> {
        let dev = device(x)?;
        let x = x.contiguous()?;
        let gamma = gamma.to_dtype(DType::F32)?.contiguous()?;
        let beta = beta.map(|b| b.to_dtype(DType::F32)?.contiguous()).transpose()?;
        let y = crate::kernels::output(x.shape(), x.dtype(), x.device())?;
        let mean = crate::kernels::output(s.rows, DType::F32, x.device())?;
        let rstd = crate::kernels::output(s.rows, DType::F32, x.device())?;
        let (grid, block, _, _) = geometry(s, silu);
        let name = format!("loft_norm{}_fwd_{}", if silu { "_silu" } else { "" }, suffix(x.dtype())?);
        let beta_ptr = beta.as_ref().map(ptr).transpose()?.unwrap_or(0);
        launch(
            &dev,
            "loft_norm",
            NORM_PTX,
            &name,
            dims(grid),
            dims(block),
            &[Arg::Ptr(ptr(&x)?), Arg::Ptr(ptr(&gamma)?), Arg::Ptr(beta_ptr), Arg::Ptr(ptr(&y)?), Arg::Ptr(ptr(&mean)?), Arg::Ptr(ptr(&rstd)?), Arg::I32(s.n as i32), Arg::I32(s.groups as i32), Arg::I32(s.cpg as i32), Arg::I32(s.inner as i32), Arg::F32(eps as f32)],
        )?;
        Ok((y, NormStats { mean, rstd }))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(x: &Tensor, gamma: &Tensor, beta: Option<&Tensor>, stats: &NormStats, dy: &Tensor, s: NormShape, silu: bool, needs: [bool; 3]) -> Result<NormGrads> {
        let dev = device(x)?;
        let sfx = suffix(x.dtype())?;
        let x = x.contiguous()?;
        let dy = dy.to_dtype(x.dtype())?.contiguous()?;
        let gamma = gamma.to_dtype(DType::F32)?.contiguous()?;
        let beta = beta.map(|b| b.to_dtype(DType::F32)?.contiguous()).transpose()?;
        let beta_ptr = beta.as_ref().map(ptr).transpose()?.unwrap_or(0);
        let (mean, rstd) = (stats.mean.contiguous()?, stats.rstd.contiguous()?);
        let (grid, block, agrid, ablock) = geometry(s, silu);
        let act = if silu { "_silu" } else { "" };
        let dx = if needs[0] {
            let dx = crate::kernels::output(x.shape(), x.dtype(), x.device())?;
            launch(
                &dev,
                "loft_norm",
                NORM_PTX,
                &format!("loft_norm{act}_bwd_dx_{sfx}"),
                dims(grid),
                dims(block),
                &[Arg::Ptr(ptr(&x)?), Arg::Ptr(ptr(&gamma)?), Arg::Ptr(beta_ptr), Arg::Ptr(ptr(&mean)?), Arg::Ptr(ptr(&rstd)?), Arg::Ptr(ptr(&dy)?), Arg::Ptr(ptr(&dx)?), Arg::I32(s.n as i32), Arg::I32(s.groups as i32), Arg::I32(s.cpg as i32), Arg::I32(s.inner as i32)],
            )?;
            Some(dx)
        } else {
            None
        };
        let (dgamma, dbeta) = if needs[1] || needs[2] {
            let dgamma = crate::kernels::output(s.channels(), DType::F32, x.device())?;
            let dbeta = crate::kernels::output(s.channels(), DType::F32, x.device())?;
            if column_affine(s, silu) {
                launch(
                    &dev,
                    "loft_norm",
                    NORM_PTX,
                    &format!("loft_layer_norm_bwd_affine_{sfx}"),
                    dims(agrid),
                    dims(ablock),
                    &[Arg::Ptr(ptr(&x)?), Arg::Ptr(ptr(&mean)?), Arg::Ptr(ptr(&rstd)?), Arg::Ptr(ptr(&dy)?), Arg::Ptr(ptr(&dgamma)?), Arg::Ptr(ptr(&dbeta)?), Arg::I32(s.rows as i32), Arg::I32(s.channels() as i32)],
                )?;
            } else {
                launch(
                    &dev,
                    "loft_norm",
                    NORM_PTX,
                    &format!("loft_group_norm{act}_bwd_affine_{sfx}"),
                    dims(agrid),
                    dims(ablock),
                    &[Arg::Ptr(ptr(&x)?), Arg::Ptr(ptr(&gamma)?), Arg::Ptr(beta_ptr), Arg::Ptr(ptr(&mean)?), Arg::Ptr(ptr(&rstd)?), Arg::Ptr(ptr(&dy)?), Arg::Ptr(ptr(&dgamma)?), Arg::Ptr(ptr(&dbeta)?), Arg::I32(s.samples() as i32), Arg::I32(s.channels() as i32), Arg::I32(s.groups as i32), Arg::I32(s.inner as i32)],
                )?;
            }
            (needs[1].then_some(dgamma), needs[2].then_some(dbeta))
        } else {
            (None, None)
        };
        Ok(NormGrads { dx, dgamma, dbeta })
    }
}
