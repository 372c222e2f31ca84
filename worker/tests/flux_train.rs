//! Flux.1 training end to end on the tiny fixtures (dev and schnell, diffusers folder and BFL
//! file): LoRA and LoKr learn (their saved files, applied to a fresh model, lower a fixed
//! flow-matching probe loss), files use kohya's Flux names and `ss_*` keys, samples are drawn,
//! T5 and block choices change what is trained, and diffusers-layout LoRA files apply.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use loft_worker::flow::{noisy_input, FlowOptions};
use loft_worker::lora_file::LoraFile;
use loft_worker::models::flux::{pack_latents, unpack_latents, FluxInputs};
use loft_worker::models::pipeline::StableDiffusion;
use loft_worker::models::ModelFamily;
use loft_worker::networks::NetworkAlgo;
use loft_worker::noise::randn;
use loft_worker::train::{run, CancelToken, EventLog, RunOptions, TrainConfig, TrainEvent};
use rand::SeedableRng;

fn device() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE.get_or_init(loft_worker::device::test_device).clone()
}

fn fixture(name: &str) -> std::path::PathBuf {
    common::tiny_run::fixture(name)
}

fn config(root: &Path, model: &str, family: ModelFamily, algo: NetworkAlgo) -> TrainConfig {
    TrainConfig {
        pretrained_model_name_or_path: fixture(model),
        model_family: family,
        bucket_reso_steps: 16,
        max_train_steps: 24,
        learning_rate: 2e-2,
        t5xxl_max_token_length: 16,
        sample_prompts: "a photo of a shape --w 32 --h 32 --s 3 --d 5".into(),
        sample_every_n_steps: 12,
        ..common::tiny_run::base(root, common::tiny_run::dataset(root), algo)
    }
}

/// The flow-matching loss of `model` on fixed latents, noise and σ for the captions.
fn probe_loss(model: &StableDiffusion, captions: &[String]) -> f64 {
    let dev = device();
    let flux = model.flux().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let e = model.encode_prompts(captions, 1, 75).unwrap();
    let n = captions.len();
    let mut total = 0.0;
    for k in 0..6 {
        let latents = randn(&mut rng, &[n, 16, 4, 4], &dev).unwrap();
        let noise = randn(&mut rng, &[n, 16, 4, 4], &dev).unwrap();
        let sigma = 0.15 + 0.14 * k as f32;
        let s = Tensor::from_vec(vec![sigma; n], (n, 1, 1, 1), &dev).unwrap();
        let noisy = noisy_input(&latents, &noise, &s).unwrap();
        let inputs = FluxInputs { txt: &e.hidden, pooled: e.pooled.as_ref().unwrap(), timesteps: &vec![sigma; n], guidance: Some(&vec![3.5; n]), grid: (2, 2), txt_mask: None };
        let v = unpack_latents(&flux.forward(&pack_latents(&noisy).unwrap(), &inputs).unwrap(), 4, 4).unwrap();
        let target = (&noise - &latents).unwrap();
        total += (v - target).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    }
    total / 6.0
}

fn train(cfg: &TrainConfig) -> (std::path::PathBuf, EventLog) {
    let mut events = EventLog::default();
    let out = run(cfg, &RunOptions { device: Some(device()), ..RunOptions::default() }, &mut events, &CancelToken::new()).unwrap_or_else(|e| panic!("{e:#}"));
    (out.network_file.expect("final file"), events)
}

