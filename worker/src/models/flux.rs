//! The Flux.1 transformer (dev and schnell), under BFL's module paths.
//!
//! Layers are named as in Black Forest Labs' checkpoints (`double_blocks.0.img_attn.qkv`,
//! `single_blocks.3.linear1`, …) because those are the names kohya's Flux LoRA files use
//! (`lora_unet_double_blocks_0_img_attn_qkv`). A diffusers `transformer/` folder is read through
//! [`super::flux_weights`], which joins its split projections (`to_q`/`to_k`/`to_v` → `qkv`,
//! single blocks' `to_q`/`to_k`/`to_v`/`proj_mlp` → `linear1`) and swaps the halves of
//! `norm_out.linear` (diffusers: scale, shift; BFL: shift, scale).
//!
//! The forward is diffusers' `FluxTransformer2DModel.forward` (equal to BFL's `Flux.forward`):
//! - `img_in`/`txt_in` project the packed latents (2×2 patches, 64 channels) and the T5 states;
//! - `vec` = MLP(timestep·1000 sinusoid) [+ MLP(guidance·1000 sinusoid) for dev] + MLP(pooled CLIP);
//! - each double block modulates (shift, scale, gate ×2) the image and text streams separately,
//!   attends over both jointly (QK RMSNorm, 3-axis RoPE over (0, row, column) ids; text first);
//! - each single block runs attention and the MLP in parallel on the joined sequence;
//! - the final layer modulates (shift, scale) and projects the image tokens back.
//!
//! Each block is one gradient-checkpointing unit taking the joined `(text, image)` sequence and
//! `vec`; RoPE tables and the text mask are constants of the call.

use std::path::Path;
use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor, D};
use serde::Deserialize;

use super::layers::{attention, plain_attention, AttentionChoice, Builder, Layer};
use super::unet::timestep_embedding;
use super::ModelLayers;
use crate::grad_checkpoint::checkpointed;

/// The transformer's sizes: from a diffusers `config.json`, or read off a BFL checkpoint's
/// shapes ([`FluxConfig::from_bfl_shapes`]).
#[derive(Clone, Debug, PartialEq)]
pub struct FluxConfig {
    /// Packed latent channels (16 latent channels × 2×2 patch = 64).
    pub in_channels: usize,
    pub out_channels: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    /// Double-stream blocks (19 for Flux.1).
    pub depth: usize,
    /// Single-stream blocks (38 for Flux.1).
    pub depth_single: usize,
    /// T5 state width (4096).
    pub context_in_dim: usize,
    /// Pooled CLIP width (768).
    pub vec_in_dim: usize,
    pub mlp_hidden: usize,
    /// dev: a guidance embedding; schnell: none.
    pub guidance_embed: bool,
    /// RoPE dims per id axis (16, 56, 56); they sum to the head size.
    pub axes_dim: Vec<usize>,
    pub theta: f64,
}

/// diffusers' `transformer/config.json` of `FluxTransformer2DModel`.
#[derive(Clone, Debug, Deserialize)]
struct DiffusersFluxConfig {
    #[serde(default = "d_64")]
    in_channels: usize,
    #[serde(default)]
    out_channels: Option<usize>,
    #[serde(default = "d_19")]
    num_layers: usize,
    #[serde(default = "d_38")]
    num_single_layers: usize,
    #[serde(default = "d_128")]
    attention_head_dim: usize,
    #[serde(default = "d_24")]
    num_attention_heads: usize,
    #[serde(default = "d_4096")]
    joint_attention_dim: usize,
    #[serde(default = "d_768")]
    pooled_projection_dim: usize,
    #[serde(default)]
    guidance_embeds: bool,
    #[serde(default = "d_axes")]
    axes_dims_rope: Vec<usize>,
    #[serde(default = "d_one")]
    patch_size: usize,
}

fn d_64() -> usize {
    64
}
fn d_19() -> usize {
    19
}
fn d_38() -> usize {
    38
}
fn d_128() -> usize {
    128
}
fn d_24() -> usize {
    24
}
fn d_4096() -> usize {
    4096
}
fn d_768() -> usize {
    768
}
fn d_one() -> usize {
    1
}
fn d_axes() -> Vec<usize> {
    vec![16, 56, 56]
}

