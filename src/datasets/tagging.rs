//! Auto-tagging as a queued job: the request a user makes for a dataset, stored as the job's
//! configuration beside training jobs in the same queue (`job_kind = "tag"`), and run by the
//! same workers with the engine's tagger (`loft_worker::tagger`).

use std::path::PathBuf;

use loft_worker::tagger::TagOptions;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::store::{DatasetError, Datasets, Result};
use crate::registry::Config;

/// The configuration key that marks a job's kind (absent: training).
pub const JOB_KIND: &str = "job_kind";

/// `POST /api/datasets/{name}/tag`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagRequest {
    /// A tagger folder (`model.onnx` + `selected_tags.csv`) inside an allowed root.
    pub model_dir: PathBuf,
    #[serde(default = "general_default")]
    pub general_threshold: f64,
    #[serde(default = "character_default")]
    pub character_threshold: f64,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub trigger: String,
    /// `write` (replace the captions, the default) or `merge` (keep their tags, add new ones).
    #[serde(default = "write_mode")]
    pub mode: String,
}

fn general_default() -> f64 {
    TagOptions::default().general_threshold
}
fn character_default() -> f64 {
    TagOptions::default().character_threshold
}
fn write_mode() -> String {
    "write".into()
}

/// A tagging job as the queue stores it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TagJob {
    pub dataset: String,
    pub dataset_dir: PathBuf,
    pub model_dir: PathBuf,
    pub options: TagOptions,
}

impl TagJob {
    /// Checks a request against the datasets and the allowed roots; every problem is named.
    pub fn from_request(ds: &Datasets, dataset: &str, req: &TagRequest) -> Result<TagJob> {
        let dataset_dir = ds.dataset_dir(dataset)?;
        let model_dir = ds.inside_allowed_root(&req.model_dir)?;
        if !model_dir.join("model.onnx").is_file() || !model_dir.join("selected_tags.csv").is_file() {
            return Err(DatasetError::Invalid(format!("model_dir {}: a tagger folder holds model.onnx and selected_tags.csv (as SmilingWolf's WD14 taggers ship them)", req.model_dir.display())));
        }
        let merge = match req.mode.as_str() {
            "write" => false,
            "merge" => true,
            other => return Err(DatasetError::Invalid(format!("mode {other:?}: write or merge"))),
        };
        let options = TagOptions {
            general_threshold: req.general_threshold,
            character_threshold: req.character_threshold,
            exclude: req.exclude.iter().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect(),
            trigger: req.trigger.trim().to_string(),
            merge,
        };
        options.check().map_err(|e| DatasetError::Invalid(e.to_string()))?;
        Ok(TagJob { dataset: dataset.to_string(), dataset_dir, model_dir, options })
    }

    /// The job's stored configuration.
    pub fn to_config(&self) -> Config {
        let mut c = Config::new();
        c.insert(JOB_KIND.into(), Value::String("tag".into()));
        c.insert("tag".into(), serde_json::to_value(self).expect("serializable"));
        c
    }

    /// The tagging job a stored configuration holds, if it is one.
    pub fn from_config(config: &Config) -> Option<std::result::Result<TagJob, String>> {
        (config.get(JOB_KIND).and_then(Value::as_str) == Some("tag"))
            .then(|| serde_json::from_value(config.get("tag").cloned().unwrap_or(Value::Null)).map_err(|e| format!("the tagging job's settings are damaged: {e}")))
    }
}

/// Tagger folders under the allowed roots (for the picker): folders holding `model.onnx` and
/// `selected_tags.csv`, at most three levels down.
pub fn tagger_candidates(ds: &Datasets) -> Vec<String> {
    fn walk(dir: &std::path::Path, depth: usize, out: &mut Vec<String>) {
        if dir.join("model.onnx").is_file() && dir.join("selected_tags.csv").is_file() {
            out.push(dir.display().to_string());
            return;
        }
        if depth == 0 || out.len() >= 100 {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        let mut dirs: Vec<_> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
        dirs.sort();
        for d in dirs {
            let name = d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if !name.starts_with('.') && name != "datasets" && name != "jobs" && name != "cache" {
                walk(&d, depth - 1, out);
            }
        }
    }
    let mut out = vec![];
    for r in &ds.allowed_roots {
        walk(r, 3, &mut out);
    }
    out
}
