//! The worker loop: claim a job, run it on the engine (in `spawn_blocking`: training is CPU/GPU
//! work, not async), store its events as they come, renew the lease meanwhile, record how it
//! ended; then the next job. The same loop serves the in-process worker of `loft serve`, a
//! detached `loft worker --data-dir` (both through [`LocalQueue`]) and a trainer-only
//! `loft worker --hub` (through [`super::hub::HubQueue`]).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use loft_worker::train::{CancelToken, EventSink, TrainEvent};
use serde_json::Value;
use tokio::sync::watch;

use super::runner::{JobRunner, JobSpec, Permanent};
use super::{Claim, Control, Jobs, PostedEvent, RunEnd};

/// Where jobs come from and where their events go.
pub trait Backend: Send + Sync + 'static {
    /// Waits for the next job; `None` when `shutdown` fired first. Answers at once when a job
    /// is queued (no poll tick to miss).
    fn next_job(&self, worker: &str, shutdown: &mut watch::Receiver<bool>) -> impl Future<Output = Option<Claim>> + Send;
    /// Makes a claimed job runnable on this machine (blocking: may download its dataset).
    fn prepare(&self, claim: &Claim) -> Result<JobSpec>;
    /// Where the run's events go, in order (blocking calls from the engine's thread). The sink
    /// stops the run through `stop` when the job is cancelled or the lease is lost.
    fn sink(&self, claim: &Claim, stop: Stop) -> Box<dyn RunSink>;
    /// Pushes the lease forward (blocking).
    fn renew(&self, claim: &Claim) -> Result<Control>;
    /// Records how the run ended (blocking).
    fn finish(&self, claim: &Claim, end: &RunEnd) -> Result<()>;
    /// How long a lease lasts; the worker renews every third of it.
    fn lease(&self) -> Duration;
}

/// An event sink that can be drained before the run is recorded as ended.
pub trait RunSink: EventSink {
    /// Delivers whatever is still buffered (retrying for a while).
    fn flush(&mut self) {}
}

/// Why a run was told to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    None = 0,
    /// The user cancelled the job.
    Cancelled = 1,
    /// Another worker owns the job now (or it was deleted): write nothing more.
    Lost = 2,
    /// This worker is shutting down: give the job back to the queue.
    Shutdown = 3,
}

/// The run's cancel token with the first reason it was cancelled for.
#[derive(Clone, Debug, Default)]
pub struct Stop {
    pub token: CancelToken,
    reason: Arc<AtomicU8>,
}

impl Stop {
    pub fn stop(&self, reason: StopReason) {
        let _ = self.reason.compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst);
        self.token.cancel();
    }

    pub fn reason(&self) -> StopReason {
        match self.reason.load(Ordering::SeqCst) {
            1 => StopReason::Cancelled,
            2 => StopReason::Lost,
            3 => StopReason::Shutdown,
            _ if self.token.is_cancelled() => StopReason::Cancelled,
            _ => StopReason::None,
        }
    }
}

impl Stop {
    /// Calls `deliver` until it reports everything delivered (true), the lease is lost, or
    /// `tries` attempts `pause` apart have failed; false in the last case.
    pub(crate) fn retry(&self, tries: usize, pause: Duration, mut deliver: impl FnMut() -> bool) -> bool {
        for _ in 0..tries {
            if self.reason() == StopReason::Lost || deliver() {
                return true;
            }
            std::thread::sleep(pause);
        }
        false
    }
}

/// This machine's name.
pub fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// A name for this worker in the queue ("serve host/pid123", "host/pid123").
pub fn default_worker_name(prefix: &str) -> String {
    format!("{prefix}{}/pid{}", host_name(), std::process::id())
}

/// The host and process id in a name made by [`default_worker_name`].
pub fn parse_worker_name(name: &str) -> Option<(String, u32)> {
    let name = name.strip_prefix("serve ").unwrap_or(name);
    let (host, pid) = name.rsplit_once("/pid")?;
    Some((host.to_string(), pid.parse().ok()?))
}

/// Runs jobs until `shutdown` becomes true. A job running at shutdown is stopped (the engine
/// saves its state) and handed back to the queue, to resume on the next claim.
pub async fn run_worker<B: Backend>(backend: Arc<B>, runner: Arc<dyn JobRunner>, name: String, mut shutdown: watch::Receiver<bool>) {
    tracing::info!("worker {name} is waiting for jobs");
    loop {
        if *shutdown.borrow() {
            break;
        }
        let Some(claim) = backend.next_job(&name, &mut shutdown).await else { break };
        run_one(&backend, &runner, &name, claim, &mut shutdown).await;
    }
    tracing::info!("worker {name} stopped");
}