impl FluxConfig {
    /// Flux.1 dev's sizes (schnell: `guidance_embed` false).
    pub fn flux1(guidance_embed: bool) -> Self {
        FluxConfig {
            in_channels: 64,
            out_channels: 64,
            hidden_size: 3072,
            num_heads: 24,
            depth: 19,
            depth_single: 38,
            context_in_dim: 4096,
            vec_in_dim: 768,
            mlp_hidden: 4 * 3072,
            guidance_embed,
            axes_dim: vec![16, 56, 56],
            theta: 10_000.0,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Reads a diffusers `transformer/config.json`.
    pub fn from_diffusers_json(path: &Path) -> Result<Self> {
        let c: DiffusersFluxConfig = super::config::read_json(path)?;
        if c.patch_size != 1 {
            bail!("{}: patch_size {} (Flux.1 packs 2×2 latent patches itself and uses 1)", path.display(), c.patch_size);
        }
        let hidden = c.num_attention_heads * c.attention_head_dim;
        let cfg = FluxConfig {
            in_channels: c.in_channels,
            out_channels: c.out_channels.unwrap_or(c.in_channels),
            hidden_size: hidden,
            num_heads: c.num_attention_heads,
            depth: c.num_layers,
            depth_single: c.num_single_layers,
            context_in_dim: c.joint_attention_dim,
            vec_in_dim: c.pooled_projection_dim,
            mlp_hidden: 4 * hidden,
            guidance_embed: c.guidance_embeds,
            axes_dim: c.axes_dims_rope,
            theta: 10_000.0,
        };
        cfg.check().map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    /// The sizes of a BFL checkpoint from its tensor shapes (`shape(name)` = the dims of a
    /// tensor, `None` when absent). RoPE's axes are not in the shapes: Flux.1's (16, 56, 56) for
    /// 128-wide heads, else `axes_dim` must be given (a diffusers config beside the file).
    pub fn from_bfl_shapes(shape: &dyn Fn(&str) -> Option<Vec<usize>>, axes_dim: Option<Vec<usize>>) -> Result<Self> {
        // A tensor's dims, which must be `rank` of them.
        let need = |name: &str, rank: usize| match shape(name) {
            Some(s) if s.len() == rank => Ok(s),
            Some(s) => bail!("not a Flux transformer checkpoint: {name} has shape {s:?}"),
            None => bail!("not a Flux transformer checkpoint: no {name}"),
        };
        let img_in = need("img_in.weight", 2)?;
        let head_dim = need("double_blocks.0.img_attn.norm.query_norm.scale", 1)?[0];
        let hidden = img_in[0];
        let count = |f: &dyn Fn(usize) -> String| (0..).take_while(|&i| shape(&f(i)).is_some()).count();
        let axes_dim = match axes_dim {
            Some(a) => a,
            None if head_dim == 128 => vec![16, 56, 56],
            None => bail!("Flux checkpoint with {head_dim}-wide heads: its RoPE axes are unknown (put the diffusers folder with transformer/config.json beside the file)"),
        };
        if head_dim == 0 || hidden % head_dim != 0 {
            bail!("not a Flux transformer checkpoint: {head_dim}-wide heads in a {hidden}-wide model");
        }
        let cfg = FluxConfig {
            in_channels: img_in[1],
            out_channels: need("final_layer.linear.weight", 2)?[0],
            hidden_size: hidden,
            num_heads: hidden / head_dim,
            depth: count(&|i| format!("double_blocks.{i}.img_attn.qkv.weight")),
            depth_single: count(&|i| format!("single_blocks.{i}.linear1.weight")),
            context_in_dim: need("txt_in.weight", 2)?[1],
            vec_in_dim: need("vector_in.in_layer.weight", 2)?[1],
            mlp_hidden: need("double_blocks.0.img_mlp.0.weight", 2)?[0],
            guidance_embed: shape("guidance_in.in_layer.weight").is_some(),
            axes_dim,
            theta: 10_000.0,
        };
        cfg.check().map_err(candle_core::Error::Msg)?;
        Ok(cfg)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.num_heads == 0 || self.hidden_size % self.num_heads != 0 {
            return Err(format!("hidden size {} is not a multiple of {} heads", self.hidden_size, self.num_heads));
        }
        let sum: usize = self.axes_dim.iter().sum();
        if sum != self.head_dim() || self.axes_dim.len() != 3 || self.axes_dim.iter().any(|a| a % 2 == 1) {
            return Err(format!("RoPE axes {:?} must be three even sizes summing to the head size {}", self.axes_dim, self.head_dim()));
        }
        Ok(())
    }
}

/// BFL's `MLPEmbedder`: `out_layer(silu(in_layer(x)))`.
struct MlpEmbedder {
    in_layer: Arc<Layer>,
    out_layer: Arc<Layer>,
}

impl MlpEmbedder {
    fn new(b: &Builder, in_dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self { in_layer: b.pp("in_layer").linear(in_dim, hidden, true)?, out_layer: b.pp("out_layer").linear(hidden, hidden, true)? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out_layer.forward(&crate::ops::silu(&self.in_layer.forward(x)?)?)
    }
}

/// RMSNorm over the head dim with a learned scale (BFL's `QKNorm`), statistics in f32.
#[derive(Clone)]
struct RmsNorm {
    scale: Tensor,
}

impl RmsNorm {
    fn new(b: &Builder, dim: usize) -> Result<Self> {
        Ok(Self { scale: b.vb.get_with_hints(dim, "scale", candle_nn::Init::Const(1.0))? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let rrms = (x32.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?.recip()?;
        x32.broadcast_mul(&rrms)?.to_dtype(dtype)?.broadcast_mul(&self.scale.to_dtype(dtype)?)
    }
}

/// LayerNorm without affine parameters (eps 1e-6), statistics in f32.
fn layer_norm(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let mean = x32.mean_keepdim(D::Minus1)?;
    let centered = x32.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + 1e-6)?.sqrt()?)?.to_dtype(dtype)
}

/// `(1 + scale)·LN(x) + shift`, with `shift`/`scale` `(B, h)`.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    layer_norm(x)?.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?.broadcast_add(&shift.unsqueeze(1)?)
}

/// The `i`-th of `n` equal chunks of the last dim.
fn chunk(x: &Tensor, n: usize, i: usize) -> Result<Tensor> {
    let size = x.dim(D::Minus1)? / n;
    x.narrow(D::Minus1, i * size, size)
}

/// Which text keys attention may see (`apply_t5_attn_mask`).
#[derive(Clone)]
enum TextKeys {
    All,
    /// Each sample's first `n` text tokens (T5 pads at the end): the padded keys are left out of
    /// that sample's attention, which then stays memory-efficient.
    Prefix { valid: Vec<usize>, n_txt: usize },
    /// Any other mask: additive `(B, 1, 1, N)`, with plain attention.
    Additive(Tensor),
}

/// What every block's attention shares in one forward: RoPE tables `(N, d/2)` for the joined
/// (text, image) sequence, which text keys are visible, and the choice of attention.
#[derive(Clone)]
struct AttnContext {
    cos: Tensor,
    sin: Tensor,
    keys: TextKeys,
    heads: usize,
    choice: AttentionChoice,
}

impl AttnContext {
    /// Rotates `x (B, N, H, d)` pairwise: `(x₀, x₁) → (x₀cos − x₁sin, x₁cos + x₀sin)` per
    /// frequency, the pairs adjacent as in diffusers' `repeat_interleave_real` tables.
    fn rope(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, h, d) = x.dims4()?;
        let dtype = x.dtype();
        let pairs = x.to_dtype(DType::F32)?.reshape((b, n, h, d / 2, 2))?;
        let x0 = pairs.narrow(4, 0, 1)?.squeeze(4)?;
        let x1 = pairs.narrow(4, 1, 1)?.squeeze(4)?;
        let cos = self.cos.reshape((1, n, 1, d / 2))?;
        let sin = self.sin.reshape((1, n, 1, d / 2))?;
        let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
        let r1 = (x1.broadcast_mul(&cos)? + x0.broadcast_mul(&sin)?)?;
        Tensor::stack(&[r0, r1], 4)?.reshape((b, n, h, d))?.to_dtype(dtype)
    }

    /// Attention over `q`/`k`/`v (B, N, H, d)` (q and k already normalised) → `(B, N, H·d)`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, n, h, d) = q.dims4()?;
        let q = self.rope(q)?.reshape((b, n, h * d))?;
        let k = self.rope(k)?.reshape((b, n, h * d))?;
        let v = v.reshape((b, n, h * d))?;
        match &self.keys {
            TextKeys::All => attention(&q, &k, &v, self.heads, None, &self.choice),
            TextKeys::Additive(m) => plain_attention(&q, &k, &v, self.heads, Some(m)),
            TextKeys::Prefix { valid, n_txt } => {
                // Per sample: keys (and values) without its padded text tokens.
                let visible = |t: &Tensor, i: usize| -> Result<Tensor> {
                    let t = t.narrow(0, i, 1)?;
                    Tensor::cat(&[t.narrow(1, 0, valid[i])?, t.narrow(1, *n_txt, n - n_txt)?], 1)
                };
                let rows = (0..b)
                    .map(|i| attention(&q.narrow(0, i, 1)?, &visible(&k, i)?, &visible(&v, i)?, self.heads, None, &self.choice))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)
            }
        }
    }
}

/// `qkv (B, N, 3·h)` → normalised q, k and v, each `(B, N, H, d)`.
fn split_qkv(qkv: &Tensor, heads: usize, q_norm: &RmsNorm, k_norm: &RmsNorm) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, n, three_h) = qkv.dims3()?;
    let d = three_h / 3 / heads;
    let qkv = qkv.reshape((b, n, 3, heads, d))?;
    let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2);
    Ok((q_norm.forward(&part(0)?)?, k_norm.forward(&part(1)?)?, part(2)?))
}

