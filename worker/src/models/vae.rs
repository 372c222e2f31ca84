//! diffusers' `AutoencoderKL` (the SD1.x/SD2.x/SDXL VAE): encoder to the latent
//! distribution's mean (and log-variance), decoder back to pixels; mid-block attention.
//! Frozen during training, but built from the same hookable [`Layer`]s as the other models.

use std::path::Path;
use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor};

use super::config::{read_json, VaeConfig};
use super::layers::{upsample_nearest, Builder, Layer};
use super::unet::ResnetBlock2D;
use super::{var_builder, ModelLayers};

const EPS: f64 = 1e-6;

/// The mid-block `Attention` (one head over all channels, GroupNorm in front, residual).
#[derive(Debug)]
struct VaeAttention {
    group_norm: Arc<Layer>,
    to_q: Arc<Layer>,
    to_k: Arc<Layer>,
    to_v: Arc<Layer>,
    to_out: Arc<Layer>,
}

impl VaeAttention {
    fn new(b: &Builder, c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: b.pp("group_norm").group_norm(groups, c, EPS)?,
            to_q: b.pp("to_q").linear(c, c, true)?,
            to_k: b.pp("to_k").linear(c, c, true)?,
            to_v: b.pp("to_v").linear(c, c, true)?,
            to_out: b.pp("to_out").pp(0).linear(c, c, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self.group_norm.forward(x)?;
        let s = n.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.to_q.forward(&s)?;
        let k = self.to_k.forward(&s)?;
        let v = self.to_v.forward(&s)?;
        let o = self.to_out.forward(&crate::ops::attention(&q, &k, &v, 1)?)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        o + x
    }
}

#[derive(Debug)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<VaeAttention>,
}

impl MidBlock {
    fn new(b: &Builder, c: usize, groups: usize, act: &str, add_attention: bool) -> Result<Self> {
        let resnets = (0..2)
            .map(|j| ResnetBlock2D::new(&b.pp("resnets").pp(j), c, c, None, groups, EPS, act, 1.0))
            .collect::<Result<Vec<_>>>()?;
        let attention = if add_attention { Some(VaeAttention::new(&b.pp("attentions").pp(0), c, groups)?) } else { None };
        Ok(Self { resnets, attention })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x, None)?;
        if let Some(a) = &self.attention {
            x = a.forward(&x)?;
        }
        self.resnets[1].forward(&x, None)
    }
}

#[derive(Debug)]
struct Block {
    resnets: Vec<ResnetBlock2D>,
    sampler: Option<Arc<Layer>>,
}

#[derive(Debug)]
pub struct Encoder {
    conv_in: Arc<Layer>,
    down: Vec<Block>,
    mid: MidBlock,
    conv_norm_out: Arc<Layer>,
    conv_out: Arc<Layer>,
    act: String,
}

#[derive(Debug)]
pub struct Decoder {
    conv_in: Arc<Layer>,
    mid: MidBlock,
    up: Vec<Block>,
    conv_norm_out: Arc<Layer>,
    conv_out: Arc<Layer>,
    act: String,
}

#[derive(Debug)]
pub struct AutoencoderKL {
    pub config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Arc<Layer>>,
    post_quant_conv: Option<Arc<Layer>>,
    layers: Vec<Arc<Layer>>,
}

impl AutoencoderKL {
    pub fn new(config: &VaeConfig, vb: candle_nn::VarBuilder) -> Result<Self> {
        let cfg = config;
        let b = Builder::new(vb);
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        if n == 0 || cfg.down_block_types.len() != n || cfg.up_block_types.len() != n {
            bail!("vae config: block_out_channels and block types disagree");
        }
        for t in &cfg.down_block_types {
            if t != "DownEncoderBlock2D" {
                bail!("vae config: down block type {t:?} is not supported");
            }
        }
        for t in &cfg.up_block_types {
            if t != "UpDecoderBlock2D" {
                bail!("vae config: up block type {t:?} is not supported");
            }
        }
        let g = cfg.norm_num_groups;
        let act = cfg.act_fn.as_str();
        let lc = cfg.latent_channels;

        // Encoder
        let e = b.pp("encoder");
        let conv_in = e.pp("conv_in").conv2d(cfg.in_channels, boc[0], 3, 1, 1)?;
        let mut down = Vec::new();
        let mut out_ch = boc[0];
        for i in 0..n {
            let in_ch = out_ch;
            out_ch = boc[i];
            let bb = e.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| ResnetBlock2D::new(&bb.pp("resnets").pp(j), if j == 0 { in_ch } else { out_ch }, out_ch, None, g, EPS, act, 1.0))
                .collect::<Result<Vec<_>>>()?;
            // downsample_padding 0: the input is padded (0, 1, 0, 1) before a stride-2 conv.
            let sampler = if i + 1 < n { Some(bb.pp("downsamplers").pp(0).pp("conv").conv2d(out_ch, out_ch, 3, 2, 0)?) } else { None };
            down.push(Block { resnets, sampler });
        }
        let mid = MidBlock::new(&e.pp("mid_block"), boc[n - 1], g, act, cfg.mid_block_add_attention)?;
        let encoder = Encoder {
            conv_in,
            down,
            mid,
            conv_norm_out: e.pp("conv_norm_out").group_norm(g, boc[n - 1], EPS)?,
            conv_out: e.pp("conv_out").conv2d(boc[n - 1], 2 * lc, 3, 1, 1)?,
            act: act.to_string(),
        };
        let quant_conv = if cfg.use_quant_conv { Some(b.pp("quant_conv").conv2d(2 * lc, 2 * lc, 1, 1, 0)?) } else { None };
        let post_quant_conv = if cfg.use_post_quant_conv { Some(b.pp("post_quant_conv").conv2d(lc, lc, 1, 1, 0)?) } else { None };

