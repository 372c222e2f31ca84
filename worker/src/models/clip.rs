//! transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` (CLIP-L for SD1.x, OpenCLIP-H
//! for SD2.x, CLIP-L and OpenCLIP-bigG for SDXL), from its `config.json`. Layers sit under
//! their transformers module paths (`text_model.encoder.layers.0.self_attn.q_proj`, …), so
//! kohya names are `lora_te_` + the path with `.` → `_`.

use std::path::Path;
use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor};

use super::config::{read_json, ClipTextConfig};
use crate::grad_checkpoint::checkpointed;
use super::layers::{activation, plain_attention, Builder, Layer};
use super::{var_builder, ModelLayers};

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: Arc<Layer>,
    q_proj: Arc<Layer>,
    k_proj: Arc<Layer>,
    v_proj: Arc<Layer>,
    out_proj: Arc<Layer>,
    layer_norm2: Arc<Layer>,
    fc1: Arc<Layer>,
    fc2: Arc<Layer>,
}

impl EncoderLayer {
    /// Pre-norm self-attention (with the causal `mask`) and MLP, each with its residual.
    fn forward(&self, x: &Tensor, mask: &Tensor, heads: usize, act: &str) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let q = self.q_proj.forward(&h)?;
        let k = self.k_proj.forward(&h)?;
        let v = self.v_proj.forward(&h)?;
        let a = self.out_proj.forward(&plain_attention(&q, &k, &v, heads, Some(mask))?)?;
        let x = (x + a)?;
        let h = self.layer_norm2.forward(&x)?;
        let h = self.fc2.forward(&activation(act, &self.fc1.forward(&h)?)?)?;
        x + h
    }
}

/// What the text encoder returns.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// The final layer's output after `final_layer_norm`: `(B, N, hidden)`.
    pub last_hidden_state: Tensor,
    /// Every encoder layer's output, before `final_layer_norm`; `hidden_states[0]` is the
    /// embeddings (as transformers' `output_hidden_states`, so `hidden_states[len-2]` is the
    /// penultimate layer, what SDXL and clip skip 2 use).
    pub hidden_states: Vec<Tensor>,
    /// `last_hidden_state` at each sequence's first end-of-text token: `(B, hidden)`.
    pub pooled: Tensor,
    /// `text_projection(pooled)` for `CLIPTextModelWithProjection` (SDXL's second encoder).
    pub text_embeds: Option<Tensor>,
}

#[derive(Debug)]
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers_: Vec<Arc<EncoderLayer>>,
    final_layer_norm: Arc<Layer>,
    text_projection: Option<Arc<Layer>>,
    layers: Vec<Arc<Layer>>,
    /// Computes in this dtype when it differs from the stored weights' (see
    /// [`ClipTextModel::set_compute_dtype`]).
    compute_dtype: Option<DType>,
}

