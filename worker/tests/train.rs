//! The training loop end to end on the tiny fixture models and a generated dataset: every
//! algorithm learns (its saved file, applied to a fresh model, lowers the loss on a fixed
//! probe), resume continues to the same weights, epochs/samples/pruning/events behave, and
//! SDXL trains.

mod common;
use common::vm_kib;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use loft_worker::lora_file::LoraFile;
use loft_worker::models::pipeline::StableDiffusion;
use loft_worker::models::ModelFamily;
use loft_worker::networks::NetworkAlgo;
use loft_worker::noise::{diffusion_loss, randn, LossOptions, NoiseSchedule};
use loft_worker::train::{run, CancelToken, CheckpointKind, EventLog, RunOptions, TrainConfig, TrainEvent};
use rand::SeedableRng;

/// The device the tests train on (`device::test_device()`: CUDA when the binary has it and a
/// device answers, else the CPU, printed once); every run and probe below uses it.
fn device() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE.get_or_init(loft_worker::device::test_device).clone()
}

/// Run options on the test device.
fn on_device(opts: RunOptions) -> RunOptions {
    RunOptions { device: Some(device()), ..opts }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(name)
}

/// A dataset in the kohya layout: `4_shapes/` with `n` 32×32 images (a coloured square on a
/// coloured background, each different) and captions.
fn make_dataset(root: &Path, n: usize) -> PathBuf {
    make_dataset_sized(root, n, 32)
}

/// [`make_dataset`] with `size`×`size` pictures.
fn make_dataset_sized(root: &Path, n: usize, size: u32) -> PathBuf {
    let dir = root.join("data");
    let sub = dir.join("4_shapes");
    std::fs::create_dir_all(&sub).unwrap();
    for i in 0..n {
        let bg = [(i * 60 % 255) as u8, 40, (200 - i * 30 % 200) as u8];
        let fg = [230, (i * 90 % 255) as u8, 20];
        let img = image::RgbImage::from_fn(size, size, |x, y| {
            let (x, y) = (x * 32 / size, y * 32 / size);
            let inside = x >= 8 + i as u32 && x < 20 + i as u32 && y >= 10 && y < 24;
            image::Rgb(if inside { fg } else { bg })
        });
        img.save(sub.join(format!("img{i}.png"))).unwrap();
        std::fs::write(sub.join(format!("img{i}.txt")), format!("a photo of a shape, number {i}, red")).unwrap();
    }
    dir
}

fn base_config(root: &Path, algo: NetworkAlgo) -> TrainConfig {
    TrainConfig { max_train_steps: 30, ..common::tiny_run::base(root, make_dataset(root, 2), algo) }
}

/// Mean loss of `model` on fixed latents, noise and timesteps for the dataset's captions.
fn probe_loss(model: &StableDiffusion, captions: &[String]) -> f64 {
    let dev = device();
    let schedule = NoiseSchedule::new(&model.scheduler, false, false).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(123);
    let mut total = 0.0;
    let n = 8;
    for k in 0..n {
        let latents = randn(&mut rng, &[captions.len(), 4, 16, 16], &dev).unwrap();
        let noise = randn(&mut rng, &[captions.len(), 4, 16, 16], &dev).unwrap();
        let ts: Vec<usize> = vec![100 + 100 * k; captions.len()];
        let noisy = schedule.add_noise(&latents, &noise, &ts).unwrap();
        let e = model.encode_prompts(captions, 1, 75).unwrap();
        let t = Tensor::new(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), &dev).unwrap();
        let pred = model.unet().forward(&noisy, &t, &e.hidden, None).unwrap();
        let loss = diffusion_loss(&LossOptions::default(), &schedule, &pred, &noise, &ts, &vec![1.0; captions.len()], None).unwrap();
        total += loss.to_scalar::<f32>().unwrap() as f64;
    }
    total / n as f64
}

/// The algorithm's options that make it adapt the tiny UNet (widths 16/32, text width 32).
fn configure(cfg: &mut TrainConfig, algo: NetworkAlgo) {
    match algo {
        NetworkAlgo::Locon => {
            cfg.conv_dim = Some(4);
            cfg.conv_alpha = Some(4.0);
        }
        NetworkAlgo::Lokr => cfg.factor = 4,
        NetworkAlgo::Dylora => cfg.block_size = 2,
        NetworkAlgo::DiagOft | NetworkAlgo::Boft => {
            cfg.network_dim = 4;
            cfg.learning_rate = 3e-2;
        }
        NetworkAlgo::Ia3 => cfg.learning_rate = 5e-2,
        NetworkAlgo::Full => cfg.learning_rate = 1e-3,
        _ => {}
    }
}

