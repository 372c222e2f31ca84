//! LyCORIS FULL (`lycoris/modules/full.py`): train the layer's whole weight (and bias).
//!
//! Loft trains the difference directly: `diff` (weight-shaped) and `diff_b` (when the layer
//! has a bias), both starting at zero, with W′ = W + m·diff and b′ = b + m·diff_b. This has
//! the same gradients as training W itself, saves exactly what LyCORIS saves (`diff`,
//! `diff_b`), and applies the multiplier once (LyCORIS multiplies the diff twice when
//! m ≠ 1). One difference: an optimizer's weight decay now pulls toward the base weight
//! instead of toward zero. Rank dropout masks output rows of both; no bypass mode.

use std::collections::HashMap;

use candle_core::{bail, Result, Tensor, Var};

use super::common::{expect_shape, required, Ctx, Init};
use super::{Adapter, BaseLayer, NetworkOptions};

pub(crate) struct Full {
    ctx: Ctx,
    diff: Var,
    diff_b: Option<Var>,
}

pub(crate) fn build(opts: &NetworkOptions, base: &BaseLayer, layer: &str) -> Result<Box<dyn Adapter>> {
    let ctx = Ctx::new(opts, base, layer)?;
    if opts.bypass_mode {
        bail!("layer {layer}: full supports rebuild mode only; turn bypass_mode off");
    }
    let diff = ctx.var(&ctx.weight_shape(), Init::Zeros)?;
    let diff_b = if base.bias.is_some() { Some(ctx.var(&[ctx.out_dim()], Init::Zeros)?) } else { None };
    Ok(Box::new(Full { ctx, diff, diff_b }))
}

pub(crate) fn from_tensors(
    opts: &NetworkOptions,
    base: &BaseLayer,
    tensors: &HashMap<String, Tensor>,
    layer: &str,
) -> Result<Box<dyn Adapter>> {
    let ctx = Ctx::new(opts, base, layer)?;
    if opts.bypass_mode {
        bail!("layer {layer}: full supports rebuild mode only; turn bypass_mode off");
    }
    let diff = required(tensors, "diff", layer, "FULL")?;
    expect_shape(diff, &ctx.weight_shape(), "diff", layer)?;
    let diff_b = match tensors.get("diff_b") {
        Some(b) => {
            expect_shape(b, &[ctx.out_dim()], "diff_b", layer)?;
            Some(ctx.var_copy(b)?)
        }
        None => None,
    };
    Ok(Box::new(Full { diff: ctx.var_copy(diff)?, ctx, diff_b }))
}

impl Full {
    fn merged(&self, train: bool) -> Result<(Tensor, Option<Tensor>)> {
        let m = self.ctx.multiplier;
        let out = self.ctx.out_dim();
        let mask = self.ctx.rank_mask(out, train)?;
        let mut dw = self.diff.as_tensor().affine(m, 0.0)?;
        let mut db = self.diff_b.as_ref().map(|b| b.as_tensor().affine(m, 0.0)).transpose()?;
        if let Some(mask) = &mask {
            let mut shape = vec![1usize; dw.rank()];
            shape[0] = out;
            dw = dw.broadcast_mul(&mask.reshape(shape)?)?;
            db = db.map(|b| b.mul(mask)).transpose()?;
        }
        let w = (self.ctx.weight_p()? + dw)?;
        let b = match (self.ctx.bias_p()?, db) {
            (Some(b), Some(d)) => Some((b + d)?),
            (None, Some(d)) => Some(d),
            (b, None) => b,
        };
        Ok((w, b))
    }
}

impl Adapter for Full {
    fn algo_name(&self) -> &'static str {
        "full"
    }

    fn delta_weight(&self) -> Result<Tensor> {
        Ok(self.diff.as_tensor().clone())
    }

    fn delta_bias(&self) -> Result<Option<Tensor>> {
        Ok(self.diff_b.as_ref().map(|b| b.as_tensor().clone()))
    }

    fn forward(&self, base: &BaseLayer, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.ctx.module_dropped(train)? {
            return base.forward(x);
        }
        let (w, b) = self.merged(train)?;
        base.forward_with(x, &w, b.as_ref())
    }

    fn merged_weight(&self, _base: &BaseLayer) -> Result<Tensor> {
        Ok(self.merged(false)?.0)
    }

    fn merged_bias(&self, _base: &BaseLayer) -> Result<Option<Tensor>> {
        Ok(self.merged(false)?.1)
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        let mut v = vec![("diff".to_string(), self.diff.clone())];
        if let Some(b) = &self.diff_b {
            v.push(("diff_b".into(), b.clone()));
        }
        v
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.trainable().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect())
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

    const ALGO: NetworkAlgo = NetworkAlgo::Full;

    #[test]
    fn shapes_delta_and_multiplier_once() -> Result<()> {
        for (base, x) in standard_cases()? {
            let o = NetworkOptions { multiplier: 0.5, ..Default::default() };
            let a = build_adapter(ALGO, &o, &base, "t")?;
            let s = state_map(a.as_ref())?;
            assert_eq!(s["diff"].dims(), base.weight.dims());
            assert_eq!(s["diff_b"].dims(), [base.weight.dim(0)?]);
            let a = check_modes(ALGO, &o, &base, &x, true, false)?;
            let s = state_map(a.as_ref())?;
            let want_b = (base.bias.as_ref().unwrap() + (&s["diff_b"] * 0.5)?)?;
            assert_close(&a.merged_bias(&base)?.unwrap(), &want_b, 1e-6, "b′ = b + m·diff_b");
            assert_close(&a.delta_weight()?, &s["diff"], 0.0, "ΔW = diff");
        }
        Ok(())
    }

    #[test]
    fn bypass_is_rejected() {
        let (base, _) = standard_cases().unwrap().remove(0);
        let o = NetworkOptions { bypass_mode: true, ..Default::default() };
        let msg = build_adapter(ALGO, &o, &base, "conv_in").err().unwrap().to_string();
        assert!(msg.contains("conv_in") && msg.contains("rebuild mode only"), "{msg}");
    }

    #[test]
    fn every_trainable_gets_a_gradient() -> Result<()> {
        check_grads(ALGO, &NetworkOptions::default())
    }

    #[test]
    fn fit_reduces_loss_10x() -> Result<()> {
        check_fit(ALGO, &NetworkOptions::default(), 150, 0.02, 10.0)
    }
}
