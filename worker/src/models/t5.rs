//! T5's encoder (transformers' `T5EncoderModel`, v1.1 gated-GELU as Flux's T5-XXL) and its
//! SentencePiece tokenizer through the `tokenizers` crate (the model folder's `tokenizer.json`).
//!
//! Per block: RMS-normalised input (`T5LayerNorm`: no mean, no bias, statistics in f32) →
//! self-attention without the 1/√d scaling, plus a learned relative-position bias (block 0's
//! table, shared by every block) → residual; normalised → `wo(gelu_tanh(wi_0 x) · wi_1 x)` →
//! residual. A final RMS norm. Flux trains with T5 frozen and its states cached, so only the
//! forward matters; the layers are [`Layer`]s all the same, so `train_t5xxl` can adapt them.

use std::path::Path;
use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor, D};
use serde::Deserialize;

use super::layers::{plain_attention_scaled, Builder, Layer};
use super::ModelLayers;

/// transformers' `T5Config` (the keys the encoder uses).
#[derive(Clone, Debug, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "d_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "d_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "d_proj")]
    pub feed_forward_proj: String,
}

fn d_buckets() -> usize {
    32
}
fn d_distance() -> usize {
    128
}
fn d_eps() -> f64 {
    1e-6
}
/// transformers' default (T5 v1.0); v1.1 and T5-XXL configs say `gated-gelu`.
fn d_proj() -> String {
    "relu".into()
}

/// T5's RMS norm: `w · x / √(mean(x²) + eps)`, statistics in f32.
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn new(b: &Builder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: b.vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?, eps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x32.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        normed.broadcast_mul(&self.weight.to_dtype(dtype)?)
    }
}

struct Block {
    attn_norm: T5LayerNorm,
    q: Arc<Layer>,
    k: Arc<Layer>,
    v: Arc<Layer>,
    o: Arc<Layer>,
    ff_norm: T5LayerNorm,
    wi_0: Arc<Layer>,
    wi_1: Option<Arc<Layer>>,
    wo: Arc<Layer>,
}

/// The T5 encoder.
pub struct T5EncoderModel {
    pub config: T5Config,
    embed: Tensor,
    /// `(num_buckets, heads)`: block 0's relative-position bias table.
    relative_bias: Tensor,
    blocks: Vec<Block>,
    final_norm: T5LayerNorm,
    layers: Vec<Arc<Layer>>,
    gated: bool,
    act: &'static str,
}

impl T5EncoderModel {
    pub fn new(config: &T5Config, vb: candle_nn::VarBuilder) -> Result<Self> {
        let (gated, act) = match config.feed_forward_proj.as_str() {
            "gated-gelu" => (true, "gelu_new"),
            "gated-relu" => (true, "relu"),
            "relu" => (false, "relu"),
            other => bail!("T5 feed_forward_proj {other:?} is not supported"),
        };
        let b = Builder::new(vb);
        // transformers ties encoder.embed_tokens to `shared`; files keep either.
        let embed = if b.vb.contains_tensor("shared.weight") {
            b.vb.get((config.vocab_size, config.d_model), "shared.weight")?
        } else {
            b.vb.get((config.vocab_size, config.d_model), "encoder.embed_tokens.weight")?
        };
        let inner = config.num_heads * config.d_kv;
        let e = b.pp("encoder");
        let mut blocks = vec![];
        let mut relative_bias = None;
        for i in 0..config.num_layers {
            let bb = e.pp("block").pp(i);
            let sa = bb.pp("layer").pp(0);
            let att = sa.pp("SelfAttention");
            if i == 0 {
                relative_bias = Some(att.pp("relative_attention_bias").vb.get((config.relative_attention_num_buckets, config.num_heads), "weight")?);
            }
            let ff = bb.pp("layer").pp(1);
            let dense = ff.pp("DenseReluDense");
            blocks.push(Block {
                attn_norm: T5LayerNorm::new(&sa.pp("layer_norm"), config.d_model, config.layer_norm_epsilon)?,
                q: att.pp("q").linear(config.d_model, inner, false)?,
                k: att.pp("k").linear(config.d_model, inner, false)?,
                v: att.pp("v").linear(config.d_model, inner, false)?,
                o: att.pp("o").linear(inner, config.d_model, false)?,
                ff_norm: T5LayerNorm::new(&ff.pp("layer_norm"), config.d_model, config.layer_norm_epsilon)?,
                wi_0: dense.pp(if gated { "wi_0" } else { "wi" }).linear(config.d_model, config.d_ff, false)?,
                wi_1: if gated { Some(dense.pp("wi_1").linear(config.d_model, config.d_ff, false)?) } else { None },
                wo: dense.pp("wo").linear(config.d_ff, config.d_model, false)?,
            });
        }
        let Some(relative_bias) = relative_bias else { bail!("T5 encoder with no layers") };
        let final_norm = T5LayerNorm::new(&e.pp("final_layer_norm"), config.d_model, config.layer_norm_epsilon)?;
        Ok(Self { config: config.clone(), embed, relative_bias, blocks, final_norm, layers: b.registry.to_vec(), gated, act })
    }