#[test]
fn lora_and_lokr_learn_on_flux_dev_and_schnell() {
    let captions: Vec<String> = (0..2).map(|i| format!("a photo of a shape, number {i}")).collect();
    let mut report = vec![];
    for (model, family) in [("tiny-flux-dev", ModelFamily::FluxDev), ("tiny-flux-schnell", ModelFamily::FluxSchnell)] {
        let fresh = StableDiffusion::load(&fixture(model), DType::F32, &device()).unwrap();
        assert_eq!(fresh.family, family);
        let before = probe_loss(&fresh, &captions);
        for algo in [NetworkAlgo::Lora, NetworkAlgo::Lokr] {
            let tmp = tempfile::tempdir().unwrap();
            let mut cfg = config(tmp.path(), model, family, algo);
            if algo == NetworkAlgo::Lokr {
                cfg.factor = 4;
            }
            let (file, events) = train(&cfg);
            let steps = events.0.iter().filter(|e| matches!(e, TrainEvent::Step { .. })).count();
            assert_eq!(steps, 24);
            let samples = events.0.iter().filter(|e| matches!(e, TrainEvent::Sample { .. })).count();
            assert_eq!(samples, 2, "a sample at steps 12 and 24");
            let lora = LoraFile::load(&file).unwrap();
            assert!(lora.modules.iter().any(|m| m.name == "lora_unet_double_blocks_0_img_attn_qkv"), "{:?}", lora.modules.iter().map(|m| &m.name).collect::<Vec<_>>());
            assert!(lora.modules.iter().any(|m| m.name == "lora_unet_single_blocks_1_linear1"));
            assert!(lora.modules.iter().any(|m| m.name.starts_with("lora_te1_text_model_encoder_layers_0_")), "CLIP-L is trained by default");
            assert!(!lora.modules.iter().any(|m| m.name.starts_with("lora_te3_")), "T5 only with train_t5xxl");
            let meta = &lora.metadata;
            assert_eq!(meta.get("ss_base_model_version").map(String::as_str), Some("flux1"));
            assert_eq!(meta.get("ss_timestep_sampling").map(String::as_str), Some("sigma"));
            fresh.clear_hooks();
            let unmatched = fresh.apply_networks(&[(&lora, 1.0)]).unwrap();
            assert!(unmatched.is_empty(), "{unmatched:?}");
            let after = probe_loss(&fresh, &captions);
            fresh.clear_hooks();
            report.push(format!("{model} {}: probe loss {before:.4} → {after:.4}", algo.name()));
            assert!(after < before * 0.98, "{model} {} did not learn: {before} → {after}\n{}", algo.name(), report.join("\n"));
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// The BFL single file trains too; `train_blocks`, `train_t5xxl`, `apply_t5_attn_mask` and
/// the other samplings change what is trained; a diffusers-layout LoRA file applies.
#[test]
fn flux_options_change_what_is_trained() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), "tiny-flux-dev.safetensors", ModelFamily::FluxDev, NetworkAlgo::Lora);
    cfg.max_train_steps = 4;
    cfg.sample_every_n_steps = 0;
    cfg.train_blocks = "single".into();
    cfg.train_t5xxl = true;
    cfg.apply_t5_attn_mask = true;
    cfg.timestep_sampling = "flux_shift".into();
    cfg.weighting_scheme = "cosmap".into();
    cfg.gradient_checkpointing = true;
    cfg.in_dims = "[3, 0, 0, 0, 2]".into();
    let (file, _) = train(&cfg);
    let lora = LoraFile::load(&file).unwrap();
    let names: Vec<&str> = lora.modules.iter().map(|m| m.name.as_str()).collect();
    assert!(names.iter().any(|n| n.starts_with("lora_unet_single_blocks_")));
    assert!(!names.iter().any(|n| n.starts_with("lora_unet_double_blocks_")), "train_blocks = single");
    assert!(names.iter().any(|n| n.starts_with("lora_te3_encoder_block_0_layer_0_SelfAttention_q")), "train_t5xxl: {names:?}");
    assert_eq!(lora.metadata.get("ss_apply_t5_attn_mask").map(String::as_str), Some("True"));
    // in_dims: img_in at rank 3, txt_in at rank 2, the other input layers left alone.
    let rank = |name: &str| lora.module(name).map(|m| m.tensors["lora_down.weight"].dim(0).unwrap());
    assert_eq!(rank("lora_unet_img_in"), Some(3));
    assert_eq!(rank("lora_unet_txt_in"), Some(2));
    assert_eq!(rank("lora_unet_time_in_in_layer"), None);
}

