//! The job queue, with real SQLite files and real processes: queue semantics (leases, attempts,
//! cancel, retry, delete, reorder, validation), kill -9 of a detached worker and of the server,
//! 50 jobs from 10 clients on 2 workers, SSE resume with Last-Event-ID, the worker token, and a
//! trainer-only worker against a hub.
//!
//! Most tests run jobs with `--simulate` (a quick stand-in training loop with checkpoints and
//! resume, injected through the same `JobRunner` trait as the engine), so they test the queue,
//! not the engine. `killed_worker_resumes_the_real_engine` runs the real engine on the tiny demo.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use loft::jobs::queue::{self, Control, Move, PostedEvent, RunEnd};
use loft::jobs::runner::{JobRunner, JobSpec};
use loft::jobs::worker::{run_worker, LocalQueue};
use loft::jobs::{JobSource, JobState, Jobs};
use loft_worker::train::{CancelToken, EventSink, TrainEvent, TrainOutcome};
use serde_json::{json, Value};

const TOKEN: &str = "test-worker-token-0123456789";

// ---------------------------------------------------------------- helpers

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
impl Proc {
    /// kill -9 (SIGKILL): no chance to clean up.
    fn kill9(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn loft(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_loft"));
    c.args(args).stdout(Stdio::null()).stderr(if std::env::var("LOFT_TEST_LOGS").is_ok() { Stdio::inherit() } else { Stdio::null() });
    c
}

struct Server {
    proc: Option<Proc>,
    url: String,
}

impl Server {
    async fn start(data: &Path, extra: &[&str]) -> Server {
        let port = free_port();
        let mut args = vec!["serve", "--port"];
        let port_s = port.to_string();
        args.push(&port_s);
        args.push("--data-dir");
        let data_s = data.to_string_lossy().into_owned();
        args.push(&data_s);
        args.extend(["--worker-token", TOKEN]);
        args.extend(extra);
        let proc = Proc(loft(&args).spawn().expect("start loft serve"));
        let url = format!("http://127.0.0.1:{port}");
        wait_http(&format!("{url}/healthz")).await;
        Server { proc: Some(proc), url }
    }

    fn kill9(&mut self) {
        self.proc.take().unwrap().kill9();
    }
}

fn worker(data: &Path, extra: &[&str]) -> Proc {
    let mut args = vec!["worker", "--data-dir"];
    let data_s = data.to_string_lossy().into_owned();
    args.push(&data_s);
    args.extend(extra);
    Proc(loft(&args).spawn().expect("start loft worker"))
}

async fn wait_http(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if reqwest::get(url).await.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} did not come up");
}

/// A dataset folder with one small picture (the simulated runner does not read it, but enqueue
/// checks that it holds a usable image).
fn dataset(dir: &Path) -> PathBuf {
    let d = dir.join("dataset");
    std::fs::create_dir_all(d.join("5_thing")).unwrap();
    std::fs::write(d.join("5_thing/a.txt"), "a thing").unwrap();
    image::RgbImage::from_pixel(32, 32, image::Rgb([200, 80, 40])).save(d.join("5_thing/a.png")).unwrap();
    d
}

fn job_config(dataset: &Path, name: &str) -> Value {
    json!({
        "pretrained_model_name_or_path": "/models/any",
        "train_data_dir": dataset,
        "output_name": name,
    })
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    let res = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn get_json(url: &str) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

async fn enqueue(server: &Server, config: Value, name: &str) -> i64 {
    let (status, body) = post(&format!("{}/api/jobs", server.url), json!({ "name": name, "config": config })).await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_i64().unwrap()
}

/// Polls a job until `done` holds (or panics after `secs`).
async fn wait_job(server: &Server, id: i64, secs: u64, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let job = get_json(&format!("{}/api/jobs/{id}", server.url)).await;
        if done(&job) {
            return job;
        }
        assert!(Instant::now() < deadline, "timed out waiting for job {id}: {what}; last seen {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn db(data: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(data.join("loft.db")).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c
}

/// (id, kind, payload) of a job's events, in id order.
fn db_events(data: &Path, job: i64) -> Vec<(i64, String, Value)> {
    let c = db(data);
    let mut stmt = c.prepare("SELECT id, kind, payload FROM job_events WHERE job_id = ?1 ORDER BY id").unwrap();
    let rows = stmt
        .query_map([job], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))
        .unwrap()
        .map(|r| {
            let (id, kind, payload) = r.unwrap();
            (id, kind, serde_json::from_str(&payload).unwrap())
        })
        .collect();
    rows
}

/// A minimal SSE client: reads `id`/`event`/`data` blocks from a streaming response.
struct Sse {
    res: reqwest::Response,
    buf: String,
}

#[derive(Debug, Clone)]
struct SseEvent {
    id: i64,
    event: String,
    data: String,
}

impl Sse {
    async fn connect(url: &str, last_event_id: Option<i64>) -> Sse {
        let mut req = reqwest::Client::new().get(url);
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 200);
        Sse { res, buf: String::new() }
    }

    async fn next(&mut self) -> SseEvent {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut e = SseEvent { id: -1, event: String::new(), data: String::new() };
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        e.id = v.trim().parse().unwrap();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        e.event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        e.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if e.id >= 0 {
                    return e;
                }
                continue; // a keep-alive comment
            }
            let chunk = tokio::time::timeout(Duration::from_secs(60), self.res.chunk()).await.expect("an SSE event within 60 s").unwrap().expect("the stream stays open");
            self.buf.push_str(&String::from_utf8_lossy(&chunk).replace("\r\n", "\n"));
        }
    }
}