/// One stream (image or text) of a double block.
struct Stream {
    mod_lin: Arc<Layer>,
    qkv: Arc<Layer>,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    proj: Arc<Layer>,
    mlp_0: Arc<Layer>,
    mlp_2: Arc<Layer>,
}

impl Stream {
    fn new(b: &Builder, kind: &str, cfg: &FluxConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let attn = b.pp(format!("{kind}_attn"));
        Ok(Self {
            mod_lin: b.pp(format!("{kind}_mod")).pp("lin").linear(h, 6 * h, true)?,
            qkv: attn.pp("qkv").linear(h, 3 * h, true)?,
            q_norm: RmsNorm::new(&attn.pp("norm").pp("query_norm"), cfg.head_dim())?,
            k_norm: RmsNorm::new(&attn.pp("norm").pp("key_norm"), cfg.head_dim())?,
            proj: attn.pp("proj").linear(h, h, true)?,
            mlp_0: b.pp(format!("{kind}_mlp")).pp(0).linear(h, cfg.mlp_hidden, true)?,
            mlp_2: b.pp(format!("{kind}_mlp")).pp(2).linear(cfg.mlp_hidden, h, true)?,
        })
    }
}

/// A double-stream block (diffusers' `FluxTransformerBlock`).
struct DoubleBlock {
    img: Stream,
    txt: Stream,
}

