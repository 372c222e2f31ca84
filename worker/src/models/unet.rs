//! diffusers' `UNet2DConditionModel` for SD1.x, SD2.x (linear projections, per-block head
//! counts, v-prediction is only a scheduler setting) and SDXL (`addition_embed_type =
//! "text_time"`, several transformer layers per block), built from its `config.json`.
//!
//! Differences from candle-transformers' UNet, on purpose: one timestep *per sample*; every
//! Linear/Conv2d/norm is a hookable [`Layer`] under its diffusers module path; only ops with a
//! backward.

use std::path::Path;
use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor};

use super::config::{read_json, UNetConfig};
use crate::grad_checkpoint::checkpointed;
use super::layers::{activation, attention, upsample_nearest, AttentionChoice, Builder, Layer};
use super::{var_builder, ModelLayers};

/// `ResnetBlock2D` (time_embedding_norm "default", output_scale_factor from the config).
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: Arc<Layer>,
    conv1: Arc<Layer>,
    time_emb_proj: Option<Arc<Layer>>,
    norm2: Arc<Layer>,
    conv2: Arc<Layer>,
    conv_shortcut: Option<Arc<Layer>>,
    act: String,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub(crate) fn new(
        b: &Builder,
        in_ch: usize,
        out_ch: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
        act: &str,
        output_scale_factor: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: b.pp("norm1").group_norm(groups, in_ch, eps)?,
            conv1: b.pp("conv1").conv2d(in_ch, out_ch, 3, 1, 1)?,
            time_emb_proj: match temb_channels {
                Some(t) => Some(b.pp("time_emb_proj").linear(t, out_ch, true)?),
                None => None,
            },
            norm2: b.pp("norm2").group_norm(groups, out_ch, eps)?,
            conv2: b.pp("conv2").conv2d(out_ch, out_ch, 3, 1, 1)?,
            conv_shortcut: if in_ch != out_ch { Some(b.pp("conv_shortcut").conv2d(in_ch, out_ch, 1, 1, 0)?) } else { None },
            act: act.to_string(),
            output_scale_factor,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.norm1.forward_then(x, &self.act)?;
        h = self.conv1.forward(&h)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&activation(&self.act, t)?)?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        h = self.norm2.forward_then(&h, &self.act)?;
        h = self.conv2.forward(&h)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale_factor != 1.0 {
            out / self.output_scale_factor
        } else {
            Ok(out)
        }
    }
}

/// `block.forward(x, Some(temb))` as one gradient-checkpointing unit (diffusers checkpoints
/// each resnet of the UNet).
fn resnet_checkpointed(block: &Arc<ResnetBlock2D>, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
    let block = block.clone();
    checkpointed(&[x, temb], Arc::new(move |xs: &[Tensor]| block.forward(&xs[0], Some(&xs[1]))))
}

/// diffusers `Attention` as used by `BasicTransformerBlock` (no bias on q/k/v, bias on out).
#[derive(Debug)]
struct CrossAttention {
    to_q: Arc<Layer>,
    to_k: Arc<Layer>,
    to_v: Arc<Layer>,
    to_out: Arc<Layer>,
    heads: usize,
    attention: AttentionChoice,
}

impl CrossAttention {
    fn new(b: &Builder, query_dim: usize, context_dim: usize, heads: usize, head_dim: usize) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: b.pp("to_q").linear(query_dim, inner, false)?,
            to_k: b.pp("to_k").linear(context_dim, inner, false)?,
            to_v: b.pp("to_v").linear(context_dim, inner, false)?,
            to_out: b.pp("to_out").pp(0).linear(inner, query_dim, true)?,
            heads,
            attention: b.attention.clone(),
        })
    }

    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        self.to_out.forward(&attention(&q, &k, &v, self.heads, None, &self.attention)?)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, pre-norm.
#[derive(Debug)]
struct BasicTransformerBlock {
    norm1: Arc<Layer>,
    attn1: CrossAttention,
    norm2: Arc<Layer>,
    attn2: CrossAttention,
    norm3: Arc<Layer>,
    ff_proj: Arc<Layer>,
    ff_out: Arc<Layer>,
}

