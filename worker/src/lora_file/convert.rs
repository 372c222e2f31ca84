//! `loft lora convert`: any network file (all 13 algorithms, DoRA, Tucker, IA3, OFT/BOFT,
//! GLoRA, ABBA, full) rewritten as a plain kohya LoRA / LoCon file that every client reads.
//!
//! Per module: the effective ΔW at multiplier 1 ([`LoadedModule::delta`], against the base
//! layer the module adapts — OFT, IA3, DoRA and GLoRA depend on it, and the base gives conv
//! layers their kernel shape), in f64, flattened to `[out, in·kh·kw]`, then its truncated SVD:
//!
//! - **exact** (one-sided Jacobi, [`crate::linalg::svd`]) when the rank asked for is within
//!   [`OVERSAMPLE`] of the matrix's full rank;
//! - **randomised** otherwise (Halko, Martinsson & Tropp 2011, algorithm 4.4: a Gaussian test
//!   matrix with [`OVERSAMPLE`] extra columns, [`POWER_ITERATIONS`] re-orthonormalised power
//!   iterations, then the exact SVD of the small projected matrix). The kept factors are then
//!   the exact SVD of the projection `Q·Qᵀ·ΔW`, so the energy reported is exactly that of the
//!   written ΔW_r (up to the saved dtype's rounding).
//!
//! With `--energy E` each module gets the smallest rank whose retained energy
//! ‖ΔW_r‖²/‖ΔW‖² reaches E (the search widens the randomised range until it holds, and goes
//! exact at full rank). The written module is `lora_down` = c·√S·Vᵀ (conv: `[r, in, kh, kw]`),
//! `lora_up` = c·U·√S (`[out, r]`, conv `[out, r, 1, 1]`): both factors carry half the spectrum
//! each (balanced, which fp16 storage prefers). Every module gets the same `alpha`, the file's
//! largest rank R, and c = √(r/R) makes up·down·alpha/r = ΔW_r: diffusers (0.37) reads a
//! kohya file whose alphas differ between modules with the wrong scale for all but the most
//! common alpha (its `alpha_pattern` keys name no module), so a per-module alpha = r would
//! break every file whose ranks `--energy` chose.
//!
//! Not representable in a plain LoRA, so left out and reported by name: bias deltas (`full`,
//! GLoRA with bias, LoRA-family `diff_b`) and norm modules (`train_norm`).

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::{py_float, FileAlgo, LoadedModule, LoraFile};
use crate::linalg::{qr, svd, Mat};
use crate::networks::BaseLayer;

/// Extra random columns of the randomised range finder.
pub const OVERSAMPLE: usize = 10;
/// Power iterations of the randomised range finder (sharpen a slowly decaying spectrum).
pub const POWER_ITERATIONS: usize = 2;

/// How each module's rank is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RankChoice {
    /// This rank (capped by the module's full rank); `conv` for k×k convolutions, when given.
    Rank { linear: usize, conv: Option<usize> },
    /// The smallest rank whose retained energy reaches this fraction (0 < E ≤ 1).
    Energy(f64),
}

/// What happened to one module.
#[derive(Clone, Debug, Serialize)]
pub struct ModuleConversion {
    pub name: String,
    /// The source algorithm (`loha`, `diag-oft`, …).
    pub algo: String,
    /// ΔW's shape (the base layer's weight shape).
    pub shape: Vec<usize>,
    /// min(out, in·kh·kw).
    pub full_rank: usize,
    /// The rank written.
    pub rank: usize,
    /// `exact` or `randomized`.
    pub svd: &'static str,
    /// ‖ΔW_r‖² / ‖ΔW‖² (1 when ΔW is zero).
    pub energy: f64,
    /// ‖ΔW − ΔW_r‖ / ‖ΔW‖ (0 when ΔW is zero), measured on the factors before saving.
    pub rel_error: f64,
    /// ‖ΔW‖_F, for weighting the overall figures.
    pub norm: f64,
    /// What the plain LoRA cannot hold and was left out (a bias delta), with its size.
    pub dropped: Vec<String>,
}

