//! The batched Cayley transform of DIAG-OFT and BOFT (worker/kernels/cayley.cu), its CPU
//! reference, and the op that picks one by device: `R = (I + Q)(I − Q)⁻¹` per b×b block, with
//! `(I − Q)⁻¹` kept for the backward (the equations are in cayley.cu's header).

use candle_core::{bail, DType, Result, Tensor};

use super::emulation::Dim3;

/// The reference in f64: Gauss–Jordan of `[I − Q | I + Q | I]` per matrix, as the kernel runs
/// it, returning `(R, (I − Q)⁻¹)` flattened per matrix.
pub fn reference(q: &[f64], n: usize, b: usize) -> (Vec<f64>, Vec<f64>) {
    let cols = 3 * b;
    let (mut r_out, mut inv_out) = (vec![0f64; n * b * b], vec![0f64; n * b * b]);
    for m in 0..n {
        let qm = &q[m * b * b..(m + 1) * b * b];
        let mut w = vec![0f64; b * cols];
        for r in 0..b {
            for c in 0..b {
                let eye = if r == c { 1.0 } else { 0.0 };
                w[r * cols + c] = eye - qm[r * b + c];
                w[r * cols + b + c] = eye + qm[r * b + c];
                w[r * cols + 2 * b + c] = eye;
            }
        }
        for p in 0..b {
            let pivot = w[p * cols + p];
            for c in 0..cols {
                w[p * cols + c] /= pivot;
            }
            for r in (0..b).filter(|&r| r != p) {
                let f = w[r * cols + p];
                for c in 0..cols {
                    w[r * cols + c] -= f * w[p * cols + c];
                }
            }
        }
        for r in 0..b {
            for c in 0..b {
                r_out[m * b * b + r * b + c] = w[r * cols + b + c];
                inv_out[m * b * b + r * b + c] = w[r * cols + 2 * b + c];
            }
        }
    }
    (r_out, inv_out)
}

/// `(R, (I − Q)⁻¹)` for `q (n, b, b)`, both f64 `(n, b, b)`: the kernel on a CUDA tensor
/// (f32/f16/bf16, b ≤ 256), the reference elsewhere.
pub fn forward(q: &Tensor) -> Result<(Tensor, Tensor)> {
    super::count_op_call();
    let (n, b, b2) = q.dims3()?;
    if b != b2 || b == 0 || b > 256 {
        bail!("cayley: {:?} is not a batch of square matrices of size 1..=256", q.dims());
    }
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() && q.dtype() != DType::F64 {
        return cuda::forward(q, n, b);
    }
    let host: Vec<f64> = q.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let (r, inv) = reference(&host, n, b);
    Ok((Tensor::from_vec(r, (n, b, b), q.device())?, Tensor::from_vec(inv, (n, b, b), q.device())?))
}

/// dQ from dR (f64), with A = I + Q and B⁻¹ = (I − Q)⁻¹: `dR·B⁻ᵀ + B⁻ᵀ·Aᵀ·dR·B⁻ᵀ`.
pub fn backward(q: &Tensor, inv: &Tensor, grad_r: &Tensor) -> Result<Tensor> {
    let (n, b, _) = q.dims3()?;
    let q = q.to_dtype(DType::F64)?;
    let eye = Tensor::eye(b, DType::F64, q.device())?.unsqueeze(0)?.broadcast_as((n, b, b))?;
    let a_t = (&eye + &q)?.transpose(1, 2)?;
    let inv_t = inv.transpose(1, 2)?.contiguous()?;
    let g = grad_r.to_dtype(DType::F64)?;
    let right = g.matmul(&inv_t)?; // dR·B⁻ᵀ
    right.add(&inv_t.matmul(&a_t.contiguous()?)?.matmul(&right)?)
}

extern "C" {
    fn emu_loft_cayley_f32(grid: Dim3, block: Dim3, q: *const f32, work: *mut f64, b: i32);
}

/// The kernel under the CPU emulation (tests): `(R, (I − Q)⁻¹)` flattened per matrix.
pub fn emulated(q: &[f32], n: usize, b: usize) -> (Vec<f64>, Vec<f64>) {
    let cols = 3 * b;
    let mut work = vec![f64::NAN; n * b * cols];
    unsafe { emu_loft_cayley_f32(Dim3::x(n as u32), Dim3::x(256), q.as_ptr(), work.as_mut_ptr(), b as i32) };
    split(&work, n, b)
}

/// The R and B⁻¹ parts of the kernel's `(n, b, 3b)` result.
fn split(work: &[f64], n: usize, b: usize) -> (Vec<f64>, Vec<f64>) {
    let cols = 3 * b;
    let (mut r, mut inv) = (vec![], vec![]);
    for m in 0..n {
        for row in 0..b {
            let base = (m * b + row) * cols;
            r.extend_from_slice(&work[base + b..base + 2 * b]);
            inv.extend_from_slice(&work[base + 2 * b..base + 3 * b]);
        }
    }
    (r, inv)
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::kernels::cuda::{device, launch, ptr, suffix, Arg, CAYLEY_PTX};

    pub(super) fn forward(q: &Tensor, n: usize, b: usize) -> Result<(Tensor, Tensor)> {
        let dev = device(q)?;
        let q = q.contiguous()?;
        let work = crate::kernels::output((n, b, 3 * b), DType::F64, q.device())?;
        launch(&dev, "loft_cayley", CAYLEY_PTX, &format!("loft_cayley_{}", suffix(q.dtype())?), (n as u32, 1, 1), (256, 1, 1), &[Arg::Ptr(ptr(&q)?), Arg::Ptr(ptr(&work)?), Arg::I32(b as i32)])?;
        Ok((work.narrow(2, b, b)?.contiguous()?, work.narrow(2, 2 * b, b)?.contiguous()?))
    }
}