impl DoubleBlock {
    /// `x` is the joined `(B, Nt + Ni, h)` sequence, text first; returns the same.
    fn forward(&self, x: &Tensor, vec: &Tensor, n_txt: usize, ctx: &AttnContext) -> Result<Tensor> {
        let n = x.dim(1)?;
        let txt = x.narrow(1, 0, n_txt)?;
        let img = x.narrow(1, n_txt, n - n_txt)?;
        let act = crate::ops::silu(vec)?;
        let img_mod = self.img.mod_lin.forward(&act)?;
        let txt_mod = self.txt.mod_lin.forward(&act)?;
        let m = |t: &Tensor, i: usize| chunk(t, 6, i);

        let img_in = modulate(&img, &m(&img_mod, 0)?, &m(&img_mod, 1)?)?;
        let txt_in = modulate(&txt, &m(&txt_mod, 0)?, &m(&txt_mod, 1)?)?;
        let (iq, ik, iv) = split_qkv(&self.img.qkv.forward(&img_in)?, ctx.heads, &self.img.q_norm, &self.img.k_norm)?;
        let (tq, tk, tv) = split_qkv(&self.txt.qkv.forward(&txt_in)?, ctx.heads, &self.txt.q_norm, &self.txt.k_norm)?;
        let attn = ctx.attend(&Tensor::cat(&[&tq, &iq], 1)?, &Tensor::cat(&[&tk, &ik], 1)?, &Tensor::cat(&[&tv, &iv], 1)?)?;
        let txt_attn = attn.narrow(1, 0, n_txt)?;
        let img_attn = attn.narrow(1, n_txt, n - n_txt)?;

        let gate = |t: &Tensor, i: usize| m(t, i)?.unsqueeze(1);
        let img = (&img + self.img.proj.forward(&img_attn)?.broadcast_mul(&gate(&img_mod, 2)?)?)?;
        let mlp = |s: &Stream, t: &Tensor, md: &Tensor| -> Result<Tensor> {
            let h = modulate(t, &m(md, 3)?, &m(md, 4)?)?;
            s.mlp_2.forward(&s.mlp_0.forward(&h)?.gelu()?)?.broadcast_mul(&gate(md, 5)?)
        };
        let img = (&img + mlp(&self.img, &img, &img_mod)?)?;
        let txt = (&txt + self.txt.proj.forward(&txt_attn)?.broadcast_mul(&gate(&txt_mod, 2)?)?)?;
        let txt = (&txt + mlp(&self.txt, &txt, &txt_mod)?)?;
        let out = Tensor::cat(&[&txt, &img], 1)?;
        clamp_f16(out)
    }
}

