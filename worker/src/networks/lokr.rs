//! LyCORIS LoKr (`lycoris/modules/lokr.py`): ΔW = kron(w1, w2) · scale.
//!
//! Shapes come from [`factorization`]: out = a·b and in = c·d with `(a, b) =
//! factorization(out, factor)` (swapped with `unbalanced_factorization`) and `(c, d) =
//! factorization(in, factor)`.
//! - w1 side, (a, c): `lokr_w1`, kaiming; with `decompose_both` and r < max(a, c)/2 (and not
//!   `full_matrix`): `lokr_w1_a` (a, r) @ `lokr_w1_b` (r, c), both kaiming. "Orthogonalize"
//!   initialises this side with orthogonal matrices instead.
//! - w2 side, (b, d[, kh, kw]): `lokr_w2` (zeros) when r ≥ max(b, d)/2 or `full_matrix`;
//!   otherwise `lokr_w2_a` (b, r) kaiming @ `lokr_w2_b` (r, d·kh·kw) zeros; with Tucker on a
//!   k×k conv: `lokr_w2_a` (r, b), `lokr_w2_b` (r, d), `lokr_t2` (r, r, kh, kw).
//!   With `use_scalar` the zero factor gets kaiming and the scalar is folded into the w1 side
//!   (`lokr_w1` or `lokr_w1_a`) on save.
//! - When both sides are full matrices alpha is forced to r: the scale is 1 (also with
//!   `rs_lora`, so loaders, which read full/full files with scale 1, agree).
//!
//! ΔW is scaled once (LyCORIS's `get_diff_weight` scales twice); bypass mode materialises ΔW,
//! which also avoids LyCORIS 3.x's bypass bugs (missing alpha/r, broken conv path).

use std::collections::HashMap;

use candle_core::{bail, Result, Tensor, Var};

use super::common::{
    alpha_from, alpha_tensor, folded, kron, new_scalar, required, times_scalar, tucker, Ctx, Dora, Init,
    LowRankAdapter, LowRankDelta, RankScale,
};
use super::factorization::factorization;
use super::locon::tucker_applies;
use super::{Adapter, BaseLayer, NetworkOptions};

pub(crate) enum W1 {
    Full(Var),
    Decomposed { a: Var, b: Var },
}

pub(crate) enum W2 {
    Full(Var),
    Decomposed { a: Var, b: Var },
    Tucker { a: Var, b: Var, t: Var },
}

pub(crate) struct LokrDelta {
    w1: W1,
    w2: W2,
    scalar: Option<Var>,
    scale: f64,
    saved_alpha: f64,
}

/// `((a, b), (c, d))` for a layer: out = a·b, in = c·d.
pub fn lokr_split(out_dim: usize, in_dim: usize, factor: i64, unbalanced: bool) -> ((usize, usize), (usize, usize)) {
    let (c, d) = factorization(in_dim, factor);
    let (mut a, mut b) = factorization(out_dim, factor);
    if unbalanced {
        std::mem::swap(&mut a, &mut b);
    }
    ((a, b), (c, d))
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
        bail!("layer {layer}: LoKr rank must be at least 1");
    }
    let ((a, b), (c, d)) = lokr_split(ctx.out_dim(), ctx.in_dim(), opts.factor, opts.unbalanced_factorization);
    let k = ctx.kernel_dims();
    let kk: usize = k.iter().product();
    let w1_init = Init::down(opts.orthogonalize);
    let zero_or_kaiming = if opts.use_scalar { Init::Kaiming } else { Init::Zeros };

    let w1 = if opts.decompose_both && 2 * rank < a.max(c) && !opts.full_matrix {
        W1::Decomposed { a: ctx.var(&[a, rank], w1_init)?, b: ctx.var(&[rank, c], w1_init)? }
    } else {
        W1::Full(ctx.var(&[a, c], w1_init)?)
    };
    let w2 = if 2 * rank >= b.max(d) || opts.full_matrix {
        let mut shape = vec![b, d];
        shape.extend_from_slice(&k);
        W2::Full(ctx.var(&shape, zero_or_kaiming)?)
    } else if tucker_applies(&ctx, opts.use_tucker) {
        W2::Tucker {
            a: ctx.var(&[rank, b], Init::Kaiming)?,
            b: ctx.var(&[rank, d], zero_or_kaiming)?,
            t: ctx.var(&[rank, rank, k[0], k[1]], Init::Kaiming)?,
        }
    } else {
        W2::Decomposed { a: ctx.var(&[b, rank], Init::Kaiming)?, b: ctx.var(&[rank, d * kk], zero_or_kaiming)? }
    };
    let both_full = matches!(w1, W1::Full(_)) && matches!(w2, W2::Full(_));
    let rs = if both_full {
        RankScale { scale: 1.0, saved_alpha: rank as f64 }
    } else {
        RankScale::lycoris(rank, alpha, opts.rs_lora)
    };
    let src = LokrDelta {
        w1,
        w2,
        scalar: new_scalar(opts.use_scalar, ctx.dtype, &ctx.device)?,
        scale: rs.scale,
        saved_alpha: rs.saved_alpha,
    };
    let dora = if opts.dora_wd { Some(Dora::new(&ctx, opts.wd_on_output)?) } else { None };
    Ok(Box::new(LowRankAdapter { ctx, dora, src }))
}

