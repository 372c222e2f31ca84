//! `F.linear` (y = x·Wᵀ + b over the last dim of x) whose backward computes the weight and bias
//! gradients only when they are trained.
//!
//! Backward, with x and the output gradient g flattened to rows:
//!   dx = g·W,   dW = gᵀ·x (only for a trained W),   db = Σ_rows g (only for a trained b).
//! A frozen base layer thus costs one matmul in the backward instead of two, and keeps no
//! weight-sized or activation-sized gradient it never uses.

use candle_core::{bail, Result, Tensor};

use super::graph::{attach, Backward};
use crate::profile::{self, Kind};

/// `x (…, in)`, `w (out, in)`, `b (out)` → `(…, out)`.
///
/// A weight stored in another dtype than `x` (a frozen fp8 or f16 weight computed in f16 or
/// f32) is cast for the forward and again in the backward: the graph keeps the stored weight,
/// never a cast copy, so a whole model's worth of copies is not alive until the backward.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if super::reference_ops() {
        return reference_linear(x, &super::cast(w, x.dtype())?, b);
    }
    let out = {
        let _span = profile::span(Kind::LinearForward);
        reference_linear(&x.detach(), &super::cast(&w.detach(), x.dtype())?, b.map(|b| b.detach()).as_ref())?
    };
    match b {
        Some(b) => attach(&[x, w, b], out, LinearBackward),
        None => attach(&[x, w], out, LinearBackward),
    }
}

/// The reference: candle's matmul and broadcast add, with candle's backward.
pub fn reference_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&in_features, lead)) = dims.split_last() else { bail!("linear input must have at least one dimension") };
    let rows: usize = lead.iter().product();
    let mut y = x.reshape((rows, in_features))?.matmul(&w.t()?)?;
    if let Some(b) = b {
        y = y.broadcast_add(b)?;
    }
    let mut out_shape = lead.to_vec();
    out_shape.push(w.dim(0)?);
    y.reshape(out_shape)
}

struct LinearBackward;

impl Backward for LinearBackward {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn profile_kind(&self) -> Kind {
        Kind::LinearBackward
    }

    fn backward(&self, args: &[&Tensor], needs: &[bool], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (x, stored) = (args[0], args[1]);
        let w = &super::cast(stored, x.dtype())?;
        let out_features = w.dim(0)?;
        let g = grad.reshape(((), out_features))?;
        let dx = if needs[0] { Some(g.matmul(w)?.reshape(x.dims())?) } else { None };
        let dw = if needs[1] {
            let in_features = w.dim(1)?;
            let x2 = x.reshape(((), in_features))?;
            Some(g.t()?.matmul(&x2)?.to_dtype(stored.dtype())?)
        } else {
            None
        };
        let db = if needs.get(2) == Some(&true) { Some(g.sum(0)?) } else { None };
        Ok(vec![dx, dw, db])
    }
}
