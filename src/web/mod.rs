//! The web shell: router, shared state, access control and embedded static files. Routes are thin:
//! they parse the request, call a service (registry, presets, drafts, jobs) and render JSON or HTML.

mod api;
mod clients;
mod dashboard;
mod datasets;
mod export;
mod hub;
mod jobs;
mod settings;
mod ui;

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use include_dir::{include_dir, Dir};

use crate::db::Db;
use crate::jobs::Jobs;
use crate::registry::Registry;

static STATIC_FILES: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/static");

/// The largest request body the web app accepts (forms, JSON configs).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub db: Db,
    /// When set (the server binds beyond loopback), every request must present this token.
    pub access_token: Option<Arc<String>>,
    /// The queue and its files.
    pub jobs: Jobs,
    /// This process runs a worker (unified mode), shown on the queue page.
    pub worker_in_process: bool,
    /// The datasets under the data directory.
    pub datasets: crate::datasets::Datasets,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(ui::page))
        .route("/ui/tab/{id}", get(ui::tab).post(ui::update_tab))
        .route("/ui/draft/reset", post(ui::reset_draft))
        .route("/ui/presets", post(ui::save_preset))
        .route("/ui/presets/{name}/{action}", post(ui::preset_action))
        .route("/api/fields", get(api::fields))
        .route("/api/validate", post(api::validate))
        .route("/api/presets", get(api::list_presets).post(api::create_preset))
        .route("/api/presets/{name}", get(api::get_preset).put(api::put_preset).delete(api::delete_preset))
        .route("/api/jobs", get(jobs::api_list).post(jobs::api_create))
        .route("/api/jobs/{id}", get(jobs::api_get).delete(jobs::api_delete))
        .route("/api/jobs/{id}/cancel", post(jobs::api_cancel))
        .route("/api/jobs/{id}/retry", post(jobs::api_retry))
        .route("/api/jobs/{id}/priority", post(jobs::api_priority))
        .route("/api/jobs/{id}/move", post(jobs::api_move))
        .route("/api/jobs/{id}/files/{file}/keep", post(jobs::api_keep))
        .route("/api/jobs/{id}/files/{file}/convert", post(jobs::api_convert))
        .route("/api/demo", post(jobs::api_demo))
        .route("/api/export/sd-scripts", post(export::api_export))
        .route("/ui/export/sd-scripts", post(export::ui_export))
        .route("/ui/export/sd-scripts.toml", get(export::ui_download))
        .route("/ui/export/lycoris_preset.toml", get(export::ui_download_preset))
        .route("/ui/export/dataset.toml", get(export::ui_download_dataset))
        .route("/jobs", get(jobs::queue_page))
        .route("/jobs/events", get(jobs::all_events))
        .route("/jobs/{id}", get(jobs::job_page))
        .route("/jobs/{id}/events", get(jobs::job_events))
        .route("/jobs/{id}/files/{file}", get(jobs::download))
        .route("/ui/queue", post(jobs::ui_queue))
        .route("/ui/preflight", post(jobs::ui_preflight))
        .route("/ui/demo", post(jobs::ui_demo))
        .route("/ui/jobs/{id}/files/{file}/keep", post(jobs::ui_keep))
        .route("/ui/jobs/{id}/files/{file}/convert", get(jobs::ui_convert_form).post(jobs::ui_convert))
        .route("/ui/jobs/{id}/{action}", post(jobs::ui_action))
        .route("/static/{*path}", get(static_file))
        .route("/healthz", get(|| async { "ok" }))
        .merge(datasets::routes())
        .route("/settings", get(settings::settings_page))
        .route("/api/settings", get(settings::api_settings))
        .route("/ui/settings", post(settings::ui_save))
        .route("/ui/settings/clear-cache", post(settings::ui_clear_cache))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        // Forms and JSON configs are small; anything larger is refused with 413 before parsing.
        .layer(tower_http::limit::RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .layer(axum::extract::DefaultBodyLimit::disable())
        // Worker endpoints: their own token, and uploads of network files larger than a form.
        .merge(hub::routes(state.clone()))
        // Dataset uploads: streamed to disk under the settings' request limit, same token.
        .merge(datasets::upload_routes(state.datasets.limits.max_request_bytes).layer(middleware::from_fn_with_state(state.clone(), require_token)))
        // Outermost: browser-borne requests from other sites never reach a handler.
        .layer(middleware::from_fn_with_state(state.clone(), same_origin_only))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

async fn static_file(Path(path): Path<String>) -> Response {
    match STATIC_FILES.get_file(&path) {
        Some(file) => {
            let mime = mime_guess::from_path(&path).first_or_octet_stream();
            (
                [
                    (header::CONTENT_TYPE, HeaderValue::from_str(mime.as_ref()).expect("a MIME type is a valid header")),
                    (header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600")),
                ],
                file.contents(),
            )
                .into_response()
        }
        None => (StatusCode::NOT_FOUND, format!("no static file '{path}'")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_names() {
        for h in ["localhost", "localhost:7860", "127.0.0.1:7860", "127.8.9.1", "[::1]:7860", "::1", "app.localhost:80", "LOCALHOST."] {
            assert!(super::is_loopback_host(h), "{h}");
        }
        for h in ["evil.example", "evil.example:7860", "192.168.1.5:7860", "[2001:db8::1]:7860", "localhost.evil.example", "127.0.0.1.evil.example"] {
            assert!(!super::is_loopback_host(h), "{h}");
        }
    }
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from response times.
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// With an access token configured, a request passes with `Authorization: Bearer TOKEN`, the
/// `loft_token` cookie, or `?token=TOKEN` (which also sets the cookie, for opening the page).
async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(token) = state.access_token.clone() else {
        return next.run(request).await;
    };
    let headers = request.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let from_query = request
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("token=")))
        .map(str::to_string);
    let ok = bearer.is_some_and(|t| same_secret(t, &token))
        || cookie(headers, "loft_token").is_some_and(|t| same_secret(t, &token))
        || from_query.as_deref().is_some_and(|t| same_secret(t, &token));
    if !ok {
        return (StatusCode::UNAUTHORIZED, "this Loft server needs its access token: send `Authorization: Bearer TOKEN` or open /?token=TOKEN").into_response();
    }
    let mut response = next.run(request).await;
    if from_query.is_some() {
        if let Ok(v) = HeaderValue::from_str(&format!("loft_token={token}; Path=/; HttpOnly; SameSite=Strict")) {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    response
}

/// Guards a server that trusts whoever reaches it on loopback against the browser of its own
/// user, driven by another web site:
/// - DNS rebinding: a loopback-only server (no access token) answers only requests addressed
///   to a loopback name (`localhost`, `127.0.0.1`, `[::1]`), so a page on a rebinding domain
///   cannot read or change anything;
/// - cross-site writes: a POST/PUT/DELETE whose `Origin` is not this server, or that the
///   browser marks `Sec-Fetch-Site: cross-site`, is refused (a form on another site could
///   otherwise queue, cancel or delete jobs). Requests without these headers (scripts, curl,
///   workers) are not browsers' and pass.
async fn same_origin_only(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let host = text(header::HOST);
    if state.access_token.is_none() {
        if let Some(h) = host.filter(|h| !is_loopback_host(h)) {
            let msg = format!("this Loft server only answers to localhost names, not {h:?} (it listens on loopback; use --bind with a token to serve other names)");
            return (StatusCode::MISDIRECTED_REQUEST, msg).into_response();
        }
    }
    let safe = matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe {
        if text(header::HeaderName::from_static("sec-fetch-site")) == Some("cross-site") {
            return (StatusCode::FORBIDDEN, "cross-site request refused: another web site cannot change this Loft server").into_response();
        }
        if let Some(origin) = text(header::ORIGIN) {
            let origin_host = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
            if origin_host.is_none() || origin_host != host {
                let msg = format!("cross-site request refused: Origin {origin:?} is not this server ({})", host.unwrap_or("no Host"));
                return (StatusCode::FORBIDDEN, msg).into_response();
            }
        }
    }
    next.run(request).await
}

/// `localhost`, `*.localhost` or a loopback IP, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// An HTML response from an askama template, or a 500 naming the template error.
pub(crate) fn render<T: askama::Template>(template: &T) -> Response {
    match template.render() {
        Ok(html) => axum::response::Html(html).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("template error: {e}")).into_response(),
    }
}