fn is_end(e: &SseEvent, state: &str) -> bool {
    e.event == "state" && serde_json::from_str::<Value>(&e.data).is_ok_and(|v| v["state"] == state)
}

// ---------------------------------------------------------------- queue semantics, in-process

fn jobs_in(dir: &Path) -> Jobs {
    let state = loft::server::open_state(dir, None).unwrap();
    state.jobs
}

fn cfg(v: Value) -> serde_json::Map<String, Value> {
    v.as_object().unwrap().clone()
}

#[test]
fn enqueue_validates_and_names_the_field_writing_nothing_when_bad() {
    let tmp = tempfile::tempdir().unwrap();
    let jobs = jobs_in(&tmp.path().join("data"));
    let ds = dataset(tmp.path());
    let bad = [
        (json!({"pretrained_model_name_or_path": "/m", "train_data_dir": ds, "network_dim": 0}), "network_dim"),
        (json!({"pretrained_model_name_or_path": "/m", "train_data_dir": ds, "no_such_option": 1}), "no_such_option"),
        (json!({"pretrained_model_name_or_path": "/m", "train_data_dir": tmp.path().join("missing")}), "train_data_dir"),
        (json!({"train_data_dir": ds}), "pretrained_model_name_or_path"),
        (json!({"pretrained_model_name_or_path": "/m", "train_data_dir": ds, "masked_loss": true}), "masked_loss"),
    ];
    for (config, field) in bad {
        let err = jobs.enqueue(Some("x"), JobSource::Config(&cfg(config.clone())), 0).unwrap_err();
        match err {
            queue::JobError::Invalid(errors) => assert!(errors.iter().any(|e| e.field == field), "{config}: {errors:?}"),
            other => panic!("{config}: {other}"),
        }
    }
    let err = jobs.enqueue(Some("x"), JobSource::Preset("nope"), 0).unwrap_err();
    assert!(matches!(&err, queue::JobError::Invalid(e) if e[0].field == "preset"), "{err}");
    assert!(jobs.list().unwrap().is_empty(), "nothing was queued");

    // A good one is snapshotted resolved, with absolute paths, named after output_name by default.
    let id = jobs.enqueue(None, JobSource::Config(&cfg(json!({"pretrained_model_name_or_path": "rel/model", "train_data_dir": ds, "output_name": "mine"}))), 0).unwrap();
    let job = jobs.get(id).unwrap();
    assert_eq!((job.name.as_str(), job.state, job.position), ("mine", JobState::Queued, Some(1)));
    let config = jobs.config(id).unwrap();
    assert!(config.len() > 100, "the resolved configuration, every key");
    assert!(Path::new(config["pretrained_model_name_or_path"].as_str().unwrap()).is_absolute());
}

#[test]
fn a_preset_is_snapshotted_at_enqueue() {
    let tmp = tempfile::tempdir().unwrap();
    let state = loft::server::open_state(&tmp.path().join("data"), None).unwrap();
    let ds = dataset(tmp.path());
    let presets = loft::presets::Presets { db: &state.db, registry: &state.registry };
    presets.create("p", &cfg(json!({"pretrained_model_name_or_path": "/m", "train_data_dir": ds, "network_dim": 16})), "").unwrap();
    let id = state.jobs.enqueue(Some("from preset"), JobSource::Preset("p"), 0).unwrap();
    presets.put("p", &cfg(json!({"pretrained_model_name_or_path": "/m", "train_data_dir": ds, "network_dim": 32}))).unwrap();
    assert_eq!(state.jobs.config(id).unwrap()["network_dim"], json!(16), "editing the preset later does not change the job");
}

#[test]
fn order_priority_and_moves() {
    let tmp = tempfile::tempdir().unwrap();
    let jobs = jobs_in(&tmp.path().join("data"));
    let ds = dataset(tmp.path());
    let ids: Vec<i64> = (0..4).map(|i| jobs.enqueue(Some(&format!("j{i}")), JobSource::Config(&cfg(job_config(&ds, "x"))), 0).unwrap()).collect();
    let order = |jobs: &Jobs| jobs.list().unwrap().iter().filter(|j| j.state == JobState::Queued).map(|j| j.id).collect::<Vec<_>>();
    assert_eq!(order(&jobs), ids);
    jobs.set_priority(ids[2], 5).unwrap();
    assert_eq!(order(&jobs), [ids[2], ids[0], ids[1], ids[3]]);
    jobs.move_job(ids[3], Move::Top).unwrap();
    assert_eq!(order(&jobs), [ids[3], ids[2], ids[0], ids[1]]);
    jobs.move_job(ids[3], Move::Down).unwrap();
    assert_eq!(order(&jobs), [ids[2], ids[3], ids[0], ids[1]]);
    jobs.move_job(ids[2], Move::Bottom).unwrap();
    assert_eq!(order(&jobs), [ids[3], ids[0], ids[1], ids[2]]);
    assert_eq!(jobs.get(ids[2]).unwrap().position, Some(4));
    // Claims follow the order shown.
    let claimed: Vec<i64> = (0..4).map(|_| jobs.claim("w", Duration::from_secs(60)).unwrap().unwrap().job_id).collect();
    assert_eq!(claimed, [ids[3], ids[0], ids[1], ids[2]]);
    assert!(jobs.claim("w", Duration::from_secs(60)).unwrap().is_none());
    assert!(matches!(jobs.move_job(ids[0], Move::Up), Err(queue::JobError::Conflict(_))), "only queued jobs move");
}

