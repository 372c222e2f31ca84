//! A short training run on the tiny SD 1.5 fixture (two 32² images), for the tests of options
//! that change a run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use loft_worker::networks::NetworkAlgo;
use loft_worker::train::{run, CancelToken, EventLog, RunOptions, TrainConfig, TrainEvent};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(name)
}

pub fn dataset(root: &Path) -> PathBuf {
    let sub = root.join("data/4_shapes");
    std::fs::create_dir_all(&sub).unwrap();
    for i in 0..2u32 {
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb(if x >= 8 + i && x < 20 + i && (10..24).contains(&y) { [230, 90 * i as u8, 20] } else { [60 * i as u8, 40, 200] })
        });
        img.save(sub.join(format!("img{i}.png"))).unwrap();
        std::fs::write(sub.join(format!("img{i}.txt")), format!("a photo of a shape, number {i}")).unwrap();
    }
    root.join("data")
}

/// The settings every short run shares: the tiny SD 1.5 model, 32² buckets, rank 4, lr 1e-2,
/// 6 steps, seed 7, f32 files; the data folder is the caller's.
pub fn base(root: &Path, train_data_dir: PathBuf, algo: NetworkAlgo) -> TrainConfig {
    TrainConfig {
        pretrained_model_name_or_path: fixture("tiny-sd15"),
        train_data_dir,
        output_dir: root.join("out"),
        resolution: 32,
        min_bucket_reso: 16,
        max_bucket_reso: 64,
        bucket_reso_steps: 8,
        network_algo: algo,
        network_dim: 4,
        network_alpha: 4.0,
        learning_rate: 1e-2,
        max_train_epochs: 0,
        max_train_steps: 6,
        save_every_n_epochs: 0,
        seed: 7,
        save_precision: "float".into(),
        ..TrainConfig::default()
    }
}

/// [`base`] on [`dataset`], with conv adapters, on the CPU.
pub fn config(root: &Path, algo: NetworkAlgo) -> TrainConfig {
    TrainConfig {
        conv_dim: Some(4),
        conv_alpha: Some(2.0),
        device: "cpu".into(),
        ..base(root, dataset(root), algo)
    }
}

/// Trains `cfg` and returns the final file and the step losses.
pub fn train(cfg: &TrainConfig) -> (PathBuf, Vec<f64>) {
    let mut events = EventLog::default();
    let out = run(cfg, &RunOptions::default(), &mut events, &CancelToken::new()).unwrap_or_else(|e| panic!("{e:#}"));
    let losses = events.0.iter().filter_map(|e| if let TrainEvent::Step { loss, .. } = e { Some(*loss) } else { None }).collect();
    (out.network_file.expect("a file"), losses)
}

pub fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

pub fn refusal(cfg: &TrainConfig) -> String {
    match run(cfg, &RunOptions::default(), &mut EventLog::default(), &CancelToken::new()) {
        Ok(_) => panic!("the run should have been refused"),
        Err(e) => format!("{e:#}"),
    }
}


/// Trains `cfg` with `options` and returns the outcome's file (if any) and every event.
pub fn train_with(cfg: &TrainConfig, options: &RunOptions) -> (Option<PathBuf>, Vec<TrainEvent>) {
    let mut events = EventLog::default();
    let out = run(cfg, options, &mut events, &CancelToken::new()).unwrap_or_else(|e| panic!("{e:#}"));
    (out.network_file, events.0)
}
