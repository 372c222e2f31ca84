//! GroupNorm and LayerNorm whose backward keeps only the input (the statistics are recomputed)
//! and computes the affine gradients only when the weight or bias is trained.
//!
//! With x̂ = (x − μ)·r per normalised group (r = 1/√(σ² + ε), biased variance), y = x̂·γ + β and
//! output gradient g, over the N elements of each group:
//!   dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) with ĝ = g·γ,   dγ = Σ g·x̂,   dβ = Σ g
//! (the sums over every position of each channel). Composed from candle's primitives, the
//! norm keeps about six activation-sized intermediates for candle's backward and accumulates a
//! gradient for each; here the graph holds one node.

use candle_core::{Result, Tensor, D};

use super::graph::{attach, Backward};
use crate::kernels::{self, norm::{NormShape, NormStats}};
use crate::profile::{self, Kind};

/// GroupNorm over `(B, C, …)`: statistics per (sample, group), then a per-channel affine.
pub fn group_norm(x: &Tensor, groups: usize, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    norm(x, weight, bias, Norm::Group { groups, eps })
}

/// `silu(group_norm(x))`, the pair that opens every resnet: one fused kernel op where the
/// kernels run (forward and backward keep only the statistics), the two ops elsewhere.
pub fn group_norm_silu(x: &Tensor, groups: usize, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    if !super::reference_ops() && kernels::use_kernels(x) {
        let _span = profile::span(Kind::NormForward);
        return kernel_norm(x, weight, bias, Norm::Group { groups, eps }, true);
    }
    super::silu(&group_norm(x, groups, weight, bias, eps)?)
}

/// LayerNorm over the last dimension.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    norm(x, weight, bias, Norm::Layer { eps })
}

#[derive(Clone, Copy)]
enum Norm {
    Group { groups: usize, eps: f64 },
    Layer { eps: f64 },
}

impl Norm {
    fn eps(self) -> f64 {
        match self {
            Norm::Group { eps, .. } | Norm::Layer { eps } => eps,
        }
    }

    /// x viewed as (groups of statistics, N).
    fn grouped(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Group { groups, .. } => x.reshape((x.dim(0)? * groups, ())),
            Norm::Layer { .. } => x.reshape(((), x.dim(D::Minus1)?)),
        }
    }

    /// A per-channel vector shaped to broadcast against x.
    fn per_channel(self, v: &Tensor, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Group { .. } => {
                let mut shape = vec![1usize; x.rank()];
                shape[1] = v.elem_count();
                v.to_dtype(x.dtype())?.reshape(shape)
            }
            Norm::Layer { .. } => v.to_dtype(x.dtype()),
        }
    }

    /// Σ over every position of each channel of t (shaped like x) → (C).
    fn channel_sum(self, t: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Group { .. } => {
                let dims: Vec<usize> = (0..t.rank()).filter(|&d| d != 1).collect();
                t.sum(dims)
            }
            Norm::Layer { .. } => t.reshape(((), t.dim(D::Minus1)?))?.sum(0),
        }
    }

    /// x̂ (shaped like x) and r (one per group of statistics, keepdim).
    fn normalised(self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let xg = self.grouped(x)?;
        let mean = xg.mean_keepdim(D::Minus1)?;
        let centered = xg.broadcast_sub(&mean)?;
        let rstd = (centered.sqr()?.mean_keepdim(D::Minus1)? + self.eps())?.sqrt()?.recip()?;
        Ok((centered.broadcast_mul(&rstd)?.reshape(x.dims())?, rstd))
    }
}

fn norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, kind: Norm) -> Result<Tensor> {
    let _span = profile::span(Kind::NormForward);
    if super::reference_ops() {
        return reference(x, weight, bias, kind);
    }
    if kernels::use_kernels(x) {
        return kernel_norm(x, weight, bias, kind, false);
    }
    let out = reference(&x.detach(), &weight.detach(), bias.map(|b| b.detach()).as_ref(), kind)?;
    match bias {
        Some(b) => attach(&[x, weight, b], out, NormBackward(kind)),
        None => attach(&[x, weight], out, NormBackward(kind)),
    }
}

