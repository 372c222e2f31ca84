//! Memory-efficient multi-head attention: softmax(q·kᵀ/√d)·v computed over blocks of keys with
//! an online softmax, keeping only the output and each query's log-sum-exp for the backward,
//! which recomputes every block (the FlashAttention-2 equations, here with candle ops so that
//! it runs on every backend; a fused CUDA kernel can take its place).
//!
//! Forward, per query block and key block j, with S_j = q·k_jᵀ/√d (f32):
//!   m' = max(m, rowmax S_j),  P_j = exp(S_j − m'),  l' = l·e^(m−m') + rowsum P_j,
//!   acc' = acc·e^(m−m') + P_j·v_j;   out = acc/l,  lse = m + ln l.
//! Backward, with D = rowsum(dO ⊙ out) and P_j = exp(S_j − lse):
//!   dv_j += P_jᵀ·dO,  dS_j = P_j ⊙ (dO·v_jᵀ − D),  dq += dS_j·k_j/√d,  dk_j += dS_jᵀ·q/√d.
//! No score map larger than a query block × a key block ever exists, forward or backward;
//! plain attention keeps about seven Nq×Nk maps per attention until the backward ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Tensor, D};
use rayon::prelude::*;

use super::graph::{attach, Backward};
use crate::kernels::{self, attention::AttentionShape};
use crate::profile::{self, Kind};

/// Queries per block: bounds the size of a score block with [`KEY_BLOCK`].
const QUERY_BLOCK: usize = 1024;
/// Keys per block: cross-attention's 77·k text tokens and SD's 64×64-latent self-attention
/// fit in one (no online correction); longer sequences are split.
const KEY_BLOCK: usize = 4096;

/// Which attention a model's layers compute (the registry's `attention` field: `none` is the
/// plain one, every other choice the memory-efficient one).
#[derive(Clone, Debug)]
pub struct AttentionChoice(Arc<AtomicBool>);

impl Default for AttentionChoice {
    fn default() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }
}

impl AttentionChoice {
    pub fn set_memory_efficient(&self, on: bool) {
        self.0.store(on, Ordering::Relaxed)
    }

    pub fn memory_efficient(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// `q (B, Nq, H·d)`, `k`/`v (B, Nk, H·d)` → `(B, Nq, H·d)`. f16/bf16 inputs compute in f32 (as
/// diffusers' `upcast_softmax`) and return their own dtype.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    if super::reference_ops() {
        return crate::models::layers::plain_attention(q, k, v, heads, None);
    }
    if kernels::use_kernels(q) && (q.device().is_cpu() || AttentionShape::of(q, k, heads)?.has_kernel()) {
        return kernel_attention(q, k, v, heads);
    }
    let span = profile::span(Kind::AttentionForward);
    let (b, nq, inner) = q.dims3()?;
    let d = inner / heads;
    let (qh, kh, vh) = (split_heads(&q.detach(), heads)?, split_heads(&k.detach(), heads)?, split_heads(&v.detach(), heads)?);
    let scale = 1.0 / (d as f64).sqrt();
    let mut outs = vec![];
    let mut lses = vec![];
    for (q0, qn) in blocks(nq, QUERY_BLOCK) {
        let (o, lse) = forward_block(&qh.narrow(1, q0, qn)?, &kh, &vh, scale)?;
        outs.push(o);
        lses.push(lse);
    }
    let out = Tensor::cat(&outs, 1)?; // (B·H, Nq, d) f32
    let lse = Tensor::cat(&lses, 1)?; // (B·H, Nq, 1) f32
    let merged = merge_heads(&out, b, heads)?.to_dtype(q.dtype())?;
    drop(span);
    attach(&[q, k, v], merged, AttentionBackward { heads, scale, out, lse })
}

/// `(B, N, H·d)` → `(B·H, N, d)` in f32.
fn split_heads(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, inner) = t.dims3()?;
    let d = inner / heads;
    t.to_dtype(DType::F32)?.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()?.reshape((b * heads, n, d))
}

