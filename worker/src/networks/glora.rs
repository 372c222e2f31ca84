//! LyCORIS GLoRA (`lycoris/modules/glora.py`): ΔW = s·(W·(a1@a2) + b1@b2).
//!
//! Tensors (Linear / Conv2d): `a2.weight` (r, in[, 1, 1]) zeros, `a1.weight` (in, r[, 1, 1])
//! kaiming (orthonormal columns with "Orthogonalize"), `b2.weight` (r, in[, kh, kw], with the
//! layer's stride/padding) zeros, `b1.weight` (out, r[, 1, 1]) kaiming. With `use_scalar`
//! the zero factors get kaiming and the scalar is folded into a2 and b2 on save.
//! s = alpha/r (alpha/√r with rs_lora; the saved alpha is then alpha·√r, unlike LyCORIS,
//! which saves the raw alpha and so reloads a different scale). Tucker never activates
//! upstream (contradictory conditions) and is not offered.
//!
//! Bypass: y = org(x + m·s·a1(a2 x)) + m·s·b1(b2 x), computed as org(x) + m·[W(s·a1 a2 x) +
//! s·b1 b2 x]; the scale is applied once (LyCORIS 3.x squares it). Rank dropout masks the r
//! channels of a2 x and b2 x (keeping each with probability 1 − p; LyCORIS's comparison is
//! inverted and keeps them with probability p); in rebuild mode it masks output rows of ΔW.

use std::collections::HashMap;

use candle_core::{bail, Result, Tensor, Var};

use super::common::{
    alpha_from, alpha_tensor, conv_op, folded, layer_op, linear_op, new_scalar, required, times_scalar, Ctx, Init,
    LowRankAdapter, LowRankDelta, RankScale,
};
use super::{Adapter, BaseLayer, LayerKind, NetworkOptions};

pub(crate) struct GloraDelta {
    a1: Var,
    a2: Var,
    b1: Var,
    b2: Var,
    scalar: Option<Var>,
    rank: usize,
    scale: f64,
    saved_alpha: f64,
}

/// W·A for a square `A (in, in)` acting on the input channels: `(o, i, …)·A → (o, j, …)`.
pub(crate) fn weight_times_input_map(w: &Tensor, a: &Tensor) -> Result<Tensor> {
    match w.rank() {
        2 => w.matmul(a),
        4 => {
            let (o, i, kh, kw) = w.dims4()?;
            let j = a.dim(1)?;
            let wi = w.permute((0, 2, 3, 1))?.reshape((o * kh * kw, i))?;
            wi.matmul(a)?.reshape((o, kh, kw, j))?.permute((0, 3, 1, 2))?.contiguous()
        }
        r => bail!("weight of rank {r} is not supported"),
    }
}

/// (a1, a2, b1, b2) shapes.
fn shapes(ctx: &Ctx, rank: usize) -> [Vec<usize>; 4] {
    let (out, inp) = (ctx.out_dim(), ctx.in_dim());
    match &ctx.kind {
        LayerKind::Conv2d { kernel, .. } => {
            [vec![inp, rank, 1, 1], vec![rank, inp, 1, 1], vec![out, rank, 1, 1], vec![rank, inp, kernel.0, kernel.1]]
        }
        _ => [vec![inp, rank], vec![rank, inp], vec![out, rank], vec![rank, inp]],
    }
}

pub(crate) fn build(
    opts: &NetworkOptions,
    base: &BaseLayer,
    layer: &str,
    rank: usize,
    alpha: f64,
) -> Result<Box<dyn Adapter>> {
    let ctx = Ctx::new(opts, base, layer)?;
    if rank == 0 {
        bail!("layer {layer}: GLoRA rank must be at least 1");
    }
    let [a1_s, a2_s, b1_s, b2_s] = shapes(&ctx, rank);
    let zero_or_kaiming = if opts.use_scalar { Init::Kaiming } else { Init::Zeros };
    let rs = RankScale::lycoris(rank, alpha, opts.rs_lora);
    let src = GloraDelta {
        a1: ctx.var(&a1_s, Init::down(opts.orthogonalize))?,
        a2: ctx.var(&a2_s, zero_or_kaiming)?,
        b1: ctx.var(&b1_s, Init::Kaiming)?,
        b2: ctx.var(&b2_s, zero_or_kaiming)?,
        scalar: new_scalar(opts.use_scalar, ctx.dtype, &ctx.device)?,
        rank,
        scale: rs.scale,
        saved_alpha: rs.saved_alpha,
    };
    Ok(Box::new(LowRankAdapter { ctx, dora: None, src }))
}

