//! Files *Loft writes*, one per algorithm, for the check that LyCORIS 4.1.3 loads them and
//! yields Loft's ΔW (`tests/parity/check_loft_files.py`, run by hand; see
//! `tests/parity/README.md`, "Loft-written files").
//!
//! For every case this test builds adapters with `build_adapter` on a few small base layers
//! named like real kohya modules, overwrites every trainable tensor with seeded random values
//! (so zero-initialised factors are non-zero too and ΔW ≠ 0), and saves the network through
//! Loft's real writer (`lora_file::save_network`). Next to it, `<case>.expected.safetensors`
//! holds per module the base layer (`<module>.org.weight`, `.org.bias`), ΔW = W′ − W at
//! multiplier 1 (`.dw`, from `Adapter::delta_weight`) and Δb where the adapter changes the
//! bias (`.db`).
//!
//! - Without `LOFT_REGENERATE`: every case is rebuilt in memory and compared with the committed
//!   files under `tests/fixtures/networks/loft-written/` (tensor names, shapes, values within
//!   1e-6, the file's string metadata except `sshs_model_hash`), so the committed fixtures
//!   cannot drift silently from Loft's writer. Loft's own loader must also read each written
//!   file back to the same ΔW.
//! - `LOFT_REGENERATE=1 cargo test -p loft-worker --test loft_written_files` rewrites them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use loft_worker::lora_file::{save_network, save_tensors, LoraFile, NetworkMetadata};
use loft_worker::networks::{build_adapter, Adapter, BaseLayer, NetworkAlgo, NetworkOptions};

/// Committed files must equal the regenerated ones within this (absolute, scaled by
/// max(1, max|expected|)).
const DRIFT_TOL: f64 = 1e-6;

fn out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/networks/loft-written")
}

