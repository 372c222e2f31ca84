//! Where the Flux transformer's weights come from: BFL's single file (the model's own names,
//! optionally under ComfyUI's `model.diffusion_model.` prefix) or a diffusers `transformer/`
//! folder, whose names and splits are mapped to BFL's here (diffusers'
//! `convert_flux_transformer_checkpoint_to_diffusers`, run backwards).
//!
//! Both are memory-mapped; each tensor is read when the model asks for it. With
//! `frozen_weight_dtype` (fp8_base) every Linear weight is cast straight from the file to that
//! dtype (e.g. float8 e4m3), so the full-precision model never exists in memory: a 12B
//! transformer loads in 12 GB.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{bail, DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::flux::FluxConfig;

/// The prefixes a BFL transformer's keys may carry in a file (ComfyUI's full checkpoints).
const BFL_PREFIXES: [&str; 2] = ["model.diffusion_model.", ""];

enum Layout {
    /// BFL names under `prefix`.
    Bfl { prefix: &'static str },
    Diffusers,
}

/// A [`SimpleBackend`] serving BFL-named tensors from either layout.
pub struct FluxWeights {
    files: MmapedSafetensors,
    layout: Layout,
    frozen_weight_dtype: Option<DType>,
    source: PathBuf,
}

/// One BFL tensor as diffusers stores it: a single tensor, a concatenation along dim 0, or the
/// final adaLN with its halves swapped.
enum Source {
    One(String),
    Cat(Vec<String>),
    SwapHalves(String),
}

impl FluxWeights {
    /// A BFL single file (`flux1-dev.safetensors`, ComfyUI prefixes accepted).
    pub fn bfl_file(path: &Path) -> Result<Self> {
        // SAFETY: read-only mapping of a model file Loft never writes.
        let files = unsafe { MmapedSafetensors::new(path)? };
        let prefix = BFL_PREFIXES
            .into_iter()
            .find(|p| files.get(&format!("{p}img_in.weight")).is_ok())
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: not a Flux transformer checkpoint (no img_in.weight)", path.display())))?;
        refuse_scaled_fp8(&files, path)?;
        Ok(Self { files, layout: Layout::Bfl { prefix }, frozen_weight_dtype: None, source: path.to_path_buf() })
    }

    /// A diffusers `transformer/` folder.
    pub fn diffusers_dir(dir: &Path) -> Result<Self> {
        let paths = super::weight_files(dir, "diffusion_pytorch_model")?;
        // SAFETY: as above.
        let files = unsafe { MmapedSafetensors::multi(&paths)? };
        refuse_scaled_fp8(&files, dir)?;
        Ok(Self { files, layout: Layout::Diffusers, frozen_weight_dtype: None, source: dir.to_path_buf() })
    }

    /// Linear weights are cast from the file to `dtype` (fp8_base) instead of the model dtype.
    pub fn with_frozen_weight_dtype(mut self, dtype: Option<DType>) -> Self {
        self.frozen_weight_dtype = dtype;
        self
    }

    /// Whether a BFL file holds a transformer (img_in and a double block).
    pub fn is_flux_file(path: &Path) -> bool {
        Self::bfl_file(path).is_ok_and(|w| w.contains_tensor("double_blocks.0.img_attn.qkv.weight"))
    }

    /// The sizes read off a BFL file's shapes (`axes_dim` from a config when not Flux.1's).
    pub fn config_from_shapes(&self, axes_dim: Option<Vec<usize>>) -> Result<FluxConfig> {
        let shape = |name: &str| self.shape_of(name);
        FluxConfig::from_bfl_shapes(&shape, axes_dim).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", self.source.display())))
    }

    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        match self.source_of(name)? {
            Source::One(n) | Source::SwapHalves(n) => self.files.get(&n).ok().map(|v| v.shape().to_vec()),
            Source::Cat(parts) => {
                let shapes: Vec<Vec<usize>> = parts.iter().map(|p| self.files.get(p).ok().map(|v| v.shape().to_vec())).collect::<Option<_>>()?;
                let mut s = shapes[0].clone();
                s[0] = shapes.iter().map(|s| s[0]).sum();
                Some(s)
            }
        }
    }

    /// Where BFL tensor `name` is stored.
    fn source_of(&self, name: &str) -> Option<Source> {
        match self.layout {
            Layout::Bfl { prefix } => Some(Source::One(format!("{prefix}{name}"))),
            Layout::Diffusers => diffusers_source(name),
        }
    }

    fn read(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let missing = || candle_core::Error::Msg(format!("{}: no tensor for Flux weight {name}", self.source.display()));
        // Linear weights (2-D `.weight`) keep the fp8 storage dtype; the rest the model's.
        let is_linear_weight = name.ends_with(".weight") && self.shape_of(name).is_some_and(|s| s.len() == 2);
        let dtype = match self.frozen_weight_dtype {
            Some(d) if is_linear_weight => d,
            _ => dtype,
        };
        let load = |n: &str| -> Result<Tensor> {
            let t = self.files.load(n, dev).map_err(|_| missing())?;
            crate::ops::cast(&t, dtype)
        };
        match self.source_of(name).ok_or_else(missing)? {
            Source::One(n) => load(&n),
            Source::Cat(parts) => {
                // Concatenated as stored, then cast to the target dtype.
                let ts = parts.iter().map(|p| self.files.load(p, dev).map_err(|_| missing())).collect::<Result<Vec<_>>>()?;
                crate::ops::cast(&Tensor::cat(&ts, 0)?, dtype)
            }
            Source::SwapHalves(n) => {
                let t = self.files.load(&n, dev).map_err(|_| missing())?;
                let half = t.dim(0)? / 2;
                crate::ops::cast(&Tensor::cat(&[t.narrow(0, half, half)?, t.narrow(0, 0, half)?], 0)?, dtype)
            }
        }
    }