/// split_qkv: the fused layers train one LoRA per piece; the file holds one block-diagonal
/// LoRA of rank n·r per layer whose alpha keeps the trained strength, and it applies.
#[test]
fn split_qkv_saves_block_diagonal_loras() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), "tiny-flux-dev", ModelFamily::FluxDev, NetworkAlgo::Lora);
    cfg.max_train_steps = 3;
    cfg.sample_every_n_steps = 0;
    cfg.split_qkv = true;
    cfg.network_alpha = 2.0;
    let (file, _) = train(&cfg);
    let lora = LoraFile::load(&file).unwrap();
    let qkv = lora.module("lora_unet_double_blocks_0_img_attn_qkv").unwrap();
    let up = &qkv.tensors["lora_up.weight"];
    assert_eq!(up.dims(), &[96, 12], "3 pieces of rank 4");
    assert_eq!(qkv.alpha, Some(6.0), "alpha 2 per piece, ×3");
    // Off-diagonal blocks are exactly zero.
    let block = up.narrow(0, 0, 32).unwrap().narrow(1, 4, 8).unwrap();
    assert_eq!(block.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    let linear1 = lora.module("lora_unet_single_blocks_0_linear1").unwrap();
    assert_eq!(linear1.tensors["lora_down.weight"].dims(), &[16, 32], "4 pieces of rank 4");
    let plain = lora.module("lora_unet_double_blocks_0_img_attn_proj").unwrap();
    assert_eq!(plain.tensors["lora_down.weight"].dim(0).unwrap(), 4, "other layers keep rank r");
    let model = StableDiffusion::load(&fixture("tiny-flux-dev"), DType::F32, &device()).unwrap();
    assert!(model.apply_networks(&[(&lora, 1.0)]).unwrap().is_empty());
}

/// cache_text_encoder_outputs: T5's states are cached up front and T5-XXL is freed; training,
/// validation-free steps and samples run from the cache.
#[test]
fn cached_text_encoder_outputs_free_t5() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), "tiny-flux-dev", ModelFamily::FluxDev, NetworkAlgo::Lora);
    cfg.max_train_steps = 4;
    cfg.sample_every_n_steps = 2;
    cfg.sample_prompts = "a photo of a shape --w 32 --h 32 --s 2 --d 5 --l 2.0 --n blurry".into();
    cfg.network_train_unet_only = true;
    cfg.cache_text_encoder_outputs = true;
    let (file, events) = train(&cfg);
    assert!(file.is_file());
    let logs: Vec<&String> = events.0.iter().filter_map(|e| if let TrainEvent::Log { message, .. } = e { Some(message) } else { None }).collect();
    assert!(logs.iter().any(|m| m.contains("T5-XXL freed")), "{logs:?}");
    assert_eq!(events.0.iter().filter(|e| matches!(e, TrainEvent::Sample { .. })).count(), 2);
    // The model: T5 gone, cached prompts encode exactly as before, others are a clear error.
    let mut model = StableDiffusion::load(&fixture("tiny-flux-dev"), DType::F32, &device()).unwrap();
    let prompt = vec!["a photo of a shape".to_string()];
    let before = model.encode_prompts(&prompt, 1, 75).unwrap();
    assert_eq!(model.cache_t5_and_drop(&prompt).unwrap(), 1);
    assert!(model.flux_text.as_ref().unwrap().t5.is_none(), "T5-XXL freed");
    let after = model.encode_prompts(&prompt, 1, 75).unwrap();
    let diff = (before.hidden - after.hidden).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0);
    let err = model.encode_prompts(&["another prompt".to_string()], 1, 75).unwrap_err();
    assert!(err.to_string().contains("another prompt"), "{err}");
    // Varying captions cannot be cached.
    cfg.shuffle_caption = true;
    let err = run(&cfg, &RunOptions { device: Some(device()), ..RunOptions::default() }, &mut EventLog::default(), &CancelToken::new()).unwrap_err();
    assert!(format!("{err:#}").contains("shuffle_caption"), "{err:#}");
}