pub(crate) fn from_tensors(
    opts: &NetworkOptions,
    base: &BaseLayer,
    tensors: &HashMap<String, Tensor>,
    layer: &str,
) -> Result<Box<dyn Adapter>> {
    let ctx = Ctx::new(opts, base, layer)?;
    let get = |k: &str| required(tensors, k, layer, "LoKr");
    let mut rank = None;
    let w1 = match tensors.get("lokr_w1") {
        Some(w) => W1::Full(ctx.var_copy(w)?),
        None => {
            let (a, b) = (get("lokr_w1_a")?, get("lokr_w1_b")?);
            rank = Some(a.dim(1)?);
            W1::Decomposed { a: ctx.var_copy(a)?, b: ctx.var_copy(b)? }
        }
    };
    let w2 = match (tensors.get("lokr_w2"), tensors.get("lokr_t2")) {
        (Some(w), _) => W2::Full(ctx.var_copy(w)?),
        (None, Some(t)) => {
            let (a, b) = (get("lokr_w2_a")?, get("lokr_w2_b")?);
            rank = rank.or(Some(a.dim(0)?));
            W2::Tucker { a: ctx.var_copy(a)?, b: ctx.var_copy(b)?, t: ctx.var_copy(t)? }
        }
        (None, None) => {
            let (a, b) = (get("lokr_w2_a")?, get("lokr_w2_b")?);
            rank = rank.or(Some(a.dim(1)?));
            W2::Decomposed { a: ctx.var_copy(a)?, b: ctx.var_copy(&b.flatten_from(1)?)? }
        }
    };
    // Both sides full: LyCORIS loads these with rank 1 and alpha forced to it (scale 1).
    let rs = match rank {
        Some(r) => RankScale::from_saved(r, alpha_from(tensors)?),
        None => RankScale { scale: 1.0, saved_alpha: alpha_from(tensors)?.unwrap_or(1.0) },
    };
    let dora = tensors.get("dora_scale").map(|d| Dora::from_tensor(&ctx, d)).transpose()?;
    let src = LokrDelta { w1, w2, scalar: None, scale: rs.scale, saved_alpha: rs.saved_alpha };
    // Check that the factors rebuild the layer's weight shape.
    let delta = src.delta(&ctx, false)?;
    if delta.dims() != ctx.weight_shape().as_slice() {
        bail!(
            "layer {layer}: LoKr factors rebuild a weight of shape {:?}, but the layer's weight is {:?}",
            delta.dims(),
            ctx.weight_shape()
        );
    }
    Ok(Box::new(LowRankAdapter { ctx, dora, src }))
}

