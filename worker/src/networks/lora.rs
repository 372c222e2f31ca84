//! kohya LoRA and kohya LoCon (sd-scripts `networks/lora.py`).
//!
//! Both are the same module: `lora_down` (Linear(in, r), or Conv2d(in, r, k, stride, pad))
//! initialised kaiming-uniform, and `lora_up` (Linear(r, out) or a 1×1 conv) initialised to
//! zero. "LoCon" is LoRA with `conv_dim`, which adds k×k convolutions.
//!
//! Forward (always additive, kohya has no rebuild mode):
//! `y = org(x) + up(drop(down(x)))·m·alpha/r`, with `--network_dropout` after `down`, a
//! `(batch, r)` rank-dropout mask whose scale is multiplied by 1/(1−p), and module dropout.
//! `bypass_mode`, `dora_wd`, `rs_lora` and `use_scalar` do not exist in sd-scripts and are
//! ignored; `orthogonalize` initialises `lora_down` with orthonormal rows.

use std::collections::HashMap;

use candle_core::{bail, Result, Tensor, Var};

use super::common::{
    alpha_from, alpha_tensor, conv_op, element_dropout, expect_shape, linear_op, mm, required, Ctx, Init, RankScale,
};
use super::{Adapter, BaseLayer, LayerKind, NetworkOptions};

pub(crate) struct KohyaLora {
    pub(crate) ctx: Ctx,
    /// `lora_down.weight`: `(r, in)` or `(r, in, kh, kw)`.
    pub(crate) down: Var,
    /// `lora_up.weight`: `(out, r)` or `(out, r, 1, 1)`.
    pub(crate) up: Var,
    pub(crate) rank: usize,
    /// alpha as saved (0 resolved to r).
    pub(crate) alpha: f64,
    /// alpha / r.
    pub(crate) scale: f64,
}

fn shapes(ctx: &Ctx, rank: usize) -> (Vec<usize>, Vec<usize>) {
    match &ctx.kind {
        LayerKind::Conv2d { in_channels, out_channels, kernel, .. } => {
            (vec![rank, *in_channels, kernel.0, kernel.1], vec![*out_channels, rank, 1, 1])
        }
        _ => (vec![rank, ctx.in_dim()], vec![ctx.out_dim(), rank]),
    }
}

pub(crate) fn build(
    opts: &NetworkOptions,
    base: &BaseLayer,
    layer: &str,
    rank: usize,
    alpha: f64,
) -> Result<Box<dyn Adapter>> {
    Ok(Box::new(build_kohya(opts, base, layer, rank, alpha)?))
}

/// A fresh [`KohyaLora`] (the concrete type, for adapters built from several).
pub(crate) fn build_kohya(opts: &NetworkOptions, base: &BaseLayer, layer: &str, rank: usize, alpha: f64) -> Result<KohyaLora> {
    let ctx = Ctx::new(opts, base, layer)?;
    if rank == 0 {
        bail!("layer {layer}: LoRA rank must be at least 1");
    }
    let (down_shape, up_shape) = shapes(&ctx, rank);
    let down = ctx.var(&down_shape, Init::down(opts.orthogonalize))?;
    let up = ctx.var(&up_shape, Init::Zeros)?;
    let alpha = if alpha == 0.0 { rank as f64 } else { alpha };
    Ok(KohyaLora { ctx, down, up, rank, alpha, scale: alpha / rank as f64 })
}

pub(crate) fn from_tensors(
    opts: &NetworkOptions,
    base: &BaseLayer,
    tensors: &HashMap<String, Tensor>,
    layer: &str,
) -> Result<Box<dyn Adapter>> {
    Ok(Box::new(kohya_from_tensors(opts, base, tensors, layer)?))
}

/// A [`KohyaLora`] from saved tensors (the concrete type, for adapters built from several).
pub(crate) fn kohya_from_tensors(opts: &NetworkOptions, base: &BaseLayer, tensors: &HashMap<String, Tensor>, layer: &str) -> Result<KohyaLora> {
    let ctx = Ctx::new(opts, base, layer)?;
    let down = required(tensors, "lora_down.weight", layer, "LoRA")?;
    let up = required(tensors, "lora_up.weight", layer, "LoRA")?;
    let rank = down.dim(0)?;
    let (down_shape, up_shape) = shapes(&ctx, rank);
    expect_shape(down, &down_shape, "lora_down.weight", layer)?;
    // Accept a 2-D up for convs too (some tools save it flat).
    let up = if up.dims() != up_shape.as_slice() && up.elem_count() == up_shape.iter().product::<usize>() {
        up.reshape(up_shape.clone())?
    } else {
        up.clone()
    };
    expect_shape(&up, &up_shape, "lora_up.weight", layer)?;
    let RankScale { scale, saved_alpha } = RankScale::from_saved(rank, alpha_from(tensors)?);
    Ok(KohyaLora { down: ctx.var_copy(down)?, up: ctx.var_copy(&up)?, ctx, rank, alpha: saved_alpha, scale })
}

