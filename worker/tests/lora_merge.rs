//! `loft lora merge` against the reference of `tests/parity/make_single_file_fixtures.py`:
//! two LyCORIS files (LoCon at 1.0, LoKr at 0.5) written by lycoris-lora 4.1.3 for the tiny
//! SD1.5 pipeline, merged in Python by reading W′ off the LyCORIS modules' own forward.
//! Both layouts (diffusers folder, single file) must give those weights; SDXL's LDM-named
//! UNet modules and OpenCLIP's fused q/k/v are checked against ΔW computed here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use loft_worker::lora_file::merge::{merge, MergeInput};
use loft_worker::lora_file::{LoraFile, MultiplierRule};
use loft_worker::models::config::{read_json, UNetConfig};
use loft_worker::models::ldm_names::{sdxl_kohya_unet_name, UNetLayout};
use loft_worker::models::single_file::{Checkpoint, Component};
use loft_worker::models::ModelFamily;

const TOL: f64 = 1e-5;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models")
}

fn inputs() -> Vec<MergeInput> {
    vec![
        MergeInput { file: LoraFile::load(&fixtures().join("merge/tiny-sd15-locon.safetensors")).unwrap(), multiplier: 1.0, rule: MultiplierRule::Lycoris },
        MergeInput { file: LoraFile::load(&fixtures().join("merge/tiny-sd15-lokr.safetensors")).unwrap(), multiplier: 0.5, rule: MultiplierRule::Lycoris },
    ]
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("merge/tiny-sd15-merge-ref.safetensors"), &Device::Cpu).unwrap()
}

fn load(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let diff = (a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    diff / b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1e-6)
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

#[test]
fn merging_into_a_diffusers_folder_matches_the_lycoris_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let base = fixtures().join("tiny-sd15");
    let report = merge(&base, &inputs(), &out, None).unwrap();
    assert_eq!(report.layout, "diffusers");
    assert_eq!(report.family, ModelFamily::Sd15);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert!(report.files.iter().all(|f| f.unmatched.is_empty() && f.matched == 95), "{:?}", report.files);
    // 95 adapted weights (83 UNet + 12 text encoder); LoCon and LoKr change no bias.
    assert_eq!(report.tensors_changed, 95);

    let unet = load(&out.join("unet/diffusion_pytorch_model.safetensors"));
    let te = load(&out.join("text_encoder/model.safetensors"));
    for (key, want) in reference() {
        let (part, name) = key.split_once('.').unwrap();
        let got = if part == "unet" { &unet[name] } else { &te[name] };
        let e = rel_err(got, &want);
        println!("{key}: relative error {e:.2e}");
        assert!(e <= TOL, "{key}: {e:.2e}");
    }
    // Everything else is a copy: configs, tokenizer, scheduler, VAE weights byte for byte.
    for rel in ["model_index.json", "vae/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json", "unet/config.json"] {
        assert_eq!(std::fs::read(base.join(rel)).unwrap(), std::fs::read(out.join(rel)).unwrap(), "{rel}");
    }
    let orig = load(&base.join("unet/diffusion_pytorch_model.safetensors"));
    for n in ["conv_norm_out.weight", "down_blocks.0.resnets.0.conv1.bias", "down_blocks.0.attentions.0.norm.weight"] {
        assert_eq!(rel_err(&unet[n], &orig[n]), 0.0, "{n} must not change");
    }
    // The merged folder loads as a model.
    loft_worker::models::UNet2DConditionModel::from_diffusers_dir(&out.join("unet"), DType::F32, &Device::Cpu).unwrap();
}