#[test]
fn every_algorithm_learns_and_its_file_applies() {
    let captions: Vec<String> = (0..2).map(|i| format!("a photo of a shape, number {i}, red")).collect();
    let fresh = StableDiffusion::load(&fixture("tiny-sd15"), DType::F32, &device()).unwrap();
    let before = probe_loss(&fresh, &captions);
    let mut report = vec![];
    for algo in NetworkAlgo::ALL {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = base_config(tmp.path(), algo);
        configure(&mut cfg, algo);
        cfg.network_train_unet_only = true;
        let mut events = EventLog::default();
        let out = run(&cfg, &on_device(RunOptions::default()), &mut events, &CancelToken::new())
            .unwrap_or_else(|e| panic!("{}: {e:#}", algo.name()));
        let file = out.network_file.expect("final file");
        let losses: Vec<f64> = events.0.iter().filter_map(|e| if let TrainEvent::Step { loss, .. } = e { Some(*loss) } else { None }).collect();
        assert_eq!(losses.len(), 30, "{}", algo.name());
        // The saved file, loaded and applied to a fresh model, lowers the loss on the probe.
        let lora = LoraFile::load(&file).unwrap();
        fresh.clear_hooks();
        let unmatched = fresh.apply_networks(&[(&lora, 1.0)]).unwrap();
        assert!(unmatched.is_empty(), "{}: {unmatched:?}", algo.name());
        let after = probe_loss(&fresh, &captions);
        fresh.clear_hooks();
        report.push(format!("{:>13}: probe loss {before:.4} → {after:.4}", algo.name()));
        assert!(after < before * 0.98, "{} did not learn: {before} → {after}\n{}", algo.name(), report.join("\n"));
    }
    eprintln!("{}", report.join("\n"));
}

