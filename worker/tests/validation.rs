//! Validation loss (`validation_split`, `validation_seed`, `validate_every_n_epochs`/`_steps`,
//! `max_validation_steps`): the held-out images are sd-scripts' `split_train_val`'s, the
//! timesteps its linspace, the loss of a fixed batch diffusers', and a real run reports a value
//! that only the network changes.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::tiny_run::{config, fixture, train_with};
use loft_worker::lora_file::LoraFile;
use loft_worker::models::pipeline::StableDiffusion;
use loft_worker::networks::NetworkAlgo;
use loft_worker::noise::{LossOptions, NoiseSchedule};
use loft_worker::train::data::split_for_validation;
use loft_worker::train::validation::validation_timesteps;
use loft_worker::train::{prediction_loss, LossInputs, RunOptions, TrainConfig, TrainEvent};
use serde_json::Value;

fn fixture_json() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sd-scripts/validation.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

/// `tests/parity/make_validation_fixtures.py`: sd-scripts' `split_train_val`.
#[test]
fn the_split_is_sd_scripts() {
    for case in fixture_json()["splits"].as_array().unwrap() {
        let n = case["n"].as_u64().unwrap();
        let names: Vec<String> = (0..n).map(|i| format!("img{i:03}.png")).collect();
        let (train, held_out) = split_for_validation(names, case["split"].as_f64().unwrap(), case["seed"].as_u64().unwrap());
        let expected_train = strings(&case["train"]);
        assert_eq!(train, expected_train, "{case}");
        // sd-scripts' validation part, less the image it can share with the training part.
        let expected_validation: Vec<String> = strings(&case["validation"]).into_iter().filter(|v| !expected_train.contains(v)).collect();
        assert_eq!(held_out, expected_validation, "{case}");
    }
}

#[test]
fn the_timesteps_are_sd_scripts() {
    for case in fixture_json()["timesteps"].as_array().unwrap() {
        let got = validation_timesteps(case["min"].as_u64().unwrap() as usize, case["max"].as_u64().unwrap() as usize);
        let expected: Vec<usize> = case["timesteps"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as usize).collect();
        assert_eq!(got, expected, "{case}");
    }
}

/// The loss of a fixed batch (latents, text states, one noise per timestep) at the validation
/// timesteps, on the tiny SD 1.5 model, equals diffusers'.
#[test]
fn a_fixed_batch_has_diffusers_loss() {
    let fixture_batch = fixture_json()["batch"].clone();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sd-scripts/validation_batch.safetensors");
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let model = StableDiffusion::load(&fixture("tiny-sd15"), DType::F32, &Device::Cpu).unwrap();
    let schedule = NoiseSchedule::new(&model.scheduler, false, false).unwrap();
    let latents = &tensors["latents"];
    let b = latents.dim(0).unwrap();
    let timesteps: Vec<usize> = fixture_batch["timesteps"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as usize).collect();
    assert_eq!(timesteps, validation_timesteps(0, 1000));
    let mut losses = vec![];
    for (i, &t) in timesteps.iter().enumerate() {
        let noise: &Tensor = &tensors[&format!("noise_{i}")];
        let ts = vec![t; b];
        let weights = vec![1.0; b];
        let inputs = LossInputs { latents, masks: None, noise, applied_noise: noise, timesteps: &ts, hidden: &tensors["hidden"], added: None, sample_weights: &weights };
        let loss = prediction_loss(&model, &schedule, &LossOptions::default(), DType::F32, &inputs, None).unwrap();
        let loss = loss.to_scalar::<f32>().unwrap() as f64;
        let expected = fixture_batch["losses"][i].as_f64().unwrap();
        assert!((loss - expected).abs() < 1e-5 * expected, "timestep {t}: Loft {loss} vs diffusers {expected}");
        losses.push(loss);
    }
    let mean = losses.iter().sum::<f64>() / losses.len() as f64;
    assert!((mean - fixture_batch["loss"].as_f64().unwrap()).abs() < 1e-5);
}

/// tiny_run's dataset with four more images, so a split of 0.5 holds out three of six.
fn six_images(root: &Path) -> std::path::PathBuf {
    let data = common::tiny_run::dataset(root);
    let sub = data.join("4_shapes");
    for i in 2..6u32 {
        image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 7 + i * 30) as u8, (y * 5) as u8, (i * 40) as u8])).save(sub.join(format!("img{i}.png"))).unwrap();
        std::fs::write(sub.join(format!("img{i}.txt")), format!("a photo of a pattern, number {i}")).unwrap();
    }
    data
}

fn validations(events: &[TrainEvent]) -> Vec<(u64, f64)> {
    events.iter().filter_map(|e| if let TrainEvent::Validation { step, loss, .. } = e { Some((*step, *loss)) } else { None }).collect()
}

#[test]
fn a_run_reports_validation_loss_that_only_the_network_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = six_images(tmp.path());
    let cfg = TrainConfig {
        train_data_dir: data,
        validation_split: 0.5,
        validation_seed: 11,
        validate_every_n_steps: 2,
        max_train_epochs: 2,
        max_train_steps: 0,
        train_batch_size: 2,
        ..config(tmp.path(), NetworkAlgo::Lora)
    };
    // Three images train (4 repeats, batch 2: 6 steps an epoch), three are held out.
    let (file, events) = train_with(&cfg, &RunOptions::default());
    let started = events.iter().find_map(|e| if let TrainEvent::Started { images, total_steps, .. } = e { Some((*images, *total_steps)) } else { None });
    assert_eq!(started, Some((3, 12)));
    let v = validations(&events);
    // Every 2 steps, and at the end of each epoch (the value of the step validation at the
    // same step: steps 6 and 12).
    assert_eq!(v.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [2, 4, 6, 6, 8, 10, 12, 12], "{v:?}");
    assert!(v[2].1 == v[3].1 && v[6].1 == v[7].1);
    assert!(v.windows(2).any(|w| w[0].1 != w[1].1), "training changes the validation loss: {v:?}");
    let meta = LoraFile::load(&file.unwrap()).unwrap().metadata;
    assert_eq!(meta.get("ss_num_validation_images").map(String::as_str), Some("3"));
    assert_eq!(meta.get("ss_validation_split").map(String::as_str), Some("0.5"));
    let last: f64 = meta["loft_validation_loss"].parse().unwrap();
    assert!((last - v.last().unwrap().1).abs() < 1e-12);

    // With a learning rate of 0 nothing changes but the training noise: every evaluation is the
    // same number (fixed timesteps, fixed noise, no flips or caption changes).
    let frozen = tempfile::tempdir().unwrap();
    let cfg = TrainConfig { learning_rate: 0.0, output_dir: frozen.path().join("out"), max_validation_steps: 1, ..cfg };
    let (_, events) = train_with(&cfg, &RunOptions::default());
    let v = validations(&events);
    assert_eq!(v.len(), 8);
    assert!(v.iter().all(|(_, l)| *l == v[0].1 && l.is_finite() && *l > 0.0), "{v:?}");
    assert!(events.iter().any(|e| matches!(e, TrainEvent::Log { message, .. } if message.contains("3 images held out, 1 batches"))), "{events:?}");
}
