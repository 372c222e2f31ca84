//! DyLoRA (LyCORIS `lycoris/modules/dylora.py`, `block_size`; kohya's `unit`): a LoRA whose
//! rank is trained in nested blocks so that any prefix of `block_size`-wide blocks works on
//! its own.
//!
//! Tensors: `lora_up.weight` (out, r) and `lora_down.weight` (r, in·kh·kw), r = n·block_size;
//! down kaiming, up zeros. They are single tensors (the n blocks are column/row ranges), so
//! the saved names are also the trained names.
//!
//! Each training step draws a block b uniformly from 0..n; blocks below b are detached (they
//! no longer learn), block b learns, blocks above b are unused, and
//! ΔW = up[:, :(b+1)·bs] @ down[:(b+1)·bs] · alpha/((b+1)·bs).
//!
//! # Which scale Loft trains with
//! Loft uses alpha/(active rank), the LoRA convention at every rank. At full rank this is
//! alpha/r — exactly what every loader (LyCORIS, ComfyUI, A1111) computes from the saved
//! `alpha`, so the saved file reproduces what training showed. LyCORIS's module instead
//! divides by the number of active *blocks*, alpha/(b+1), i.e. block_size× more than its own
//! files load with; a LyCORIS DyLoRA trained with alpha = A behaves like a Loft one with
//! alpha = A·block_size. Outside training (eval, merging, saving) the full rank is used.
//!
//! Files: `lora_down.weight` is saved as (r, in, kh, kw) for convs and `lora_up.weight` as
//! (out, r, 1, 1) — the plain LoCon layout, which LyCORIS, ComfyUI and A1111 load (LyCORIS
//! saves a 2-D up for convs, which its own loader cannot read back). 2-D ups are accepted on
//! load. Dropouts other than module dropout are not used (as upstream).

use std::collections::HashMap;

use candle_core::{bail, Result, Tensor, Var};

use super::common::{
    alpha_from, alpha_tensor, conv_op, linear_op, required, Ctx, Init, LowRankAdapter, LowRankDelta, RankScale,
};
use super::{Adapter, BaseLayer, LayerKind, NetworkOptions};

pub(crate) struct DyloraDelta {
    /// (out, r)
    up: Var,
    /// (r, in·kh·kw)
    down: Var,
    rank: usize,
    block_size: usize,
    /// alpha as saved (0 resolved to r).
    alpha: f64,
}

pub(crate) fn build(
    opts: &NetworkOptions,
    base: &BaseLayer,
    layer: &str,
    rank: usize,
    alpha: f64,
) -> Result<Box<dyn Adapter>> {
    let ctx = Ctx::new(opts, base, layer)?;
    check_blocks(layer, rank, opts.block_size)?;
    // Kaiming on the flat (r, in·kk) view has the same fan-in as the conv weight.
    let down = ctx.var(&[rank, ctx.in_flat()], Init::Kaiming)?;
    let up = ctx.var(&[ctx.out_dim(), rank], Init::Zeros)?;
    let alpha = if alpha == 0.0 { rank as f64 } else { alpha };
    let src = DyloraDelta { up, down, rank, block_size: opts.block_size, alpha };
    Ok(Box::new(LowRankAdapter { ctx, dora: None, src }))
}

fn check_blocks(layer: &str, rank: usize, block_size: usize) -> Result<()> {
    if block_size == 0 || rank == 0 || rank % block_size != 0 {
        bail!("layer {layer}: DyLoRA needs the rank ({rank}) to be a positive multiple of block_size ({block_size})");
    }
    Ok(())
}

pub(crate) fn from_tensors(
    opts: &NetworkOptions,
    base: &BaseLayer,
    tensors: &HashMap<String, Tensor>,
    layer: &str,
) -> Result<Box<dyn Adapter>> {
    let ctx = Ctx::new(opts, base, layer)?;
    let up = required(tensors, "lora_up.weight", layer, "DyLoRA")?.flatten_from(1)?;
    let down = required(tensors, "lora_down.weight", layer, "DyLoRA")?.flatten_from(1)?;
    let rank = down.dim(0)?;
    if up.dims() != [ctx.out_dim(), rank] || down.dims() != [rank, ctx.in_flat()] {
        bail!(
            "layer {layer}: DyLoRA tensors have up {:?} and down {:?}; this layer needs [{}, r] and [r, {}]",
            up.dims(),
            down.dims(),
            ctx.out_dim(),
            ctx.in_flat()
        );
    }
    check_blocks(layer, rank, opts.block_size)?;
    let alpha = RankScale::from_saved(rank, alpha_from(tensors)?).saved_alpha;
    let src =
        DyloraDelta { up: ctx.var_copy(&up)?, down: ctx.var_copy(&down)?, rank, block_size: opts.block_size, alpha };
    Ok(Box::new(LowRankAdapter { ctx, dora: None, src }))
}

