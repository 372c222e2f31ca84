//! SVD rank reduction of LoRA / LoCon files, as sd-scripts' `networks/resize_lora.py` does:
//! per module, ΔW₀ = up @ down (conv kernels flattened into the input width) is decomposed,
//! the new rank is `max_rank` or picked by a dynamic method (sv_ratio, sv_fro, sv_cumulative;
//! `max_rank` caps it), and the module is rewritten as up = U·S, down = Vᵀ with
//! alpha = (old alpha / old rank) · new rank — so the scaled ΔW is the truncated SVD of the
//! old scaled ΔW. Modules that are not plain LoRA (other algorithms, Tucker, DoRA) are copied
//! unchanged, as sd-scripts does, and reported as such.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::{py_float, FileAlgo, LoraFile};
use crate::linalg::{svd_of_product, Mat};

/// sd-scripts' `MIN_SV`: a module whose largest singular value is below it gets rank 1.
pub const MIN_SV: f64 = 1e-6;

/// How to pick each module's rank (`--dynamic_method` / `--dynamic_param`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "method", content = "param", rename_all = "snake_case")]
pub enum DynamicMethod {
    /// Keep singular values above σ_max / param.
    SvRatio(f64),
    /// Keep the smallest rank whose Frobenius-norm fraction reaches param.
    SvFro(f64),
    /// Keep the smallest rank whose fraction of Σσ reaches param.
    SvCumulative(f64),
}

impl DynamicMethod {
    /// Parses `sv_ratio=2`, `sv_fro=0.9`, `sv_cumulative=0.9`.
    pub fn parse(s: &str) -> Result<Self> {
        let Some((m, v)) = s.split_once('=') else {
            bail!("dynamic method `{s}` needs the form METHOD=VALUE (sv_ratio=2, sv_fro=0.9, sv_cumulative=0.9)");
        };
        let v: f64 = v
            .trim()
            .parse()
            .with_context(|| format!("dynamic parameter `{v}` is not a number"))?;
        if !(v.is_finite() && v > 0.0) {
            bail!("dynamic parameter must be a positive number, got {v}");
        }
        Ok(match m.trim() {
            "sv_ratio" => DynamicMethod::SvRatio(v),
            "sv_fro" => DynamicMethod::SvFro(v),
            "sv_cumulative" => DynamicMethod::SvCumulative(v),
            other => {
                bail!("unknown dynamic method `{other}`; use sv_ratio, sv_fro or sv_cumulative")
            }
        })
    }

    pub fn describe(&self) -> String {
        match self {
            DynamicMethod::SvRatio(v) => format!("sv_ratio: {}", py_float(*v)),
            DynamicMethod::SvFro(v) => format!("sv_fro: {}", py_float(*v)),
            DynamicMethod::SvCumulative(v) => format!("sv_cumulative: {}", py_float(*v)),
        }
    }
}

/// torch.searchsorted (left): the first index whose value is ≥ target.
fn searchsorted(sorted: &[f64], target: f64) -> usize {
    sorted
        .iter()
        .position(|&x| x >= target)
        .unwrap_or(sorted.len())
}

/// The 0-based index sd-scripts' `index_sv_*` functions return.
fn dynamic_index(s: &[f64], method: DynamicMethod) -> usize {
    let n = s.len();
    let idx = match method {
        DynamicMethod::SvRatio(t) => {
            let min_sv = s[0] / t;
            s.iter().filter(|&&x| x > min_sv).count() as i64 - 1
        }
        DynamicMethod::SvCumulative(t) => {
            let total: f64 = s.iter().sum();
            let mut acc = 0.0;
            let cum: Vec<f64> = s
                .iter()
                .map(|x| {
                    acc += x;
                    acc / total
                })
                .collect();
            searchsorted(&cum, t) as i64
        }
        DynamicMethod::SvFro(t) => {
            let total: f64 = s.iter().map(|x| x * x).sum();
            let mut acc = 0.0;
            let cum: Vec<f64> = s
                .iter()
                .map(|x| {
                    acc += x * x;
                    acc / total
                })
                .collect();
            searchsorted(&cum, t * t) as i64
        }
    };
    idx.clamp(0, n as i64 - 1) as usize
}

