//! The hub's endpoints for trainer-only workers (`loft worker --hub URL --token T`). Every one
//! requires the worker token (checked before the body is read: none or a wrong one → 401 and
//! nothing written), and every write also carries the claim's lease, so only the worker that
//! holds a job can report on it. Events land as the same rows a local worker writes.

use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::StreamExt;
use loft_worker::train::TrainEvent;
use serde::Deserialize;
use serde_json::json;

use super::api::json_body;
use super::jobs::{error, job_error};
use super::{same_secret, AppState};
use crate::jobs::hub::{manifest, resolve_file, upload_target, ClaimRequest, ClaimResponse, ControlResponse, EventsRequest, FinishRequest, LeaseRequest};
use crate::jobs::{Control, JobError, Jobs};

/// The largest file a worker may upload (a network file or a sample).
const MAX_UPLOAD_BYTES: u64 = 16 << 30;
/// The most events one post may carry.
const MAX_EVENTS_PER_POST: usize = 1000;

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/api/worker/claim", post(claim))
        .route("/api/worker/jobs/{id}/manifest", get(job_manifest))
        .route("/api/worker/jobs/{id}/file", get(file))
        .route("/api/worker/jobs/{id}/events", post(events))
        .route("/api/worker/jobs/{id}/heartbeat", post(heartbeat))
        .route("/api/worker/jobs/{id}/finish", post(finish))
        .route("/api/worker/jobs/{id}/artifacts/{*name}", put(upload))
        .route_layer(middleware::from_fn_with_state(state, require_worker_token))
}

async fn require_worker_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let presented = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let ok = match (state.jobs.worker_token.as_deref(), presented) {
        (Some(expected), Some(given)) => same_secret(given, expected),
        _ => false,
    };
    if !ok {
        let why = if presented.is_none() { "missing" } else { "wrong" };
        return error(StatusCode::UNAUTHORIZED, format!("worker token {why}: start the worker with --token (the token `loft serve` printed)"));
    }
    next.run(request).await
}

async fn blocking<T: Send + 'static>(jobs: &Jobs, f: impl FnOnce(&Jobs) -> T + Send + 'static) -> T {
    let jobs = jobs.clone();
    tokio::task::spawn_blocking(move || f(&jobs)).await.expect("a database task does not panic")
}

/// `POST /api/worker/claim` (long poll): 200 with a claim, or 204 when none came within the wait.
async fn claim(State(state): State<AppState>, body: Result<Json<ClaimRequest>, JsonRejection>) -> Response {
    let req = match json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let name: String = req.worker.chars().filter(|c| !c.is_control()).take(80).collect();
    let jobs = &state.jobs;
    let wait = Duration::from_secs(req.wait_secs.min(30));
    match jobs.claim_wait(&format!("remote {name}"), jobs.lease, wait).await {
        Ok(Some(claim)) => Json(ClaimResponse { claim, lease_secs: jobs.lease.as_secs_f64() }).into_response(),
        Ok(None) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => job_error(e),
    }
}

#[derive(Deserialize)]
struct LeaseQuery {
    lease: String,
}

/// Refuses a worker that does not hold job `id`'s current lease.
async fn check_owner(jobs: &Jobs, id: i64, lease: String) -> Result<(), Response> {
    match blocking(jobs, move |j| j.owns(id, &lease)).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(error(StatusCode::CONFLICT, format!("this worker does not hold job {id} (its lease expired or the job ended)"))),
        Err(e) => Err(job_error(e)),
    }
}

/// `GET /api/worker/jobs/{id}/manifest?lease=…`: the files the job needs that the hub has.
async fn job_manifest(State(state): State<AppState>, Path(id): Path<i64>, Query(q): Query<LeaseQuery>) -> Response {
    if let Err(r) = check_owner(&state.jobs, id, q.lease).await {
        return r;
    }
    match blocking(&state.jobs, move |j| j.config(id).map(|c| manifest(&c))).await {
        Ok(m) => Json(m).into_response(),
        Err(e) => job_error(e),
    }
}

#[derive(Deserialize)]
struct FileQuery {
    lease: String,
    key: String,
    path: String,
}