impl DyloraDelta {
    /// (up, down, scale) for this step: a random block prefix while training (lower blocks
    /// detached), the full rank otherwise.
    fn factors(&self, ctx: &Ctx, train: bool) -> Result<(Tensor, Tensor, f64)> {
        let up = self.up.as_tensor();
        let down = self.down.as_tensor();
        if !train {
            return Ok((up.clone(), down.clone(), self.alpha / self.rank as f64));
        }
        let blocks = self.rank / self.block_size;
        let b = ctx.rng.below(blocks)?;
        let frozen = b * self.block_size;
        let active = frozen + self.block_size;
        let up_live = up.narrow(1, frozen, self.block_size)?;
        let down_live = down.narrow(0, frozen, self.block_size)?;
        let (up_used, down_used) = if frozen == 0 {
            (up_live, down_live)
        } else {
            (
                Tensor::cat(&[&up.narrow(1, 0, frozen)?.detach(), &up_live], 1)?,
                Tensor::cat(&[&down.narrow(0, 0, frozen)?.detach(), &down_live], 0)?,
            )
        };
        Ok((up_used, down_used, self.alpha / active as f64))
    }
}

impl LowRankDelta for DyloraDelta {
    fn algo_name(&self) -> &'static str {
        "dylora"
    }

    fn delta(&self, ctx: &Ctx, train: bool) -> Result<Tensor> {
        let (up, down, scale) = self.factors(ctx, train)?;
        up.matmul(&down)?.affine(scale, 0.0)?.reshape(ctx.weight_shape())
    }

    fn bypass_delta(&self, ctx: &Ctx, x: &Tensor, train: bool) -> Result<Tensor> {
        let (up, down, scale) = self.factors(ctx, train)?;
        let (up, down) = (up.to_dtype(x.dtype())?, down.to_dtype(x.dtype())?);
        let r = down.dim(0)?;
        let y = match &ctx.kind {
            LayerKind::Conv2d { in_channels, out_channels, kernel, stride, padding } => {
                let down = down.reshape((r, *in_channels, kernel.0, kernel.1))?;
                let h = conv_op(x, &down, None, *stride, *padding)?;
                conv_op(&h, &up.reshape((*out_channels, r, 1, 1))?, None, 1, 0)?
            }
            _ => linear_op(&linear_op(x, &down, None)?, &up, None)?,
        };
        y.affine(scale, 0.0)
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("lora_down.weight".into(), self.down.clone()), ("lora_up.weight".into(), self.up.clone())]
    }

    fn state(&self, ctx: &Ctx) -> Result<Vec<(String, Tensor)>> {
        let shape = ctx.weight_shape();
        let mut down_shape = vec![self.rank];
        down_shape.extend_from_slice(&shape[1..]);
        let mut up_shape = vec![shape[0], self.rank];
        up_shape.extend(ctx.kernel_dims().iter().map(|_| 1));
        Ok(vec![
            ("lora_down.weight".into(), self.down.as_tensor().reshape(down_shape)?),
            ("lora_up.weight".into(), self.up.as_tensor().reshape(up_shape)?),
            ("alpha".into(), alpha_tensor(self.alpha, &ctx.device)?),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::networks::testutil::*;
    use crate::networks::{adapter_from_tensors, build_adapter, NetworkAlgo};

    const ALGO: NetworkAlgo = NetworkAlgo::Dylora;

    fn opts() -> NetworkOptions {
        NetworkOptions { dim: 4, alpha: 2.0, block_size: 2, ..Default::default() }
    }

    #[test]
    fn shapes_and_full_rank_delta() -> Result<()> {
        for (base, x) in standard_cases()? {
            let a = build_adapter(ALGO, &opts(), &base, "t")?;
            let s = state_map(a.as_ref())?;
            let w = base.weight.dims();
            let mut down = vec![4];
            down.extend_from_slice(&w[1..]);
            assert_eq!(s["lora_down.weight"].dims(), down.as_slice());
            assert_eq!(s["lora_up.weight"].dim(0)?, w[0]);
            assert_eq!(s["lora_up.weight"].dim(1)?, 4);
            assert_eq!(max_abs(&a.delta_weight()?)?, 0.0);
            randomize(a.as_ref(), 1)?;
            let s = state_map(a.as_ref())?;
            let want = Mat::from_tensor_2d(&s["lora_up.weight"])?
                .matmul(&Mat::from_tensor_2d(&s["lora_down.weight"])?)
                .scale(2.0 / 4.0);
            assert_mat_close(&a.delta_weight()?, &want, 1e-5, "DyLoRA ΔW at full rank = alpha/r");
            // The saved file is a plain LoCon file: LyCORIS LoCon reads the same ΔW.
            let locon = adapter_from_tensors(NetworkAlgo::LycorisLocon, &NetworkOptions::default(), &base, &s)?;
            assert_close(&locon.delta_weight()?, &a.delta_weight()?, 1e-6, "loads as LoCon");
            check_modes(ALGO, &NetworkOptions { multiplier: 0.5, ..opts() }, &base, &x, true, true)?;
        }
        Ok(())
    }

    #[test]
    fn training_uses_a_random_block_prefix_with_scale_alpha_over_active_rank() -> Result<()> {
        let (base, x) = standard_cases()?.remove(0);
        let a = build_adapter(ALGO, &opts(), &base, "t")?;
        randomize(a.as_ref(), 2)?;
        let s = state_map(a.as_ref())?;
        let up = Mat::from_tensor_2d(&s["lora_up.weight"])?;
        let down = Mat::from_tensor_2d(&s["lora_down.weight"])?;
        // Candidate outputs: prefix of 2 ranks (scale 2/2) or all 4 (scale 2/4).
        let prefix = |k: usize| -> Result<Tensor> {
            let u = Mat::new(
                up.rows,
                k,
                (0..up.rows).flat_map(|r| (0..k).map(move |c| (r, c))).map(|(r, c)| up.at(r, c)).collect(),
            );
            let d = Mat::new(k, down.cols, down.data[..k * down.cols].to_vec());
            let dw = u.matmul(&d).scale(2.0 / k as f64);
            let dw =
                Tensor::from_vec(dw.data.iter().map(|v| *v as f32).collect::<Vec<_>>(), base.weight.dims(), &dev())?;
            base.forward_with(&x, &(&base.weight + dw)?, base.bias.as_ref())
        };
        let (y2, y4) = (prefix(2)?, prefix(4)?);
        let mut seen = [false, false];
        for _ in 0..40 {
            let y = a.forward(&base, &x, true)?;
            let d2 = max_abs(&(&y - &y2)?)?;
            let d4 = max_abs(&(&y - &y4)?)?;
            assert!(d2 < 1e-5 || d4 < 1e-5, "training output must be one of the block prefixes");
            seen[(d4 < 1e-5) as usize] = true;
        }
        assert!(seen[0] && seen[1], "both prefixes must be drawn in 40 steps");
        Ok(())
    }

    #[test]
    fn lower_blocks_are_detached() -> Result<()> {
        let (base, x) = standard_cases()?.remove(0);
        let a = build_adapter(ALGO, &opts(), &base, "t")?;
        randomize(a.as_ref(), 3)?;
        let up = a.trainable().into_iter().find(|(n, _)| n == "lora_up.weight").unwrap().1;
        let mut saw_upper_block = false;
        for _ in 0..20 {
            let loss = a.forward(&base, &x, true)?.sqr()?.sum_all()?;
            let g = loss.backward()?.get(up.as_tensor()).unwrap().clone();
            let g_low = max_abs(&g.narrow(1, 0, 2)?)?;
            let g_high = max_abs(&g.narrow(1, 2, 2)?)?;
            // exactly one block learns per step
            assert!((g_low == 0.0) != (g_high == 0.0), "low {g_low}, high {g_high}");
            saw_upper_block |= g_high > 0.0;
        }
        assert!(saw_upper_block);
        Ok(())
    }

    #[test]
    fn rank_must_be_a_multiple_of_block_size() {
        let base = linear_base(8, 8, false, 1).unwrap();
        let o = NetworkOptions { dim: 6, block_size: 4, ..Default::default() };
        let msg = build_adapter(ALGO, &o, &base, "mid.attn").err().unwrap().to_string();
        assert!(msg.contains("mid.attn") && msg.contains("multiple of block_size"), "{msg}");
    }

    #[test]
    fn every_trainable_gets_a_gradient() -> Result<()> {
        check_grads(ALGO, &opts())?;
        check_grads(ALGO, &NetworkOptions { bypass_mode: true, ..opts() })
    }

    #[test]
    fn fit_reduces_loss_10x() -> Result<()> {
        // DyLoRA trains every block prefix at once, each with scale alpha/(active rank), so a
        // random full-rank target is a compromise between prefixes and has a loss floor. The
        // target here is a rank-2 LoCon (rank = one block), which every prefix can reproduce
        // exactly; Adam must bring the full-rank loss down ≥ 10×.
        for (base, x) in standard_cases()? {
            let o = NetworkOptions { dim: 4, alpha: 4.0, block_size: 2, ..Default::default() };
            let teacher_opts = NetworkOptions { dim: 2, alpha: 2.0, ..Default::default() };
            let teacher = build_adapter(NetworkAlgo::LycorisLocon, &teacher_opts, &base, "teacher")?;
            randomize(teacher.as_ref(), 5)?;
            let student = build_adapter(ALGO, &o, &base, "student")?;
            let (first, last) = fit(student.as_ref(), teacher.as_ref(), &base, &x, 300, 0.02)?;
            assert!(last * 10.0 <= first, "{:?}: loss {first} → {last}", base.kind);
        }
        Ok(())
    }
}
