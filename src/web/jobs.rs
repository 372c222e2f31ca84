//! Job routes: the REST API (`/api/jobs…`), the SSE streams (`/jobs/{id}/events`, `/jobs/events`),
//! the dashboard pages (`/jobs`, `/jobs/{id}`), file downloads and the htmx actions. Each route
//! parses the request, calls the jobs service and renders; the queue logic lives in `crate::jobs`.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::{Form, Json};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use super::dashboard::{self, JobLive};
use super::ui::{draft_id, merge_open_section, with_cookie, ErrorLine};
use super::api::json_body;
use super::{render, AppState};
use crate::drafts;
use crate::jobs::convert::ConvertRequest;
use crate::jobs::convert::ConvertReport;
use crate::jobs::{demo, queue, JobError, JobSource, Jobs, Move};
use crate::registry::{Config, FieldError};

pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// A service error as JSON with the status that fits.
pub(super) fn job_error(e: JobError) -> Response {
    match e {
        JobError::NotFound(_) | JobError::Missing(_) => error(StatusCode::NOT_FOUND, e.to_string()),
        JobError::Conflict(m) => error(StatusCode::CONFLICT, m),
        JobError::Invalid(errors) => {
            (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({ "error": "the job is not valid", "errors": errors }))).into_response()
        }
        JobError::Db(_) | JobError::Io(_) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Runs a (short, blocking) database call off the async threads.
async fn blocking<T: Send + 'static>(jobs: &Jobs, f: impl FnOnce(&Jobs) -> T + Send + 'static) -> T {
    let jobs = jobs.clone();
    tokio::task::spawn_blocking(move || f(&jobs)).await.expect("a database task does not panic")
}

// ---------------------------------------------------------------- REST

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub config: Option<Config>,
    #[serde(default)]
    pub preset: Option<String>,
    #[serde(default)]
    pub priority: i64,
}

/// `POST /api/jobs` with `{name, config}` or `{name, preset}`: validated, snapshotted, queued → 201.
pub async fn api_create(State(state): State<AppState>, body: Result<Json<NewJob>, JsonRejection>) -> Response {
    let new = match json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let result = blocking(&state.jobs, move |jobs| {
        let source = match (&new.config, &new.preset) {
            (Some(c), None) => JobSource::Config(c),
            (None, Some(p)) => JobSource::Preset(p),
            _ => {
                return Err(JobError::Invalid(vec![FieldError {
                    field: "config".into(),
                    message: "give exactly one of `config` (an object of field key → value) or `preset` (a preset's name)".into(),
                }]))
            }
        };
        let id = jobs.enqueue(new.name.as_deref(), source, new.priority)?;
        jobs.get(id)
    })
    .await;
    match result {
        Ok(job) => (StatusCode::CREATED, [(header::LOCATION, format!("/api/jobs/{}", job.id))], Json(json!({ "id": job.id, "job": job }))).into_response(),
        Err(e) => job_error(e),
    }
}

pub async fn api_list(State(state): State<AppState>) -> Response {
    match blocking(&state.jobs, |jobs| jobs.list()).await {
        Ok(list) => Json(json!({ "jobs": list })).into_response(),
        Err(e) => job_error(e),
    }
}

/// `GET /api/jobs/{id}`: state, position, progress, ETA, error, plus its files and configuration.
pub async fn api_get(State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    let result = blocking(&state.jobs, move |jobs| Ok::<_, JobError>((jobs.get(id)?, jobs.artifacts(id)?, jobs.config(id)?))).await;
    match result {
        Ok((job, artifacts, config)) => {
            let mut v = serde_json::to_value(&job).expect("serializable");
            v["artifacts"] = json!(artifacts);
            v["config"] = Value::Object(config);
            Json(v).into_response()
        }
        Err(e) => job_error(e),
    }
}

pub async fn api_cancel(State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    match blocking(&state.jobs, move |jobs| jobs.cancel(id)).await {
        Ok(queue::Cancelled::Now) => Json(json!({ "id": id, "state": "cancelled" })).into_response(),
        Ok(queue::Cancelled::Requested) => {
            (StatusCode::ACCEPTED, Json(json!({ "id": id, "state": "running", "cancel_requested": true }))).into_response()
        }
        Err(e) => job_error(e),
    }
}