/// A module of the source file that has no LoRA form at all.
#[derive(Clone, Debug, Serialize)]
pub struct SkippedModule {
    pub name: String,
    pub algo: String,
    pub reason: String,
}

/// The converted network and its report.
pub struct Conversion {
    pub tensors: Vec<(String, Tensor)>,
    /// sshs hashes are recomputed on save.
    pub metadata: BTreeMap<String, String>,
    pub modules: Vec<ModuleConversion>,
    pub skipped: Vec<SkippedModule>,
}

impl Conversion {
    /// Σ‖ΔW_r‖² / Σ‖ΔW‖² over all converted modules.
    pub fn overall_energy(&self) -> f64 {
        let total: f64 = self.modules.iter().map(|m| m.norm * m.norm).sum();
        if total == 0.0 {
            return 1.0;
        }
        self.modules.iter().map(|m| m.energy * m.norm * m.norm).sum::<f64>() / total
    }

    /// √(Σ‖ΔW − ΔW_r‖² / Σ‖ΔW‖²) over all converted modules.
    pub fn overall_rel_error(&self) -> f64 {
        let total: f64 = self.modules.iter().map(|m| m.norm * m.norm).sum();
        if total == 0.0 {
            return 0.0;
        }
        let err: f64 = self.modules.iter().map(|m| (m.rel_error * m.norm).powi(2)).sum();
        (err / total).sqrt()
    }
}

/// The base layer a module adapts (`None`: the base model has no such layer).
pub type BaseOf<'a> = dyn Fn(&LoadedModule) -> Result<Option<BaseLayer>> + 'a;

/// Converts every module of `file` to a plain LoRA. `base_of` gives each module's base layer.
pub fn convert(file: &LoraFile, choice: RankChoice, save_dtype: DType, base_of: &BaseOf) -> Result<Conversion> {
    match choice {
        RankChoice::Rank { linear, conv } => {
            if linear == 0 || conv == Some(0) {
                bail!("--rank and --conv-rank must be at least 1");
            }
        }
        RankChoice::Energy(e) => {
            if !(e > 0.0 && e <= 1.0) {
                bail!("--energy must be in (0, 1], got {e}");
            }
        }
    }
    let mut factors = Vec::new();
    let mut modules = Vec::new();
    let mut skipped = Vec::new();
    for m in &file.modules {
        if m.algo == FileAlgo::Norm {
            skipped.push(SkippedModule {
                name: m.name.clone(),
                algo: m.algo.name().into(),
                reason: "a norm layer's scale and shift have no LoRA form".into(),
            });
            continue;
        }
        let base = base_of(m)?.ok_or_else(|| {
            anyhow!("module {}: the base model has no layer of that name (a network made for another model?)", m.name)
        })?;
        let (written, report) = convert_module(m, &base, choice).with_context(|| format!("converting module {}", m.name))?;
        factors.push(written);
        modules.push(report);
    }
    if modules.is_empty() {
        bail!("{} has no module that a LoRA can represent", file.path.display());
    }
    let alpha = modules.iter().map(|m| m.rank).max().unwrap_or(1);
    let mut tensors = Vec::new();
    for f in factors {
        tensors.extend(f.tensors(alpha, save_dtype)?);
    }
    let metadata = converted_metadata(file, choice, &modules);
    Ok(Conversion { tensors, metadata, modules, skipped })
}

/// One module's kept factors, `up·down = ΔW_r`, before they are scaled to the file's alpha.
struct ModuleFactors {
    name: String,
    rank: usize,
    down: Mat,
    up: Mat,
    down_shape: Vec<usize>,
    up_shape: Vec<usize>,
}