fn step(n: u64) -> TrainEvent {
    TrainEvent::Step { step: n, total_steps: 10, epoch: 1, loss: 0.1, avg_loss: 0.1, lr: 1e-4, lrs: vec![], it_per_sec: 1.0, eta_secs: 1.0 }
}

#[test]
fn an_expired_lease_makes_the_job_claimable_and_the_old_worker_is_locked_out() {
    let tmp = tempfile::tempdir().unwrap();
    let jobs = jobs_in(&tmp.path().join("data"));
    let ds = dataset(tmp.path());
    let id = jobs.enqueue(Some("x"), JobSource::Config(&cfg(job_config(&ds, "x"))), 0).unwrap();
    let first = jobs.claim("a", Duration::from_millis(50)).unwrap().unwrap();
    assert!(!first.resume && first.attempt == 1);
    assert!(jobs.claim("b", Duration::from_millis(50)).unwrap().is_none(), "a live lease is not claimable");
    assert_eq!(jobs.record(id, &first.lease, &[PostedEvent { seq: 1, event: step(1) }], Duration::from_millis(50)).unwrap(), Control::Continue);
    std::thread::sleep(Duration::from_millis(120));
    let second = jobs.claim("b", Duration::from_secs(60)).unwrap().unwrap();
    assert_eq!((second.job_id, second.attempt, second.resume), (id, 2, true), "resumes from its checkpoint");
    let before = jobs.events_after(Some(id), 0, 1000).unwrap().len();
    assert_eq!(jobs.record(id, &first.lease, &[PostedEvent { seq: 2, event: step(2) }], Duration::from_secs(1)).unwrap(), Control::Lost);
    assert_eq!(jobs.renew(id, &first.lease, Duration::from_secs(1)).unwrap(), Control::Lost);
    let end = RunEnd::Done { final_step: 2, network_file: None, cancelled: false };
    assert_eq!(jobs.finish(id, &first.lease, &end).unwrap(), None, "the old worker cannot end the job");
    assert_eq!(jobs.events_after(Some(id), 0, 1000).unwrap().len(), before, "nothing written by the old worker");
    // The same post twice (a retried HTTP call) is stored once.
    let e = [PostedEvent { seq: 1, event: step(3) }];
    jobs.record(id, &second.lease, &e, Duration::from_secs(60)).unwrap();
    jobs.record(id, &second.lease, &e, Duration::from_secs(60)).unwrap();
    assert_eq!(jobs.events_after(Some(id), 0, 1000).unwrap().len(), before + 1);
    assert_eq!(jobs.get(id).unwrap().step, 3);
}

#[test]
fn attempts_run_out_then_the_job_fails_with_its_error() {
    let tmp = tempfile::tempdir().unwrap();
    let jobs = jobs_in(&tmp.path().join("data"));
    let ds = dataset(tmp.path());
    let id = jobs.enqueue(Some("x"), JobSource::Config(&cfg(job_config(&ds, "x"))), 0).unwrap();
    for attempt in 1..=3 {
        let c = jobs.claim("w", Duration::from_secs(60)).unwrap().expect("claimable again");
        assert_eq!(c.attempt, attempt);
        let state = jobs.finish(id, &c.lease, &RunEnd::Failed { error: format!("boom {attempt}"), permanent: false }).unwrap();
        assert_eq!(state, Some(if attempt < 3 { JobState::Queued } else { JobState::Failed }));
    }
    let job = jobs.get(id).unwrap();
    assert_eq!((job.state, job.error.as_deref()), (JobState::Failed, Some("boom 3")));
    // A permanent error (an invalid configuration) fails at once; retry starts over with fresh attempts.
    jobs.retry(id).unwrap();
    let c = jobs.claim("w", Duration::from_secs(60)).unwrap().unwrap();
    assert_eq!((c.attempt, c.resume), (1, true));
    assert_eq!(jobs.finish(id, &c.lease, &RunEnd::Failed { error: "bad config".into(), permanent: true }).unwrap(), Some(JobState::Failed));
    // A worker shutting down gives the job back without using an attempt.
    jobs.retry(id).unwrap();
    let c = jobs.claim("w", Duration::from_secs(60)).unwrap().unwrap();
    assert_eq!(jobs.finish(id, &c.lease, &RunEnd::Released { reason: "worker stopped".into() }).unwrap(), Some(JobState::Queued));
    assert_eq!(jobs.get(id).unwrap().attempts, 0);
}

