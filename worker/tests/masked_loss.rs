//! Masked loss (`masked_loss` with `conditioning_data_dir`, and `alpha_mask`): the weighting
//! equals sd-scripts' `apply_masked_loss` and its reduction on fixed inputs, and real runs learn
//! only what their masks let through, with the mask in the latent cache key.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::tiny_run::{base, refusal, tensors, train, train_with};
use loft_worker::data::masks::area_resize;
use loft_worker::models::pipeline::SchedulerConfig;
use loft_worker::networks::NetworkAlgo;
use loft_worker::noise::{diffusion_loss, LossOptions, NoiseSchedule};
use loft_worker::train::{RunOptions, TrainConfig, TrainEvent};
use serde_json::Value;

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{what}: Loft {a} vs sd-scripts {b}");
}

/// `tests/parity/make_masked_loss_fixtures.py`: sd-scripts on alpha masks, mask images and an
/// uneven size.
#[test]
fn weighting_equals_sd_scripts() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sd-scripts/masked_loss.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let schedule = NoiseSchedule::new(&SchedulerConfig::default(), false, false).unwrap();
    let floats = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<f32>>();
    let dims = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect::<Vec<usize>>();
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let loss_shape = dims(&case["loss_shape"]);
        let (b, c, h, w) = (loss_shape[0], loss_shape[1], loss_shape[2], loss_shape[3]);
        let mask_shape = dims(&case["mask_shape"]);
        let (mh, mw) = (mask_shape[1], mask_shape[2]);
        let mut values = floats(&case["mask"]);
        if case["kind"] == "red_u8" {
            // Loft reads a mask image's red channel as v / 255.
            values.iter_mut().for_each(|v| *v /= 255.0);
        }
        let mut grid = vec![];
        for sample in values.chunks(mh * mw) {
            grid.extend(area_resize(sample, (mh, mw), (h, w)));
        }
        for (i, (a, e)) in grid.iter().zip(floats(&case["mask_on_grid"])).enumerate() {
            close(*a as f64, e as f64, &format!("{name}: mask cell {i}"));
        }
        // The element-wise loss as an l2 loss of pred = √loss against a zero target.
        let loss = Tensor::from_vec(floats(&case["loss"]), (b, c, h, w), &Device::Cpu).unwrap();
        let pred = loss.sqrt().unwrap();
        let target = pred.zeros_like().unwrap();
        let masks = Tensor::from_vec(grid, (b, 1, h, w), &Device::Cpu).unwrap();
        let weights: Vec<f64> = floats(&case["loss_weights"]).into_iter().map(f64::from).collect();
        let timesteps = vec![500; b];
        let total = diffusion_loss(&LossOptions::default(), &schedule, &pred, &target, &timesteps, &weights, Some(&masks)).unwrap();
        close(total.to_scalar::<f32>().unwrap() as f64, case["loss_mean"].as_f64().unwrap(), &format!("{name}: batch loss"));
        // Unmasked, the same call gives the plain mean: the mask is what changed it.
        let plain = diffusion_loss(&LossOptions::default(), &schedule, &pred, &target, &timesteps, &weights, None).unwrap();
        assert!(plain.to_scalar::<f32>().unwrap() as f64 > case["loss_mean"].as_f64().unwrap(), "{name}");
    }
}

/// Two 32² images (as tiny_run's), with an alpha channel of `alpha` everywhere.
fn rgba_dataset(root: &Path, alpha: u8) -> PathBuf {
    let sub = root.join("data/4_shapes");
    std::fs::create_dir_all(&sub).unwrap();
    for i in 0..2u32 {
        let img = image::RgbaImage::from_fn(32, 32, |x, y| {
            image::Rgba(if x >= 8 + i && x < 20 + i && (10..24).contains(&y) { [230, 90 * i as u8, 20, alpha] } else { [60 * i as u8, 40, 200, alpha] })
        });
        img.save(sub.join(format!("img{i}.png"))).unwrap();
        std::fs::write(sub.join(format!("img{i}.txt")), format!("a photo of a shape, number {i}")).unwrap();
    }
    root.join("data")
}

/// Mask files for both images: white where `keep(x, y)`, black elsewhere.
fn write_masks(dir: &Path, keep: impl Fn(u32, u32) -> bool) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..2 {
        image::GrayImage::from_fn(32, 32, |x, y| image::Luma([if keep(x, y) { 255 } else { 0 }])).save(dir.join(format!("img{i}.png"))).unwrap();
    }
}

fn short(root: &Path, data: PathBuf) -> TrainConfig {
    TrainConfig { max_train_steps: 3, device: "cpu".into(), ..base(root, data, NetworkAlgo::Lora) }
}

fn first_step_loss(cfg: &TrainConfig) -> f64 {
    train(cfg).1[0]
}