impl ModuleFactors {
    /// The module's tensors with `alpha` (≥ its rank): both factors × √(rank/alpha), so that
    /// up·down·alpha/rank is still ΔW_r.
    fn tensors(self, alpha: usize, save_dtype: DType) -> Result<Vec<(String, Tensor)>> {
        let c = (self.rank as f64 / alpha as f64).sqrt();
        let to_tensor = |m: Mat, dims: Vec<usize>| -> Result<Tensor> {
            let data: Vec<f64> = m.data.iter().map(|x| x * c).collect();
            Ok(Tensor::from_vec(data, m.rows * m.cols, &Device::Cpu)?.reshape(dims)?.to_dtype(save_dtype)?)
        };
        Ok(vec![
            (format!("{}.lora_down.weight", self.name), to_tensor(self.down, self.down_shape)?),
            (format!("{}.lora_up.weight", self.name), to_tensor(self.up, self.up_shape)?),
            (format!("{}.alpha", self.name), Tensor::new(alpha as f32, &Device::Cpu)?.to_dtype(save_dtype)?),
        ])
    }
}

fn convert_module(m: &LoadedModule, base: &BaseLayer, choice: RankChoice) -> Result<(ModuleFactors, ModuleConversion)> {
    let delta = m.delta(Some(base))?;
    let shape = delta.dw.dims().to_vec();
    let is_conv = shape.len() == 4;
    let kernel_is_spatial = is_conv && shape[2] * shape[3] > 1;
    let rows = shape[0];
    let values = delta.dw.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let a = Mat::new(rows, values.len() / rows, values);
    let full_rank = a.rows.min(a.cols);
    let total: f64 = a.data.iter().map(|x| x * x).sum();
    let mut dropped = Vec::new();
    if let Some(db) = &delta.db {
        let n = db.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
        if n > 0.0 {
            dropped.push(format!("bias delta (‖Δb‖ = {n:.3e}): a plain LoRA has no bias"));
        }
    }

    let (svd_kind, u, s, vt) = if total == 0.0 {
        ("exact", Mat::zeros(a.rows, 1), vec![0.0], Mat::zeros(1, a.cols))
    } else {
        match choice {
            RankChoice::Rank { linear, conv } => {
                let r = if kernel_is_spatial { conv.unwrap_or(linear) } else { linear }.min(full_rank);
                let (kind, f) = truncated_svd(&a, r, &m.name);
                let (u, s, vt) = f.first(r);
                (kind, u, s, vt)
            }
            RankChoice::Energy(e) => by_energy(&a, total, e, &m.name),
        }
    };
    let rank = s.len();
    let kept: f64 = s.iter().map(|x| x * x).sum();
    let energy = if total == 0.0 { 1.0 } else { (kept / total).min(1.0) };

    // up = U·√S, down = √S·Vᵀ.
    let mut up = u;
    let mut down = vt;
    for (c, sv) in s.iter().enumerate() {
        let root = sv.max(0.0).sqrt();
        for r in 0..up.rows {
            up.data[r * rank + c] *= root;
        }
        for x in &mut down.data[c * down.cols..(c + 1) * down.cols] {
            *x *= root;
        }
    }
    let rel_error = if total == 0.0 {
        0.0
    } else {
        let approx = up.matmul(&down);
        let err: f64 = approx.data.iter().zip(&a.data).map(|(x, y)| (x - y) * (x - y)).sum();
        (err / total).sqrt()
    };
    let (down_shape, up_shape) = if is_conv {
        (vec![rank, shape[1], shape[2], shape[3]], vec![rows, rank, 1, 1])
    } else {
        (vec![rank, a.cols], vec![rows, rank])
    };
    let written = ModuleFactors { name: m.name.clone(), rank, down, up, down_shape, up_shape };
    let report = ModuleConversion {
        name: m.name.clone(),
        algo: m.algo.name().to_string() + if m.dora { "+dora" } else { "" } + if m.tucker { "+tucker" } else { "" },
        shape,
        full_rank,
        rank,
        svd: svd_kind,
        energy,
        rel_error,
        norm: total.sqrt(),
        dropped,
    };
    Ok((written, report))
}

/// A thin SVD, possibly with more values than asked for (the randomised one has `k + OVERSAMPLE`).
struct Factors {
    u: Mat,
    s: Vec<f64>,
    vt: Mat,
}

impl Factors {
    /// The leading `k` singular triplets.
    fn first(&self, k: usize) -> (Mat, Vec<f64>, Mat) {
        let k = k.min(self.s.len()).max(1);
        (self.u.first_cols(k), self.s[..k].to_vec(), self.vt.first_rows(k))
    }
}

