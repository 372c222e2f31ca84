//! LyCORIS LoHa (`lycoris/modules/loha.py`): ΔW = (w1_a@w1_b) ⊙ (w2_a@w2_b) · scale.
//!
//! Tensors: `hada_w{1,2}_a` (out, r), `hada_w{1,2}_b` (r, in·kh·kw) — convs are flattened to
//! 2-D. With Tucker on a k×k conv: `hada_w*_a` (r, out), `hada_w*_b` (r, in) and
//! `hada_t{1,2}` (r, r, kh, kw), ΔW_j[o, i, :] = Σ t_j[a, b, :]·w_ja[a, o]·w_jb[b, i].
//! Init: *_b ~ N(0, 1), w1_a ~ N(0, 0.1), w2_a = 0 (N(0, 0.1) with `use_scalar`),
//! t ~ N(0, 0.1). The scalar is folded into `hada_w1_a` on save.
//!
//! ΔW is scaled once (LyCORIS's `get_diff_weight`, used by its merge, scales twice).
//! Bypass mode materialises ΔW and applies it with the layer's op.

use std::collections::HashMap;

use candle_core::{bail, Result, Tensor, Var};

use super::common::{
    alpha_from, alpha_tensor, expect_shape, folded, new_scalar, required, times_scalar, tucker, Ctx, Dora, Init,
    LowRankAdapter, LowRankDelta, RankScale,
};
use super::locon::tucker_applies;
use super::{Adapter, BaseLayer, NetworkOptions};

pub(crate) struct LohaDelta {
    w1a: Var,
    w1b: Var,
    w2a: Var,
    w2b: Var,
    /// `hada_t1`, `hada_t2` with Tucker.
    t: Option<(Var, Var)>,
    scalar: Option<Var>,
    scale: f64,
    saved_alpha: f64,
}

