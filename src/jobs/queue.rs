//! The queue in SQL. Every change is one short transaction on the SQLite file, so any number of
//! processes (the web app, detached workers) can share it safely; transactions that read and then
//! write (claim, record, finish) are `BEGIN IMMEDIATE`, so two writers never decide on the same
//! stale read.
//!
//! Ownership of a running job is its lease: a random token handed out by [`claim`] with an expiry
//! the worker keeps pushing forward ([`renew`], and every [`record`]). Every write a worker makes
//! carries the token; once the lease has expired and the job was claimed again, the old worker's
//! writes are refused ([`Control::Lost`]), so a job never runs twice at once.

use std::time::{SystemTime, UNIX_EPOCH};

use loft_worker::train::{CheckpointKind, TrainEvent};
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::registry::{Config, FieldError};

/// Where a job is. Users see these words (with a position, progress or error added).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> JobState {
        match s {
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => JobState::Queued,
        }
    }

    /// Finished for good (until a retry).
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("no job {0}")]
    NotFound(i64),
    /// Something else asked for is not there (a file of a job).
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the job is not valid")]
    Invalid(Vec<FieldError>),
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("{0}")]
    Io(String),
}

/// What a worker got from [`claim`]: everything it needs to run the job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claim {
    pub job_id: i64,
    pub lease: String,
    pub name: String,
    /// The resolved configuration snapshotted at enqueue time.
    pub config: Config,
    /// This attempt's number (1 = first).
    pub attempt: i64,
    pub max_attempts: i64,
    /// The job ran before (an expired lease, a failed attempt, a retry): continue from its
    /// newest saved training state.
    pub resume: bool,
}

/// What the queue tells a running worker after each write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Control {
    Continue,
    /// The user cancelled the job: stop after this step, keep what was saved.
    Cancel,
    /// This worker no longer owns the job (its lease expired and it was claimed again, or the
    /// job was deleted): stop and write nothing more.
    Lost,
}

/// How a run ended, as the worker reports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "end", rename_all = "snake_case")]
pub enum RunEnd {
    /// The engine returned normally (finished, or stopped early because the user cancelled).
    Done { final_step: u64, network_file: Option<String>, cancelled: bool },
    /// The engine failed. `permanent` errors (an invalid configuration) are not retried.
    Failed { error: String, permanent: bool },
    /// The worker is shutting down: the job goes back to the queue, not counted as an attempt,
    /// and resumes from its checkpoint on the next claim.
    Released { reason: String },
}

/// One event a worker reports. `seq` numbers a worker's events within its claim, so the same
/// event posted twice (a retried HTTP call) is stored once.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PostedEvent {
    pub seq: i64,
    pub event: TrainEvent,
}

/// A job as the API and the dashboard show it.
#[derive(Clone, Debug, Serialize)]
pub struct JobSummary {
    pub id: i64,
    pub name: String,
    pub state: JobState,
    /// 1-based place in the queue (queued jobs only).
    pub position: Option<u64>,
    pub priority: i64,
    pub attempts: i64,
    pub max_attempts: i64,
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    pub total_epochs: u64,
    /// 0–1.
    pub progress: f64,
    pub loss: Option<f64>,
    pub it_per_sec: Option<f64>,
    pub eta_secs: Option<f64>,
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub worker: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

/// One row of `job_events`.
#[derive(Clone, Debug, Serialize)]
pub struct EventRow {
    pub id: i64,
    pub job_id: i64,
    pub kind: String,
    pub payload: String,
    pub time: String,
}

/// One file a job produced.
#[derive(Clone, Debug, Serialize)]
pub struct Artifact {
    pub id: i64,
    pub job_id: i64,
    pub kind: String,
    pub path: String,
    pub step: u64,
    pub epoch: u64,
    pub label: String,
    pub pruned: bool,
    pub kept: Option<String>,
}

/// How to reorder a queued job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Move {
    Top,
    Up,
    Down,
    Bottom,
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A fresh lease token (128 random bits, hex).
fn new_lease() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// Statements are prepared once per connection and cached: the queue runs the same few
/// statements thousands of times (every training step records an event).
fn exec<P: rusqlite::Params>(conn: &Connection, sql: &str, params: P) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

fn qrow<T, P: rusqlite::Params, F: FnOnce(&Row<'_>) -> rusqlite::Result<T>>(conn: &Connection, sql: &str, params: P, f: F) -> rusqlite::Result<T> {
    conn.prepare_cached(sql)?.query_row(params, f)
}

fn immediate(conn: &mut Connection) -> rusqlite::Result<Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
}

