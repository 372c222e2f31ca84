//! SiLU and exact (erf) GELU whose backward is one pass: dx = g ⊙ f′(x), with
//!   silu′(x) = σ(x)·(1 + x·(1 − σ(x))),   gelu′(x) = ½(1 + erf(x/√2)) + x·φ(x), φ the normal pdf.
//! On the CPU forward and backward are single parallel loops over f32; candle's own versions
//! compose the derivative from about ten element-wise ops, each a fresh activation-sized
//! tensor. Elsewhere the same formulas in candle ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::graph::{attach, Backward};
use crate::profile::Kind;

#[derive(Clone, Copy, Debug)]
enum Act {
    Silu,
    GeluErf,
}

impl Act {
    fn value(self, x: f32) -> f32 {
        match self {
            Act::Silu => x / (1.0 + (-x).exp()),
            Act::GeluErf => 0.5 * x * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2)),
        }
    }

    fn derivative(self, x: f32) -> f32 {
        match self {
            Act::Silu => {
                let s = 1.0 / (1.0 + (-x).exp());
                s * (1.0 + x * (1.0 - s))
            }
            Act::GeluErf => {
                const INV_SQRT_2PI: f32 = 0.398_942_3;
                0.5 * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2)) + x * INV_SQRT_2PI * (-0.5 * x * x).exp()
            }
        }
    }
}

/// `x·σ(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    activation(x, Act::Silu)
}

/// `½·x·(1 + erf(x/√2))`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    activation(x, Act::GeluErf)
}

fn fused(x: &Tensor) -> bool {
    super::cpu_fused(x)
}

fn activation(x: &Tensor, act: Act) -> Result<Tensor> {
    if super::reference_ops() {
        return reference(x, act);
    }
    let out = if fused(x) { x.detach().contiguous()?.apply_op1_no_bwd(&Forward(act))? } else { reference(&x.detach(), act)? };
    attach(&[x], out, ActBackward(act))
}

fn reference(x: &Tensor, act: Act) -> Result<Tensor> {
    match act {
        Act::Silu => x.silu(),
        Act::GeluErf => x.gelu_erf(),
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("activation: f32 only") };
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("activation: contiguous input only") };
    Ok(&v[a..b])
}

const CHUNK: usize = 1 << 14;

struct Forward(Act);

impl CustomOp1 for Forward {
    fn name(&self) -> &'static str {
        "activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = self.0.value(x);
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// dx from (x, g).
struct Derivative(Act);

impl CustomOp2 for Derivative {
    fn name(&self) -> &'static str {
        "activation-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK))).for_each(|(o, (x, g))| {
            for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
                *o = g * self.0.derivative(x);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

struct ActBackward(Act);

impl Backward for ActBackward {
    fn name(&self) -> &'static str {
        "activation"
    }

    fn profile_kind(&self) -> Kind {
        Kind::ActivationBackward
    }

    fn backward(&self, args: &[&Tensor], _needs: &[bool], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let x = args[0];
        if fused(x) && grad.dtype() == DType::F32 {
            return Ok(vec![Some(x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &Derivative(self.0))?)]);
        }
        // Half precision in f32: half-precision erf/exp kernels are not on every backend.
        let x = if matches!(x.dtype(), DType::F16 | DType::BF16) { x.to_dtype(DType::F32)? } else { x.clone() };
        let d = match self.0 {
            Act::Silu => {
                let s = candle_nn::ops::sigmoid(&x)?;
                (&s * ((&x * (1.0 - &s)?)? + 1.0)?)?
            }
            Act::GeluErf => {
                let cdf = (((&x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5)?;
                let pdf = ((x.sqr()? * -0.5)?.exp()? * 0.398_942_280_401_432_7)?;
                (cdf + x.mul(&pdf)?)?
            }
        };
        Ok(vec![Some(grad.mul(&d.to_dtype(grad.dtype())?)?)])
    }
}
