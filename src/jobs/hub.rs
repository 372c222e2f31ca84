//! Trainer-only workers: `loft worker --hub URL --token T` on another machine. The hub (a
//! `loft serve`) keeps the queue; the worker claims over HTTP (a long poll, so it starts as soon as
//! a job is queued), downloads the job's dataset (and the base model and VAE when the hub has
//! them), posts its events to the hub, which stores them as the same rows a local worker writes,
//! and uploads the files the job produces. Every worker endpoint checks the hub's worker token.
//!
//! This file holds both sides: the wire types, the hub's file helpers, and [`HubQueue`], the
//! worker's [`Backend`].

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use loft_worker::train::{CheckpointKind, EventSink, TrainEvent};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use super::runner::JobSpec;
use super::worker::{Backend, RunSink, Stop, StopReason};
use super::{Claim, Control, PostedEvent, RunEnd};
use crate::db::Db;
use crate::registry::Config;

/// Configuration keys whose files a remote worker downloads from the hub (when the hub has them).
pub const SHARED_PATH_KEYS: &[&str] = &["train_data_dir", "reg_data_dir", "pretrained_model_name_or_path", "vae"];

#[derive(Serialize, Deserialize)]
pub struct ClaimRequest {
    pub worker: String,
    /// Long poll: how long the hub may wait for a job before answering 204.
    pub wait_secs: u64,
}

#[derive(Serialize, Deserialize)]
pub struct ClaimResponse {
    pub claim: Claim,
    pub lease_secs: f64,
}

#[derive(Serialize, Deserialize)]
pub struct EventsRequest {
    pub lease: String,
    pub events: Vec<PostedEvent>,
}

#[derive(Serialize, Deserialize)]
pub struct LeaseRequest {
    pub lease: String,
}

#[derive(Serialize, Deserialize)]
pub struct FinishRequest {
    pub lease: String,
    pub end: RunEnd,
}

#[derive(Serialize, Deserialize)]
pub struct ControlResponse {
    pub control: Control,
}

/// The files a job needs, per configuration key.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Manifest {
    pub roots: Vec<ManifestRoot>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct ManifestRoot {
    pub key: String,
    /// The path on the hub (used to cache models across jobs).
    pub hub_path: String,
    /// A single file (a .safetensors checkpoint) rather than a folder.
    pub is_file: bool,
    pub files: Vec<ManifestFile>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct ManifestFile {
    /// Relative to the root, '/'-separated (the file's name for a single-file root).
    pub path: String,
    pub size: u64,
}

/// The hub's worker token: the one given on the command line, else the one stored in the
/// settings table (created on first start). Stored server-side; the UI shows it masked.
pub fn worker_token(db: &Db, given: Option<String>) -> Result<String> {
    if let Some(t) = given.filter(|t| !t.trim().is_empty()) {
        if t.len() < 16 {
            bail!("the worker token must be at least 16 characters");
        }
        return Ok(t);
    }
    let conn = db.conn();
    let stored: Option<String> = conn.query_row("SELECT value FROM settings WHERE key = 'worker_token'", [], |r| r.get(0)).optional()?;
    if let Some(t) = stored {
        return Ok(t);
    }
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    conn.execute("INSERT INTO settings (key, value) VALUES ('worker_token', ?1)", params![token])?;
    Ok(token)
}

/// "abcd…wxyz".
pub fn masked(token: &str) -> String {
    if token.len() <= 8 {
        return "…".into();
    }
    format!("{}…{}", &token[..4], &token[token.len() - 4..])
}

/// What a job's worker may download: the files under each shared key the hub has.
pub fn manifest(config: &Config) -> Manifest {
    let mut roots = Vec::new();
    for key in SHARED_PATH_KEYS {
        let Some(path) = config.get(*key).and_then(Value::as_str).filter(|p| !p.trim().is_empty()) else { continue };
        let root = Path::new(path);
        if root.is_file() {
            let name = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let size = root.metadata().map(|m| m.len()).unwrap_or(0);
            roots.push(ManifestRoot { key: key.to_string(), hub_path: path.into(), is_file: true, files: vec![ManifestFile { path: name, size }] });
        } else if root.is_dir() {
            let mut files = Vec::new();
            walk(root, root, &mut files);
            files.sort_by(|a, b| a.path.cmp(&b.path));
            roots.push(ManifestRoot { key: key.to_string(), hub_path: path.into(), is_file: false, files });
        }
    }
    Manifest { roots }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<ManifestFile>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        // Latent caches and other hidden folders are rebuilt by the worker.
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            walk(root, &path, out);
        } else if let (Ok(rel), Ok(meta)) = (path.strip_prefix(root), path.metadata()) {
            let rel: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            out.push(ManifestFile { path: rel.join("/"), size: meta.len() });
        }
    }
}