/// Appends a queue event (a state change or a note) to a job's stream.
fn queue_event(tx: &Transaction, job_id: i64, kind: &str, mut payload: Value) -> rusqlite::Result<()> {
    payload["kind"] = json!(kind);
    exec(tx, "INSERT INTO job_events (job_id, kind, payload) VALUES (?1, ?2, ?3)", params![job_id, kind, payload.to_string()])?;
    Ok(())
}

fn state_event(tx: &Transaction, job_id: i64, state: JobState, message: &str, extra: Value) -> rusqlite::Result<()> {
    let mut payload = json!({ "state": state.as_str(), "message": message });
    if let (Some(p), Some(e)) = (payload.as_object_mut(), extra.as_object()) {
        p.extend(e.clone());
    }
    queue_event(tx, job_id, "state", payload)
}

/// Adds a job at the end of its priority class. `config` is the resolved, validated snapshot.
pub fn enqueue(conn: &mut Connection, name: &str, config: &Config, priority: i64, max_attempts: i64) -> rusqlite::Result<i64> {
    let tx = immediate(conn)?;
    exec(&tx, 
        "INSERT INTO jobs (name, config, priority, max_attempts, seq)
         VALUES (?1, ?2, ?3, ?4, (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs))",
        params![name, serde_json::to_string(config).expect("JSON"), priority, max_attempts.max(1)],
    )?;
    let id = tx.last_insert_rowid();
    state_event(&tx, id, JobState::Queued, "queued", json!({}))?;
    tx.commit()?;
    Ok(id)
}

/// Returns jobs whose lease expired to the queue (or fails them after their last attempt, or
/// marks them cancelled when a cancel was pending). Returns how many it changed.
pub fn sweep(conn: &mut Connection) -> rusqlite::Result<usize> {
    let tx = immediate(conn)?;
    let n = sweep_in(&tx, now_ms())?;
    tx.commit()?;
    Ok(n)
}