/// fp8_base on Flux: the transformer's Linear weights are read from the file straight into
/// float8 e4m3 (fp16 compute), the text encoders' cast after loading, and the run trains.
#[test]
fn fp8_base_flux_trains_with_fp8_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), "tiny-flux-dev.safetensors", ModelFamily::FluxDev, NetworkAlgo::Lora);
    cfg.max_train_steps = 2;
    cfg.sample_every_n_steps = 0;
    cfg.mixed_precision = "fp16".into();
    cfg.fp8_base = true;
    let (file, events) = train(&cfg);
    assert!(file.is_file());
    let logs: Vec<&String> = events.0.iter().filter_map(|e| if let TrainEvent::Log { message, .. } = e { Some(message) } else { None }).collect();
    assert!(logs.iter().any(|m| m.contains("fp8_base") && m.contains("transformer")), "{logs:?}");
    let losses: Vec<f64> = events.0.iter().filter_map(|e| if let TrainEvent::Step { loss, .. } = e { Some(*loss) } else { None }).collect();
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    // Loaded with a frozen dtype, every transformer Linear weight is fp8 from the start.
    let model = StableDiffusion::load_with(&fixture("tiny-flux-dev.safetensors"), &Default::default(), DType::F16, &Device::Cpu, Some(DType::F8E4M3)).unwrap();
    use loft_worker::models::ModelLayers;
    assert!(model.flux().unwrap().layers().iter().all(|l| l.base().weight.dtype() == DType::F8E4M3));
}

/// Every algorithm that adapts Linear layers trains on Flux (two steps) and its file applies
/// to a fresh model.
#[test]
fn every_linear_algorithm_trains_on_flux() {
    let model = StableDiffusion::load(&fixture("tiny-flux-dev"), DType::F32, &device()).unwrap();
    let mut report = vec![];
    for algo in NetworkAlgo::ALL {
        if algo == NetworkAlgo::Locon {
            continue; // kohya LoCon is LoRA plus convolutions, which Flux has none of
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path(), "tiny-flux-dev", ModelFamily::FluxDev, algo);
        cfg.max_train_steps = 2;
        cfg.sample_every_n_steps = 0;
        cfg.network_train_unet_only = true;
        match algo {
            NetworkAlgo::Lokr => cfg.factor = 4,
            NetworkAlgo::Dylora => cfg.block_size = 2,
            _ => {}
        }
        let (file, _) = train(&cfg);
        let lora = LoraFile::load(&file).unwrap();
        model.clear_hooks();
        let unmatched = model.apply_networks(&[(&lora, 1.0)]).unwrap_or_else(|e| panic!("{}: {e:#}", algo.name()));
        assert!(unmatched.is_empty(), "{}: {unmatched:?}", algo.name());
        report.push(format!("{}: {} modules", algo.name(), lora.modules.len()));
    }
    model.clear_hooks();
    eprintln!("{}", report.join("\n"));
}

/// Flux's DDPM-era settings are refused with the field named, before any work.
#[test]
fn flux_refuses_ddpm_only_settings_and_odd_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), "tiny-flux-dev", ModelFamily::FluxDev, NetworkAlgo::Lora);
    cfg.timestep_sampling = "logit".into();
    let err = run(&cfg, &RunOptions { device: Some(device()), ..RunOptions::default() }, &mut EventLog::default(), &CancelToken::new()).unwrap_err();
    assert!(format!("{err:#}").contains("timestep_sampling"), "{err:#}");
    let mut cfg = config(tmp.path(), "tiny-flux-dev", ModelFamily::Sd15, NetworkAlgo::Lora);
    cfg.model_family = ModelFamily::Sd15;
    let err = run(&cfg, &RunOptions { device: Some(device()), ..RunOptions::default() }, &mut EventLog::default(), &CancelToken::new()).unwrap_err();
    assert!(format!("{err:#}").contains("flux_dev"), "{err:#}");
}

#[test]
fn flow_options_default_to_sd_scripts() {
    let o = FlowOptions::default();
    assert_eq!((o.timestep_sampling.as_str(), o.model_prediction_type.as_str(), o.discrete_flow_shift), ("sigma", "sigma_scaled", 3.0));
    assert_eq!(TrainConfig::default().flow_options(), o);
}