/// What happened to one module.
#[derive(Clone, Debug, Serialize)]
pub struct ModuleResize {
    pub name: String,
    /// False when the module was copied unchanged (`note` says why).
    pub resized: bool,
    pub note: Option<String>,
    pub old_rank: Option<usize>,
    pub new_rank: Option<usize>,
    pub new_alpha: Option<f64>,
    /// Σσ kept / Σσ.
    pub sum_retained: Option<f64>,
    /// ‖ΔW_new‖_F / ‖ΔW‖_F = √(Σ_kept σ²/Σσ²): the retained Frobenius energy (as a norm ratio,
    /// like sd-scripts' "fro retained").
    pub fro_retained: Option<f64>,
    /// σ_max / σ_last kept.
    pub max_ratio: Option<f64>,
}

/// The resized network: tensors, metadata (sshs hashes are recomputed on save) and a report.
pub struct Resized {
    pub tensors: Vec<(String, Tensor)>,
    pub metadata: BTreeMap<String, String>,
    pub modules: Vec<ModuleResize>,
    pub old_max_rank: Option<usize>,
}

impl Resized {
    /// Mean of the per-module Frobenius retention over resized modules.
    pub fn mean_fro_retained(&self) -> Option<f64> {
        let v: Vec<f64> = self
            .modules
            .iter()
            .filter_map(|m| m.fro_retained)
            .filter(|x| !x.is_nan())
            .collect();
        if v.is_empty() {
            None
        } else {
            Some(v.iter().sum::<f64>() / v.len() as f64)
        }
    }
}

fn to_mat(t: &Tensor, rows: usize) -> Result<Mat> {
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let cols = v.len() / rows.max(1);
    Ok(Mat::new(rows, cols, v))
}

fn from_mat(m: &Mat, shape: &[usize], dtype: DType) -> Result<Tensor> {
    Ok(
        Tensor::from_vec(m.data.clone(), m.rows * m.cols, &Device::Cpu)?
            .reshape(shape)?
            .to_dtype(dtype)?,
    )
}

