//! A job's network files as the clients see them, and `loft lora convert` on them from the
//! dashboard: which client applies each file exactly (read from the file, cached by size and
//! modification time), and a conversion to a plain kohya LoRA that is previewed (ranks, retained
//! energy, error, size) before anything is written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use loft_worker::lora_file::compat::{self, Verdict};
use loft_worker::lora_file::convert::{convert, Conversion, RankChoice};
use loft_worker::lora_file::merge::BaseModel;
use loft_worker::lora_file::{parse_save_precision, save_tensors, LoraFile};
use serde::Serialize;
use serde_json::Value;

use super::queue::{self, Artifact, JobError};
use super::Jobs;

/// The kind of the artifact rows that conversions add.
pub const CONVERTED_KIND: &str = "converted";

/// Every client's verdict on one file.
#[derive(Clone, Debug, Serialize)]
pub struct FileClients {
    pub verdicts: Vec<Verdict>,
    /// Some client falls short and converting to a plain LoRA would fix it.
    pub needs_conversion: bool,
}

type Stamp = (u64, Option<SystemTime>);

fn stamp(path: &Path) -> Option<Stamp> {
    let m = path.metadata().ok().filter(|m| m.is_file())?;
    Some((m.len(), m.modified().ok()))
}

/// The clients' verdicts on a network file (`None` if it cannot be read as one). Reading a file
/// means parsing all its tensors, so the answer is kept until the file changes.
pub fn file_clients(path: &Path) -> Option<FileClients> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, (Stamp, Option<FileClients>)>>> = OnceLock::new();
    let stamp = stamp(path)?;
    let cache = CACHE.get_or_init(Default::default);
    if let Some((s, v)) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(path) {
        if *s == stamp {
            return v.clone();
        }
    }
    let verdict = LoraFile::load(path)
        .ok()
        .map(|f| FileClients { verdicts: compat::of_file(&f), needs_conversion: compat::file_needs_conversion(&f) });
    cache.lock().unwrap_or_else(|p| p.into_inner()).insert(path.to_path_buf(), (stamp, verdict.clone()));
    verdict
}

/// What the user asked for: a fixed rank (and conv rank) or a retained energy.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvertRequest {
    #[serde(default)]
    pub rank: Option<usize>,
    #[serde(default)]
    pub conv_rank: Option<usize>,
    #[serde(default)]
    pub energy: Option<f64>,
    /// false (the default): preview only, nothing written.
    #[serde(default)]
    pub apply: bool,
}

impl ConvertRequest {
    pub fn choice(&self) -> Result<RankChoice, JobError> {
        let bad = |m: &str| JobError::Invalid(vec![crate::registry::FieldError { field: "rank".into(), message: m.into() }]);
        match (self.rank, self.energy) {
            (Some(0), _) => Err(bad("must be at least 1")),
            (_, _) if self.conv_rank == Some(0) => {
                Err(JobError::Invalid(vec![crate::registry::FieldError { field: "conv_rank".into(), message: "must be at least 1".into() }]))
            }
            (Some(linear), None) => Ok(RankChoice::Rank { linear, conv: self.conv_rank }),
            (None, Some(e)) if e > 0.0 && e <= 1.0 && self.conv_rank.is_none() => Ok(RankChoice::Energy(e)),
            (None, Some(_)) if self.conv_rank.is_some() => Err(bad("conv_rank goes with rank, not with energy")),
            (None, Some(e)) => Err(JobError::Invalid(vec![crate::registry::FieldError {
                field: "energy".into(),
                message: format!("must be in (0, 1], got {e}"),
            }])),
            (Some(_), Some(_)) => Err(bad("give either rank or energy, not both")),
            (None, None) => Err(bad("give a rank or an energy (e.g. 0.999)")),
        }
    }

    fn describe(&self) -> String {
        match (self.rank, self.energy) {
            (Some(r), _) => match self.conv_rank {
                Some(c) => format!("rank {r}, conv rank {c}"),
                None => format!("rank {r}"),
            },
            (None, Some(e)) => format!("energy {e}"),
            _ => String::new(),
        }
    }
}

/// A conversion's outcome, previewed or written.
#[derive(Clone, Debug, Serialize)]
pub struct ConvertReport {
    pub source: String,
    /// Where it was written (`None` for a preview).
    pub written: Option<String>,
    /// The artifact row of the written file.
    pub artifact: Option<i64>,
    /// The file name it gets (or got).
    pub name: String,
    pub retained_energy: f64,
    pub rel_error: f64,
    pub modules: usize,
    pub min_rank: usize,
    pub max_rank: usize,
    /// Bytes of tensor data the file holds.
    pub bytes: u64,
    /// Modules a plain LoRA cannot carry (bias deltas, norms), with the reason.
    pub skipped: Vec<String>,
    /// How the SVDs were taken (`exact`, `randomized` or both).
    pub svd: String,
}

