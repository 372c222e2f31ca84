//! Flux.1 parity with diffusers / transformers / sd-scripts on the tiny fixtures of
//! `tests/parity/make_flux_fixtures.py`: the transformer's forward (dev and schnell, from the
//! diffusers folder and from BFL's single file), the gradient of every transformer weight, the
//! T5 encoder with and without its mask, the 16-channel VAE, latent packing and RoPE ids.

mod common;
use common::parity::{check, dev, rel_err, tol};

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use loft_worker::models::flux::{pack_latents, unpack_latents, FluxConfig, FluxInputs, FluxTransformer};
use loft_worker::models::flux_weights::FluxWeights;
use loft_worker::models::t5::{T5EncoderModel, T5Tokenizer};
use loft_worker::models::{AutoencoderKL, ModelLayers};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("tiny-flux-ref.safetensors"), &dev()).unwrap()
}

fn floats(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn run(model: &FluxTransformer, r: &HashMap<String, Tensor>, guidance: bool) -> Tensor {
    let ts = floats(&r["flux.timestep"]);
    let g = floats(&r["flux.guidance"]);
    let inputs = FluxInputs {
        txt: &r["flux.txt"],
        pooled: &r["flux.pooled"],
        timesteps: &ts,
        guidance: guidance.then_some(g.as_slice()),
        grid: (2, 3),
        txt_mask: None,
    };
    model.forward(&r["flux.packed"], &inputs).unwrap()
}

fn diffusers_model(variant: &str) -> FluxTransformer {
    let dir = fixtures().join(format!("tiny-flux-{variant}/transformer"));
    let cfg = FluxConfig::from_diffusers_json(&dir.join("config.json")).unwrap();
    FluxTransformer::new(&cfg, FluxWeights::diffusers_dir(&dir).unwrap().var_builder(DType::F32, &dev())).unwrap()
}

#[test]
fn packing_matches_diffusers() {
    let r = reference();
    check("pack_latents", &pack_latents(&r["flux.latents"]).unwrap(), &r["flux.packed"]);
    check("unpack_latents", &unpack_latents(&r["flux.packed"], 4, 6).unwrap(), &r["flux.latents"]);
}

#[test]
fn transformer_matches_diffusers_dev_and_schnell() {
    let r = reference();
    let dev_model = diffusers_model("dev");
    assert!(dev_model.config.guidance_embed);
    check("dev (diffusers folder)", &run(&dev_model, &r, true), &r["dev.out"]);
    let schnell = diffusers_model("schnell");
    assert!(!schnell.config.guidance_embed);
    check("schnell (diffusers folder)", &run(&schnell, &r, false), &r["schnell.out"]);
    // Plain attention gives the same numbers as the memory-efficient one.
    dev_model.set_memory_efficient_attention(false);
    check("dev, plain attention", &run(&dev_model, &r, true), &r["dev.out"]);
}

/// apply_t5_attn_mask: padded text keys are hidden from every attention, as diffusers (and
/// sd-scripts' SDPA) with the key mask: T5's trailing padding (kept memory-efficient, per
/// sample) and a mask with a gap (plain attention).
#[test]
fn text_mask_matches_diffusers() {
    let r = reference();
    let model = diffusers_model("dev");
    let ts = floats(&r["flux.timestep"]);
    let g = floats(&r["flux.guidance"]);
    for name in ["masked", "masked_gap"] {
        let mask = &r[&format!("flux.txt_{name}")];
        let inputs = FluxInputs { txt: &r["flux.txt"], pooled: &r["flux.pooled"], timesteps: &ts, guidance: Some(&g), grid: (2, 3), txt_mask: Some(mask) };
        check(&format!("dev, {name}"), &model.forward(&r["flux.packed"], &inputs).unwrap(), &r[&format!("dev.out_{name}")]);
    }
}

#[test]
fn bfl_single_file_loads_the_same_model() {
    let r = reference();
    let weights = FluxWeights::bfl_file(&fixtures().join("tiny-flux-dev.safetensors")).unwrap();
    let axes = FluxConfig::from_diffusers_json(&fixtures().join("tiny-flux-dev/transformer/config.json")).unwrap().axes_dim;
    let cfg = weights.config_from_shapes(Some(axes)).unwrap();
    assert_eq!(cfg, FluxConfig::from_diffusers_json(&fixtures().join("tiny-flux-dev/transformer/config.json")).unwrap());
    let model = FluxTransformer::new(&cfg, weights.var_builder(DType::F32, &dev())).unwrap();
    check("dev (BFL file)", &run(&model, &r, true), &r["dev.out"]);
    // Without a config the 16-wide heads' RoPE axes are unknown: a clear error.
    let err = FluxWeights::bfl_file(&fixtures().join("tiny-flux-dev.safetensors")).unwrap().config_from_shapes(None).unwrap_err();
    assert!(err.to_string().contains("RoPE axes"), "{err}");
    // Flux.1's own sizes come out of full-size shapes.
    let full = FluxConfig::flux1(true);
    let shape = |name: &str| -> Option<Vec<usize>> {
        Some(match name {
            "img_in.weight" => vec![3072, 64],
            "double_blocks.0.img_attn.norm.query_norm.scale" => vec![128],
            "final_layer.linear.weight" => vec![64, 3072],
            "txt_in.weight" => vec![3072, 4096],
            "vector_in.in_layer.weight" => vec![3072, 768],
            "double_blocks.0.img_mlp.0.weight" => vec![12288, 3072],
            "guidance_in.in_layer.weight" => vec![3072, 256],
            n if n.starts_with("double_blocks.") && n.ends_with("img_attn.qkv.weight") => {
                let i: usize = n.split('.').nth(1)?.parse().ok()?;
                (i < 19).then(|| vec![9216, 3072])?
            }
            n if n.starts_with("single_blocks.") && n.ends_with("linear1.weight") => {
                let i: usize = n.split('.').nth(1)?.parse().ok()?;
                (i < 38).then(|| vec![21504, 3072])?
            }
            _ => return None,
        })
    };
    assert_eq!(FluxConfig::from_bfl_shapes(&shape, None).unwrap(), full);
}

/// Every transformer weight's gradient of `sum(out · w)` equals PyTorch's (BFL names; the
/// diffusers q/k/v gradients concatenated as the weights are).
#[test]
fn every_transformer_weight_gradient_matches_pytorch() {
    let r = reference();
    let cfg = FluxConfig::from_diffusers_json(&fixtures().join("tiny-flux-dev/transformer/config.json")).unwrap();
    let mut varmap = VarMap::new();
    let model = FluxTransformer::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev())).unwrap();
    varmap.load(fixtures().join("tiny-flux-dev.safetensors")).unwrap();
    let out = run(&model, &r, true);
    check("dev (VarMap)", &out, &r["dev.out"]);
    let loss = (out * &r["dev.loss_weights"]).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let mut checked = 0;
    for (name, var) in data.iter() {
        let want = r.get(&format!("dev.grad.{name}")).unwrap_or_else(|| panic!("no reference gradient for {name}"));
        let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
        let e = rel_err(got, want);
        assert!(e <= 10.0 * tol(), "{name}: gradient relative error {e:.3e}");
        checked += 1;
    }
    let expected = r.keys().filter(|k| k.starts_with("dev.grad.")).count();
    assert_eq!(checked, expected, "every weight of the reference has a variable");
    println!("{checked} weight gradients equal PyTorch's");
}

