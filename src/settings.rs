//! Server-side settings (the `settings` table): upload limits and extra allowed roots, read at
//! start-up; and what the Settings page shows besides — folders, tokens (masked), disk use.

use std::path::{Path, PathBuf};

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::db::Db;
use crate::registry::FieldError;

/// What a user sets on the Settings page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// The largest image one upload may carry, MiB.
    pub max_file_mib: u64,
    /// The largest upload request (all its files, or one zip), MiB.
    pub max_request_mib: u64,
    /// Folders besides the data directory that requests may point into (models, taggers,
    /// folders to import), on top of `--allow-root`.
    pub allowed_roots: Vec<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        let l = crate::datasets::store::UploadLimits::default();
        Self { max_file_mib: l.max_file_bytes >> 20, max_request_mib: l.max_request_bytes >> 20, allowed_roots: vec![] }
    }
}

const KEY: &str = "studio_settings";

impl Settings {
    /// The stored settings, or the defaults.
    pub fn load(db: &Db) -> Settings {
        let stored: Option<String> = db.conn().query_row("SELECT value FROM settings WHERE key = ?1", params![KEY], |r| r.get(0)).optional().ok().flatten();
        stored.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default()
    }

    /// Checks and stores; every problem names its field, and nothing is stored then.
    pub fn save(&self, db: &Db) -> Result<(), Vec<FieldError>> {
        let mut errors = vec![];
        let err = |field: &str, message: String| FieldError { field: field.into(), message };
        if !(1..=4096).contains(&self.max_file_mib) {
            errors.push(err("max_file_mib", format!("{} MiB: from 1 to 4096", self.max_file_mib)));
        }
        if self.max_request_mib < self.max_file_mib || self.max_request_mib > 1 << 20 {
            errors.push(err("max_request_mib", format!("{} MiB: at least the per-file limit ({} MiB), at most 1048576", self.max_request_mib, self.max_file_mib)));
        }
        for r in &self.allowed_roots {
            if !r.is_absolute() || !r.is_dir() {
                errors.push(err("allowed_roots", format!("{} is not an existing folder given by its absolute path", r.display())));
            } else if r.canonicalize().is_ok_and(|c| c.parent().is_none()) {
                errors.push(err("allowed_roots", "/ would open the whole disk to requests: name the folders that hold models, taggers or pictures".into()));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let text = serde_json::to_string(self).expect("serializable");
        db.conn()
            .execute("INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value", params![KEY, text])
            .map_err(|e| vec![err("settings", format!("cannot be stored: {e}"))])?;
        Ok(())
    }

    /// Applies the limits and roots to the datasets service (at start-up). A saved root that is
    /// gone is skipped with a warning.
    pub fn apply(&self, datasets: &mut crate::datasets::Datasets) {
        datasets.limits.max_file_bytes = self.max_file_mib << 20;
        datasets.limits.max_request_bytes = self.max_request_mib << 20;
        for r in &self.allowed_roots {
            if let Err(e) = datasets.allow_roots(std::slice::from_ref(r)) {
                tracing::warn!("settings: allowed root skipped: {e}");
            }
        }
    }
}

/// The bytes under `path` (files only; symlinks not followed).
pub fn disk_use(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    if meta.is_file() {
        return meta.len();
    }
    if !meta.is_dir() {
        return 0;
    }
    std::fs::read_dir(path).map(|entries| entries.flatten().map(|e| disk_use(&e.path())).sum()).unwrap_or(0)
}

/// Human-readable bytes: "3.2 GB".
pub fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KB", b as f64 / 1024.0),
        b => format!("{b} bytes"),
    }
}