async fn run_one<B: Backend>(backend: &Arc<B>, runner: &Arc<dyn JobRunner>, name: &str, claim: Claim, shutdown: &mut watch::Receiver<bool>) {
    let stop = Stop::default();
    tracing::info!("job {} ({}) claimed by {name}: attempt {} of {}{}", claim.job_id, claim.name, claim.attempt, claim.max_attempts, if claim.resume { ", resuming" } else { "" });
    let heartbeat = tokio::spawn(heartbeat(backend.clone(), claim.clone(), stop.clone()));
    let work = {
        let (backend, runner, stop, name) = (backend.clone(), runner.clone(), stop.clone(), name.to_string());
        tokio::task::spawn_blocking(move || run_blocking(&*backend, &*runner, &claim, &stop, &name))
    };
    tokio::pin!(work);
    let done = tokio::select! {
        done = &mut work => done,
        _ = shutdown.changed() => {
            stop.stop(StopReason::Shutdown);
            work.await
        }
    };
    heartbeat.abort();
    if let Err(e) = done {
        tracing::error!("the job task failed: {e}");
    }
}

/// Renews the lease every third of its length. If the queue cannot be reached for longer than a
/// lease, another worker may already own the job: stop.
async fn heartbeat<B: Backend>(backend: Arc<B>, claim: Claim, stop: Stop) {
    let lease = backend.lease();
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(lease / 3).await;
        let (b, c) = (backend.clone(), claim.clone());
        match tokio::task::spawn_blocking(move || b.renew(&c)).await {
            Ok(Ok(Control::Continue)) => last_ok = Instant::now(),
            Ok(Ok(Control::Cancel)) => {
                last_ok = Instant::now();
                stop.stop(StopReason::Cancelled);
            }
            Ok(Ok(Control::Lost)) => {
                tracing::warn!("job {}: this worker's lease was taken over; stopping", claim.job_id);
                stop.stop(StopReason::Lost);
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!("job {}: cannot renew the lease: {e:#}", claim.job_id);
                if last_ok.elapsed() > lease {
                    stop.stop(StopReason::Lost);
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// Notes whether the engine reported its own end, so the worker adds a `failed` event only
/// when the engine did not.
struct Tracking<'a> {
    inner: &'a mut dyn RunSink,
    ended: bool,
}

impl EventSink for Tracking<'_> {
    fn emit(&mut self, event: TrainEvent) {
        self.ended |= matches!(event, TrainEvent::Failed { .. } | TrainEvent::Finished { .. });
        self.inner.emit(event)
    }
}

fn run_blocking<B: Backend>(backend: &B, runner: &dyn JobRunner, claim: &Claim, stop: &Stop, name: &str) {
    let end = match backend.prepare(claim) {
        Err(e) => RunEnd::Failed { error: format!("{e:#}"), permanent: e.is::<Permanent>() },
        Ok(spec) => {
            let mut sink = backend.sink(claim, stop.clone());
            let mut tracking = Tracking { inner: &mut *sink, ended: false };
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| runner.run(&spec, &mut tracking, &stop.token)));
            let end = match result {
                Ok(Ok(outcome)) => RunEnd::Done {
                    final_step: outcome.final_step,
                    network_file: outcome.network_file.map(|p| p.to_string_lossy().into_owned()),
                    cancelled: outcome.cancelled,
                },
                Ok(Err(e)) => RunEnd::Failed { error: format!("{e:#}"), permanent: e.is::<Permanent>() },
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".into());
                    RunEnd::Failed { error: format!("the training engine crashed: {message}"), permanent: false }
                }
            };
            if let RunEnd::Failed { error, .. } = &end {
                if !tracking.ended && stop.reason() != StopReason::Lost {
                    tracking.emit(TrainEvent::Failed { error: error.clone() });
                }
            }
            sink.flush();
            end
        }
    };
    let end = match (stop.reason(), end) {
        (StopReason::Lost, _) => {
            tracing::warn!("job {}: not recording the end of a run this worker no longer owns", claim.job_id);
            return;
        }
        // Stopped because this worker is going away: not the job's end.
        (StopReason::Shutdown, RunEnd::Done { cancelled: true, .. } | RunEnd::Failed { .. }) => {
            RunEnd::Released { reason: format!("worker {name} shut down") }
        }
        (_, end) => end,
    };
    // The end must be recorded; if the queue is briefly unreachable, try for a while (after
    // that the lease expires and the job resumes elsewhere, so nothing is lost either way).
    for attempt in 0..20 {
        match backend.finish(claim, &end) {
            Ok(()) => {
                tracing::info!("job {} ended: {}", claim.job_id, describe(&end));
                return;
            }
            Err(e) => {
                tracing::warn!("job {}: cannot record its end (try {}): {e:#}", claim.job_id, attempt + 1);
                std::thread::sleep(Duration::from_millis(250 * (attempt + 1).min(8)));
            }
        }
    }
}