#[test]
fn flux_layers_are_the_linear_layers_under_bfl_names() {
    let model = diffusers_model("dev");
    let names: Vec<&str> = model.layers().iter().map(|l| l.name()).collect();
    for want in ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.2", "single_blocks.1.linear1", "single_blocks.0.modulation.lin", "guidance_in.in_layer", "final_layer.adaLN_modulation.1"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert!(model.layers().iter().all(|l| l.is_linear()));
}

#[test]
fn t5_encoder_and_tokenizer_match_transformers() {
    let r = reference();
    let dir = fixtures().join("tiny-flux-dev");
    let tok = T5Tokenizer::from_dir(&dir.join("tokenizer_2")).unwrap();
    let want_ids: Vec<i64> = r["t5.input_ids"].flatten_all().unwrap().to_vec1().unwrap();
    let want_mask: Vec<i64> = r["t5.mask"].flatten_all().unwrap().to_vec1().unwrap();
    let mut ids = vec![];
    let mut mask = vec![];
    for p in ["a photo of a cat", "the tiny dog at the sea, 4k"] {
        let (i, m) = tok.encode(p, 16).unwrap();
        ids.extend(i);
        mask.extend(m);
    }
    assert_eq!(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), want_ids);
    assert_eq!(mask.iter().map(|&i| i as i64).collect::<Vec<_>>(), want_mask);
    let t5 = T5EncoderModel::from_transformers_dir(&dir.join("text_encoder_2"), DType::F32, &dev()).unwrap();
    let ids = Tensor::from_vec(ids, (2, 16), &dev()).unwrap();
    let mask = Tensor::from_vec(mask, (2, 16), &dev()).unwrap();
    check("t5 (no mask)", &t5.forward(&ids, None).unwrap(), &r["t5.out"]);
    check("t5 (mask)", &t5.forward(&ids, Some(&mask)).unwrap(), &r["t5.out_masked"]);
}

