//! LyCORIS BOFT (`lycoris/modules/boft.py`): butterfly orthogonal fine-tuning.
//!
//! Blocks: `(b, n) = power2factorization(out, dim)` — b even and ≤ dim, n a power of two;
//! otherwise (odd widths, too small a dim) the layer cannot be adapted and an error names it.
//! m = popcount(n − 1) + 1 stages; tensor `oft_blocks` (m, n, b, b), zeros; with `rescaled`,
//! `rescale` (out, 1[, 1, 1]).
//!
//! Each stage i has rotations R_i = Cayley(Q_i) (Q = B − Bᵀ, with DIAG-OFT's constraint over
//! all stages); with the multiplier, R_i ← m·R_i + (1 − m)·I per stage. With k = 2^i·b/2 the
//! rows are permuted by viewing them as (−1, 2, k) → (−1, k, 2), grouped as (n, b), multiplied
//! by R_i (not Rᵀ), and un-permuted. `rescale` applies last. Bypass applies the same stages to
//! the original output (bias included), so it differs from rebuild when there is a bias.
//! Saved: `oft_blocks`, [`rescale`], `alpha` = the raw constraint.

use std::collections::HashMap;

use candle_core::{bail, Result, Tensor, Var};

use super::common::{alpha_from, alpha_tensor, cayley, eye_batch, required, Ctx, Init};
use super::diag_oft::{channels_back, channels_last, skew_capped};
use super::factorization::power2factorization;
use super::{Adapter, BaseLayer, NetworkOptions};

pub(crate) struct Boft {
    ctx: Ctx,
    blocks: Var,
    rescale: Option<Var>,
    /// b: rotation block size (even).
    block_size: usize,
    /// n: blocks per stage (a power of two).
    block_num: usize,
    /// m: number of butterfly stages.
    stages: usize,
    constraint: f64,
}

fn rescale_shape(ctx: &Ctx) -> Vec<usize> {
    let mut s = vec![1usize; ctx.weight_shape().len()];
    s[0] = ctx.out_dim();
    s
}

/// BOFT's (b, n, m) for a width, or an error naming the layer and the rule.
pub fn boft_geometry(out: usize, dim: usize, layer: &str) -> Result<(usize, usize, usize)> {
    match power2factorization(out, dim as i64) {
        Some((b, n)) => Ok((b, n, (n as u64 - 1).count_ones() as usize + 1)),
        None => bail!(
            "layer {layer}: BOFT cannot factor {out} output channels with dim {dim}: it needs {out} = b·n with b even \
             and ≤ dim and n a power of two{}",
            if out % 2 == 1 { " (an odd width never factors; skip this layer)" } else { "; try a larger dim" }
        ),
    }
}

pub(crate) fn build(opts: &NetworkOptions, base: &BaseLayer, layer: &str, rank: usize) -> Result<Box<dyn Adapter>> {
    let ctx = Ctx::new(opts, base, layer)?;
    let (b, n, m) = boft_geometry(ctx.out_dim(), rank, layer)?;
    let blocks = ctx.var(&[m, n, b, b], Init::Zeros)?;
    let rescale = if opts.rescaled { Some(ctx.var(&rescale_shape(&ctx), Init::Ones)?) } else { None };
    Ok(Box::new(Boft { ctx, blocks, rescale, block_size: b, block_num: n, stages: m, constraint: opts.constraint }))
}

pub(crate) fn from_tensors(
    opts: &NetworkOptions,
    base: &BaseLayer,
    tensors: &HashMap<String, Tensor>,
    layer: &str,
) -> Result<Box<dyn Adapter>> {
    let ctx = Ctx::new(opts, base, layer)?;
    let blocks = required(tensors, "oft_blocks", layer, "BOFT")?;
    let (m, n, b, b2) = match blocks.dims() {
        [m, n, b, b2] => (*m, *n, *b, *b2),
        d => bail!("layer {layer}: BOFT `oft_blocks` must be 4-D (stages, n, b, b), got {d:?}"),
    };
    let ok = b == b2
        && b % 2 == 0
        && n.is_power_of_two()
        && n * b == ctx.out_dim()
        && m == (n as u64 - 1).count_ones() as usize + 1;
    if !ok {
        bail!("layer {layer}: BOFT `oft_blocks` {:?} does not fit {} output channels", blocks.dims(), ctx.out_dim());
    }
    let rescale = match tensors.get("rescale") {
        Some(r) => Some(ctx.var_copy(&r.reshape(rescale_shape(&ctx))?)?),
        None => None,
    };
    let constraint = alpha_from(tensors)?.unwrap_or(0.0);
    Ok(Box::new(Boft {
        blocks: ctx.var_copy(blocks)?,
        ctx,
        rescale,
        block_size: b,
        block_num: n,
        stages: m,
        constraint,
    }))
}