fn sweep_in(tx: &Transaction, now: i64) -> rusqlite::Result<usize> {
    let expired: Vec<(i64, i64, i64, bool, String)> = {
        let mut stmt = tx.prepare_cached(
            "SELECT id, attempts, max_attempts, cancel_requested, worker FROM jobs
             WHERE state = 'running' AND lease_expires_ms < ?1",
        )?;
        let rows = stmt.query_map(params![now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    for (id, attempts, max_attempts, cancel, worker) in &expired {
        let lost = format!("worker {worker} stopped renewing its lease (it crashed, was killed or lost contact)");
        let (state, error, message) = if *cancel {
            (JobState::Cancelled, String::new(), format!("cancelled ({lost})"))
        } else if attempts >= max_attempts {
            let e = format!("{lost}; that was attempt {attempts} of {max_attempts}");
            (JobState::Failed, e.clone(), e)
        } else {
            (JobState::Queued, String::new(), format!("{lost}; the job will resume from its last checkpoint"))
        };
        exec(tx, 
            &format!(
                "UPDATE jobs SET state = ?2, lease = NULL, lease_expires_ms = NULL, error = ?3,
                 finished_at = CASE WHEN ?4 THEN {NOW} ELSE NULL END WHERE id = ?1"
            ),
            params![id, state.as_str(), error, state.is_terminal()],
        )?;
        state_event(tx, *id, state, &message, json!({ "attempt": attempts, "max_attempts": max_attempts }))?;
    }
    Ok(expired.len())
}

/// Running jobs and the workers holding them.
pub fn running_workers(conn: &Connection) -> rusqlite::Result<Vec<(i64, String)>> {
    let mut stmt = conn.prepare_cached("SELECT id, worker FROM jobs WHERE state = 'running'")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Ends the lease of `worker` on running job `job_id` now (its process is known to be gone), so
/// the next sweep or claim takes the job back without waiting for the lease to run out.
pub fn expire_lease(conn: &Connection, job_id: i64, worker: &str) -> rusqlite::Result<bool> {
    Ok(exec(conn, "UPDATE jobs SET lease_expires_ms = 0 WHERE id = ?1 AND worker = ?2 AND state = 'running'", params![job_id, worker])? == 1)
}

/// Takes the next job for `worker`, in one `BEGIN IMMEDIATE` transaction: expired leases are
/// swept first, then the first queued job (highest priority, then oldest) becomes running with a
/// fresh lease that expires `lease_ms` from now.
/// Which jobs a worker may take: every kind (a worker on the hub's machine), or only training
/// (a trainer-only worker elsewhere: a tagging job reads the hub's own folders).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Takes {
    AnyJob,
    TrainingOnly,
}

pub fn claim(conn: &mut Connection, worker: &str, lease_ms: i64) -> rusqlite::Result<Option<Claim>> {
    claim_for(conn, worker, lease_ms, Takes::AnyJob)
}

pub fn claim_for(conn: &mut Connection, worker: &str, lease_ms: i64, takes: Takes) -> rusqlite::Result<Option<Claim>> {
    let now = now_ms();
    // A cheap look first, so idle workers woken by unrelated commits do not take the write lock.
    let anything: bool = qrow(conn, 
        "SELECT EXISTS(SELECT 1 FROM jobs WHERE state = 'queued' OR (state = 'running' AND lease_expires_ms < ?1))",
        params![now],
        |r| r.get(0),
    )?;
    if !anything {
        return Ok(None);
    }
    let tx = immediate(conn)?;
    sweep_in(&tx, now)?;
    let next = tx
        .query_row(
            "SELECT id, name, config, attempts, max_attempts, runs FROM jobs
             WHERE state = 'queued' AND (?1 OR COALESCE(json_extract(config, '$.job_kind'), 'train') = 'train')
             ORDER BY priority DESC, seq LIMIT 1",
            params![takes == Takes::AnyJob],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            },
        )
        .optional()?;
    let Some((job_id, name, config, attempts, max_attempts, runs)) = next else {
        tx.commit()?;
        return Ok(None);
    };
    let lease = new_lease();
    exec(&tx, 
        &format!(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, runs = runs + 1, worker = ?2, lease = ?3,
             lease_expires_ms = ?4, cancel_requested = 0, error = '', started_at = COALESCE(started_at, {NOW})
             WHERE id = ?1"
        ),
        params![job_id, worker, lease, now + lease_ms],
    )?;
    let attempt = attempts + 1;
    let resume = runs > 0;
    let message = if resume { format!("resumed by {worker} (attempt {attempt} of {max_attempts})") } else { format!("started by {worker}") };
    state_event(&tx, job_id, JobState::Running, &message, json!({ "attempt": attempt, "max_attempts": max_attempts, "worker": worker, "resume": resume }))?;
    tx.commit()?;
    Ok(Some(Claim {
        job_id,
        lease,
        name,
        config: serde_json::from_str(&config).unwrap_or_default(),
        attempt,
        max_attempts,
        resume,
    }))
}

/// Whether `lease` still owns running job `job_id`, and whether a cancel is pending.
fn ownership(tx: &Transaction, job_id: i64, lease: &str) -> rusqlite::Result<Option<bool>> {
    let row: Option<(String, Option<String>, bool)> = tx
        .query_row("SELECT state, lease, cancel_requested FROM jobs WHERE id = ?1", params![job_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    Ok(match row {
        Some((state, Some(owner), cancel)) if state == "running" && owner == lease => Some(cancel),
        _ => None,
    })
}

/// Pushes the lease of a running job forward.
pub fn renew(conn: &mut Connection, job_id: i64, lease: &str, lease_ms: i64) -> rusqlite::Result<Control> {
    let tx = immediate(conn)?;
    let Some(cancel) = ownership(&tx, job_id, lease)? else {
        return Ok(Control::Lost);
    };
    exec(&tx, "UPDATE jobs SET lease_expires_ms = ?2 WHERE id = ?1", params![job_id, now_ms() + lease_ms])?;
    tx.commit()?;
    Ok(if cancel { Control::Cancel } else { Control::Continue })
}

/// The event kind (the serde tag) of an engine event.
pub fn event_kind(event: &TrainEvent) -> &'static str {
    match event {
        TrainEvent::Started { .. } => "started",
        TrainEvent::Step { .. } => "step",
        TrainEvent::Epoch { .. } => "epoch",
        TrainEvent::Validation { .. } => "validation",
        TrainEvent::Sample { .. } => "sample",
        TrainEvent::Checkpoint { .. } => "checkpoint",
        TrainEvent::Pruned { .. } => "pruned",
        TrainEvent::Log { .. } => "log",
        TrainEvent::Finished { .. } => "finished",
        TrainEvent::Failed { .. } => "failed",
    }
}

fn checkpoint_kind(kind: CheckpointKind) -> &'static str {
    match kind {
        CheckpointKind::Epoch => "epoch",
        CheckpointKind::Step => "step",
        CheckpointKind::Final => "final",
        CheckpointKind::State => "state",
    }
}

/// Records a file the job produced (a file saved again under the same path updates its row).
fn upsert_artifact(tx: &Transaction, job_id: i64, kind: &str, path: &str, step: u64, epoch: u64, label: &str) -> rusqlite::Result<()> {
    let updated = exec(tx, 
        "UPDATE artifacts SET kind = ?3, step = ?4, epoch = ?5, label = ?6, pruned = 0 WHERE job_id = ?1 AND path = ?2",
        params![job_id, path, kind, step as i64, epoch as i64, label],
    )?;
    if updated == 0 {
        exec(tx, 
            "INSERT INTO artifacts (job_id, kind, path, step, epoch, label) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![job_id, kind, path, step as i64, epoch as i64, label],
        )?;
    }
    Ok(())
}

/// Keeps the job row's progress columns and artifact list in step with an event.
fn apply(tx: &Transaction, job_id: i64, event: &TrainEvent) -> rusqlite::Result<()> {
    match event {
        TrainEvent::Started { total_steps, total_epochs, start_step, .. } => {
            exec(tx, 
                "UPDATE jobs SET total_steps = ?2, total_epochs = ?3, step = ?4 WHERE id = ?1",
                params![job_id, *total_steps as i64, *total_epochs as i64, *start_step as i64],
            )?;
        }
        TrainEvent::Step { step, total_steps, epoch, avg_loss, it_per_sec, eta_secs, .. } => {
            exec(tx, 
                "UPDATE jobs SET step = ?2, total_steps = ?3, epoch = ?4, loss = ?5, it_per_sec = ?6, eta_secs = ?7 WHERE id = ?1",
                params![job_id, *step as i64, *total_steps as i64, *epoch as i64, finite(*avg_loss), finite(*it_per_sec), finite(*eta_secs)],
            )?;
        }
        TrainEvent::Epoch { epoch, total_epochs, .. } => {
            exec(tx, "UPDATE jobs SET epoch = ?2, total_epochs = ?3 WHERE id = ?1", params![job_id, *epoch as i64, *total_epochs as i64])?;
        }
        TrainEvent::Checkpoint { step, epoch, checkpoint, path } => {
            upsert_artifact(tx, job_id, checkpoint_kind(*checkpoint), &path.to_string_lossy(), *step, *epoch, "")?;
        }
        TrainEvent::Sample { step, epoch, prompt, path, .. } => {
            upsert_artifact(tx, job_id, "sample", &path.to_string_lossy(), *step, *epoch, prompt)?;
        }
        TrainEvent::Pruned { path } => {
            exec(tx, "UPDATE artifacts SET pruned = 1 WHERE job_id = ?1 AND path = ?2", params![job_id, path.to_string_lossy()])?;
        }
        TrainEvent::Validation { .. } | TrainEvent::Log { .. } | TrainEvent::Finished { .. } | TrainEvent::Failed { .. } => {}
    }
    Ok(())
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// Stores a worker's events (in one transaction), updates progress and artifacts, and renews the
/// lease. Nothing is written when the worker no longer owns the job.
pub fn record(conn: &mut Connection, job_id: i64, lease: &str, events: &[PostedEvent], lease_ms: i64) -> rusqlite::Result<Control> {
    let tx = immediate(conn)?;
    let Some(cancel) = ownership(&tx, job_id, lease)? else {
        return Ok(Control::Lost);
    };
    for e in events {
        let payload = serde_json::to_string(&e.event).expect("events serialize");
        let inserted = exec(&tx, 
            "INSERT OR IGNORE INTO job_events (job_id, kind, payload, lease, seq) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![job_id, event_kind(&e.event), payload, lease, e.seq],
        )?;
        if inserted == 1 {
            apply(&tx, job_id, &e.event)?;
        }
    }
    exec(&tx, "UPDATE jobs SET lease_expires_ms = ?2 WHERE id = ?1", params![job_id, now_ms() + lease_ms])?;
    tx.commit()?;
    Ok(if cancel { Control::Cancel } else { Control::Continue })
}

/// Ends a claim. Returns the job's new state, or `None` when `lease` no longer owns the job
/// (nothing is written then).
pub fn finish(conn: &mut Connection, job_id: i64, lease: &str, end: &RunEnd) -> rusqlite::Result<Option<JobState>> {
    let tx = immediate(conn)?;
    let row: Option<(bool, i64, i64, i64)> = qrow(
        &tx,
        "SELECT cancel_requested, attempts, max_attempts, step FROM jobs WHERE id = ?1 AND state = 'running' AND lease = ?2",
        params![job_id, lease],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )
    .optional()?;
    // Only the lease holder may end the run.
    let Some((cancel_requested, attempts, max_attempts, step)) = row else {
        return Ok(None);
    };
    let (state, error, message) = match end {
        RunEnd::Done { cancelled: true, final_step, .. } => {
            (JobState::Cancelled, String::new(), format!("cancelled at step {final_step}; the files saved so far are kept"))
        }
        RunEnd::Done { network_file, final_step, .. } => {
            if let Some(path) = network_file {
                let epoch: i64 = qrow(&tx, "SELECT epoch FROM jobs WHERE id = ?1", params![job_id], |r| r.get(0))?;
                let known: bool = qrow(&tx, 
                    "SELECT EXISTS(SELECT 1 FROM artifacts WHERE job_id = ?1 AND path = ?2)",
                    params![job_id, path],
                    |r| r.get(0),
                )?;
                if !known {
                    upsert_artifact(&tx, job_id, "final", path, *final_step, epoch as u64, "")?;
                }
            }
            (JobState::Succeeded, String::new(), format!("finished at step {final_step}"))
        }
        RunEnd::Failed { .. } if cancel_requested => (JobState::Cancelled, String::new(), format!("cancelled at step {step}")),
        RunEnd::Failed { error, permanent } if *permanent || attempts >= max_attempts => {
            (JobState::Failed, error.clone(), format!("failed (attempt {attempts} of {max_attempts}): {error}"))
        }
        RunEnd::Failed { error, .. } => (
            JobState::Queued,
            error.clone(),
            format!("attempt {attempts} of {max_attempts} failed: {error}; it will be tried again from its last checkpoint"),
        ),
        RunEnd::Released { reason } => (JobState::Queued, String::new(), format!("{reason}; the job will resume from its last checkpoint")),
    };
    // A release is not the job's fault: it does not use up an attempt.
    let refund = matches!(end, RunEnd::Released { .. }) as i64;
    exec(&tx, 
        &format!(
            "UPDATE jobs SET state = ?2, error = ?3, lease = NULL, lease_expires_ms = NULL, attempts = attempts - ?4,
             finished_at = CASE WHEN ?5 THEN {NOW} ELSE NULL END WHERE id = ?1"
        ),
        params![job_id, state.as_str(), error, refund, state.is_terminal()],
    )?;
    state_event(&tx, job_id, state, &message, json!({ "attempt": attempts, "max_attempts": max_attempts, "error": error }))?;
    tx.commit()?;
    Ok(Some(state))
}

/// What a cancel did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// A queued job: cancelled at once.
    Now,
    /// A running job: its worker stops after the current step.
    Requested,
}

pub fn cancel(conn: &mut Connection, job_id: i64) -> Result<Cancelled, JobError> {
    let tx = immediate(conn)?;
    let state = job_state(&tx, job_id)?;
    let outcome = match state {
        JobState::Queued => {
            exec(&tx, &format!("UPDATE jobs SET state = 'cancelled', finished_at = {NOW} WHERE id = ?1"), params![job_id])?;
            state_event(&tx, job_id, JobState::Cancelled, "cancelled before it started", json!({}))?;
            Cancelled::Now
        }
        JobState::Running => {
            exec(&tx, "UPDATE jobs SET cancel_requested = 1 WHERE id = ?1", params![job_id])?;
            queue_event(
                &tx,
                job_id,
                "log",
                json!({ "level": "info", "message": "Cancel requested: the job stops after the current step and keeps the files saved so far." }),
            )?;
            Cancelled::Requested
        }
        s => return Err(JobError::Conflict(format!("job {job_id} is already {}", s.as_str()))),
    };
    tx.commit()?;
    Ok(outcome)
}

fn job_state(tx: &Transaction, job_id: i64) -> Result<JobState, JobError> {
    qrow(tx, "SELECT state FROM jobs WHERE id = ?1", params![job_id], |r| r.get::<_, String>(0))
        .optional()?
        .map(|s| JobState::parse(&s))
        .ok_or(JobError::NotFound(job_id))
}

/// Puts a failed or cancelled job back at the end of the queue with fresh attempts. It resumes
/// from its newest saved state, if it has one.
pub fn retry(conn: &mut Connection, job_id: i64) -> Result<(), JobError> {
    let tx = immediate(conn)?;
    match job_state(&tx, job_id)? {
        JobState::Failed | JobState::Cancelled => {}
        s => return Err(JobError::Conflict(format!("only failed or cancelled jobs can be retried; job {job_id} is {}", s.as_str()))),
    }
    exec(&tx, 
        "UPDATE jobs SET state = 'queued', attempts = 0, error = '', cancel_requested = 0, finished_at = NULL,
         seq = (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs) WHERE id = ?1",
        params![job_id],
    )?;
    state_event(&tx, job_id, JobState::Queued, "queued again (retry)", json!({}))?;
    tx.commit()?;
    Ok(())
}

/// Deletes a job that is not running, with its events and artifact rows; returns the artifact
/// rows so the caller can remove the files.
pub fn delete(conn: &mut Connection, job_id: i64) -> Result<Vec<Artifact>, JobError> {
    let tx = immediate(conn)?;
    if job_state(&tx, job_id)? == JobState::Running {
        return Err(JobError::Conflict(format!("job {job_id} is running: cancel it first, then delete it")));
    }
    let artifacts = artifacts_in(&tx, job_id)?;
    exec(&tx, "DELETE FROM jobs WHERE id = ?1", params![job_id])?;
    tx.commit()?;
    Ok(artifacts)
}

pub fn set_priority(conn: &mut Connection, job_id: i64, priority: i64) -> Result<(), JobError> {
    let n = exec(conn, "UPDATE jobs SET priority = ?2 WHERE id = ?1", params![job_id, priority])?;
    if n == 0 {
        return Err(JobError::NotFound(job_id));
    }
    Ok(())
}

/// Moves a queued job within the queue. Crossing into another priority class adopts that
/// class's priority, so the order shown is the order claimed.
pub fn move_job(conn: &mut Connection, job_id: i64, to: Move) -> Result<(), JobError> {
    let tx = immediate(conn)?;
    let state = job_state(&tx, job_id)?;
    if state != JobState::Queued {
        return Err(JobError::Conflict(format!("only queued jobs can be moved; job {job_id} is {}", state.as_str())));
    }
    let order: Vec<(i64, i64, i64)> = {
        let mut stmt = tx.prepare_cached("SELECT id, priority, seq FROM jobs WHERE state = 'queued' ORDER BY priority DESC, seq")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let from = order.iter().position(|(id, _, _)| *id == job_id).expect("a queued job is in the queue");
    let last = order.len() - 1;
    let to_index = match to {
        Move::Top => 0,
        Move::Up => from.saturating_sub(1),
        Move::Down => (from + 1).min(last),
        Move::Bottom => last,
    };
    if to_index == from {
        return Ok(());
    }
    let mut seqs: Vec<i64> = order.iter().map(|(_, _, s)| *s).collect();
    seqs.sort_unstable();
    let mut ids: Vec<(i64, i64)> = order.iter().map(|(id, p, _)| (*id, *p)).collect();
    let moved = ids.remove(from);
    ids.insert(to_index, moved);
    // Moving up takes the priority of the job it now stands before; moving down, of the one after.
    let priority = if to_index < from { ids[to_index + 1].1 } else { ids[to_index - 1].1 };
    ids[to_index].1 = priority;
    for ((id, priority), seq) in ids.iter().zip(seqs) {
        exec(&tx, "UPDATE jobs SET priority = ?2, seq = ?3 WHERE id = ?1", params![id, priority, seq])?;
    }
    tx.commit()?;
    Ok(())
}

const SUMMARY_COLUMNS: &str = "id, name, state, priority, attempts, max_attempts, step, total_steps, epoch, total_epochs,
    loss, it_per_sec, eta_secs, error, cancel_requested, worker, created_at, started_at, finished_at, seq";

fn summary(r: &Row) -> rusqlite::Result<JobSummary> {
    let state = JobState::parse(&r.get::<_, String>(2)?);
    let step = r.get::<_, i64>(6)?.max(0) as u64;
    let total_steps = r.get::<_, i64>(7)?.max(0) as u64;
    let error: String = r.get(13)?;
    let worker: String = r.get(15)?;
    let progress = match state {
        JobState::Succeeded => 1.0,
        _ if total_steps > 0 => (step as f64 / total_steps as f64).clamp(0.0, 1.0),
        _ => 0.0,
    };
    Ok(JobSummary {
        id: r.get(0)?,
        name: r.get(1)?,
        state,
        position: None,
        priority: r.get(3)?,
        attempts: r.get(4)?,
        max_attempts: r.get(5)?,
        step,
        total_steps,
        epoch: r.get::<_, i64>(8)?.max(0) as u64,
        total_epochs: r.get::<_, i64>(9)?.max(0) as u64,
        progress,
        loss: r.get(10)?,
        it_per_sec: if state == JobState::Running { r.get(11)? } else { None },
        eta_secs: if state == JobState::Running { r.get(12)? } else { None },
        error: (!error.is_empty()).then_some(error),
        cancel_requested: r.get(14)?,
        worker: (!worker.is_empty()).then_some(worker),
        created_at: r.get(16)?,
        started_at: r.get(17)?,
        finished_at: r.get(18)?,
    })
}

/// Every job: running first, then the queue in claim order (with positions), then finished jobs,
/// newest first.
pub fn list(conn: &Connection) -> rusqlite::Result<Vec<JobSummary>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {SUMMARY_COLUMNS} FROM jobs ORDER BY
           CASE state WHEN 'running' THEN 0 WHEN 'queued' THEN 1 ELSE 2 END,
           CASE WHEN state = 'queued' THEN -priority ELSE 0 END,
           CASE WHEN state = 'queued' THEN seq ELSE 0 END,
           id DESC"
    ))?;
    let mut jobs: Vec<JobSummary> = stmt.query_map([], summary)?.collect::<rusqlite::Result<_>>()?;
    let mut position = 0;
    for j in jobs.iter_mut().filter(|j| j.state == JobState::Queued) {
        position += 1;
        j.position = Some(position);
    }
    Ok(jobs)
}