#[test]
fn flux_vae_matches_diffusers() {
    let r = reference();
    let vae = AutoencoderKL::from_diffusers_dir(&fixtures().join("tiny-flux-dev/vae"), DType::F32, &dev()).unwrap();
    assert_eq!(vae.config.latent_channels, 16);
    check("vae encode", &vae.encode(&r["vae.image"]).unwrap(), &r["vae.mean"]);
    check("vae decode", &vae.decode(&r["vae.latents"]).unwrap(), &r["vae.decode"]);
    // Flux's latents are shifted then scaled.
    let z = &r["vae.latents"];
    let scaled = vae.to_model_latents(z).unwrap();
    let by_hand = ((z - 0.1159).unwrap() * 0.3611).unwrap();
    check("to_model_latents", &scaled, &by_hand);
    check("round trip", &vae.from_model_latents(&scaled).unwrap(), z);
}

/// σ sampling, noisy inputs, the prediction types and the weightings equal sd-scripts'
/// functions (`flux_train_utils.py`, run by the fixture script on the same draws).
#[test]
fn objective_matches_sd_scripts() {
    use loft_worker::flow::{noisy_input, sampling_schedule, Draws, FlowOptions};
    let r = reference();
    let draws = Draws { uniform: floats(&r["obj.rand"]).iter().map(|&v| v as f64).collect(), normal: floats(&r["obj.randn"]).iter().map(|&v| v as f64).collect() };
    let latents = &r["obj.latents"];
    let noise = &r["obj.noise"];
    let (_, _, h, w) = latents.dims4().unwrap();
    let base = FlowOptions::default();
    let cases: Vec<(&str, FlowOptions)> = vec![
        ("sigma", base.clone()),
        ("sigma_logit", FlowOptions { weighting_scheme: "logit_normal".into(), logit_mean: 0.2, logit_std: 1.3, ..base.clone() }),
        ("sigma_mode", FlowOptions { weighting_scheme: "mode".into(), ..base.clone() }),
        ("uniform", FlowOptions { timestep_sampling: "uniform".into(), model_prediction_type: "raw".into(), ..base.clone() }),
        ("sigmoid", FlowOptions { timestep_sampling: "sigmoid".into(), sigmoid_scale: 1.7, model_prediction_type: "additive".into(), ..base.clone() }),
        ("shift", FlowOptions { timestep_sampling: "shift".into(), discrete_flow_shift: 3.1582, sigmoid_scale: 1.2, ..base.clone() }),
        ("flux_shift", FlowOptions { timestep_sampling: "flux_shift".into(), weighting_scheme: "cosmap".into(), ..base.clone() }),
        ("sigma_sqrt", FlowOptions { timestep_sampling: "uniform".into(), weighting_scheme: "sigma_sqrt".into(), ..base.clone() }),
    ];
    for (name, opts) in cases {
        opts.check().unwrap();
        let sigmas = opts.sigmas(&draws, h, w);
        let want: Vec<f32> = floats(&r[&format!("obj.{name}.sigmas")]);
        for (got, want) in sigmas.iter().zip(&want) {
            assert!((*got as f32 - want).abs() <= 1e-6, "{name}: σ {got} vs sd-scripts {want}");
        }
        let sigma_t = Tensor::from_vec(sigmas.iter().map(|&s| s as f32).collect::<Vec<_>>(), (sigmas.len(), 1, 1, 1), &dev()).unwrap();
        let noisy = noisy_input(latents, noise, &sigma_t).unwrap();
        check(&format!("{name} noisy"), &noisy, &r[&format!("obj.{name}.noisy")]);
        check(&format!("{name} model_pred"), &opts.apply_prediction_type(&r["obj.pred"], &noisy, &sigma_t).unwrap(), &r[&format!("obj.{name}.model_pred")]);
        let weights: Vec<f32> = sigmas.iter().map(|&s| opts.weighting(s) as f32).collect();
        let want_w = floats(&r[&format!("obj.{name}.weighting")]);
        for (g, w) in weights.iter().zip(&want_w) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{name}: weighting {g} vs {w}");
        }
    }
    // The target is noise − latents.
    check("target", &(noise - latents).unwrap(), &r["obj.target"]);
    // The sampling schedules.
    for (key, steps, seq, shift) in [("obj.schedule_shift", 5, 6, true), ("obj.schedule_plain", 5, 6, false), ("obj.schedule_1024", 28, 4096, true)] {
        let got = sampling_schedule(steps, seq, shift);
        let want = floats(&r[key]);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f32 - w).abs() <= 1e-6, "{key}: {g} vs {w}");
        }
    }
}