/// A relative path made only of plain names (no `..`, no root, no prefix).
fn plain_relative(rel: &str) -> Option<PathBuf> {
    let path = Path::new(rel);
    let ok = !rel.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)));
    ok.then(|| path.to_path_buf())
}

/// The hub file a worker asks for, checked to lie under the job's configured root.
pub fn resolve_file(config: &Config, key: &str, rel: &str) -> Result<PathBuf> {
    if !SHARED_PATH_KEYS.contains(&key) {
        bail!("key: {key} is not a downloadable input");
    }
    let root = config.get(key).and_then(Value::as_str).filter(|p| !p.trim().is_empty()).ok_or_else(|| anyhow!("key: the job has no {key}"))?;
    let root = Path::new(root);
    let rel_path = plain_relative(rel).ok_or_else(|| anyhow!("path: {rel:?} is not a plain relative path"))?;
    if root.is_file() {
        if root.file_name() == Some(rel_path.as_os_str()) {
            return Ok(root.to_path_buf());
        }
        bail!("path: {rel:?} is not the job's {key}");
    }
    let root = root.canonicalize().with_context(|| format!("key: the job's {key} is not on the hub"))?;
    let file = root.join(&rel_path).canonicalize().with_context(|| format!("path: no file {rel:?} in the job's {key}"))?;
    if !file.starts_with(&root) || !file.is_file() {
        bail!("path: {rel:?} is not a file inside the job's {key}");
    }
    Ok(file)
}

/// Where the hub stores a file a remote worker uploads: `JOB_DIR/from-worker/NAME`.
pub fn upload_target(job_dir: &Path, name: &str) -> Result<PathBuf> {
    let rel = plain_relative(name).filter(|p| p.components().count() <= 3).ok_or_else(|| anyhow!("name: {name:?} is not a plain relative file name"))?;
    Ok(job_dir.join("from-worker").join(rel))
}

fn fnv(s: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// The worker side: a hub reached over HTTP.
pub struct HubQueue {
    shared: Arc<HubClient>,
}

struct HubClient {
    client: reqwest::Client,
    base: String,
    token: String,
    work_dir: PathBuf,
    lease_ms: AtomicU64,
    runtime: tokio::runtime::Handle,
}

impl HubClient {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn post<T: Serialize + ?Sized>(&self, path: &str, body: &T) -> reqwest::RequestBuilder {
        self.client.post(self.url(path)).bearer_auth(&self.token).json(body)
    }

    /// Runs an HTTP call from the engine's (blocking) thread.
    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    async fn json<T: for<'de> Deserialize<'de>>(res: reqwest::Response) -> Result<T> {
        let status = res.status();
        if !status.is_success() {
            let text = res.text().await.unwrap_or_default();
            if status == reqwest::StatusCode::UNAUTHORIZED {
                bail!("the hub refused this worker's token (401): {text}");
            }
            bail!("the hub answered {status}: {text}");
        }
        Ok(res.json().await?)
    }

    fn control(&self, path: &str, body: &impl Serialize) -> Result<Control> {
        self.block(async {
            let res = self.post(path, body).timeout(Duration::from_secs(30)).send().await?;
            Ok(Self::json::<ControlResponse>(res).await?.control)
        })
    }

    async fn download(&self, job: i64, lease: &str, key: &str, rel: &str, dest: &Path) -> Result<()> {
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let mut res = self
            .client
            .get(self.url(&format!("/api/worker/jobs/{job}/file")))
            .bearer_auth(&self.token)
            .query(&[("lease", lease), ("key", key), ("path", rel)])
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("downloading {key}/{rel}: the hub answered {}: {}", res.status(), res.text().await.unwrap_or_default());
        }
        let part = dest.with_extension("part");
        let mut file = tokio::fs::File::create(&part).await?;
        use tokio::io::AsyncWriteExt;
        while let Some(chunk) = res.chunk().await? {
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        drop(file);
        tokio::fs::rename(&part, dest).await?;
        Ok(())
    }

    /// Uploads a file the job produced; returns its path on the hub.
    fn upload(&self, job: i64, lease: &str, name: &str, path: &Path) -> Result<String> {
        self.block(async {
            let file = tokio::fs::File::open(path).await.with_context(|| format!("cannot open {}", path.display()))?;
            let res = self
                .client
                .put(self.url(&format!("/api/worker/jobs/{job}/artifacts/{name}")))
                .bearer_auth(&self.token)
                .query(&[("lease", lease)])
                .body(reqwest::Body::from(file))
                .send()
                .await?;
            let v: Value = Self::json(res).await?;
            v["path"].as_str().map(str::to_string).ok_or_else(|| anyhow!("the hub did not say where it stored {name}"))
        })
    }
}

impl HubQueue {
    /// `base` is the hub's URL (`http://host:7860`); `work_dir` holds downloads and outputs.
    pub fn new(base: &str, token: &str, work_dir: &Path) -> Result<HubQueue> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            bail!("--hub: expected a URL such as http://192.168.1.10:7860, got {base:?}");
        }
        std::fs::create_dir_all(work_dir).with_context(|| format!("cannot create the work folder {}", work_dir.display()))?;
        Ok(HubQueue {
            shared: Arc::new(HubClient {
                client: reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).build()?,
                base,
                token: token.to_string(),
                work_dir: work_dir.to_path_buf(),
                lease_ms: AtomicU64::new(super::DEFAULT_LEASE.as_millis() as u64),
                runtime: tokio::runtime::Handle::current(),
            }),
        })
    }
}