impl BasicTransformerBlock {
    fn new(b: &Builder, dim: usize, heads: usize, head_dim: usize, context_dim: usize) -> Result<Self> {
        let ff_inner = dim * 4;
        let ff = b.pp("ff").pp("net");
        Ok(Self {
            norm1: b.pp("norm1").layer_norm(dim, 1e-5)?,
            attn1: CrossAttention::new(&b.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: b.pp("norm2").layer_norm(dim, 1e-5)?,
            attn2: CrossAttention::new(&b.pp("attn2"), dim, context_dim, heads, head_dim)?,
            norm3: b.pp("norm3").layer_norm(dim, 1e-5)?,
            ff_proj: ff.pp(0).pp("proj").linear(dim, ff_inner * 2, true)?,
            ff_out: ff.pp(2).linear(ff_inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context))? + &x)?;
        // GEGLU: hidden, gate = proj(x).chunk(2); hidden · gelu(gate) (exact erf gelu).
        let p = self.ff_proj.forward(&self.norm3.forward(&x)?)?;
        let half = p.dim(candle_core::D::Minus1)? / 2;
        let hidden = p.narrow(candle_core::D::Minus1, 0, half)?;
        let gate = p.narrow(candle_core::D::Minus1, half, half)?;
        let ff = self.ff_out.forward(&(hidden * crate::ops::gelu_erf(&gate)?)?)?;
        ff + x
    }
}

/// `Transformer2DModel` with continuous input: GroupNorm (eps 1e-6), proj_in (1×1 conv, or
/// Linear with `use_linear_projection`), transformer blocks, proj_out, residual.
#[derive(Debug)]
struct Transformer2D {
    norm: Arc<Layer>,
    proj_in: Arc<Layer>,
    blocks: Vec<Arc<BasicTransformerBlock>>,
    proj_out: Arc<Layer>,
    linear: bool,
}

impl Transformer2D {
    #[allow(clippy::too_many_arguments)]
    fn new(
        b: &Builder,
        channels: usize,
        heads: usize,
        layers: usize,
        context_dim: usize,
        groups: usize,
        linear: bool,
    ) -> Result<Self> {
        if heads == 0 || channels % heads != 0 {
            bail!("{}: {channels} channels do not split into {heads} attention heads", b.vb.prefix());
        }
        let head_dim = channels / heads;
        let inner = heads * head_dim;
        let proj = |name: &str, i: usize, o: usize| {
            if linear {
                b.pp(name).linear(i, o, true)
            } else {
                b.pp(name).conv2d(i, o, 1, 1, 0)
            }
        };
        let blocks = (0..layers)
            .map(|i| BasicTransformerBlock::new(&b.pp("transformer_blocks").pp(i), inner, heads, head_dim, context_dim).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: b.pp("norm").group_norm(groups, channels, 1e-6)?,
            proj_in: proj("proj_in", channels, inner)?,
            blocks,
            proj_out: proj("proj_out", inner, channels)?,
            linear,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let residual = x;
        let x = self.norm.forward(x)?;
        let to_seq = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))
        };
        let from_seq = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(2)?;
            t.reshape((b, h, w, ch))?.permute((0, 3, 1, 2))?.contiguous()
        };
        let mut s = if self.linear { self.proj_in.forward(&to_seq(&x)?)? } else { to_seq(&self.proj_in.forward(&x)?)? };
        // Each transformer block is one gradient-checkpointing unit (as in diffusers).
        for blk in &self.blocks {
            let blk = blk.clone();
            s = checkpointed(&[&s, context], Arc::new(move |xs: &[Tensor]| blk.forward(&xs[0], &xs[1])))?;
        }
        let out = if self.linear { from_seq(&self.proj_out.forward(&s)?)? } else { self.proj_out.forward(&from_seq(&s)?)? };
        debug_assert_eq!(out.dims(), &[b, c, h, w]);
        out + residual
    }
}

#[derive(Debug)]
struct DownBlock {
    resnets: Vec<Arc<ResnetBlock2D>>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Arc<Layer>>,
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<Arc<ResnetBlock2D>>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Arc<Layer>>,
}

#[derive(Debug)]
struct MidBlock {
    resnets: Vec<Arc<ResnetBlock2D>>,
    attentions: Vec<Transformer2D>,
}

/// SDXL's added conditions (`addition_embed_type = "text_time"`).
#[derive(Clone, Debug)]
pub struct AddedCond {
    /// Pooled output of the second text encoder, projected: `(B, 1280)`.
    pub text_embeds: Tensor,
    /// Original size, crop top-left and target size: `(B, 6)`.
    pub time_ids: Tensor,
}

/// `UNet2DConditionModel`.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    /// Where the weights live.
    device: Device,
    conv_in: Arc<Layer>,
    time_linear_1: Arc<Layer>,
    time_linear_2: Arc<Layer>,
    add_embedding: Option<(Arc<Layer>, Arc<Layer>, usize)>,
    down: Vec<DownBlock>,
    mid: Option<MidBlock>,
    up: Vec<UpBlock>,
    conv_norm_out: Arc<Layer>,
    conv_out: Arc<Layer>,
    layers: Vec<Arc<Layer>>,
    dtype: DType,
    attention: AttentionChoice,
}