impl KohyaLora {
    /// `up(drop(down(x)))·m·alpha/r`: what the adapter adds to the layer's output.
    pub(crate) fn lora_path(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let down = self.down.as_tensor().to_dtype(x.dtype())?;
        let up = self.up.as_tensor().to_dtype(x.dtype())?;
        let mut lx = match &self.ctx.kind {
            LayerKind::Conv2d { stride, padding, .. } => conv_op(x, &down, None, *stride, *padding)?,
            _ => linear_op(x, &down, None)?,
        };
        if train && self.ctx.drops.dropout > 0.0 {
            lx = element_dropout(&lx, self.ctx.drops.dropout)?;
        }
        let mut scale = self.scale;
        let p = self.ctx.drops.rank_dropout;
        if train && p > 0.0 {
            // kohya: a (batch, r) keep-mask; the scale grows by 1/(1−p) as if the rank shrank.
            let batch = lx.dim(0)?;
            let mask = self.ctx.rng.keep_mask(batch * self.rank, p)?;
            let mask = Tensor::from_vec(mask, (batch, self.rank), lx.device())?.to_dtype(lx.dtype())?;
            let mask = match lx.rank() {
                4 => mask.reshape((batch, self.rank, 1, 1))?,
                3 => mask.reshape((batch, 1, self.rank))?,
                _ => mask,
            };
            lx = lx.broadcast_mul(&mask)?;
            scale /= 1.0 - p;
        }
        let ly = match &self.ctx.kind {
            LayerKind::Conv2d { .. } => conv_op(&lx, &up, None, 1, 0)?,
            _ => linear_op(&lx, &up, None)?,
        };
        ly.affine(self.ctx.multiplier * scale, 0.0)
    }
}

