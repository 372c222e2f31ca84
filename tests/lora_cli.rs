//! `loft lora inspect` / `loft lora resize` against files saved by Loft.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use loft_worker::candle_core::{DType, Device, Tensor};
use loft_worker::linalg::{svd, Mat};
use loft_worker::lora_file::{save_network, BaseModelVersion, LoraFile, NetworkMetadata};
use loft_worker::networks::{
    adapter_from_tensors, Adapter, BaseLayer, NetworkAlgo, NetworkOptions,
};

fn loft(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loft"))
        .args(args)
        .output()
        .expect("run loft");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(7);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((x >> 40) as f64 / (1u64 << 24) as f64) * 2.0 - 1.0) as f32 * 0.5
        })
        .collect()
}

fn t(shape: &[usize], seed: u64) -> Tensor {
    Tensor::from_vec(values(shape.iter().product(), seed), shape, &Device::Cpu).unwrap()
}

const MODULES: [(&str, &[usize]); 3] = [
    (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        &[48, 32],
    ),
    ("lora_unet_down_blocks_0_resnets_0_conv1", &[24, 16, 3, 3]),
    (
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        &[40, 40],
    ),
];

/// A rank-8 kohya LoRA/LoCon (alpha 4) saved by Loft.
fn make_file(dir: &Path) -> PathBuf {
    let opts = NetworkOptions {
        dim: 8,
        alpha: 4.0,
        conv_dim: Some(8),
        conv_alpha: Some(4.0),
        ..Default::default()
    };
    let mut adapters: Vec<(String, Box<dyn Adapter>)> = Vec::new();
    for (i, (name, shape)) in MODULES.iter().enumerate() {
        let w = Tensor::zeros(*shape, DType::F32, &Device::Cpu).unwrap();
        let base = if shape.len() == 2 {
            BaseLayer::linear(w, None)
        } else {
            BaseLayer::conv2d(w, None, 1, 1)
        }
        .unwrap();
        let mut down_shape = shape.to_vec();
        down_shape[0] = 8;
        let up_shape: Vec<usize> = if shape.len() == 2 {
            vec![shape[0], 8]
        } else {
            vec![shape[0], 8, 1, 1]
        };
        let tensors: HashMap<String, Tensor> = [
            (
                "lora_down.weight".to_string(),
                t(&down_shape, 10 + i as u64),
            ),
            ("lora_up.weight".to_string(), t(&up_shape, 20 + i as u64)),
            (
                "alpha".to_string(),
                Tensor::new(4f32, &Device::Cpu).unwrap(),
            ),
        ]
        .into_iter()
        .collect();
        adapters.push((
            name.to_string(),
            adapter_from_tensors(NetworkAlgo::Lora, &opts, &base, &tensors).unwrap(),
        ));
    }
    let modules: Vec<(String, &dyn Adapter)> = adapters
        .iter()
        .map(|(n, a)| (n.clone(), a.as_ref()))
        .collect();
    let mut meta = NetworkMetadata::for_network(NetworkAlgo::Lora, &opts);
    meta.base_model_version = Some(BaseModelVersion::SdV1);
    let path = dir.join("rank8.safetensors");
    save_network(&path, &modules, &meta, None).unwrap();
    path
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loft-lora-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn to_mat(t: &Tensor) -> Mat {
    let rows = t.dims()[0];
    let v = t
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    Mat::new(rows, v.len() / rows, v)
}

#[test]
fn inspect_prints_algorithm_rank_and_module_count() {
    let dir = tmp("inspect");
    let file = make_file(&dir);
    let (ok, out, err) = loft(&["lora", "inspect", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("algorithm(s):    locon,lora"), "{out}");
    assert!(out.contains("modules:         3 (te 1, unet 2)"), "{out}");
    assert!(out.contains("base model:      sd_v1"), "{out}");
    assert!(out.contains("networks.lora"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("unet") && l.contains("down_blocks_0") && l.contains(" 8 ")),
        "{out}"
    );
    assert!(
        out.contains("ss_network_dim = 8") && out.contains("sshs_model_hash = "),
        "{out}"
    );

    let (ok, out, err) = loft(&["lora", "inspect", file.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["module_count"], 3);
    assert_eq!(v["algorithms"], serde_json::json!(["locon", "lora"]));
    assert_eq!(v["metadata"]["ss_network_alpha"], "4.0");
    assert!(v["modules"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["rank"] == 8 && m["alpha"] == 4.0));
}

#[test]
fn resize_to_rank_4_is_the_truncated_svd_of_each_delta() {
    let dir = tmp("resize");
    let file = make_file(&dir);
    let out_path = dir.join("rank4.safetensors");
    let (ok, out, err) = loft(&[
        "lora",
        "resize",
        file.to_str().unwrap(),
        "--rank",
        "4",
        "--out",
        out_path.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let old = LoraFile::load(&file).unwrap();
    let new = LoraFile::load(&out_path).unwrap();
    assert_eq!(new.metadata["ss_network_dim"], "4");
    assert_eq!(new.metadata["ss_network_alpha"], "2.0");
    assert!(new.metadata["ss_training_comment"].starts_with("dimension is resized from 8 to 4"));
    assert_eq!(new.metadata["ss_network_module"], "networks.lora");
    assert_eq!(new.modules.len(), 3);
    for m in &old.modules {
        let dw = to_mat(&m.delta(None).unwrap().dw);
        let full = svd(&dw);
        let want = full.reconstruct(4);
        let nm = new.module(&m.name).unwrap();
        assert_eq!((nm.rank, nm.alpha), (Some(4), Some(2.0)), "{}", m.name);
        let got = to_mat(&nm.delta(None).unwrap().dw);
        let rel = got.max_abs_diff(&want) / want.data.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        assert!(rel < 1e-4, "{}: rel err {rel:e}", m.name);
        // Reported energy: √(Σ_{i<4} σ²/Σσ²).
        let e4: f64 = full.s[..4].iter().map(|x| x * x).sum();
        let e: f64 = full.s.iter().map(|x| x * x).sum();
        let r = report["modules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == m.name.as_str())
            .unwrap();
        let fro = r["fro_retained"].as_f64().unwrap();
        assert!((fro - (e4 / e).sqrt()).abs() < 1e-9, "{}: {fro}", m.name);
        assert_eq!(r["new_rank"], 4);
    }
    // The table form reports the energy too.
    let out2 = dir.join("rank4b.safetensors");
    let (ok, out, err) = loft(&[
        "lora",
        "resize",
        file.to_str().unwrap(),
        "--rank",
        "4",
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("fro kept") && out.contains("average Frobenius norm retained"),
        "{out}"
    );
}

#[test]
fn dynamic_resize_caps_at_the_rank_and_marks_metadata() {
    let dir = tmp("dyn");
    let file = make_file(&dir);
    let out_path = dir.join("dyn.safetensors");
    let (ok, _, err) = loft(&[
        "lora",
        "resize",
        file.to_str().unwrap(),
        "--rank",
        "6",
        "--dynamic",
        "sv_fro=0.99",
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let new = LoraFile::load(&out_path).unwrap();
    assert_eq!(new.metadata["ss_network_dim"], "Dynamic");
    assert!(new
        .modules
        .iter()
        .all(|m| m.rank.unwrap() <= 6 && m.rank.unwrap() >= 1));
    // alpha/rank keeps the old scale 4/8.
    assert!(new
        .modules
        .iter()
        .all(|m| (m.alpha.unwrap() / m.rank.unwrap() as f64 - 0.5).abs() < 1e-6));
    let (ok, _, err) = loft(&[
        "lora",
        "resize",
        file.to_str().unwrap(),
        "--rank",
        "4",
        "--dynamic",
        "sv_magic=1",
        "--out",
        "x.safetensors",
    ]);
    assert!(!ok && err.contains("sv_magic"), "{err}");
}

#[test]
fn bad_paths_and_corrupt_files_fail_clearly() {
    let dir = tmp("bad");
    let missing = dir.join("does-not-exist.safetensors");
    let (ok, _, err) = loft(&["lora", "inspect", missing.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("does-not-exist.safetensors") && err.starts_with("error:"),
        "{err}"
    );
    let corrupt = dir.join("corrupt.safetensors");
    let good = std::fs::read(make_file(&dir)).unwrap();
    std::fs::write(&corrupt, &good[..good.len() / 2]).unwrap();
    for args in [
        vec!["lora", "inspect", corrupt.to_str().unwrap()],
        vec![
            "lora",
            "resize",
            corrupt.to_str().unwrap(),
            "--rank",
            "2",
            "--out",
            "/tmp/never.safetensors",
        ],
    ] {
        let (ok, _, err) = loft(&args);
        assert!(!ok);
        assert!(
            err.contains("corrupt.safetensors") && !err.contains("panicked"),
            "{err}"
        );
    }
}

fn model_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

/// `loft lora merge` on the tiny SD1.5 pipeline, both layouts, two LyCORIS files with
/// weights; the merged values are checked against the Python reference in
/// worker/tests/lora_merge.rs, here the command line, report and output layout.
#[test]
fn merge_writes_the_layout_it_read() {
    let dir = tmp("merge");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let m = model_fixtures();
    let locon = m.join("merge/tiny-sd15-locon.safetensors");
    let lokr = format!("{}:0.5", m.join("merge/tiny-sd15-lokr.safetensors").display());
    let reference = loft_worker::candle_core::safetensors::load(
        m.join("merge/tiny-sd15-merge-ref.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight";
    let want = &reference[&format!("unet.{key}")];
    let close = |got: &Tensor| {
        let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() < 1e-5
    };

    let out = dir.join("merged");
    let (ok, stdout, err) = loft(&[
        "lora", "merge", "--base", m.join("tiny-sd15").to_str().unwrap(),
        "--lora", locon.to_str().unwrap(), "--lora", &lokr, "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("sd15, diffusers") && stdout.contains("× 0.5 (95 modules)") && stdout.contains("changed: 95 tensors"), "{stdout}");
    let unet = loft_worker::candle_core::safetensors::load(out.join("unet/diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    assert!(close(&unet[key]));
    assert!(out.join("model_index.json").is_file() && out.join("scheduler/scheduler_config.json").is_file());

    let out = dir.join("merged.safetensors");
    let (ok, stdout, err) = loft(&[
        "lora", "merge", "--base", m.join("tiny-sd15.safetensors").to_str().unwrap(),
        "--config", m.join("tiny-sd15").to_str().unwrap(),
        "--lora", locon.to_str().unwrap(), "--lora", &lokr, "--out", out.to_str().unwrap(), "--json",
    ]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["layout"], "single_file");
    assert_eq!(report["family"], "sd15");
    assert_eq!(report["tensors_changed"], 95);
    let merged = loft_worker::candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert!(close(&merged["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"]));

    // The same output again: refused, nothing overwritten.
    let (ok, _, err) = loft(&[
        "lora", "merge", "--base", m.join("tiny-sd15.safetensors").to_str().unwrap(),
        "--lora", locon.to_str().unwrap(), "--out", out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("already exists"), "{err}");
    // A LoRA file given as the base.
    let (ok, _, err) = loft(&[
        "lora", "merge", "--base", locon.to_str().unwrap(), "--lora", locon.to_str().unwrap(),
        "--out", dir.join("x.safetensors").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("LoRA/LyCORIS network file"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `loft lora convert` on the tiny SD1.5 pipeline: the LyCORIS LoKr and LoCon files converted at
/// full rank merge (through `loft lora merge`) to the same weights as the originals; at
/// `--energy 0.99` the report gives each module's rank and energy and the file is a plain LoRA.
#[test]
fn convert_to_lora_merges_like_the_original() {
    let dir = tmp("convert");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let m = model_fixtures();
    let base = m.join("tiny-sd15");
    let merged = |lora: &Path, tag: &str| -> HashMap<String, Tensor> {
        let out = dir.join(format!("merged-{tag}"));
        let (ok, _, err) = loft(&[
            "lora", "merge", "--base", base.to_str().unwrap(), "--lora", lora.to_str().unwrap(), "--out", out.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        loft_worker::candle_core::safetensors::load(out.join("unet/diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap()
    };
    for algo in ["lokr", "locon"] {
        let src = m.join(format!("merge/tiny-sd15-{algo}.safetensors"));
        let out = dir.join(format!("{algo}-as-lora.safetensors"));
        let (ok, stdout, err) = loft(&[
            "lora", "convert", src.to_str().unwrap(), "--to", "lora", "--rank", "100000",
            "--base", base.to_str().unwrap(), "--out", out.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        assert!(stdout.contains("retained energy 100.0000%"), "{stdout}");
        let f = LoraFile::load(&out).unwrap();
        assert_eq!(f.metadata["ss_network_module"], "networks.lora");
        assert!(f.modules.iter().all(|x| x.tensors.keys().all(|k| ["lora_down.weight", "lora_up.weight", "alpha"].contains(&k.as_str()))));
        // The converted file is a plain LoRA: ComfyUI and A1111 apply it exactly, nothing to convert.
        let (ok, stdout, err) = loft(&["lora", "inspect", out.to_str().unwrap(), "--json"]);
        assert!(ok, "{err}");
        let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(r["needs_conversion"], false, "{}", r["clients"]);
        for c in r["clients"].as_array().unwrap().iter().filter(|c| c["client"] != "diffusers") {
            assert_eq!(c["level"], "exact", "{c}");
        }
        let (a, b) = (merged(&src, &format!("{algo}-orig")), merged(&out, &format!("{algo}-conv")));
        let mut worst = 0f32;
        for (k, t) in &a {
            let d = (t - &b[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            worst = worst.max(d);
        }
        assert!(worst < 1e-5, "{algo}: merged weights differ by {worst}");

        let out = dir.join(format!("{algo}-energy.safetensors"));
        let (ok, stdout, err) = loft(&[
            "lora", "convert", src.to_str().unwrap(), "--energy", "0.99", "--base", base.to_str().unwrap(),
            "--out", out.to_str().unwrap(), "--json",
        ]);
        assert!(ok, "{err}");
        let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert!(r["retained_energy"].as_f64().unwrap() >= 0.99, "{stdout}");
        for module in r["modules"].as_array().unwrap() {
            assert!(module["energy"].as_f64().unwrap() >= 0.99 - 1e-9 && module["rank"].as_u64().unwrap() >= 1, "{module}");
        }
    }
    // An IA3 file: ComfyUI does not apply it, and inspect says to convert.
    let (ok, stdout, _) = loft(&["lora", "inspect", m.parent().unwrap().join("networks/loft-written/ia3.safetensors").to_str().unwrap()]);
    assert!(ok && stdout.contains("ComfyUI      not applied") && stdout.contains("loft lora convert"), "{stdout}");
    // Bad arguments: both or neither of --rank/--energy, an energy outside (0, 1], no base layer.
    let src = m.join("merge/tiny-sd15-lokr.safetensors");
    let out = dir.join("bad.safetensors");
    let (ok, _, err) = loft(&["lora", "convert", src.to_str().unwrap(), "--base", base.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!ok && err.contains("--rank"), "{err}");
    let (ok, _, err) = loft(&["lora", "convert", src.to_str().unwrap(), "--energy", "1.5", "--base", base.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!ok && err.contains("--energy must be in (0, 1]"), "{err}");
    let (ok, _, err) = loft(&["lora", "convert", src.to_str().unwrap(), "--rank", "4", "--base", m.join("tiny-sdxl").to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!ok && err.contains("module"), "{err}");
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
