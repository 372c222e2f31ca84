//! The built-in demo: a newcomer with no checkpoint at hand can still watch the whole flow. The
//! tiny SD 1.5-architecture fixture model (~1.2 MB, shipped inside the binary) and a few generated
//! pictures are written under `DATA/demo/` on first use; the demo job trains a small LoRA on them
//! on the CPU in about a minute, with samples every other epoch and a file per epoch to download.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use include_dir::{include_dir, Dir};
use serde_json::{json, Value};

use crate::registry::Config;

static DEMO_MODEL: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/tests/fixtures/models/tiny-sd15");

pub const DEMO_JOB_NAME: &str = "Demo: tiny model, 4 pictures";

/// Where the demo's files live.
pub struct DemoFiles {
    pub model: PathBuf,
    pub dataset: PathBuf,
}

/// The pictures: a shape and colour each, with a caption that says so.
const PICTURES: &[(&str, [u8; 3], &str)] = &[
    ("circle", [220, 60, 50], "a red circle"),
    ("square", [40, 110, 220], "a blue square"),
    ("circle", [250, 200, 40], "a yellow circle"),
    ("square", [60, 170, 90], "a green square"),
];

/// The demo trains at 64×64: the tiny model learns something visible in seconds on a CPU.
const SIZE: u32 = 64;

fn picture(shape: &str, color: [u8; 3], variant: u32) -> RgbImage {
    let size = SIZE;
    let s = size as f32 / 256.0;
    RgbImage::from_fn(size, size, |x, y| {
        let (cx, cy) = ((128.0 + 10.0 * variant as f32) * s, 120.0 * s);
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        let inside = match shape {
            "circle" => dx * dx + dy * dy < (70.0 * s) * (70.0 * s),
            _ => dx.abs() < 62.0 * s && dy.abs() < 62.0 * s,
        };
        if inside {
            Rgb(color)
        } else {
            // A soft vertical gradient, so the background is not one flat value.
            let t = y as f32 / size as f32;
            let v = (235.0 - 60.0 * t) as u8;
            Rgb([v, v, (v as f32 * 0.95) as u8])
        }
    })
}

/// Writes the model and the dataset unless they are there already; returns where they are.
pub fn ensure(data_dir: &Path) -> Result<DemoFiles> {
    let root = data_dir.join("demo");
    let model = root.join("tiny-sd15");
    let dataset = root.join("dataset");
    if !model.join("model_index.json").is_file() {
        let staging = root.join(".tiny-sd15.partial");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
        DEMO_MODEL.extract(&staging).with_context(|| format!("cannot write the demo model to {}", staging.display()))?;
        let _ = std::fs::remove_dir_all(&model);
        std::fs::rename(&staging, &model)?;
    }
    let images = dataset.join("2_demo");
    // Marks a complete write; kept outside the dataset so the dataset reader never sees it.
    let done = root.join("dataset.done");
    if !done.is_file() {
        std::fs::create_dir_all(&images).with_context(|| format!("cannot create {}", images.display()))?;
        for (i, (shape, color, caption)) in PICTURES.iter().enumerate() {
            picture(shape, *color, i as u32).save(images.join(format!("{i:02}.png")))?;
            std::fs::write(images.join(format!("{i:02}.txt")), format!("demo, {caption}"))?;
        }
        std::fs::write(&done, b"")?;
    }
    Ok(DemoFiles { model, dataset })
}

/// The demo job's configuration (sparse: everything else keeps its default).
pub fn config(files: &DemoFiles) -> Config {
    let v: Value = json!({
        "model_family": "sd15",
        "pretrained_model_name_or_path": files.model.to_string_lossy(),
        "train_data_dir": files.dataset.to_string_lossy(),
        "output_name": "loft_demo",
        "mixed_precision": "no",
        "resolution": SIZE,
        "min_bucket_reso": 32,
        "max_bucket_reso": 128,
        "bucket_reso_steps": 32,
        "train_batch_size": 2,
        "max_train_epochs": 6,
        "network_dim": 4,
        "network_alpha": 4.0,
        "learning_rate": 0.005,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 3,
        "seed": 42,
        "save_every_n_epochs": 1,
        "save_state": true,
        "sample_every_n_epochs": 2,
        // One picture held out: the loss chart's dashed validation line, once an epoch.
        "validation_split": 0.25,
        "sample_prompts": "demo, a red circle --w 64 --h 64 --s 12 --d 1 --l 5",
    });
    v.as_object().expect("an object").clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_is_written_once_and_its_config_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let files = ensure(dir.path()).unwrap();
        assert!(files.model.join("unet/diffusion_pytorch_model.safetensors").is_file());
        assert_eq!(std::fs::read_dir(files.dataset.join("2_demo")).unwrap().count(), 2 * PICTURES.len());
        ensure(dir.path()).unwrap(); // a second time: nothing to do
        let mut c = config(&files);
        c.insert("output_dir".into(), json!(dir.path().join("out")));
        let registry = crate::registry::Registry::embedded().unwrap();
        let engine = super::super::config::engine_config(&registry, &c).unwrap();
        assert_eq!((engine.resolution, engine.max_train_epochs, engine.lr_scheduler.as_str()), (SIZE, 6, "cosine"));
    }
}
