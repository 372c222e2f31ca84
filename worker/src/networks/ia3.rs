//! LyCORIS (IA)³ (`lycoris/modules/ia3.py`): a learned per-channel scale.
//!
//! Tensor `weight`, zeros: `(out,)` for Linear, `(1, out, 1, 1)` for Conv2d — or the input
//! width with `train_on_input`. `on_input` (an integer 0-d tensor) records which. No alpha.
//! - Rebuild: W′ = W·(1 + m·w) along the output rows (or input columns); the bias is
//!   untouched.
//! - Bypass: (Wx + b)·(1 + m·w), which also scales the bias — so bypass differs from rebuild
//!   when the layer has a bias; with `train_on_input`, org(x·(1 + m·w)), equal to rebuild.
//! Only module dropout applies.

use std::collections::HashMap;

use candle_core::{bail, DType, Result, Tensor, Var};

use super::common::{required, Ctx, Init};
use super::{Adapter, BaseLayer, NetworkOptions};

pub(crate) struct Ia3 {
    ctx: Ctx,
    weight: Var,
    on_input: bool,
}

fn weight_shape(ctx: &Ctx, on_input: bool) -> Vec<usize> {
    let dim = if on_input { ctx.in_dim() } else { ctx.out_dim() };
    if ctx.is_conv() {
        vec![1, dim, 1, 1]
    } else {
        vec![dim]
    }
}

pub(crate) fn build(opts: &NetworkOptions, base: &BaseLayer, layer: &str) -> Result<Box<dyn Adapter>> {
    let ctx = Ctx::new(opts, base, layer)?;
    let weight = ctx.var(&weight_shape(&ctx, opts.train_on_input), Init::Zeros)?;
    Ok(Box::new(Ia3 { ctx, weight, on_input: opts.train_on_input }))
}

pub(crate) fn from_tensors(
    opts: &NetworkOptions,
    base: &BaseLayer,
    tensors: &HashMap<String, Tensor>,
    layer: &str,
) -> Result<Box<dyn Adapter>> {
    let ctx = Ctx::new(opts, base, layer)?;
    let w = required(tensors, "weight", layer, "IA3")?;
    let on_input = match tensors.get("on_input") {
        Some(t) => t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0] != 0.0,
        None => opts.train_on_input,
    };
    let shape = weight_shape(&ctx, on_input);
    // Accept the flat form for convs as well.
    if w.elem_count() != shape.iter().product::<usize>() {
        bail!(
            "layer {layer}: IA3 `weight` has shape {:?} but this layer needs {:?} (on_input = {on_input})",
            w.dims(),
            shape
        );
    }
    let weight = ctx.var_copy(&w.reshape(shape)?)?;
    Ok(Box::new(Ia3 { ctx, weight, on_input }))
}

impl Ia3 {
    /// 1 + m·w, shaped to broadcast against the weight (rows or columns).
    fn weight_factor(&self, m: f64) -> Result<Tensor> {
        let f = self.weight.as_tensor().flatten_all()?.affine(m, 1.0)?;
        let rank = self.ctx.weight_shape().len();
        let mut shape = vec![1usize; rank];
        if self.on_input {
            shape[1] = f.dim(0)?;
        } else {
            shape[0] = f.dim(0)?;
        }
        f.reshape(shape)
    }

    /// 1 + m·w, shaped to broadcast against activations (last dim for Linear, dim 1 for conv).
    fn activation_factor(&self, m: f64, dtype: DType) -> Result<Tensor> {
        self.weight.as_tensor().affine(m, 1.0)?.to_dtype(dtype)
    }

    fn merged(&self, m: f64) -> Result<Tensor> {
        self.ctx.weight_p()?.broadcast_mul(&self.weight_factor(m)?)
    }
}

