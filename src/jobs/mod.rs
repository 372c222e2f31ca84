//! Jobs: the persistent queue (SQLite, WAL), the workers that run it and what the dashboard reads.
//!
//! - [`queue`]: the SQL: enqueue, claim under a lease, record events, finish, cancel, retry,
//!   delete, reorder. Everything else goes through it.
//! - [`Jobs`]: the service the web routes, the CLI and the workers call: validation and snapshot
//!   at enqueue, files of a job, wake-ups.
//! - [`worker`]: the loop that claims a job, runs it on the engine and turns its events into rows,
//!   against this machine's database ([`worker::LocalQueue`]) or a hub over HTTP ([`hub`]).
//!
//! Wake-ups: every change made through [`Jobs`] bumps an in-process signal (the in-process worker
//! and the SSE streams wait on it, so an enqueue is never left for a poll tick); changes made by
//! another process on the same file are noticed by a watcher that polls SQLite's cheap
//! `PRAGMA data_version` a few times a second.

pub mod charts;
pub mod cli;
pub mod config;
pub mod convert;
pub mod demo;
pub mod hub;
pub mod queue;
pub mod runner;
pub mod worker;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use loft_worker::train::preflight::Preflight;
use loft_worker::train::CancelToken;
use serde_json::Value;
use tokio::sync::watch;

use crate::db::Db;
use crate::presets::{check_name, validated, PresetError, Presets};
use crate::registry::{Config, FieldError, Kind, Registry};
pub use queue::{Artifact, Claim, Control, EventRow, JobError, JobState, JobSummary, Move, PostedEvent, RunEnd};

/// How long a lease lasts without renewal; the worker renews every third of it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);
pub const DEFAULT_MAX_ATTEMPTS: i64 = 3;

