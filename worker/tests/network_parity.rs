//! Parity of Loft's network adapters with the Python references (lycoris-lora 4.1.3, kohya's
//! `networks/lora.py` math, and the fork math for ABBA / GLoRA-Ex).
//!
//! The fixtures are made by hand with `tests/parity/make_network_fixtures.py` and committed
//! under `tests/fixtures/networks/` (see `tests/parity/README.md` for their contract). This
//! test never runs Python. For every `<case>.safetensors` it builds the adapter with
//! `adapter_from_tensors` from the fixture's options and `param.*` tensors and compares, in
//! f32, with relative error `max|a−b| / max(max|b|, 1e-6) ≤ 1e-5`:
//! ΔW, Δb, W′, b′, the rebuild-mode output, the bypass-mode output (where the fixture has
//! one), and the gradients of `sum(y · gout)` with respect to `x` and every trainable tensor
//! (candle backprop). A second test loads each kohya/LyCORIS-format file under
//! `files/` module by module and compares ΔW (and Δb) with `<name>.expected.safetensors`.
//!
//! Every case is reported by name with its errors; the test fails if any case fails.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use loft_worker::networks::{
    adapter_from_tensors_named, BaseLayer, LayerKind, NetworkAlgo, NetworkOptions,
};

const TOL: f64 = 1e-5;

/// The device the adapters run on (`device::test_device()`: CUDA when the binary has it and a
/// device answers, else the CPU, printed once).
fn device() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE.get_or_init(loft_worker::device::test_device).clone()
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/networks")
}

type Res<T> = std::result::Result<T, String>;

/// The first line of an error (candle appends a backtrace when RUST_BACKTRACE is set).
fn msg(e: impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or("").to_string()
}

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {}", msg(e))
}

/// A safetensors file: its tensors (on the test device) and its string metadata.
struct StFile {
    tensors: HashMap<String, Tensor>,
    meta: HashMap<String, String>,
}

fn load_st(path: &Path) -> Res<StFile> {
    let bytes = std::fs::read(path).map_err(err("read"))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(err("header"))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &device()).map_err(err("tensors"))?;
    Ok(StFile { tensors, meta })
}

/// `max|a−b| / max(max|b|, 1e-6)`, in f64.
fn rel_err(a: &Tensor, b: &Tensor) -> Res<f64> {
    if a.dims() != b.dims() {
        return Err(format!("shape {:?} ≠ expected {:?}", a.dims(), b.dims()));
    }
    let a = a.to_dtype(DType::F64).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f64>());
    let b = b.to_dtype(DType::F64).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f64>());
    let (a, b) = (a.map_err(err("to_vec"))?, b.map_err(err("to_vec"))?);
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max).max(1e-6);
    if diff.is_nan() || a.iter().any(|v| v.is_nan()) {
        return Ok(f64::INFINITY);
    }
    Ok(diff / scale)
}

/// One fixture's comparisons: (what, relative error or a reason it could not be compared).
#[derive(Default)]
struct Report {
    checks: Vec<(String, Res<f64>)>,
    notes: Vec<String>,
}

impl Report {
    fn cmp(&mut self, what: &str, got: candle_core::Result<Tensor>, want: &Tensor) {
        let r = got.map_err(|e| format!("error: {}", msg(e))).and_then(|g| rel_err(&g, want));
        self.checks.push((what.to_string(), r));
    }

    /// Like `cmp`, but a tensor holding the same values in another shape (a flattened conv
    /// kernel, a 1×1 conv up kept 4-D) is compared as flat data, with a note.
    fn cmp_flat(&mut self, what: &str, got: Tensor, want: &Tensor) {
        if got.dims() != want.dims() && got.elem_count() == want.elem_count() {
            self.notes.push(format!("{what}: shape {:?} vs reference {:?}, compared flat", got.dims(), want.dims()));
            match got.reshape(want.dims()) {
                Ok(g) => self.cmp(what, Ok(g), want),
                Err(e) => self.fail(what, format!("reshape: {}", msg(e))),
            }
        } else {
            self.cmp(what, Ok(got), want);
        }
    }

