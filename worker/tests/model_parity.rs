//! Parity of Loft's models with diffusers / transformers on the tiny fixtures of
//! `tests/parity/make_model_fixtures.py`, and the checks that make them trainable: every
//! parameter gets a gradient, every layer is reachable by its module path and hookable.

mod common;
use common::parity::{check, dev, rel_err};

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use loft_worker::models::config::read_json;
use loft_worker::models::{
    kohya_name, AddedCond, AutoencoderKL, ClipTextModel, ModelLayers, UNet2DConditionModel, UNetConfig, VaeConfig,
};
use loft_worker::networks::BaseLayer;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models")
}

fn sd15() -> PathBuf {
    fixtures().join("tiny-sd15")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("tiny-sd15-ref.safetensors"), &dev()).unwrap()
}

#[test]
fn unet_sd15_matches_diffusers() {
    let r = reference();
    let unet = UNet2DConditionModel::from_diffusers_dir(&sd15().join("unet"), DType::F32, &dev()).unwrap();
    let out = unet.forward(&r["unet.sample"], &r["unet.timesteps"], &r["unet.encoder_hidden_states"], None).unwrap();
    check("unet (sd15, per-sample timesteps)", &out, &r["unet.out"]);
}

#[test]
fn unet_sd21_linear_projection_matches_diffusers() {
    let r = reference();
    let dir = fixtures().join("tiny-sd21-unet");
    let unet = UNet2DConditionModel::from_diffusers_dir(&dir, DType::F32, &dev()).unwrap();
    assert!(unet.layer("down_blocks.0.attentions.0.proj_in").unwrap().is_linear());
    assert!(unet.layer("mid_block.attentions.0.transformer_blocks.1.attn2.to_k").is_some());
    let out = unet.forward(&r["unet21.sample"], &r["unet21.timesteps"], &r["unet21.encoder_hidden_states"], None).unwrap();
    check("unet (sd21-style: linear proj, 2 transformer layers, head list)", &out, &r["unet21.out"]);
}

fn sdxl() -> PathBuf {
    fixtures().join("tiny-sdxl")
}

#[test]
fn unet_sdxl_matches_diffusers() {
    let r = reference();
    let unet = UNet2DConditionModel::from_diffusers_dir(&sdxl().join("unet"), DType::F32, &dev()).unwrap();
    assert!(unet.layer("add_embedding.linear_1").is_some());
    assert!(unet.layer("down_blocks.1.attentions.0.transformer_blocks.1.ff.net.2").is_some());
    let added = AddedCond { text_embeds: r["unetxl.text_embeds"].clone(), time_ids: r["unetxl.time_ids"].clone() };
    let out = unet
        .forward(&r["unetxl.sample"], &r["unetxl.timesteps"], &r["unetxl.encoder_hidden_states"], Some(&added))
        .unwrap();
    check("unet (sdxl-style: text_time added conditions, depth per block)", &out, &r["unetxl.out"]);
    let err = unet.forward(&r["unetxl.sample"], &r["unetxl.timesteps"], &r["unetxl.encoder_hidden_states"], None);
    assert!(err.unwrap_err().to_string().contains("text_embeds"));
}

#[test]
fn sdxl_text_encoder_2_matches_transformers() {
    let r = reference();
    let te2 = ClipTextModel::from_transformers_dir(&sdxl().join("text_encoder_2"), DType::F32, &dev()).unwrap();
    assert_eq!(te2.config.hidden_act, "gelu");
    let out = te2.forward(&r["te2.input_ids"]).unwrap();
    check("text encoder 2 last_hidden_state", &out.last_hidden_state, &r["te2.last_hidden_state"]);
    let n = out.hidden_states.len();
    check("text encoder 2 penultimate", &out.hidden_states[n - 2], &r["te2.penultimate"]);
    check("text encoder 2 text_embeds (projected pooled)", out.text_embeds.as_ref().unwrap(), &r["te2.text_embeds"]);
}

#[test]
fn unet_timesteps_are_per_sample() {
    // Sample 1 of a batch run with timesteps [999, 10] equals a batch-of-one run at 10.
    let r = reference();
    let unet = UNet2DConditionModel::from_diffusers_dir(&sd15().join("unet"), DType::F32, &dev()).unwrap();
    let x = r["unet.sample"].narrow(0, 1, 1).unwrap();
    let c = r["unet.encoder_hidden_states"].narrow(0, 1, 1).unwrap();
    let t = Tensor::new(&[10f32], &dev()).unwrap();
    let one = unet.forward(&x, &t, &c, None).unwrap();
    check("unet sample 1 alone", &one, &r["unet.out"].narrow(0, 1, 1).unwrap());
}