impl UNet2DConditionModel {
    /// Builds the model from `config`, taking the weights from `vb` (diffusers key names at
    /// its root). With a `VarMap`-backed builder the weights are fresh trainable variables.
    /// Memory-efficient attention (the default; [`crate::ops::attention`]) or plain attention
    /// (the registry's `attention = "none"`) in every attention layer.
    pub fn set_memory_efficient_attention(&self, on: bool) {
        self.attention.set_memory_efficient(on)
    }

    pub fn new(config: &UNetConfig, vb: candle_nn::VarBuilder) -> Result<Self> {
        check_supported(config)?;
        let b = Builder::new(vb);
        let cfg = config;
        let n = cfg.block_out_channels.len();
        if cfg.down_block_types.len() != n || cfg.up_block_types.len() != n {
            bail!("unet config: {} block_out_channels but {} down and {} up blocks", n, cfg.down_block_types.len(), cfg.up_block_types.len());
        }
        let boc = &cfg.block_out_channels;
        let heads = cfg.num_attention_heads.as_ref().unwrap_or(&cfg.attention_head_dim).expand(n);
        let layers_per_block = cfg.layers_per_block.expand(n);
        let tlpb = cfg.transformer_layers_per_block.expand(n);
        let cross = cfg.cross_attention_dim.expand(n);
        if heads.len() != n || layers_per_block.len() != n || tlpb.len() != n || cross.len() != n {
            bail!("unet config: per-block lists must have {n} entries");
        }
        let groups = cfg.norm_num_groups;
        let eps = cfg.norm_eps;
        let act = cfg.act_fn.as_str();
        let time_embed_dim = cfg.time_embedding_dim.unwrap_or(boc[0] * 4);
        let osf = cfg.resnet_out_scale_factor;

        let conv_in = b.pp("conv_in").conv2d(cfg.in_channels, boc[0], cfg.conv_in_kernel, 1, (cfg.conv_in_kernel - 1) / 2)?;
        let te = b.pp("time_embedding");
        let time_linear_1 = te.pp("linear_1").linear(boc[0], time_embed_dim, true)?;
        let time_linear_2 = te.pp("linear_2").linear(time_embed_dim, time_embed_dim, true)?;
        let add_embedding = match cfg.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let (Some(td), Some(inp)) = (cfg.addition_time_embed_dim, cfg.projection_class_embeddings_input_dim) else {
                    bail!("unet config: text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim");
                };
                let ae = b.pp("add_embedding");
                Some((ae.pp("linear_1").linear(inp, time_embed_dim, true)?, ae.pp("linear_2").linear(time_embed_dim, time_embed_dim, true)?, td))
            }
            Some(other) => bail!("unet config: addition_embed_type {other:?} is not supported"),
        };

        let mut down = Vec::with_capacity(n);
        let mut out_ch = boc[0];
        for (i, ty) in cfg.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = boc[i];
            let is_final = i == n - 1;
            let bb = b.pp("down_blocks").pp(i);
            let cross_attn = match ty.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => bail!("unet config: down block type {other:?} is not supported"),
            };
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers_per_block[i] {
                let rin = if j == 0 { in_ch } else { out_ch };
                resnets.push(Arc::new(ResnetBlock2D::new(&bb.pp("resnets").pp(j), rin, out_ch, Some(time_embed_dim), groups, eps, act, osf)?));
                if cross_attn {
                    attentions.push(Transformer2D::new(&bb.pp("attentions").pp(j), out_ch, heads[i], tlpb[i], cross[i], groups, cfg.use_linear_projection)?);
                }
            }
            let downsampler = if is_final {
                None
            } else {
                Some(bb.pp("downsamplers").pp(0).pp("conv").conv2d(out_ch, out_ch, 3, 2, cfg.downsample_padding)?)
            };
            down.push(DownBlock { resnets, attentions, downsampler });
        }

        let mid = match cfg.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => {
                let c = boc[n - 1];
                let mb = b.pp("mid_block");
                let resnets = (0..2)
                    .map(|j| ResnetBlock2D::new(&mb.pp("resnets").pp(j), c, c, Some(time_embed_dim), groups, eps, act, cfg.mid_block_scale_factor).map(Arc::new))
                    .collect::<Result<Vec<_>>>()?;
                let attentions = vec![Transformer2D::new(&mb.pp("attentions").pp(0), c, heads[n - 1], tlpb[n - 1], cross[n - 1], groups, cfg.use_linear_projection)?];
                Some(MidBlock { resnets, attentions })
            }
            Some(other) => bail!("unet config: mid block type {other:?} is not supported"),
        };

        let rev_boc: Vec<usize> = boc.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = heads.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = layers_per_block.iter().rev().copied().collect();
        let rev_tlpb: Vec<usize> = match &cfg.reverse_transformer_layers_per_block {
            None | Some(serde_json::Value::Null) => tlpb.iter().rev().copied().collect(),
            Some(_) => bail!("unet config: reverse_transformer_layers_per_block is not supported"),
        };
        let rev_cross: Vec<usize> = cross.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        let mut out_ch = rev_boc[0];
        for (i, ty) in cfg.up_block_types.iter().enumerate() {
            let is_final = i == n - 1;
            let prev_out = out_ch;
            out_ch = rev_boc[i];
            let in_ch = rev_boc[(i + 1).min(n - 1)];
            let bb = b.pp("up_blocks").pp(i);
            let cross_attn = match ty.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => bail!("unet config: up block type {other:?} is not supported"),
            };
            let num_layers = rev_layers[i] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..num_layers {
                let res_skip = if j == num_layers - 1 { in_ch } else { out_ch };
                let rin = if j == 0 { prev_out } else { out_ch };
                resnets.push(Arc::new(ResnetBlock2D::new(&bb.pp("resnets").pp(j), rin + res_skip, out_ch, Some(time_embed_dim), groups, eps, act, osf)?));
                if cross_attn {
                    attentions.push(Transformer2D::new(&bb.pp("attentions").pp(j), out_ch, rev_heads[i], rev_tlpb[i], rev_cross[i], groups, cfg.use_linear_projection)?);
                }
            }
            let upsampler = if is_final { None } else { Some(bb.pp("upsamplers").pp(0).pp("conv").conv2d(out_ch, out_ch, 3, 1, 1)?) };
            up.push(UpBlock { resnets, attentions, upsampler });
        }

        let conv_norm_out = b.pp("conv_norm_out").group_norm(groups, boc[0], eps)?;
        let conv_out = b.pp("conv_out").conv2d(boc[0], cfg.out_channels, cfg.conv_out_kernel, 1, (cfg.conv_out_kernel - 1) / 2)?;
        Ok(Self {
            config: cfg.clone(),
            device: conv_in.base().weight.device().clone(),
            conv_in,
            time_linear_1,
            time_linear_2,
            add_embedding,
            down,
            mid,
            up,
            conv_norm_out,
            conv_out,
            layers: b.registry.to_vec(),
            attention: b.attention.clone(),
            dtype: b.dtype(),
        })
    }

    /// Loads `unet/config.json` and the weights (`diffusion_pytorch_model.safetensors`, or
    /// its sharded / fp16-variant siblings) from a diffusers `unet/` folder, memory-mapped and
    /// cast to `dtype`.
    pub fn from_diffusers_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config: UNetConfig = read_json(&dir.join("config.json"))?;
        let vb = var_builder(dir, "diffusion_pytorch_model", dtype, device)?;
        Self::new(&config, vb)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The noise (or v) prediction for `sample (B, C, H, W)` at `timesteps` — one per sample
    /// `(B,)`, or one for the batch (a scalar or `(1,)`) — with `encoder_hidden_states
    /// (B, N, cross_attention_dim)` and, for SDXL, the added conditions.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let batch = sample.dim(0)?;
        let dtype = sample.dtype();
        let device = sample.device();
        let ts = timestep_values(timesteps, batch)?;
        let t_emb = timestep_embedding(&ts, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift, device)?.to_dtype(dtype)?;
        let mut emb = self.time_linear_2.forward(&activation("silu", &self.time_linear_1.forward(&t_emb)?)?)?;
        if let Some((l1, l2, td)) = &self.add_embedding {
            let Some(added) = added else { bail!("this UNet (SDXL) needs text_embeds and time_ids") };
            let ids: Vec<f32> = added.time_ids.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let tproj = timestep_embedding(&ids, *td, cfg.flip_sin_to_cos, cfg.freq_shift, device)?
                .to_dtype(dtype)?
                .reshape((batch, ()))?;
            let add_in = Tensor::cat(&[&added.text_embeds.to_dtype(dtype)?, &tproj], 1)?;
            let aug = l2.forward(&activation("silu", &l1.forward(&add_in)?)?)?;
            emb = (emb + aug)?;
        }
        let ctx = encoder_hidden_states.to_dtype(dtype)?;

        let mut x = if cfg.center_input_sample { ((sample * 2.0)? - 1.0)? } else { sample.clone() };
        x = self.conv_in.forward(&x)?;
        let mut res: Vec<Tensor> = vec![x.clone()];
        for blk in &self.down {
            for (j, r) in blk.resnets.iter().enumerate() {
                x = resnet_checkpointed(r, &x, &emb)?;
                if let Some(a) = blk.attentions.get(j) {
                    x = a.forward(&x, &ctx)?;
                }
                res.push(x.clone());
            }
            if let Some(d) = &blk.downsampler {
                x = d.forward(&x)?;
                res.push(x.clone());
            }
        }
        if let Some(mid) = &self.mid {
            x = resnet_checkpointed(&mid.resnets[0], &x, &emb)?;
            for (a, r) in mid.attentions.iter().zip(&mid.resnets[1..]) {
                x = a.forward(&x, &ctx)?;
                x = resnet_checkpointed(r, &x, &emb)?;
            }
        }
        for blk in &self.up {
            for (j, r) in blk.resnets.iter().enumerate() {
                let Some(skip) = res.pop() else { bail!("unet: skip connections ran out") };
                x = Tensor::cat(&[&x, &skip], 1)?;
                x = resnet_checkpointed(r, &x, &emb)?;
                if let Some(a) = blk.attentions.get(j) {
                    x = a.forward(&x, &ctx)?;
                }
            }
            if let Some(u) = &blk.upsampler {
                // Upsample to the next skip's size (2× unless the input size was odd).
                let (oh, ow) = match res.last() {
                    Some(s) => (s.dim(2)?, s.dim(3)?),
                    None => (x.dim(2)? * 2, x.dim(3)? * 2),
                };
                x = u.forward(&upsample_nearest(&x, oh, ow)?)?;
            }
        }
        x = self.conv_norm_out.forward_then(&x, "silu")?;
        self.conv_out.forward(&x)
    }
}