impl Boft {
    /// Per-stage rotations with the multiplier: (m, n, b, b).
    fn rotations(&self, mult: f64) -> Result<Tensor> {
        let (m, n, b) = (self.stages, self.block_num, self.block_size);
        let q = skew_capped(self.blocks.as_tensor(), self.constraint * self.ctx.out_dim() as f64)?;
        let r = cayley(&q.reshape((m * n, b, b))?)?;
        let r = if mult == 1.0 {
            r
        } else {
            (r.affine(mult, 0.0)? + eye_batch(m * n, b, r.dtype(), r.device())?.affine(1.0 - mult, 0.0)?)?
        };
        r.reshape((m, n, b, b))
    }

    /// W′ (rows rotated stage by stage, then rescaled).
    fn merged(&self, mult: f64) -> Result<Tensor> {
        let (n, b) = (self.block_num, self.block_size);
        let out = self.ctx.out_dim();
        let r = self.rotations(mult)?;
        let w = self.ctx.weight_p()?;
        let f = w.elem_count() / out;
        let mut inp = w.reshape((out, f))?;
        for i in 0..self.stages {
            let k = (1usize << i) * b / 2;
            let groups = out / (2 * k);
            // (groups, 2, k, F) → (groups, k, 2, F) → (n, b, F)
            let permuted = inp.reshape((groups, 2, k, f))?.transpose(1, 2)?.reshape((n, b, f))?;
            let rotated = r.get(i)?.matmul(&permuted)?;
            // (n, b, F) → (groups, k, 2, F) → (groups, 2, k, F) → (out, F)
            inp = rotated.reshape((groups, k, 2, f))?.transpose(1, 2)?.reshape((out, f))?;
        }
        let merged = inp.reshape(self.ctx.weight_shape())?;
        match &self.rescale {
            Some(s) => merged.broadcast_mul(s.as_tensor()),
            None => Ok(merged),
        }
    }

    /// The same stages applied to outputs `(rows, out)`.
    fn rotate_outputs(&self, y: &Tensor, mult: f64) -> Result<Tensor> {
        let (n, b) = (self.block_num, self.block_size);
        let out = self.ctx.out_dim();
        let rows = y.dim(0)?;
        let r = self.rotations(mult)?.to_dtype(y.dtype())?;
        let mut inp = y.clone();
        for i in 0..self.stages {
            let k = (1usize << i) * b / 2;
            let groups = out / (2 * k);
            let permuted = inp.reshape((rows, groups, 2, k))?.transpose(2, 3)?.reshape((rows, n, b))?;
            // y[.., blk, i] = Σ_j R[blk, i, j]·y[.., blk, j]  ⇔  (n, rows, b) @ R[blk]ᵀ
            let rotated = permuted.transpose(0, 1)?.contiguous()?.matmul(&r.get(i)?.transpose(1, 2)?)?;
            let rotated = rotated.transpose(0, 1)?;
            inp = rotated.reshape((rows, groups, k, 2))?.transpose(2, 3)?.reshape((rows, out))?;
        }
        match &self.rescale {
            Some(s) => inp.broadcast_mul(&s.as_tensor().flatten_all()?.to_dtype(y.dtype())?),
            None => Ok(inp),
        }
    }
}