pub fn get(conn: &Connection, job_id: i64) -> Result<JobSummary, JobError> {
    let row = conn
        .query_row(&format!("SELECT {SUMMARY_COLUMNS} FROM jobs WHERE id = ?1"), params![job_id], |r| {
            Ok((summary(r)?, r.get::<_, i64>(19)?))
        })
        .optional()?;
    let Some((mut job, seq)) = row else {
        return Err(JobError::NotFound(job_id));
    };
    if job.state == JobState::Queued {
        let ahead: i64 = qrow(conn, 
            "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND (priority > ?1 OR (priority = ?1 AND seq < ?2))",
            params![job.priority, seq],
            |r| r.get(0),
        )?;
        job.position = Some(ahead as u64 + 1);
    }
    Ok(job)
}

/// The snapshotted configuration of a job.
pub fn config(conn: &Connection, job_id: i64) -> Result<Config, JobError> {
    let text: Option<String> = qrow(conn, "SELECT config FROM jobs WHERE id = ?1", params![job_id], |r| r.get(0)).optional()?;
    let text = text.ok_or(JobError::NotFound(job_id))?;
    Ok(serde_json::from_str(&text).unwrap_or_default())
}

/// Whether `lease` is the current lease of running job `job_id`.
pub fn owns(conn: &Connection, job_id: i64, lease: &str) -> rusqlite::Result<bool> {
    qrow(conn, 
        "SELECT EXISTS(SELECT 1 FROM jobs WHERE id = ?1 AND state = 'running' AND lease = ?2)",
        params![job_id, lease],
        |r| r.get(0),
    )
}