#[test]
fn merging_into_a_single_file_matches_the_lycoris_reference_and_keeps_the_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = fixtures().join("tiny-sd15");
    // An f32 and an f16 copy of the checkpoint: the output keeps each tensor's dtype.
    let f16 = tmp.path().join("base-f16.safetensors");
    let src = load(&fixtures().join("tiny-sd15.safetensors"));
    let half: HashMap<String, Tensor> = src.iter().map(|(k, v)| (k.clone(), v.to_dtype(DType::F16).unwrap())).collect();
    candle_core::safetensors::save(&half, &f16).unwrap();
    for (base, dtype, tol) in [(fixtures().join("tiny-sd15.safetensors"), DType::F32, TOL), (f16, DType::F16, 2e-3)] {
        let out = tmp.path().join(format!("merged-{dtype:?}.safetensors"));
        let report = merge(&base, &inputs(), &out, Some(&cfg)).unwrap();
        assert_eq!(report.layout, "single_file");
        assert_eq!(report.tensors_changed, 95);
        let orig = loft_worker::models::safetensors_io::MappedFile::open(&base).unwrap();
        let merged = loft_worker::models::safetensors_io::MappedFile::open(&out).unwrap();
        assert_eq!(orig.names(), merged.names(), "same keys, same order");
        for n in orig.names() {
            assert_eq!(orig.entry(n).unwrap().dtype, merged.entry(n).unwrap().dtype, "{n}");
        }
        assert!(merged.metadata().get("loft_merged_networks").unwrap().contains("tiny-sd15-lokr.safetensors:0.5"));
        let ckpt = Checkpoint::open_with_config_dir(&out, &cfg).unwrap();
        for (key, want) in reference() {
            let (part, name) = key.split_once('.').unwrap();
            let c = if part == "unet" { Component::Unet } else { Component::TextEncoder(0) };
            let got = ckpt.key_map().stored(c, name).unwrap().read(ckpt.file(), Some(DType::F32)).unwrap();
            let e = rel_err(&got, &want);
            println!("{dtype:?} {key}: relative error {e:.2e}");
            assert!(e <= tol, "{dtype:?} {key}: {e:.2e}");
        }
        // The VAE is untouched, byte for byte.
        let vae_key = "first_stage_model.decoder.conv_out.weight";
        assert_eq!(orig.bytes(vae_key), merged.bytes(vae_key));
    }
}

/// A kohya LoRA module: (down [r, in], up [out, r], alpha) with ΔW = up·down·alpha/r.
fn lora_module(name: &str, out_f: usize, in_f: usize, r: usize, seed: u64) -> (Vec<(String, Tensor)>, Tensor) {
    let dev = Device::Cpu;
    let mut x = seed;
    let mut vals = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
            })
            .collect()
    };
    let down = Tensor::from_vec(vals(r * in_f), (r, in_f), &dev).unwrap();
    let up = Tensor::from_vec(vals(out_f * r), (out_f, r), &dev).unwrap();
    let alpha = 2.0f32;
    let dw = (up.matmul(&down).unwrap() * (alpha as f64 / r as f64)).unwrap();
    (
        vec![
            (format!("{name}.lora_down.weight"), down),
            (format!("{name}.lora_up.weight"), up),
            (format!("{name}.alpha"), Tensor::new(alpha, &dev).unwrap()),
        ],
        dw,
    )
}