#[test]
fn cancel_delete_and_keep() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let jobs = jobs_in(&data);
    let ds = dataset(tmp.path());
    let queued = jobs.enqueue(Some("q"), JobSource::Config(&cfg(job_config(&ds, "x"))), 0).unwrap();
    let running = jobs.enqueue(Some("r"), JobSource::Config(&cfg(job_config(&ds, "x"))), 5).unwrap();
    let c = jobs.claim("w", Duration::from_secs(60)).unwrap().unwrap();
    assert_eq!(c.job_id, running);
    assert_eq!(jobs.cancel(queued).unwrap(), queue::Cancelled::Now);
    assert_eq!(jobs.get(queued).unwrap().state, JobState::Cancelled);
    assert_eq!(jobs.cancel(running).unwrap(), queue::Cancelled::Requested);
    assert_eq!(jobs.record(running, &c.lease, &[PostedEvent { seq: 1, event: step(1) }], Duration::from_secs(60)).unwrap(), Control::Cancel);
    assert!(matches!(jobs.delete(running), Err(queue::JobError::Conflict(_))), "refused while running");
    // The run saved an epoch file in the job's folder, then stopped.
    let dir = jobs.job_dir(running);
    std::fs::create_dir_all(&dir).unwrap();
    let epoch_file = dir.join("x-000001.safetensors");
    std::fs::write(&epoch_file, b"weights").unwrap();
    let saved = TrainEvent::Checkpoint { step: 1, epoch: 1, checkpoint: loft_worker::train::CheckpointKind::Epoch, path: epoch_file.clone() };
    jobs.record(running, &c.lease, &[PostedEvent { seq: 2, event: saved }], Duration::from_secs(60)).unwrap();
    jobs.finish(running, &c.lease, &RunEnd::Done { final_step: 1, network_file: None, cancelled: true }).unwrap();
    assert_eq!(jobs.get(running).unwrap().state, JobState::Cancelled);
    assert!(epoch_file.exists(), "a cancelled job keeps its saved epochs");
    let artifact = jobs.artifacts(running).unwrap().into_iter().find(|a| a.kind == "epoch").unwrap();
    let kept = jobs.keep(running, artifact.id).unwrap();
    assert!(kept.starts_with(data.join("kept")) && kept.is_file());
    jobs.delete(running).unwrap();
    assert!(!dir.exists() && !epoch_file.exists(), "the job's files are gone");
    assert!(kept.is_file(), "the kept copy stays");
    assert!(matches!(jobs.get(running), Err(queue::JobError::NotFound(_))));
    assert!(jobs.events_after(Some(running), 0, 100).unwrap().is_empty(), "its events went with it");
}

/// A stand-in runner that counts how often each job runs (injected through the `JobRunner` trait).
struct Counting(Arc<Mutex<std::collections::HashMap<i64, usize>>>, Arc<AtomicUsize>);

impl JobRunner for Counting {
    fn run(&self, job: &JobSpec, sink: &mut dyn EventSink, _cancel: &CancelToken) -> anyhow::Result<TrainOutcome> {
        *self.0.lock().unwrap().entry(job.id).or_default() += 1;
        sink.emit(TrainEvent::Started { total_steps: 1, total_epochs: 1, start_step: 0, steps_per_epoch: 1, images: 1 });
        std::thread::sleep(Duration::from_millis(2));
        sink.emit(step(1));
        self.1.fetch_add(1, Ordering::SeqCst);
        Ok(TrainOutcome { final_step: 1, network_file: None, cancelled: false })
    }
}

/// Two workers, each on its own connection to the same file (as two processes would be), racing
/// for jobs enqueued from several threads: every job runs exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn injected_runner_two_connections_each_job_runs_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ds = dataset(tmp.path());
    let jobs = jobs_in(&data);
    let counts = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for w in 0..2 {
        let own = jobs_in(&data); // a second connection to the same SQLite file
        own.watch_other_processes().unwrap();
        let runner: Arc<dyn JobRunner> = Arc::new(Counting(counts.clone(), done.clone()));
        workers.push(tokio::spawn(run_worker(Arc::new(LocalQueue { jobs: own, lease: Duration::from_secs(30) }), runner, format!("w{w}"), stopped.clone())));
    }
    let mut clients = Vec::new();
    for c in 0..5 {
        let jobs = jobs.clone();
        let config = cfg(job_config(&ds, "x"));
        clients.push(std::thread::spawn(move || (0..8).map(|i| jobs.enqueue(Some(&format!("c{c}-{i}")), JobSource::Config(&config), 0).unwrap()).collect::<Vec<_>>()));
    }
    let ids: Vec<i64> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while jobs.list().unwrap().iter().any(|j| j.state != JobState::Succeeded) {
        assert!(Instant::now() < deadline, "not all jobs finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    for w in workers {
        w.await.unwrap();
    }
    let counts = counts.lock().unwrap();
    assert_eq!(counts.len(), 40);
    for id in ids {
        assert_eq!(counts.get(&id), Some(&1), "job {id} ran {:?} times", counts.get(&id));
    }
}