/// (a, b, t) shapes.
fn shapes(ctx: &Ctx, rank: usize, tucker: bool) -> (Vec<usize>, Vec<usize>, Option<Vec<usize>>) {
    if tucker {
        let k = ctx.kernel_dims();
        (vec![rank, ctx.out_dim()], vec![rank, ctx.in_dim()], Some(vec![rank, rank, k[0], k[1]]))
    } else {
        (vec![ctx.out_dim(), rank], vec![rank, ctx.in_flat()], None)
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
        bail!("layer {layer}: LoHa rank must be at least 1");
    }
    let use_tucker = tucker_applies(&ctx, opts.use_tucker);
    let (a_s, b_s, t_s) = shapes(&ctx, rank, use_tucker);
    let src = LohaDelta {
        w1a: ctx.var(&a_s, Init::Normal(0.1))?,
        w1b: ctx.var(&b_s, Init::Normal(1.0))?,
        w2a: ctx.var(&a_s, if opts.use_scalar { Init::Normal(0.1) } else { Init::Zeros })?,
        w2b: ctx.var(&b_s, Init::Normal(1.0))?,
        t: match t_s {
            Some(s) => Some((ctx.var(&s, Init::Normal(0.1))?, ctx.var(&s, Init::Normal(0.1))?)),
            None => None,
        },
        scalar: new_scalar(opts.use_scalar, ctx.dtype, &ctx.device)?,
        scale: RankScale::lycoris(rank, alpha, opts.rs_lora).scale,
        saved_alpha: RankScale::lycoris(rank, alpha, opts.rs_lora).saved_alpha,
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
    let get = |k: &str| required(tensors, k, layer, "LoHa");
    let (w1a, w1b, w2a, w2b) = (get("hada_w1_a")?, get("hada_w1_b")?, get("hada_w2_a")?, get("hada_w2_b")?);
    let tucker = match (tensors.get("hada_t1"), tensors.get("hada_t2")) {
        (Some(t1), Some(t2)) => Some((t1, t2)),
        (None, None) => None,
        _ => bail!("layer {layer}: LoHa Tucker needs both `hada_t1` and `hada_t2`"),
    };
    if tucker.is_some() && !tucker_applies(&ctx, true) {
        bail!("layer {layer}: LoHa Tucker tensors need a k×k convolution");
    }
    let rank = w1b.dim(0)?;
    let (a_s, b_s, t_s) = shapes(&ctx, rank, tucker.is_some());
    for (t, name) in [(w1a, "hada_w1_a"), (w2a, "hada_w2_a")] {
        expect_shape(t, &a_s, name, layer)?;
    }
    for (t, name) in [(w1b, "hada_w1_b"), (w2b, "hada_w2_b")] {
        expect_shape(t, &b_s, name, layer)?;
    }
    let t = match (tucker, t_s) {
        (Some((t1, t2)), Some(s)) => {
            expect_shape(t1, &s, "hada_t1", layer)?;
            expect_shape(t2, &s, "hada_t2", layer)?;
            Some((ctx.var_copy(t1)?, ctx.var_copy(t2)?))
        }
        _ => None,
    };
    let rs = RankScale::from_saved(rank, alpha_from(tensors)?);
    let dora = tensors.get("dora_scale").map(|d| Dora::from_tensor(&ctx, d)).transpose()?;
    let src = LohaDelta {
        w1a: ctx.var_copy(w1a)?,
        w1b: ctx.var_copy(w1b)?,
        w2a: ctx.var_copy(w2a)?,
        w2b: ctx.var_copy(w2b)?,
        t,
        scalar: None,
        scale: rs.scale,
        saved_alpha: rs.saved_alpha,
    };
    Ok(Box::new(LowRankAdapter { ctx, dora, src }))
}

impl LowRankDelta for LohaDelta {
    fn algo_name(&self) -> &'static str {
        "loha"
    }

    fn delta(&self, ctx: &Ctx, train: bool) -> Result<Tensor> {
        let w = match &self.t {
            Some((t1, t2)) => {
                let d1 = tucker(t1.as_tensor(), self.w1a.as_tensor(), self.w1b.as_tensor())?;
                let d2 = tucker(t2.as_tensor(), self.w2a.as_tensor(), self.w2b.as_tensor())?;
                (d1 * d2)?
            }
            None => {
                let d1 = self.w1a.as_tensor().matmul(self.w1b.as_tensor())?;
                let d2 = self.w2a.as_tensor().matmul(self.w2b.as_tensor())?;
                (d1 * d2)?.reshape(ctx.weight_shape())?
            }
        };
        let w = ctx.drop_rows(&w.affine(self.scale, 0.0)?, train)?;
        times_scalar(&w, &self.scalar)
    }

    fn fused_merge(&self, ctx: &Ctx, w: &Tensor, train: bool) -> Result<Option<Tensor>> {
        // The plain form only: Tucker, use_scalar and rank dropout keep the candle ops.
        if self.t.is_some() || self.scalar.is_some() || ctx.rank_dropout_active(train) || w.track_op() {
            return Ok(None);
        }
        let p1 = self.w1a.as_tensor().matmul(self.w1b.as_tensor())?;
        let p2 = self.w2a.as_tensor().matmul(self.w2b.as_tensor())?;
        if p1.dtype() != w.dtype() {
            return Ok(None);
        }
        Ok(Some(super::fused::loha_merge(w, &p1, &p2, self.scale * ctx.multiplier)?))
    }

    fn params(&self) -> Vec<(String, Var)> {
        let mut v = vec![
            ("hada_w1_a".to_string(), self.w1a.clone()),
            ("hada_w1_b".into(), self.w1b.clone()),
            ("hada_w2_a".into(), self.w2a.clone()),
            ("hada_w2_b".into(), self.w2b.clone()),
        ];
        if let Some((t1, t2)) = &self.t {
            v.push(("hada_t1".into(), t1.clone()));
            v.push(("hada_t2".into(), t2.clone()));
        }
        if let Some(s) = &self.scalar {
            v.push(("scalar".into(), s.clone()));
        }
        v
    }

    fn state(&self, ctx: &Ctx) -> Result<Vec<(String, Tensor)>> {
        let mut v = vec![
            ("hada_w1_a".to_string(), folded(&self.w1a, &self.scalar)?),
            ("hada_w1_b".into(), self.w1b.as_tensor().clone()),
            ("hada_w2_a".into(), self.w2a.as_tensor().clone()),
            ("hada_w2_b".into(), self.w2b.as_tensor().clone()),
        ];
        if let Some((t1, t2)) = &self.t {
            v.push(("hada_t1".into(), t1.as_tensor().clone()));
            v.push(("hada_t2".into(), t2.as_tensor().clone()));
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

    const ALGO: NetworkAlgo = NetworkAlgo::Loha;

    fn opts() -> NetworkOptions {
        NetworkOptions { dim: 4, alpha: 2.0, ..Default::default() }
    }

    /// Σ_ab t[a,b,k]·wa[a,o]·wb[b,i] by loops, as (out, in·kk).
    fn naive_tucker(t: &Tensor, wa: &Mat, wb: &Mat) -> Result<Mat> {
        let (r1, r2, kh, kw) = t.dims4()?;
        let kk = kh * kw;
        let tv = t.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
        let (out, inn) = (wa.cols, wb.cols);
        let mut d = vec![0.0; out * inn * kk];
        for o in 0..out {
            for i in 0..inn {
                for k in 0..kk {
                    let mut acc = 0.0;
                    for a in 0..r1 {
                        for b in 0..r2 {
                            acc += tv[(a * r2 + b) * kk + k] * wa.at(a, o) * wb.at(b, i);
                        }
                    }
                    d[(o * inn + i) * kk + k] = acc;
                }
            }
        }
        Ok(Mat::new(out, inn * kk, d))
    }

    #[test]
    fn shapes_init_and_naive_delta() -> Result<()> {
        for tucker in [false, true] {
            for (base, _) in standard_cases()? {
                let o = NetworkOptions { use_tucker: tucker, ..opts() };
                let a = build_adapter(ALGO, &o, &base, "t")?;
                assert_eq!(max_abs(&a.delta_weight()?)?, 0.0, "w2_a = 0 → ΔW = 0");
                let s = state_map(a.as_ref())?;
                let is_tucker = s.contains_key("hada_t1");
                assert_eq!(is_tucker, tucker && base.weight.dims() == [16, 8, 3, 3]);
                let (out, in_flat) = (16, base.weight.elem_count() / 16);
                if is_tucker {
                    assert_eq!(s["hada_w1_a"].dims(), [4, 16]);
                    assert_eq!(s["hada_w1_b"].dims(), [4, 8]);
                    assert_eq!(s["hada_t1"].dims(), [4, 4, 3, 3]);
                } else {
                    assert_eq!(s["hada_w1_a"].dims(), [out, 4]);
                    assert_eq!(s["hada_w2_b"].dims(), [4, in_flat]);
                }
                randomize(a.as_ref(), 1)?;
                let s = state_map(a.as_ref())?;
                let m = |k: &str| Mat::from_tensor_2d(&s[k]).unwrap();
                let want = if is_tucker {
                    let d1 = naive_tucker(&s["hada_t1"], &m("hada_w1_a"), &m("hada_w1_b"))?;
                    let d2 = naive_tucker(&s["hada_t2"], &m("hada_w2_a"), &m("hada_w2_b"))?;
                    d1.hadamard(&d2).scale(0.5)
                } else {
                    m("hada_w1_a").matmul(&m("hada_w1_b")).hadamard(&m("hada_w2_a").matmul(&m("hada_w2_b"))).scale(0.5)
                };
                // scaled exactly once (alpha/r = 0.5)
                assert_mat_close(&a.delta_weight()?, &want, 1e-5, "LoHa ΔW");
            }
        }
        Ok(())
    }

    #[test]
    fn rebuild_bypass_reload_agree() -> Result<()> {
        for tucker in [false, true] {
            for (base, x) in standard_cases()? {
                let o = NetworkOptions { use_tucker: tucker, multiplier: 0.8, ..opts() };
                check_modes(ALGO, &o, &base, &x, true, true)?;
                let o = NetworkOptions { dora_wd: true, wd_on_output: tucker, ..o };
                check_modes(ALGO, &o, &base, &x, false, false)?;
            }
        }
        Ok(())
    }

    #[test]
    fn use_scalar_folds_into_w1_a() -> Result<()> {
        let (base, x) = standard_cases()?.remove(0);
        let o = NetworkOptions { use_scalar: true, ..opts() };
        let a = build_adapter(ALGO, &o, &base, "t")?;
        assert_eq!(max_abs(&a.delta_weight()?)?, 0.0);
        assert!(max_abs(&state_map(a.as_ref())?["hada_w2_a"])? > 0.0, "w2_a gets N(0, .1) with use_scalar");
        check_modes(ALGO, &o, &base, &x, true, true)?;
        Ok(())
    }

    #[test]
    fn every_trainable_gets_a_gradient() -> Result<()> {
        check_grads(ALGO, &NetworkOptions { use_tucker: true, use_scalar: true, ..opts() })?;
        check_grads(ALGO, &NetworkOptions { dora_wd: true, ..opts() })?;
        check_grads(ALGO, &NetworkOptions { bypass_mode: true, ..opts() })
    }

    #[test]
    fn fit_reduces_loss_10x() -> Result<()> {
        let o = NetworkOptions { dim: 4, alpha: 4.0, ..Default::default() };
        check_fit(ALGO, &o, 200, 0.02, 10.0)?;
        check_fit(ALGO, &NetworkOptions { use_tucker: true, ..o }, 200, 0.02, 10.0)
    }
}