    /// A transformers folder (`config.json` + `model.safetensors`).
    pub fn from_transformers_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config: T5Config = super::config::read_json(&dir.join("config.json"))?;
        let vb = super::var_builder(dir, "model", dtype, device)?;
        Self::new(&config, vb)
    }

    /// A single transformers-layout file (`t5xxl_fp16.safetensors`, as ComfyUI and sd-scripts
    /// take it) with `config`, or with its sizes read from the shapes (T5 v1.1's relative
    /// attention distance, 128).
    pub fn from_file(path: &Path, config: Option<T5Config>, dtype: DType, device: &Device) -> Result<Self> {
        if let Some(config) = config {
            // SAFETY: read-only mapping of a model file Loft never writes.
            let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[path], dtype, device)? };
            return Self::new(&config, vb);
        }
        let file = super::safetensors_io::MappedFile::open(path)?;
        let shape = |k: &str| file.shape(k).map(|s| s.to_vec());
        let need = |k: &str| match shape(k) {
            Some(s) if s.len() == 2 && s.iter().all(|&d| d > 0) => Ok(s),
            Some(s) => bail!("{}: not a T5 encoder file ({k} has shape {s:?})", path.display()),
            None => bail!("{}: not a T5 encoder file (no {k})", path.display()),
        };
        let embed = need(if file.contains("shared.weight") { "shared.weight" } else { "encoder.embed_tokens.weight" })?;
        let bias = need("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")?;
        let q = need("encoder.block.0.layer.0.SelfAttention.q.weight")?;
        let gated = file.contains("encoder.block.0.layer.1.DenseReluDense.wi_0.weight");
        let wi = need(if gated { "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" } else { "encoder.block.0.layer.1.DenseReluDense.wi.weight" })?;
        let layers = (0..).take_while(|i| file.contains(&format!("encoder.block.{i}.layer.0.SelfAttention.q.weight"))).count();
        let config = T5Config {
            vocab_size: embed[0],
            d_model: embed[1],
            d_kv: q[0] / bias[1],
            d_ff: wi[0],
            num_layers: layers,
            num_heads: bias[1],
            relative_attention_num_buckets: bias[0],
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: if gated { "gated-gelu".into() } else { "relu".into() },
        };
        drop(file);
        // SAFETY: read-only mapping of a model file Loft never writes.
        let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[path], dtype, device)? };
        Self::new(&config, vb)
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// The bucket of each relative position `key − query` (transformers'
    /// `_relative_position_bucket`, bidirectional), in f32 like transformers.
    fn bucket(&self, relative: i64) -> usize {
        let num_buckets = self.config.relative_attention_num_buckets / 2;
        let max_distance = self.config.relative_attention_max_distance as f32;
        let mut bucket = if relative > 0 { num_buckets } else { 0 };
        let n = relative.unsigned_abs() as usize;
        let max_exact = num_buckets / 2;
        if n < max_exact {
            bucket += n;
        } else {
            let ratio = (n as f32 / max_exact as f32).ln() / (max_distance / max_exact as f32).ln();
            let large = max_exact + (ratio * (num_buckets - max_exact) as f32) as usize;
            bucket += large.min(num_buckets - 1);
        }
        bucket
    }

    /// `(1, heads, L, L)` position bias for a sequence of `len`.
    fn position_bias(&self, len: usize, dtype: DType) -> Result<Tensor> {
        let ids: Vec<u32> = (0..len).flat_map(|q| (0..len).map(move |k| (q, k))).map(|(q, k)| self.bucket(k as i64 - q as i64) as u32).collect();
        let ids = Tensor::from_vec(ids, len * len, self.device())?;
        let values = self.relative_bias.index_select(&ids, 0)?; // (L·L, heads)
        values.reshape((len, len, self.config.num_heads))?.permute((2, 0, 1))?.unsqueeze(0)?.to_dtype(dtype)
    }

    /// The last hidden state `(B, L, d_model)` for `input_ids (B, L)`; `mask (B, L)` (1 = token,
    /// 0 = padding) keeps padded keys out of every attention (`apply_t5_attn_mask`).
    pub fn forward(&self, input_ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (batch, len) = input_ids.dims2()?;
        let mut x = self.embed.index_select(&input_ids.flatten_all()?, 0)?.reshape((batch, len, self.config.d_model))?;
        let mut bias = self.position_bias(len, DType::F32)?;
        if let Some(m) = mask {
            let additive = ((m.to_dtype(DType::F32)? - 1.0)? * 1e9)?.reshape((batch, 1, 1, len))?;
            bias = bias.broadcast_add(&additive)?;
        }
        for blk in &self.blocks {
            let h = blk.attn_norm.forward(&x)?;
            // T5's scores are not scaled by 1/√d.
            let attn = plain_attention_scaled(&blk.q.forward(&h)?, &blk.k.forward(&h)?, &blk.v.forward(&h)?, self.config.num_heads, Some(&bias), 1.0)?;
            x = clamp_f16((x + blk.o.forward(&attn)?)?)?;
            let h = blk.ff_norm.forward(&x)?;
            let act = super::layers::activation(self.act, &blk.wi_0.forward(&h)?)?;
            let inner = match &blk.wi_1 {
                Some(wi_1) if self.gated => (act * wi_1.forward(&h)?)?,
                _ => act,
            };
            x = clamp_f16((x + blk.wo.forward(&inner)?)?)?;
        }
        self.final_norm.forward(&x)
    }
}