        // Decoder
        let d = b.pp("decoder");
        let conv_in = d.pp("conv_in").conv2d(lc, boc[n - 1], 3, 1, 1)?;
        let mid = MidBlock::new(&d.pp("mid_block"), boc[n - 1], g, act, cfg.mid_block_add_attention)?;
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut up = Vec::new();
        let mut out_ch = rev[0];
        for i in 0..n {
            let prev = out_ch;
            out_ch = rev[i];
            let bb = d.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| ResnetBlock2D::new(&bb.pp("resnets").pp(j), if j == 0 { prev } else { out_ch }, out_ch, None, g, EPS, act, 1.0))
                .collect::<Result<Vec<_>>>()?;
            let sampler = if i + 1 < n { Some(bb.pp("upsamplers").pp(0).pp("conv").conv2d(out_ch, out_ch, 3, 1, 1)?) } else { None };
            up.push(Block { resnets, sampler });
        }
        let decoder = Decoder {
            conv_in,
            mid,
            up,
            conv_norm_out: d.pp("conv_norm_out").group_norm(g, boc[0], EPS)?,
            conv_out: d.pp("conv_out").conv2d(boc[0], cfg.out_channels, 3, 1, 1)?,
            act: act.to_string(),
        };
        Ok(Self { config: cfg.clone(), encoder, decoder, quant_conv, post_quant_conv, layers: b.registry.to_vec() })
    }

    /// Loads a diffusers `vae/` folder, memory-mapped and cast to `dtype`.
    pub fn from_diffusers_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config: VaeConfig = read_json(&dir.join("config.json"))?;
        let vb = var_builder(dir, "diffusion_pytorch_model", dtype, device)?;
        Self::new(&config, vb)
    }

    /// The latent distribution's `(mean, logvar)` for images `(B, 3, H, W)` in [-1, 1].
    pub fn encode_moments(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let e = &self.encoder;
        let mut h = e.conv_in.forward(x)?;
        for blk in &e.down {
            for r in &blk.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(s) = &blk.sampler {
                h = s.forward(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
            }
        }
        h = e.mid.forward(&h)?;
        h = e.conv_out.forward(&e.conv_norm_out.forward_then(&h, &e.act)?)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        let lc = self.config.latent_channels;
        Ok((h.narrow(1, 0, lc)?, h.narrow(1, lc, lc)?))
    }

    /// The latent distribution's mean (unscaled: multiply by `scaling_factor` for the UNet).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.encode_moments(x)?.0)
    }

    /// Decodes unscaled latents `(B, latent_channels, h, w)` to images in about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let d = &self.decoder;
        let mut h = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        h = d.conv_in.forward(&h)?;
        h = d.mid.forward(&h)?;
        for blk in &d.up {
            for r in &blk.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(s) = &blk.sampler {
                let (_, _, hh, ww) = h.dims4()?;
                h = s.forward(&upsample_nearest(&h, 2 * hh, 2 * ww)?)?;
            }
        }
        d.conv_out.forward(&d.conv_norm_out.forward_then(&h, &d.act)?)
    }

    /// `scaling_factor` (0.18215 for SD1.x/2.x, 0.13025 for SDXL).
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// `shift_factor` (Flux's VAE: 0.1159; none for Stable Diffusion).
    pub fn shift_factor(&self) -> f64 {
        self.config.shift_factor.unwrap_or(0.0)
    }

    /// The denoiser's latents from the VAE's: `(z − shift)·scale`.
    pub fn to_model_latents(&self, z: &Tensor) -> Result<Tensor> {
        (z - self.shift_factor())? * self.scaling_factor()
    }

    /// The VAE's latents from the denoiser's: `x/scale + shift`.
    pub fn from_model_latents(&self, x: &Tensor) -> Result<Tensor> {
        (x / self.scaling_factor())? + self.shift_factor()
    }
}

impl ModelLayers for AutoencoderKL {
    fn layers(&self) -> &[Arc<Layer>] {
        &self.layers
    }
}