#[test]
fn clip_text_encoder_matches_transformers() {
    let r = reference();
    let te = ClipTextModel::from_transformers_dir(&sd15().join("text_encoder"), DType::F32, &dev()).unwrap();
    let out = te.forward(&r["te.input_ids"]).unwrap();
    check("text encoder last_hidden_state", &out.last_hidden_state, &r["te.last_hidden_state"]);
    let n = out.hidden_states.len();
    check("text encoder penultimate", &out.hidden_states[n - 2], &r["te.penultimate"]);
    check("text encoder pooled", &out.pooled, &r["te.pooled"]);
}

#[test]
fn vae_matches_diffusers() {
    let r = reference();
    let vae = AutoencoderKL::from_diffusers_dir(&sd15().join("vae"), DType::F32, &dev()).unwrap();
    check("vae encode mean", &vae.encode(&r["vae.image"]).unwrap(), &r["vae.encode_mean"]);
    check("vae decode", &vae.decode(&r["vae.latents"]).unwrap(), &r["vae.decode"]);
    assert!((vae.scaling_factor() - 0.18215).abs() < 1e-12);
}

#[test]
fn f16_and_bf16_weight_files_load_into_f32() {
    // The same UNet saved with f16 / bf16 weights, read into f32 compute (what the CPU does:
    // candle's CPU matmul has no bf16).
    let r = reference();
    let src = candle_core::safetensors::load(sd15().join("unet/diffusion_pytorch_model.safetensors"), &dev()).unwrap();
    for (dtype, tol) in [(DType::F16, 5e-3), (DType::BF16, 5e-2)] {
        let dir = std::env::temp_dir().join(format!("loft-model-parity-{}-{dtype:?}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(sd15().join("unet/config.json"), dir.join("config.json")).unwrap();
        let half: HashMap<String, Tensor> = src.iter().map(|(k, v)| (k.clone(), v.to_dtype(dtype).unwrap())).collect();
        candle_core::safetensors::save(&half, dir.join("diffusion_pytorch_model.safetensors")).unwrap();
        let unet = UNet2DConditionModel::from_diffusers_dir(&dir, DType::F32, &dev()).unwrap();
        let out = unet.forward(&r["unet.sample"], &r["unet.timesteps"], &r["unet.encoder_hidden_states"], None).unwrap();
        assert_eq!(out.dtype(), DType::F32);
        let e = rel_err(&out, &r["unet.out"]);
        println!("unet from {dtype:?} weights in f32: relative error {e:.3e}");
        assert!(e < tol, "unet from {dtype:?} weights: relative error {e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn f16_compute_runs_close_to_f32() {
    let r = reference();
    let dtype = DType::F16;
    let unet = UNet2DConditionModel::from_diffusers_dir(&sd15().join("unet"), dtype, &dev()).unwrap();
    let out = unet
        .forward(
            &r["unet.sample"].to_dtype(dtype).unwrap(),
            &r["unet.timesteps"],
            &r["unet.encoder_hidden_states"].to_dtype(dtype).unwrap(),
            None,
        )
        .unwrap();
    assert_eq!(out.dtype(), dtype);
    let e = rel_err(&out, &r["unet.out"]);
    println!("unet computed in f16: relative error {e:.3e}");
    assert!(e < 1e-2, "unet in f16: relative error {e}");
}

/// Every tensor of the weight file belongs to a listed layer (weight/bias) or to one of the
/// few non-layer tensors, so adapters can reach every Linear/Conv2d by name.
#[test]
fn every_weight_belongs_to_a_named_layer() {
    let cases: Vec<(PathBuf, &str, Box<dyn ModelLayers>, Vec<&str>)> = vec![
        (
            sd15().join("unet/diffusion_pytorch_model.safetensors"),
            "unet",
            Box::new(UNet2DConditionModel::from_diffusers_dir(&sd15().join("unet"), DType::F32, &dev()).unwrap()),
            vec![],
        ),
        (
            sd15().join("text_encoder/model.safetensors"),
            "te",
            Box::new(ClipTextModel::from_transformers_dir(&sd15().join("text_encoder"), DType::F32, &dev()).unwrap()),
            vec!["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"],
        ),
        (
            sdxl().join("unet/diffusion_pytorch_model.safetensors"),
            "sdxl unet",
            Box::new(UNet2DConditionModel::from_diffusers_dir(&sdxl().join("unet"), DType::F32, &dev()).unwrap()),
            vec![],
        ),
        (
            sdxl().join("text_encoder_2/model.safetensors"),
            "sdxl te2",
            Box::new(ClipTextModel::from_transformers_dir(&sdxl().join("text_encoder_2"), DType::F32, &dev()).unwrap()),
            vec!["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"],
        ),
        (
            sd15().join("vae/diffusion_pytorch_model.safetensors"),
            "vae",
            Box::new(AutoencoderKL::from_diffusers_dir(&sd15().join("vae"), DType::F32, &dev()).unwrap()),
            vec![],
        ),
    ];
    for (file, what, model, extra) in cases {
        let keys: HashSet<String> = candle_core::safetensors::load(&file, &dev()).unwrap().into_keys().collect();
        let mut covered: HashSet<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut names = HashSet::new();
        for l in model.layers() {
            assert!(names.insert(l.name().to_string()), "{what}: duplicate layer name {}", l.name());
            covered.insert(format!("{}.weight", l.name()));
            if l.base().bias.is_some() {
                covered.insert(format!("{}.bias", l.name()));
            }
        }
        let missing: Vec<_> = keys.difference(&covered).collect();
        let invented: Vec<_> = covered.difference(&keys).collect();
        assert!(missing.is_empty(), "{what}: tensors not reachable through a layer: {missing:?}");
        assert!(invented.is_empty(), "{what}: layers without a tensor in the file: {invented:?}");
    }
}

#[test]
fn layers_have_kohya_names_and_kinds() {
    let unet = UNet2DConditionModel::from_diffusers_dir(&sd15().join("unet"), DType::F32, &dev()).unwrap();
    let names: Vec<String> = unet.layers().iter().filter(|l| !l.is_norm()).map(|l| kohya_name("lora_unet", l.name())).collect();
    for want in [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2",
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
        "lora_unet_down_blocks_0_downsamplers_0_conv",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v",
        "lora_unet_up_blocks_0_upsamplers_0_conv",
        "lora_unet_up_blocks_1_attentions_1_proj_out",
        "lora_unet_time_embedding_linear_1",
        "lora_unet_conv_in",
        "lora_unet_conv_out",
    ] {
        assert!(names.iter().any(|n| n == want), "missing {want}");
    }
    assert!(unet.layer("down_blocks.0.attentions.0.proj_in").unwrap().is_conv());
    assert!(unet.layer("down_blocks.0.resnets.0.norm1").unwrap().is_norm());
    let te = ClipTextModel::from_transformers_dir(&sd15().join("text_encoder"), DType::F32, &dev()).unwrap();
    let te_names: Vec<String> = te.layers().iter().map(|l| kohya_name("lora_te", l.name())).collect();
    assert!(te_names.iter().any(|n| n == "lora_te_text_model_encoder_layers_1_self_attn_out_proj"));
    assert!(te_names.iter().any(|n| n == "lora_te_text_model_encoder_layers_0_mlp_fc1"));
}

#[test]
fn hooks_replace_a_layers_forward() {
    let r = reference();
    let unet = UNet2DConditionModel::from_diffusers_dir(&sd15().join("unet"), DType::F32, &dev()).unwrap();
    let run = || unet.forward(&r["unet.sample"], &r["unet.timesteps"], &r["unet.encoder_hidden_states"], None).unwrap();
    let base = run();
    let layer = unet.layer("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").unwrap();
    // A hook that reproduces the base layer leaves the output unchanged …
    layer.set_hook(Some(Arc::new(|b: &BaseLayer, x: &Tensor| b.forward(x))));
    assert!(rel_err(&run(), &base) < 1e-7);
    // … one that changes it changes the output, and removing it restores the model.
    layer.set_hook(Some(Arc::new(|b: &BaseLayer, x: &Tensor| b.forward(x)? * 1.5)));
    assert!(rel_err(&run(), &base) > 1e-4);
    unet.clear_hooks();
    assert!(rel_err(&run(), &base) < 1e-7);
}

/// Asserts that every variable of `varmap` received a non-zero gradient from `loss`.
fn assert_all_grads(what: &str, varmap: &VarMap, loss: &Tensor) {
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let mut missing = Vec::new();
    for (name, var) in data.iter() {
        let ok = grads
            .get(var.as_tensor())
            .map(|g| g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0)
            .unwrap_or(false);
        if !ok {
            missing.push(name.clone());
        }
    }
    missing.sort();
    assert!(missing.is_empty(), "{what}: {} of {} parameters got no gradient: {missing:?}", missing.len(), data.len());
    println!("{what}: all {} parameters got a gradient", data.len());
}

#[test]
fn every_unet_parameter_gets_a_gradient() {
    let dev = Device::Cpu;
    for cfg_dir in [sd15().join("unet"), fixtures().join("tiny-sd21-unet"), sdxl().join("unet")] {
        let cfg: UNetConfig = read_json(&cfg_dir.join("config.json")).unwrap();
        let varmap = VarMap::new();
        let unet = UNet2DConditionModel::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        let cross = match &cfg.cross_attention_dim {
            loft_worker::models::config::PerBlock::One(c) => *c,
            loft_worker::models::config::PerBlock::Each(v) => v[0],
        };
        // Odd, non-square latents exercise the upsample-to-skip-size path and conv backward.
        let x = Tensor::randn(0f32, 1.0, (2, 4, 6, 10), &dev).unwrap();
        let t = Tensor::new(&[900f32, 3.0], &dev).unwrap();
        let c = Tensor::randn(0f32, 1.0, (2, 5, cross), &dev).unwrap();
        let target = Tensor::randn(0f32, 1.0, (2, 4, 6, 10), &dev).unwrap();
        let added = cfg.projection_class_embeddings_input_dim.map(|d| AddedCond {
            text_embeds: Tensor::randn(0f32, 1.0, (2, d - 6 * cfg.addition_time_embed_dim.unwrap()), &dev).unwrap(),
            time_ids: Tensor::new(&[[48f32, 80., 0., 0., 48., 80.], [1024., 1024., 8., 16., 1024., 1024.]], &dev).unwrap(),
        });
        let out = unet.forward(&x, &t, &c, added.as_ref()).unwrap();
        let loss = (out - target).unwrap().sqr().unwrap().mean_all().unwrap();
        assert_all_grads(&format!("unet {}", cfg_dir.display()), &varmap, &loss);
    }
}

#[test]
fn every_text_encoder_and_vae_parameter_gets_a_gradient() {
    let dev = Device::Cpu;
    let cfg = read_json(&sd15().join("text_encoder/config.json")).unwrap();
    let varmap = VarMap::new();
    let te = ClipTextModel::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev), false).unwrap();
    let ids = reference()["te.input_ids"].clone();
    let out = te.forward(&ids).unwrap();
    let w = Tensor::randn(0f32, 1.0, out.last_hidden_state.dims(), &dev).unwrap();
    let loss = ((out.last_hidden_state * w).unwrap().sum_all().unwrap() + out.pooled.sum_all().unwrap()).unwrap();
    assert_all_grads("text encoder", &varmap, &loss);

    let cfg: VaeConfig = read_json(&sd15().join("vae/config.json")).unwrap();
    let varmap = VarMap::new();
    let vae = AutoencoderKL::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
    let img = Tensor::randn(0f32, 1.0, (1, 3, 16, 24), &dev).unwrap();
    let (mean, logvar) = vae.encode_moments(&img).unwrap();
    let dec = vae.decode(&mean).unwrap();
    let loss = (dec.sqr().unwrap().mean_all().unwrap() + logvar.mean_all().unwrap()).unwrap();
    assert_all_grads("vae", &varmap, &loss);
}

/// Every Linear/Conv2d of the tiny SDXL UNet has an LDM (sd-scripts SDXL) name, and no two share one.
#[test]
fn sdxl_unet_layers_all_have_distinct_ldm_names() {
    use loft_worker::models::ldm_names::{sdxl_kohya_unet_name, UNetLayout};
    use loft_worker::models::ModelLayers;
    use loft_worker::networks::LayerKind;
    let unet = UNet2DConditionModel::from_diffusers_dir(&sdxl().join("unet"), DType::F32, &dev()).unwrap();
    let layout = UNetLayout::from_config(&unet.config);
    let mut names = std::collections::HashSet::new();
    let mut count = 0;
    for layer in unet.layers() {
        if !matches!(layer.kind(), LayerKind::Linear { .. } | LayerKind::Conv2d { .. }) {
            continue;
        }
        let name = sdxl_kohya_unet_name(layer.name(), &layout).unwrap_or_else(|| panic!("no LDM name for {}", layer.name()));
        assert!(names.insert(name.clone()), "{name} twice");
        count += 1;
    }
    assert!(count > 50, "{count} layers");
    assert!(names.contains("lora_unet_input_blocks_3_0_op") || names.iter().any(|n| n.ends_with("_0_op")));
}