fn report(source: &Path, name: String, c: &Conversion) -> ConvertReport {
    let ranks = c.modules.iter().map(|m| m.rank);
    let mut svd: Vec<&str> = c.modules.iter().map(|m| m.svd).collect();
    svd.sort();
    svd.dedup();
    ConvertReport {
        source: source.display().to_string(),
        written: None,
        artifact: None,
        name,
        retained_energy: c.overall_energy(),
        rel_error: c.overall_rel_error(),
        modules: c.modules.len(),
        min_rank: ranks.clone().min().unwrap_or(0),
        max_rank: ranks.max().unwrap_or(0),
        bytes: c.tensors.iter().map(|(_, t)| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum(),
        skipped: c.skipped.iter().map(|s| format!("{}: {}", s.name, s.reason)).collect(),
        svd: svd.join(" and "),
    }
}

/// The last conversion previewed, so that writing it does not compute it again.
struct Previewed {
    key: String,
    conversion: Arc<Conversion>,
}

fn previewed() -> &'static Mutex<Option<Previewed>> {
    static LAST: OnceLock<Mutex<Option<Previewed>>> = OnceLock::new();
    LAST.get_or_init(Default::default)
}

/// A free name beside `source`: `NAME-lora.safetensors`, then `NAME-lora-2…`.
fn target_path(source: &Path) -> PathBuf {
    let dir = source.parent().unwrap_or(Path::new("."));
    let stem = source.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "network".into());
    let mut path = dir.join(format!("{stem}-lora.safetensors"));
    let mut n = 2;
    while path.exists() {
        path = dir.join(format!("{stem}-lora-{n}.safetensors"));
        n += 1;
    }
    path
}

fn config_str<'a>(config: &'a crate::registry::Config, key: &str) -> &'a str {
    config.get(key).and_then(Value::as_str).unwrap_or_default()
}

impl Jobs {
    /// Converts one of a job's network files to a plain kohya LoRA against the job's base model:
    /// a preview (`apply: false`: the ranks, retained energy, error and size, nothing written), or
    /// the file written beside the source (through a temporary file) and added to the job's files.
    pub fn convert_file(&self, job: i64, artifact: i64, request: &ConvertRequest) -> Result<ConvertReport, JobError> {
        let choice = request.choice()?;
        let a: Artifact = self.artifact(job, artifact)?;
        if a.kind == "state" || a.kind.starts_with("sample") {
            return Err(JobError::Missing(format!("file {artifact} of job {job} is not a network file")));
        }
        let source = PathBuf::from(a.kept.as_deref().filter(|_| !Path::new(&a.path).is_file()).unwrap_or(&a.path));
        let Some(stamp) = stamp(&source) else {
            return Err(JobError::Missing(format!("{} is no longer on disk", a.path)));
        };
        let config = self.config(job)?;
        let base = PathBuf::from(config_str(&config, "pretrained_model_name_or_path"));
        let precision = match config_str(&config, "save_precision") {
            "" => "float",
            p => p,
        };
        let key = format!("{}|{:?}|{}|{}|{}", source.display(), stamp, base.display(), precision, request.describe());
        let cached = previewed().lock().unwrap_or_else(|p| p.into_inner()).as_ref().filter(|p| p.key == key).map(|p| p.conversion.clone());
        let conversion = match cached {
            Some(c) => c,
            None => {
                let io = |e: anyhow::Error| JobError::Io(format!("{e:#}"));
                let file = LoraFile::load(&source).map_err(|e| JobError::Io(format!("{}: {e:#}", source.display())))?;
                let model = BaseModel::open(&base, None).map_err(|e| JobError::Io(format!("the job's base model {}: {e:#}", base.display())))?;
                let dtype = parse_save_precision(precision).map_err(io)?;
                let c = Arc::new(convert(&file, choice, dtype, &|m| model.layer_for(m)).map_err(io)?);
                *previewed().lock().unwrap_or_else(|p| p.into_inner()) = Some(Previewed { key, conversion: c.clone() });
                c
            }
        };
        let target = target_path(&source);
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut out = report(&source, name, &conversion);
        if !request.apply {
            return Ok(out);
        }
        let partial = target.with_extension("safetensors.partial");
        save_tensors(&partial, &conversion.tensors, &conversion.metadata).map_err(|e| JobError::Io(format!("cannot write {}: {e:#}", partial.display())))?;
        std::fs::rename(&partial, &target).map_err(|e| JobError::Io(format!("cannot move {} into place: {e}", partial.display())))?;
        let label = format!("plain LoRA from {} ({}, {:.2}% energy)", source.file_name().unwrap_or_default().to_string_lossy(), request.describe(), 100.0 * out.retained_energy);
        let row = match queue::add_artifact(&mut self.db.conn(), job, CONVERTED_KIND, &target.to_string_lossy(), a.step, a.epoch, &label) {
            Ok(row) => row,
            Err(e) => {
                // Not a file the job knows of: do not leave it behind.
                let _ = std::fs::remove_file(&target);
                return Err(e);
            }
        };
        self.notify_events();
        out.written = Some(target.display().to_string());
        out.artifact = Some(row.id);
        Ok(out)
    }
}