    fn fail(&mut self, what: &str, why: String) {
        self.checks.push((what.to_string(), Err(why)));
    }

    fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|(_, r)| matches!(r, Ok(e) if *e <= TOL))
    }

    fn line(&self, name: &str) -> String {
        let status = if self.passed() { "ok  " } else { "FAIL" };
        let worst = self
            .checks
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok().copied())
            .fold(0.0, f64::max);
        let mut s = format!("{status} {name:<40} {:>2} checks, worst {worst:.2e}", self.checks.len());
        for (what, r) in &self.checks {
            match r {
                Ok(e) if *e <= TOL => {}
                Ok(e) => s.push_str(&format!("\n       {what}: rel err {e:.3e} > {TOL:.0e}")),
                Err(why) => s.push_str(&format!("\n       {what}: {why}")),
            }
        }
        for n in &self.notes {
            s.push_str(&format!("\n       note: {n}"));
        }
        s
    }
}

fn meta_usize(meta: &HashMap<String, String>, key: &str) -> Res<usize> {
    meta.get(key).ok_or(format!("metadata `{key}` missing"))?.parse().map_err(err(key))
}

fn meta_f64(meta: &HashMap<String, String>, key: &str) -> Res<f64> {
    meta.get(key).ok_or(format!("metadata `{key}` missing"))?.parse().map_err(err(key))
}

/// The base layer a fixture describes.
fn base_layer(meta: &HashMap<String, String>, t: &HashMap<String, Tensor>, prefix: &str) -> Res<BaseLayer> {
    let w = t.get(&format!("{prefix}org.weight")).ok_or("org.weight missing")?.clone();
    let b = t.get(&format!("{prefix}org.bias")).cloned();
    let layer = meta.get("layer").map(String::as_str).unwrap_or("");
    match layer {
        "linear" => BaseLayer::linear(w, b).map_err(err("BaseLayer::linear")),
        "conv" => BaseLayer::conv2d(w, b, meta_usize(meta, "stride")?, meta_usize(meta, "padding")?)
            .map_err(err("BaseLayer::conv2d")),
        "groupnorm" => {
            let kind = LayerKind::GroupNorm {
                groups: meta_usize(meta, "groups")?,
                channels: w.dim(0).map_err(err("dim"))?,
                eps: meta_f64(meta, "eps")?,
            };
            Ok(BaseLayer { kind, weight: w, bias: b })
        }
        "layernorm" => {
            let kind = LayerKind::LayerNorm { features: w.dim(0).map_err(err("dim"))?, eps: meta_f64(meta, "eps")? };
            Ok(BaseLayer { kind, weight: w, bias: b })
        }
        other => Err(format!("unknown layer kind `{other}`")),
    }
}

/// Loft's algorithm for a fixture; `train_norm` fixtures sit on a norm layer, which every
/// algorithm adapts with its train_norm adapter.
fn algo_of(name: &str) -> Res<NetworkAlgo> {
    if name == "train_norm" {
        return Ok(NetworkAlgo::LycorisLocon);
    }
    serde_json::from_value(serde_json::Value::String(name.to_string())).map_err(err("algo"))
}

fn options_of(meta: &HashMap<String, String>, key: &str) -> Res<NetworkOptions> {
    let json = meta.get(key).ok_or(format!("metadata `{key}` missing"))?;
    serde_json::from_str(json).map_err(err("options"))
}

fn scalar_value(t: &Tensor) -> Res<f64> {
    t.to_dtype(DType::F64).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f64>()).map_err(err("scalar"))?
        .first()
        .copied()
        .ok_or_else(|| "empty scalar".to_string())
}

