//! LyCORIS DIAG-OFT (`lycoris/modules/diag_oft.py`): a block-diagonal orthogonal rotation of
//! the output rows of W.
//!
//! Blocks: `(block_size, block_num) = factorization(out, dim)` (320 with dim 4 → 4×80; with
//! dim 32 → 10×32). Tensor `oft_blocks` (block_num, bs, bs), zeros; with `rescaled`,
//! `rescale` (out, 1[, 1, 1]), ones.
//!
//! Rotation: Q = B − Bᵀ; with `constraint` c > 0 and ‖Q‖_F + 1e-8 > c·out, Q is scaled down to
//! that norm; R = (I + Q)(I − Q)⁻¹ (Cayley, computed exactly — see [`common::cayley`]); with
//! the multiplier, R_m = m(R − I) + I. Each block k of contiguous output rows becomes
//! W′_k = R_mᵀ·W_k; with `rescaled`, W′ ← rescale ⊙ W′. Rank dropout (training) is an
//! element dropout on m·R, as upstream.
//!
//! Bypass mode rotates the original output, bias included, so it differs from rebuild when
//! the layer has a bias. Network dropout (training, bypass) drops elements of the change the
//! rotation makes. Saved: `oft_blocks`, [`rescale`], and `alpha` = the raw constraint.
//!
//! [`common::cayley`]: super::common::cayley

use std::collections::HashMap;

use candle_core::{bail, DType, Result, Tensor, Var};

use super::common::{alpha_from, alpha_tensor, cayley, element_dropout, eye_batch, frobenius, required, Ctx, Init};
use super::factorization::factorization;
use super::{Adapter, BaseLayer, NetworkOptions};

/// Skew-symmetric Q from raw blocks `(…, b, b)`, capped at `max_norm` (Frobenius over all
/// blocks, LyCORIS adds 1e-8) when `max_norm > 0`. The cap is a tensor op, so its gradient
/// flows through the norm as in torch.
pub(crate) fn skew_capped(blocks: &Tensor, max_norm: f64) -> Result<Tensor> {
    let nd = blocks.rank();
    let q = (blocks - blocks.transpose(nd - 2, nd - 1)?)?;
    if max_norm > 0.0 {
        let norm = frobenius(&q)?.affine(1.0, 1e-8)?;
        let norm_value = norm.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if norm_value > max_norm {
            return q.broadcast_div(&norm)?.affine(max_norm, 0.0);
        }
    }
    Ok(q)
}

/// Moves the channel dim of an output last and flattens the rest: `(rows, out)`; returns the
/// 2-D view and a closure-friendly description to undo it.
pub(crate) fn channels_last(y: &Tensor, is_conv: bool) -> Result<(Tensor, Vec<usize>)> {
    if is_conv {
        let (b, c, h, w) = y.dims4()?;
        Ok((y.permute((0, 2, 3, 1))?.reshape((b * h * w, c))?, vec![b, c, h, w]))
    } else {
        let dims = y.dims().to_vec();
        let c = *dims.last().unwrap();
        Ok((y.reshape(((), c))?, dims))
    }
}