fn final_tensors(path: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Resume equals an uninterrupted run, with AdamW and with AdamW8bit (its 8-bit moment
/// states saved and restored byte for byte; `min_8bit_size=64` puts the tiny model's LoRA
/// factors on the 8-bit path).
#[test]
fn resume_continues_to_the_same_weights() {
    for (optimizer, args) in [("AdamW", ""), ("AdamW8bit", "min_8bit_size=64")] {
        resume_matches(optimizer, args);
    }
}

fn resume_matches(optimizer: &str, optimizer_args: &str) {
    let a = tempfile::tempdir().unwrap();
    let mut cfg = base_config(a.path(), NetworkAlgo::Lora);
    cfg.optimizer_type = optimizer.into();
    cfg.optimizer_args = optimizer_args.into();
    cfg.max_train_steps = 8;
    cfg.gradient_accumulation_steps = 2;
    cfg.train_batch_size = 2;
    cfg.train_data_dir = make_dataset(a.path(), 3);
    cfg.lr_scheduler = "cosine".into();
    let whole = run(&cfg, &on_device(RunOptions::default()), &mut EventLog::default(), &CancelToken::new()).unwrap();

    let b = tempfile::tempdir().unwrap();
    let mut cfg_b = cfg.clone();
    cfg_b.output_dir = b.path().join("out");
    cfg_b.save_every_n_steps = 3;
    cfg_b.save_state = true;
    // "Killed" after 5 steps: the last state is the one of step 3.
    let stopped = run(&cfg_b, &on_device(RunOptions { stop_after_steps: Some(5), ..Default::default() }), &mut EventLog::default(), &CancelToken::new()).unwrap();
    assert_eq!(stopped.final_step, 5);
    let mut events = EventLog::default();
    let resumed = run(&cfg_b, &on_device(RunOptions { resume: true, ..Default::default() }), &mut events, &CancelToken::new()).unwrap();
    assert!(matches!(events.0.iter().find(|e| matches!(e, TrainEvent::Started { .. })), Some(TrainEvent::Started { start_step: 3, .. })));
    assert_eq!(resumed.final_step, whole.final_step);
    let (wa, wb) = (final_tensors(&whole.network_file.unwrap()), final_tensors(&resumed.network_file.unwrap()));
    assert_eq!(wa.len(), wb.len());
    for (k, ta) in &wa {
        let diff: f32 = (ta - &wb[k]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert!(diff <= 1e-6, "{optimizer}: {k} differs by {diff}");
    }
}

#[test]
fn epochs_samples_pruning_and_cancel() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = base_config(tmp.path(), NetworkAlgo::Loha);
    cfg.max_train_epochs = 3; // 2 images × 4 repeats = 8 steps per epoch
    cfg.save_every_n_epochs = 1;
    cfg.save_last_n_epochs = 1;
    cfg.sample_prompts = "a photo of a shape --w 32 --h 32 --s 3 --d 5\nred --l 1".into();
    cfg.sample_every_n_epochs = 2;
    cfg.shuffle_caption = true;
    cfg.cache_latents_to_disk = true;
    let mut events = EventLog::default();
    let out = run(&cfg, &on_device(RunOptions::default()), &mut events, &CancelToken::new()).unwrap();
    assert_eq!(out.final_step, 24);
    let epochs: Vec<u64> = events.0.iter().filter_map(|e| if let TrainEvent::Epoch { epoch, .. } = e { Some(*epoch) } else { None }).collect();
    assert_eq!(epochs, vec![1, 2, 3]);
    let checkpoints: Vec<(CheckpointKind, PathBuf)> = events
        .0
        .iter()
        .filter_map(|e| if let TrainEvent::Checkpoint { checkpoint, path, .. } = e { Some((*checkpoint, path.clone())) } else { None })
        .collect();
    let epoch_files: Vec<&PathBuf> = checkpoints.iter().filter(|(k, _)| *k == CheckpointKind::Epoch).map(|(_, p)| p).collect();
    assert_eq!(epoch_files.len(), 2, "epochs 1 and 2 (the last one is the final file)");
    assert!(!epoch_files[0].exists(), "pruned: keep last 1");
    assert!(epoch_files[1].exists());
    assert!(events.0.iter().any(|e| matches!(e, TrainEvent::Pruned { .. })));
    let samples: Vec<&PathBuf> = events.0.iter().filter_map(|e| if let TrainEvent::Sample { path, .. } = e { Some(path) } else { None }).collect();
    assert_eq!(samples.len(), 2, "two prompts at epoch 2");
    for s in &samples {
        let img = image::open(s).unwrap();
        assert_eq!((img.width(), img.height()), (32, 32));
    }
    // Metadata a kohya user expects.
    let lora = LoraFile::load(&out.network_file.unwrap()).unwrap();
    for key in ["ss_network_module", "ss_network_dim", "ss_base_model_version", "ss_tag_frequency", "ss_dataset_dirs", "ss_seed", "ss_steps", "sshs_model_hash"] {
        assert!(lora.metadata.contains_key(key), "missing {key}");
    }
    assert!(lora.metadata["ss_tag_frequency"].contains("red"));
    // The latent cache on disk is reused by the next run.
    let cache = cfg.output_dir.join(".cache/latents");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2);

    // Cancel: stops after the current step with a state to resume from.
    let cancel = CancelToken::new();
    cancel.cancel();
    let mut events = EventLog::default();
    let mut cfg2 = cfg.clone();
    cfg2.output_dir = tmp.path().join("out2");
    let out = run(&cfg2, &on_device(RunOptions::default()), &mut events, &cancel).unwrap();
    assert!(out.cancelled);
    assert_eq!(out.final_step, 1);
    assert!(events.0.iter().any(|e| matches!(e, TrainEvent::Finished { cancelled: true, .. })));
    assert!(loft_worker::train::has_state(&cfg2.output_dir));
}

#[test]
fn sdxl_trains_with_both_text_encoders() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = base_config(tmp.path(), NetworkAlgo::Lora);
    cfg.pretrained_model_name_or_path = fixture("tiny-sdxl");
    cfg.model_family = ModelFamily::Sdxl;
    cfg.max_train_steps = 4;
    let out = run(&cfg, &on_device(RunOptions::default()), &mut EventLog::default(), &CancelToken::new()).unwrap();
    let lora = LoraFile::load(&out.network_file.unwrap()).unwrap();
    let names: Vec<&str> = lora.modules.iter().map(|m| m.name.as_str()).collect();
    assert!(names.iter().any(|n| n.starts_with("lora_te1_")), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("lora_te2_")));
    assert!(names.iter().any(|n| n.starts_with("lora_unet_input_blocks_")), "SDXL uses LDM names");
    assert_eq!(lora.metadata["ss_base_model_version"], "sdxl_base_v1-0");
    // The file applies to a fresh SDXL model: every module (te1, te2 and the LDM-named UNet
    // layers) finds its layer.
    let fresh = StableDiffusion::load(&fixture("tiny-sdxl"), DType::F32, &device()).unwrap();
    assert!(fresh.apply_networks(&[(&lora, 1.0)]).unwrap().is_empty());
    // Wrong family is refused before any work, naming the key.
    cfg.model_family = ModelFamily::Sd15;
    let err = run(&cfg, &on_device(RunOptions::default()), &mut EventLog::default(), &CancelToken::new()).unwrap_err();
    assert!(format!("{err:#}").contains("model_family"), "{err:#}");
}