/// A diffusers-layout Flux LoRA (PEFT keys, split q/k/v, a piece left out, alphas, the final
/// adaLN) merges into the BFL layers exactly as ΔW = s·B·A per piece, row block by row block.
#[test]
fn diffusers_layout_flux_lora_merges_as_the_reference_math() {
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let h = 32;
    let r = 2;
    let mut tensors: Vec<(String, Tensor)> = vec![];
    let mut add = |path: &str, out: usize, inp: usize, alpha: Option<f32>| -> (Tensor, Tensor, f64) {
        let a = randn(&mut rng, &[r, inp], &dev).unwrap();
        let b = randn(&mut rng, &[out, r], &dev).unwrap();
        tensors.push((format!("{path}.lora_A.weight"), a.clone()));
        tensors.push((format!("{path}.lora_B.weight"), b.clone()));
        if let Some(al) = alpha {
            tensors.push((format!("{path}.alpha"), Tensor::new(al, &dev).unwrap()));
        }
        let s = alpha.map_or(1.0, |al| al as f64 / r as f64);
        (a, b, s)
    };
    let q = add("transformer.transformer_blocks.0.attn.to_q", h, h, Some(1.0));
    let v = add("transformer.transformer_blocks.0.attn.to_v", h, h, None);
    let mlp = add("transformer.single_transformer_blocks.1.proj_mlp", 4 * h, h, Some(4.0));
    let norm_out = add("transformer.norm_out.linear", 2 * h, h, None);
    let path = tempfile::tempdir().unwrap();
    let file = path.path().join("diffusers-flux.safetensors");
    let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, &file).unwrap();

    let model = StableDiffusion::load(&fixture("tiny-flux-dev"), DType::F32, &dev).unwrap();
    let before = |name: &str| model.flux().unwrap().layers().iter().find(|l| l.name() == name).unwrap().base().weight.clone();
    use loft_worker::models::ModelLayers;
    let (qkv0, lin0, fin0) = (before("double_blocks.0.img_attn.qkv"), before("single_blocks.1.linear1"), before("final_layer.adaLN_modulation.1"));
    let lora = LoraFile::load(&file).unwrap();
    let names: Vec<&str> = lora.modules.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_single_blocks_1_linear1"]);
    let unmatched = model.merge_networks(&[(&lora, 1.0)], loft_worker::lora_file::MultiplierRule::Lycoris).unwrap();
    assert!(unmatched.is_empty());
    let delta = |(a, b, s): &(Tensor, Tensor, f64)| (b.matmul(a).unwrap() * *s).unwrap();
    let zeros = |rows: usize| Tensor::zeros((rows, h), DType::F32, &dev).unwrap();
    let want_qkv = (&qkv0 + Tensor::cat(&[delta(&q), zeros(h), delta(&v)], 0).unwrap()).unwrap();
    let want_lin = (&lin0 + Tensor::cat(&[zeros(3 * h), delta(&mlp)], 0).unwrap()).unwrap();
    let d = delta(&norm_out);
    let want_fin = (&fin0 + Tensor::cat(&[d.narrow(0, h, h).unwrap(), d.narrow(0, 0, h).unwrap()], 0).unwrap()).unwrap();
    for (name, want) in [("double_blocks.0.img_attn.qkv", want_qkv), ("single_blocks.1.linear1", want_lin), ("final_layer.adaLN_modulation.1", want_fin)] {
        let got = before(name);
        let err = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 1e-5, "{name}: merged weight differs by {err}");
    }
}

/// Synthetic full-size weights: Linear weights in fp8 (zeros, or small random values), the
/// rest in the model dtype.
struct Synthetic {
    random: bool,
}