// ---------------------------------------------------------------- real processes

/// kill -9 a detached worker mid-job; a restarted worker finishes it from its checkpoint. The
/// final file exists and the event ids (over SSE, from the start) are exactly the stored rows,
/// in order, none repeated or missing.
async fn kill_worker_mid_job_and_resume(worker_args: &[&str], config: Option<Value>, kill_at_step: u64, secs: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ds = dataset(tmp.path());
    let server = Server::start(&data, &["--no-worker", "--lease-secs", "2"]).await;
    let id = match config {
        Some(c) => enqueue(&server, c, "resumable").await,
        None => {
            let (status, body) = post(&format!("{}/api/demo", server.url), json!({})).await;
            assert_eq!(status, 201, "{body}");
            body["id"].as_i64().unwrap()
        }
    };
    let _ = ds;
    let first = worker(&data, worker_args);
    wait_job(&server, id, secs, "running past its first checkpoint", |j| j["step"].as_u64().unwrap_or(0) >= kill_at_step).await;
    let at_kill = get_json(&format!("{}/api/jobs/{id}", server.url)).await;
    first.kill9();
    let _second = worker(&data, worker_args);
    let job = wait_job(&server, id, secs, "finished by the second worker", |j| j["state"] == "succeeded" || j["state"] == "failed").await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 2);
    let final_file = job["artifacts"].as_array().unwrap().iter().find(|a| a["kind"] == "final").expect("a final file");
    assert!(Path::new(final_file["path"].as_str().unwrap()).is_file(), "{final_file}");

    let events = db_events(&data, id);
    let started: Vec<&Value> = events.iter().filter(|e| e.1 == "started").map(|e| &e.2).collect();
    assert_eq!(started.len(), 2, "one start per worker");
    let resumed_at = started[1]["start_step"].as_u64().unwrap();
    assert!(resumed_at > 0 && resumed_at <= at_kill["step"].as_u64().unwrap(), "resumed from a checkpoint at step {resumed_at}");
    assert!(events.iter().any(|e| e.1 == "state" && e.2["message"].as_str().unwrap_or("").contains("stopped renewing its lease")));

    let mut sse = Sse::connect(&format!("{}/jobs/{id}/events", server.url), None).await;
    let mut seen = Vec::new();
    loop {
        let e = sse.next().await;
        seen.push(e.id);
        if is_end(&e, "succeeded") {
            break;
        }
    }
    let stored: Vec<i64> = events.iter().map(|e| e.0).collect();
    assert_eq!(seen, stored, "every stored event exactly once, in order");
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
}

#[tokio::test]
async fn killed_detached_worker_resumes_from_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = dataset(tmp.path());
    kill_worker_mid_job_and_resume(&["--lease-secs", "2", "--simulate", "60:50:3"], Some(job_config(&ds, "resumable")), 25, 60).await;
}

/// The same with the real engine on the built-in demo (tiny model, 4 pictures, 3 epochs).
#[tokio::test]
async fn killed_worker_resumes_the_real_engine() {
    kill_worker_mid_job_and_resume(&["--lease-secs", "2"], None, 5, 600).await;
}

