//! The Settings page: folders, allowed roots, upload limits, tokens (masked), disk use, and
//! clearing the caches.

use std::path::PathBuf;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use serde::Deserialize;
use serde_json::json;

use super::{render, AppState};
use crate::jobs::hub::masked;
use crate::jobs::JobState;
use crate::settings::{disk_use, human, Settings};

#[derive(askama::Template)]
#[template(path = "settings.html")]
struct SettingsPage {
    nav: &'static str,
    s: Settings,
    /// Effective now (the data directory, --allow-root and the saved roots).
    roots: Vec<String>,
    folders: Vec<(&'static str, String, String)>,
    access_token: String,
    worker_token: String,
    message: Option<(bool, String)>,
    max_file_mib_now: u64,
    max_request_mib_now: u64,
}

fn page(state: &AppState, message: Option<(bool, String)>) -> SettingsPage {
    let data = &state.jobs.data_dir;
    let folders = [("Datasets", state.datasets.root.clone()), ("Outputs (jobs)", data.join("jobs")), ("Caches (latents, thumbnails)", data.join("cache"))]
        .into_iter()
        .map(|(label, p)| (label, p.display().to_string(), human(disk_use(&p))))
        .collect();
    SettingsPage {
        nav: "settings",
        s: Settings::load(&state.db),
        roots: state.datasets.allowed_roots.iter().map(|r| r.display().to_string()).collect(),
        folders,
        access_token: state.access_token.as_deref().map(|t| masked(t)).unwrap_or_else(|| "none (the server answers on loopback only)".into()),
        worker_token: state.jobs.worker_token.as_deref().map(|t| masked(t)).unwrap_or_else(|| "none".into()),
        message,
        max_file_mib_now: state.datasets.limits.max_file_bytes >> 20,
        max_request_mib_now: state.datasets.limits.max_request_bytes >> 20,
    }
}

pub async fn settings_page(State(state): State<AppState>) -> Response {
    let s = state.clone();
    let p = tokio::task::spawn_blocking(move || page(&s, None)).await.expect("no panic");
    render(&p)
}

/// `GET /api/settings`: the same, as JSON (tokens masked).
pub async fn api_settings(State(state): State<AppState>) -> Response {
    let s = state.clone();
    let p = tokio::task::spawn_blocking(move || page(&s, None)).await.expect("no panic");
    Json(json!({
        "saved": p.s,
        "allowed_roots": p.roots,
        "upload_limits_now": {"max_file_mib": p.max_file_mib_now, "max_request_mib": p.max_request_mib_now},
        "folders": p.folders.iter().map(|(label, path, size)| json!({"what": label, "path": path, "size": size})).collect::<Vec<_>>(),
        "access_token": p.access_token,
        "worker_token": p.worker_token,
    }))
    .into_response()
}

#[derive(Deserialize)]
pub struct SettingsForm {
    max_file_mib: String,
    max_request_mib: String,
    #[serde(default)]
    allowed_roots: String,
}

/// `POST /ui/settings`: stores the settings (applied when Loft next starts).
pub async fn ui_save(State(state): State<AppState>, Form(form): Form<SettingsForm>) -> Response {
    let number = |field: &str, v: &str| v.trim().parse::<u64>().map_err(|_| format!("{field}: {v:?} is not a whole number of MiB"));
    let parsed = number("max_file_mib", &form.max_file_mib).and_then(|f| Ok((f, number("max_request_mib", &form.max_request_mib)?)));
    let message = match parsed {
        Err(e) => (false, e),
        Ok((max_file_mib, max_request_mib)) => {
            let allowed_roots: Vec<PathBuf> = form.allowed_roots.lines().map(str::trim).filter(|l| !l.is_empty()).map(PathBuf::from).collect();
            let settings = Settings { max_file_mib, max_request_mib, allowed_roots };
            let db = state.db.clone();
            match tokio::task::spawn_blocking(move || settings.save(&db)).await.expect("no panic") {
                Ok(()) => (true, "Saved. The upload limits and allowed folders apply when Loft next starts.".into()),
                Err(errors) => (false, errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; ")),
            }
        }
    };
    let s = state.clone();
    let p = tokio::task::spawn_blocking(move || page(&s, Some(message))).await.expect("no panic");
    render(&p)
}

/// `POST /ui/settings/clear-cache`: removes the latent and thumbnail caches (they are rebuilt
/// when needed), unless a job is running and may be reading them.
pub async fn ui_clear_cache(State(state): State<AppState>) -> Response {
    let s = state.clone();
    let message = tokio::task::spawn_blocking(move || {
        let running = s.jobs.list().map(|jobs| jobs.iter().any(|j| j.state == JobState::Running)).unwrap_or(true);
        if running {
            return (false, "Not cleared: a job is running and may be reading the latent cache; clear it when the queue is idle.".to_string());
        }
        let cache = s.jobs.data_dir.join("cache");
        let freed = disk_use(&cache);
        match std::fs::remove_dir_all(&cache) {
            // (No cache folder yet is nothing to clear, not a failure.)
            Err(e) if cache.exists() => (false, format!("The caches could not be cleared: {e}")),
            _ => (true, format!("Cleared the caches: {} freed.", human(freed))),
        }
    })
    .await
    .expect("no panic");
    let status = if message.0 { StatusCode::OK } else { StatusCode::CONFLICT };
    let s = state.clone();
    let p = tokio::task::spawn_blocking(move || page(&s, Some(message))).await.expect("no panic");
    (status, render(&p)).into_response()
}