/// Inverse of [`channels_last`].
pub(crate) fn channels_back(y2: &Tensor, shape: &[usize], is_conv: bool) -> Result<Tensor> {
    if is_conv {
        let (b, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
        y2.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
    } else {
        y2.reshape(shape)
    }
}

pub(crate) struct DiagOft {
    ctx: Ctx,
    blocks: Var,
    rescale: Option<Var>,
    block_size: usize,
    block_num: usize,
    /// The raw `constraint` (saved as alpha); the cap on ‖Q‖_F is constraint·out.
    constraint: f64,
}

fn rescale_shape(ctx: &Ctx) -> Vec<usize> {
    let mut s = vec![1usize; ctx.weight_shape().len()];
    s[0] = ctx.out_dim();
    s
}

pub(crate) fn build(opts: &NetworkOptions, base: &BaseLayer, layer: &str, rank: usize) -> Result<Box<dyn Adapter>> {
    let ctx = Ctx::new(opts, base, layer)?;
    let out = ctx.out_dim();
    let (block_size, block_num) = factorization(out, rank as i64);
    if block_size < 2 {
        bail!(
            "layer {layer}: DIAG-OFT splits the {out} output channels into blocks with factorization({out}, {rank}) \
             = {block_size}×{block_num}; 1×1 blocks cannot rotate — choose a dim that shares a factor with {out}"
        );
    }
    let blocks = ctx.var(&[block_num, block_size, block_size], Init::Zeros)?;
    let rescale = if opts.rescaled { Some(ctx.var(&rescale_shape(&ctx), Init::Ones)?) } else { None };
    Ok(Box::new(DiagOft { ctx, blocks, rescale, block_size, block_num, constraint: opts.constraint }))
}

pub(crate) fn from_tensors(
    opts: &NetworkOptions,
    base: &BaseLayer,
    tensors: &HashMap<String, Tensor>,
    layer: &str,
) -> Result<Box<dyn Adapter>> {
    let ctx = Ctx::new(opts, base, layer)?;
    let blocks = required(tensors, "oft_blocks", layer, "DIAG-OFT")?;
    let (block_num, block_size, bs2) = match blocks.dims() {
        [n, b, b2] => (*n, *b, *b2),
        d => bail!("layer {layer}: DIAG-OFT `oft_blocks` must be 3-D (num, bs, bs), got {d:?}"),
    };
    if block_size != bs2 || block_num * block_size != ctx.out_dim() {
        bail!("layer {layer}: `oft_blocks` {:?} does not tile the {} output channels", blocks.dims(), ctx.out_dim());
    }
    let rescale = match tensors.get("rescale") {
        Some(r) => Some(ctx.var_copy(&r.reshape(rescale_shape(&ctx))?)?),
        None => None,
    };
    let constraint = alpha_from(tensors)?.unwrap_or(0.0);
    Ok(Box::new(DiagOft { blocks: ctx.var_copy(blocks)?, ctx, rescale, block_size, block_num, constraint }))
}

impl DiagOft {
    /// R_m per block, (num, bs, bs).
    fn rotations(&self, m: f64, train: bool) -> Result<Tensor> {
        let q = skew_capped(self.blocks.as_tensor(), self.constraint * self.ctx.out_dim() as f64)?;
        let r = cayley(&q)?;
        let mut mr = r.affine(m, 0.0)?;
        if train && self.ctx.drops.rank_dropout > 0.0 {
            mr = element_dropout(&mr, self.ctx.drops.rank_dropout)?;
        }
        let eye = eye_batch(self.block_num, self.block_size, mr.dtype(), mr.device())?;
        mr + eye.affine(1.0 - m, 0.0)?
    }

    fn merged(&self, m: f64, train: bool) -> Result<Tensor> {
        let r = self.rotations(m, train)?;
        let w = self.ctx.weight_p()?;
        let rest = w.elem_count() / self.ctx.out_dim();
        let wk = w.reshape((self.block_num, self.block_size, rest))?;
        let rotated = r.transpose(1, 2)?.matmul(&wk)?.reshape(self.ctx.weight_shape())?;
        match &self.rescale {
            Some(s) => rotated.broadcast_mul(s.as_tensor()),
            None => Ok(rotated),
        }
    }
}

impl Adapter for DiagOft {
    fn algo_name(&self) -> &'static str {
        "diag_oft"
    }

    fn delta_weight(&self) -> Result<Tensor> {
        self.merged(1.0, false)? - self.ctx.weight_p()?
    }

    fn forward(&self, base: &BaseLayer, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.ctx.module_dropped(train)? {
            return base.forward(x);
        }
        let m = self.ctx.multiplier;
        if !self.ctx.bypass {
            return base.forward_with(x, &self.merged(m, train)?, base.bias.as_ref());
        }
        // Bypass: rotate the original output (bias included): y′_k = R_mᵀ y_k.
        let org = base.forward(x)?;
        let is_conv = self.ctx.is_conv();
        let (y2, shape) = channels_last(&org, is_conv)?;
        let rows = y2.dim(0)?;
        let r = self.rotations(m, train)?.to_dtype(y2.dtype())?;
        let yk = y2.reshape((rows, self.block_num, self.block_size))?.transpose(0, 1)?.contiguous()?;
        let mut rotated = yk.matmul(&r)?.transpose(0, 1)?.reshape((rows, self.ctx.out_dim()))?;
        if let Some(s) = &self.rescale {
            rotated = rotated.broadcast_mul(&s.as_tensor().flatten_all()?.to_dtype(y2.dtype())?)?;
        }
        let change = self.ctx.out_dropout(&(rotated - &y2)?, train)?;
        channels_back(&(y2 + change)?, &shape, is_conv)
    }

    fn merged_weight(&self, _base: &BaseLayer) -> Result<Tensor> {
        self.merged(self.ctx.multiplier, false)
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        let mut v = vec![("oft_blocks".to_string(), self.blocks.clone())];
        if let Some(s) = &self.rescale {
            v.push(("rescale".into(), s.clone()));
        }
        v
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v: Vec<(String, Tensor)> =
            self.trainable().into_iter().map(|(n, var)| (n, var.as_tensor().clone())).collect();
        v.push(("alpha".into(), alpha_tensor(self.constraint, &self.ctx.device)?));
        Ok(v)
    }

    fn multiplier(&self) -> f64 {
        self.ctx.multiplier
    }

    fn set_multiplier(&mut self, multiplier: f64) {
        self.ctx.multiplier = multiplier;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::networks::common::batched_inverse;
    use crate::networks::testutil::*;
    use crate::networks::{adapter_from_tensors, build_adapter, NetworkAlgo};

    const ALGO: NetworkAlgo = NetworkAlgo::DiagOft;

    fn opts() -> NetworkOptions {
        NetworkOptions { dim: 4, ..Default::default() }
    }

    /// Cayley rotation of one block by the f64 reference inverse.
    pub(crate) fn naive_cayley(q: &Mat) -> Mat {
        let i = Mat::eye(q.rows);
        i.add(q).matmul(&i.sub(q).inverse())
    }

    fn blocks_of(t: &Tensor) -> Result<Vec<Mat>> {
        let (n, b, _) = t.dims3()?;
        let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        Ok((0..n).map(|k| Mat::new(b, b, v[k * b * b..(k + 1) * b * b].to_vec())).collect())
    }

    #[test]
    fn inverse_and_cayley_are_exact() -> Result<()> {
        // Random I − Q with ‖Q‖ up to ~5: f32 results within 1e-6 of the f64 reference.
        for (n, b, std) in [(3usize, 4usize, 0.3f32), (2, 10, 1.0), (1, 16, 0.5)] {
            let raw = (randn(&[n, b, b], 7 + b as u64)? * std as f64)?;
            let q = (&raw - raw.transpose(1, 2)?)?;
            let eye = eye_batch(n, b, DType::F32, &dev())?;
            let inv = batched_inverse(&(&eye - &q)?)?;
            let r = cayley(&q)?;
            for (k, qk) in blocks_of(&q)?.iter().enumerate() {
                let want_inv = Mat::eye(b).sub(qk).inverse();
                assert_mat_close(&inv.get(k)?, &want_inv, 1e-6, "inverse");
                let want_r = naive_cayley(qk);
                assert_mat_close(&r.get(k)?, &want_r, 1e-6, "cayley");
                // orthogonal
                let rk = Mat::from_tensor_2d(&r.get(k)?)?;
                assert!(rk.t().matmul(&rk).sub(&Mat::eye(b)).max_abs() < 1e-5);
            }
        }
        Ok(())
    }

    #[test]
    fn cayley_gradient_matches_finite_differences() -> Result<()> {
        // f(B) = Σ cayley(B − Bᵀ) ⊙ P in f64; autograd through Gauss–Jordan vs central differences.
        let (n, b) = (2usize, 5usize);
        let b0 = (randn(&[n, b, b], 31)?.to_dtype(DType::F64)? * 0.4)?;
        let p = randn(&[n, b, b], 32)?.to_dtype(DType::F64)?;
        let var = Var::from_tensor(&b0)?;
        let f = |t: &Tensor| -> Result<Tensor> { (cayley(&(t - t.transpose(1, 2)?)?)? * &p)?.sum_all() };
        let grads = f(var.as_tensor())?.backward()?;
        let g = grads.get(var.as_tensor()).unwrap().flatten_all()?.to_vec1::<f64>()?;
        let base: Vec<f64> = b0.flatten_all()?.to_vec1::<f64>()?;
        let eps = 1e-6;
        for idx in [0usize, 3, 7, 12, 26, 49] {
            let mut plus = base.clone();
            plus[idx] += eps;
            let mut minus = base.clone();
            minus[idx] -= eps;
            let fp = f(&Tensor::from_vec(plus, (n, b, b), &dev())?)?.to_scalar::<f64>()?;
            let fm = f(&Tensor::from_vec(minus, (n, b, b), &dev())?)?.to_scalar::<f64>()?;
            let numeric = (fp - fm) / (2.0 * eps);
            assert!((numeric - g[idx]).abs() < 1e-6 * (1.0 + numeric.abs()), "idx {idx}: {numeric} vs {}", g[idx]);
        }
        Ok(())
    }

    #[test]
    fn blocks_follow_factorization() -> Result<()> {
        let s = |out: usize, dim: usize| -> Result<Vec<usize>> {
            let base = linear_base(8, out, false, 1)?;
            let a = build_adapter(ALGO, &NetworkOptions { dim, ..Default::default() }, &base, "t")?;
            Ok(state_map(a.as_ref())?["oft_blocks"].dims().to_vec())
        };
        assert_eq!(s(320, 4)?, [80, 4, 4]);
        assert_eq!(s(320, 32)?, [32, 10, 10]);
        assert_eq!(s(16, 4)?, [4, 4, 4]);
        let base = linear_base(8, 37, false, 1)?;
        let msg = build_adapter(ALGO, &opts(), &base, "te.fc").err().unwrap().to_string();
        assert!(msg.contains("te.fc") && msg.contains("1×1 blocks"), "{msg}");
        Ok(())
    }

    /// W′ = rescale ⊙ blockdiag(R_mᵀ)·W by explicit block loops.
    fn naive_merged(base: &BaseLayer, s: &HashMap<String, Tensor>, m: f64, constraint: f64) -> Result<Mat> {
        let w = Mat::from_tensor_2d(&base.weight)?;
        let blocks = blocks_of(&s["oft_blocks"])?;
        let bs = blocks[0].rows;
        let mut qs: Vec<Mat> = blocks.iter().map(|b| b.sub(&b.t())).collect();
        let norm = qs.iter().map(|q| q.data.iter().map(|v| v * v).sum::<f64>()).sum::<f64>().sqrt() + 1e-8;
        let cap = constraint * w.rows as f64;
        if cap > 0.0 && norm > cap {
            qs = qs.iter().map(|q| q.scale(cap / norm)).collect();
        }
        let mut out = w.clone();
        for (k, q) in qs.iter().enumerate() {
            let r = naive_cayley(q).scale(m).add(&Mat::eye(bs).scale(1.0 - m));
            for i in 0..bs {
                for c in 0..w.cols {
                    let mut acc = 0.0;
                    for j in 0..bs {
                        acc += r.at(j, i) * w.at(k * bs + j, c);
                    }
                    out.data[(k * bs + i) * w.cols + c] = acc;
                }
            }
        }
        if let Some(rescale) = s.get("rescale") {
            let rv = rescale.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            for r in 0..out.rows {
                for c in 0..out.cols {
                    out.data[r * out.cols + c] *= rv[r];
                }
            }
        }
        Ok(out)
    }

    #[test]
    fn merged_weight_matches_naive_with_constraint_rescale_and_multiplier() -> Result<()> {
        for (base, _) in standard_cases()? {
            for (constraint, rescaled, m) in
                [(0.0, false, 1.0), (0.0, true, 0.6), (1e-3, false, 1.0), (1e-3, true, 1.5)]
            {
                let o = NetworkOptions { constraint, rescaled, multiplier: m, ..opts() };
                let a = build_adapter(ALGO, &o, &base, "t")?;
                assert!(max_abs(&a.delta_weight()?)? < 1e-6, "identity at init");
                randomize(a.as_ref(), 3)?;
                let s = state_map(a.as_ref())?;
                assert_eq!(scalar_of(&s["alpha"])?, constraint as f32 as f64);
                let want = naive_merged(&base, &s, m, constraint)?;
                assert_mat_close(&a.merged_weight(&base)?, &want, 1e-5, "DIAG-OFT W′");
            }
        }
        Ok(())
    }

    #[test]
    fn rebuild_bypass_and_bias() -> Result<()> {
        for (base, x) in standard_cases()? {
            let o = NetworkOptions { rescaled: true, multiplier: 0.7, ..opts() };
            let a = check_modes(ALGO, &o, &base, &x, false, false)?;
            let s = state_map(a.as_ref())?;
            let bypass_opts = NetworkOptions { bypass_mode: true, ..o.clone() };
            // With a bias, bypass rotates it too: y′ = rescale ⊙ R_mᵀ(Wx + b) per block.
            let by = adapter_from_tensors(ALGO, &bypass_opts, &base, &s)?;
            let merged = a.merged_weight(&base)?;
            let nb = BaseLayer { bias: None, ..base.clone() };
            // rescale ⊙ R_mᵀ·b is the merged weight of a layer whose weight is b as one column.
            let b_col = BaseLayer::linear(base.bias.as_ref().unwrap().reshape(((), 1))?, None)?;
            let rotated_bias = adapter_from_tensors(ALGO, &o, &b_col, &s)?.merged_weight(&b_col)?.flatten_all()?;
            let want = nb.forward_with(&x, &merged, Some(&rotated_bias))?;
            assert_close(&by.forward(&base, &x, false)?, &want, 1e-5, "bypass rotates the bias");
            let rebuild = a.forward(&base, &x, false)?;
            assert!(max_abs(&(by.forward(&base, &x, false)? - &rebuild)?)? > 1e-4, "bias makes them differ");
            // Without a bias, bypass == rebuild.
            check_modes(ALGO, &o, &nb, &x, false, true)?;
        }
        Ok(())
    }

    #[test]
    fn rank_dropout_only_in_training() -> Result<()> {
        let (base, x) = standard_cases()?.remove(0);
        let a = build_adapter(ALGO, &NetworkOptions { rank_dropout: 0.5, ..opts() }, &base, "t")?;
        randomize(a.as_ref(), 4)?;
        let e = a.forward(&base, &x, false)?;
        assert_close(&a.forward(&base, &x, false)?, &e, 0.0, "eval deterministic");
        assert!(max_abs(&(a.forward(&base, &x, true)? - e)?)? > 1e-4);
        Ok(())
    }

    #[test]
    fn every_trainable_gets_a_gradient() -> Result<()> {
        check_grads(ALGO, &NetworkOptions { rescaled: true, ..opts() })?;
        check_grads(ALGO, &NetworkOptions { rescaled: true, bypass_mode: true, constraint: 1e-3, ..opts() })
    }

    #[test]
    fn fit_reduces_loss_10x() -> Result<()> {
        check_fit(ALGO, &opts(), 200, 0.02, 10.0)?;
        check_fit(ALGO, &NetworkOptions { rescaled: true, ..opts() }, 200, 0.02, 10.0)
    }
}