#[test]
fn bad_images_are_skipped_by_name_or_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = base_config(tmp.path(), NetworkAlgo::Lora);
    cfg.max_train_steps = 1;
    std::fs::write(cfg.train_data_dir.join("4_shapes/broken.png"), b"not a png").unwrap();
    let mut events = EventLog::default();
    run(&cfg, &on_device(RunOptions::default()), &mut events, &CancelToken::new()).unwrap();
    assert!(events.0.iter().any(|e| matches!(e, TrainEvent::Log { level, message } if level == "warn" && message.contains("broken.png"))));
    cfg.skip_bad_images = false;
    let err = run(&cfg, &on_device(RunOptions::default()), &mut EventLog::default(), &CancelToken::new()).unwrap_err();
    assert!(format!("{err:#}").contains("broken.png"), "{err:#}");
}

#[test]
fn trains_from_a_single_file_checkpoint() {
    // The tiny SD1.5 pipeline as one LDM-keyed file; its tokenizer is the `tiny-sd15/` folder
    // named like the file.
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = base_config(tmp.path(), NetworkAlgo::Lora);
    cfg.pretrained_model_name_or_path = fixture("tiny-sd15.safetensors");
    cfg.max_train_steps = 3;
    let out = run(&cfg, &on_device(RunOptions::default()), &mut EventLog::default(), &CancelToken::new()).unwrap();
    let lora = LoraFile::load(&out.network_file.unwrap()).unwrap();
    // Same module names as when training from the diffusers folder.
    let folder = StableDiffusion::load(&fixture("tiny-sd15"), DType::F32, &device()).unwrap();
    let names: std::collections::HashSet<String> = folder.named_layers().into_iter().map(|n| n.kohya_name).collect();
    assert!(lora.modules.iter().all(|m| names.contains(&m.name)));
    // Both layouts encode prompts alike.
    let single = StableDiffusion::load(&fixture("tiny-sd15.safetensors"), DType::F32, &device()).unwrap();
    let p = vec!["a photo of a cat".to_string()];
    let (a, b) = (folder.encode_prompts(&p, 1, 75).unwrap().hidden, single.encode_prompts(&p, 1, 75).unwrap().hidden);
    let diff: f32 = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
    assert!(diff < 1e-5, "{diff}");
}

