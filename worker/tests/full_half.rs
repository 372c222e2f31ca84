//! `full_fp16` / `full_bf16`: the network's trained tensors, their gradients and the optimizer's
//! states in half precision, as sd-scripts' `network.to(weight_dtype)` (the step itself is
//! checked against torch in `optim_parity`'s `*_fp16` / `*_bf16` cases). Here: the real loop
//! trains in fp16 with the optimizers that allow it, the file holds fp16 values, a resume
//! continues to the same weights, and what cannot run is refused before any work, naming why.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use common::tiny_run::{config, refusal, tensors, train, train_with};
use loft_worker::networks::NetworkAlgo;
use loft_worker::train::{run, CancelToken, EventLog, RunOptions, TrainConfig, TrainEvent};

fn fp16(cfg: TrainConfig) -> TrainConfig {
    TrainConfig { mixed_precision: "fp16".into(), full_fp16: true, optimizer_type: "Lion".into(), learning_rate: 1e-3, ..cfg }
}

/// Every value of every tensor is an fp16 value (the file is written in f32 here).
fn all_fp16_values(t: &HashMap<String, Tensor>) -> bool {
    t.iter().filter(|(k, _)| !k.ends_with(".alpha")).all(|(_, t)| {
        let v: Vec<f32> = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        v.iter().all(|x| half::f16::from_f32(*x).to_f32() == *x)
    })
}

#[test]
fn trains_in_fp16_and_writes_fp16_values() {
    let tmp = tempfile::tempdir().unwrap();
    for algo in [NetworkAlgo::Lora, NetworkAlgo::Loha, NetworkAlgo::Full] {
        let cfg = fp16(TrainConfig { max_train_steps: 3, ..config(tmp.path(), algo) });
        let (file, losses) = train(&cfg);
        assert!(losses.iter().all(|l| l.is_finite()), "{algo:?}: {losses:?}");
        let full = tensors(&file);
        assert!(all_fp16_values(&full), "{algo:?}: the trained tensors were fp16");
        // The same run with f32 trained tensors ends elsewhere (its weights are not fp16 values).
        let mixed = TrainConfig { full_fp16: false, output_dir: tmp.path().join("mixed"), ..cfg.clone() };
        let (file32, _) = train(&mixed);
        assert!(!all_fp16_values(&tensors(&file32)), "{algo:?}: without full_fp16 the weights are f32");
        let meta = std::fs::read(&file).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&meta).unwrap();
        assert_eq!(header.metadata().as_ref().unwrap()["ss_full_fp16"], "True");
    }
    // The optimizers that compute in f32 and write the half weights back.
    for opt in ["AdamW8bit", "Adafactor"] {
        let cfg = TrainConfig { optimizer_type: opt.into(), max_train_steps: 2, ..fp16(config(tmp.path(), NetworkAlgo::Lora)) };
        let (file, losses) = train(&cfg);
        assert!(losses.iter().all(|l| l.is_finite()), "{opt}: {losses:?}");
        assert!(all_fp16_values(&tensors(&file)), "{opt}");
    }
}

#[test]
fn logs_it_and_resumes_to_the_same_weights() {
    let a = tempfile::tempdir().unwrap();
    let cfg = fp16(TrainConfig { max_train_steps: 6, ..config(a.path(), NetworkAlgo::Lora) });
    let (whole, events) = train_with(&cfg, &RunOptions::default());
    assert!(
        events.iter().any(|e| matches!(e, TrainEvent::Log { message, .. } if message.contains("full_fp16") && message.contains("f16"))),
        "a log line says the network trains in fp16"
    );
    let b = tempfile::tempdir().unwrap();
    let cfg_b = TrainConfig { output_dir: b.path().join("out"), save_every_n_steps: 3, save_state: true, ..cfg.clone() };
    run(&cfg_b, &RunOptions { stop_after_steps: Some(4), ..Default::default() }, &mut EventLog::default(), &CancelToken::new()).unwrap();
    let resumed = run(&cfg_b, &RunOptions { resume: true, ..Default::default() }, &mut EventLog::default(), &CancelToken::new()).unwrap();
    let (wa, wb) = (tensors(&whole.unwrap()), tensors(&resumed.network_file.unwrap()));
    assert_eq!(wa.len(), wb.len());
    for (k, ta) in &wa {
        let diff: f32 = (ta - &wb[k]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert_eq!(diff, 0.0, "{k} differs after resume");
    }
}

#[test]
fn what_cannot_run_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let lora = || config(tmp.path(), NetworkAlgo::Lora);
    // Hardware: the CPU backend has no bf16 matrix multiply.
    for mp in ["bf16", "auto"] {
        let err = refusal(&TrainConfig { full_bf16: true, mixed_precision: mp.into(), ..lora() });
        assert!(err.contains("bf16") && err.contains("CPU"), "{mp}: {err}");
    }
    // Numbers: fp16 moments that underflow to a division by zero.
    let err = refusal(&TrainConfig { optimizer_type: "Prodigy".into(), learning_rate: 1.0, ..fp16(lora()) });
    assert!(err.contains("full_fp16") && err.contains("Prodigy"), "{err}");
    let err = refusal(&TrainConfig { optimizer_type: "AdamW".into(), ..fp16(lora()) });
    assert!(err.contains("full_fp16") && err.contains("eps"), "{err}");
    // With an eps fp16 can hold, AdamW trains.
    let (_, losses) = train(&TrainConfig { optimizer_type: "AdamW".into(), optimizer_args: "eps=1e-6".into(), max_train_steps: 2, ..fp16(lora()) });
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let err = refusal(&TrainConfig { mixed_precision: "no".into(), ..fp16(lora()) });
    assert!(err.contains("full_fp16") && err.contains("mixed_precision"), "{err}");
}
