//! `color_aug` and `face_crop_aug_range`: the hue shift and gamma equal sd-scripts' (through
//! cv2's 8-bit HSV conversions), the face crop's resize and cut equal its `crop_target`, and
//! runs train with both.

mod common;

use std::path::Path;

use common::tiny_run::{config, refusal, train, train_with};
use loft_worker::data::augment::{face_crop, gamma, hue_shift};
use loft_worker::networks::NetworkAlgo;
use loft_worker::train::{RunOptions, TrainConfig, TrainEvent};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;

fn fixture_json() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sd-scripts/augment.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn bytes(v: &Value) -> Vec<u8> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u8).collect()
}

/// `tests/parity/make_augment_fixtures.py`: sd-scripts' color_aug branches on cv2 4.10.
#[test]
fn color_aug_equals_sd_scripts() {
    let f = fixture_json();
    let image = image::RgbImage::from_raw(12, 12, bytes(&f["image"])).unwrap();
    for case in f["hue"].as_array().unwrap() {
        let mut img = image.clone();
        hue_shift(&mut img, case["shift"].as_f64().unwrap());
        assert_eq!(img.into_raw(), bytes(&case["image"]), "hue shift {}", case["shift"]);
    }
    for case in f["gamma"].as_array().unwrap() {
        let mut img = image.clone();
        gamma(&mut img, case["gamma"].as_f64().unwrap());
        assert_eq!(img.into_raw(), bytes(&case["image"]), "gamma {}", case["gamma"]);
    }
}

#[test]
fn face_crop_equals_sd_scripts() {
    for case in fixture_json()["face"].as_array().unwrap() {
        let pair = |k: &str| (case[k][0].as_u64().unwrap() as u32, case[k][1].as_u64().unwrap() as u32);
        let face = case["face"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect::<Vec<_>>();
        let range = (case["range"][0].as_f64().unwrap(), case["range"][1].as_f64().unwrap());
        let (choice, origin) = face_crop(pair("size"), (face[0], face[1], face[2], face[3]), range, pair("target"), false, &mut StdRng::seed_from_u64(0)).unwrap();
        assert_eq!((choice.resized, origin, choice.bucket), (pair("resized"), pair("origin"), pair("cropped")), "{case}");
    }
}

#[test]
fn runs_train_with_color_aug_and_face_crops() {
    let tmp = tempfile::tempdir().unwrap();
    let base = TrainConfig { max_train_steps: 4, ..config(tmp.path(), NetworkAlgo::Lora) };
    let plain = train(&base).1;
    let (_, events) = train_with(&TrainConfig { color_aug: true, ..base.clone() }, &RunOptions::default());
    let losses: Vec<f64> = events.iter().filter_map(|e| if let TrainEvent::Step { loss, .. } = e { Some(*loss) } else { None }).collect();
    assert_ne!(losses, plain, "some image had its colours changed");
    assert!(events.iter().any(|e| matches!(e, TrainEvent::Log { message, .. } if message.contains("latents are encoded every step"))));

    // 64² images with a face box in the name, 32² without buckets: cut around the face.
    let faces = tempfile::tempdir().unwrap();
    let sub = faces.path().join("data/2_face");
    std::fs::create_dir_all(&sub).unwrap();
    for (i, name) in ["a_40_20_16_16.png", "b_10_50_12_12.png"].iter().enumerate() {
        image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, 60 * i as u8])).save(sub.join(name)).unwrap();
    }
    std::fs::write(sub.join("a.txt"), "a face").unwrap();
    let cfg = TrainConfig { train_data_dir: faces.path().join("data"), output_dir: faces.path().join("out"), enable_bucket: false, face_crop_aug_range: "1.0,2.0".into(), ..base.clone() };
    let (file, losses) = train(&cfg);
    assert!(file.is_file() && losses.iter().all(|l| l.is_finite()));

    let err = refusal(&TrainConfig { enable_bucket: true, ..cfg.clone() });
    assert!(err.contains("face_crop_aug_range") && err.contains("enable_bucket"), "{err}");
    let err = refusal(&TrainConfig { face_crop_aug_range: "3,2".into(), ..cfg });
    assert!(err.contains("face_crop_aug_range") && err.contains("min ≤ max"), "{err}");
}