/// The reference: the formula from candle's primitives, with candle's backward.
fn reference(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, kind: Norm) -> Result<Tensor> {
    let (xhat, _) = kind.normalised(x)?;
    let y = xhat.broadcast_mul(&kind.per_channel(weight, x)?)?;
    match bias {
        Some(b) => y.broadcast_add(&kind.per_channel(b, x)?),
        None => Ok(y),
    }
}

/// The norm through worker/kernels/norm.cu (on a CUDA tensor; the kernel op's reference
/// elsewhere): the forward keeps only each row's mean and 1/std.
fn kernel_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, kind: Norm, silu: bool) -> Result<Tensor> {
    let shape = match kind {
        Norm::Group { groups, .. } => NormShape::group(x.dims(), groups)?,
        Norm::Layer { .. } => NormShape::layer(x.dims())?,
    };
    let bias_detached = bias.map(|b| b.detach());
    let (y, stats) = kernels::norm::forward(&x.detach().contiguous()?, &weight.detach(), bias_detached.as_ref(), shape, kind.eps(), silu)?;
    let backward = KernelNormBackward { shape, stats, silu };
    match bias {
        Some(b) => attach(&[x, weight, b], y, backward),
        None => attach(&[x, weight], y, backward),
    }
}

struct KernelNormBackward {
    shape: NormShape,
    stats: NormStats,
    /// A SiLU follows the affine (its derivative is applied first).
    silu: bool,
}

impl Backward for KernelNormBackward {
    fn name(&self) -> &'static str {
        "norm-kernel"
    }

    fn profile_kind(&self) -> Kind {
        Kind::NormBackward
    }

    fn backward(&self, args: &[&Tensor], needs: &[bool], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (x, weight, bias) = (args[0], args[1], args.get(2).copied());
        let need_bias = needs.get(2) == Some(&true);
        let grads = kernels::norm::backward(&x.contiguous()?, weight, bias, &self.stats, &grad.contiguous()?, self.shape, self.silu, [needs[0], needs[1], need_bias])?;
        let dw = grads.dgamma.map(|g| g.to_dtype(weight.dtype())).transpose()?;
        let db = match (grads.dbeta, bias) {
            (Some(g), Some(b)) => Some(g.to_dtype(b.dtype())?),
            _ => None,
        };
        Ok(vec![grads.dx, dw, db])
    }
}

struct NormBackward(Norm);

impl Backward for NormBackward {
    fn name(&self) -> &'static str {
        "norm"
    }

    fn profile_kind(&self) -> Kind {
        Kind::NormBackward
    }

    fn backward(&self, args: &[&Tensor], needs: &[bool], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let kind = self.0;
        let (x, weight) = (args[0], args[1]);
        let (xhat, rstd) = kind.normalised(x)?;
        let dx = if needs[0] {
            let ghat = kind.grouped(&grad.broadcast_mul(&kind.per_channel(weight, x)?)?)?;
            let xh = kind.grouped(&xhat)?;
            let m1 = ghat.mean_keepdim(D::Minus1)?;
            let m2 = ghat.mul(&xh)?.mean_keepdim(D::Minus1)?;
            let dx = ghat.broadcast_sub(&m1)?.sub(&xh.broadcast_mul(&m2)?)?.broadcast_mul(&rstd)?;
            Some(dx.reshape(x.dims())?)
        } else {
            None
        };
        let dw = if needs[1] { Some(kind.channel_sum(&grad.mul(&xhat)?)?.to_dtype(weight.dtype())?) } else { None };
        let db = if needs.get(2) == Some(&true) { Some(kind.channel_sum(grad)?.to_dtype(args[2].dtype())?) } else { None };
        Ok(vec![dx, dw, db])
    }
}