impl ModelLayers for UNet2DConditionModel {
    fn layers(&self) -> &[Arc<Layer>] {
        &self.layers
    }
}

fn check_supported(cfg: &UNetConfig) -> Result<()> {
    let oca = match &cfg.only_cross_attention {
        serde_json::Value::Bool(b) => *b,
        serde_json::Value::Null => false,
        serde_json::Value::Array(v) => v.iter().any(|x| x.as_bool() == Some(true)),
        _ => false,
    };
    let unsupported = [
        (oca, "only_cross_attention"),
        (cfg.dual_cross_attention, "dual_cross_attention"),
        (cfg.resnet_time_scale_shift != "default", "resnet_time_scale_shift other than \"default\""),
        (cfg.time_embedding_type != "positional", "time_embedding_type other than \"positional\""),
        (cfg.class_embed_type.is_some() || cfg.num_class_embeds.is_some(), "class embeddings"),
        (cfg.encoder_hid_dim.is_some(), "encoder_hid_dim"),
        (cfg.time_cond_proj_dim.is_some(), "time_cond_proj_dim"),
    ];
    for (bad, what) in unsupported {
        if bad {
            bail!("unet config uses {what}, which Loft does not support (SD1.x, SD2.x and SDXL UNets only)");
        }
    }
    Ok(())
}