/// Folds a fixture's raw `use_scalar` scalar into the tensors LyCORIS folds it into on save
/// (`adapter_from_tensors` takes file tensors, where the scalar is already folded). Returns,
/// per folded tensor, the factor its gradient is divided by.
fn fold_scalar(algo: NetworkAlgo, params: &mut HashMap<String, Tensor>) -> Res<HashMap<String, f64>> {
    let Some(s) = params.remove("scalar") else { return Ok(HashMap::new()) };
    let s = scalar_value(&s)?;
    let targets: Vec<(&str, f64)> = match algo {
        NetworkAlgo::LycorisLocon => vec![("lora_up.weight", s)],
        NetworkAlgo::Loha => vec![("hada_w1_a", s)],
        NetworkAlgo::Lokr => {
            if params.contains_key("lokr_w1") {
                vec![("lokr_w1", s)]
            } else {
                vec![("lokr_w1_a", s)]
            }
        }
        NetworkAlgo::Glora => vec![("a2.weight", s), ("b2.weight", s)],
        NetworkAlgo::Abba => vec![("lora_up1.weight", s.sqrt()), ("lora_up2.weight", s.sqrt())],
        other => return Err(format!("no scalar fold rule for {other:?}")),
    };
    let mut factors = HashMap::new();
    for (name, f) in targets {
        let t = params.get(name).ok_or(format!("scalar fold: `{name}` missing"))?;
        let folded = t.affine(f, 0.0).map_err(err("fold"))?;
        params.insert(name.to_string(), folded);
        factors.insert(name.to_string(), f);
    }
    Ok(factors)
}