/// The SVD truncated to (at least) `k` values: exact when `k + OVERSAMPLE` reaches the full
/// rank, randomised otherwise. Returns which it used.
fn truncated_svd(a: &Mat, k: usize, seed_label: &str) -> (&'static str, Factors) {
    let full = a.rows.min(a.cols);
    let width = k + OVERSAMPLE;
    if width >= full {
        let f = svd(a);
        return ("exact", Factors { u: f.u, s: f.s, vt: f.vt });
    }
    // Y = A·Ω is rows×width and Aᵀ·Q is cols×width; both have at least `width` rows (width <
    // full = min(rows, cols)), as QR needs.
    let mut rng = Gaussian::new(seed_label);
    let omega = Mat::new(a.cols, width, (0..a.cols * width).map(|_| rng.next()).collect());
    let at = a.t();
    let mut q = qr(&a.matmul(&omega)).0;
    for _ in 0..POWER_ITERATIONS {
        let z = qr(&at.matmul(&q)).0;
        q = qr(&a.matmul(&z)).0;
    }
    // B = Qᵀ·A (width × cols); its exact SVD gives A's on the range of Q.
    let b = q.t().matmul(a);
    let f = svd(&b);
    ("randomized", Factors { u: q.matmul(&f.u), s: f.s, vt: f.vt })
}

/// The smallest rank whose energy reaches `target`, widening the randomised range until the
/// values it found hold that much of ‖A‖² (or the SVD is exact).
fn by_energy(a: &Mat, total: f64, target: f64, seed_label: &str) -> (&'static str, Mat, Vec<f64>, Mat) {
    let full = a.rows.min(a.cols);
    let mut k = 16.min(full);
    loop {
        let (kind, f) = truncated_svd(a, k, seed_label);
        let mut acc = 0.0;
        let mut found = None;
        for (i, sv) in f.s.iter().enumerate() {
            acc += sv * sv;
            // A hair of tolerance so that E = 1 is reached at full rank despite round-off.
            if acc >= target * total * (1.0 - 1e-12) {
                found = Some(i + 1);
                break;
            }
        }
        match found {
            Some(r) => {
                let (u, s, vt) = f.first(r);
                return (kind, u, s, vt);
            }
            None if kind == "exact" => {
                let (u, s, vt) = f.first(full);
                return (kind, u, s, vt);
            }
            None => k = (k * 2).min(full),
        }
    }
}

/// The source's metadata, with the network described as the plain LoRA it now is and the
/// conversion recorded (`loft_converted_from`).
fn converted_metadata(file: &LoraFile, choice: RankChoice, modules: &[ModuleConversion]) -> BTreeMap<String, String> {
    let mut meta = file.metadata.clone();
    meta.remove("sshs_model_hash");
    meta.remove("sshs_legacy_hash");
    let is_spatial = |m: &&ModuleConversion| m.shape.len() == 4 && m.shape[2] * m.shape[3] > 1;
    let max_linear = modules.iter().filter(|m| !is_spatial(m)).map(|m| m.rank).max();
    let max_conv = modules.iter().filter(is_spatial).map(|m| m.rank).max();
    let dynamic = matches!(choice, RankChoice::Energy(_));
    // A Flux file stays a Flux LoRA for sd-scripts (its loader is networks.lora_flux).
    let module = if file.base_model_version() == Some("flux1") { "networks.lora_flux" } else { "networks.lora" };
    meta.insert("ss_network_module".into(), module.into());
    let dim = max_linear.or(max_conv).unwrap_or(1);
    meta.insert("ss_network_dim".into(), if dynamic { "Dynamic".into() } else { dim.to_string() });
    // Every module's alpha is the file's largest rank (see the module docs).
    let alpha = modules.iter().map(|m| m.rank).max().unwrap_or(1);
    meta.insert("ss_network_alpha".into(), py_float(alpha as f64));
    match max_conv {
        Some(c) => {
            meta.insert(
                "ss_network_args".into(),
                serde_json::json!({"conv_dim": c.to_string(), "conv_alpha": py_float(alpha as f64)}).to_string(),
            );
        }
        None => {
            meta.remove("ss_network_args");
        }
    }
    let total: f64 = modules.iter().map(|m| m.norm * m.norm).sum();
    let energy = if total == 0.0 { 1.0 } else { modules.iter().map(|m| m.energy * m.norm * m.norm).sum::<f64>() / total };
    let source_algos: std::collections::BTreeSet<&str> = modules.iter().map(|m| m.algo.as_str()).collect();
    let method = match choice {
        RankChoice::Rank { linear, conv } => match conv {
            Some(c) => format!("rank {linear}, conv rank {c}"),
            None => format!("rank {linear}"),
        },
        RankChoice::Energy(e) => format!("energy {}", py_float(e)),
    };
    let record = serde_json::json!({
        "file": file.path.file_name().map(|f| f.to_string_lossy().into_owned()),
        "algorithms": source_algos,
        "network_module": file.metadata.get("ss_network_module"),
        "network_args": file.metadata.get("ss_network_args"),
        "method": method,
        "svd": format!("exact below rank+{OVERSAMPLE} of full, else randomized ({POWER_ITERATIONS} power iterations)"),
        "retained_energy": energy,
        "modules": modules.len(),
    });
    meta.insert("loft_converted_from".into(), record.to_string());
    let comment = meta.get("ss_training_comment").cloned().unwrap_or_default();
    meta.insert(
        "ss_training_comment".into(),
        format!("converted to LoRA by loft lora convert ({method}, energy {energy:.6}); {comment}"),
    );
    meta
}

