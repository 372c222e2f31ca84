//! Flux LoRA files in diffusers' (PEFT) layout — `transformer.single_transformer_blocks.0.attn.
//! to_q.lora_A.weight`, as diffusers, ai-toolkit and SimpleTuner save them — read as kohya's
//! Flux layout (`lora_unet_single_blocks_0_linear1`), the way sd-scripts'
//! `convert_flux_lora.py` converts them:
//!
//! - a layer BFL fuses (double blocks' `qkv` from `to_q`/`to_k`/`to_v` or the `add_*_proj`s,
//!   single blocks' `linear1` from `to_q`/`to_k`/`to_v`/`proj_mlp`) gets one LoRA whose down
//!   matrix stacks the pieces' downs (each scaled by its alpha/rank) and whose up matrix is
//!   block-diagonal, with alpha = its total rank: the same ΔW, row block by row block (a piece
//!   the file leaves out contributes zero rows);
//! - `norm_out.linear`'s up rows are swapped in halves (diffusers: scale, shift; BFL: shift,
//!   scale); every other layer maps one to one;
//! - `text_encoder.…` (CLIP-L) keys become `lora_te1_…`.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Whether `keys` are a diffusers-layout Flux LoRA.
pub fn is_diffusers_flux(keys: &[&str]) -> bool {
    keys.iter().any(|k| k.starts_with("transformer.") && (k.contains(".lora_A.") || k.contains(".lora_B.")))
}

/// Where a diffusers module goes: the kohya module name, this piece's index and the row sizes
/// of every piece (in units of the hidden size) of the fused layer.
struct Target {
    name: String,
    piece: usize,
    /// Piece heights in units of the hidden size (`[1, 1, 1]`, `[1, 1, 1, 4]`, or `[1]`).
    pieces: &'static [usize],
    swap_halves: bool,
}

fn target(path: &str) -> Option<Target> {
    let one = |name: String| Some(Target { name, piece: 0, pieces: &[1], swap_halves: false });
    let k = |bfl: &str| format!("lora_unet_{}", bfl.replace('.', "_"));
    let top = match path {
        "x_embedder" => Some("img_in"),
        "context_embedder" => Some("txt_in"),
        "time_text_embed.timestep_embedder.linear_1" => Some("time_in.in_layer"),
        "time_text_embed.timestep_embedder.linear_2" => Some("time_in.out_layer"),
        "time_text_embed.guidance_embedder.linear_1" => Some("guidance_in.in_layer"),
        "time_text_embed.guidance_embedder.linear_2" => Some("guidance_in.out_layer"),
        "time_text_embed.text_embedder.linear_1" => Some("vector_in.in_layer"),
        "time_text_embed.text_embedder.linear_2" => Some("vector_in.out_layer"),
        "proj_out" => Some("final_layer.linear"),
        "norm_out.linear" => return Some(Target { name: k("final_layer.adaLN_modulation.1"), piece: 0, pieces: &[1], swap_halves: true }),
        _ => None,
    };
    if let Some(bfl) = top {
        return one(k(bfl));
    }
    let parts: Vec<&str> = path.splitn(3, '.').collect();
    let [kind, index, rest] = parts.as_slice() else { return None };
    let fused = |bfl: String, piece: usize, pieces: &'static [usize]| Some(Target { name: k(&bfl), piece, pieces, swap_halves: false });
    match *kind {
        "transformer_blocks" => {
            let d = format!("double_blocks.{index}");
            match *rest {
                "attn.to_q" => fused(format!("{d}.img_attn.qkv"), 0, &[1, 1, 1]),
                "attn.to_k" => fused(format!("{d}.img_attn.qkv"), 1, &[1, 1, 1]),
                "attn.to_v" => fused(format!("{d}.img_attn.qkv"), 2, &[1, 1, 1]),
                "attn.add_q_proj" => fused(format!("{d}.txt_attn.qkv"), 0, &[1, 1, 1]),
                "attn.add_k_proj" => fused(format!("{d}.txt_attn.qkv"), 1, &[1, 1, 1]),
                "attn.add_v_proj" => fused(format!("{d}.txt_attn.qkv"), 2, &[1, 1, 1]),
                "attn.to_out.0" => one(k(&format!("{d}.img_attn.proj"))),
                "attn.to_add_out" => one(k(&format!("{d}.txt_attn.proj"))),
                "ff.net.0.proj" => one(k(&format!("{d}.img_mlp.0"))),
                "ff.net.2" => one(k(&format!("{d}.img_mlp.2"))),
                "ff_context.net.0.proj" => one(k(&format!("{d}.txt_mlp.0"))),
                "ff_context.net.2" => one(k(&format!("{d}.txt_mlp.2"))),
                "norm1.linear" => one(k(&format!("{d}.img_mod.lin"))),
                "norm1_context.linear" => one(k(&format!("{d}.txt_mod.lin"))),
                _ => None,
            }
        }
        "single_transformer_blocks" => {
            let s = format!("single_blocks.{index}");
            match *rest {
                "attn.to_q" => fused(format!("{s}.linear1"), 0, &[1, 1, 1, 4]),
                "attn.to_k" => fused(format!("{s}.linear1"), 1, &[1, 1, 1, 4]),
                "attn.to_v" => fused(format!("{s}.linear1"), 2, &[1, 1, 1, 4]),
                "proj_mlp" => fused(format!("{s}.linear1"), 3, &[1, 1, 1, 4]),
                "proj_out" => one(k(&format!("{s}.linear2"))),
                "norm.linear" => one(k(&format!("{s}.modulation.lin"))),
                _ => None,
            }
        }
        _ => None,
    }
}

