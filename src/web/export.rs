//! The sd-scripts export over HTTP: `POST /api/export/sd-scripts` (JSON), the form's
//! "sd-scripts" button (a panel with the TOML) and the TOML as a download.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use serde::Deserialize;
use serde_json::json;

use super::api::json_body;
use super::jobs::{error_lines, Notice};
use super::ui::{draft_id, merge_open_section, with_cookie};
use super::{render, AppState};
use crate::drafts;
use crate::registry::Config;
use crate::sd_scripts::{export, SdScriptsConfig};

/// The prompts file name the exported TOML refers to (beside the TOML).
const PROMPTS_FILE: &str = "sample_prompts.txt";

#[derive(Deserialize)]
pub struct ExportPayload {
    config: Config,
}

/// `POST /api/export/sd-scripts` with `{config}`: `{script, toml, sample_prompts, lycoris_preset,
/// not_exported}`,
/// or 422 with the per-field errors.
pub async fn api_export(State(state): State<AppState>, body: Result<Json<ExportPayload>, JsonRejection>) -> Response {
    let payload = match json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match export(&state.registry, &payload.config, PROMPTS_FILE) {
        Ok(e) => Json(json!({
            "script": e.script,
            "toml": e.toml,
            "sample_prompts": e.sample_prompts,
            "lycoris_preset": e.preset_file.as_ref().map(|(name, text)| json!({"file": name, "toml": text})),
            "dataset_config": e.dataset_file.as_ref().map(|(name, text)| json!({"file": name, "toml": text})),
            "not_exported": e.not_exported.iter().map(|(k, why)| json!({"field": k, "reason": why})).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(errors) => (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"error": "the configuration is not valid", "errors": errors}))).into_response(),
    }
}

#[derive(askama::Template)]
#[template(path = "_export.html")]
struct ExportPanel {
    script: &'static str,
    toml: String,
    prompts: Option<String>,
    not_exported: Vec<(String, String)>,
    /// The LyCORIS preset file's name and how many layers it lists.
    preset: Option<(String, usize)>,
    /// The dataset config's name and its number of subsets.
    dataset: Option<(String, usize)>,
}

/// The draft, with the open section's form merged in (as the Queue button does).
fn draft_with_form(state: &AppState, headers: &HeaderMap, pairs: Vec<(String, String)>) -> (String, bool, Config) {
    let (draft, set) = draft_id(headers);
    let mut config = drafts::load(&state.db, &draft);
    if merge_open_section(state, &mut config, pairs) {
        // Best effort: the export itself does not depend on the draft being stored.
        let _ = drafts::store(&state.db, &draft, &config);
    }
    (draft, set, config)
}

/// `POST /ui/export/sd-scripts`: the panel with the TOML, or the problems to fix first.
pub async fn ui_export(State(state): State<AppState>, headers: HeaderMap, Form(pairs): Form<Vec<(String, String)>>) -> Response {
    let (draft, set, config) = draft_with_form(&state, &headers, pairs);
    let response = match export(&state.registry, &config, PROMPTS_FILE) {
        Ok(SdScriptsConfig { script, toml, sample_prompts, not_exported, preset_file, dataset_file }) => {
            let preset = preset_file.map(|(name, text)| (name, text.lines().filter(|l| l.starts_with("  \"")).count()));
            let dataset = dataset_file.map(|(name, text)| (name, text.matches("[[datasets.subsets]]").count()));
            render(&ExportPanel { script, toml, prompts: sample_prompts, not_exported, preset, dataset })
        }
        Err(errors) => render(&Notice {
            ok: false,
            message: format!("Not exported: {} value(s) need fixing first.", errors.len()),
            errors: error_lines(&state, &errors),
        }),
    };
    with_cookie(response, &draft, set)
}

/// `GET /ui/export/lycoris_preset.toml`: the draft's LyCORIS preset file (404 when the draft's
/// algorithm is not a LyCORIS one).
pub async fn ui_download_preset(State(state): State<AppState>, headers: HeaderMap) -> Response {
    download_side_file(&state, &headers, |e| e.preset_file, "this configuration trains kohya's networks.lora: no LyCORIS preset")
}

/// `GET /ui/export/dataset.toml`: the draft's dataset config (404 when its training folder
/// cannot be read here).
pub async fn ui_download_dataset(State(state): State<AppState>, headers: HeaderMap) -> Response {
    download_side_file(&state, &headers, |e| e.dataset_file, "the training folder has no N_name folders on this machine: no dataset config")
}

/// One of the files the main TOML names (`pick` chooses it) as a download; 404 with `missing`
/// when this draft has none, 422 naming the problems when the draft is not valid.
fn download_side_file(state: &AppState, headers: &HeaderMap, pick: fn(SdScriptsConfig) -> Option<(String, String)>, missing: &'static str) -> Response {
    let (draft, set, config) = draft_with_form(state, headers, vec![]);
    let response = match export(&state.registry, &config, PROMPTS_FILE).map(pick) {
        Ok(Some((name, text))) => {
            let disposition = format!("attachment; filename=\"{name}\"");
            ([(header::CONTENT_TYPE, "application/toml; charset=utf-8".to_string()), (header::CONTENT_DISPOSITION, disposition)], text).into_response()
        }
        Ok(None) => (StatusCode::NOT_FOUND, missing).into_response(),
        Err(errors) => {
            let lines: Vec<String> = errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect();
            (StatusCode::UNPROCESSABLE_ENTITY, format!("not exported; fix first:\n{}", lines.join("\n"))).into_response()
        }
    };
    with_cookie(response, &draft, set)
}

/// `GET /ui/export/sd-scripts.toml`: the draft's TOML as a download (422 text naming the
/// problems when it is not valid).
pub async fn ui_download(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let (draft, set, config) = draft_with_form(&state, &headers, vec![]);
    let response = match export(&state.registry, &config, PROMPTS_FILE) {
        Ok(e) => {
            let mut text = e.toml;
            if let Some(p) = e.sample_prompts {
                text.push_str(&format!("\n# {PROMPTS_FILE} (save beside this file):\n"));
                for line in p.lines() {
                    text.push_str(&format!("#   {line}\n"));
                }
            }
            ([(header::CONTENT_TYPE, "application/toml; charset=utf-8"), (header::CONTENT_DISPOSITION, "attachment; filename=\"sd-scripts.toml\"")], text).into_response()
        }
        Err(errors) => {
            let lines: Vec<String> = errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect();
            (StatusCode::UNPROCESSABLE_ENTITY, format!("not exported; fix first:\n{}", lines.join("\n"))).into_response()
        }
    };
    with_cookie(response, &draft, set)
}
