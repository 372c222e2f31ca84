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
//! makes its own files apply at 1/n strength in loaders that do not re-split;
//! `convert_flux_lora.py` writes n·r·alpha/r as here.)
//! Loaded back by a client it is a plain LoRA of rank n·r: the same ΔW. Continuing from it
//! (`network_weights` with split_qkv) splits it again (alpha ÷ n). sd-scripts' own
//! `load_state_dict` re-splits keeping alpha as saved, so a Loft file continued in sd-scripts
//! with split_qkv trains at n× the strength (and sd-scripts' own files, which keep the pieces'
//! alpha, apply at 1/n strength in clients that do not re-split).

use candle_core::{bail, Result, Tensor, Var};

use super::common::alpha_tensor;
use super::lora::{build_kohya, kohya_from_tensors, KohyaLora};
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

/// A split LoRA from a saved one (`network_weights`): the stacked downs chunked, the up's
/// diagonal blocks taken, alpha divided by the piece count. A file whose up is not
/// block-diagonal over `rows` was not trained with split_qkv and is refused.
pub(crate) fn from_tensors(opts: &NetworkOptions, base: &BaseLayer, tensors: &std::collections::HashMap<String, Tensor>, layer: &str, rows: &[usize]) -> Result<SplitLora> {
    let (Some(down), Some(up)) = (tensors.get("lora_down.weight"), tensors.get("lora_up.weight")) else {
        bail!("layer {layer}: split_qkv needs lora_down.weight and lora_up.weight");
    };
    let n = rows.len();
    let total_rank = down.dim(0)?;
    if total_rank % n != 0 {
        bail!("layer {layer}: rank {total_rank} does not split into {n} pieces: the file was not trained with split_qkv (turn it off to continue from it)");
    }
    let r = total_rank / n;
    let alpha = match tensors.get("alpha") {
        Some(a) => a.to_dtype(candle_core::DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0] / n as f64,
        None => r as f64,
    };
    let mut pieces = vec![];
    let mut start = 0;
    for (i, &height) in rows.iter().enumerate() {
        let block_rows = up.narrow(0, start, height)?;
        for j in 0..n {
            if j != i && block_rows.narrow(1, j * r, r)?.abs()?.max_all()?.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? != 0.0 {
                bail!("layer {layer}: its lora_up is not block-diagonal over q/k/v: the file was not trained with split_qkv (turn it off to continue from it)");
            }
        }
        let part = BaseLayer::linear(base.weight.narrow(0, start, height)?, base.bias.as_ref().map(|b| b.narrow(0, start, height)).transpose()?)?;
        let mut piece_tensors = std::collections::HashMap::new();
        piece_tensors.insert("lora_down.weight".to_string(), down.narrow(0, i * r, r)?);
        piece_tensors.insert("lora_up.weight".to_string(), block_rows.narrow(1, i * r, r)?.contiguous()?);
        piece_tensors.insert("alpha".to_string(), Tensor::new(alpha as f32, down.device())?);
        pieces.push(kohya_from_tensors(opts, &part, &piece_tensors, &format!("{layer}.split{i}"))?);
        start += height;
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
        // Continuing from the file splits it again into the same pieces.
        let again = from_tensors(&opts, &base, &state, "l", &[3, 3, 3, 3])?;
        let diff = (again.delta_weight()? - split.delta_weight()?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "re-split ΔW differs by {diff}");
        // A plain LoRA file of another rank is refused.
        let plain_state: HashMap<String, Tensor> = build_kohya(&NetworkOptions { dim: 3, ..opts.clone() }, &base, "p", 3, 1.0)?.state_tensors()?.into_iter().collect();
        assert!(from_tensors(&opts, &base, &plain_state, "l", &[3, 3, 3, 3]).is_err());
        let _ = DType::F32;
        Ok(())
    }
}
