//! TensorBoard logs (`logging_dir`, `log_with`, `log_prefix`, `log_tracker_name`): the event
//! file is byte for byte what TensorBoard's own writer makes of the same scalars, and a run logs
//! sd-scripts' tags into sd-scripts' folder layout.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::tiny_run::{config, refusal, train};
use loft_worker::networks::NetworkAlgo;
use loft_worker::train::tensorboard::{event_payload, frame, parse_event, read_frames, EventBody};
use loft_worker::train::TrainConfig;
use serde_json::Value;

/// `tests/parity/make_tensorboard_fixtures.py`: TensorBoard's RecordWriter on torch's scalar
/// summaries.
#[test]
fn event_files_are_tensorboards_bytes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tensorboard");
    let expected = std::fs::read(dir.join("scalars.tfevents")).unwrap();
    let spec: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("scalars.json")).unwrap()).unwrap();
    let mut bytes = frame(&event_payload(spec["start"].as_f64().unwrap(), 0, &EventBody::FileVersion("brain.Event:2".into())));
    for s in spec["scalars"].as_array().unwrap() {
        let body = EventBody::Scalar(s[1].as_str().unwrap().into(), s[2].as_f64().unwrap() as f32);
        bytes.extend(frame(&event_payload(s[3].as_f64().unwrap(), s[0].as_i64().unwrap(), &body)));
    }
    assert_eq!(bytes, expected);
    // And TensorBoard's file reads back through Loft's reader.
    let events: Vec<_> = read_frames(&expected).unwrap().iter().map(|p| parse_event(p).unwrap()).collect();
    assert_eq!(events.len(), 1 + spec["scalars"].as_array().unwrap().len());
    assert_eq!(events[1].2, Some(EventBody::Scalar("loss/current".into(), 0.123456789)));
}

/// Every scalar of the event files under `dir`: tag → steps.
fn logged(dir: &Path) -> BTreeMap<String, Vec<i64>> {
    let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut files = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap().to_string_lossy().contains("tfevents") {
                files.push(p);
            }
        }
    }
    assert_eq!(files.len(), 1, "{files:?}");
    let rel = files[0].strip_prefix(dir).unwrap();
    let parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    assert_eq!(parts.len(), 3, "logging_dir/<prefix><time>/<tracker>/events…: {rel:?}");
    assert!(parts[0].starts_with("shapes-") && parts[0].len() == "shapes-".len() + 14, "{rel:?}");
    assert_eq!(parts[1], "lora_run");
    for payload in read_frames(&std::fs::read(&files[0]).unwrap()).unwrap() {
        if let (_, step, Some(EventBody::Scalar(tag, value))) = parse_event(&payload).unwrap() {
            assert!(value.is_finite(), "{tag}");
            out.entry(tag).or_default().push(step);
        }
    }
    out
}

#[test]
fn a_run_logs_sd_scripts_tags() {
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("logs");
    let cfg = TrainConfig {
        logging_dir: logs.clone(),
        log_prefix: "shapes-".into(),
        log_tracker_name: "lora_run".into(),
        max_train_epochs: 2,
        max_train_steps: 0,
        train_batch_size: 2,
        loraplus_lr_ratio: 4.0,
        text_encoder_lr: 5e-5,
        network_train_unet_only: false,
        validation_split: 0.5,
        ..config(tmp.path(), NetworkAlgo::Lora)
    };
    let (_, losses) = train(&cfg);
    let tags = logged(&logs);
    let steps: Vec<i64> = (1..=losses.len() as i64).collect();
    for tag in ["loss/current", "loss/average", "lr/unet", "lr/unet_plus", "lr/textencoder", "lr/textencoder_plus", "time/it_per_sec"] {
        assert_eq!(tags.get(tag), Some(&steps), "{tag}: {tags:?}");
    }
    // Epoch values at the epoch number, as sd-scripts logs them.
    for tag in ["loss/epoch_average", "time/epoch_seconds", "loss/validation/epoch_average", "loss/validation/epoch_divergence"] {
        assert_eq!(tags.get(tag), Some(&vec![1, 2]), "{tag}: {tags:?}");
    }

    let err = refusal(&TrainConfig { log_with: "wandb".into(), output_dir: tmp.path().join("other"), ..cfg });
    assert!(err.contains("log_with") && err.contains("wandb"), "{err}");
}