impl LowRankDelta for LokrDelta {
    fn algo_name(&self) -> &'static str {
        "lokr"
    }

    fn delta(&self, ctx: &Ctx, train: bool) -> Result<Tensor> {
        let w1 = match &self.w1 {
            W1::Full(w) => w.as_tensor().clone(),
            W1::Decomposed { a, b } => a.as_tensor().matmul(b.as_tensor())?,
        };
        let k = ctx.kernel_dims();
        let w2 = match &self.w2 {
            W2::Full(w) => w.as_tensor().clone(),
            W2::Decomposed { a, b } => {
                let w = a.as_tensor().matmul(b.as_tensor())?; // (b, d·kk)
                let mut shape = vec![w.dim(0)?, w.dim(1)? / k.iter().product::<usize>()];
                shape.extend_from_slice(&k);
                w.reshape(shape)?
            }
            W2::Tucker { a, b, t } => tucker(t.as_tensor(), a.as_tensor(), b.as_tensor())?,
        };
        let w = kron(&w1, &w2)?.affine(self.scale, 0.0)?;
        let w = ctx.drop_rows(&w, train)?;
        times_scalar(&w, &self.scalar)
    }

    fn fused_merge(&self, ctx: &Ctx, w: &Tensor, train: bool) -> Result<Option<Tensor>> {
        // The plain form only: Tucker, use_scalar and rank dropout keep the candle ops.
        if self.scalar.is_some() || ctx.rank_dropout_active(train) || w.track_op() {
            return Ok(None);
        }
        let w1 = match &self.w1 {
            W1::Full(w) => w.as_tensor().clone(),
            W1::Decomposed { a, b } => a.as_tensor().matmul(b.as_tensor())?,
        };
        let w2 = match &self.w2 {
            W2::Full(w) => w.as_tensor().clone(),
            W2::Decomposed { a, b } => a.as_tensor().matmul(b.as_tensor())?, // (c, d·kk)
            W2::Tucker { .. } => return Ok(None),
        };
        if w1.dtype() != w.dtype() || w2.dtype() != w.dtype() {
            return Ok(None);
        }
        Ok(Some(super::fused::lokr_merge(w, &w1, &w2, self.scale * ctx.multiplier)?))
    }

    fn params(&self) -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = Vec::new();
        match &self.w1 {
            W1::Full(w) => v.push(("lokr_w1".into(), w.clone())),
            W1::Decomposed { a, b } => {
                v.push(("lokr_w1_a".into(), a.clone()));
                v.push(("lokr_w1_b".into(), b.clone()));
            }
        }
        match &self.w2 {
            W2::Full(w) => v.push(("lokr_w2".into(), w.clone())),
            W2::Decomposed { a, b } => {
                v.push(("lokr_w2_a".into(), a.clone()));
                v.push(("lokr_w2_b".into(), b.clone()));
            }
            W2::Tucker { a, b, t } => {
                v.push(("lokr_w2_a".into(), a.clone()));
                v.push(("lokr_w2_b".into(), b.clone()));
                v.push(("lokr_t2".into(), t.clone()));
            }
        }
        if let Some(s) = &self.scalar {
            v.push(("scalar".into(), s.clone()));
        }
        v
    }

    fn state(&self, ctx: &Ctx) -> Result<Vec<(String, Tensor)>> {
        let mut v: Vec<(String, Tensor)> = Vec::new();
        match &self.w1 {
            W1::Full(w) => v.push(("lokr_w1".into(), folded(w, &self.scalar)?)),
            W1::Decomposed { a, b } => {
                v.push(("lokr_w1_a".into(), folded(a, &self.scalar)?));
                v.push(("lokr_w1_b".into(), b.as_tensor().clone()));
            }
        }
        for (name, var) in self.params() {
            if name.starts_with("lokr_w2") || name == "lokr_t2" {
                v.push((name, var.as_tensor().clone()));
            }
        }
        v.push(("alpha".into(), alpha_tensor(self.saved_alpha, &ctx.device)?));
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::networks::testutil::*;
    use crate::networks::{build_adapter, NetworkAlgo};

    const ALGO: NetworkAlgo = NetworkAlgo::Lokr;

    fn opts() -> NetworkOptions {
        NetworkOptions { dim: 2, alpha: 1.0, ..Default::default() }
    }

    fn dims(s: &HashMap<String, Tensor>, k: &str) -> Vec<usize> {
        s[k].dims().to_vec()
    }

    #[test]
    fn shapes_match_the_documented_examples() -> Result<()> {
        // 320×320, factor −1, r = 4 → w1 16×16, w2_a 20×4, w2_b 4×20.
        let base = linear_base(320, 320, false, 1)?;
        let a = build_adapter(ALGO, &NetworkOptions { dim: 4, ..opts() }, &base, "t")?;
        let s = state_map(a.as_ref())?;
        assert_eq!(dims(&s, "lokr_w1"), [16, 16]);
        assert_eq!(dims(&s, "lokr_w2_a"), [20, 4]);
        assert_eq!(dims(&s, "lokr_w2_b"), [4, 20]);
        // 640 out × 2048 in, factor 8, r = 8 → w1 8×8, w2_a 80×8, w2_b 8×256.
        let base = linear_base(2048, 640, false, 2)?;
        let a = build_adapter(ALGO, &NetworkOptions { dim: 8, factor: 8, ..opts() }, &base, "t")?;
        let s = state_map(a.as_ref())?;
        assert_eq!(dims(&s, "lokr_w1"), [8, 8]);
        assert_eq!(dims(&s, "lokr_w2_a"), [80, 8]);
        assert_eq!(dims(&s, "lokr_w2_b"), [8, 256]);
        Ok(())
    }

    #[test]
    fn variants_full_matrix_decompose_both_unbalanced_tucker() -> Result<()> {
        let conv3 = conv_base(16, 64, 3, 1, 1, false, 3)?; // out 64 = 8·8, in 16 = 4·4
                                                           // full_matrix → lokr_w2 (8, 4, 3, 3); both sides full → scale 1, alpha saved = r.
        let a = build_adapter(ALGO, &NetworkOptions { full_matrix: true, alpha: 7.0, ..opts() }, &conv3, "t")?;
        let s = state_map(a.as_ref())?;
        assert_eq!(dims(&s, "lokr_w2"), [8, 4, 3, 3]);
        assert_eq!(scalar_of(&s["alpha"])?, 2.0);
        // Tucker on a 3×3 conv with r = 1 < 8/2.
        let o = NetworkOptions { dim: 1, use_tucker: true, ..opts() };
        let s = state_map(build_adapter(ALGO, &o, &conv3, "t")?.as_ref())?;
        assert_eq!(dims(&s, "lokr_w2_a"), [1, 8]);
        assert_eq!(dims(&s, "lokr_w2_b"), [1, 4]);
        assert_eq!(dims(&s, "lokr_t2"), [1, 1, 3, 3]);
        // No Tucker: w2_b flattens the kernel.
        let s = state_map(build_adapter(ALGO, &NetworkOptions { dim: 1, ..opts() }, &conv3, "t")?.as_ref())?;
        assert_eq!(dims(&s, "lokr_w2_b"), [1, 4 * 9]);
        // decompose_both with r < max(a, c)/2 on a 256×256 linear (16·16): w1_a (16, 2), w1_b (2, 16).
        let big = linear_base(256, 256, false, 4)?;
        let s =
            state_map(build_adapter(ALGO, &NetworkOptions { decompose_both: true, ..opts() }, &big, "t")?.as_ref())?;
        assert_eq!(dims(&s, "lokr_w1_a"), [16, 2]);
        assert_eq!(dims(&s, "lokr_w1_b"), [2, 16]);
        // unbalanced_factorization swaps the output split: 640 → (8, 80) becomes (80, 8).
        let base = linear_base(2048, 640, false, 5)?;
        let o = NetworkOptions { dim: 2, factor: 8, unbalanced_factorization: true, ..opts() };
        let s = state_map(build_adapter(ALGO, &o, &base, "t")?.as_ref())?;
        assert_eq!(dims(&s, "lokr_w1"), [80, 8]);
        assert_eq!(dims(&s, "lokr_w2_a"), [8, 2]);
        Ok(())
    }

    #[test]
    fn delta_is_scaled_kron_by_naive_computation() -> Result<()> {
        for (base, _) in standard_cases()? {
            for o in [opts(), NetworkOptions { decompose_both: true, dim: 1, ..opts() }] {
                let a = build_adapter(ALGO, &o, &base, "t")?;
                assert_eq!(max_abs(&a.delta_weight()?)?, 0.0);
                randomize(a.as_ref(), 2)?;
                let s = state_map(a.as_ref())?;
                let m = |k: &str| Mat::from_tensor_2d(&s[k]).unwrap();
                let w1 = if s.contains_key("lokr_w1") { m("lokr_w1") } else { m("lokr_w1_a").matmul(&m("lokr_w1_b")) };
                let w2 = if s.contains_key("lokr_w2") { m("lokr_w2") } else { m("lokr_w2_a").matmul(&m("lokr_w2_b")) };
                let kk = base.weight.dims()[2..].iter().product::<usize>();
                // Kron with w2 as (b, d·kk): for convs this is the weight viewed (out, in·kk).
                let rank = o.dim as f64;
                let scale = if s.contains_key("lokr_w1") && s.contains_key("lokr_w2") { 1.0 } else { 1.0 / rank };
                let _ = kk;
                let want = w1.kron(&w2).scale(scale);
                assert_mat_close(&a.delta_weight()?, &want, 1e-5, "LoKr ΔW");
            }
        }
        Ok(())
    }

    #[test]
    fn rebuild_bypass_reload_agree() -> Result<()> {
        for (base, x) in standard_cases()? {
            for o in [
                NetworkOptions { multiplier: 0.7, ..opts() },
                NetworkOptions { dim: 1, use_tucker: true, use_scalar: true, ..opts() },
                NetworkOptions { full_matrix: true, ..opts() },
                NetworkOptions { decompose_both: true, dim: 1, rs_lora: true, ..opts() },
            ] {
                check_modes(ALGO, &o, &base, &x, true, true)?;
            }
            let o = NetworkOptions { dora_wd: true, ..opts() };
            check_modes(ALGO, &o, &base, &x, false, false)?;
        }
        Ok(())
    }

    #[test]
    fn every_trainable_gets_a_gradient() -> Result<()> {
        check_grads(ALGO, &NetworkOptions { dim: 1, use_tucker: true, use_scalar: true, ..opts() })?;
        check_grads(ALGO, &NetworkOptions { dim: 1, decompose_both: true, dora_wd: true, ..opts() })?;
        check_grads(ALGO, &NetworkOptions { full_matrix: true, bypass_mode: true, ..opts() })
    }

    #[test]
    fn fit_reduces_loss_10x() -> Result<()> {
        check_fit(ALGO, &NetworkOptions { dim: 2, alpha: 2.0, ..Default::default() }, 200, 0.02, 10.0)?;
        check_fit(ALGO, &NetworkOptions { dim: 1, alpha: 1.0, use_tucker: true, ..Default::default() }, 200, 0.02, 10.0)
    }
}
