//! `lora_file::convert` on the files Loft writes for every algorithm
//! (`tests/fixtures/networks/loft-written/`, with each module's base layer and reference ΔW in
//! `<case>.expected.safetensors`):
//!
//! - at full rank the converted plain LoRA gives every module's ΔW within 1e-5 (relative to
//!   max|ΔW|), so it merges to the same weights as the original; bias deltas are the only thing
//!   left out, and they are reported;
//! - at a low rank the energy reported equals ‖ΔW_r‖²/‖ΔW‖² recomputed from the written file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use loft_worker::lora_file::convert::{convert, RankChoice};
use loft_worker::lora_file::{serialize_tensors, FileAlgo, LoraFile};
use loft_worker::networks::BaseLayer;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/networks/loft-written")
}

fn cases() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".safetensors") && !n.ends_with(".expected.safetensors"))
        .map(|n| n.trim_end_matches(".safetensors").to_string())
        .collect();
    v.sort();
    assert!(v.len() >= 13, "expected a file per algorithm, found {v:?}");
    v
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

struct Case {
    file: LoraFile,
    expected: HashMap<String, Tensor>,
}

fn load(name: &str) -> Case {
    let file = LoraFile::load(&dir().join(format!("{name}.safetensors"))).unwrap();
    let expected = candle_core::safetensors::load(dir().join(format!("{name}.expected.safetensors")), &Device::Cpu).unwrap();
    Case { file, expected }
}

impl Case {
    fn base_of(&self, module: &str) -> Option<BaseLayer> {
        let w = self.expected.get(&format!("{module}.org.weight"))?.clone();
        let b = self.expected.get(&format!("{module}.org.bias")).cloned();
        Some(if w.rank() == 4 { BaseLayer::conv2d(w, b, 1, 1).unwrap() } else { BaseLayer::linear(w, b).unwrap() })
    }

    fn convert(&self, choice: RankChoice) -> (loft_worker::lora_file::convert::Conversion, LoraFile) {
        let c = convert(&self.file, choice, DType::F32, &|m| Ok(self.base_of(&m.name))).unwrap();
        let bytes = serialize_tensors(&c.tensors, &c.metadata).unwrap();
        let back = LoraFile::from_bytes(Path::new("converted.safetensors"), &bytes).unwrap();
        (c, back)
    }
}

#[test]
fn full_rank_conversion_keeps_every_delta() {
    let mut report = vec![];
    for name in cases() {
        let case = load(&name);
        let (c, back) = case.convert(RankChoice::Rank { linear: 100_000, conv: None });
        assert!(
            back.modules.iter().all(|m| matches!(m.algo, FileAlgo::Lora | FileAlgo::Locon) && !m.dora && !m.tucker),
            "{name}: not a plain LoRA: {:?}",
            back.algorithms()
        );
        let mut worst = 0f64;
        for m in &back.modules {
            let want = &case.expected[&format!("{}.dw", m.name)];
            let got = m.delta(None).unwrap().dw.reshape(want.dims()).unwrap();
            let (g, w) = (vals(&got), vals(want));
            let scale = w.iter().fold(0f64, |a, x| a.max(x.abs())).max(1e-12);
            let err = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max) / scale;
            worst = worst.max(err);
            assert!(err <= 1e-5, "{name} {}: ΔW rel err {err:.2e}", m.name);
            let reported = c.modules.iter().find(|r| r.name == m.name).unwrap();
            assert!((reported.energy - 1.0).abs() < 1e-9 && reported.rel_error < 1e-7, "{name} {}: {reported:?}", m.name);
            // What a plain LoRA cannot hold is named.
            let has_db = case.expected.contains_key(&format!("{}.db", m.name));
            assert_eq!(has_db, !reported.dropped.is_empty(), "{name} {}: {:?}", m.name, reported.dropped);
        }
        assert_eq!(back.modules.len(), case.file.modules.len(), "{name}");
        report.push(format!("{name:<22} {} modules, worst ΔW rel err {worst:.2e}", back.modules.len()));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn low_rank_energy_is_the_written_files_energy() {
    for name in cases() {
        let case = load(&name);
        for choice in [RankChoice::Rank { linear: 2, conv: Some(3) }, RankChoice::Energy(0.9)] {
            let (c, back) = case.convert(choice);
            let (mut kept, mut total) = (0.0, 0.0);
            for m in &back.modules {
                let want = &case.expected[&format!("{}.dw", m.name)];
                let got = m.delta(None).unwrap().dw;
                let e: f64 = vals(&got).iter().map(|x| x * x).sum();
                let t: f64 = vals(want).iter().map(|x| x * x).sum();
                let reported = c.modules.iter().find(|r| r.name == m.name).unwrap();
                let recomputed = if t == 0.0 { 1.0 } else { e / t };
                assert!((reported.energy - recomputed).abs() < 1e-5, "{name} {}: reported {} vs file {recomputed}", m.name, reported.energy);
                if let RankChoice::Energy(target) = choice {
                    // (That it is the smallest such rank is the unit test's in convert.rs.)
                    assert!(reported.energy >= target - 1e-9, "{name} {}: {} < {target}", m.name, reported.energy);
                } else {
                    let spatial = reported.shape.len() == 4 && reported.shape[2] * reported.shape[3] > 1;
                    assert_eq!(reported.rank, (if spatial { 3 } else { 2 }).min(reported.full_rank), "{name} {}", m.name);
                }
                kept += e;
                total += t;
            }
            // One alpha for the whole file (the largest rank): diffusers scales every module
            // whose alpha differs from the most common one wrongly.
            let max_rank = c.modules.iter().map(|r| r.rank).max().unwrap();
            for m in &back.modules {
                assert_eq!(m.alpha, Some(max_rank as f64), "{name} {}", m.name);
            }
            let overall = if total == 0.0 { 1.0 } else { kept / total };
            assert!((c.overall_energy() - overall).abs() < 1e-5, "{name}: overall {} vs {overall}", c.overall_energy());
            assert!(back.metadata["loft_converted_from"].contains("\"method\""), "{name}");
        }
    }
}