/// Seeded standard normal numbers (splitmix64 + Box–Muller), so a conversion is reproducible.
struct Gaussian {
    state: u64,
    spare: Option<f64>,
}

impl Gaussian {
    fn new(label: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in label.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        Self { state: h, spare: None }
    }

    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn next(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        self.spare = Some(r * t.sin());
        r * t.cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A matrix with a known spectrum: U·diag(s)·Vᵀ from QR of seeded Gaussians.
    fn with_spectrum(rows: usize, cols: usize, s: &[f64]) -> Mat {
        let mut g = Gaussian::new("spectrum");
        let k = s.len();
        let u = qr(&Mat::new(rows, k, (0..rows * k).map(|_| g.next()).collect())).0;
        let v = qr(&Mat::new(cols, k, (0..cols * k).map(|_| g.next()).collect())).0;
        let mut us = u;
        for r in 0..rows {
            for c in 0..k {
                us.data[r * k + c] *= s[c];
            }
        }
        us.matmul(&v.t())
    }

    #[test]
    fn randomized_svd_finds_the_leading_values() {
        let s: Vec<f64> = (0..60).map(|i| 0.8f64.powi(i)).collect();
        let a = with_spectrum(120, 200, &s);
        let (kind, f) = truncated_svd(&a, 8, "t");
        assert_eq!(kind, "randomized");
        for i in 0..8 {
            assert!((f.s[i] - s[i]).abs() < 1e-9 * s[0], "σ{i}: {} vs {}", f.s[i], s[i]);
        }
        // The range holds the whole (rank-60) spectrum: every value comes out.
        let (_, f) = truncated_svd(&a, 55, "t");
        assert!((f.s[54] - s[54]).abs() < 1e-9);
        let (kind, f) = truncated_svd(&a, 112, "t");
        assert_eq!(kind, "exact");
        assert!((f.s[59] - s[59]).abs() < 1e-9 && f.s[60].abs() < 1e-9);
    }

    #[test]
    fn energy_picks_the_smallest_rank_that_reaches_it() {
        let s: Vec<f64> = (0..40).map(|i| 0.7f64.powi(i)).collect();
        let a = with_spectrum(90, 70, &s);
        let total: f64 = s.iter().map(|x| x * x).sum();
        for target in [0.5, 0.9, 0.999, 0.999999] {
            let (_, _, got, _) = by_energy(&a, total, target, "e");
            let mut acc = 0.0;
            let want = s.iter().position(|x| {
                acc += x * x;
                acc >= target * total * (1.0 - 1e-12)
            });
            assert_eq!(Some(got.len()), want.map(|i| i + 1), "target {target}");
        }
    }
}