    /// A [`VarBuilder`] over these weights in `dtype`.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

impl SimpleBackend for FluxWeights {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.read(name, dtype, dev)?;
        if t.shape() != &s {
            bail!("{}: Flux weight {name} has shape {:?}, the model expects {:?}", self.source.display(), t.dims(), s.dims());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.read(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.shape_of(name).is_some()
    }
}

/// The diffusers tensor(s) of BFL tensor `name`.
fn diffusers_source(name: &str) -> Option<Source> {
    let (module, suffix) = name.rsplit_once('.')?;
    let one = |m: &str| Some(Source::One(format!("{m}.{suffix}")));
    let cat = |ms: &[String]| Some(Source::Cat(ms.iter().map(|m| format!("{m}.{suffix}")).collect()));
    let top = match module {
        "img_in" => Some("x_embedder"),
        "txt_in" => Some("context_embedder"),
        "time_in.in_layer" => Some("time_text_embed.timestep_embedder.linear_1"),
        "time_in.out_layer" => Some("time_text_embed.timestep_embedder.linear_2"),
        "guidance_in.in_layer" => Some("time_text_embed.guidance_embedder.linear_1"),
        "guidance_in.out_layer" => Some("time_text_embed.guidance_embedder.linear_2"),
        "vector_in.in_layer" => Some("time_text_embed.text_embedder.linear_1"),
        "vector_in.out_layer" => Some("time_text_embed.text_embedder.linear_2"),
        "final_layer.linear" => Some("proj_out"),
        "final_layer.adaLN_modulation.1" => return Some(Source::SwapHalves(format!("norm_out.linear.{suffix}"))),
        _ => None,
    };
    if let Some(m) = top {
        return one(m);
    }
    let parts: Vec<&str> = module.splitn(3, '.').collect();
    let [kind, index, rest] = parts.as_slice() else { return None };
    match *kind {
        "double_blocks" => {
            let s = format!("transformer_blocks.{index}");
            let norm = |n: &str| Some(Source::One(format!("{s}.attn.{n}.weight")));
            match (*rest, suffix) {
                ("img_mod.lin", _) => one(&format!("{s}.norm1.linear")),
                ("txt_mod.lin", _) => one(&format!("{s}.norm1_context.linear")),
                ("img_attn.qkv", _) => cat(&[format!("{s}.attn.to_q"), format!("{s}.attn.to_k"), format!("{s}.attn.to_v")]),
                ("txt_attn.qkv", _) => cat(&[format!("{s}.attn.add_q_proj"), format!("{s}.attn.add_k_proj"), format!("{s}.attn.add_v_proj")]),
                ("img_attn.norm.query_norm", "scale") => norm("norm_q"),
                ("img_attn.norm.key_norm", "scale") => norm("norm_k"),
                ("txt_attn.norm.query_norm", "scale") => norm("norm_added_q"),
                ("txt_attn.norm.key_norm", "scale") => norm("norm_added_k"),
                ("img_attn.proj", _) => one(&format!("{s}.attn.to_out.0")),
                ("txt_attn.proj", _) => one(&format!("{s}.attn.to_add_out")),
                ("img_mlp.0", _) => one(&format!("{s}.ff.net.0.proj")),
                ("img_mlp.2", _) => one(&format!("{s}.ff.net.2")),
                ("txt_mlp.0", _) => one(&format!("{s}.ff_context.net.0.proj")),
                ("txt_mlp.2", _) => one(&format!("{s}.ff_context.net.2")),
                _ => None,
            }
        }
        "single_blocks" => {
            let s = format!("single_transformer_blocks.{index}");
            match (*rest, suffix) {
                ("linear1", _) => cat(&[format!("{s}.attn.to_q"), format!("{s}.attn.to_k"), format!("{s}.attn.to_v"), format!("{s}.proj_mlp")]),
                ("linear2", _) => one(&format!("{s}.proj_out")),
                ("modulation.lin", _) => one(&format!("{s}.norm.linear")),
                ("norm.query_norm", "scale") => Some(Source::One(format!("{s}.attn.norm_q.weight"))),
                ("norm.key_norm", "scale") => Some(Source::One(format!("{s}.attn.norm_k.weight"))),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The diffusers tensor keys holding BFL tensor `module.suffix`, in row order, and whether the
/// one stored tensor has its halves swapped (for `loft lora merge` into a diffusers folder).
pub fn diffusers_pieces(module: &str, suffix: &str) -> Option<(Vec<String>, bool)> {
    match diffusers_source(&format!("{module}.{suffix}"))? {
        Source::One(k) => Some((vec![k], false)),
        Source::Cat(ks) => Some((ks, false)),
        Source::SwapHalves(k) => Some((vec![k], true)),
    }
}

/// ComfyUI's "scaled fp8" files store fp8 weights with a per-tensor scale (`scaled_fp8`,
/// `*.scale_weight`) that plain fp8 loading would ignore: refused rather than read wrongly.
fn refuse_scaled_fp8(files: &MmapedSafetensors, source: &Path) -> Result<()> {
    let scaled = files.tensors().iter().any(|(name, _)| name.ends_with("scaled_fp8") || name.ends_with(".scale_weight"));
    if scaled {
        bail!("{}: a ComfyUI \"scaled fp8\" checkpoint (per-tensor weight scales): Loft reads plain fp8, f16, bf16 or f32 Flux files", source.display());
    }
    Ok(())
}