/// Resizes every LoRA / LoCon module of `file` to at most `max_rank`.
pub fn resize(
    file: &LoraFile,
    max_rank: usize,
    dynamic: Option<DynamicMethod>,
    save_dtype: DType,
) -> Result<Resized> {
    if max_rank == 0 {
        bail!("the new rank must be at least 1");
    }
    let mut tensors = Vec::new();
    let mut report = Vec::new();
    let mut old_max_rank: Option<usize> = None;
    let mut last_alpha: Option<f64> = None;
    for m in &file.modules {
        let plain = matches!(
            m.algo,
            FileAlgo::Lora | FileAlgo::Locon | FileAlgo::LycorisLocon | FileAlgo::Dylora
        ) && !m.tucker
            && !m.dora;
        if !plain {
            let why = if m.tucker {
                "Tucker LoCon (lora_mid) is not resized".to_string()
            } else if m.dora {
                "DoRA modules are not resized (dora_scale depends on ΔW)".to_string()
            } else {
                format!("{} is not a LoRA; copied unchanged", m.algo.name())
            };
            for (k, t) in &m.tensors {
                tensors.push((format!("{}.{k}", m.name), t.clone()));
            }
            report.push(ModuleResize {
                name: m.name.clone(),
                resized: false,
                note: Some(why),
                old_rank: m.rank,
                new_rank: None,
                new_alpha: None,
                sum_retained: None,
                fro_retained: None,
                max_ratio: None,
            });
            continue;
        }
        let down = &m.tensors["lora_down.weight"];
        let up = &m.tensors["lora_up.weight"];
        let old_rank = down.dims()[0];
        old_max_rank = Some(old_max_rank.unwrap_or(0).max(old_rank));
        let out = up.dims()[0];
        let scale = m.alpha.map(|a| a / old_rank as f64).unwrap_or(1.0);
        let d = to_mat(down, old_rank).with_context(|| format!("module {}", m.name))?;
        let u = to_mat(up, out)?;
        let svd = svd_of_product(&u, &d);
        // torch.linalg.svd returns min(out, in) values; pad the ones a rank-r product cannot have.
        let full_len = out.min(d.cols);
        let mut s = svd.s.clone();
        s.resize(full_len, 0.0);
        let mut new_rank = match dynamic {
            Some(method) => dynamic_index(&s, method) + 1,
            None => max_rank,
        };
        if s[0] <= MIN_SV {
            new_rank = 1;
        } else if new_rank > max_rank {
            new_rank = max_rank;
        }
        let new_alpha = scale * new_rank as f64;
        let kept = new_rank.min(s.len());
        let s_sum: f64 = s.iter().map(|x| x.abs()).sum();
        let s_rank: f64 = s[..kept].iter().map(|x| x.abs()).sum();
        let fro: f64 = s.iter().map(|x| x * x).sum::<f64>().sqrt();
        let red_fro: f64 = s[..kept].iter().map(|x| x * x).sum::<f64>().sqrt();
        let max_ratio = s[0] / s[new_rank.min(s.len()) - 1];
        // up = U_k·S_k, down = Vt_k (zero-padded past the product's rank).
        let avail = svd.s.len();
        let mut new_up = Mat::zeros(out, new_rank);
        let mut new_down = Mat::zeros(new_rank, d.cols);
        for c in 0..new_rank.min(avail) {
            for r in 0..out {
                new_up.set(r, c, svd.u.at(r, c) * svd.s[c]);
            }
            for j in 0..d.cols {
                new_down.set(c, j, svd.vt.at(c, j));
            }
        }
        let mut down_shape = down.dims().to_vec();
        down_shape[0] = new_rank;
        let up_shape: Vec<usize> = if down.rank() == 4 {
            vec![out, new_rank, 1, 1]
        } else {
            vec![out, new_rank]
        };
        tensors.push((
            format!("{}.lora_down.weight", m.name),
            from_mat(&new_down, &down_shape, save_dtype)?,
        ));
        tensors.push((
            format!("{}.lora_up.weight", m.name),
            from_mat(&new_up, &up_shape, save_dtype)?,
        ));
        tensors.push((
            format!("{}.alpha", m.name),
            Tensor::new(new_alpha as f32, &Device::Cpu)?.to_dtype(save_dtype)?,
        ));
        last_alpha = Some(new_alpha);
        report.push(ModuleResize {
            name: m.name.clone(),
            resized: true,
            note: None,
            old_rank: Some(old_rank),
            new_rank: Some(new_rank),
            new_alpha: Some(new_alpha),
            sum_retained: Some(if s_sum > 0.0 {
                s_rank / s_sum
            } else {
                f64::NAN
            }),
            fro_retained: Some(if fro > 0.0 { red_fro / fro } else { f64::NAN }),
            max_ratio: Some(max_ratio),
        });
    }
    if !report.iter().any(|r| r.resized) {
        bail!(
            "{} has no LoRA/LoCon modules to resize",
            file.path.display()
        );
    }
    let mut metadata = file.metadata.clone();
    metadata.remove("sshs_model_hash");
    metadata.remove("sshs_legacy_hash");
    let comment = metadata
        .get("ss_training_comment")
        .cloned()
        .unwrap_or_default();
    let old = old_max_rank
        .map(|r| r.to_string())
        .unwrap_or_else(|| "None".into());
    match dynamic {
        None => {
            metadata.insert(
                "ss_training_comment".into(),
                format!("dimension is resized from {old} to {max_rank}; {comment}"),
            );
            metadata.insert("ss_network_dim".into(), max_rank.to_string());
            if let Some(a) = last_alpha {
                metadata.insert("ss_network_alpha".into(), py_float(a));
            }
        }
        Some(method) => {
            metadata.insert(
                "ss_training_comment".into(),
                format!(
                    "Dynamic resize with {} from {old}; {comment}",
                    method.describe()
                ),
            );
            metadata.insert("ss_network_dim".into(), "Dynamic".into());
            metadata.insert("ss_network_alpha".into(), "Dynamic".into());
        }
    }
    Ok(Resized {
        tensors,
        metadata,
        modules: report,
        old_max_rank,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_indices_follow_sd_scripts() {
        let s = [10.0, 5.0, 2.0, 1.0, 0.5];
        // sv_ratio 4: keep σ > 2.5 → 2 values → index 1.
        assert_eq!(dynamic_index(&s, DynamicMethod::SvRatio(4.0)), 1);
        // cumulative: 10/18.5 = .54, 15/18.5 = .81, 17/18.5 = .92 → target .9 → index 2.
        assert_eq!(dynamic_index(&s, DynamicMethod::SvCumulative(0.9)), 2);
        // fro: squares 100, 25, 4, 1, .25 (130.25): cum .768, .960, .990 → target .95² = .9025 → 1.
        assert_eq!(dynamic_index(&s, DynamicMethod::SvFro(0.95)), 1);
        assert_eq!(dynamic_index(&s, DynamicMethod::SvFro(2.0)), 4);
        assert!(DynamicMethod::parse("sv_fro=0.9").is_ok());
        assert!(DynamicMethod::parse("sv_magic=1").is_err());
        assert!(DynamicMethod::parse("sv_fro").is_err());
    }
}
