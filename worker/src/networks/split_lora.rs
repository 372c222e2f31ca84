//! kohya LoRA with `split_qkv` (sd-scripts' `networks/lora_flux.py`): on a layer BFL fuses —
//! a double block's `qkv`, a single block's `linear1` (q, k, v and the MLP input) — one
//! separate LoRA per piece, each of rank r on its own rows, instead of one rank-r LoRA over
//! the whole output.
//!
//! Forward: `y = org(x) + cat_i(up_i(drop(down_i(x))))·m·alpha/r`.
//!
//! Saved as one kohya module (what every loader reads): `lora_down` the pieces' downs stacked
//! `(n·r, in)`, `lora_up` block-diagonal `(Σ out_i, n·r)`, and `alpha = n·alpha`, so a loader's
//! `alpha/rank` is the pieces' `alpha/r`. (sd-scripts saves the pieces' alpha unchanged, which
//! makes its own files apply at 1/n strength; `convert_flux_lora.py` writes n·r·alpha/r as here.)
//! Loaded back it is a plain LoRA of rank n·r: the same ΔW.

use candle_core::{bail, Result, Tensor, Var};

use super::common::alpha_tensor;
use super::lora::{build_kohya, KohyaLora};
use super::{Adapter, BaseLayer, NetworkOptions};

pub(crate) struct SplitLora {
    /// Each piece's LoRA, on its rows of the layer, in row order.
    pieces: Vec<KohyaLora>,
    /// Row count of each piece.
    rows: Vec<usize>,
    multiplier: f64,
}

/// A split LoRA over `base`'s output rows cut into `rows` (they must sum to its output width).
pub(crate) fn build(opts: &NetworkOptions, base: &BaseLayer, layer: &str, rows: &[usize]) -> Result<SplitLora> {
    let out = base.weight.dim(0)?;
    if rows.iter().sum::<usize>() != out {
        bail!("layer {layer}: split_qkv pieces {rows:?} do not add up to its {out} outputs");
    }
    let mut pieces = vec![];
    let mut start = 0;
    for (i, &n) in rows.iter().enumerate() {
        let part = BaseLayer::linear(base.weight.narrow(0, start, n)?, base.bias.as_ref().map(|b| b.narrow(0, start, n)).transpose()?)?;
        // Each piece has its own initial values (seeded by its name).
        pieces.push(build_kohya(opts, &part, &format!("{layer}.split{i}"), opts.dim, opts.alpha)?);
        start += n;
    }
    Ok(SplitLora { pieces, rows: rows.to_vec(), multiplier: opts.multiplier })
}

impl SplitLora {
    fn pieces_delta(&self) -> Result<Tensor> {
        let parts = self.pieces.iter().map(|p| p.delta_weight()).collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }
}

impl Adapter for SplitLora {
    fn algo_name(&self) -> &'static str {
        "lora"
    }

    fn delta_weight(&self) -> Result<Tensor> {
        self.pieces_delta()
    }

    fn forward(&self, base: &BaseLayer, x: &Tensor, train: bool) -> Result<Tensor> {
        let org = base.forward(x)?;
        if self.pieces[0].ctx.module_dropped(train)? {
            return Ok(org);
        }
        let paths = self.pieces.iter().map(|p| p.lora_path(x, train)).collect::<Result<Vec<_>>>()?;
        org + Tensor::cat(&paths, candle_core::D::Minus1)?
    }

    fn merged_weight(&self, base: &BaseLayer) -> Result<Tensor> {
        base.weight.to_dtype(candle_core::DType::F32)? + self.pieces_delta()?.to_dtype(candle_core::DType::F32)?.affine(self.multiplier, 0.0)?
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.pieces
            .iter()
            .enumerate()
            .flat_map(|(i, p)| [(format!("split{i}.lora_down.weight"), p.down.clone()), (format!("split{i}.lora_up.weight"), p.up.clone())])
            .collect()
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let n = self.pieces.len();
        let r = self.pieces[0].rank;
        let down = Tensor::cat(&self.pieces.iter().map(|p| p.down.as_tensor().clone()).collect::<Vec<_>>(), 0)?;
        let device = down.device().clone();
        let dtype = self.pieces[0].up.as_tensor().dtype();
        let mut blocks = vec![];
        for (i, (p, &rows)) in self.pieces.iter().zip(&self.rows).enumerate() {
            let left = Tensor::zeros((rows, i * r), dtype, &device)?;
            let right = Tensor::zeros((rows, (n - 1 - i) * r), dtype, &device)?;
            blocks.push(Tensor::cat(&[&left, p.up.as_tensor(), &right], 1)?);
        }
        let up = Tensor::cat(&blocks, 0)?;
        // alpha/(n·r) must equal each piece's alpha/r.
        let alpha = self.pieces[0].alpha * n as f64;
        Ok(vec![("lora_down.weight".into(), down), ("lora_up.weight".into(), up), ("alpha".into(), alpha_tensor(alpha, &device)?)])
    }

    fn multiplier(&self) -> f64 {
        self.multiplier
    }

    fn set_multiplier(&mut self, multiplier: f64) {
        self.multiplier = multiplier;
        for p in &mut self.pieces {
            p.ctx.multiplier = multiplier;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::networks::{adapter_from_tensors_named, NetworkAlgo};
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    /// The saved file, read back as a plain LoRA, has the same ΔW and the same output; each
    /// piece only changes its own rows.
    #[test]
    fn saved_as_one_lora_with_the_same_delta() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (12, 5), &dev)?;
        let base = BaseLayer::linear(w, Some(Tensor::randn(0f32, 1.0, 12, &dev)?))?;
        let opts = NetworkOptions { dim: 2, alpha: 1.0, ..NetworkOptions::default() };
        let split = build(&opts, &base, "l", &[3, 3, 3, 3])?;
        // Give the ups values (they start at zero).
        for (i, p) in split.pieces.iter().enumerate() {
            p.up.set(&Tensor::randn(0f32, 1.0 + i as f32, p.up.dims(), &dev)?)?;
        }
        let x = Tensor::randn(0f32, 1.0, (2, 4, 5), &dev)?;
        let y = split.forward(&base, &x, false)?;
        let state: HashMap<String, Tensor> = split.state_tensors()?.into_iter().collect();
        assert_eq!(state["lora_down.weight"].dims(), &[8, 5]);
        assert_eq!(state["lora_up.weight"].dims(), &[12, 8]);
        let plain = adapter_from_tensors_named(NetworkAlgo::Lora, &opts, &base, &state, "l")?;
        let diff = (plain.delta_weight()? - split.delta_weight()?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "ΔW differs by {diff}");
        let y2 = plain.forward(&base, &x, false)?;
        let diff = (y - y2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "outputs differ by {diff}");
        // Piece 1 alone changes rows 3..6 only.
        let d1 = split.pieces[1].delta_weight()?;
        let full = split.delta_weight()?;
        let rows = full.narrow(0, 3, 3)?;
        assert!((rows - d1)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        assert_eq!(split.trainable().len(), 8);
        let _ = DType::F32;
        Ok(())
    }
}