impl Backend for HubQueue {
    async fn next_job(&self, worker: &str, shutdown: &mut watch::Receiver<bool>) -> Option<Claim> {
        let hub = &self.shared;
        let mut backoff = Duration::from_millis(500);
        loop {
            if *shutdown.borrow() {
                return None;
            }
            let request = hub.post("/api/worker/claim", &ClaimRequest { worker: worker.to_string(), wait_secs: 20 }).timeout(Duration::from_secs(40)).send();
            let answer = tokio::select! {
                r = request => r,
                _ = shutdown.changed() => return None,
            };
            let problem = match answer {
                Ok(res) if res.status() == reqwest::StatusCode::NO_CONTENT => {
                    backoff = Duration::from_millis(500);
                    continue;
                }
                Ok(res) => match HubClient::json::<ClaimResponse>(res).await {
                    Ok(c) => {
                        hub.lease_ms.store((c.lease_secs * 1000.0) as u64, Ordering::SeqCst);
                        return Some(c.claim);
                    }
                    Err(e) => e,
                },
                Err(e) => anyhow!(e),
            };
            tracing::warn!("cannot claim from the hub {}: {problem:#}; trying again in {:?}", hub.base, backoff);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return None,
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    fn prepare(&self, claim: &Claim) -> Result<JobSpec> {
        let hub = &self.shared;
        let job = claim.job_id;
        let job_dir = hub.work_dir.join("jobs").join(job.to_string());
        std::fs::create_dir_all(&job_dir)?;
        let manifest: Manifest = hub.block(async {
            let res = hub
                .client
                .get(hub.url(&format!("/api/worker/jobs/{job}/manifest")))
                .bearer_auth(&hub.token)
                .query(&[("lease", claim.lease.as_str())])
                .send()
                .await?;
            HubClient::json(res).await
        })?;
        let mut config = claim.config.clone();
        for root in &manifest.roots {
            // Datasets belong to the job; models are cached by their hub path and shared by jobs.
            let local_root = if root.key.ends_with("_data_dir") {
                job_dir.join("inputs").join(&root.key)
            } else {
                hub.work_dir.join("models").join(fnv(&root.hub_path))
            };
            let mut fetched = 0u64;
            for f in &root.files {
                let rel = plain_relative(&f.path).ok_or_else(|| anyhow!("the hub sent a bad path {:?}", f.path))?;
                let dest = local_root.join(rel);
                if dest.metadata().is_ok_and(|m| m.len() == f.size) {
                    continue;
                }
                hub.block(hub.download(job, &claim.lease, &root.key, &f.path, &dest))?;
                fetched += f.size;
            }
            tracing::info!("job {job}: {} ready ({} files, {fetched} bytes downloaded)", root.key, root.files.len());
            let local = if root.is_file { local_root.join(&root.files[0].path) } else { local_root };
            config.insert(root.key.clone(), Value::String(local.to_string_lossy().into_owned()));
        }
        // Outputs go to this machine's job folder, then up to the hub.
        config.insert("output_dir".into(), Value::String(job_dir.join("output").to_string_lossy().into_owned()));
        Ok(JobSpec { id: job, name: claim.name.clone(), config, job_dir, resume: claim.resume })
    }

    fn sink(&self, claim: &Claim, stop: Stop) -> Box<dyn RunSink> {
        Box::new(RemoteSink {
            hub: self.shared.clone(),
            job: claim.job_id,
            lease: claim.lease.clone(),
            seq: 0,
            pending: Vec::new(),
            last_post: Instant::now(),
            uploaded: HashMap::new(),
            stop,
        })
    }

    fn renew(&self, claim: &Claim) -> Result<Control> {
        self.shared.control(&format!("/api/worker/jobs/{}/heartbeat", claim.job_id), &LeaseRequest { lease: claim.lease.clone() })
    }

    fn finish(&self, claim: &Claim, end: &RunEnd) -> Result<()> {
        // The final file's path is this machine's; the hub learnt its own copy from the
        // checkpoint event (uploaded), so only the outcome goes up.
        let end = match end.clone() {
            RunEnd::Done { final_step, cancelled, .. } => RunEnd::Done { final_step, network_file: None, cancelled },
            other => other,
        };
        self.shared.control(&format!("/api/worker/jobs/{}/finish", claim.job_id), &FinishRequest { lease: claim.lease.clone(), end })?;
        Ok(())
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.shared.lease_ms.load(Ordering::SeqCst))
    }
}

/// Posts events to the hub in order: step events in small batches (at most ~3 posts a second),
/// anything else at once. Files an event announces are uploaded first and the event then names
/// the hub's copy, so the dashboard can show and download it.
struct RemoteSink {
    hub: Arc<HubClient>,
    job: i64,
    lease: String,
    seq: i64,
    pending: Vec<PostedEvent>,
    last_post: Instant,
    /// Worker path → hub path of the files uploaded.
    uploaded: HashMap<PathBuf, PathBuf>,
    stop: Stop,
}

impl RemoteSink {
    fn upload(&mut self, path: &Path, folder: &str) -> Option<PathBuf> {
        let name = path.file_name()?.to_string_lossy().into_owned();
        let name = if folder.is_empty() { name } else { format!("{folder}/{name}") };
        for attempt in 1..=3 {
            match self.hub.upload(self.job, &self.lease, &name, path) {
                Ok(hub_path) => {
                    let hub_path = PathBuf::from(hub_path);
                    self.uploaded.insert(path.to_path_buf(), hub_path.clone());
                    return Some(hub_path);
                }
                Err(e) => {
                    tracing::warn!("job {}: uploading {} failed (try {attempt}): {e:#}", self.job, path.display());
                    std::thread::sleep(Duration::from_millis(500 * attempt));
                }
            }
        }
        None
    }