#[test]
fn a_transparent_image_teaches_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = TrainConfig { alpha_mask: true, ..short(tmp.path(), rgba_dataset(tmp.path(), 0)) };
    let (file, losses) = train(&cfg);
    assert!(losses.iter().all(|&l| l == 0.0), "every pixel masked out: {losses:?}");
    // No gradient ever reached the up matrices, which start at zero.
    for (name, t) in tensors(&file) {
        if name.ends_with("lora_up.weight") {
            assert_eq!(t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0, "{name}");
        }
    }
    // Opaque images with alpha_mask train as without it.
    let opaque = tempfile::tempdir().unwrap();
    let data = rgba_dataset(opaque.path(), 255);
    let with_alpha = train(&TrainConfig { alpha_mask: true, ..short(opaque.path(), data.clone()) }).1;
    let without = train(&short(opaque.path(), data)).1;
    assert_eq!(with_alpha, without);
}

#[test]
fn mask_files_weight_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::tiny_run::dataset(tmp.path());
    let unmasked = train(&short(tmp.path(), data.clone())).1;
    let masks = tmp.path().join("masks");
    let masked = |root: &Path| TrainConfig { masked_loss: true, conditioning_data_dir: masks.clone(), ..short(root, data.clone()) };

    write_masks(&masks, |_, _| true);
    assert_eq!(train(&masked(tmp.path())).1, unmasked, "an all-white mask changes nothing");

    write_masks(&masks, |_, _| false);
    assert!(train(&masked(tmp.path())).1.iter().all(|&l| l == 0.0), "an all-black mask leaves nothing to learn");

    write_masks(&masks, |x, _| x < 16);
    let half = first_step_loss(&masked(tmp.path()));
    assert!(half > 0.0 && half < unmasked[0], "the left half only: {half} of {}", unmasked[0]);

    // A mask folder that mirrors the dataset's subfolders works as well.
    let mirrored = tmp.path().join("mirrored");
    write_masks(&mirrored.join("4_shapes"), |x, _| x < 16);
    let cfg = TrainConfig { conditioning_data_dir: mirrored, ..masked(tmp.path()) };
    assert_eq!(first_step_loss(&cfg), half);
}

fn latent_log(events: &[TrainEvent]) -> String {
    events
        .iter()
        .find_map(|e| match e {
            TrainEvent::Log { message, .. } if message.starts_with("latents:") => Some(message.clone()),
            _ => None,
        })
        .expect("a latents line")
}

#[test]
fn the_latent_cache_follows_the_mask() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::tiny_run::dataset(tmp.path());
    let masks = tmp.path().join("masks");
    let cfg = TrainConfig { masked_loss: true, conditioning_data_dir: masks.clone(), max_train_steps: 1, ..short(tmp.path(), data) };
    let options = RunOptions { cache_dir: Some(tmp.path().join("cache")), ..RunOptions::default() };
    write_masks(&masks, |x, _| x < 16);
    let (_, events) = train_with(&cfg, &options);
    assert_eq!(latent_log(&events), "latents: 0 cached, 2 encoded");
    let (_, events) = train_with(&cfg, &options);
    assert_eq!(latent_log(&events), "latents: 2 cached, 0 encoded");
    write_masks(&masks, |x, _| x >= 16);
    let (_, events) = train_with(&cfg, &options);
    assert_eq!(latent_log(&events), "latents: 0 cached, 2 encoded", "another mask is another cache entry");
}

#[test]
fn missing_or_mismatched_masks_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::tiny_run::dataset(tmp.path());
    let masks = tmp.path().join("masks");
    std::fs::create_dir_all(&masks).unwrap();
    image::GrayImage::new(32, 32).save(masks.join("img0.png")).unwrap();
    let cfg = TrainConfig { masked_loss: true, conditioning_data_dir: masks.clone(), ..short(tmp.path(), data.clone()) };
    let err = refusal(&cfg);
    assert!(err.contains("img1.png") && err.contains("conditioning_data_dir"), "{err}");

    image::GrayImage::new(16, 32).save(masks.join("img1.png")).unwrap();
    let err = refusal(&cfg);
    assert!(err.contains("masks/img1.png") && err.contains("16×32") && err.contains("32×32"), "{err}");

    let err = refusal(&TrainConfig { masked_loss: true, ..short(tmp.path(), data.clone()) });
    assert!(err.contains("masked_loss") && err.contains("alpha_mask"), "{err}");
    let err = refusal(&TrainConfig { conditioning_data_dir: masks, ..short(tmp.path(), data) });
    assert!(err.contains("conditioning_data_dir") && err.contains("masked_loss"), "{err}");
    assert!(!tmp.path().join("out").join("tiny.safetensors").exists());
}