/// One piece: its down (r, in) already scaled by alpha/r, and its up (out, r).
struct Piece {
    down: Tensor,
    up: Tensor,
}

/// The kohya-layout module groups (`name → {lora_down.weight, lora_up.weight, alpha}`) of a
/// diffusers-layout Flux LoRA's tensors.
pub fn to_kohya(tensors: Vec<(String, Tensor)>) -> Result<BTreeMap<String, BTreeMap<String, Tensor>>> {
    // diffusers module path → (A, B, alpha)
    let mut raw: BTreeMap<String, (Option<Tensor>, Option<Tensor>, Option<f64>)> = BTreeMap::new();
    for (key, t) in tensors {
        let (path, what) = if let Some(p) = key.strip_suffix(".lora_A.weight") {
            (p, 'A')
        } else if let Some(p) = key.strip_suffix(".lora_B.weight") {
            (p, 'B')
        } else if let Some(p) = key.strip_suffix(".alpha") {
            (p, 'a')
        } else {
            bail!("key `{key}`: a diffusers-layout Flux LoRA holds only lora_A / lora_B weights and alphas");
        };
        let entry = raw.entry(path.to_string()).or_default();
        match what {
            'A' => entry.0 = Some(t),
            'B' => entry.1 = Some(t),
            _ => entry.2 = Some(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0]),
        }
    }
    // kohya name → (pieces, hidden, swap)
    let mut fused: BTreeMap<String, (Vec<Option<Piece>>, &'static [usize], usize, bool)> = BTreeMap::new();
    let mut out: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
    for (path, (a, b, alpha)) in raw {
        let (Some(a), Some(b)) = (a, b) else { bail!("{path}: lora_A and lora_B must both be present") };
        let rank = a.dim(0)?;
        let scale = alpha.unwrap_or(rank as f64) / rank as f64;
        let down = (a.to_dtype(DType::F32)? * scale)?;
        let up = b.to_dtype(DType::F32)?;
        if let Some(te) = path.strip_prefix("text_encoder.") {
            let name = format!("lora_te1_{}", te.replace('.', "_"));
            out.insert(name, kohya_tensors(down, up, rank)?);
            continue;
        }
        let Some(inner) = path.strip_prefix("transformer.") else { bail!("{path}: not a transformer. or text_encoder. module") };
        let Some(t) = target(inner) else { bail!("{path}: no Flux layer has this diffusers path") };
        let hidden = a.dim(1)?;
        let entry = fused.entry(t.name.clone()).or_insert_with(|| ((0..t.pieces.len()).map(|_| None).collect(), t.pieces, hidden, t.swap_halves));
        entry.0[t.piece] = Some(Piece { down, up });
    }
    for (name, (pieces, units, hidden, swap)) in fused {
        let present: Vec<&Piece> = pieces.iter().flatten().collect();
        let total_rank: usize = present.iter().map(|p| p.down.dim(0).unwrap_or(0)).sum();
        let down = Tensor::cat(&present.iter().map(|p| p.down.clone()).collect::<Vec<_>>(), 0)?;
        let device = down.device().clone();
        // Block-diagonal up: piece i's rows at its offset, its columns at its rank offset.
        let mut rows = vec![];
        let mut col = 0;
        for (piece, unit) in pieces.iter().zip(units) {
            let height = match piece {
                Some(p) => {
                    let h = p.up.dim(0)?;
                    if units.len() > 1 && h != unit * hidden {
                        bail!("{name}: a piece's lora_B has {h} rows where Flux's {}-wide layer has {}", hidden, unit * hidden);
                    }
                    h
                }
                None => unit * hidden,
            };
            match piece {
                Some(p) => {
                    let r = p.down.dim(0)?;
                    let left = Tensor::zeros((height, col), DType::F32, &device)?;
                    let right = Tensor::zeros((height, total_rank - col - r), DType::F32, &device)?;
                    rows.push(Tensor::cat(&[left, p.up.clone(), right], 1)?);
                    col += r;
                }
                None => rows.push(Tensor::zeros((height, total_rank), DType::F32, &device)?),
            }
        }
        let mut up = Tensor::cat(&rows, 0)?;
        if swap {
            let half = up.dim(0)? / 2;
            up = Tensor::cat(&[up.narrow(0, half, half)?, up.narrow(0, 0, half)?], 0)?;
        }
        out.insert(name, kohya_tensors(down, up, total_rank)?);
    }
    Ok(out)
}

fn kohya_tensors(down: Tensor, up: Tensor, rank: usize) -> Result<BTreeMap<String, Tensor>> {
    let device = down.device().clone();
    let mut m = BTreeMap::new();
    m.insert("lora_down.weight".to_string(), down);
    m.insert("lora_up.weight".to_string(), up);
    m.insert("alpha".to_string(), Tensor::new(rank as f32, &device)?);
    Ok(m)
}