impl Adapter for Ia3 {
    fn algo_name(&self) -> &'static str {
        "ia3"
    }

    fn delta_weight(&self) -> Result<Tensor> {
        self.merged(1.0)? - self.ctx.weight_p()?
    }

    fn forward(&self, base: &BaseLayer, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.ctx.module_dropped(train)? {
            return base.forward(x);
        }
        let m = self.ctx.multiplier;
        if self.ctx.bypass {
            let factor = self.activation_factor(m, x.dtype())?;
            return if self.on_input {
                base.forward(&x.broadcast_mul(&factor)?)
            } else {
                base.forward(x)?.broadcast_mul(&factor)
            };
        }
        base.forward_with(x, &self.merged(m)?, base.bias.as_ref())
    }

    fn merged_weight(&self, _base: &BaseLayer) -> Result<Tensor> {
        self.merged(self.ctx.multiplier)
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        vec![("weight".into(), self.weight.clone())]
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            ("weight".into(), self.weight.as_tensor().clone()),
            ("on_input".into(), Tensor::new(self.on_input as i64, &self.ctx.device)?),
        ])
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
    use crate::networks::{adapter_from_tensors, build_adapter, NetworkAlgo};

    const ALGO: NetworkAlgo = NetworkAlgo::Ia3;

    #[test]
    fn shapes_and_naive_delta() -> Result<()> {
        for on_input in [false, true] {
            for (base, _) in standard_cases()? {
                let o = NetworkOptions { train_on_input: on_input, ..Default::default() };
                let a = build_adapter(ALGO, &o, &base, "t")?;
                let s = state_map(a.as_ref())?;
                let dim = if on_input { base.weight.dim(1)? } else { base.weight.dim(0)? };
                if base.weight.rank() == 4 {
                    assert_eq!(s["weight"].dims(), [1, dim, 1, 1]);
                } else {
                    assert_eq!(s["weight"].dims(), [dim]);
                }
                assert_eq!(s["on_input"].dtype(), DType::I64);
                assert_eq!(scalar_of(&s["on_input"])?, on_input as i64 as f64);
                assert_eq!(max_abs(&a.delta_weight()?)?, 0.0);
                randomize(a.as_ref(), 1)?;
                let w = Mat::from_tensor_2d(&base.weight)?;
                let v = state_map(a.as_ref())?["weight"].flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                let kk = base.weight.elem_count() / (base.weight.dim(0)? * base.weight.dim(1)?);
                let mut want = w.clone();
                for r in 0..w.rows {
                    for c in 0..w.cols {
                        let f = if on_input { v[c / kk] } else { v[r] };
                        want.data[r * w.cols + c] = w.at(r, c) * f;
                    }
                }
                assert_mat_close(&a.delta_weight()?, &want, 1e-6, "IA3 ΔW = W·w");
            }
        }
        Ok(())
    }

    #[test]
    fn rebuild_vs_bypass() -> Result<()> {
        for (base, x) in standard_cases()? {
            // On input: rebuild == bypass.
            let o = NetworkOptions { train_on_input: true, multiplier: 0.5, ..Default::default() };
            check_modes(ALGO, &o, &base, &x, false, true)?;
            // On output: rebuild leaves the bias alone, bypass scales it.
            let o = NetworkOptions { multiplier: 0.5, ..Default::default() };
            let a = check_modes(ALGO, &o, &base, &x, false, false)?;
            let s = state_map(a.as_ref())?;
            let by = adapter_from_tensors(ALGO, &NetworkOptions { bypass_mode: true, ..o.clone() }, &base, &s)?;
            let factor = s["weight"].affine(0.5, 1.0)?;
            let y = if base.weight.rank() == 4 {
                base.forward(&x)?.broadcast_mul(&factor)?
            } else {
                base.forward(&x)?.broadcast_mul(&factor)?
            };
            assert_close(&by.forward(&base, &x, false)?, &y, 1e-6, "bypass = (Wx+b)(1+mw)");
            let diff = max_abs(&(by.forward(&base, &x, false)? - a.forward(&base, &x, false)?)?)?;
            assert!(diff > 1e-4, "with a bias, bypass must differ from rebuild");
            // Without a bias they agree.
            let nb = BaseLayer { bias: None, ..base.clone() };
            let r = adapter_from_tensors(ALGO, &o, &nb, &s)?;
            let b = adapter_from_tensors(ALGO, &NetworkOptions { bypass_mode: true, ..o.clone() }, &nb, &s)?;
            assert_close(&b.forward(&nb, &x, false)?, &r.forward(&nb, &x, false)?, 1e-5, "no bias: equal");
        }
        Ok(())
    }

    #[test]
    fn every_trainable_gets_a_gradient() -> Result<()> {
        check_grads(ALGO, &NetworkOptions::default())?;
        check_grads(ALGO, &NetworkOptions { train_on_input: true, bypass_mode: true, ..Default::default() })
    }

    #[test]
    fn fit_reduces_loss_10x() -> Result<()> {
        check_fit(ALGO, &NetworkOptions::default(), 150, 0.02, 10.0)?;
        check_fit(ALGO, &NetworkOptions { train_on_input: true, ..Default::default() }, 150, 0.02, 10.0)
    }
}