/// Events after id `after` (of one job, or of all jobs), oldest first.
pub fn events_after(conn: &Connection, job_id: Option<i64>, after: i64, limit: i64) -> rusqlite::Result<Vec<EventRow>> {
    let map = |r: &Row| Ok(EventRow { id: r.get(0)?, job_id: r.get(1)?, kind: r.get(2)?, payload: r.get(3)?, time: r.get(4)? });
    match job_id {
        Some(job) => {
            let mut stmt = conn.prepare_cached(
                "SELECT id, job_id, kind, payload, time FROM job_events WHERE job_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![job, after, limit], map)?;
            rows.collect()
        }
        None => {
            let mut stmt = conn.prepare_cached("SELECT id, job_id, kind, payload, time FROM job_events WHERE id > ?1 ORDER BY id LIMIT ?2")?;
            let rows = stmt.query_map(params![after, limit], map)?;
            rows.collect()
        }
    }
}

/// The newest event id (0 when there is none).
pub fn last_event_id(conn: &Connection) -> rusqlite::Result<i64> {
    qrow(conn, "SELECT COALESCE(MAX(id), 0) FROM job_events", [], |r| r.get(0))
}

fn artifact_row(r: &Row) -> rusqlite::Result<Artifact> {
    Ok(Artifact {
        id: r.get(0)?,
        job_id: r.get(1)?,
        kind: r.get(2)?,
        path: r.get(3)?,
        step: r.get::<_, i64>(4)?.max(0) as u64,
        epoch: r.get::<_, i64>(5)?.max(0) as u64,
        label: r.get(6)?,
        pruned: r.get(7)?,
        kept: r.get(8)?,
    })
}

const ARTIFACT_COLUMNS: &str = "id, job_id, kind, path, step, epoch, label, pruned, kept";

fn artifacts_in(conn: &Connection, job_id: i64) -> rusqlite::Result<Vec<Artifact>> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE job_id = ?1 ORDER BY id"))?;
    let rows = stmt.query_map(params![job_id], artifact_row)?;
    rows.collect()
}