/// `GET /api/worker/jobs/{id}/file?lease=…&key=train_data_dir&path=10_x/a.png`: one input file,
/// only from under the job's configured folder.
async fn file(State(state): State<AppState>, Path(id): Path<i64>, Query(q): Query<FileQuery>) -> Response {
    if let Err(r) = check_owner(&state.jobs, id, q.lease.clone()).await {
        return r;
    }
    let found = blocking(&state.jobs, move |j| j.config(id).map_err(anyhow::Error::from).and_then(|c| resolve_file(&c, &q.key, &q.path))).await;
    let path = match found {
        Ok(p) => p,
        Err(e) => return error(StatusCode::NOT_FOUND, format!("{e:#}")),
    };
    match tokio::fs::File::open(&path).await {
        Ok(f) => {
            let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
            let mut res = Body::from_stream(tokio_util::io::ReaderStream::new(f)).into_response();
            res.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            res
        }
        Err(e) => error(StatusCode::NOT_FOUND, format!("cannot open {}: {e}", path.display())),
    }
}

/// `POST /api/worker/jobs/{id}/events`: the worker's events, stored like a local worker's; the
/// answer says whether to continue, stop (cancelled) or give up (lost the lease).
async fn events(State(state): State<AppState>, Path(id): Path<i64>, body: Result<Json<EventsRequest>, JsonRejection>) -> Response {
    let req = match json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if req.events.len() > MAX_EVENTS_PER_POST {
        return error(StatusCode::PAYLOAD_TOO_LARGE, format!("events: at most {MAX_EVENTS_PER_POST} per post (got {})", req.events.len()));
    }
    let lease_for = state.jobs.lease;
    let result = blocking(&state.jobs, move |j| {
        let control = j.record(id, &req.lease, &req.events, lease_for)?;
        if control != Control::Lost {
            // The worker pruned an old file: remove the hub's copy too (only ever one it uploaded).
            let uploads = j.job_dir(id).join("from-worker");
            for e in &req.events {
                if let TrainEvent::Pruned { path } = &e.event {
                    if path.starts_with(&uploads) && !path.components().any(|c| c == std::path::Component::ParentDir) {
                        let _ = std::fs::remove_file(path);
                    }
                }
            }
        }
        Ok::<_, JobError>(control)
    })
    .await;
    match result {
        Ok(control) => Json(ControlResponse { control }).into_response(),
        Err(e) => job_error(e),
    }
}

async fn heartbeat(State(state): State<AppState>, Path(id): Path<i64>, body: Result<Json<LeaseRequest>, JsonRejection>) -> Response {
    let req = match json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let lease_for = state.jobs.lease;
    match blocking(&state.jobs, move |j| j.renew(id, &req.lease, lease_for)).await {
        Ok(control) => Json(ControlResponse { control }).into_response(),
        Err(e) => job_error(e),
    }
}

async fn finish(State(state): State<AppState>, Path(id): Path<i64>, body: Result<Json<FinishRequest>, JsonRejection>) -> Response {
    let req = match json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match blocking(&state.jobs, move |j| j.finish(id, &req.lease, &req.end)).await {
        Ok(Some(_)) => Json(ControlResponse { control: Control::Continue }).into_response(),
        Ok(None) => Json(ControlResponse { control: Control::Lost }).into_response(),
        Err(e) => job_error(e),
    }
}

/// `PUT /api/worker/jobs/{id}/artifacts/{name}?lease=…`: a file the job produced, streamed to a
/// temporary file and renamed into place only when complete (no half-written files).
async fn upload(State(state): State<AppState>, Path((id, name)): Path<(i64, String)>, Query(q): Query<LeaseQuery>, body: Body) -> Response {
    if let Err(r) = check_owner(&state.jobs, id, q.lease).await {
        return r;
    }
    let target = match upload_target(&state.jobs.job_dir(id), &name) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{e:#}")),
    };
    if let Some(parent) = target.parent() {
        if let Err(e) = tokio::fs::create_dir_all(parent).await {
            return error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot create {}: {e}", parent.display()));
        }
    }
    let part = target.with_file_name(format!(".{}.part", target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()));
    let written = async {
        use tokio::io::AsyncWriteExt;
        let mut file = tokio::fs::File::create(&part).await?;
        let mut stream = body.into_data_stream();
        let mut total = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(std::io::Error::other)?;
            total += chunk.len() as u64;
            if total > MAX_UPLOAD_BYTES {
                return Err(std::io::Error::other(format!("the file is larger than {MAX_UPLOAD_BYTES} bytes")));
            }
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        file.sync_all().await?;
        Ok::<_, std::io::Error>(())
    }
    .await;
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&part).await;
        return error(StatusCode::BAD_REQUEST, format!("upload of {name} failed: {e}"));
    }
    if let Err(e) = tokio::fs::rename(&part, &target).await {
        return error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot store {name}: {e}"));
    }
    (StatusCode::CREATED, Json(json!({ "path": target }))).into_response()
}