/// f16 activations are clipped to its range after each block (diffusers clips the text
/// stream of double blocks and the joined stream of single blocks; clipping the image stream
/// too changes nothing but infinities).
fn clamp_f16(x: Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F16 {
        x.clamp(-65504f32, 65504f32)
    } else {
        Ok(x)
    }
}

/// A single-stream block (diffusers' `FluxSingleTransformerBlock`).
struct SingleBlock {
    modulation: Arc<Layer>,
    linear1: Arc<Layer>,
    linear2: Arc<Layer>,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    hidden: usize,
}

impl SingleBlock {
    fn new(b: &Builder, cfg: &FluxConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            modulation: b.pp("modulation").pp("lin").linear(h, 3 * h, true)?,
            linear1: b.pp("linear1").linear(h, 3 * h + cfg.mlp_hidden, true)?,
            linear2: b.pp("linear2").linear(h + cfg.mlp_hidden, h, true)?,
            q_norm: RmsNorm::new(&b.pp("norm").pp("query_norm"), cfg.head_dim())?,
            k_norm: RmsNorm::new(&b.pp("norm").pp("key_norm"), cfg.head_dim())?,
            hidden: h,
        })
    }

    fn forward(&self, x: &Tensor, vec: &Tensor, ctx: &AttnContext) -> Result<Tensor> {
        let md = self.modulation.forward(&crate::ops::silu(vec)?)?;
        let h_in = modulate(x, &chunk(&md, 3, 0)?, &chunk(&md, 3, 1)?)?;
        let both = self.linear1.forward(&h_in)?;
        let width = both.dim(D::Minus1)?;
        let qkv = both.narrow(D::Minus1, 0, 3 * self.hidden)?;
        let mlp = both.narrow(D::Minus1, 3 * self.hidden, width - 3 * self.hidden)?;
        let (q, k, v) = split_qkv(&qkv, ctx.heads, &self.q_norm, &self.k_norm)?;
        let attn = ctx.attend(&q, &k, &v)?;
        let out = self.linear2.forward(&Tensor::cat(&[&attn, &mlp.gelu()?], D::Minus1)?)?;
        clamp_f16((x + out.broadcast_mul(&chunk(&md, 3, 2)?.unsqueeze(1)?)?)?)
    }
}

/// The conditions of one forward besides the image tokens.
pub struct FluxInputs<'a> {
    /// T5 states `(B, Nt, context_in_dim)`.
    pub txt: &'a Tensor,
    /// Pooled CLIP output `(B, vec_in_dim)`.
    pub pooled: &'a Tensor,
    /// Per-sample timesteps in [0, 1] (σ).
    pub timesteps: &'a [f32],
    /// dev: the distilled guidance per sample (ignored by schnell).
    pub guidance: Option<&'a [f32]>,
    /// The packed image's (rows, columns) of 2×2 patches: its RoPE positions.
    pub grid: (usize, usize),
    /// `(B, Nt)` 1/0 text mask (`apply_t5_attn_mask`): padded text keys get no attention.
    pub txt_mask: Option<&'a Tensor>,
}