pub async fn api_retry(State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    match blocking(&state.jobs, move |jobs| jobs.retry(id)).await {
        Ok(()) => Json(json!({ "id": id, "state": "queued" })).into_response(),
        Err(e) => job_error(e),
    }
}

pub async fn api_delete(State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    match blocking(&state.jobs, move |jobs| jobs.delete(id)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => job_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Priority {
    pub priority: i64,
}

pub async fn api_priority(State(state): State<AppState>, Path(id): Path<i64>, body: Result<Json<Priority>, JsonRejection>) -> Response {
    let p = match json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match blocking(&state.jobs, move |jobs| jobs.set_priority(id, p.priority).and_then(|_| jobs.get(id))).await {
        Ok(job) => Json(job).into_response(),
        Err(e) => job_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveTo {
    pub to: Move,
}

pub async fn api_move(State(state): State<AppState>, Path(id): Path<i64>, body: Result<Json<MoveTo>, JsonRejection>) -> Response {
    let m = match json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match blocking(&state.jobs, move |jobs| jobs.move_job(id, m.to).and_then(|_| jobs.get(id))).await {
        Ok(job) => Json(job).into_response(),
        Err(e) => job_error(e),
    }
}

pub async fn api_keep(State(state): State<AppState>, Path((id, file)): Path<(i64, i64)>) -> Response {
    match blocking(&state.jobs, move |jobs| jobs.keep(id, file)).await {
        Ok(path) => Json(json!({ "kept": path })).into_response(),
        Err(e) => job_error(e),
    }
}

/// Writes the demo's model and pictures (first time only) and queues the demo job.
fn queue_demo(jobs: &Jobs) -> Result<i64, JobError> {
    let files = demo::ensure(&jobs.data_dir).map_err(|e| JobError::Io(format!("cannot set up the demo: {e:#}")))?;
    jobs.enqueue(Some(demo::DEMO_JOB_NAME), JobSource::Config(&demo::config(&files)), 0)
}

/// `POST /api/demo`: queue the built-in demo job → 201 with its id.
pub async fn api_demo(State(state): State<AppState>) -> Response {
    match blocking(&state.jobs, queue_demo).await {
        Ok(id) => (StatusCode::CREATED, Json(json!({ "id": id }))).into_response(),
        Err(e) => job_error(e),
    }
}

/// `GET /jobs/{id}/files/{file}`: a file the job produced (images inline, anything else, or with
/// `?download=1`, as an attachment).
pub async fn download(
    State(state): State<AppState>,
    Path((id, file)): Path<(i64, i64)>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let artifact = match blocking(&state.jobs, move |jobs| jobs.artifact(id, file)).await {
        Ok(a) => a,
        Err(e) => return job_error(e),
    };
    // A pruned file the user kept is served from the kept copy.
    let path = match (&artifact.kept, std::path::Path::new(&artifact.path).is_file()) {
        (_, true) => std::path::PathBuf::from(&artifact.path),
        (Some(kept), false) => std::path::PathBuf::from(kept),
        (None, false) => return error(StatusCode::NOT_FOUND, format!("{} is no longer on disk", artifact.path)),
    };
    let f = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => return error(StatusCode::NOT_FOUND, format!("cannot open {}: {e}", path.display())),
    };
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let mime = mime_guess::from_path(&path).first_or_octet_stream();
    let name = path.file_name().map(|n| n.to_string_lossy().replace('"', "")).unwrap_or_else(|| "file".into());
    let inline = mime.type_() == mime_guess::mime::IMAGE && !q.contains_key("download");
    let disposition = format!("{}; filename=\"{name}\"", if inline { "inline" } else { "attachment" });
    let mut response = Body::from_stream(tokio_util::io::ReaderStream::new(f)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(mime.as_ref()).unwrap_or(HeaderValue::from_static("application/octet-stream")));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    response
}

// ---------------------------------------------------------------- SSE

/// Where a stream starts: after `Last-Event-ID` (a reconnecting browser), else `?after=N`, else 0.
fn resume_point(headers: &HeaderMap, q: &std::collections::HashMap<String, String>) -> i64 {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .or_else(|| q.get("after").and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// The response side of a stream. When the browser goes away the response body, and with it
/// the stream, is dropped: the stream stops at the point it was waiting.
fn sse(events: impl Stream<Item = Event> + Send + 'static) -> Response {
    Sse::new(events.map(Ok::<_, Infallible>)).keep_alive(KeepAlive::default()).into_response()
}

/// Waits for the next change (or a slow tick) or shutdown. False = stop.
async fn next_change(changes: &mut tokio::sync::watch::Receiver<u64>, shutdown: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return false;
    }
    tokio::select! {
        _ = changes.changed() => true,
        _ = tokio::time::sleep(Duration::from_secs(5)) => true,
        _ = shutdown.changed() => false,
    }
}

/// `GET /jobs/{id}/events`: the job's events as SSE, the row id as the event id, so a client that
/// reconnects with `Last-Event-ID` receives exactly what it missed. `?view=html` streams the
/// dashboard's fragments instead (see [`html_stream`]).
pub async fn job_events(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    if let Err(e) = blocking(&state.jobs, move |jobs| jobs.get(id)).await {
        return job_error(e);
    }
    let after = resume_point(&headers, &q);
    let jobs = state.jobs.clone();
    if q.get("view").map(String::as_str) == Some("html") {
        sse(html_stream(jobs, id, after))
    } else {
        sse(raw_stream(jobs, Some(id), after))
    }
}

/// Every event row after `after` (of one job, or all), in order. Rows of all jobs carry `job_id`.
fn raw_stream(jobs: Jobs, job: Option<i64>, mut after: i64) -> impl Stream<Item = Event> {
    async_stream::stream! {
        let mut changes = jobs.event_changes();
        let mut shutdown = jobs.shutdown_signal();
        loop {
            changes.borrow_and_update();
            loop {
                let rows = match blocking(&jobs, move |j| j.events_after(job, after, 500)).await {
                    Ok(rows) => rows,
                    Err(e) => {
                        tracing::warn!("event stream: {e}");
                        break;
                    }
                };
                let full = rows.len() == 500;
                for row in rows {
                    after = row.id;
                    let data = if job.is_some() {
                        row.payload
                    } else {
                        let mut v: Value = serde_json::from_str(&row.payload).unwrap_or(Value::Null);
                        v["job_id"] = json!(row.job_id);
                        v.to_string()
                    };
                    yield Event::default().id(row.id.to_string()).event(row.kind).data(data);
                }
                if !full {
                    break;
                }
            }
            if !next_change(&mut changes, &mut shutdown).await {
                break;
            }
        }
    }
}

/// The dashboard's live view of one job. It folds the job's events into charts and a log tail
/// and sends whole fragments (`head`, `loss`, `lr`, `samples`, `files`, `log`), so whatever the
/// browser missed, the next fragment is complete; state changes after `toast_after` become
/// toasts. At most ~4 updates a second, however fast the steps come.
fn html_stream(jobs: Jobs, id: i64, toast_after: i64) -> impl Stream<Item = Event> {
    async_stream::stream! {
        let mut live = JobLive::default();
        let mut changes = jobs.event_changes();
        let mut shutdown = jobs.shutdown_signal();
        let mut first = true;
        let has_prompts = jobs.config(id).ok().and_then(|c| c.get("sample_prompts").and_then(Value::as_str).map(|s| !s.trim().is_empty())).unwrap_or(false);
        loop {
            changes.borrow_and_update();
            let mut changed = dashboard::Changed::default();
            let mut toasts = Vec::new();
            let name = jobs.get(id).map(|j| j.name).unwrap_or_default();
            loop {
                let after = live.last_id;
                let Ok(rows) = blocking(&jobs, move |j| j.events_after(Some(id), after, 2000)).await else { break };
                let full = rows.len() == 2000;
                for row in &rows {
                    changed.merge(live.apply(row));
                    if row.id > toast_after {
                        toasts.extend(dashboard::state_toast(row, &name));
                    }
                }
                if !full {
                    break;
                }
            }
            let event = |name: &str, html: String| Event::default().id(live.last_id.to_string()).event(name).data(html);
            let mut out = Vec::new();
            match blocking(&jobs, move |j| j.get(id)).await {
                Ok(job) => out.push(event("head", dashboard::head_html(&job))),
                Err(_) => {
                    yield event("head", dashboard::gone_html(id));
                    break;
                }
            }
            if first || changed.steps {
                out.push(event("loss", live.loss_svg()));
                out.push(event("lr", live.lr_svg()));
            }
            if first || changed.files {
                let (artifacts, files) = blocking(&jobs, move |j| {
                    let artifacts = j.artifacts(id).unwrap_or_default();
                    let files = dashboard::files_html(id, &artifacts);
                    (artifacts, files)
                })
                .await;
                out.push(event("samples", dashboard::samples_html(id, &artifacts, has_prompts)));
                out.push(event("files", files));
            }
            if first || changed.log {
                out.push(event("log", dashboard::log_html(&live.log)));
            }
            for t in toasts {
                out.push(event("toast", t));
            }
            for e in out {
                yield e;
            }
            first = false;
            if !next_change(&mut changes, &mut shutdown).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// `GET /jobs/events`: all jobs' events (JSON, with `job_id`), or with `?view=html` the job list
/// fragment whenever it changes plus toasts for state changes.
pub async fn all_events(State(state): State<AppState>, headers: HeaderMap, Query(q): Query<std::collections::HashMap<String, String>>) -> Response {
    let after = resume_point(&headers, &q);
    if q.get("view").map(String::as_str) == Some("html") {
        sse(list_stream(state.jobs.clone(), after))
    } else {
        sse(raw_stream(state.jobs.clone(), None, after))
    }
}

fn list_stream(jobs: Jobs, mut after: i64) -> impl Stream<Item = Event> {
    async_stream::stream! {
        let mut changes = jobs.event_changes();
        let mut shutdown = jobs.shutdown_signal();
        let mut last_html = String::new();
        loop {
            changes.borrow_and_update();
            let (list, rows) = match blocking(&jobs, move |j| Ok::<_, JobError>((j.list()?, j.events_after(None, after, 5000)?))).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!("job list stream: {e}");
                    (Vec::new(), Vec::new())
                }
            };
            let mut out = Vec::new();
            for row in &rows {
                after = row.id;
                let name = list.iter().find(|j| j.id == row.job_id).map(|j| j.name.as_str()).unwrap_or("");
                if let Some(t) = dashboard::state_toast(row, name) {
                    out.push(Event::default().id(row.id.to_string()).event("toast").data(t));
                }
            }
            let html = dashboard::list_html(&list);
            if html != last_html {
                out.push(Event::default().id(after.to_string()).event("jobs").data(html.clone()));
                last_html = html;
            }
            for e in out {
                yield e;
            }
            if !next_change(&mut changes, &mut shutdown).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

// ---------------------------------------------------------------- pages

fn hub_url(headers: &HeaderMap) -> String {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1:7860");
    format!("http://{host}")
}

/// `GET /jobs`: the queue.
pub async fn queue_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let result = blocking(&state.jobs, |j| Ok::<_, JobError>((j.list()?, j.last_event_id()?))).await;
    let (list, last_event) = match result {
        Ok(v) => v,
        Err(e) => return job_error(e),
    };
    let token = state.jobs.worker_token.as_deref().map(|t| crate::jobs::hub::masked(t)).unwrap_or_else(|| "(no token set)".into());
    render(&dashboard::QueuePage {
        nav: "jobs",
        last_event,
        list: dashboard::list_html(&list),
        in_process: state.worker_in_process,
        data_dir: state.jobs.data_dir.display().to_string(),
        hub_url: hub_url(&headers),
        token_masked: token,
    })
}

/// `GET /jobs/{id}`: one job, rendered complete, then kept live by its stream.
pub async fn job_page(State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    let result = blocking(&state.jobs, move |j| {
        let artifacts = j.artifacts(id)?;
        let files = dashboard::files_html(id, &artifacts);
        Ok::<_, JobError>((j.get(id)?, artifacts, files, j.config(id)?, j.events_after(Some(id), 0, i64::MAX)?))
    })
    .await;
    let (job, artifacts, files, config, events) = match result {
        Ok(v) => v,
        Err(JobError::NotFound(_)) => {
            return (StatusCode::NOT_FOUND, Html(format!("<p>No job {id}. <a href=\"/jobs\">Back to the queue</a></p>"))).into_response()
        }
        Err(e) => return job_error(e),
    };
    let mut live = JobLive::default();
    for row in &events {
        live.apply(row);
    }
    let has_prompts = config.get("sample_prompts").and_then(Value::as_str).is_some_and(|s| !s.trim().is_empty());
    let shown = state.registry.sparsify(&config);
    render(&dashboard::JobPage {
        nav: "jobs",
        id,
        name: job.name.clone(),
        last_event: live.last_id,
        head: dashboard::head_html(&job),
        loss: live.loss_svg(),
        has_validation: config.get("validation_split").and_then(Value::as_f64).is_some_and(|v| v > 0.0),
        lr: live.lr_svg(),
        samples: dashboard::samples_html(id, &artifacts, has_prompts),
        files,
        log: dashboard::log_html(&live.log),
        config: serde_json::to_string_pretty(&shown).unwrap_or_default(),
    })
}

// ---------------------------------------------------------------- htmx actions

fn redirect(to: &str) -> Response {
    ([("HX-Redirect", to.to_string())], "").into_response()
}

#[derive(askama::Template)]
#[template(path = "_notice.html")]
pub(super) struct Notice {
    pub ok: bool,
    pub message: String,
    pub errors: Vec<ErrorLine>,
}

pub(super) fn error_lines(state: &AppState, errors: &[FieldError]) -> Vec<ErrorLine> {
    errors
        .iter()
        .map(|e| {
            let field = state.registry.field(&e.field);
            let tab = field.map(|f| f.section.clone()).unwrap_or_default();
            ErrorLine {
                tab_title: state.registry.section(&tab).map(|s| s.meta.title.clone()).unwrap_or_else(|| "Job".into()),
                tab,
                label: field.map(|f| f.label.clone()).unwrap_or_else(|| e.field.clone()),
                message: e.message.clone(),
            }
        })
        .collect()
}

/// `POST /ui/queue`: the form's draft becomes a job (then the browser goes to its page), or the
/// problems are listed with links to their tabs.
pub async fn ui_queue(State(state): State<AppState>, headers: HeaderMap, Form(pairs): Form<Vec<(String, String)>>) -> Response {
    with_draft_job(state, headers, pairs, |jobs, config| jobs.enqueue(None, JobSource::Config(config), 0), |id| redirect(&format!("/jobs/{id}"))).await
}

#[derive(askama::Template)]
#[template(path = "_preflight.html")]
struct PreflightPanel {
    report: loft_worker::train::preflight::Preflight,
}

/// `POST /ui/preflight` (the Queue button): the draft checked as for queueing, and what training
/// would make of its dataset, with a button that queues it.
pub async fn ui_preflight(State(state): State<AppState>, headers: HeaderMap, Form(pairs): Form<Vec<(String, String)>>) -> Response {
    with_draft_job(state, headers, pairs, |jobs, config| jobs.preflight(config), |report| render(&PreflightPanel { report })).await
}

/// The Queue button's two steps: the draft, with the open section's form merged in (so a value
/// typed but not yet committed by a change event goes along) and stored, handed to `act`; its
/// result shown by `show`, or the problems to fix.
async fn with_draft_job<T: Send + 'static>(
    state: AppState,
    headers: HeaderMap,
    pairs: Vec<(String, String)>,
    act: impl FnOnce(&Jobs, &Config) -> Result<T, JobError> + Send + 'static,
    show: impl FnOnce(T) -> Response,
) -> Response {
    let (draft, set) = draft_id(&headers);
    let mut config = drafts::load(&state.db, &draft);
    if merge_open_section(&state, &mut config, pairs) {
        if let Err(e) = drafts::store(&state.db, &draft, &config) {
            return render(&Notice { ok: false, message: format!("Not queued: the form could not be saved: {e}."), errors: vec![] });
        }
    }
    let result = blocking(&state.jobs, move |jobs| act(jobs, &config)).await;
    let response = match result {
        Ok(value) => show(value),
        Err(JobError::Invalid(errors)) => render(&Notice {
            ok: false,
            message: format!("Not queued: {} value(s) need fixing first.", errors.len()),
            errors: error_lines(&state, &errors),
        }),
        Err(e) => render(&Notice { ok: false, message: format!("Not queued: {e}."), errors: vec![] }),
    };
    with_cookie(response, &draft, set)
}

/// `POST /ui/demo`: queue the demo and open its page.
pub async fn ui_demo(State(state): State<AppState>) -> Response {
    match blocking(&state.jobs, queue_demo).await {
        Ok(id) => redirect(&format!("/jobs/{id}")),
        Err(e) => Html(dashboard::toast("bad", format!("The demo could not be queued: {e}"))).into_response(),
    }
}

/// `POST /ui/jobs/{id}/{cancel|retry|delete|top|up|down|bottom}` → a toast (the lists and heads
/// refresh through their streams). Deleting from the job's own page goes back to the queue.
pub async fn ui_action(State(state): State<AppState>, headers: HeaderMap, Path((id, action)): Path<(i64, String)>) -> Response {
    let act = action.clone();
    let result = blocking(&state.jobs, move |jobs| -> Result<String, JobError> {
        Ok(match act.as_str() {
            "cancel" => match jobs.cancel(id)? {
                queue::Cancelled::Now => format!("Job #{id} cancelled."),
                queue::Cancelled::Requested => format!("Job #{id} stops after its current step."),
            },
            "retry" => jobs.retry(id).map(|_| format!("Job #{id} queued again."))?,
            "delete" => jobs.delete(id).map(|_| format!("Job #{id} deleted with its files."))?,
            "top" | "up" | "down" | "bottom" => {
                let to = match act.as_str() {
                    "top" => Move::Top,
                    "up" => Move::Up,
                    "down" => Move::Down,
                    _ => Move::Bottom,
                };
                jobs.move_job(id, to).map(|_| format!("Job #{id} moved."))?
            }
            other => return Err(JobError::Missing(format!("no job action '{other}'"))),
        })
    })
    .await;
    match result {
        Ok(_) if action == "delete" && headers.get("hx-current-url").and_then(|v| v.to_str().ok()).is_some_and(|u| u.contains(&format!("/jobs/{id}"))) => {
            redirect("/jobs")
        }
        Ok(message) => Html(dashboard::toast("ok", message)).into_response(),
        Err(e) => Html(dashboard::toast("bad", e.to_string())).into_response(),
    }
}

/// `POST /ui/jobs/{id}/files/{file}/keep` → the refreshed file table.
pub async fn ui_keep(State(state): State<AppState>, Path((id, file)): Path<(i64, i64)>) -> Response {
    let result = blocking(&state.jobs, move |jobs| {
        let kept = jobs.keep(id, file);
        (kept, jobs.artifacts(id).map(|a| dashboard::files_html(id, &a)))
    })
    .await;
    match result {
        (Ok(_), Ok(files)) => Html(files).into_response(),
        (Err(e), Ok(files)) => Html(format!("<p class=\"notice bad\">{}</p>{}", askama_escape(&e.to_string()), files)).into_response(),
        (_, Err(e)) => job_error(e),
    }
}

fn askama_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

// ---------------------------------------------------------------- convert to LoRA

#[derive(askama::Template)]
#[template(path = "_convert_panel.html")]
struct ConvertPanel {
    job: i64,
    file: i64,
    file_name: String,
    how: String,
    energy: String,
    rank: String,
    conv_rank: String,
    report: Option<ConvertReport>,
    energy_pct: String,
    rel_error: String,
    ranks: String,
    size: String,
    error: String,
    /// After writing: the refreshed file table, swapped in out of band.
    files_oob: String,
}

impl ConvertPanel {
    fn new(job: i64, file: i64, file_name: String) -> Self {
        ConvertPanel {
            job,
            file,
            file_name,
            how: "energy".into(),
            energy: "0.999".into(),
            rank: String::new(),
            conv_rank: String::new(),
            report: None,
            energy_pct: String::new(),
            rel_error: String::new(),
            ranks: String::new(),
            size: String::new(),
            error: String::new(),
            files_oob: String::new(),
        }
    }

    fn with_report(mut self, r: ConvertReport) -> Self {
        self.energy_pct = format!("{:.4}%", 100.0 * r.retained_energy);
        self.rel_error = format!("{:.3e}", r.rel_error);
        self.ranks = if r.min_rank == r.max_rank { format!("{}", r.max_rank) } else { format!("{}–{}", r.min_rank, r.max_rank) };
        self.size = dashboard::human_size(r.bytes);
        self.report = Some(r);
        self
    }
}

fn file_name_of(a: &queue::Artifact) -> String {
    std::path::Path::new(&a.path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| a.path.clone())
}

/// `GET /ui/jobs/{id}/files/{file}/convert`: the "Convert to LoRA…" panel for one file.
pub async fn ui_convert_form(State(state): State<AppState>, Path((id, file)): Path<(i64, i64)>) -> Response {
    match blocking(&state.jobs, move |jobs| jobs.artifact(id, file)).await {
        Ok(a) => render(&ConvertPanel::new(id, file, file_name_of(&a))),
        Err(e) => Html(format!("<p class=\"notice bad\">{}</p>", askama_escape(&e.to_string()))).into_response(),
    }
}

/// Reads the panel's form (`how` = energy | rank, `energy`, `rank`, `conv_rank`, `apply` = 0 | 1).
fn convert_request(form: &std::collections::HashMap<String, String>) -> Result<ConvertRequest, String> {
    let field = |k: &str| form.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let number = |k: &str, label: &str| -> Result<Option<usize>, String> {
        field(k).map(|v| v.parse::<usize>().map_err(|_| format!("{label} must be a whole number ≥ 1, not {v:?}"))).transpose()
    };
    let mut request = ConvertRequest { apply: field("apply") == Some("1"), ..Default::default() };
    if field("how") == Some("rank") {
        request.rank = Some(number("rank", "Rank")?.ok_or("give a rank (e.g. 16)")?);
        request.conv_rank = number("conv_rank", "Conv rank")?;
    } else {
        let v = field("energy").ok_or("give the share of energy to keep (e.g. 0.999)")?;
        request.energy = Some(v.parse::<f64>().map_err(|_| format!("Energy must be a number in (0, 1], not {v:?}"))?);
    }
    Ok(request)
}

fn convert_error(e: &JobError) -> String {
    match e {
        JobError::Invalid(errors) => errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; "),
        other => other.to_string(),
    }
}

/// `POST /ui/jobs/{id}/files/{file}/convert`: preview (`apply=0`) or write (`apply=1`) the
/// conversion; the panel comes back with the ranks, energy, error and size, and after writing the
/// file table is refreshed out of band.
pub async fn ui_convert(State(state): State<AppState>, Path((id, file)): Path<(i64, i64)>, Form(form): Form<std::collections::HashMap<String, String>>) -> Response {
    let parsed = convert_request(&form);
    let outcome = blocking(&state.jobs, move |jobs| {
        let name = jobs.artifact(id, file).map(|a| file_name_of(&a)).unwrap_or_default();
        let result = parsed.map_err(|m| JobError::Invalid(vec![FieldError { field: "convert".into(), message: m }])).and_then(|r| jobs.convert_file(id, file, &r));
        let files = match &result {
            Ok(r) if r.written.is_some() => jobs.artifacts(id).ok().map(|a| dashboard::files_html(id, &a)),
            _ => None,
        };
        (name, result, files)
    })
    .await;
    let (name, result, files) = outcome;
    let mut panel = ConvertPanel::new(id, file, name);
    if form.get("how").map(String::as_str) == Some("rank") {
        panel.how = "rank".into();
    }
    for (key, slot) in [("energy", &mut panel.energy), ("rank", &mut panel.rank), ("conv_rank", &mut panel.conv_rank)] {
        if let Some(v) = form.get(key) {
            *slot = v.clone();
        }
    }
    let mut panel = match result {
        Ok(r) => panel.with_report(r),
        Err(e) => ConvertPanel { error: convert_error(&e), ..panel },
    };
    if let Some(files) = files {
        panel.files_oob = format!("<div id=\"files\" hx-swap-oob=\"innerHTML\">{files}</div>");
    }
    render(&panel)
}

/// `POST /api/jobs/{id}/files/{file}/convert` `{"rank"?, "conv_rank"?, "energy"?, "apply"?}`:
/// the conversion report (a preview unless `apply` is true, then the written file and its row).
pub async fn api_convert(State(state): State<AppState>, Path((id, file)): Path<(i64, i64)>, body: Result<Json<ConvertRequest>, JsonRejection>) -> Response {
    let request = match json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match blocking(&state.jobs, move |jobs| jobs.convert_file(id, file, &request)).await {
        Ok(report) => (if report.written.is_some() { StatusCode::CREATED } else { StatusCode::OK }, Json(report)).into_response(),
        Err(e) => job_error(e),
    }
}
