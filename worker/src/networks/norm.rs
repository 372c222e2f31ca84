//! `train_norm` (LyCORIS `modules/norms.py`): LayerNorm / GroupNorm weight and bias get
//! trainable offsets `w_norm`, `b_norm` (zeros): W′ = W + m·w_norm, b′ = b + m·b_norm.
//!
//! The norms themselves are `crate::ops`' (candle's fused `layer_norm` has no backward).

use std::collections::HashMap;

use candle_core::{Result, Tensor, Var};

use super::common::{expect_shape, required, Ctx, Init};
use super::{Adapter, BaseLayer, NetworkOptions};

/// LayerNorm over the last dimension: `(x − mean)/√(var + eps)·w + b` (biased variance); see
/// [`crate::ops::layer_norm`].
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    crate::ops::layer_norm(x, weight, bias, eps)
}

/// GroupNorm over `(B, C, …)`: statistics per (sample, group), then a per-channel affine; see
/// [`crate::ops::group_norm`].
pub fn group_norm(x: &Tensor, groups: usize, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    crate::ops::group_norm(x, groups, weight, bias, eps)
}

pub(crate) struct NormAdapter {
    ctx: Ctx,
    w_norm: Var,
    b_norm: Option<Var>,
}

impl NormAdapter {
    pub fn new(opts: &NetworkOptions, base: &BaseLayer, layer: &str) -> Result<Self> {
        let ctx = Ctx::new(opts, base, layer)?;
        let c = ctx.out_dim();
        let w_norm = ctx.var(&[c], Init::Zeros)?;
        let b_norm = if base.bias.is_some() { Some(ctx.var(&[c], Init::Zeros)?) } else { None };
        Ok(Self { ctx, w_norm, b_norm })
    }

    pub fn from_tensors(
        opts: &NetworkOptions,
        base: &BaseLayer,
        tensors: &HashMap<String, Tensor>,
        layer: &str,
    ) -> Result<Self> {
        let ctx = Ctx::new(opts, base, layer)?;
        let c = ctx.out_dim();
        let w = required(tensors, "w_norm", layer, "train_norm")?;
        expect_shape(w, &[c], "w_norm", layer)?;
        let b_norm = match tensors.get("b_norm") {
            Some(b) => {
                expect_shape(b, &[c], "b_norm", layer)?;
                Some(ctx.var_copy(b)?)
            }
            None => None,
        };
        Ok(Self { w_norm: ctx.var_copy(w)?, ctx, b_norm })
    }

    /// (W′, b′) at the current multiplier; with rank dropout while training, the offsets of
    /// dropped channels are zeroed (LyCORIS keeps a channel with probability p — inverted).
    fn merged(&self, train: bool) -> Result<(Tensor, Option<Tensor>)> {
        let m = self.ctx.multiplier;
        let c = self.ctx.out_dim();
        let mask = self.ctx.rank_mask(c, train)?;
        let offset = |v: &Var| -> Result<Tensor> {
            let t = v.as_tensor().affine(m, 0.0)?;
            match &mask {
                Some(mask) => t.mul(mask),
                None => Ok(t),
            }
        };
        let w = (self.ctx.weight_p()? + offset(&self.w_norm)?)?;
        let b = match (self.ctx.bias_p()?, &self.b_norm) {
            (Some(b), Some(bn)) => Some((b + offset(bn)?)?),
            (b, _) => b,
        };
        Ok((w, b))
    }
}

