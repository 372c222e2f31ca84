//! Weighted captions and wildcards (`weighted_captions`, `enable_wildcard`): the tokens, weights
//! and text-encoder states equal sd-scripts' on the tiny SD 1.5 model, wildcard expansion gives
//! exactly the captions sd-scripts' `process_caption` can give, and real runs use both.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{DType, Device};
use common::tiny_run::{config, fixture, refusal, train};
use loft_worker::data::{process_caption, CaptionOptions};
use loft_worker::models::pipeline::StableDiffusion;
use loft_worker::networks::NetworkAlgo;
use loft_worker::train::TrainConfig;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;

fn fixture_json() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sd-scripts/captions.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `tests/parity/make_caption_fixtures.py`: sd-scripts' weighted token windows and weights, and
/// the text-encoder states it weights with them.
#[test]
fn weighted_captions_equal_sd_scripts() {
    let fixture_data = fixture_json();
    let model = StableDiffusion::load(&fixture("tiny-sd15"), DType::F32, &Device::Cpu).unwrap();
    let tok = &model.tokenizers[0];
    for case in fixture_data["weighted"].as_array().unwrap() {
        let caption = case["caption"].as_str().unwrap();
        let max_tokens = case["max_token_length"].as_u64().unwrap() as usize;
        let (windows, weights) = tok.encode_weighted_chunks(caption, max_tokens).unwrap();
        let expected: Vec<Vec<u32>> = serde_json::from_value(case["windows"].clone()).unwrap();
        assert_eq!(windows, expected, "{caption} ({max_tokens})");
        // sd-scripts' per-window weights → the weight of each joined state position.
        let per_window: Vec<Vec<f32>> = serde_json::from_value(case["window_weights"].clone()).unwrap();
        let mut expected_weights = vec![1.0f32];
        for w in &per_window {
            expected_weights.extend_from_slice(&w[1..76]);
        }
        expected_weights.push(1.0);
        assert_eq!(weights, expected_weights, "{caption} ({max_tokens})");
    }
    let captions: Vec<String> = fixture_data["captions"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sd-scripts/weighted_captions.safetensors");
    let states = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    for max_tokens in [75, 150] {
        let got = model.encode_weighted_prompts(&captions, 1, max_tokens).unwrap().hidden;
        let expected = &states[&format!("states_{max_tokens}")];
        assert_eq!(got.dims(), expected.dims());
        let err = (&got - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = expected.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err <= 1e-5 * scale, "{max_tokens} tokens: max error {err} of {scale}");
        // And the weights matter: unweighted states of the same captions differ.
        let plain = model.encode_prompts(&captions, 1, max_tokens).unwrap().hidden;
        let diff = (&plain - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff > 1e-3 * scale);
    }
}

/// Every caption sd-scripts can make from each wildcard caption, over many seeds, and no other.
#[test]
fn wildcards_give_sd_scripts_captions() {
    for case in fixture_json()["wildcards"].as_array().unwrap() {
        let caption = case["caption"].as_str().unwrap();
        let opts = CaptionOptions {
            enable_wildcard: true,
            caption_prefix: case["prefix"].as_str().unwrap().into(),
            caption_suffix: case["suffix"].as_str().unwrap().into(),
            ..CaptionOptions::default()
        };
        let expected: BTreeSet<String> = case["outcomes"].as_array().unwrap().iter().map(|o| o.as_str().unwrap().to_string()).collect();
        let got: BTreeSet<String> = (0..400).map(|seed| process_caption(&opts, caption, 1, 0, &mut StdRng::seed_from_u64(seed))).collect();
        assert_eq!(got, expected, "{caption:?}");
    }
    // Without wildcards: the first line, braces as written.
    let plain = process_caption(&CaptionOptions::default(), "a {red|blue} cat\nsecond", 1, 0, &mut StdRng::seed_from_u64(0));
    assert_eq!(plain, "a {red|blue} cat");
}

fn with_captions(root: &Path, caption: &str) -> TrainConfig {
    let cfg = TrainConfig { max_train_steps: 3, ..config(root, NetworkAlgo::Lora) };
    for i in 0..2 {
        std::fs::write(cfg.train_data_dir.join(format!("4_shapes/img{i}.txt")), caption.replace("{i}", &i.to_string())).unwrap();
    }
    cfg
}

#[test]
fn runs_train_on_weighted_and_wildcard_captions() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = train(&with_captions(tmp.path(), "a photo of a shape, number {i}")).1;
    // Weight 1 is the plain caption; a weight changes the text states and so the loss.
    let weighted = |w: &str| TrainConfig { weighted_captions: true, ..with_captions(tmp.path(), &format!("(a photo of a shape:{w}), number {{i}}")) };
    assert_eq!(train(&weighted("1.0")).1, plain);
    let heavier = train(&weighted("1.5")).1;
    assert_ne!(heavier[0], plain[0]);
    // A one-choice wildcard and a second line leave the caption as it was.
    let wildcard = TrainConfig { enable_wildcard: true, ..with_captions(tmp.path(), "a photo of a {shape}, number {i}") };
    assert_eq!(train(&wildcard).1, plain);
    let cfg = TrainConfig { enable_wildcard: true, ..with_captions(tmp.path(), "{a photo of a shape|a photo of a shape}, number {i}\n\n") };
    assert_eq!(train(&cfg).1, plain);

    let err = refusal(&TrainConfig { shuffle_caption: true, ..weighted("1.5") });
    assert!(err.contains("weighted_captions") && err.contains("shuffle_caption"), "{err}");
}