fn check_case(name: &str, f: &StFile) -> Res<Report> {
    let meta = &f.meta;
    let t = &f.tensors;
    let get = |k: &str| t.get(k).ok_or(format!("fixture tensor `{k}` missing"));
    let algo_name = meta.get("algo").ok_or("metadata `algo` missing")?.as_str();
    let algo = algo_of(algo_name)?;
    let mut opts = options_of(meta, "options")?;
    opts.multiplier = meta_f64(meta, "multiplier")?;
    opts.bypass_mode = false;
    let base = base_layer(meta, t, "")?;
    if algo.is_kohya() {
        if let LayerKind::Conv2d { kernel, .. } = base.kind {
            if kernel != (1, 1) {
                // kohya adapts k×k convolutions only with conv_dim / conv_alpha
                opts.conv_dim = Some(opts.dim);
                opts.conv_alpha = Some(opts.alpha);
            }
        }
    }

    let mut report = Report::default();
    let mut params: HashMap<String, Tensor> = t
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("param.").map(|n| (n.to_string(), v.clone())))
        .collect();
    let grad_factor = fold_scalar(algo, &mut params)?;
    if !grad_factor.is_empty() {
        opts.use_scalar = false;
        report.notes.push("use_scalar: scalar folded into the saved tensors; its own gradient is not compared".into());
    }
    if matches!(algo, NetworkAlgo::Glora | NetworkAlgo::GloraEx) && opts.rs_lora {
        // LyCORIS / the fork store GLoRA's raw alpha; Loft's files store alpha·√r (read as alpha/r).
        let a = opts.alpha * (opts.dim as f64).sqrt();
        params.insert("alpha".into(), Tensor::new(a as f32, &device()).map_err(err("alpha"))?);
        report.notes.push(format!("rs_lora GLoRA: alpha passed as alpha·√r = {a} (Loft's file convention)"));
    }

    if algo == NetworkAlgo::Dylora {
        // The fixture is LyCORIS's training forward at full rank: scale alpha/(blocks) =
        // alpha·block_size/r. Loft trains with alpha/(active rank) (documented in
        // networks/dylora.rs: "a LyCORIS DyLoRA trained with alpha = A behaves like a Loft
        // one with alpha = A·block_size"), so the Loft adapter gets alpha·block_size.
        let a = opts.alpha * opts.block_size as f64;
        params.insert("alpha".into(), Tensor::new(a as f32, &device()).map_err(err("alpha"))?);
        report.notes.push(format!(
            "DyLoRA: alpha passed as alpha·block_size = {a} (LyCORIS trains with alpha/blocks, Loft with alpha/rank)"
        ));
    }
    let adapter = adapter_from_tensors_named(algo, &opts, &base, &params, name)
        .map_err(|e| format!("adapter_from_tensors: {}", msg(e)))?;

    report.cmp("dw", adapter.delta_weight(), get("dw")?);
    if let Some(db) = t.get("db") {
        match adapter.delta_bias() {
            Ok(Some(got)) => report.cmp("db", Ok(got), db),
            Ok(None) => report.fail("db", "adapter reports no bias change".into()),
            Err(e) => report.fail("db", format!("error: {}", msg(e))),
        }
    }
    report.cmp("merged.weight", adapter.merged_weight(&base), get("merged.weight")?);
    let want_b = t.get("merged.bias").or(t.get("org.bias"));
    match (adapter.merged_bias(&base), want_b) {
        (Ok(Some(got)), Some(want)) => report.cmp("merged.bias", Ok(got), want),
        (Ok(None), None) => {}
        (Ok(got), want) => report.fail(
            "merged.bias",
            format!("adapter gives {:?}, fixture {:?}", got.map(|t| t.dims().to_vec()), want.map(|t| t.dims().to_vec())),
        ),
        (Err(e), _) => report.fail("merged.bias", format!("error: {}", msg(e))),
    }

    // Rebuild forward and its gradients.
    let x = get("x")?;
    let x_var = Var::from_tensor(x).map_err(err("x var"))?;
    match adapter.forward(&base, x_var.as_tensor(), false) {
        Err(e) => report.fail("y.rebuild", format!("error: {}", msg(e))),
        Ok(y) => {
            report.cmp("y.rebuild", Ok(y.clone()), get("y.rebuild")?);
            let grads = y
                .mul(get("gout")?)
                .and_then(|p| p.sum_all())
                .and_then(|l| l.backward())
                .map_err(|e| format!("backward: {}", msg(e)))?;
            match grads.get(x_var.as_tensor()) {
                Some(g) => report.cmp("grad.x", Ok(g.clone()), get("grad.x")?),
                None => report.fail("grad.x", "no gradient reached x".into()),
            }
            let trainable: BTreeMap<String, Var> = adapter.trainable().into_iter().collect();
            let expected: Vec<&String> = t.keys().filter(|k| k.starts_with("grad.param.")).collect();
            for key in expected {
                let pname = &key["grad.param.".len()..];
                if pname == "scalar" && !grad_factor.is_empty() {
                    continue;
                }
                let what = format!("grad.{pname}");
                let Some(var) = trainable.get(pname) else {
                    report.fail(&what, format!("adapter has no trainable `{pname}` (it has {:?})", trainable.keys()));
                    continue;
                };
                let mut want = t[key.as_str()].clone();
                if let Some(f) = grad_factor.get(pname) {
                    want = want.affine(1.0 / f, 0.0).map_err(err("grad fold"))?;
                }
                match grads.get(var.as_tensor()) {
                    Some(g) => report.cmp_flat(&what, g.clone(), &want),
                    None => report.fail(&what, "no gradient reached it".into()),
                }
            }
            for pname in trainable.keys() {
                if !t.contains_key(&format!("grad.param.{pname}")) {
                    report.notes.push(format!("trainable `{pname}` has no reference gradient in the fixture"));
                }
            }
        }
    }

    // Bypass mode.
    if let Some(want) = t.get("y.bypass") {
        let mut bopts = opts.clone();
        bopts.bypass_mode = true;
        match adapter_from_tensors_named(algo, &bopts, &base, &params, name) {
            Ok(a) => report.cmp("y.bypass", a.forward(&base, x, false), want),
            Err(e) => report.fail("y.bypass", format!("adapter_from_tensors (bypass): {}", msg(e))),
        }
    }
    Ok(report)
}

#[test]
fn network_parity_with_python_references() {
    let dir = fixture_dir();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no fixtures in {}", dir.display());

    let mut failed = Vec::new();
    for path in &paths {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let outcome = load_st(path).and_then(|f| check_case(&name, &f));
        match outcome {
            Ok(report) => {
                println!("{}", report.line(&name));
                if !report.passed() {
                    failed.push(name);
                }
            }
            Err(e) => {
                println!("FAIL {name:<40}\n       {e}");
                failed.push(name);
            }
        }
    }
    println!("{} fixtures: {} passed, {} failed", paths.len(), paths.len() - failed.len(), failed.len());
    assert!(failed.is_empty(), "{} of {} parity cases failed: {}", failed.len(), paths.len(), failed.join(", "));
}