/// sd-scripts' SDXL names: the UNet under LDM paths, `lora_te1_` / `lora_te2_`; te2's q_proj
/// lands in rows 0..h of OpenCLIP's fused in_proj_weight, k and v rows stay.
#[test]
fn sdxl_ldm_names_and_fused_qkv_merge_into_a_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = fixtures().join("tiny-sdxl");
    let unet_cfg: UNetConfig = read_json(&cfg.join("unet/config.json")).unwrap();
    let layout = UNetLayout::from_config(&unet_cfg);
    let to_k = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k";
    let unet_name = sdxl_kohya_unet_name(to_k, &layout).unwrap();
    // One resnet per block in the tiny UNet: down block 1's first slot is input_blocks.3.
    assert_eq!(unet_name, "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k");
    let (mut tensors, dw_k) = lora_module(&unet_name, 16, 64, 4, 1);
    let (t2, dw_q) = lora_module("lora_te2_text_model_encoder_layers_1_self_attn_q_proj", 32, 32, 4, 2);
    let (t3, dw_fc1) = lora_module("lora_te1_text_model_encoder_layers_0_mlp_fc1", 64, 32, 4, 3);
    let (t4, _) = lora_module("lora_unet_not_a_layer", 8, 8, 2, 4);
    tensors.extend(t2);
    tensors.extend(t3);
    tensors.extend(t4);
    let lora_path = tmp.path().join("sdxl-lora.safetensors");
    candle_core::safetensors::save(&tensors.into_iter().collect::<HashMap<_, _>>(), &lora_path).unwrap();

    let base = fixtures().join("tiny-sdxl.safetensors");
    let out = tmp.path().join("merged.safetensors");
    let inputs = vec![MergeInput { file: LoraFile::load(&lora_path).unwrap(), multiplier: 0.8, rule: MultiplierRule::Lycoris }];
    let report = merge(&base, &inputs, &out, Some(&cfg)).unwrap();
    assert_eq!(report.family, ModelFamily::Sdxl);
    assert_eq!(report.files[0].matched, 3);
    assert_eq!(report.files[0].unmatched, vec!["lora_unet_not_a_layer".to_string()]);
    assert!(report.warnings[0].contains("lora_unet_not_a_layer"), "{:?}", report.warnings);
    assert_eq!(report.tensors_changed, 3);

    let a = Checkpoint::open_with_config_dir(&base, &cfg).unwrap();
    let b = Checkpoint::open_with_config_dir(&out, &cfg).unwrap();
    let read = |c: &Checkpoint, comp: Component, n: &str| c.key_map().stored(comp, n).unwrap().read(c.file(), Some(DType::F32)).unwrap();
    let check = |comp: Component, n: &str, dw: Option<&Tensor>| {
        let before = read(&a, comp, n);
        let after = read(&b, comp, n);
        let want = match dw {
            Some(d) => (&before + (d * 0.8).unwrap()).unwrap(),
            None => before.clone(),
        };
        let e = rel_err(&after, &want);
        println!("{comp:?} {n}: relative error {e:.2e}");
        assert!(e <= TOL, "{n}: {e:.2e}");
        if dw.is_some() {
            assert!(max_abs(&(after - before).unwrap()) > 1e-3, "{n} did not change");
        }
    };
    check(Component::Unet, &format!("{to_k}.weight"), Some(&dw_k));
    check(Component::TextEncoder(1), "text_model.encoder.layers.1.self_attn.q_proj.weight", Some(&dw_q));
    check(Component::TextEncoder(1), "text_model.encoder.layers.1.self_attn.k_proj.weight", None);
    check(Component::TextEncoder(1), "text_model.encoder.layers.1.self_attn.v_proj.weight", None);
    check(Component::TextEncoder(0), "text_model.encoder.layers.0.mlp.fc1.weight", Some(&dw_fc1));
}

#[test]
fn merge_refuses_what_it_cannot_do() {
    let tmp = tempfile::tempdir().unwrap();
    // An SD1.5 network on the SDXL model: nothing matches.
    let out = tmp.path().join("x.safetensors");
    let err = merge(&fixtures().join("tiny-sdxl.safetensors"), &inputs(), &out, Some(&fixtures().join("tiny-sdxl")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not fit") && err.contains("lora_unet_conv_in"), "{err}");
    assert!(!out.exists());
    // A file none of whose modules names a layer.
    let (t, _) = lora_module("lora_unet_not_a_layer", 8, 8, 2, 4);
    let stray = tmp.path().join("stray.safetensors");
    candle_core::safetensors::save(&t.into_iter().collect::<HashMap<_, _>>(), &stray).unwrap();
    let inputs_stray = vec![MergeInput { file: LoraFile::load(&stray).unwrap(), multiplier: 1.0, rule: MultiplierRule::Lycoris }];
    let err = merge(&fixtures().join("tiny-sd15"), &inputs_stray, &tmp.path().join("z"), None).unwrap_err().to_string();
    assert!(err.contains("none of its 1 modules matches") && err.contains("lora_unet_not_a_layer"), "{err}");
    assert!(!tmp.path().join("z").exists());
    // An existing output.
    std::fs::write(&out, b"keep me").unwrap();
    let err = merge(&fixtures().join("tiny-sd15"), &inputs(), &out, None).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    // A base that is not a model.
    let err = merge(&fixtures().join("merge/tiny-sd15-lokr.safetensors"), &inputs(), &tmp.path().join("y.safetensors"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("LoRA/LyCORIS"), "{err}");
}
