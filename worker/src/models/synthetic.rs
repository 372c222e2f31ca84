//! Full-size Stable Diffusion models with random weights, written as diffusers folders:
//! what `loft bench train --model sd15-synthetic|sdxl-synthetic` trains on, so that speed and
//! memory are measured at the sizes users train without downloading a checkpoint. The same
//! folder is what the PyTorch reference of the benchmark loads.
//!
//! Weights are drawn as candle's `VarMap` builders draw them (Kaiming-normal linears and
//! convs, unit norms), stored in f16 to halve the files; no tokenizer files are written (the
//! loader uses the built-in CLIP tokenizer).

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use serde_json::{json, Value};

use super::{AutoencoderKL, ClipTextConfig, ClipTextModel, ModelFamily, UNet2DConditionModel, UNetConfig, VaeConfig};

/// The model names `loft bench train --model` accepts besides a folder.
pub const NAMES: [&str; 2] = ["sd15-synthetic", "sdxl-synthetic"];

/// The family of a synthetic model name.
pub fn family_of(name: &str) -> Option<ModelFamily> {
    match name {
        "sd15-synthetic" => Some(ModelFamily::Sd15),
        "sdxl-synthetic" => Some(ModelFamily::Sdxl),
        _ => None,
    }
}

/// diffusers' configs of the real models (runwayml SD1.5, SD 2.1, SDXL base 1.0).
fn unet_config(family: ModelFamily) -> Value {
    match family {
        ModelFamily::Sdxl => json!({"_class_name": "UNet2DConditionModel", "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048, "use_linear_projection": true,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
            "transformer_layers_per_block": [1, 2, 10], "in_channels": 4, "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 2, "sample_size": 128}),
        ModelFamily::Sd2 => json!({"_class_name": "UNet2DConditionModel", "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
            "cross_attention_dim": 1024, "use_linear_projection": true, "in_channels": 4, "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 2, "sample_size": 96}),
        _ => json!({"_class_name": "UNet2DConditionModel", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
            "cross_attention_dim": 768, "in_channels": 4, "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 2, "sample_size": 64}),
    }
}

fn clip_config(hidden: usize, layers: usize, act: &str, with_projection: bool) -> Value {
    json!({"vocab_size": 49408, "hidden_size": hidden, "intermediate_size": hidden * 4, "num_hidden_layers": layers,
        "num_attention_heads": hidden / 64, "hidden_act": act, "projection_dim": if with_projection { 1280 } else { 768 },
        "max_position_embeddings": 77, "layer_norm_eps": 1e-5, "eos_token_id": 49407, "bos_token_id": 49406, "pad_token_id": 1,
        "model_type": "clip_text_model",
        "architectures": [if with_projection { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }]})
}

fn vae_config(scaling: f64) -> Value {
    json!({"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
        "latent_channels": 4, "in_channels": 3, "out_channels": 3, "norm_num_groups": 32, "act_fn": "silu",
        "down_block_types": vec!["DownEncoderBlock2D"; 4], "up_block_types": vec!["UpDecoderBlock2D"; 4],
        "scaling_factor": scaling, "sample_size": 512})
}

/// The full-size UNet and text-encoder configs of `family` (SD 1.5, SD 2.1 or SDXL), as diffusers
/// writes them: what the synthetic models are built from, and what planning a network at real
/// size reads (the text encoders with whether each has a projection).
pub fn configs(family: ModelFamily) -> Result<(UNetConfig, Vec<(ClipTextConfig, bool)>)> {
    let unet: UNetConfig = serde_json::from_value(unet_config(family))?;
    let encoders = match family {
        ModelFamily::Sdxl => vec![(clip_config(768, 12, "quick_gelu", false), false), (clip_config(1280, 32, "gelu", true), true)],
        // OpenCLIP ViT-H as transformers holds it: 23 of its 24 layers (SD 2.x uses the penultimate).
        ModelFamily::Sd2 => vec![(clip_config(1024, 23, "gelu", false), false)],
        _ => vec![(clip_config(768, 12, "quick_gelu", false), false)],
    };
    let encoders = encoders.into_iter().map(|(v, p)| Ok((serde_json::from_value(v)?, p))).collect::<Result<Vec<_>>>()?;
    Ok((unet, encoders))
}

/// Writes the synthetic `family` model into `dir` (a diffusers folder) unless a complete one
/// is already there. Returns whether it wrote.
pub fn ensure(family: ModelFamily, dir: &Path) -> Result<bool> {
    let done = dir.join(".complete");
    if done.is_file() {
        return Ok(false);
    }
    if family == ModelFamily::Sd2 {
        bail!("no synthetic SD 2.x model: use sd15-synthetic or sdxl-synthetic");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dev = Device::Cpu;
    let write_json = |rel: &str, v: &Value| -> Result<()> {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(&path, serde_json::to_vec_pretty(v)?).with_context(|| format!("cannot write {}", path.display()))
    };
    // One component at a time, so only one is in memory.
    let save = |varmap: &VarMap, rel: &str| -> Result<()> {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().expect("a file in a folder"))?;
        varmap.save(&path).with_context(|| format!("cannot write {}", path.display()))
    };
    let unet_json = unet_config(family);
    let unet_cfg: UNetConfig = serde_json::from_value(unet_json.clone())?;
    let vm = VarMap::new();
    UNet2DConditionModel::new(&unet_cfg, VarBuilder::from_varmap(&vm, DType::F16, &dev))?;
    save(&vm, "unet/diffusion_pytorch_model.safetensors")?;
    write_json("unet/config.json", &unet_json)?;
    drop(vm);
    let encoders: Vec<(&str, Value, bool)> = match family {
        ModelFamily::Sdxl => vec![
            ("text_encoder", clip_config(768, 12, "quick_gelu", false), false),
            ("text_encoder_2", clip_config(1280, 32, "gelu", true), true),
        ],
        _ => vec![("text_encoder", clip_config(768, 12, "quick_gelu", false), false)],
    };
    for (name, cfg_json, projection) in &encoders {
        let cfg: ClipTextConfig = serde_json::from_value(cfg_json.clone())?;
        let vm = VarMap::new();
        ClipTextModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F16, &dev), *projection)?;
        save(&vm, &format!("{name}/model.safetensors"))?;
        write_json(&format!("{name}/config.json"), cfg_json)?;
    }
    let vae_json = vae_config(if family == ModelFamily::Sdxl { 0.13025 } else { 0.18215 });
    let vae_cfg: VaeConfig = serde_json::from_value(vae_json.clone())?;
    let vm = VarMap::new();
    AutoencoderKL::new(&vae_cfg, VarBuilder::from_varmap(&vm, DType::F16, &dev))?;
    save(&vm, "vae/diffusion_pytorch_model.safetensors")?;
    write_json("vae/config.json", &vae_json)?;
    write_json(
        "scheduler/scheduler_config.json",
        &json!({"_class_name": "DDPMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1}),
    )?;
    let (class, second) = match family {
        ModelFamily::Sdxl => ("StableDiffusionXLPipeline", true),
        _ => ("StableDiffusionPipeline", false),
    };
    let mut index = json!({"_class_name": class, "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "DDPMScheduler"]});
    if second {
        index["text_encoder_2"] = json!(["transformers", "CLIPTextModelWithProjection"]);
    }
    write_json("model_index.json", &index)?;
    std::fs::write(&done, b"")?;
    Ok(true)
}