impl Adapter for NormAdapter {
    fn algo_name(&self) -> &'static str {
        "norm"
    }

    fn delta_weight(&self) -> Result<Tensor> {
        Ok(self.w_norm.as_tensor().clone())
    }

    fn delta_bias(&self) -> Result<Option<Tensor>> {
        Ok(self.b_norm.as_ref().map(|b| b.as_tensor().clone()))
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
        let mut v = vec![("w_norm".to_string(), self.w_norm.clone())];
        if let Some(b) = &self.b_norm {
            v.push(("b_norm".to_string(), b.clone()));
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
    use crate::networks::{adapter_from_tensors, build_adapter, LayerKind, NetworkAlgo};

    fn norm_bases() -> Result<Vec<(BaseLayer, Tensor)>> {
        let ln = BaseLayer {
            kind: LayerKind::LayerNorm { features: 8, eps: 1e-5 },
            weight: (randn(&[8], 1)?.affine(0.1, 1.0))?,
            bias: Some((randn(&[8], 2)? * 0.1)?),
        };
        let gn = BaseLayer {
            kind: LayerKind::GroupNorm { groups: 2, channels: 8, eps: 1e-5 },
            weight: (randn(&[8], 3)?.affine(0.1, 1.0))?,
            bias: Some((randn(&[8], 4)? * 0.1)?),
        };
        Ok(vec![(ln, randn(&[3, 5, 8], 5)?), (gn, randn(&[2, 8, 4, 4], 6)?)])
    }

    #[test]
    fn norms_match_a_naive_computation() -> Result<()> {
        // LayerNorm on a 2×4 input, by hand.
        let x = Tensor::new(&[[1f32, 2., 3., 4.], [2., 2., 2., 6.]], &dev())?;
        let w = Tensor::new(&[1f32, 2., 1., 1.], &dev())?;
        let b = Tensor::new(&[0f32, 0., 1., 0.], &dev())?;
        let y = layer_norm(&x, &w, Some(&b), 0.0)?;
        let row = |v: [f64; 4]| {
            let mean = v.iter().sum::<f64>() / 4.0;
            let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / 4.0;
            let wb = [(1.0, 0.0), (2.0, 0.0), (1.0, 1.0), (1.0, 0.0)];
            (0..4).map(|i| (v[i] - mean) / var.sqrt() * wb[i].0 + wb[i].1).collect::<Vec<f64>>()
        };
        let want: Vec<f64> = [row([1., 2., 3., 4.]), row([2., 2., 2., 6.])].concat();
        assert_mat_close(&y, &Mat::new(2, 4, want), 1e-6, "layer_norm");
        // GroupNorm with one channel per group equals per-channel instance norm.
        let x = randn(&[2, 4, 3, 3], 9)?;
        let ones = Tensor::ones(4, candle_core::DType::F32, &dev())?;
        let y = group_norm(&x, 4, &ones, None, 0.0)?;
        let per_channel = x.reshape((8, 9))?;
        let want = layer_norm(&per_channel, &Tensor::ones(9, candle_core::DType::F32, &dev())?, None, 0.0)?;
        assert_close(&y.reshape((8, 9))?, &want, 1e-5, "group_norm");
        Ok(())
    }

    #[test]
    fn train_norm_offsets_weight_and_bias() -> Result<()> {
        let o = NetworkOptions { train_norm: true, multiplier: 0.5, ..Default::default() };
        for (base, x) in norm_bases()? {
            let a = build_adapter(NetworkAlgo::Lora, &o, &base, "norm")?;
            assert_eq!(a.algo_name(), "norm");
            // zeros at start
            assert_close(&a.forward(&base, &x, false)?, &base.forward(&x)?, 0.0, "identity at init");
            randomize(a.as_ref(), 3)?;
            let s = state_map(a.as_ref())?;
            let w = (&base.weight + (&s["w_norm"] * 0.5)?)?;
            let b = (base.bias.as_ref().unwrap() + (&s["b_norm"] * 0.5)?)?;
            assert_close(&a.merged_weight(&base)?, &w, 1e-6, "W′");
            assert_close(&a.forward(&base, &x, false)?, &base.forward_with(&x, &w, Some(&b))?, 1e-6, "forward");
            assert_all_grads_nonzero(a.as_ref(), &base, &x)?;
            // reload
            let b2 = adapter_from_tensors(NetworkAlgo::Lora, &o, &base, &s)?;
            assert_close(&b2.forward(&base, &x, false)?, &a.forward(&base, &x, false)?, 0.0, "reload");
        }
        Ok(())
    }

    #[test]
    fn norm_without_train_norm_is_an_error() -> Result<()> {
        let (base, _) = norm_bases()?.remove(0);
        let err = build_adapter(NetworkAlgo::Lora, &NetworkOptions::default(), &base, "ln_1").err().unwrap();
        assert!(err.to_string().contains("ln_1") && err.to_string().contains("train_norm"));
        Ok(())
    }

    #[test]
    fn fit_reduces_loss_10x() -> Result<()> {
        let o = NetworkOptions { train_norm: true, ..Default::default() };
        for (base, x) in norm_bases()? {
            let teacher = build_adapter(NetworkAlgo::Lora, &o, &base, "teacher")?;
            randomize(teacher.as_ref(), 5)?;
            let student = build_adapter(NetworkAlgo::Lora, &o, &base, "student")?;
            let (first, last) = fit(student.as_ref(), teacher.as_ref(), &base, &x, 100, 0.02)?;
            assert!(last * 10.0 <= first, "loss {first} → {last}");
        }
        Ok(())
    }
}