/// The gradients of every trained variable (LoRA on the UNet and every text encoder, random
/// non-zero factors) with gradient checkpointing equal the plain ones, for SD1.5 and SDXL.
#[test]
fn gradient_checkpointing_gives_the_plain_gradients() {
    use loft_worker::grad_checkpoint::GradientCheckpointing;
    use loft_worker::train::network::Network;
    for (name, family) in [("tiny-sd15", ModelFamily::Sd15), ("tiny-sdxl", ModelFamily::Sdxl)] {
        let dev = device();
        let model = StableDiffusion::load(&fixture(name), DType::F32, &dev).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = base_config(tmp.path(), NetworkAlgo::Locon);
        configure(&mut cfg, NetworkAlgo::Locon);
        let network = Network::attach(&model, NetworkAlgo::Locon, &cfg.network_options(), "full", true, true).unwrap();
        network.set_training(true);
        let vars: Vec<candle_core::Var> = network.all_trainable().into_iter().map(|(_, v)| v).collect();
        // Non-zero factors everywhere, so no gradient is zero by construction.
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for v in &vars {
            let dims = v.dims().to_vec();
            v.set(&(randn(&mut rng, &dims, &dev).unwrap() * 0.1).unwrap()).unwrap();
        }
        let captions = vec!["a red square".to_string(), "a blue circle".to_string()];
        let latents = randn(&mut rng, &[2, 4, 16, 16], &dev).unwrap();
        let t = Tensor::new(&[300f32, 700.], &dev).unwrap();
        let time_ids = [[128f32, 128., 0., 0., 128., 128.]; 2];
        let loss_of = || -> Tensor {
            let e = model.encode_prompts(&captions, 1, 75).unwrap();
            let added = model.added_cond(e.pooled.as_ref(), &time_ids).unwrap();
            let pred = model.unet().forward(&latents, &t, &e.hidden, added.as_ref()).unwrap();
            pred.sqr().unwrap().mean_all().unwrap()
        };
        let checkpointing = GradientCheckpointing::new(&dev, &vars).unwrap();
        let plain = loss_of().backward().unwrap();
        let recomputed = checkpointing.backward(&checkpointing.forward(|| Ok::<_, ()>(loss_of())).unwrap()).unwrap();
        let mut worst = 0f32;
        for (v, (layer, _)) in vars.iter().zip(network.all_trainable()) {
            // SDXL reads the penultimate layer of its encoders: their last layer gets none.
            let Some(a) = plain.get(v) else {
                assert!(recomputed.get(v).is_none(), "{name}: {layer} has a gradient only when recomputed");
                assert!(layer.contains("encoder_layers_"), "{name}: no gradient for {layer}");
                continue;
            };
            let b = recomputed.get(v).unwrap_or_else(|| panic!("{name}: {layer} lost its gradient"));
            let scale: f32 = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
            let diff: f32 = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
            assert!(scale > 0.0, "{name}: {layer} has a zero gradient");
            worst = worst.max(diff / scale);
            assert!(diff <= 1e-4 * scale, "{name}: {layer} gradient differs by {diff} (scale {scale})");
        }
        eprintln!("{name} ({family:?}): {} gradients, worst relative difference {worst:.2e}", vars.len());
    }
}