#[tokio::test]
async fn killed_server_keeps_every_job_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ds = dataset(tmp.path());
    let mut server = Server::start(&data, &["--lease-secs", "2", "--simulate", "1000:50"]).await;
    let mut ids = Vec::new();
    for name in ["a", "b", "c", "d"] {
        ids.push(enqueue(&server, job_config(&ds, name), name).await);
    }
    let [a, b, c, d] = ids[..] else { unreachable!() };
    wait_job(&server, a, 30, "running", |j| j["state"] == "running").await;
    let (s, _) = post(&format!("{}/api/jobs/{c}/priority", server.url), json!({"priority": 5})).await;
    assert_eq!(s, 200);
    let (s, _) = post(&format!("{}/api/jobs/{d}/move", server.url), json!({"to": "up"})).await;
    assert_eq!(s, 200);
    let before = get_json(&format!("{}/api/jobs", server.url)).await;
    let order = |list: &Value| list["jobs"].as_array().unwrap().iter().map(|j| (j["id"].as_i64().unwrap(), j["state"].as_str().unwrap().to_string())).collect::<Vec<_>>();
    assert_eq!(order(&before), [(a, "running".into()), (c, "queued".into()), (d, "queued".into()), (b, "queued".into())]);

    server.kill9();
    let server = Server::start(&data, &["--no-worker", "--lease-secs", "2"]).await;
    // The killed server's job waits to resume at its place; the rest keep their order.
    let after = wait_job_list(&server, |l| l["jobs"].as_array().unwrap().iter().all(|j| j["state"] == "queued")).await;
    assert_eq!(order(&after), [(c, "queued".into()), (a, "queued".into()), (d, "queued".into()), (b, "queued".into())]);
    let names: Vec<&str> = after["jobs"].as_array().unwrap().iter().map(|j| j["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["c", "a", "d", "b"]);

    // A worker now runs them in that order, and all finish.
    let _w = worker(&data, &["--simulate", "3:5"]);
    wait_job_list(&server, |l| l["jobs"].as_array().unwrap().iter().all(|j| j["state"] == "succeeded")).await;
    let c_ = db(&data);
    let run_order: Vec<i64> = c_
        .prepare("SELECT job_id FROM job_events WHERE kind = 'state' AND payload LIKE '%\"state\":\"succeeded\"%' ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(run_order, [c, a, d, b]);
    let resumed: Value = db_events(&data, a).into_iter().rfind(|e| e.1 == "started").unwrap().2;
    assert!(resumed["start_step"].as_u64().is_some(), "job a ran again (resume) after the restart");
}

async fn wait_job_list(server: &Server, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = get_json(&format!("{}/api/jobs", server.url)).await;
        if done(&list) {
            return list;
        }
        assert!(Instant::now() < deadline, "timed out; last seen {list}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_jobs_from_ten_clients_on_two_workers_each_run_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ds = dataset(tmp.path());
    let server = Server::start(&data, &["--no-worker"]).await;
    let _w1 = worker(&data, &["--simulate", "3:5", "--name", "w1"]);
    let _w2 = worker(&data, &["--simulate", "3:5", "--name", "w2"]);
    let url = server.url.clone();
    let mut clients = Vec::new();
    for c in 0..10 {
        let (url, ds) = (url.clone(), ds.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut ids = Vec::new();
            for i in 0..5 {
                let name = format!("client{c}-job{i}");
                let res = http.post(format!("{url}/api/jobs")).json(&json!({"name": name, "config": job_config(&ds, &name)})).send().await.unwrap();
                assert_eq!(res.status(), 201);
                ids.push(res.json::<Value>().await.unwrap()["id"].as_i64().unwrap());
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for c in clients {
        ids.extend(c.await.unwrap());
    }
    assert_eq!(ids.len(), 50);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let list = get_json(&format!("{url}/api/jobs")).await;
        let jobs = list["jobs"].as_array().unwrap();
        if jobs.len() == 50 && jobs.iter().all(|j| j["state"] == "succeeded") {
            break;
        }
        assert!(Instant::now() < deadline, "not all 50 finished: {list}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let conn = db(&data);
    for id in &ids {
        let (attempts, runs): (i64, i64) = conn.query_row("SELECT attempts, runs FROM jobs WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        let starts: i64 = conn.query_row("SELECT COUNT(*) FROM job_events WHERE job_id = ?1 AND kind = 'started'", [id], |r| r.get(0)).unwrap();
        assert_eq!((attempts, runs, starts), (1, 1, 1), "job {id} ran exactly once");
    }
    let workers: i64 = conn.query_row("SELECT COUNT(DISTINCT worker) FROM jobs", [], |r| r.get(0)).unwrap();
    println!("jobs were shared by {workers} worker(s)");
}

#[tokio::test]
async fn sse_reconnect_with_last_event_id_receives_exactly_the_missed_events() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ds = dataset(tmp.path());
    let server = Server::start(&data, &["--simulate", "40:40:2"]).await;
    let id = enqueue(&server, job_config(&ds, "streamed"), "streamed").await;
    let url = format!("{}/jobs/{id}/events", server.url);
    let mut first = Sse::connect(&url, None).await;
    let mut seen = Vec::new();
    for _ in 0..8 {
        seen.push(first.next().await.id);
    }
    drop(first); // the browser goes away…
    let last = *seen.last().unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await; // …while the job keeps reporting
    let missed_by_now = db_events(&data, id).iter().filter(|e| e.0 > last).count();
    assert!(missed_by_now > 0, "events happened while disconnected");
    let mut second = Sse::connect(&url, Some(last)).await;
    let resumed = second.next().await;
    let stored: Vec<i64> = db_events(&data, id).iter().map(|e| e.0).collect();
    let next_stored = *stored.iter().find(|i| **i > last).unwrap();
    assert_eq!(resumed.id, next_stored, "resumes right after the last event it saw");
    seen.push(resumed.id);
    loop {
        let e = second.next().await;
        seen.push(e.id);
        if is_end(&e, "succeeded") {
            break;
        }
    }
    let stored: Vec<i64> = db_events(&data, id).iter().map(|e| e.0).collect();
    assert_eq!(seen, stored, "nothing missed, nothing twice");

    // The global stream carries every job's events with their job id.
    let mut all = Sse::connect(&format!("{}/jobs/events", server.url), Some(0)).await;
    let e = all.next().await;
    assert_eq!(serde_json::from_str::<Value>(&e.data).unwrap()["job_id"], json!(id));
}

#[tokio::test]
async fn cancel_stops_a_running_job_within_a_step_and_retry_resumes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ds = dataset(tmp.path());
    let server = Server::start(&data, &["--simulate", "200:50:10"]).await;
    let id = enqueue(&server, job_config(&ds, "cancelme"), "cancelme").await;
    wait_job(&server, id, 30, "past its first epoch", |j| j["step"].as_u64().unwrap_or(0) >= 25).await;
    let (status, body) = post(&format!("{}/api/jobs/{id}/cancel", server.url), json!({})).await;
    assert_eq!(status, 202, "{body}");
    let at_request = db(&data).query_row("SELECT step FROM jobs WHERE id = ?1", [id], |r| r.get::<_, i64>(0)).unwrap() as u64;
    let job = wait_job(&server, id, 20, "cancelled", |j| j["state"] == "cancelled").await;
    let stopped_at = job["step"].as_u64().unwrap();
    assert!(stopped_at <= at_request + 2, "stopped at step {stopped_at}, cancel requested at {at_request}");
    let epochs: Vec<&Value> = job["artifacts"].as_array().unwrap().iter().filter(|a| a["kind"] == "epoch").collect();
    assert!(!epochs.is_empty() && epochs.iter().all(|a| Path::new(a["path"].as_str().unwrap()).is_file()), "saved epochs are kept");
    let res = reqwest::Client::new().delete(format!("{}/api/jobs/{id}", server.url)).send().await.unwrap();
    assert_eq!(res.status(), 204, "a cancelled job can be deleted");
    assert_eq!(reqwest::get(format!("{}/api/jobs/{id}", server.url)).await.unwrap().status(), 404);

    // Retry: a cancelled job resumes from where it stopped.
    let id = enqueue(&server, job_config(&ds, "again"), "again").await;
    wait_job(&server, id, 30, "past its first epoch", |j| j["step"].as_u64().unwrap_or(0) >= 25).await;
    let res = reqwest::Client::new().delete(format!("{}/api/jobs/{id}", server.url)).send().await.unwrap();
    assert_eq!(res.status(), 409, "refused while running");
    post(&format!("{}/api/jobs/{id}/cancel", server.url), json!({})).await;
    wait_job(&server, id, 20, "cancelled", |j| j["state"] == "cancelled").await;
    let (status, _) = post(&format!("{}/api/jobs/{id}/retry", server.url), json!({})).await;
    assert_eq!(status, 200);
    wait_job(&server, id, 60, "finished", |j| j["state"] == "succeeded").await;
    let starts: Vec<Value> = db_events(&data, id).into_iter().filter(|e| e.1 == "started").map(|e| e.2).collect();
    assert!(starts.len() == 2 && starts[1]["start_step"].as_u64().unwrap() > 0, "{starts:?}");
}

#[tokio::test]
async fn worker_endpoints_without_the_right_token_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ds = dataset(tmp.path());
    let server = Server::start(&data, &["--no-worker"]).await;
    let id = enqueue(&server, job_config(&ds, "guarded"), "guarded").await;
    let http = reqwest::Client::new();
    let snapshot = || {
        let c = db(&data);
        let job: (String, i64, i64) = c.query_row("SELECT state, attempts, step FROM jobs WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap();
        let events: i64 = c.query_row("SELECT COUNT(*) FROM job_events", [], |r| r.get(0)).unwrap();
        (job, events)
    };
    let claim_url = format!("{}/api/worker/claim", server.url);
    let before = snapshot();
    for auth in [None, Some("Bearer wrong-token-wrong-token"), Some("token-without-bearer")] {
        let mut req = http.post(&claim_url).json(&json!({"worker": "intruder", "wait_secs": 0}));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        assert_eq!(req.send().await.unwrap().status(), 401);
    }
    assert_eq!(snapshot(), before, "a refused claim takes nothing");

    let res = http.post(&claim_url).bearer_auth(TOKEN).json(&json!({"worker": "honest", "wait_secs": 1})).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let claim: Value = res.json().await.unwrap();
    let lease = claim["claim"]["lease"].as_str().unwrap().to_string();
    let before = snapshot();
    let events = json!({"lease": lease, "events": [{"seq": 1, "event": {"kind": "step", "step": 7, "total_steps": 10, "epoch": 1, "loss": 0.1, "avg_loss": 0.1, "lr": 0.001, "it_per_sec": 1.0, "eta_secs": 3.0}}]});
    let finish = json!({"lease": lease, "end": {"end": "done", "final_step": 10, "network_file": null, "cancelled": false}});
    for token in [None, Some("wrong-token-wrong-token")] {
        for (path, body) in [("events", &events), ("heartbeat", &json!({"lease": lease})), ("finish", &finish)] {
            let mut req = http.post(format!("{}/api/worker/jobs/{id}/{path}", server.url)).json(body);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            assert_eq!(req.send().await.unwrap().status(), 401, "{path} with {token:?}");
        }
        let mut req = http.put(format!("{}/api/worker/jobs/{id}/artifacts/evil.safetensors?lease={lease}", server.url)).body("x");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        assert_eq!(req.send().await.unwrap().status(), 401);
    }
    assert_eq!(snapshot(), before, "nothing written");
    assert!(!data.join("jobs").join(id.to_string()).join("from-worker").exists(), "no file written");

    // The right token but another claim's lease: refused too.
    let forged = json!({"lease": "0".repeat(32), "events": events["events"]});
    let res: Value = http.post(format!("{}/api/worker/jobs/{id}/events", server.url)).bearer_auth(TOKEN).json(&forged).send().await.unwrap().json().await.unwrap();
    assert_eq!(res["control"], "lost");
    assert_eq!(snapshot(), before);
    // And the real worker's post is stored.
    let res: Value = http.post(format!("{}/api/worker/jobs/{id}/events", server.url)).bearer_auth(TOKEN).json(&events).send().await.unwrap().json().await.unwrap();
    assert_eq!(res["control"], "continue");
    assert_eq!(snapshot().0 .2, 7);
}

#[tokio::test]
async fn trainer_only_worker_trains_for_the_hub() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ds = dataset(tmp.path());
    let server = Server::start(&data, &["--no-worker"]).await;
    let id = enqueue(&server, job_config(&ds, "remote"), "remote").await;
    let work = tmp.path().join("remote-machine");
    let _remote = Proc(
        loft(&["worker", "--hub", &server.url, "--token", TOKEN, "--work-dir", work.to_str().unwrap(), "--name", "gpu-box", "--simulate", "12:20:2"])
            .spawn()
            .unwrap(),
    );
    let job = wait_job(&server, id, 60, "finished remotely", |j| j["state"] == "succeeded" || j["state"] == "failed").await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(work.join("jobs").join(id.to_string()).join("inputs/train_data_dir/5_thing/a.png").is_file(), "the dataset was downloaded");
    let hub_dir = data.join("jobs").join(id.to_string()).join("from-worker");
    for a in job["artifacts"].as_array().unwrap() {
        let path = Path::new(a["path"].as_str().unwrap());
        assert!(path.starts_with(&hub_dir) && path.is_file(), "{a} was uploaded to the hub");
    }
    assert!(job["artifacts"].as_array().unwrap().iter().any(|a| a["kind"] == "final"));
    assert!(job["artifacts"].as_array().unwrap().iter().any(|a| a["kind"] == "sample"));
    let events = db_events(&data, id);
    assert!(events.iter().any(|e| e.1 == "state" && e.2["worker"].as_str().is_some_and(|w| w.contains("gpu-box"))));
    assert_eq!(events.iter().filter(|e| e.1 == "step").count(), 12, "every step event arrived once");
    // The dashboard serves the uploaded sample.
    let sample = job["artifacts"].as_array().unwrap().iter().find(|a| a["kind"] == "sample").unwrap();
    let res = reqwest::get(format!("{}/jobs/{id}/files/{}", server.url, sample["id"])).await.unwrap();
    assert_eq!(res.headers()["content-type"], "image/png");
}

#[tokio::test]
async fn dashboard_pages_render_a_job() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ds = dataset(tmp.path());
    let server = Server::start(&data, &["--simulate", "8:10:2"]).await;
    let id = enqueue(&server, job_config(&ds, "shown"), "shown").await;
    wait_job(&server, id, 30, "finished", |j| j["state"] == "succeeded").await;
    let page = reqwest::get(format!("{}/jobs/{id}", server.url)).await.unwrap().text().await.unwrap();
    for needle in ["sse-connect=\"/jobs/", "class=\"line raw\"", "class=\"line smooth\"", "class=\"line lr\"", "Download", "Keep this", "<img src=\"/jobs/", "100%"] {
        assert!(page.contains(needle), "the job page shows {needle}");
    }
    let list = reqwest::get(format!("{}/jobs", server.url)).await.unwrap().text().await.unwrap();
    assert!(list.contains("shown") && list.contains("Try the demo"));
    // The live fragments stream: a head with 100 % first.
    let mut sse = Sse::connect(&format!("{}/jobs/{id}/events?view=html", server.url), None).await;
    let head = sse.next().await;
    assert_eq!(head.event, "head");
    assert!(head.data.contains("100%"));
}

/// Flux.1 jobs from the queue, as the UI enqueues them: a LoKr on dev and a LoRA on schnell,
/// trained by the real engine in-process, each drawing its samples and writing its final file.
#[tokio::test]
async fn flux_jobs_from_the_queue_train_with_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ds = dataset(tmp.path());
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let server = Server::start(&data, &[]).await;
    for (family, model, algo) in [("flux_dev", "tiny-flux-dev", "lokr"), ("flux_schnell", "tiny-flux-schnell", "lora")] {
        let name = format!("{family}-{algo}");
        let config = json!({
            "model_family": family,
            "pretrained_model_name_or_path": models.join(model),
            "train_data_dir": ds,
            "output_name": name,
            "resolution": 32,
            "min_bucket_reso": 16,
            "max_bucket_reso": 64,
            "bucket_reso_steps": 16,
            "network_algo": algo,
            "factor": 4,
            "max_train_epochs": 1,
            "t5xxl_max_token_length": 16,
            "sample_prompts": "a thing --w 32 --h 32 --s 2 --d 1",
            "sample_every_n_epochs": 1,
            "device": "cpu",
        });
        let id = enqueue(&server, config, &name).await;
        let job = wait_job(&server, id, 300, "a finished Flux job", |j| j["state"] == "succeeded" || j["state"] == "failed").await;
        assert_eq!(job["state"], "succeeded", "{name}: {job}");
        let artifacts = job["artifacts"].as_array().unwrap();
        assert!(artifacts.iter().any(|a| a["kind"] == "final"), "{name}: {job}");
        let events = db_events(&data, id);
        assert!(events.iter().any(|e| e.1 == "sample"), "{name}: a sample event");
    }
}