impl Adapter for KohyaLora {
    fn algo_name(&self) -> &'static str {
        if self.ctx.is_conv() && self.ctx.kernel_dims() != [1, 1] {
            "locon"
        } else {
            "lora"
        }
    }

    fn delta_weight(&self) -> Result<Tensor> {
        mm(self.up.as_tensor(), self.down.as_tensor())?.reshape(self.ctx.weight_shape())?.affine(self.scale, 0.0)
    }

    fn forward(&self, base: &BaseLayer, x: &Tensor, train: bool) -> Result<Tensor> {
        let org = base.forward(x)?;
        if self.ctx.module_dropped(train)? {
            return Ok(org);
        }
        org + self.lora_path(x, train)?
    }

    fn merged_weight(&self, _base: &BaseLayer) -> Result<Tensor> {
        self.ctx.weight_p()? + self.delta_weight()?.affine(self.ctx.multiplier, 0.0)?
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        vec![("lora_down.weight".into(), self.down.clone()), ("lora_up.weight".into(), self.up.clone())]
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            ("lora_down.weight".into(), self.down.as_tensor().clone()),
            ("lora_up.weight".into(), self.up.as_tensor().clone()),
            ("alpha".into(), alpha_tensor(self.alpha, &self.ctx.device)?),
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
    use crate::networks::common::layer_op;
    use crate::networks::testutil::*;
    use crate::networks::{build_adapter, NetworkAlgo};

    fn rebuild_reference(base: &BaseLayer, adapter: &dyn Adapter, x: &Tensor) -> Result<Tensor> {
        let w = adapter.merged_weight(base)?;
        layer_op(&base.kind, x, &w, base.bias.as_ref())
    }

    fn opts(rank: usize, alpha: f64) -> NetworkOptions {
        NetworkOptions { dim: rank, alpha, conv_dim: Some(rank), conv_alpha: Some(alpha), ..Default::default() }
    }

    #[test]
    fn shapes_names_and_zero_init() -> Result<()> {
        for (base, down, up) in [
            (linear_base(12, 10, true, 1)?, vec![4, 12], vec![10, 4]),
            (conv_base(6, 8, 1, 1, 0, true, 2)?, vec![4, 6, 1, 1], vec![8, 4, 1, 1]),
            (conv_base(6, 8, 3, 2, 1, true, 3)?, vec![4, 6, 3, 3], vec![8, 4, 1, 1]),
        ] {
            let a = build_adapter(NetworkAlgo::Locon, &opts(4, 2.0), &base, "t")?;
            let state = state_map(a.as_ref())?;
            assert_eq!(state["lora_down.weight"].dims(), down.as_slice());
            assert_eq!(state["lora_up.weight"].dims(), up.as_slice());
            assert_eq!(scalar_of(&state["alpha"])?, 2.0);
            // up starts at zero, so the adapter starts as the identity.
            assert_eq!(max_abs(&a.delta_weight()?)?, 0.0);
            let names: Vec<String> = a.trainable().into_iter().map(|(n, _)| n).collect();
            assert_eq!(names, ["lora_down.weight", "lora_up.weight"]);
        }
        Ok(())
    }

    #[test]
    fn kohya_lora_needs_conv_dim_for_3x3() -> Result<()> {
        let base = conv_base(6, 8, 3, 1, 1, false, 4)?;
        let o = NetworkOptions { dim: 4, ..Default::default() };
        let err = build_adapter(NetworkAlgo::Lora, &o, &base, "unet.conv1").err().expect("must fail");
        let msg = err.to_string();
        assert!(msg.contains("unet.conv1") && msg.contains("conv_dim"), "{msg}");
        // 1×1 convs use the linear dim.
        let base = conv_base(6, 8, 1, 1, 0, false, 4)?;
        assert!(build_adapter(NetworkAlgo::Lora, &o, &base, "proj").is_ok());
        Ok(())
    }

    #[test]
    fn delta_matches_naive_matmul() -> Result<()> {
        for base in [linear_base(7, 5, false, 11)?, conv_base(3, 5, 3, 1, 1, false, 12)?] {
            let a = build_adapter(NetworkAlgo::Locon, &opts(3, 1.5), &base, "t")?;
            randomize(a.as_ref(), 7)?;
            let s = state_map(a.as_ref())?;
            let up = Mat::from_tensor_2d(&s["lora_up.weight"])?;
            let down = Mat::from_tensor_2d(&s["lora_down.weight"])?;
            let want = up.matmul(&down).scale(1.5 / 3.0);
            assert_mat_close(&a.delta_weight()?, &want, 1e-5, "kohya ΔW");
        }
        Ok(())
    }

    #[test]
    fn forward_equals_rebuilt_layer() -> Result<()> {
        for (base, x) in [
            (linear_base(7, 5, true, 21)?, randn(&[2, 3, 7], 22)?),
            (conv_base(3, 5, 1, 1, 0, true, 23)?, randn(&[2, 3, 6, 6], 24)?),
            (conv_base(3, 5, 3, 2, 1, true, 25)?, randn(&[2, 3, 7, 7], 26)?),
        ] {
            let mut a = build_adapter(NetworkAlgo::Locon, &opts(3, 2.0), &base, "t")?;
            randomize(a.as_ref(), 8)?;
            a.set_multiplier(0.7);
            let y = a.forward(&base, &x, false)?;
            let want = rebuild_reference(&base, a.as_ref(), &x)?;
            assert_close(&y, &want, 1e-5, "kohya forward vs W + mΔW");
        }
        Ok(())
    }

    #[test]
    fn every_trainable_gets_a_gradient() -> Result<()> {
        for (base, x) in [
            (linear_base(7, 5, true, 31)?, randn(&[4, 7], 32)?),
            (conv_base(3, 5, 3, 2, 1, true, 33)?, randn(&[2, 3, 7, 7], 34)?),
        ] {
            let a = build_adapter(NetworkAlgo::Locon, &opts(3, 2.0), &base, "t")?;
            randomize(a.as_ref(), 9)?;
            assert_all_grads_nonzero(a.as_ref(), &base, &x)?;
        }
        Ok(())
    }

    #[test]
    fn dropouts_only_in_training() -> Result<()> {
        let base = linear_base(16, 16, true, 41)?;
        let o = NetworkOptions { dim: 8, alpha: 8.0, dropout: 0.5, rank_dropout: 0.5, ..Default::default() };
        let a = build_adapter(NetworkAlgo::Lora, &o, &base, "t")?;
        randomize(a.as_ref(), 10)?;
        let x = randn(&[4, 16], 42)?;
        let eval1 = a.forward(&base, &x, false)?;
        let eval2 = a.forward(&base, &x, false)?;
        assert_close(&eval1, &eval2, 0.0, "eval is deterministic");
        let train = a.forward(&base, &x, true)?;
        assert!(max_abs(&(train - &eval1)?)? > 1e-4, "training output must see dropout");
        Ok(())
    }

    #[test]
    fn fit_reduces_loss_10x() -> Result<()> {
        // Plain Adam toward a random teacher of the same shape; loss must fall ≥ 10×.
        for (base, x) in [
            (linear_base(12, 10, true, 51)?, randn(&[16, 12], 52)?),
            (conv_base(4, 6, 3, 1, 1, true, 53)?, randn(&[4, 4, 6, 6], 54)?),
        ] {
            let o = opts(4, 4.0);
            let teacher = build_adapter(NetworkAlgo::Locon, &o, &base, "teacher")?;
            randomize(teacher.as_ref(), 11)?;
            let student = build_adapter(NetworkAlgo::Locon, &o, &base, "student")?;
            let (first, last) = fit(student.as_ref(), teacher.as_ref(), &base, &x, 150, 0.02)?;
            assert!(last * 10.0 <= first, "loss {first} → {last}");
        }
        Ok(())
    }
}