/// `(B·H, N, d)` → `(B, N, H·d)`.
fn merge_heads(t: &Tensor, b: usize, heads: usize) -> Result<Tensor> {
    let (_, n, d) = t.dims3()?;
    t.reshape((b, heads, n, d))?.transpose(1, 2)?.contiguous()?.reshape((b, n, heads * d))
}

/// (start, length) of the blocks of `size` covering `0..n`.
fn blocks(n: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n.div_ceil(size)).map(move |i| (i * size, size.min(n - i * size)))
}

/// One query block against all keys: its output and log-sum-exp.
fn forward_block(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    let nk = k.dim(1)?;
    if nk <= KEY_BLOCK {
        // All keys in one block: a plain softmax, no running correction.
        let (p, lse) = softmax_rows(q.matmul(&k.t()?)?, scale)?;
        return Ok((p.matmul(v)?, lse));
    }
    let mut state: Option<(Tensor, Tensor, Tensor)> = None; // (m, l, acc)
    for (k0, kn) in blocks(nk, KEY_BLOCK) {
        let kj = k.narrow(1, k0, kn)?;
        let vj = v.narrow(1, k0, kn)?;
        let s = (q.matmul(&kj.t()?)? * scale)?;
        let m_blk = s.max_keepdim(D::Minus1)?;
        state = Some(match state {
            None => {
                let p = s.broadcast_sub(&m_blk)?.exp()?;
                (m_blk, p.sum_keepdim(D::Minus1)?, p.matmul(&vj)?)
            }
            Some((m, l, acc)) => {
                let m_new = m.maximum(&m_blk)?;
                let p = s.broadcast_sub(&m_new)?.exp()?;
                let correction = (m - &m_new)?.exp()?;
                let l = (l.mul(&correction)? + p.sum_keepdim(D::Minus1)?)?;
                let acc = (acc.broadcast_mul(&correction)? + p.matmul(&vj)?)?;
                (m_new, l, acc)
            }
        });
    }
    let (m, l, acc) = state.expect("at least one key");
    Ok((acc.broadcast_div(&l)?, (m + l.log()?)?))
}

/// Attention through worker/kernels/attention.cu (on a CUDA tensor with a compiled head size;
/// the kernel op's reference elsewhere): no score map in memory, forward or backward.
fn kernel_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let span = profile::span(Kind::AttentionForward);
    let (out, lse) = kernels::attention::forward(&q.detach(), &k.to_dtype(q.dtype())?.detach(), &v.to_dtype(q.dtype())?.detach(), heads)?;
    drop(span);
    attach(&[q, k, v], out.clone(), KernelAttentionBackward { heads, out, lse })
}

struct KernelAttentionBackward {
    heads: usize,
    /// The output (B, Nq, H·d) in q's dtype and log-sum-exp (B, Nq, H) in f32.
    out: Tensor,
    lse: Tensor,
}

impl Backward for KernelAttentionBackward {
    fn name(&self) -> &'static str {
        "attention-kernel"
    }

    fn profile_kind(&self) -> Kind {
        Kind::AttentionBackward
    }

    fn backward(&self, args: &[&Tensor], needs: &[bool], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (q, k, v) = (args[0], args[1], args[2]);
        let dtype = q.dtype();
        let (dq, dk, dv) = kernels::attention::backward(q, &k.to_dtype(dtype)?, &v.to_dtype(dtype)?, &self.out, &self.lse, grad, self.heads)?;
        let dk = dk.to_dtype(k.dtype())?;
        let dv = dv.to_dtype(v.dtype())?;
        Ok(vec![needs[0].then_some(dq), needs[1].then_some(dk), needs[2].then_some(dv)])
    }
}

struct AttentionBackward {
    heads: usize,
    scale: f64,
    /// The output (B·H, Nq, d) and log-sum-exp (B·H, Nq, 1), in f32.
    out: Tensor,
    lse: Tensor,
}