impl ClipTextModel {
    /// Builds the model with the weights of `vb` (transformers key names, `text_model.…` at
    /// its root). `with_projection` adds `text_projection` (CLIPTextModelWithProjection).
    pub fn new(config: &ClipTextConfig, vb: candle_nn::VarBuilder, with_projection: bool) -> Result<Self> {
        let cfg = config;
        if cfg.hidden_size % cfg.num_attention_heads != 0 {
            bail!("text encoder config: hidden_size {} does not split into {} heads", cfg.hidden_size, cfg.num_attention_heads);
        }
        let root = Builder::new(vb);
        let b = root.pp("text_model");
        let h = cfg.hidden_size;
        let emb = b.pp("embeddings");
        let token_embedding = emb.pp("token_embedding").tensor(&[cfg.vocab_size, h], "weight")?;
        let position_embedding = emb.pp("position_embedding").tensor(&[cfg.max_position_embeddings, h], "weight")?;
        let eps = cfg.layer_norm_eps;
        let mut layers_ = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = b.pp("encoder").pp("layers").pp(i);
            let sa = l.pp("self_attn");
            layers_.push(Arc::new(EncoderLayer {
                layer_norm1: l.pp("layer_norm1").layer_norm(h, eps)?,
                q_proj: sa.pp("q_proj").linear(h, h, true)?,
                k_proj: sa.pp("k_proj").linear(h, h, true)?,
                v_proj: sa.pp("v_proj").linear(h, h, true)?,
                out_proj: sa.pp("out_proj").linear(h, h, true)?,
                layer_norm2: l.pp("layer_norm2").layer_norm(h, eps)?,
                fc1: l.pp("mlp").pp("fc1").linear(h, cfg.intermediate_size, true)?,
                fc2: l.pp("mlp").pp("fc2").linear(cfg.intermediate_size, h, true)?,
            }));
        }
        let final_layer_norm = b.pp("final_layer_norm").layer_norm(h, eps)?;
        let text_projection = if with_projection {
            let p = cfg.projection_dim.unwrap_or(h);
            Some(root.pp("text_projection").linear(h, p, false)?)
        } else {
            None
        };
        Ok(Self {
            config: cfg.clone(),
            token_embedding,
            position_embedding,
            layers_,
            final_layer_norm,
            text_projection,
            layers: root.registry.to_vec(),
            compute_dtype: None,
        })
    }

    /// Loads a transformers `text_encoder/` folder (`config.json`, `model.safetensors`),
    /// memory-mapped and cast to `dtype`. The projection is loaded when the config's
    /// architecture is `CLIPTextModelWithProjection`.
    /// A single transformers-layout file (`clip_l.safetensors`) with `config`, or with its sizes
    /// read from the shapes (64-wide heads, quick-GELU: CLIP ViT-L/14's text model).
    pub fn from_file(path: &Path, config: Option<ClipTextConfig>, dtype: DType, device: &Device) -> Result<Self> {
        if let Some(config) = config {
            // SAFETY: read-only mapping of a model file Loft never writes.
            let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[path], dtype, device)? };
            return Self::new(&config, vb, false);
        }
        let file = super::safetensors_io::MappedFile::open(path)?;
        let need = |k: &str| match file.shape(k) {
            Some(s) if s.len() == 2 => Ok(s.to_vec()),
            Some(s) => bail!("{}: not a CLIP text encoder file ({k} has shape {s:?})", path.display()),
            None => bail!("{}: not a CLIP text encoder file (no {k})", path.display()),
        };
        let tok = need("text_model.embeddings.token_embedding.weight")?;
        let pos = need("text_model.embeddings.position_embedding.weight")?;
        let fc1 = need("text_model.encoder.layers.0.mlp.fc1.weight")?;
        let layers = (0..).take_while(|i| file.contains(&format!("text_model.encoder.layers.{i}.mlp.fc1.weight"))).count();
        let config: ClipTextConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": tok[0], "hidden_size": tok[1], "intermediate_size": fc1[0], "num_hidden_layers": layers,
            "num_attention_heads": (tok[1] / 64).max(1), "max_position_embeddings": pos[0], "hidden_act": "quick_gelu",
        }))
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        drop(file);
        // SAFETY: read-only mapping of a model file Loft never writes.
        let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[path], dtype, device)? };
        Self::new(&config, vb, false)
    }

    pub fn from_transformers_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config: ClipTextConfig = read_json(&dir.join("config.json"))?;
        let vb = var_builder(dir, "model", dtype, device)?;
        let with_projection = config.architectures.iter().any(|a| a == "CLIPTextModelWithProjection");
        Self::new(&config, vb, with_projection)
    }

    /// Computes in `dtype` (e.g. f32) whatever dtype the weights are stored in (e.g. f16).
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute_dtype = Some(dtype);
    }

    /// The final layer norm (what SD1.x clip skip applies to an earlier layer's output).
    pub fn final_layer_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.final_layer_norm.forward(x)
    }

    /// Runs the encoder on token ids `(B, N)` (N ≤ max_position_embeddings), with CLIP's
    /// causal mask and no padding mask (as the SD pipelines call it).
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipOutput> {
        let (b, n) = input_ids.dims2()?;
        if n > self.config.max_position_embeddings {
            bail!("text encoder: {n} tokens but at most {} positions", self.config.max_position_embeddings);
        }
        let device = input_ids.device();
        let ids = input_ids.to_dtype(DType::U32)?;
        let tok = self.token_embedding.index_select(&ids.flatten_all()?, 0)?.reshape((b, n, ()))?;
        let pos = self.position_embedding.narrow(0, 0, n)?.unsqueeze(0)?;
        let mut x = tok.broadcast_add(&pos)?;
        if let Some(dt) = self.compute_dtype {
            x = x.to_dtype(dt)?;
        }
        let mask = causal_mask(n, device)?;
        let heads = self.config.num_attention_heads;
        let mut hidden_states = vec![x.clone()];
        // Each encoder layer is one gradient-checkpointing unit (when the encoder is trained).
        for l in &self.layers_ {
            let (l, mask, act) = (l.clone(), mask.clone(), self.config.hidden_act.clone());
            x = checkpointed(&[&x], Arc::new(move |xs: &[Tensor]| l.forward(&xs[0], &mask, heads, &act)))?;
            hidden_states.push(x.clone());
        }
        let last = self.final_layer_norm.forward(&x)?;
        // Pool at the first end-of-text token (transformers' rule; with the legacy
        // eos_token_id 2 it takes the highest id instead, which is the same token in CLIP's
        // vocabulary).
        let rows: Vec<Vec<u32>> = ids.to_device(&Device::Cpu)?.to_vec2()?;
        let eos = self.config.eos_token_id;
        let idx: Vec<u32> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let pos = if eos == 2 {
                    let max = *r.iter().max().unwrap_or(&0);
                    r.iter().position(|&t| t == max).unwrap_or(0)
                } else {
                    r.iter().position(|&t| t == eos).unwrap_or(0)
                };
                (i * n + pos) as u32
            })
            .collect();
        let idx = Tensor::new(idx, device)?;
        let pooled = last.reshape((b * n, ()))?.index_select(&idx, 0)?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(ClipOutput { last_hidden_state: last, hidden_states, pooled, text_embeds })
    }
}

impl ModelLayers for ClipTextModel {
    fn layers(&self) -> &[Arc<Layer>] {
        &self.layers
    }
}

/// `(1, 1, N, N)`: 0 on and below the diagonal, a large negative number above (as
/// transformers' `finfo.min`, but finite in every dtype once added in f32).
fn causal_mask(n: usize, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..n).flat_map(|i| (0..n).map(move |j| if j > i { -1e30 } else { 0.0 })).collect();
    Tensor::from_vec(v, (1, 1, n, n), device)
}