/// A kohya/LyCORIS-format file loads module by module and each module's ΔW (and Δb) at
/// multiplier 1 matches the reference.
fn check_file(name: &str) -> Res<Report> {
    let dir = fixture_dir().join("files");
    let file = load_st(&dir.join(format!("{name}.safetensors")))?;
    let exp = load_st(&dir.join(format!("{name}.expected.safetensors")))?;
    let algo_name = file.meta.get("loft_fixture_algo").ok_or("metadata `loft_fixture_algo` missing")?;
    let algo = algo_of(algo_name)?;
    let mut opts = options_of(&file.meta, "loft_fixture_options")?;
    opts.multiplier = 1.0;
    let layers: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(exp.meta.get("layers").ok_or("metadata `layers` missing")?).map_err(err("layers"))?;
    let mut report = Report::default();
    for (module, spec) in &layers {
        let s = |k: &str| spec.get(k).and_then(|v| v.as_u64()).map(|v| v.to_string()).unwrap_or_default();
        let mut meta: HashMap<String, String> = HashMap::new();
        meta.insert("layer".into(), spec["layer"].as_str().unwrap_or("").to_string());
        meta.insert("stride".into(), s("s"));
        meta.insert("padding".into(), s("p"));
        meta.insert("groups".into(), s("groups"));
        meta.insert("eps".into(), "1e-5".into());
        let base = base_layer(&meta, &exp.tensors, &format!("{module}."))?;
        let mut mopts = opts.clone();
        if algo.is_kohya() {
            mopts.conv_dim = Some(mopts.dim);
            mopts.conv_alpha = Some(mopts.alpha);
        }
        let prefix = format!("{module}.");
        let tensors: HashMap<String, Tensor> = file
            .tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|n| (n.to_string(), v.clone())))
            .collect();
        let adapter = match adapter_from_tensors_named(algo, &mopts, &base, &tensors, module) {
            Ok(a) => a,
            Err(e) => {
                report.fail(&format!("{module}"), format!("adapter_from_tensors: {}", msg(e)));
                continue;
            }
        };
        let short = module.trim_start_matches("lora_unet_down_blocks_0_");
        report.cmp(&format!("{short}.dw"), adapter.delta_weight(), &exp.tensors[&format!("{module}.dw")]);
        if let Some(db) = exp.tensors.get(&format!("{module}.db")) {
            match adapter.delta_bias() {
                Ok(Some(got)) => report.cmp(&format!("{short}.db"), Ok(got), db),
                Ok(None) => report.fail(&format!("{short}.db"), "adapter reports no bias change".into()),
                Err(e) => report.fail(&format!("{short}.db"), format!("error: {}", msg(e))),
            }
        }
        // The file's tensors come back unchanged (names and values) from state_tensors().
        match adapter.state_tensors() {
            Ok(state) => {
                let state: HashMap<String, Tensor> = state.into_iter().collect();
                for (k, want) in &tensors {
                    match state.get(k) {
                        Some(got) => report.cmp_flat(&format!("{short}.state.{k}"), got.clone(), want),
                        None => report.fail(&format!("{short}.state.{k}"), "missing from state_tensors()".into()),
                    }
                }
            }
            Err(e) => report.fail(&format!("{short}.state"), format!("error: {}", msg(e))),
        }
    }
    Ok(report)
}

#[test]
fn network_files_load_with_reference_deltas() {
    let dir = fixture_dir().join("files");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
        .filter(|n| n.ends_with(".safetensors") && !n.ends_with(".expected.safetensors"))
        .map(|n| n.trim_end_matches(".safetensors").to_string())
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no files in {}", dir.display());
    let mut failed = Vec::new();
    for name in &names {
        match check_file(name) {
            Ok(report) => {
                println!("{}", report.line(&format!("files/{name}")));
                if !report.passed() {
                    failed.push(name.clone());
                }
            }
            Err(e) => {
                println!("FAIL files/{name:<34}\n       {e}");
                failed.push(name.clone());
            }
        }
    }
    println!("{} files: {} passed, {} failed", names.len(), names.len() - failed.len(), failed.len());
    assert!(failed.is_empty(), "{} of {} files failed: {}", failed.len(), names.len(), failed.join(", "));
}