impl Backward for AttentionBackward {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn profile_kind(&self) -> Kind {
        Kind::AttentionBackward
    }

    fn backward(&self, args: &[&Tensor], needs: &[bool], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (q, k, v) = (args[0], args[1], args[2]);
        let (b, nq, _) = q.dims3()?;
        let nk = k.dim(1)?;
        let (qh, kh, vh) = (split_heads(q, self.heads)?, split_heads(k, self.heads)?, split_heads(v, self.heads)?);
        let go = split_heads(grad, self.heads)?;
        let delta = go.mul(&self.out)?.sum_keepdim(D::Minus1)?; // (B·H, Nq, 1)
        let key_blocks: Vec<(usize, usize)> = blocks(nk, KEY_BLOCK).collect();
        let mut dk: Vec<Option<Tensor>> = vec![None; key_blocks.len()];
        let mut dv: Vec<Option<Tensor>> = vec![None; key_blocks.len()];
        let mut dq = vec![];
        let add = |acc: &mut Option<Tensor>, t: Tensor| -> Result<()> {
            *acc = Some(match acc.take() {
                Some(a) => (a + t)?,
                None => t,
            });
            Ok(())
        };
        for (q0, qn) in blocks(nq, QUERY_BLOCK) {
            let qi = qh.narrow(1, q0, qn)?;
            let goi = go.narrow(1, q0, qn)?;
            let lsei = self.lse.narrow(1, q0, qn)?;
            let deltai = delta.narrow(1, q0, qn)?;
            let mut dqi: Option<Tensor> = None;
            for (j, &(k0, kn)) in key_blocks.iter().enumerate() {
                let kj = kh.narrow(1, k0, kn)?;
                let vj = vh.narrow(1, k0, kn)?;
                let p = probabilities(qi.matmul(&kj.t()?)?, self.scale, &lsei)?;
                if needs[2] {
                    add(&mut dv[j], p.t()?.matmul(&goi)?)?;
                }
                // dS/√d, so that dq = dS·k and dk = dSᵀ·q below.
                let ds = score_grad(p, goi.matmul(&vj.t()?)?, &deltai, self.scale)?;
                if needs[0] {
                    add(&mut dqi, ds.matmul(&kj)?)?;
                }
                if needs[1] {
                    add(&mut dk[j], ds.t()?.matmul(&qi)?)?;
                }
            }
            if let Some(g) = dqi {
                dq.push(g);
            }
        }
        let gather = |parts: Vec<Tensor>, like: &Tensor| -> Result<Option<Tensor>> {
            if parts.is_empty() {
                return Ok(None);
            }
            Ok(Some(merge_heads(&Tensor::cat(&parts, 1)?, b, self.heads)?.to_dtype(like.dtype())?))
        };
        let dq = if needs[0] { gather(dq, q)? } else { None };
        let dk = if needs[1] { gather(dk.into_iter().flatten().collect(), k)? } else { None };
        let dv = if needs[2] { gather(dv.into_iter().flatten().collect(), v)? } else { None };
        Ok(vec![dq, dk, dv])
    }
}

// ---------------------------------------------------------------------------------------------
// The element-wise passes over a score block: one fused, parallel pass each on the CPU, over
// the block the matmul just wrote (no new allocation); candle's ops elsewhere.
// ---------------------------------------------------------------------------------------------

/// Row softmax of `s·scale` (B·H, n, m) and each row's log-sum-exp (B·H, n, 1).
fn softmax_rows(s: Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    if super::cpu_fused(&s) && s.is_contiguous() {
        let op = RowSoftmax { scale: scale as f32, lse: Mutex::new(vec![]) };
        s.inplace_op1(&op)?;
        let lse = std::mem::take(&mut *op.lse.lock().unwrap_or_else(|e| e.into_inner()));
        let (bh, n, _) = s.dims3()?;
        let lse = Tensor::from_vec(lse, (bh, n, 1), s.device())?;
        return Ok((s, lse));
    }
    let s = (s * scale)?;
    let m = s.max_keepdim(D::Minus1)?;
    let e = s.broadcast_sub(&m)?.exp()?;
    let l = e.sum_keepdim(D::Minus1)?;
    Ok((e.broadcast_div(&l)?, (m + l.log()?)?))
}