/// What a job is queued from.
pub enum JobSource<'a> {
    /// A configuration (sparse or resolved), validated and resolved here.
    Config(&'a Config),
    /// A saved preset, read now: the job keeps this snapshot even if the preset changes.
    Preset(&'a str),
}

#[derive(Clone)]
pub struct Jobs {
    pub db: Db,
    pub registry: Arc<Registry>,
    pub data_dir: PathBuf,
    /// The token trainer-only workers must present (hub mode). `None` = hub endpoints refuse all.
    pub worker_token: Option<Arc<String>>,
    /// How long a worker's lease lasts without renewal.
    pub lease: Duration,
    queue_signal: Arc<watch::Sender<u64>>,
    events_signal: Arc<watch::Sender<u64>>,
    /// Cancel tokens of the jobs this process is running, so a cancel takes effect immediately.
    running: Arc<Mutex<HashMap<i64, CancelToken>>>,
    /// Set when the process shuts down: endless SSE streams end, so shutdown does not hang.
    shutdown: Arc<watch::Sender<bool>>,
}

impl Jobs {
    pub fn new(db: Db, registry: Arc<Registry>, data_dir: &Path) -> Jobs {
        Jobs {
            db,
            registry,
            data_dir: data_dir.to_path_buf(),
            worker_token: None,
            lease: DEFAULT_LEASE,
            queue_signal: Arc::new(watch::channel(0).0),
            events_signal: Arc::new(watch::channel(0).0),
            running: Arc::default(),
            shutdown: Arc::new(watch::channel(false).0),
        }
    }

    /// Tells the streams (and in-process workers) that the process is stopping.
    pub fn shut_down(&self) {
        self.shutdown.send_replace(true);
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// The database file (for processes that open their own connection).
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("loft.db")
    }

    /// The job's own folder: outputs when the config leaves `output_dir` empty, caches, uploads
    /// from remote workers.
    pub fn job_dir(&self, id: i64) -> PathBuf {
        self.data_dir.join("jobs").join(id.to_string())
    }

    /// Wakes the workers waiting for a job (and the streams).
    pub fn notify_queue(&self) {
        self.queue_signal.send_modify(|v| *v += 1);
        self.notify_events();
    }

    /// Wakes the SSE streams.
    pub fn notify_events(&self) {
        self.events_signal.send_modify(|v| *v += 1);
    }

    pub fn queue_changes(&self) -> watch::Receiver<u64> {
        self.queue_signal.subscribe()
    }

    pub fn event_changes(&self) -> watch::Receiver<u64> {
        self.events_signal.subscribe()
    }

    /// Starts a thread that notices commits by other processes (a detached worker, a second
    /// server) and wakes this process's workers and streams. Polling `PRAGMA data_version` on a
    /// connection of its own costs a few microseconds.
    pub fn watch_other_processes(&self) -> anyhow::Result<()> {
        let conn = rusqlite::Connection::open(self.db_path())?;
        let jobs = self.clone();
        std::thread::Builder::new().name("loft-db-watch".into()).spawn(move || {
            let version = |c: &rusqlite::Connection| c.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0)).unwrap_or(0);
            let mut seen = version(&conn);
            loop {
                std::thread::sleep(Duration::from_millis(150));
                let now = version(&conn);
                if now != seen {
                    seen = now;
                    jobs.notify_queue();
                }
            }
        })?;
        Ok(())
    }

    /// Validates and snapshots a job, and queues it. Bad input names the field; nothing is
    /// written then.
    pub fn enqueue(&self, name: Option<&str>, source: JobSource, priority: i64) -> Result<i64, JobError> {
        let resolved = match source {
            JobSource::Config(config) => validated(&self.registry, config).map_err(preset_error)?,
            JobSource::Preset(preset) => {
                let presets = Presets { db: &self.db, registry: &self.registry };
                let p = presets.get(preset).map_err(|e| match e {
                    PresetError::NotFound(_) => JobError::Invalid(vec![FieldError { field: "preset".into(), message: e.to_string() }]),
                    e => preset_error(e),
                })?;
                validated(&self.registry, &p.config).map_err(preset_error)?
            }
        };
        let resolved = self.absolute_paths(resolved);
        self.check_runnable(&resolved)?;
        let fallback = resolved.get("output_name").and_then(Value::as_str).unwrap_or("job").to_string();
        let name = check_name(name.filter(|n| !n.trim().is_empty()).unwrap_or(&fallback))
            .map_err(|e| JobError::Invalid(vec![FieldError { field: "name".into(), message: e.to_string().trim_start_matches("name: ").to_string() }]))?;
        let id = queue::enqueue(&mut self.db.conn(), &name, &resolved, priority, DEFAULT_MAX_ATTEMPTS)?;
        self.notify_queue();
        Ok(id)
    }

    /// Path fields are stored absolute, so a worker started from another folder reads the same
    /// files (`base_weights` holds one path per line).
    fn absolute_paths(&self, mut config: Config) -> Config {
        let absolute = |p: &str| match std::path::absolute(p.trim()) {
            Ok(abs) if !p.trim().is_empty() => abs.to_string_lossy().into_owned(),
            _ => p.to_string(),
        };
        for field in self.registry.fields().filter(|f| f.kind == Kind::Path || f.key == "base_weights") {
            if let Some(Value::String(p)) = config.get(&field.key) {
                let fixed = if field.kind == Kind::Path { absolute(p) } else { p.lines().map(absolute).collect::<Vec<_>>().join("\n") };
                config.insert(field.key.clone(), Value::String(fixed));
            }
        }
        config
    }

    /// Queues a tagging job (`crate::datasets::tagging`) beside the training jobs.
    pub fn enqueue_tag(&self, job: &crate::datasets::tagging::TagJob) -> Result<i64, JobError> {
        let name = format!("tag {}", job.dataset);
        let id = queue::enqueue(&mut self.db.conn(), &name, &job.to_config(), 0, DEFAULT_MAX_ATTEMPTS)?;
        self.notify_queue();
        Ok(id)
    }

    /// What training would make of a draft's dataset (the Queue button's confirmation): the
    /// same checks as [`Jobs::enqueue`], without queueing anything.
    pub fn preflight(&self, config: &Config) -> Result<Preflight, JobError> {
        let resolved = self.absolute_paths(validated(&self.registry, config).map_err(preset_error)?);
        self.check_runnable(&resolved)
    }

    /// Checks what the engine will check, before the job waits in the queue for hours, and
    /// returns the dataset's pre-flight.
    fn check_runnable(&self, resolved: &Config) -> Result<Preflight, JobError> {
        let mut probe = resolved.clone();
        if probe.get("output_dir").and_then(Value::as_str).is_none_or(|s| s.trim().is_empty()) {
            probe.insert("output_dir".into(), Value::String(self.data_dir.join("jobs").join("new").to_string_lossy().into_owned()));
        }
        let engine = config::engine_config(&self.registry, &probe).map_err(JobError::Invalid)?;
        // The dataset must be on this machine: local workers read it, remote ones download it from here.
        let dataset = resolved.get("train_data_dir").and_then(Value::as_str).unwrap_or("");
        if !Path::new(dataset).is_dir() {
            return Err(JobError::Invalid(vec![FieldError {
                field: "train_data_dir".into(),
                message: format!("no folder at {dataset}: give the folder that holds the N_name image folders"),
            }]));
        }
        // And hold something to train on (the pre-flight names what it drops).
        let unusable = |message: String| JobError::Invalid(vec![FieldError { field: "train_data_dir".into(), message }]);
        let report = loft_worker::train::preflight::preflight(&engine).map_err(|e| unusable(format!("{e:#}")))?;
        if !report.usable() {
            let why: Vec<String> = report.dropped.iter().take(3).map(|n| format!("{}: {}", n.file.display(), n.reason)).collect();
            return Err(unusable(format!(
                "{dataset} has no usable training image{}",
                if why.is_empty() { String::new() } else { format!(" ({}{})", why.join("; "), if report.dropped.len() > 3 { format!("; {} more", report.dropped.len() - 3) } else { String::new() }) }
            )));
        }
        Ok(report)
    }

    pub fn list(&self) -> Result<Vec<JobSummary>, JobError> {
        Ok(queue::list(&self.db.conn())?)
    }

    pub fn get(&self, id: i64) -> Result<JobSummary, JobError> {
        queue::get(&self.db.conn(), id)
    }

    pub fn config(&self, id: i64) -> Result<Config, JobError> {
        queue::config(&self.db.conn(), id)
    }

    pub fn artifacts(&self, id: i64) -> Result<Vec<Artifact>, JobError> {
        Ok(queue::artifacts(&self.db.conn(), id)?)
    }

    pub fn artifact(&self, job: i64, artifact: i64) -> Result<Artifact, JobError> {
        queue::artifact(&self.db.conn(), job, artifact)
    }

    pub fn events_after(&self, job: Option<i64>, after: i64, limit: i64) -> Result<Vec<EventRow>, JobError> {
        Ok(queue::events_after(&self.db.conn(), job, after, limit)?)
    }

    pub fn last_event_id(&self) -> Result<i64, JobError> {
        Ok(queue::last_event_id(&self.db.conn())?)
    }

    pub fn cancel(&self, id: i64) -> Result<queue::Cancelled, JobError> {
        let outcome = queue::cancel(&mut self.db.conn(), id)?;
        if let Some(token) = self.running.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
            token.cancel();
        }
        self.notify_events();
        Ok(outcome)
    }

    pub fn retry(&self, id: i64) -> Result<(), JobError> {
        queue::retry(&mut self.db.conn(), id)?;
        self.notify_queue();
        Ok(())
    }

    /// Deletes a job that is not running, and its files: the job's folder and every file it
    /// reported (also those in a chosen output folder). Copies the user kept stay.
    pub fn delete(&self, id: i64) -> Result<(), JobError> {
        let output_dir = self.config(id)?.get("output_dir").and_then(Value::as_str).map(str::trim).unwrap_or("").to_string();
        let artifacts = queue::delete(&mut self.db.conn(), id)?;
        let dir = self.job_dir(id);
        for a in artifacts {
            let path = Path::new(&a.path);
            // Only what lies where this job writes: its folder or its chosen output folder (a
            // remote worker's own paths, recorded for its training states, are not ours).
            let ours = path.starts_with(&dir) || (!output_dir.is_empty() && path.starts_with(&output_dir));
            if !ours || path.components().any(|c| c == std::path::Component::ParentDir) {
                continue;
            }
            let removed = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
            if let Err(e) = removed {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("job {id}: could not remove {}: {e}", path.display());
                }
            }
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| JobError::Io(format!("job {id} was deleted but its folder {} could not be removed: {e}", dir.display())))?;
        }
        self.notify_events();
        Ok(())
    }

    pub fn set_priority(&self, id: i64, priority: i64) -> Result<(), JobError> {
        queue::set_priority(&mut self.db.conn(), id, priority)?;
        self.notify_queue();
        Ok(())
    }

    pub fn move_job(&self, id: i64, to: Move) -> Result<(), JobError> {
        queue::move_job(&mut self.db.conn(), id, to)?;
        self.notify_queue();
        Ok(())
    }

    /// "Keep this epoch": copies the file to `DATA/kept/`, where pruning and deleting the job
    /// never reach it. Returns the copy's path.
    pub fn keep(&self, job: i64, artifact: i64) -> Result<PathBuf, JobError> {
        let a = self.artifact(job, artifact)?;
        if let Some(kept) = &a.kept {
            return Ok(PathBuf::from(kept));
        }
        let source = Path::new(&a.path);
        if !source.is_file() {
            return Err(JobError::Missing(format!("{} is no longer on disk (pruned or deleted)", a.path)));
        }
        let summary = self.get(job)?;
        let dir = self.data_dir.join("kept");
        std::fs::create_dir_all(&dir).map_err(|e| JobError::Io(format!("cannot create {}: {e}", dir.display())))?;
        let safe: String = summary.name.chars().map(|c| if c.is_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
        let file = source.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| "network.safetensors".into());
        let mut target = dir.join(format!("job{job}-{safe}-{file}"));
        let mut n = 2;
        while target.exists() {
            target = dir.join(format!("job{job}-{safe}-{n}-{file}"));
            n += 1;
        }
        std::fs::copy(source, &target).map_err(|e| JobError::Io(format!("cannot copy {} to {}: {e}", a.path, target.display())))?;
        queue::set_kept(&self.db.conn(), artifact, &target.to_string_lossy())?;
        self.notify_events();
        Ok(target)
    }

    // ---- what workers call (the local worker directly, remote ones through the hub's routes)

    pub fn claim(&self, worker: &str, lease: Duration) -> Result<Option<Claim>, JobError> {
        self.claim_for(worker, lease, queue::Takes::AnyJob)
    }

    pub fn claim_for(&self, worker: &str, lease: Duration, takes: queue::Takes) -> Result<Option<Claim>, JobError> {
        let claim = queue::claim_for(&mut self.db.conn(), worker, lease.as_millis() as i64, takes)?;
        if claim.is_some() {
            self.notify_events();
        }
        Ok(claim)
    }

    /// Waits up to `wait` for a job (a remote worker's long poll): answers as soon as one is
    /// queued. Remote workers take training jobs only: a tagging job reads this machine's folders.
    pub async fn claim_wait(&self, worker: &str, lease: Duration, wait: Duration) -> Result<Option<Claim>, JobError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.queue_changes();
        loop {
            changes.borrow_and_update();
            let jobs = self.clone();
            let who = worker.to_string();
            let claim = tokio::task::spawn_blocking(move || jobs.claim_for(&who, lease, queue::Takes::TrainingOnly))
                .await
                .map_err(|e| JobError::Io(format!("claim task: {e}")))??;
            if claim.is_some() {
                return Ok(claim);
            }
            // The timer also catches leases that expire while nobody enqueues anything.
            let tick = tokio::time::sleep(Duration::from_secs(2).min(lease));
            tokio::select! {
                _ = changes.changed() => {}
                _ = tick => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(None),
            }
        }
    }

    pub fn record(&self, job: i64, lease: &str, events: &[PostedEvent], lease_for: Duration) -> Result<Control, JobError> {
        let control = queue::record(&mut self.db.conn(), job, lease, events, lease_for.as_millis() as i64)?;
        if control != Control::Lost {
            self.notify_events();
        }
        Ok(control)
    }

    pub fn renew(&self, job: i64, lease: &str, lease_for: Duration) -> Result<Control, JobError> {
        Ok(queue::renew(&mut self.db.conn(), job, lease, lease_for.as_millis() as i64)?)
    }

    pub fn finish(&self, job: i64, lease: &str, end: &RunEnd) -> Result<Option<JobState>, JobError> {
        let state = queue::finish(&mut self.db.conn(), job, lease, end)?;
        self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&job);
        // A job back in the queue must wake a worker; a finished one frees this worker anyway.
        self.notify_queue();
        Ok(state)
    }

    /// Returns expired leases to the queue (the server does this every few seconds, so a job
    /// whose worker died shows as waiting to resume, never as stuck "running").
    pub fn sweep(&self) -> Result<usize, JobError> {
        let n = queue::sweep(&mut self.db.conn())?;
        if n > 0 {
            self.notify_queue();
        }
        Ok(n)
    }

    /// A worker on this machine whose process is gone (killed, crashed, the server restarted)
    /// cannot renew its lease: end the lease now instead of waiting for it to run out, so its job
    /// resumes at once and in its place in the queue. Only a worker named by
    /// [`worker::default_worker_name`] on this host is checked, and only where `/proc` tells
    /// which processes live; anything else waits for its lease, which still decides ownership.
    pub fn expire_dead_local_workers(&self) -> Result<usize, JobError> {
        if !Path::new("/proc/self").exists() {
            return Ok(0);
        }
        let host = worker::host_name();
        let running = queue::running_workers(&self.db.conn())?;
        let mut expired = 0;
        for (job, name) in running {
            let Some((h, pid)) = worker::parse_worker_name(&name) else { continue };
            if h == host && pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() && queue::expire_lease(&self.db.conn(), job, &name)? {
                tracing::info!("job {job}: worker {name} is gone; the job resumes without waiting for its lease");
                expired += 1;
            }
        }
        if expired > 0 {
            self.sweep()?;
        }
        Ok(expired)
    }

    pub fn owns(&self, job: i64, lease: &str) -> Result<bool, JobError> {
        Ok(queue::owns(&self.db.conn(), job, lease)?)
    }

    fn register_running(&self, job: i64, token: CancelToken) {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).insert(job, token);
    }
}

fn preset_error(e: PresetError) -> JobError {
    match e {
        PresetError::Invalid(errors) => JobError::Invalid(errors),
        PresetError::BadName(m) => JobError::Invalid(vec![FieldError { field: "name".into(), message: m }]),
        PresetError::Db(e) => JobError::Db(e),
        e => JobError::Conflict(e.to_string()),
    }
}

/// Seconds as "1h 02m", "3m 05s", "42s".
pub fn fmt_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "—".into();
    }
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}
