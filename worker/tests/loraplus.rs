//! LoRA+ (`loraplus_lr_ratio`, `loraplus_unet_lr_ratio`, `loraplus_text_encoder_lr_ratio`):
//! the groups equal sd-scripts' `prepare_optimizer_params` on its own module names, and a real
//! run steps the up matrices at ratio × the learning rate.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use common::tiny_run::{config, refusal, tensors, train_with};
use loft_worker::networks::NetworkAlgo;
use loft_worker::train::param_groups::{assemble, loraplus_ratio};
use loft_worker::train::{run, CancelToken, EventLog, RunOptions, TrainEvent};
use serde_json::Value;

/// `tests/parity/make_loraplus_fixtures.py`: sd-scripts' groups for five settings.
#[test]
fn groups_equal_sd_scripts() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sd-scripts/loraplus_groups.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let arg = |k: &str| case["network_args"][k].as_str().map_or(0.0, |v| v.parse::<f64>().unwrap());
        // sd-scripts' None is Loft's 0 ("use learning_rate").
        let lr = case["learning_rate"].as_f64().unwrap();
        let part_lr = |k: &str| case[k].as_f64().unwrap_or(lr);
        let mut expected: BTreeMap<String, (f64, Vec<String>)> = BTreeMap::new();
        let mut all: Vec<(String, ())> = vec![];
        for g in case["groups"].as_array().unwrap() {
            let loft_name = g["description"].as_str().unwrap().replace("textencoder", "text_encoder").replace(' ', "_");
            let params: Vec<String> = g["params"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
            all.extend(params.iter().map(|p| (p.clone(), ())));
            expected.insert(loft_name, (g["lr"].as_f64().unwrap(), params));
        }
        let (te, unet): (Vec<_>, Vec<_>) = all.into_iter().partition(|(n, _)| n.starts_with("lora_te"));
        let mut got = BTreeMap::new();
        for (part, part_lr, ratio, params) in [
            ("unet", part_lr("unet_lr"), loraplus_ratio(arg("loraplus_unet_lr_ratio"), arg("loraplus_lr_ratio")), &unet),
            ("text_encoder", part_lr("text_encoder_lr"), loraplus_ratio(arg("loraplus_text_encoder_lr_ratio"), arg("loraplus_lr_ratio")), &te),
        ] {
            for (group, lr, mut params) in assemble(part, part_lr, ratio, params) {
                params.sort_by(|a, b| a.0.cmp(&b.0));
                got.insert(group, (lr, params.into_iter().map(|(n, _)| n).collect::<Vec<_>>()));
            }
        }
        assert_eq!(got.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>(), "{name}: group names");
        for (group, (lr, params)) in &expected {
            let (got_lr, got_params) = &got[group];
            assert!((got_lr - lr).abs() <= 1e-12 * lr, "{name}/{group}: lr {got_lr} vs sd-scripts {lr}");
            assert_eq!(got_params, params, "{name}/{group}: parameters");
        }
    }
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

/// The largest |lora_up| element over the U-Net's and over the text encoder's modules.
fn up_extent(file: &Path) -> (f32, f32) {
    let mut unet: f32 = 0.0;
    let mut te: f32 = 0.0;
    for (k, t) in tensors(file) {
        if k.ends_with("lora_up.weight") {
            let m = max_abs(&t);
            if k.starts_with("lora_unet_") {
                unet = unet.max(m);
            } else {
                te = te.max(m);
            }
        }
    }
    (unet, te)
}

/// One AdamW step from zero-initialised up matrices moves each element by `lr·g/(|g|+eps)`, so
/// the largest |up| element after it is the group's learning rate: 1e-3 without LoRA+, ratio ×
/// 1e-3 with it — U-Net and text encoder at their own ratios. The step events carry each group's
/// learning rate; the state records the groups, and a resume without LoRA+ is refused.
#[test]
fn up_matrices_step_at_the_ratio() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), NetworkAlgo::Lora);
    cfg.learning_rate = 1e-3;
    cfg.optimizer_args = "weight_decay=0".into();
    cfg.max_train_steps = 1;
    let (plain, _) = train_with(&cfg, &RunOptions::default());
    let (unet, te) = up_extent(&plain.unwrap());
    assert!((unet / 1e-3 - 1.0).abs() < 0.01 && (te / 1e-3 - 1.0).abs() < 0.01, "without LoRA+: {unet} {te}");

    cfg.output_dir = tmp.path().join("plus");
    cfg.loraplus_lr_ratio = 4.0;
    cfg.loraplus_text_encoder_lr_ratio = 2.0;
    let (plus, events) = train_with(&cfg, &RunOptions::default());
    let (unet, te) = up_extent(&plus.unwrap());
    assert!((unet / 4e-3 - 1.0).abs() < 0.01, "U-Net up at ratio 4: {unet}");
    assert!((te / 2e-3 - 1.0).abs() < 0.01, "text encoder up at ratio 2: {te}");
    let lrs = events.iter().find_map(|e| if let TrainEvent::Step { lrs, .. } = e { Some(lrs.clone()) } else { None }).unwrap();
    let lrs: BTreeMap<String, f64> = lrs.into_iter().collect();
    let want = [("text_encoder", 1e-3), ("text_encoder_plus", 2e-3), ("unet", 1e-3), ("unet_plus", 4e-3)];
    assert_eq!(lrs.len(), 4, "{lrs:?}");
    for (g, lr) in want {
        assert!((lrs[g] - lr).abs() < 1e-12, "{g}: {lrs:?}");
    }

    // Resume: the state at step 1 of 2 records the groups.
    cfg.output_dir = tmp.path().join("resume");
    cfg.max_train_steps = 2;
    cfg.save_every_n_steps = 1;
    cfg.save_state = true;
    train_with(&cfg, &RunOptions { stop_after_steps: Some(1), ..RunOptions::default() });
    let mut off = cfg.clone();
    off.loraplus_lr_ratio = 0.0;
    off.loraplus_text_encoder_lr_ratio = 0.0;
    let e = match run(&off, &RunOptions { resume: true, ..RunOptions::default() }, &mut EventLog::default(), &CancelToken::new()) {
        Ok(_) => panic!("resume without LoRA+ from a LoRA+ state should be refused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("optimizer groups") && e.contains("unet_plus (lr 4e-3") && e.contains("LoRA+ switched on or off"), "{e}");
    // Another ratio keeps the layout: it resumes (as a changed learning rate does), and says so.
    let mut other = cfg.clone();
    other.loraplus_lr_ratio = 8.0;
    let (_, events) = train_with(&other, &RunOptions { resume: true, stop_after_steps: Some(0), ..RunOptions::default() });
    let said = events.iter().any(|e| matches!(e, TrainEvent::Log { message, .. } if message.contains("unet_plus (lr 8e-3") && message.contains("saved with")));
    assert!(said, "the changed ratio is logged: {events:?}");
    let (done, _) = train_with(&cfg, &RunOptions { resume: true, ..RunOptions::default() });
    assert!(done.is_some(), "the same settings resume to the end");
}

/// Prodigy needs one learning rate for all groups: LoRA+ with it is refused before anything runs.
#[test]
fn prodigy_refuses_loraplus_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), NetworkAlgo::Lora);
    cfg.optimizer_type = "Prodigy".into();
    cfg.loraplus_unet_lr_ratio = 16.0;
    let e = refusal(&cfg);
    assert!(e.contains("loraplus_unet_lr_ratio") && e.contains("Prodigy"), "{e}");
}