pub fn artifacts(conn: &Connection, job_id: i64) -> rusqlite::Result<Vec<Artifact>> {
    artifacts_in(conn, job_id)
}

pub fn artifact(conn: &Connection, job_id: i64, artifact_id: i64) -> Result<Artifact, JobError> {
    qrow(conn, 
        &format!("SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE id = ?1 AND job_id = ?2"),
        params![artifact_id, job_id],
        artifact_row,
    )
    .optional()?
    .ok_or_else(|| JobError::Missing(format!("job {job_id} has no file {artifact_id}")))
}

/// Records a file made from a job's file after the run (a converted LoRA), returning its row.
pub fn add_artifact(conn: &mut Connection, job_id: i64, kind: &str, path: &str, step: u64, epoch: u64, label: &str) -> Result<Artifact, JobError> {
    let tx = immediate(conn)?;
    upsert_artifact(&tx, job_id, kind, path, step, epoch, label)?;
    let row = qrow(&tx, &format!("SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE job_id = ?1 AND path = ?2"), params![job_id, path], artifact_row)?;
    tx.commit()?;
    Ok(row)
}

pub fn set_kept(conn: &Connection, artifact_id: i64, kept: &str) -> rusqlite::Result<()> {
    exec(conn, "UPDATE artifacts SET kept = ?2 WHERE id = ?1", params![artifact_id, kept])?;
    Ok(())
}