/// The Flux.1 transformer.
pub struct FluxTransformer {
    pub config: FluxConfig,
    img_in: Arc<Layer>,
    txt_in: Arc<Layer>,
    time_in: MlpEmbedder,
    vector_in: MlpEmbedder,
    guidance_in: Option<MlpEmbedder>,
    double_blocks: Vec<Arc<DoubleBlock>>,
    single_blocks: Vec<Arc<SingleBlock>>,
    final_mod: Arc<Layer>,
    final_linear: Arc<Layer>,
    layers: Vec<Arc<Layer>>,
    attention: AttentionChoice,
    device: Device,
    dtype: DType,
}

impl FluxTransformer {
    /// Builds the model from `vb`, whose tensors are named as in BFL's checkpoints.
    pub fn new(config: &FluxConfig, vb: candle_nn::VarBuilder) -> Result<Self> {
        let b = Builder::new(vb);
        let h = config.hidden_size;
        let img_in = b.pp("img_in").linear(config.in_channels, h, true)?;
        let time_in = MlpEmbedder::new(&b.pp("time_in"), 256, h)?;
        let vector_in = MlpEmbedder::new(&b.pp("vector_in"), config.vec_in_dim, h)?;
        let guidance_in = if config.guidance_embed { Some(MlpEmbedder::new(&b.pp("guidance_in"), 256, h)?) } else { None };
        let txt_in = b.pp("txt_in").linear(config.context_in_dim, h, true)?;
        let double_blocks = (0..config.depth)
            .map(|i| {
                let bb = b.pp("double_blocks").pp(i);
                Ok(Arc::new(DoubleBlock { img: Stream::new(&bb, "img", config)?, txt: Stream::new(&bb, "txt", config)? }))
            })
            .collect::<Result<Vec<_>>>()?;
        let single_blocks = (0..config.depth_single).map(|i| Ok(Arc::new(SingleBlock::new(&b.pp("single_blocks").pp(i), config)?))).collect::<Result<Vec<_>>>()?;
        let final_mod = b.pp("final_layer").pp("adaLN_modulation").pp(1).linear(h, 2 * h, true)?;
        let final_linear = b.pp("final_layer").pp("linear").linear(h, config.out_channels, true)?;
        let device = b.device().clone();
        let dtype = b.dtype();
        Ok(Self {
            config: config.clone(),
            img_in,
            txt_in,
            time_in,
            vector_in,
            guidance_in,
            double_blocks,
            single_blocks,
            final_mod,
            final_linear,
            layers: b.registry.to_vec(),
            attention: b.attention.clone(),
            device,
            dtype,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype the weights were loaded in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn set_memory_efficient_attention(&self, on: bool) {
        self.attention.set_memory_efficient(on);
    }

    /// RoPE tables `(N, d/2)` for `n_txt` text tokens (ids 0) then the image grid's
    /// (0, row, column) ids, computed in f64 and rounded to f32 as diffusers does.
    fn rope_tables(&self, n_txt: usize, grid: (usize, usize)) -> Result<(Tensor, Tensor)> {
        let (rows, cols) = grid;
        let n = n_txt + rows * cols;
        let half: usize = self.config.axes_dim.iter().sum::<usize>() / 2;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for i in 0..n {
            let ids = if i < n_txt { [0.0, 0.0, 0.0] } else { [0.0, ((i - n_txt) / cols) as f64, ((i - n_txt) % cols) as f64] };
            for (axis, &dim) in self.config.axes_dim.iter().enumerate() {
                for j in 0..dim / 2 {
                    let freq = 1.0 / self.config.theta.powf((2 * j) as f64 / dim as f64);
                    let angle = ids[axis] * freq;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        Ok((Tensor::from_vec(cos, (n, half), &self.device)?, Tensor::from_vec(sin, (n, half), &self.device)?))
    }

    /// The velocity prediction `(B, Ni, out_channels)` for packed latents `img (B, Ni, in_channels)`.
    pub fn forward(&self, img: &Tensor, inputs: &FluxInputs) -> Result<Tensor> {
        let dtype = img.dtype();
        let batch = img.dim(0)?;
        let n_img = img.dim(1)?;
        if inputs.grid.0 * inputs.grid.1 != n_img {
            bail!("flux: {n_img} image tokens but a {}×{} patch grid", inputs.grid.0, inputs.grid.1);
        }
        if inputs.timesteps.len() != batch {
            bail!("flux: {} timesteps for a batch of {batch}", inputs.timesteps.len());
        }
        let img = self.img_in.forward(img)?;
        // diffusers and sd-scripts cast t (and the guidance) to the model's dtype and scale by
        // 1000 in it: in bf16 near t = 1 that is a grid of 4 timesteps.
        let scale = |v: f32| round_to(dtype, round_to(dtype, v) * 1000.0);
        let scaled: Vec<f32> = inputs.timesteps.iter().map(|&t| scale(t)).collect();
        let mut vec = self.time_in.forward(&timestep_embedding(&scaled, 256, true, 0.0, &self.device)?.to_dtype(dtype)?)?;
        if let Some(g_in) = &self.guidance_in {
            let Some(g) = inputs.guidance else { bail!("flux: this model has a guidance embedding (dev): give a guidance scale") };
            let g: Vec<f32> = g.iter().map(|&g| scale(g)).collect();
            vec = (vec + g_in.forward(&timestep_embedding(&g, 256, true, 0.0, &self.device)?.to_dtype(dtype)?)?)?;
        }
        let vec = (vec + self.vector_in.forward(&inputs.pooled.to_dtype(dtype)?)?)?;
        let txt = self.txt_in.forward(&inputs.txt.to_dtype(dtype)?)?;
        let n_txt = txt.dim(1)?;
        let (cos, sin) = self.rope_tables(n_txt, inputs.grid)?;
        let keys = match inputs.txt_mask {
            None => TextKeys::All,
            Some(m) => {
                let rows: Vec<Vec<f32>> = m.to_dtype(DType::F32)?.to_vec2()?;
                let valid: Vec<usize> = rows.iter().map(|r| r.iter().take_while(|&&v| v > 0.5).count()).collect();
                let is_prefix = rows.iter().zip(&valid).all(|(r, &n)| r[n..].iter().all(|&v| v <= 0.5));
                if is_prefix {
                    TextKeys::Prefix { valid, n_txt }
                } else {
                    // Masked text keys get a large negative score; image keys are always kept.
                    let keep = Tensor::cat(&[m.to_dtype(DType::F32)?, Tensor::ones((batch, n_img), DType::F32, &self.device)?], 1)?;
                    TextKeys::Additive(((keep - 1.0)? * 1e9)?.reshape((batch, 1, 1, n_txt + n_img))?)
                }
            }
        };
        let ctx = AttnContext { cos, sin, keys, heads: self.config.num_heads, choice: self.attention.clone() };

        let mut x = Tensor::cat(&[&txt, &img], 1)?;
        for block in &self.double_blocks {
            let (block, ctx) = (block.clone(), ctx.clone());
            x = checkpointed(&[&x, &vec], Arc::new(move |xs: &[Tensor]| block.forward(&xs[0], &xs[1], n_txt, &ctx)))?;
        }
        for block in &self.single_blocks {
            let (block, ctx) = (block.clone(), ctx.clone());
            x = checkpointed(&[&x, &vec], Arc::new(move |xs: &[Tensor]| block.forward(&xs[0], &xs[1], &ctx)))?;
        }
        let img = x.narrow(1, n_txt, n_img)?;
        let md = self.final_mod.forward(&crate::ops::silu(&vec)?)?;
        self.final_linear.forward(&modulate(&img, &chunk(&md, 2, 0)?, &chunk(&md, 2, 1)?)?)
    }
}

impl ModelLayers for FluxTransformer {
    fn layers(&self) -> &[Arc<Layer>] {
        &self.layers
    }
}

/// `v` rounded to `dtype` (f16/bf16) and back; as is for f32/f64.
fn round_to(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(v).to_f32(),
        DType::F16 => half::f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// Packs latents `(B, C, H, W)` into 2×2 patches `(B, (H/2)(W/2), 4C)` (diffusers'
/// `_pack_latents`, sd-scripts' `pack_latents`).
pub fn pack_latents(latents: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    if h % 2 == 1 || w % 2 == 1 {
        bail!("flux: latents {h}×{w} must have even sides (images a multiple of 16 pixels)");
    }
    latents.reshape((b, c, h / 2, 2, w / 2, 2))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, (h / 2) * (w / 2), c * 4))
}

/// The inverse of [`pack_latents`] for latents of `h`×`w`.
pub fn unpack_latents(packed: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c4) = packed.dims3()?;
    let c = c4 / 4;
    packed.reshape((b, h / 2, w / 2, c, 2, 2))?.permute((0, 3, 1, 4, 2, 5))?.reshape((b, c, h, w))
}