/// Gradient checkpointing recomputes each UNet resnet / transformer block and each CLIP layer
/// in the backward instead of keeping its activations. The trained weights must come out the
/// same as without it — with the text encoder trained, conv adapters inside the resnets, and
/// the random rank and module dropouts (recorded in the forward, replayed by the recompute).
#[test]
fn gradient_checkpointing_trains_the_same_weights() {
    for (algo, te) in [(NetworkAlgo::Locon, true), (NetworkAlgo::Dylora, false)] {
        let run_with = |checkpointing: bool| {
            let tmp = tempfile::tempdir().unwrap();
            let mut cfg = base_config(tmp.path(), algo);
            configure(&mut cfg, algo);
            cfg.max_train_steps = 5;
            cfg.train_batch_size = 2;
            cfg.network_train_unet_only = !te;
            cfg.rank_dropout = 0.3;
            cfg.module_dropout = 0.2;
            cfg.gradient_checkpointing = checkpointing;
            let out = run(&cfg, &on_device(RunOptions::default()), &mut EventLog::default(), &CancelToken::new())
                .unwrap_or_else(|e| panic!("{} checkpointing={checkpointing}: {e:#}", algo.name()));
            final_tensors(&out.network_file.unwrap())
        };
        let (plain, checkpointed) = (run_with(false), run_with(true));
        assert_eq!(plain.len(), checkpointed.len());
        if te {
            assert!(plain.keys().any(|k| k.starts_with("lora_te_")), "the text encoder was trained");
            assert!(plain.keys().any(|k| k.contains("_resnets_") && k.contains("_conv1.")), "conv adapters sit inside the resnets");
        }
        for (k, a) in &plain {
            let scale: f32 = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
            let diff: f32 = (a - &checkpointed[k]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
            // The gradients agree to ~1e-6 (`gradient_checkpointing_gives_the_plain_gradients`);
            // summed in another order, their last bits differ, and five Adam steps at lr 1e-2
            // turn that into up to ±lr·steps on elements whose gradient is near zero (Adam's
            // update is ~lr·sign there). Seen: ≤1.4e-4.
            assert!(diff <= 3e-4 * scale.max(1.0), "{}: {k} differs by {diff} (scale {scale})", algo.name());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Memory benchmark (ignored): gradient checkpointing on and off
// ---------------------------------------------------------------------------------------------

/// Peak resident memory and time of LoCon training steps (UNet + text encoder) on the tiny
/// SD1.5 at 64×64 pixels (32×32 latents: its VAE downsamples twice), batch 4, with and without gradient checkpointing, each in a fresh
/// child process. The VAE latents are cached first, so the peak is the training step's.
/// `cargo test --release -p loft-worker --test train -- --ignored --nocapture --exact bench_gradient_checkpointing_memory`
#[test]
#[ignore]
fn bench_gradient_checkpointing_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let child = |case: &str| {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "bench_checkpointing_child", "--nocapture", "--test-threads=1"])
            .env("LOFT_BENCH_DIR", tmp.path())
            .env("LOFT_BENCH_CASE", case)
            .output()
            .unwrap();
        assert!(out.status.success(), "{case}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines().filter_map(|l| l.find("bench: ").map(|i| l[i + 7..].to_string())).collect::<Vec<_>>()
    };
    child("warm-cache");
    let off = child("off");
    let on = child("on");
    let field = |lines: &[String], key: &str| -> f64 {
        lines.iter().find_map(|l| l.strip_prefix(key).map(|v| v.trim().parse::<f64>().unwrap())).unwrap()
    };
    let (peak_off, peak_on) = (field(&off, "peak_mb"), field(&on, "peak_mb"));
    let (time_off, time_on) = (field(&off, "step_s"), field(&on, "step_s"));
    println!("bench: gradient checkpointing, tiny SD1.5, LoCon UNet+TE, 64x64 pixels (32x32 latents), batch 4:");
    println!("bench:   off: peak RSS over the start {peak_off:.0} MB, {time_off:.2} s/step");
    println!("bench:   on:  peak RSS over the start {peak_on:.0} MB, {time_on:.2} s/step");
    println!("bench:   on/off: memory {:.2}x, time {:.2}x", peak_on / peak_off, time_on / time_off);
}

/// One measured run of the benchmark above (run by it in a child process; does nothing alone).
#[test]
#[ignore]
fn bench_checkpointing_child() {
    let (Some(dir), Ok(case)) = (std::env::var_os("LOFT_BENCH_DIR").map(PathBuf::from), std::env::var("LOFT_BENCH_CASE")) else {
        return;
    };
    let mut cfg = base_config(&dir, NetworkAlgo::Locon);
    configure(&mut cfg, NetworkAlgo::Locon);
    cfg.train_data_dir = make_dataset_sized(&dir, 4, 64);
    cfg.output_dir = dir.join(format!("out-{case}"));
    cfg.resolution = 64;
    cfg.max_bucket_reso = 64;
    cfg.min_bucket_reso = 32;
    cfg.train_batch_size = 4;
    cfg.cache_latents = true;
    cfg.max_train_steps = if case == "warm-cache" { 1 } else { 3 };
    cfg.gradient_checkpointing = case == "on";
    let options = on_device(RunOptions { cache_dir: Some(dir.join("latents")), ..Default::default() });
    let base = vm_kib("VmRSS:");
    let t0 = std::time::Instant::now();
    let out = run(&cfg, &options, &mut EventLog::default(), &CancelToken::new()).unwrap();
    let seconds = t0.elapsed().as_secs_f64();
    let peak_mb = (vm_kib("VmHWM:") - base) as f64 / 1024.0;
    println!("bench: peak_mb {peak_mb:.1}");
    println!("bench: step_s {:.3}", seconds / out.final_step as f64);
}

/// The log lines of a run.
fn logs(events: &EventLog) -> Vec<String> {
    events.0.iter().filter_map(|e| if let TrainEvent::Log { message, .. } = e { Some(message.clone()) } else { None }).collect()
}

/// fp16 mixed precision on the CPU: the frozen model computes in f16, the trained variables
/// stay f32 and end close to an f32 run's; fp16's loss scale is saved with the state and an
/// overflowing scale skips steps and halves (GradScaler); no_half_vae keeps the VAE in f32
/// (its latents are an f32 run's: the cache is shared); bf16, which the CPU backend cannot
/// multiply, is refused by name before any work.
#[test]
fn mixed_precision_fp16_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = on_device(RunOptions { cache_dir: Some(tmp.path().join("latents")), ..Default::default() });
    let mut cfg = base_config(tmp.path(), NetworkAlgo::Lora);
    cfg.max_train_steps = 10;
    cfg.learning_rate = 5e-3;
    let f32_run = run(&cfg, &cache, &mut EventLog::default(), &CancelToken::new()).unwrap();

    let mut half = cfg.clone();
    half.output_dir = tmp.path().join("out-fp16");
    half.mixed_precision = "fp16".into();
    half.no_half_vae = true;
    half.save_state = true;
    let mut events = EventLog::default();
    let half_run = run(&half, &cache, &mut events, &CancelToken::new()).unwrap();
    let log = logs(&events);
    assert!(log.iter().any(|l| l.contains("latents: 2 cached, 0 encoded")), "no_half_vae: the f32 VAE's cached latents are reused: {log:?}");
    assert!(log.iter().any(|l| l.contains("fp16 on the CPU")), "{log:?}");
    let losses: Vec<f64> = events.0.iter().filter_map(|e| if let TrainEvent::Step { loss, .. } = e { Some(*loss) } else { None }).collect();
    assert!(losses.iter().all(|l| l.is_finite()) && losses.len() == 10);

    let (a, b) = (final_tensors(&f32_run.network_file.unwrap()), final_tensors(&half_run.network_file.unwrap()));
    assert_eq!(a.len(), b.len());
    // f16 activations (11-bit mantissa) through 10 AdamW steps: close, not equal. (Element
    // by element AdamW amplifies rounding where a gradient is near zero, so each tensor is
    // compared by its norm.)
    let norm = |t: &Tensor| -> f32 { t.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar().unwrap() };
    let mut worst = 0f32;
    for (k, ta) in &a {
        assert_eq!(b[k].dtype(), DType::F32, "{k}: trained in f32 and saved as float");
        if k.ends_with(".alpha") {
            continue;
        }
        worst = worst.max(norm(&(ta - &b[k]).unwrap()) / norm(ta));
    }
    assert!(worst < 0.1, "fp16 weights differ from the f32 run's by {worst} (relative norm)");
    eprintln!("fp16 vs f32 after 10 steps: worst relative norm difference {worst:.3e}");

    // The loss scale is in the state; a scale that overflows the f16 gradients makes the
    // resumed run skip steps and halve it, then go on.
    let state = loft_worker::train::state::list(&half.output_dir).pop().expect("a state");
    let progress_path = state.join("progress.json");
    let mut progress: serde_json::Value = serde_json::from_slice(&std::fs::read(&progress_path).unwrap()).unwrap();
    assert_eq!(progress["loss_scale"]["scale"], 65536.0, "no overflow at the default scale on this model");
    progress["step"] = 5.into();
    progress["batch"] = 5.into();
    progress["epoch"] = 0.into();
    let huge = f64::powi(2.0, 22);
    progress["loss_scale"]["scale"] = huge.into();
    std::fs::write(&progress_path, serde_json::to_vec(&progress).unwrap()).unwrap();
    let mut events = EventLog::default();
    run(&half, &RunOptions { resume: true, ..cache.clone() }, &mut events, &CancelToken::new()).unwrap();
    let skipped = logs(&events).iter().filter(|l| l.contains("overflowed")).count();
    assert!((1..5).contains(&skipped), "{skipped} steps skipped: {:?}", logs(&events));
    let last = loft_worker::train::state::list(&half.output_dir).pop().unwrap();
    let progress: serde_json::Value = serde_json::from_slice(&std::fs::read(last.join("progress.json")).unwrap()).unwrap();
    assert_eq!(progress["loss_scale"]["scale"], huge / f64::powi(2.0, skipped as i32));

    let mut bf16 = cfg.clone();
    bf16.mixed_precision = "bf16".into();
    let err = run(&bf16, &cache, &mut EventLog::default(), &CancelToken::new()).unwrap_err();
    assert!(format!("{err:#}").contains("mixed_precision"), "{err:#}");
}