pub(crate) fn from_tensors(
    opts: &NetworkOptions,
    base: &BaseLayer,
    tensors: &HashMap<String, Tensor>,
    layer: &str,
) -> Result<Box<dyn Adapter>> {
    let ctx = Ctx::new(opts, base, layer)?;
    if tensors.contains_key("bm.weight") {
        bail!("layer {layer}: GLoRA Tucker (`bm.weight`) is not supported (it never activates upstream)");
    }
    let get = |k: &str| required(tensors, k, layer, "GLoRA");
    let a2 = get("a2.weight")?;
    let rank = a2.dim(0)?;
    let shapes = shapes(&ctx, rank);
    let mut vars = Vec::new();
    for (key, shape) in ["a1.weight", "a2.weight", "b1.weight", "b2.weight"].iter().zip(shapes.iter()) {
        let t = get(key)?;
        if t.elem_count() != shape.iter().product::<usize>() {
            bail!("layer {layer}: GLoRA `{key}` has shape {:?} but this layer needs {:?}", t.dims(), shape);
        }
        vars.push(ctx.var_copy(&t.reshape(shape.clone())?)?);
    }
    let rs = RankScale::from_saved(rank, alpha_from(tensors)?);
    let mut it = vars.into_iter();
    let src = GloraDelta {
        a1: it.next().unwrap(),
        a2: it.next().unwrap(),
        b1: it.next().unwrap(),
        b2: it.next().unwrap(),
        scalar: None,
        rank,
        scale: rs.scale,
        saved_alpha: rs.saved_alpha,
    };
    Ok(Box::new(LowRankAdapter { ctx, dora: None, src }))
}

impl GloraDelta {
    fn rank_masked(&self, ctx: &Ctx, h: &Tensor, train: bool) -> Result<Tensor> {
        match ctx.rank_mask(self.rank, train)? {
            None => Ok(h.clone()),
            Some(mask) => {
                let mut shape = vec![1usize; h.rank()];
                let channel_dim = if ctx.is_conv() { 1 } else { h.rank() - 1 };
                shape[channel_dim] = self.rank;
                h.broadcast_mul(&mask.to_dtype(h.dtype())?.reshape(shape)?)
            }
        }
    }
}