    /// The event as the hub should store it: paths of uploaded files point at the hub's copies.
    fn for_hub(&mut self, event: TrainEvent) -> TrainEvent {
        match event {
            TrainEvent::Sample { step, epoch, index, prompt, path } => {
                let path = self.upload(&path, "samples").unwrap_or(path);
                TrainEvent::Sample { step, epoch, index, prompt, path }
            }
            // Training states stay on the worker (it resumes from them); network files go up.
            TrainEvent::Checkpoint { step, epoch, checkpoint, path } if checkpoint != CheckpointKind::State && path.is_file() => {
                let path = self.upload(&path, "").unwrap_or(path);
                TrainEvent::Checkpoint { step, epoch, checkpoint, path }
            }
            TrainEvent::Pruned { path } => TrainEvent::Pruned { path: self.uploaded.get(&path).cloned().unwrap_or(path) },
            TrainEvent::Finished { step, path, cancelled } => {
                let path = path.map(|p| match self.uploaded.get(&p) {
                    Some(hub) => hub.clone(),
                    None => self.upload(&p, "").unwrap_or(p),
                });
                TrainEvent::Finished { step, path, cancelled }
            }
            other => other,
        }
    }

    fn post(&mut self) -> bool {
        if self.pending.is_empty() {
            return true;
        }
        let body = EventsRequest { lease: self.lease.clone(), events: std::mem::take(&mut self.pending) };
        match self.hub.control(&format!("/api/worker/jobs/{}/events", self.job), &body) {
            Ok(control) => {
                self.last_post = Instant::now();
                match control {
                    Control::Continue => {}
                    Control::Cancel => self.stop.stop(StopReason::Cancelled),
                    Control::Lost => self.stop.stop(StopReason::Lost),
                }
                true
            }
            Err(e) => {
                tracing::warn!("job {}: cannot post {} event(s) to the hub yet: {e:#}", self.job, body.events.len());
                self.pending = body.events;
                false
            }
        }
    }
}

impl EventSink for RemoteSink {
    fn emit(&mut self, event: TrainEvent) {
        if self.stop.reason() == StopReason::Lost {
            return;
        }
        let is_step = matches!(event, TrainEvent::Step { .. });
        let event = self.for_hub(event);
        self.seq += 1;
        self.pending.push(PostedEvent { seq: self.seq, event });
        if !is_step || self.last_post.elapsed() > Duration::from_millis(300) || self.pending.len() >= 100 {
            self.post();
        }
    }
}

impl RunSink for RemoteSink {
    fn flush(&mut self) {
        let stop = self.stop.clone();
        if !stop.retry(60, Duration::from_millis(500), || self.post()) {
            tracing::error!("job {}: {} event(s) could not be delivered to the hub", self.job, self.pending.len());
        }
    }
}
