//! Runs that start from other files, through the real training loop on the tiny SD 1.5
//! fixture: `network_weights` (same algorithm, shapes checked, `dim_from_weights`) and
//! `base_weights` (merged into the frozen model before training).

mod common;

use common::tiny_run::{config, refusal, tensors, train};
use loft_worker::lora_file::LoraFile;
use loft_worker::networks::NetworkAlgo;
use loft_worker::train::TrainConfig;

/// A run started from a file with learning rate 0 saves that file's weights unchanged (every
/// module loaded, nothing re-initialised); with other ranks it is refused naming the module and
/// both shapes unless `dim_from_weights`, which takes the file's ranks; another algorithm's file
/// is refused by module.
#[test]
fn network_weights_start_from_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let first_cfg = config(tmp.path(), NetworkAlgo::LycorisLocon);
    let (first, _) = train(&first_cfg);

    let mut cont = first_cfg.clone();
    cont.output_dir = tmp.path().join("cont");
    cont.network_weights = first.clone();
    cont.learning_rate = 0.0;
    cont.max_train_steps = 1;
    let (again, _) = train(&cont);
    let (a, b) = (tensors(&first), tensors(&again));
    assert_eq!(a.len(), b.len());
    for (k, ta) in &a {
        let diff: f32 = (ta - &b[k]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert_eq!(diff, 0.0, "{k} changed at learning rate 0");
    }

    let mut other_rank = cont.clone();
    other_rank.output_dir = tmp.path().join("rank8");
    other_rank.network_dim = 8;
    let e = refusal(&other_rank);
    assert!(e.contains("network_weights") && e.contains("[4, ") && e.contains("[8, ") && e.contains("dim_from_weights"), "{e}");

    other_rank.dim_from_weights = true;
    let (taken, _) = train(&other_rank);
    let file = LoraFile::load(&taken).unwrap();
    assert_eq!(file.metadata.get("ss_network_dim").map(String::as_str), Some("4"), "{:?}", file.metadata);
    assert!(file.modules.iter().all(|m| m.rank == Some(4)));

    let mut loha = cont.clone();
    loha.output_dir = tmp.path().join("loha");
    loha.network_algo = NetworkAlgo::Loha;
    let e = refusal(&loha);
    assert!(e.contains("network_algo is loha") && e.contains("module lora_"), "{e}");
}

/// `base_weights` merges the file into the frozen model: a fresh LoRA (ΔW = 0 at the start) on
/// the merged model computes the same first-step loss as the file's network loaded with
/// `network_weights` on the plain model, and another loss than the plain model alone.
#[test]
fn base_weights_are_merged_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let mut first_cfg = config(tmp.path(), NetworkAlgo::Lora);
    first_cfg.learning_rate = 5e-2;
    let (first, _) = train(&first_cfg);

    let step_one = |name: &str, edit: &dyn Fn(&mut TrainConfig)| -> f64 {
        let mut cfg = first_cfg.clone();
        cfg.output_dir = tmp.path().join(name);
        cfg.learning_rate = 0.0;
        cfg.max_train_steps = 1;
        edit(&mut cfg);
        train(&cfg).1[0]
    };
    let plain = step_one("plain", &|_| {});
    let merged = step_one("merged", &|c| c.base_weights = vec![first.clone()]);
    let loaded = step_one("loaded", &|c| c.network_weights = first.clone());
    assert!((merged - loaded).abs() <= 1e-5 * loaded.abs().max(1.0), "merged {merged} vs loaded {loaded}");
    assert!((merged - plain).abs() > 1e-4, "the merge changed nothing: {merged} vs {plain}");
    let half = step_one("half", &|c| {
        c.base_weights = vec![first.clone()];
        c.base_weights_multiplier = vec![0.5];
    });
    assert!((half - merged).abs() > 1e-5 && (half - plain).abs() > 1e-5, "multiplier 0.5: {half} (plain {plain}, 1.0 {merged})");
    // Several files, each at its own multiplier, merged in order: a LoRA's ΔW is linear in its
    // multiplier, so the file twice at 0.25 is the file once at 0.5; a file without a
    // multiplier is merged at 1.0, so [file, file] at [0.5] is the file at 1.5.
    let quarters = step_one("quarters", &|c| {
        c.base_weights = vec![first.clone(), first.clone()];
        c.base_weights_multiplier = vec![0.25, 0.25];
    });
    assert!((quarters - half).abs() <= 1e-5 * half.abs().max(1.0), "two files at 0.25: {quarters} vs one at 0.5: {half}");
    let one_and_a_half = step_one("one_and_a_half", &|c| {
        c.base_weights = vec![first.clone(), first.clone()];
        c.base_weights_multiplier = vec![0.5];
    });
    let at_1_5 = step_one("at_1_5", &|c| {
        c.base_weights = vec![first.clone()];
        c.base_weights_multiplier = vec![1.5];
    });
    assert!((one_and_a_half - at_1_5).abs() <= 1e-5 * at_1_5.abs().max(1.0), "[0.5, default 1.0]: {one_and_a_half} vs 1.5: {at_1_5}");
    let mut extra = first_cfg.clone();
    extra.base_weights = vec![first.clone()];
    extra.base_weights_multiplier = vec![1.0, 0.5];
    let e = refusal(&extra);
    assert!(e.contains("base_weights_multiplier") && e.contains("2 values for 1"), "{e}");

    let mut missing = first_cfg.clone();
    missing.base_weights = vec![first.clone(), tmp.path().join("nope.safetensors")];
    let e = refusal(&missing);
    assert!(e.contains("base_weights") && e.contains("nope.safetensors"), "{e}");
}