impl candle_nn::var_builder::SimpleBackend for Synthetic {
    fn get(&self, s: candle_core::Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let linear = name.ends_with(".weight") && s.dims().len() == 2;
        if self.random {
            let t = Tensor::randn(0f32, 0.02, s, dev)?;
            return if linear { loft_worker::ops::cast(&t, DType::F8E4M3) } else { t.to_dtype(dtype) };
        }
        if linear {
            Tensor::zeros(s, DType::F8E4M3, dev)
        } else {
            Tensor::ones(s, dtype, dev)
        }
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("synthetic weights: no unchecked {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Memory of a full-size Flux.1 dev transformer with fp8 base weights on the CPU, and of a
/// forward + backward at 256² (256 image + 512 text tokens, f16 compute) on a reduced-depth
/// model (1 double + 2 single blocks at full width), with and without per-block checkpointing.
/// Run by hand: `cargo test --release -p loft-worker --test flux_train -- --ignored --nocapture flux_memory`.
#[test]
#[ignore]
fn flux_memory_at_full_size() {
    use loft_worker::grad_checkpoint::GradientCheckpointing;
    use loft_worker::models::flux::{FluxConfig, FluxTransformer};
    let dev = Device::Cpu;
    let gib = |kib: u64| kib as f64 / (1024.0 * 1024.0);
    let rss0 = common::vm_kib("VmRSS:");
    let full = FluxTransformer::new(&FluxConfig::flux1(true), candle_nn::VarBuilder::from_backend(Box::new(Synthetic { random: false }), DType::F16, dev.clone())).unwrap();
    let rss1 = common::vm_kib("VmRSS:");
    use loft_worker::models::ModelLayers;
    let params: usize = full.layers().iter().map(|l| l.base().weight.elem_count() + l.base().bias.map_or(0, |b| b.elem_count())).sum();
    eprintln!("full-size Flux.1 dev transformer, fp8 Linear weights: {:.2} B parameters, resident {:.2} GiB", params as f64 / 1e9, gib(rss1 - rss0));
    drop(full);
    let mut cfg = FluxConfig::flux1(true);
    cfg.depth = 1;
    cfg.depth_single = 2;
    let model = FluxTransformer::new(&cfg, candle_nn::VarBuilder::from_backend(Box::new(Synthetic { random: true }), DType::F16, dev.clone())).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for checkpointing in [false, true] {
        let img = candle_core::Var::from_tensor(&randn(&mut rng, &[1, 256, 64], &dev).unwrap().to_dtype(DType::F16).unwrap()).unwrap();
        let txt = randn(&mut rng, &[1, 512, 4096], &dev).unwrap().to_dtype(DType::F16).unwrap();
        let pooled = randn(&mut rng, &[1, 768], &dev).unwrap().to_dtype(DType::F16).unwrap();
        reset_peak();
        let before = common::vm_kib("VmRSS:");
        let start = std::time::Instant::now();
        let inputs = FluxInputs { txt: &txt, pooled: &pooled, timesteps: &[0.5], guidance: Some(&[3.5]), grid: (16, 16), txt_mask: None };
        let gc = GradientCheckpointing::new(&dev, std::slice::from_ref(&img)).unwrap();
        let out = if checkpointing { gc.forward(|| model.forward(img.as_tensor(), &inputs)).unwrap() } else { model.forward(img.as_tensor(), &inputs).unwrap() };
        let after_forward = common::vm_kib("VmRSS:");
        let loss = out.to_dtype(DType::F32).unwrap().sqr().unwrap().mean_all().unwrap();
        let grads = if checkpointing { gc.backward(&loss).unwrap() } else { loss.backward().unwrap() };
        assert!(grads.get(img.as_tensor()).is_some());
        let peak = common::vm_kib("VmHWM:");
        eprintln!(
            "reduced depth (1 double + 2 single, full width) at 256², checkpointing {checkpointing}: forward keeps {:.2} GiB, step {:.1} s, step peak {:.2} GiB above the model",
            gib(after_forward.saturating_sub(before)),
            start.elapsed().as_secs_f64(),
            gib(peak.saturating_sub(before))
        );
    }
}

/// Resets the process's peak-RSS mark (`VmHWM`), so a later read is the peak since now.
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").expect("/proc/self/clear_refs");
}

/// One LoRA training step (rank 16 on every Linear of every block, sd-scripts' targets) of the
/// full-size Flux.1 dev transformer with fp8 base weights and f16 compute at 256² (256 image +
/// 512 T5 tokens), per-block gradient checkpointing, on the CPU: resident model, step peak and
/// time. Run by hand (about half an hour on 2 cores):
/// `cargo test --workspace --test flux_train -- --ignored --nocapture flux_full_size_lora_step`.
#[test]
#[ignore]
fn flux_full_size_lora_step() {
    use loft_worker::grad_checkpoint::GradientCheckpointing;
    use loft_worker::models::flux::{FluxConfig, FluxTransformer};
    use loft_worker::models::ModelLayers;
    use loft_worker::networks::{build_adapter, BaseLayer, NetworkOptions};
    use std::sync::Arc;
    let dev = Device::Cpu;
    let gib = |kib: u64| kib as f64 / (1024.0 * 1024.0);
    let t0 = std::time::Instant::now();
    let model = FluxTransformer::new(&FluxConfig::flux1(true), candle_nn::VarBuilder::from_backend(Box::new(Synthetic { random: true }), DType::F16, dev.clone())).unwrap();
    let opts = NetworkOptions { dim: 16, alpha: 16.0, ..NetworkOptions::default() };
    let mut vars = vec![];
    let mut adapted = 0;
    for layer in model.layers() {
        if !(layer.name().starts_with("double_blocks.") || layer.name().starts_with("single_blocks.")) {
            continue;
        }
        let adapter: Arc<dyn loft_worker::networks::Adapter> = Arc::from(build_adapter(NetworkAlgo::Lora, &opts, &layer.base(), layer.name()).unwrap());
        vars.extend(adapter.trainable().into_iter().map(|(_, v)| v));
        layer.set_hook(Some(Arc::new(move |base: &BaseLayer, x: &Tensor| adapter.forward(base, x, true))));
        adapted += 1;
    }
    let loaded = common::vm_kib("VmRSS:");
    eprintln!("full-size dev transformer (fp8 Linear weights) + {adapted} rank-16 LoRA modules: resident {:.2} GiB, built in {:.0} s", gib(loaded), t0.elapsed().as_secs_f64());
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let img = randn(&mut rng, &[1, 256, 64], &dev).unwrap().to_dtype(DType::F16).unwrap();
    let target = randn(&mut rng, &[1, 256, 64], &dev).unwrap();
    let txt = randn(&mut rng, &[1, 512, 4096], &dev).unwrap().to_dtype(DType::F16).unwrap();
    let pooled = randn(&mut rng, &[1, 768], &dev).unwrap().to_dtype(DType::F16).unwrap();
    reset_peak();
    let before = common::vm_kib("VmRSS:");
    let start = std::time::Instant::now();
    let gc = GradientCheckpointing::new(&dev, &vars).unwrap();
    let inputs = FluxInputs { txt: &txt, pooled: &pooled, timesteps: &[0.5], guidance: Some(&[3.5]), grid: (16, 16), txt_mask: None };
    let out = gc.forward(|| model.forward(&img, &inputs)).unwrap();
    let forward_s = start.elapsed().as_secs_f64();
    let loss = (out.to_dtype(DType::F32).unwrap() - &target).unwrap().sqr().unwrap().mean_all().unwrap();
    let grads = gc.backward(&loss).unwrap();
    let with_grad = vars.iter().filter(|v| grads.get(v.as_tensor()).is_some()).count();
    assert_eq!(with_grad, vars.len(), "every LoRA tensor gets a gradient");
    let peak = common::vm_kib("VmHWM:");
    eprintln!(
        "one LoRA step at 256² (f16 compute, per-block checkpointing): forward {forward_s:.0} s, step {:.0} s, peak {:.2} GiB ({:.2} GiB above the loaded model)",
        start.elapsed().as_secs_f64(),
        gib(peak),
        gib(peak.saturating_sub(before))
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// sd-scripts' layout of a Flux model — BFL transformer, `clip_l`, `t5xxl` (its tokenizer.json
/// beside it) and `ae` as separate files — loads the same model as the diffusers folder, and
/// trains.
#[test]
fn separate_clip_l_t5xxl_and_ae_files() {
    use loft_worker::models::pipeline::FluxFiles;
    use loft_worker::models::single_file::{bare_vae_stored, Stored};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let folder = fixture("tiny-flux-dev");
    std::fs::copy(fixture("tiny-flux-dev.safetensors"), root.join("flux1-dev.safetensors")).unwrap();
    // The tiny model's sizes are not Flux.1's: a folder beside the file gives only the configs
    // and the CLIP tokenizer.
    copy_dir(&folder.join("transformer"), &root.join("flux1-dev/transformer"));
    std::fs::remove_file(root.join("flux1-dev/transformer/diffusion_pytorch_model.safetensors")).unwrap();
    copy_dir(&folder.join("tokenizer"), &root.join("flux1-dev/tokenizer"));
    for part in ["text_encoder", "text_encoder_2", "vae"] {
        std::fs::create_dir_all(root.join("flux1-dev").join(part)).unwrap();
        std::fs::copy(folder.join(part).join("config.json"), root.join("flux1-dev").join(part).join("config.json")).unwrap();
    }
    std::fs::create_dir_all(root.join("te")).unwrap();
    std::fs::copy(folder.join("text_encoder/model.safetensors"), root.join("te/clip_l.safetensors")).unwrap();
    std::fs::copy(folder.join("text_encoder_2/model.safetensors"), root.join("te/t5xxl_fp16.safetensors")).unwrap();
    std::fs::copy(folder.join("tokenizer_2/tokenizer.json"), root.join("te/tokenizer.json")).unwrap();
    // BFL's ae.safetensors: the LDM VAE keys without a prefix.
    let vae = candle_core::safetensors::load(folder.join("vae/diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    let mut ae = std::collections::HashMap::new();
    for (name, t) in vae {
        let t = match bare_vae_stored(&name, 4).unwrap_or_else(|| panic!("{name}")) {
            Stored::Conv1x1(k) => (k, t.reshape((t.dim(0).unwrap(), t.dim(1).unwrap(), 1, 1)).unwrap()),
            other => (other.key().to_string(), t),
        };
        ae.insert(t.0, t.1);
    }
    candle_core::safetensors::save(&ae, root.join("ae.safetensors")).unwrap();

    let files = FluxFiles { clip_l: Some(root.join("te/clip_l.safetensors")), t5xxl: Some(root.join("te/t5xxl_fp16.safetensors")), ae: Some(root.join("ae.safetensors")) };
    let parts = StableDiffusion::load_with(&root.join("flux1-dev.safetensors"), &files, DType::F32, &device(), None).unwrap();
    let whole = StableDiffusion::load(&folder, DType::F32, &device()).unwrap();
    let prompts = vec!["a photo of a cat".to_string()];
    let (a, b) = (parts.encode_prompts(&prompts, 1, 75).unwrap(), whole.encode_prompts(&prompts, 1, 75).unwrap());
    let diff = |x: &Tensor, y: &Tensor| (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff(&a.hidden, &b.hidden) < 1e-6 && diff(a.pooled.as_ref().unwrap(), b.pooled.as_ref().unwrap()) < 1e-6);
    let z = randn(&mut rand::rngs::StdRng::seed_from_u64(2), &[1, 16, 2, 2], &device()).unwrap();
    assert!(diff(&parts.vae.decode(&z).unwrap(), &whole.vae.decode(&z).unwrap()) < 1e-5);
    assert_eq!((parts.vae.scaling_factor(), parts.vae.shift_factor()), (0.3611, 0.1159));

    // Without the T5 tokenizer beside the file: a clear error.
    std::fs::remove_file(root.join("te/tokenizer.json")).unwrap();
    let err = StableDiffusion::load_with(&root.join("flux1-dev.safetensors"), &files, DType::F32, &device(), None).err().unwrap();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    std::fs::copy(folder.join("tokenizer_2/tokenizer.json"), root.join("te/tokenizer.json")).unwrap();

    // And a run from the registry's keys.
    let mut cfg = config(root, "tiny-flux-dev", ModelFamily::FluxDev, NetworkAlgo::Lora);
    cfg.pretrained_model_name_or_path = root.join("flux1-dev.safetensors");
    cfg.clip_l = root.join("te/clip_l.safetensors");
    cfg.t5xxl = root.join("te/t5xxl_fp16.safetensors");
    cfg.vae = root.join("ae.safetensors");
    cfg.max_train_steps = 2;
    cfg.sample_every_n_steps = 2;
    let (file, events) = train(&cfg);
    assert!(file.is_file());
    assert_eq!(events.0.iter().filter(|e| matches!(e, TrainEvent::Sample { .. })).count(), 1);
}