// ---------------------------------------------------------------------------------------------
// Deterministic random numbers (independent of candle's RNG, which is not seedable on the CPU)
// ---------------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn new(label: &str) -> Self {
        // FNV-1a of the label
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in label.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Rng(h)
    }

    fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    fn tensor(&mut self, shape: &[usize], f: impl Fn(&mut Self) -> f64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| f(self) as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// Base layers and cases
// ---------------------------------------------------------------------------------------------

/// `(kohya module name, layer)`. The Python check rebuilds the same modules in torch under
/// the diffusers / transformers paths these names come from.
fn base_layers() -> Vec<(String, BaseLayer)> {
    let mut out = Vec::new();
    let specs: [(&str, &[usize], usize); 4] = [
        // (name, weight shape, padding)
        ("lora_unet_down_blocks_0_attentions_0_proj_in", &[16, 16], 0),
        ("lora_unet_down_blocks_0_resnets_0_conv1", &[12, 8, 3, 3], 1),
        ("lora_unet_down_blocks_0_resnets_0_conv_shortcut", &[12, 8, 1, 1], 0),
        ("lora_te_text_model_encoder_layers_0_mlp_fc1", &[32, 16], 0),
    ];
    for (name, shape, pad) in specs {
        let mut rng = Rng::new(&format!("base/{name}"));
        let fan_in: usize = shape[1..].iter().product();
        let std = 1.0 / (fan_in as f64).sqrt();
        let w = rng.tensor(shape, |r| r.normal() * std);
        let b = rng.tensor(&[shape[0]], |r| r.normal() * 0.1);
        let layer = if shape.len() == 2 {
            BaseLayer::linear(w, Some(b)).unwrap()
        } else {
            BaseLayer::conv2d(w, Some(b), 1, pad).unwrap()
        };
        out.push((name.to_string(), layer));
    }
    out
}

struct Case {
    name: &'static str,
    algo: NetworkAlgo,
    opts: NetworkOptions,
}

fn cases() -> Vec<Case> {
    let o = |f: &dyn Fn(&mut NetworkOptions)| {
        let mut o = NetworkOptions { dim: 4, alpha: 2.0, seed: 7, ..Default::default() };
        f(&mut o);
        o
    };
    use NetworkAlgo::*;
    vec![
        Case { name: "lora", algo: Lora, opts: o(&|_| {}) },
        Case { name: "locon", algo: Locon, opts: o(&|o| { o.conv_dim = Some(4); o.conv_alpha = Some(1.0) }) },
        Case { name: "lycoris_locon", algo: LycorisLocon, opts: o(&|_| {}) },
        Case { name: "lycoris_locon_tucker", algo: LycorisLocon, opts: o(&|o| o.use_tucker = true) },
        Case { name: "lycoris_locon_dora", algo: LycorisLocon, opts: o(&|o| o.dora_wd = true) },
        Case { name: "loha", algo: Loha, opts: o(&|_| {}) },
        Case { name: "loha_tucker", algo: Loha, opts: o(&|o| o.use_tucker = true) },
        Case { name: "ia3", algo: Ia3, opts: o(&|_| {}) },
        Case { name: "lokr", algo: Lokr, opts: o(&|o| { o.dim = 2; o.alpha = 1.0; o.factor = 2 }) },
        Case { name: "dylora", algo: Dylora, opts: o(&|o| o.block_size = 2) },
        Case { name: "diag_oft", algo: DiagOft, opts: o(&|o| { o.constraint = 0.02; o.rescaled = true }) },
        Case { name: "boft", algo: Boft, opts: o(&|o| { o.dim = 6; o.rescaled = true }) },
        Case { name: "glora", algo: Glora, opts: o(&|_| {}) },
        Case { name: "glora_ex", algo: GloraEx, opts: o(&|_| {}) },
        Case { name: "abba", algo: Abba, opts: o(&|_| {}) },
        Case { name: "full", algo: Full, opts: o(&|_| {}) },
    ]
}

/// Overwrites every trainable tensor with seeded values (ΔW ≠ 0 even for zero-init factors).
fn randomize(adapter: &dyn Adapter, label: &str) {
    for (pname, var) in adapter.trainable() {
        let mut rng = Rng::new(&format!("{label}/{pname}"));
        let dims = var.dims().to_vec();
        let cur = var.as_tensor().to_dtype(DType::F32).unwrap();
        let t = if pname.contains("scalar") {
            rng.tensor(&dims, |r| 0.5 + r.uniform())
        } else if pname.contains("dora_scale") {
            (cur * rng.tensor(&dims, |r| 1.0 + 0.1 * r.normal())).unwrap()
        } else if pname.contains("rescale") {
            rng.tensor(&dims, |r| 1.0 + 0.1 * r.normal())
        } else if pname.contains("oft_blocks") {
            rng.tensor(&dims, |r| 0.1 * r.normal())
        } else {
            rng.tensor(&dims, |r| 0.3 * r.normal())
        };
        var.set(&t.to_dtype(var.dtype()).unwrap()).unwrap();
    }
}

struct Built {
    /// The adapters' modules (kohya name, adapter), in layer order.
    modules: Vec<(String, Box<dyn Adapter>)>,
    /// `<module>.org.weight`, `.org.bias`, `.dw`, `.db`.
    expected: Vec<(String, Tensor)>,
    expected_meta: BTreeMap<String, String>,
    metadata: NetworkMetadata,
    skipped: Vec<String>,
}

fn build_case(case: &Case) -> Built {
    let mut modules = Vec::new();
    let mut expected = Vec::new();
    let mut skipped = Vec::new();
    let mut layers_meta = serde_json::Map::new();
    for (name, base) in base_layers() {
        let adapter = match build_adapter(case.algo, &case.opts, &base, &name) {
            Ok(a) => a,
            Err(e) => {
                // kohya LoRA without conv_dim adapts no 3×3 conv: that is the algorithm, not a bug.
                assert!(
                    case.algo == NetworkAlgo::Lora,
                    "{}: build_adapter on {name}: {e}",
                    case.name
                );
                skipped.push(name.clone());
                continue;
            }
        };
        randomize(adapter.as_ref(), &format!("{}/{name}", case.name));
        assert_eq!(adapter.multiplier(), 1.0);
        let dw = adapter.delta_weight().unwrap();
        let dwmax = dw.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(dwmax > 1e-4, "{}: ΔW of {name} is ~0 ({dwmax})", case.name);
        expected.push((format!("{name}.org.weight"), base.weight.clone()));
        if let Some(b) = &base.bias {
            expected.push((format!("{name}.org.bias"), b.clone()));
        }
        expected.push((format!("{name}.dw"), dw));
        if let Some(db) = adapter.delta_bias().unwrap() {
            expected.push((format!("{name}.db"), db));
        }
        let dims = base.weight.dims().to_vec();
        let mut lm = serde_json::Map::new();
        lm.insert("shape".into(), serde_json::json!(dims));
        let pad = match base.kind {
            loft_worker::networks::LayerKind::Conv2d { padding, .. } => padding,
            _ => 0,
        };
        lm.insert("padding".into(), serde_json::json!(pad));
        lm.insert("bias".into(), serde_json::json!(base.bias.is_some()));
        layers_meta.insert(name.clone(), serde_json::Value::Object(lm));
        modules.push((name, adapter));
    }
    let mut expected_meta = BTreeMap::new();
    expected_meta.insert("loft_algo".into(), case.algo.name().to_string());
    expected_meta.insert("loft_options".into(), serde_json::to_string(&case.opts).unwrap());
    expected_meta.insert("layers".into(), serde_json::Value::Object(layers_meta).to_string());
    expected_meta.insert("multiplier".into(), "1.0".into());
    expected_meta.insert(
        "dw".into(),
        "W′ − W at multiplier 1 from Loft's Adapter::delta_weight (db: Adapter::delta_bias)".into(),
    );
    expected_meta.insert("source".into(), format!("{}.safetensors", case.name));
    Built {
        modules,
        expected,
        expected_meta,
        metadata: NetworkMetadata::for_network(case.algo, &case.opts),
        skipped,
    }
}

fn write_case(built: &Built, dir: &Path, name: &str) {
    let mods: Vec<(String, &dyn Adapter)> =
        built.modules.iter().map(|(n, a)| (n.clone(), a.as_ref())).collect();
    save_network(&dir.join(format!("{name}.safetensors")), &mods, &built.metadata, None).unwrap();
    save_tensors(
        &dir.join(format!("{name}.expected.safetensors")),
        &built.expected,
        &built.expected_meta,
    )
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------------------------

struct StFile {
    tensors: HashMap<String, Tensor>,
    meta: HashMap<String, String>,
}

fn load_st(path: &Path) -> Result<StFile, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| e.to_string())?;
    let meta = header.metadata().clone().unwrap_or_default();
    let tensors =
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| e.to_string())?;
    Ok(StFile { tensors, meta })
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// Problems where `got` (fresh) and `want` (committed) differ.
fn compare_files(got: &StFile, want: &StFile, what: &str) -> Vec<String> {
    let mut bad = Vec::new();
    let gk: BTreeSet<&String> = got.tensors.keys().collect();
    let wk: BTreeSet<&String> = want.tensors.keys().collect();
    if gk != wk {
        bad.push(format!(
            "{what}: tensor names differ: only in Loft's output {:?}, only in the committed file {:?}",
            gk.difference(&wk).collect::<Vec<_>>(),
            wk.difference(&gk).collect::<Vec<_>>()
        ));
    }
    for k in gk.intersection(&wk) {
        let (a, b) = (&got.tensors[*k], &want.tensors[*k]);
        if a.dims() != b.dims() || a.dtype() != b.dtype() {
            bad.push(format!(
                "{what}: {k}: {:?} {:?} ≠ committed {:?} {:?}",
                a.dims(),
                a.dtype(),
                b.dims(),
                b.dtype()
            ));
            continue;
        }
        let (va, vb) = (f64s(a), f64s(b));
        let scale = vb.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        let diff = va.iter().zip(&vb).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        if diff > DRIFT_TOL * scale {
            bad.push(format!("{what}: {k}: max |Δ| {diff:.3e} > {DRIFT_TOL:e}·{scale:.3}"));
        }
    }
    let strip = |m: &HashMap<String, String>| -> BTreeMap<String, String> {
        m.iter().filter(|(k, _)| *k != "sshs_model_hash").map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    if strip(&got.meta) != strip(&want.meta) {
        bad.push(format!("{what}: metadata differs: {:?} ≠ committed {:?}", strip(&got.meta), strip(&want.meta)));
    }
    bad
}

/// Loft's own loader reads the written file back to the ΔW the adapter reported.
fn reload_check(path: &Path, built: &Built) -> Vec<String> {
    let mut bad = Vec::new();
    let f = match LoraFile::load(path) {
        Ok(f) => f,
        Err(e) => return vec![format!("Loft cannot reload {}: {e:#}", path.display())],
    };
    let bases: HashMap<String, BaseLayer> = base_layers().into_iter().collect();
    let exp: HashMap<&str, &Tensor> = built.expected.iter().map(|(k, t)| (k.as_str(), t)).collect();
    for (name, _) in &built.modules {
        let Some(m) = f.module(name) else {
            bad.push(format!("reload: module {name} missing"));
            continue;
        };
        match m.delta(Some(&bases[name])) {
            Ok(d) => {
                let want = exp[format!("{name}.dw").as_str()];
                let (va, vb) = (f64s(&d.dw), f64s(want));
                let scale = vb.iter().fold(1e-6f64, |m, x| m.max(x.abs()));
                let diff = va.iter().zip(&vb).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
                if d.dw.dims() != want.dims() || diff / scale > 1e-5 {
                    bad.push(format!(
                        "reload {name} ({}): ΔW {:?} rel err {:.3e} vs {:?}",
                        m.algo.name(),
                        d.dw.dims(),
                        diff / scale,
                        want.dims()
                    ));
                }
            }
            Err(e) => bad.push(format!("reload {name}: {e:#}")),
        }
    }
    bad
}

#[test]
fn loft_written_files_match_committed_fixtures() {
    let regenerate = std::env::var("LOFT_REGENERATE").map(|v| v == "1").unwrap_or(false);
    let dir = out_dir();
    let tmp = tempfile::tempdir().unwrap();
    if regenerate {
        std::fs::create_dir_all(&dir).unwrap();
    }
    let mut failures = Vec::new();
    let mut total_bytes = 0u64;
    for case in cases() {
        let built = build_case(&case);
        let write_dir = if regenerate { dir.as_path() } else { tmp.path() };
        write_case(&built, write_dir, case.name);
        let mut bad = reload_check(&write_dir.join(format!("{}.safetensors", case.name)), &built);
        let mut status = if regenerate { "written" } else { "matches committed" };
        if !regenerate {
            for suffix in ["safetensors", "expected.safetensors"] {
                let committed = dir.join(format!("{}.{suffix}", case.name));
                if !committed.exists() {
                    bad.push(format!("{} missing (run with LOFT_REGENERATE=1)", committed.display()));
                    continue;
                }
                let got = load_st(&tmp.path().join(format!("{}.{suffix}", case.name))).unwrap();
                let want = load_st(&committed).unwrap();
                bad.extend(compare_files(&got, &want, &format!("{}.{suffix}", case.name)));
            }
        }
        for suffix in ["safetensors", "expected.safetensors"] {
            total_bytes += std::fs::metadata(write_dir.join(format!("{}.{suffix}", case.name)))
                .map(|m| m.len())
                .unwrap_or(0);
        }
        if !bad.is_empty() {
            status = "FAILED";
        }
        let skipped = if built.skipped.is_empty() {
            String::new()
        } else {
            format!(" (not adapted: {})", built.skipped.join(", "))
        };
        println!("{:<22} {} modules, {status}{skipped}", case.name, built.modules.len());
        for b in &bad {
            println!("    {b}");
        }
        failures.extend(bad);
    }
    println!("total {:.0} KiB", total_bytes as f64 / 1024.0);
    assert!(total_bytes < 500 * 1024, "loft-written fixtures are {total_bytes} bytes (limit 500 KB)");
    assert!(failures.is_empty(), "{} problem(s); see above", failures.len());
}