/// A LoRA trained by Loft (`tiny-flux-dev-lora.safetensors`) merges into BFL's single file and
/// into the diffusers folder to the weights of kohya's merge math
/// (`tests/parity/make_flux_merge_fixtures.py`): fused layers cut into diffusers' q/k/v and
/// proj_mlp, CLIP-L's layers too.
#[test]
fn a_loft_flux_lora_merges_into_both_layouts_as_the_reference() {
    use loft_worker::lora_file::merge::{merge, MergeInput};
    use loft_worker::lora_file::{LoraFile, MultiplierRule};
    let want = candle_core::safetensors::load(fixtures().join("tiny-flux-dev-lora-merged-ref.safetensors"), &Device::Cpu).unwrap();
    let input = || vec![MergeInput { file: LoraFile::load(&fixtures().join("tiny-flux-dev-lora.safetensors")).unwrap(), multiplier: 1.0, rule: MultiplierRule::Lycoris }];
    let tmp = tempfile::tempdir().unwrap();

    let bfl_out = tmp.path().join("merged.safetensors");
    let report = merge(&fixtures().join("tiny-flux-dev.safetensors"), &input(), &bfl_out, None).unwrap();
    assert_eq!(report.files[0].matched, 26, "the transformer's modules; {:?}", report.files[0].unmatched);
    let got = candle_core::safetensors::load(&bfl_out, &Device::Cpu).unwrap();
    let mut n = 0;
    for (key, w) in &want {
        if let Some(k) = key.strip_prefix("bfl.") {
            check(&format!("BFL {k}"), &got[k], w);
            n += 1;
        }
    }
    assert_eq!(n, 26);

    let dir_out = tmp.path().join("merged-folder");
    let report = merge(&fixtures().join("tiny-flux-dev"), &input(), &dir_out, None).unwrap();
    assert_eq!(report.files[0].matched, 38, "{:?}", report.files[0].unmatched);
    let tr = candle_core::safetensors::load(dir_out.join("transformer/diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    let te = candle_core::safetensors::load(dir_out.join("text_encoder/model.safetensors"), &Device::Cpu).unwrap();
    let mut n = 0;
    for (key, w) in &want {
        if let Some(k) = key.strip_prefix("diffusers.transformer.") {
            check(&format!("diffusers {k}"), &tr[k], w);
            n += 1;
        } else if let Some(k) = key.strip_prefix("diffusers.text_encoder.") {
            check(&format!("text encoder {k}"), &te[k], w);
            n += 1;
        }
    }
    assert_eq!(n, 52);
    // The merged folder loads and runs.
    let m = loft_worker::models::pipeline::StableDiffusion::load(&dir_out, DType::F32, &dev()).unwrap();
    assert!(m.flux().is_some());
}

/// Sampling equals sd-scripts' `denoise` (shifted Euler schedule, embedded guidance, true CFG
/// with the negative conditions first) on the tiny dev transformer.
#[test]
fn sampling_matches_sd_scripts_denoise() {
    use loft_worker::sample::{flux_denoise, FluxCond};
    let r = reference();
    let model = diffusers_model("dev");
    let txt = &r["sample.txt"];
    let pooled = &r["sample.pooled"];
    let pos = FluxCond { txt: &txt.narrow(0, 1, 1).unwrap(), pooled: &pooled.narrow(0, 1, 1).unwrap(), mask: None, grid: (2, 3), dtype: DType::F32 };
    let plain = flux_denoise(&model, r["sample.noise"].clone(), &pos, 4, 3.5, 1.0).unwrap();
    check("denoise", &plain, &r["sample.plain"]);
    let both = FluxCond { txt, pooled, mask: None, grid: (2, 3), dtype: DType::F32 };
    let cfg = flux_denoise(&model, r["sample.noise"].clone(), &both, 4, 3.5, 2.5).unwrap();
    check("denoise with true CFG", &cfg, &r["sample.cfg"]);
}