impl Adapter for Boft {
    fn algo_name(&self) -> &'static str {
        "boft"
    }

    fn delta_weight(&self) -> Result<Tensor> {
        self.merged(1.0)? - self.ctx.weight_p()?
    }

    fn forward(&self, base: &BaseLayer, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.ctx.module_dropped(train)? {
            return base.forward(x);
        }
        let mult = self.ctx.multiplier;
        if !self.ctx.bypass {
            return base.forward_with(x, &self.merged(mult)?, base.bias.as_ref());
        }
        let org = base.forward(x)?;
        let is_conv = self.ctx.is_conv();
        let (y2, shape) = channels_last(&org, is_conv)?;
        let rotated = self.rotate_outputs(&y2, mult)?;
        let change = self.ctx.out_dropout(&(rotated - &y2)?, train)?;
        channels_back(&(y2 + change)?, &shape, is_conv)
    }

    fn merged_weight(&self, _base: &BaseLayer) -> Result<Tensor> {
        self.merged(self.ctx.multiplier)
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
mod tests {
    use super::*;
    use crate::networks::testutil::*;
    use crate::networks::{build_adapter, NetworkAlgo};
    use candle_core::DType;

    const ALGO: NetworkAlgo = NetworkAlgo::Boft;

    fn opts() -> NetworkOptions {
        NetworkOptions { dim: 4, ..Default::default() }
    }

    /// W′ = rescale ⊙ S_{m−1}···S_0·W, each S_i built as an explicit out×out matrix from the
    /// permutation the butterfly stage describes.
    fn naive_merged(base: &BaseLayer, s: &HashMap<String, Tensor>, mult: f64) -> Result<Mat> {
        let w = Mat::from_tensor_2d(&base.weight)?;
        let out = w.rows;
        let blocks = &s["oft_blocks"];
        let (m, n, b, _) = blocks.dims4()?;
        let v = blocks.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let mut acc = w.clone();
        for i in 0..m {
            let k = (1 << i) * b / 2;
            // perm[new] = old: new (g, kk, two) reads old (g, two, kk)
            let mut perm = vec![0usize; out];
            for g in 0..out / (2 * k) {
                for kk in 0..k {
                    for two in 0..2 {
                        perm[g * 2 * k + kk * 2 + two] = g * 2 * k + two * k + kk;
                    }
                }
            }
            let mut stage = Mat::new(out, out, vec![0.0; out * out]);
            for blk in 0..n {
                let off = (i * n + blk) * b * b;
                let raw = Mat::new(b, b, v[off..off + b * b].to_vec());
                let r = crate::networks::diag_oft::tests::naive_cayley(&raw.sub(&raw.t()));
                let r = r.scale(mult).add(&Mat::eye(b).scale(1.0 - mult));
                for p in 0..b {
                    for q in 0..b {
                        stage.data[perm[blk * b + p] * out + perm[blk * b + q]] = r.at(p, q);
                    }
                }
            }
            acc = stage.matmul(&acc);
        }
        if let Some(rescale) = s.get("rescale") {
            let rv = rescale.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            for r in 0..out {
                for c in 0..acc.cols {
                    acc.data[r * acc.cols + c] *= rv[r];
                }
            }
        }
        Ok(acc)
    }

    #[test]
    fn geometry_and_errors() -> Result<()> {
        assert_eq!(boft_geometry(16, 4, "t")?, (4, 4, 3));
        assert_eq!(boft_geometry(320, 10, "t")?, (10, 32, 6));
        assert_eq!(boft_geometry(64, 8, "t")?, (8, 8, 4));
        let msg = boft_geometry(320, 8, "unet.proj_in").err().unwrap().to_string();
        assert!(msg.contains("unet.proj_in") && msg.contains("320"), "{msg}");
        let base = linear_base(8, 37, false, 1)?;
        let msg = build_adapter(ALGO, &opts(), &base, "te.fc2").err().unwrap().to_string();
        assert!(msg.contains("te.fc2") && msg.contains("odd width"), "{msg}");
        let base = linear_base(8, 16, false, 1)?;
        let s = state_map(build_adapter(ALGO, &opts(), &base, "t")?.as_ref())?;
        assert_eq!(s["oft_blocks"].dims(), [3, 4, 4, 4]);
        Ok(())
    }

    #[test]
    fn merged_weight_matches_naive_butterfly() -> Result<()> {
        for (base, _) in standard_cases()? {
            for (dim, rescaled, mult) in [(4, false, 1.0), (4, true, 0.5), (2, false, 1.3), (8, true, 1.0)] {
                let o = NetworkOptions { dim, rescaled, multiplier: mult, ..Default::default() };
                let a = build_adapter(ALGO, &o, &base, "t")?;
                assert!(max_abs(&a.delta_weight()?)? < 1e-6);
                randomize(a.as_ref(), 2)?;
                let s = state_map(a.as_ref())?;
                let want = naive_merged(&base, &s, mult)?;
                assert_mat_close(&a.merged_weight(&base)?, &want, 1e-5, "BOFT W′");
            }
        }
        Ok(())
    }

    #[test]
    fn rebuild_and_bypass() -> Result<()> {
        for (base, x) in standard_cases()? {
            let o = NetworkOptions { rescaled: true, multiplier: 0.8, constraint: 1e-3, ..opts() };
            let a = check_modes(ALGO, &o, &base, &x, false, false)?;
            // Without a bias bypass == rebuild; with one, bypass also rotates the bias.
            let nb = BaseLayer { bias: None, ..base.clone() };
            check_modes(ALGO, &o, &nb, &x, false, true)?;
            let s = state_map(a.as_ref())?;
            let by = crate::networks::adapter_from_tensors(
                ALGO,
                &NetworkOptions { bypass_mode: true, ..o.clone() },
                &base,
                &s,
            )?;
            let b_col = BaseLayer::linear(base.bias.as_ref().unwrap().reshape(((), 1))?, None)?;
            let rotated_bias =
                crate::networks::adapter_from_tensors(ALGO, &o, &b_col, &s)?.merged_weight(&b_col)?.flatten_all()?;
            let want = nb.forward_with(&x, &a.merged_weight(&base)?, Some(&rotated_bias))?;
            assert_close(&by.forward(&base, &x, false)?, &want, 1e-5, "BOFT bypass rotates the bias");
        }
        Ok(())
    }

    #[test]
    fn every_trainable_gets_a_gradient() -> Result<()> {
        check_grads(ALGO, &NetworkOptions { rescaled: true, ..opts() })?;
        check_grads(ALGO, &NetworkOptions { rescaled: true, bypass_mode: true, ..opts() })
    }

    #[test]
    fn fit_reduces_loss_10x() -> Result<()> {
        check_fit(ALGO, &opts(), 200, 0.02, 10.0)?;
        check_fit(ALGO, &NetworkOptions { rescaled: true, ..opts() }, 200, 0.02, 10.0)
    }
}