fn describe(end: &RunEnd) -> String {
    match end {
        RunEnd::Done { cancelled: true, final_step, .. } => format!("cancelled at step {final_step}"),
        RunEnd::Done { final_step, .. } => format!("finished at step {final_step}"),
        RunEnd::Failed { error, .. } => format!("failed: {error}"),
        RunEnd::Released { reason } => format!("released ({reason})"),
    }
}

/// This machine's queue: the SQLite file in the data directory.
pub struct LocalQueue {
    pub jobs: Jobs,
    pub lease: Duration,
}

impl Backend for LocalQueue {
    async fn next_job(&self, worker: &str, shutdown: &mut watch::Receiver<bool>) -> Option<Claim> {
        let mut changes = self.jobs.queue_changes();
        loop {
            // Mark the signal seen *before* looking, so an enqueue during the claim still wakes us.
            changes.borrow_and_update();
            if *shutdown.borrow() {
                return None;
            }
            let (jobs, who, lease) = (self.jobs.clone(), worker.to_string(), self.lease);
            match tokio::task::spawn_blocking(move || jobs.claim(&who, lease)).await {
                Ok(Ok(Some(claim))) => return Some(claim),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::warn!("cannot claim a job: {e}"),
                Err(e) => tracing::error!("claim task: {e}"),
            }
            // The tick also notices leases that expire while nothing else happens.
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(2).min(self.lease)) => {}
                _ = shutdown.changed() => return None,
            }
        }
    }

    fn prepare(&self, claim: &Claim) -> Result<JobSpec> {
        let job_dir = self.jobs.job_dir(claim.job_id);
        std::fs::create_dir_all(&job_dir)?;
        let mut config = claim.config.clone();
        if config.get("output_dir").and_then(Value::as_str).is_none_or(|s| s.trim().is_empty()) {
            config.insert("output_dir".into(), Value::String(job_dir.to_string_lossy().into_owned()));
        }
        Ok(JobSpec { id: claim.job_id, name: claim.name.clone(), config, job_dir, resume: claim.resume })
    }

    fn sink(&self, claim: &Claim, stop: Stop) -> Box<dyn RunSink> {
        self.jobs.register_running(claim.job_id, stop.token.clone());
        Box::new(LocalSink { jobs: self.jobs.clone(), job: claim.job_id, lease: claim.lease.clone(), lease_for: self.lease, seq: 0, pending: Vec::new(), stop })
    }

    fn renew(&self, claim: &Claim) -> Result<Control> {
        Ok(self.jobs.renew(claim.job_id, &claim.lease, self.lease)?)
    }

    fn finish(&self, claim: &Claim, end: &RunEnd) -> Result<()> {
        self.jobs.finish(claim.job_id, &claim.lease, end)?;
        Ok(())
    }

    fn lease(&self) -> Duration {
        self.lease
    }
}

/// Writes each event as a row as soon as it happens (one short transaction), so a worker killed
/// at any moment loses nothing it reported. A write that fails (the database busy for longer
/// than its timeout) is kept and retried with the next event.
struct LocalSink {
    jobs: Jobs,
    job: i64,
    lease: String,
    lease_for: Duration,
    seq: i64,
    pending: Vec<PostedEvent>,
    stop: Stop,
}

impl LocalSink {
    fn write(&mut self) -> bool {
        if self.pending.is_empty() {
            return true;
        }
        match self.jobs.record(self.job, &self.lease, &self.pending, self.lease_for) {
            Ok(control) => {
                self.pending.clear();
                match control {
                    Control::Continue => {}
                    Control::Cancel => self.stop.stop(StopReason::Cancelled),
                    Control::Lost => self.stop.stop(StopReason::Lost),
                }
                true
            }
            Err(e) => {
                tracing::warn!("job {}: cannot store {} event(s) yet: {e}", self.job, self.pending.len());
                false
            }
        }
    }
}

impl EventSink for LocalSink {
    fn emit(&mut self, event: TrainEvent) {
        if self.stop.reason() == StopReason::Lost {
            return;
        }
        self.seq += 1;
        self.pending.push(PostedEvent { seq: self.seq, event });
        self.write();
    }
}

impl RunSink for LocalSink {
    fn flush(&mut self) {
        let stop = self.stop.clone();
        if !stop.retry(40, Duration::from_millis(250), || self.write()) {
            tracing::error!("job {}: {} event(s) could not be stored", self.job, self.pending.len());
        }
    }
}