/// One timestep per sample, as f32 values.
fn timestep_values(t: &Tensor, batch: usize) -> Result<Vec<f32>> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    match v.len() {
        1 => Ok(vec![v[0]; batch]),
        n if n == batch => Ok(v),
        n => bail!("unet: {n} timesteps for a batch of {batch}"),
    }
}

/// diffusers' `get_timestep_embedding` (max_period 10000, scale 1), rounded to f32 at the
/// same steps as diffusers, which computes it in f32 whatever the model's dtype.
pub fn timestep_embedding(ts: &[f32], dim: usize, flip_sin_to_cos: bool, shift: f64, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let c = -(10000f64.ln()) as f32;
    let denom = (half as f64 - shift) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| (((c * i as f32) / denom) as f64).exp() as f32).collect();
    let mut out = Vec::with_capacity(ts.len() * dim);
    for &t in ts {
        let args: Vec<f64> = freqs.iter().map(|&f| (t * f) as f64).collect();
        let sin = args.iter().map(|a| a.sin() as f32);
        let cos = args.iter().map(|a| a.cos() as f32);
        if flip_sin_to_cos {
            out.extend(cos);
            out.extend(sin);
        } else {
            out.extend(sin);
            out.extend(cos);
        }
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    Tensor::from_vec(out, (ts.len(), dim), device)
}
