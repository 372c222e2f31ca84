//! The JSON API: fields with rules applied, validation, presets.

use std::collections::HashMap;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use validator::{Validate, ValidationError};

use super::AppState;
use crate::presets::{check_name, PresetError, Presets};
use crate::registry::{Config, FieldError};

/// An error body that names what was wrong.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn field_errors(errors: Vec<FieldError>) -> Response {
    (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({ "error": "the configuration is not valid", "errors": errors }))).into_response()
}

fn preset_error(e: PresetError) -> Response {
    match e {
        PresetError::Invalid(errors) => field_errors(errors),
        PresetError::BadName(m) => field_errors(vec![FieldError { field: "name".into(), message: m }]),
        PresetError::Exists(_) => error(StatusCode::CONFLICT, e.to_string()),
        PresetError::NotFound(_) => error(StatusCode::NOT_FOUND, e.to_string()),
        PresetError::Db(err) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("database error: {err}")),
    }
}

pub(super) fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, Response> {
    body.map(|Json(v)| v).map_err(|rejection| {
        // Too large stays 413; every other problem with the body is the client's malformed JSON.
        let status = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE { rejection.status() } else { StatusCode::BAD_REQUEST };
        error(status, format!("request body: {}", rejection.body_text()))
    })
}

/// `GET /api/fields?section=S&key=value…`: the section's fields with the rules applied to the
/// given state (values as a form would post them).
pub async fn fields(State(state): State<AppState>, Query(query): Query<HashMap<String, String>>) -> Response {
    let registry = &state.registry;
    let Some(section_id) = query.get("section") else {
        let ids: Vec<&str> = registry.sections.iter().map(|s| s.meta.id.as_str()).collect();
        return error(StatusCode::BAD_REQUEST, format!("section: missing; one of {}", ids.join(", ")));
    };
    let Some(section) = registry.section(section_id) else {
        let ids: Vec<&str> = registry.sections.iter().map(|s| s.meta.id.as_str()).collect();
        return error(StatusCode::NOT_FOUND, format!("section: no section '{section_id}'; one of {}", ids.join(", ")));
    };
    let mut config = Config::new();
    for (key, raw) in &query {
        if key == "section" {
            continue;
        }
        match registry.field(key) {
            Some(field) => {
                config.insert(key.clone(), registry.parse_input(field, raw));
            }
            None => return error(StatusCode::BAD_REQUEST, format!("{key}: unknown field")),
        }
    }
    let fields = registry.evaluate_section(section, &config);
    Json(json!({ "section": section.meta, "fields": fields })).into_response()
}

/// `POST /api/validate` with a config object: 200 with the resolved config, or 422 with errors.
pub async fn validate(State(state): State<AppState>, body: Result<Json<Value>, JsonRejection>) -> Response {
    let value = match json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(config) = value.as_object() else {
        return error(StatusCode::BAD_REQUEST, "request body: must be a JSON object of field key → value");
    };
    match crate::presets::validated(&state.registry, config) {
        Ok(resolved) => Json(json!({ "config": resolved })).into_response(),
        Err(e) => preset_error(e),
    }
}

fn valid_preset_name(name: &str) -> Result<(), ValidationError> {
    check_name(name).map(|_| ()).map_err(|e| {
        let mut err = ValidationError::new("preset_name");
        err.message = Some(e.to_string().trim_start_matches("name: ").to_string().into());
        err
    })
}

#[derive(Debug, Deserialize, Validate)]
#[serde(deny_unknown_fields)]
pub struct PresetPayload {
    #[validate(custom(function = "valid_preset_name"))]
    pub name: String,
    pub config: Config,
    #[serde(default)]
    #[validate(length(max = 500, message = "must be at most 500 characters"))]
    pub description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresetUpdate {
    pub config: Config,
}

/// Turns `validator` errors into the same per-field list the registry gives.
fn payload_errors(errors: validator::ValidationErrors) -> Response {
    let list = errors
        .field_errors()
        .into_iter()
        .flat_map(|(field, errs)| {
            errs.iter().map(move |e| FieldError {
                field: field.to_string(),
                message: e.message.as_ref().map(|m| m.to_string()).unwrap_or_else(|| e.code.to_string()),
            })
        })
        .collect();
    field_errors(list)
}

pub async fn list_presets(State(state): State<AppState>) -> Response {
    let presets = Presets { db: &state.db, registry: &state.registry };
    match presets.list() {
        Ok(list) => Json(json!({ "presets": list })).into_response(),
        Err(e) => preset_error(e),
    }
}

pub async fn create_preset(State(state): State<AppState>, body: Result<Json<PresetPayload>, JsonRejection>) -> Response {
    let payload = match json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(e) = payload.validate() {
        return payload_errors(e);
    }
    let presets = Presets { db: &state.db, registry: &state.registry };
    match presets.create(&payload.name, &payload.config, &payload.description) {
        Ok(name) => (StatusCode::CREATED, Json(json!({ "name": name }))).into_response(),
        Err(e) => preset_error(e),
    }
}

pub async fn get_preset(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let presets = Presets { db: &state.db, registry: &state.registry };
    match presets.get(&name) {
        Ok(p) => Json(p).into_response(),
        Err(e) => preset_error(e),
    }
}

pub async fn put_preset(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<PresetUpdate>, JsonRejection>,
) -> Response {
    let payload = match json_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let presets = Presets { db: &state.db, registry: &state.registry };
    match presets.put(&name, &payload.config) {
        Ok(true) => (StatusCode::CREATED, Json(json!({ "name": name }))).into_response(),
        Ok(false) => Json(json!({ "name": name })).into_response(),
        Err(e) => preset_error(e),
    }
}

pub async fn delete_preset(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let presets = Presets { db: &state.db, registry: &state.registry };
    match presets.delete(&name) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => preset_error(e),
    }
}