impl LowRankDelta for GloraDelta {
    fn algo_name(&self) -> &'static str {
        "glora"
    }

    fn delta(&self, ctx: &Ctx, train: bool) -> Result<Tensor> {
        let a = self.a1.as_tensor().flatten_from(1)?.matmul(&self.a2.as_tensor().flatten_from(1)?)?; // (in, in)
        let wa = weight_times_input_map(&ctx.weight_p()?, &a)?;
        let b = self.b1.as_tensor().flatten_from(1)?.matmul(&self.b2.as_tensor().flatten_from(1)?)?;
        let w = (wa + b.reshape(ctx.weight_shape())?)?.affine(self.scale, 0.0)?;
        times_scalar(&ctx.drop_rows(&w, train)?, &self.scalar)
    }

    fn bypass_delta(&self, ctx: &Ctx, x: &Tensor, train: bool) -> Result<Tensor> {
        let dt = x.dtype();
        let t = |v: &Var| v.as_tensor().to_dtype(dt);
        let (a_path, b_path) = match &ctx.kind {
            LayerKind::Conv2d { stride, padding, .. } => {
                let ha = self.rank_masked(ctx, &conv_op(x, &t(&self.a2)?, None, 1, 0)?, train)?;
                let hb = self.rank_masked(ctx, &conv_op(x, &t(&self.b2)?, None, *stride, *padding)?, train)?;
                (conv_op(&ha, &t(&self.a1)?, None, 1, 0)?, conv_op(&hb, &t(&self.b1)?, None, 1, 0)?)
            }
            _ => {
                let ha = self.rank_masked(ctx, &linear_op(x, &t(&self.a2)?, None)?, train)?;
                let hb = self.rank_masked(ctx, &linear_op(x, &t(&self.b2)?, None)?, train)?;
                (linear_op(&ha, &t(&self.a1)?, None)?, linear_op(&hb, &t(&self.b1)?, None)?)
            }
        };
        // W applied to the input change (no bias: the bias is in org(x) once).
        let through_w = layer_op(&ctx.kind, &a_path, &ctx.weight, None)?;
        let y = (through_w + b_path)?.affine(self.scale, 0.0)?;
        match &self.scalar {
            Some(s) => y.broadcast_mul(&s.as_tensor().to_dtype(dt)?),
            None => Ok(y),
        }
    }

    fn params(&self) -> Vec<(String, Var)> {
        let mut v = vec![
            ("a1.weight".to_string(), self.a1.clone()),
            ("a2.weight".into(), self.a2.clone()),
            ("b1.weight".into(), self.b1.clone()),
            ("b2.weight".into(), self.b2.clone()),
        ];
        if let Some(s) = &self.scalar {
            v.push(("scalar".into(), s.clone()));
        }
        v
    }

    fn state(&self, ctx: &Ctx) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            ("a1.weight".to_string(), self.a1.as_tensor().clone()),
            ("a2.weight".into(), folded(&self.a2, &self.scalar)?),
            ("b1.weight".into(), self.b1.as_tensor().clone()),
            ("b2.weight".into(), folded(&self.b2, &self.scalar)?),
            ("alpha".into(), alpha_tensor(self.saved_alpha, &ctx.device)?),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::networks::testutil::*;
    use crate::networks::{build_adapter, NetworkAlgo};

    const ALGO: NetworkAlgo = NetworkAlgo::Glora;

    fn opts() -> NetworkOptions {
        NetworkOptions { dim: 4, alpha: 2.0, ..Default::default() }
    }

    #[test]
    fn shapes_and_naive_delta() -> Result<()> {
        for (base, _) in standard_cases()? {
            let a = build_adapter(ALGO, &opts(), &base, "t")?;
            assert_eq!(max_abs(&a.delta_weight()?)?, 0.0);
            let s = state_map(a.as_ref())?;
            let w = base.weight.dims();
            assert_eq!(s["a1.weight"].dims()[..2], [w[1], 4]);
            assert_eq!(s["a2.weight"].dims()[..2], [4, w[1]]);
            assert_eq!(s["b1.weight"].dims()[..2], [w[0], 4]);
            let mut b2 = vec![4];
            b2.extend_from_slice(&w[1..]);
            assert_eq!(s["b2.weight"].dims(), b2.as_slice());
            randomize(a.as_ref(), 1)?;
            let s = state_map(a.as_ref())?;
            let m = |k: &str| Mat::from_tensor_2d(&s[k]).unwrap();
            // W·A by loops over (o, j, k): Σ_i W[o, i, k]·A[i, j]
            let amat = m("a1.weight").matmul(&m("a2.weight"));
            let wm = Mat::from_tensor_2d(&base.weight)?;
            let (inn, kk) = (w[1], wm.cols / w[1]);
            let mut wa = Mat::new(wm.rows, wm.cols, vec![0.0; wm.data.len()]);
            for o in 0..wm.rows {
                for j in 0..inn {
                    for k in 0..kk {
                        wa.data[o * wm.cols + j * kk + k] =
                            (0..inn).map(|i| wm.at(o, i * kk + k) * amat.at(i, j)).sum();
                    }
                }
            }
            let want = wa.add(&m("b1.weight").matmul(&m("b2.weight"))).scale(0.5);
            assert_mat_close(&a.delta_weight()?, &want, 1e-5, "GLoRA ΔW");
        }
        Ok(())
    }

    #[test]
    fn rebuild_bypass_reload_agree() -> Result<()> {
        for (base, x) in standard_cases()? {
            check_modes(ALGO, &NetworkOptions { multiplier: 0.6, ..opts() }, &base, &x, true, true)?;
            check_modes(ALGO, &NetworkOptions { use_scalar: true, rs_lora: true, ..opts() }, &base, &x, true, true)?;
        }
        Ok(())
    }

    #[test]
    fn orthogonalize_a1() -> Result<()> {
        let (base, _) = standard_cases()?.remove(0);
        let a = build_adapter(ALGO, &NetworkOptions { orthogonalize: true, ..opts() }, &base, "t")?;
        let a1 = Mat::from_tensor_2d(&state_map(a.as_ref())?["a1.weight"])?; // (in, r): orthonormal columns
        assert!(a1.t().matmul(&a1).sub(&Mat::eye(4)).max_abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn every_trainable_gets_a_gradient() -> Result<()> {
        check_grads(ALGO, &NetworkOptions { use_scalar: true, ..opts() })?;
        check_grads(ALGO, &NetworkOptions { bypass_mode: true, ..opts() })
    }

    #[test]
    fn fit_reduces_loss_10x() -> Result<()> {
        check_fit(ALGO, &NetworkOptions { dim: 4, alpha: 4.0, ..Default::default() }, 200, 0.02, 10.0)
    }
}