/// `exp(s·scale − lse)`: the softmax recomputed from the saved log-sum-exp.
fn probabilities(s: Tensor, scale: f64, lse: &Tensor) -> Result<Tensor> {
    if super::cpu_fused(&s) && s.is_contiguous() {
        s.inplace_op2(&lse.contiguous()?, &Probabilities { scale: scale as f32 })?;
        return Ok(s);
    }
    (s * scale)?.broadcast_sub(lse)?.exp()
}

/// `p ⊙ (dp − D)·scale`, written over `dp`.
fn score_grad(p: Tensor, dp: Tensor, delta: &Tensor, scale: f64) -> Result<Tensor> {
    if super::cpu_fused(&dp) && dp.is_contiguous() && p.is_contiguous() {
        let (bh, n, _) = dp.dims3()?;
        // p and D side by side in one tensor would cost a copy; D is small, p is read in place.
        let op = ScoreGrad { scale: scale as f32, p, delta: delta.contiguous()?.flatten_all()?.to_vec1::<f32>()?, rows: bh * n };
        dp.inplace_op1(&op)?;
        return Ok(dp);
    }
    (p * dp.broadcast_sub(delta)?)? * scale
}

fn rows_of<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<(&'a mut [f32], usize)> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("attention: f32 only") };
    let Some((start, end)) = l.contiguous_offsets() else { candle_core::bail!("attention: contiguous scores only") };
    Ok((&mut v[start..end], l.dims()[l.dims().len() - 1]))
}

struct RowSoftmax {
    scale: f32,
    lse: Mutex<Vec<f32>>,
}

impl InplaceOp1 for RowSoftmax {
    fn name(&self) -> &'static str {
        "attention-softmax"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let (v, m) = rows_of(s, l)?;
        let lse: Vec<f32> = v
            .par_chunks_mut(m)
            .map(|row| {
                let max = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) * self.scale;
                let mut sum = 0f32;
                for x in row.iter_mut() {
                    *x = (*x * self.scale - max).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|x| *x *= inv);
                max + sum.ln()
            })
            .collect();
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        Ok(())
    }
}

struct Probabilities {
    scale: f32,
}

impl InplaceOp2 for Probabilities {
    fn name(&self) -> &'static str {
        "attention-probabilities"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout, lse: &CpuStorage, lse_l: &Layout) -> Result<()> {
        let (v, m) = rows_of(s, l)?;
        let CpuStorage::F32(lse) = lse else { candle_core::bail!("attention: f32 only") };
        let lse = &lse[lse_l.start_offset()..];
        v.par_chunks_mut(m).zip(lse.par_iter()).for_each(|(row, &c)| row.iter_mut().for_each(|x| *x = (*x * self.scale - c).exp()));
        Ok(())
    }
}

struct ScoreGrad {
    scale: f32,
    p: Tensor,
    delta: Vec<f32>,
    rows: usize,
}

impl InplaceOp1 for ScoreGrad {
    fn name(&self) -> &'static str {
        "attention-score-grad"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let (dp, m) = rows_of(s, l)?;
        let (p_storage, p_layout) = self.p.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::F32(p)) = &*p_storage else { candle_core::bail!("attention: f32 CPU probabilities only") };
        let p = &p[p_layout.start_offset()..][..self.rows * m];
        dp.par_chunks_mut(m).zip(p.par_chunks(m)).zip(self.delta.par_iter()).for_each(|((g, p), &d)| {
            for (g, &p) in g.iter_mut().zip(p) {
                *g = p * (*g - d) * self.scale;
            }
        });
        Ok(())
    }
}