/// f16 states are clamped as transformers clamps T5's: to ±65504 (f16's largest), or to
/// ±64504 when an infinity appeared (so the next layer does not overflow at once).
fn clamp_f16(x: Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F16 {
        return Ok(x);
    }
    let has_inf = x.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?.is_infinite();
    let limit = if has_inf { 64504f32 } else { 65504f32 };
    x.clamp(-limit, limit)
}

impl ModelLayers for T5EncoderModel {
    fn layers(&self) -> &[Arc<Layer>] {
        &self.layers
    }
}

/// T5's SentencePiece tokenizer from a folder's `tokenizer.json`: `</s>` appended, cut to the
/// maximum length (keeping `</s>`), padded with `<pad>` (as sd-scripts' `padding="max_length"`).
pub struct T5Tokenizer {
    inner: tokenizers::Tokenizer,
    pub pad: u32,
    pub eos: u32,
}

impl T5Tokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = dir.join("tokenizer.json");
        if !file.is_file() {
            bail!("{}: no tokenizer.json (the T5 tokenizer is read from its fast-tokenizer file; convert spiece.model with transformers' T5TokenizerFast once)", dir.display());
        }
        let mut inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", file.display())))?;
        // Cutting and padding are done in `encode`; a file that asks for its own would do them twice.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", file.display())))?;
        let pad = inner.token_to_id("<pad>").unwrap_or(0);
        let Some(eos) = inner.token_to_id("</s>") else { bail!("{}: no </s> token: not a T5 tokenizer", file.display()) };
        Ok(Self { inner, pad, eos })
    }

    /// `(ids, mask)` of `max_length` each: the text's tokens cut to `max_length − 1`, then
    /// `</s>` (what transformers' truncation with T5's post-processor gives), then padding.
    pub fn encode(&self, text: &str, max_length: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        let enc = self.inner.encode(text, false).map_err(|e| candle_core::Error::Msg(format!("T5 tokenizer: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        ids.truncate(max_length.saturating_sub(1));
        ids.push(self.eos);
        let mut mask = vec![1u32; ids.len()];
        ids.resize(max_length, self.pad);
        mask.resize(max_length, 0);
        Ok((ids, mask))
    }
}
