//! Datasets: the JSON API and the Datasets tab. The services are in `crate::datasets`; here the
//! requests are parsed, the upload is streamed to disk, and results are rendered.

use std::path::{Path as FsPath, PathBuf};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::api::json_body;
use super::{render, AppState};
use crate::datasets::captions::{self, BulkOutcome, BulkRequest};
use crate::datasets::images::{check_image, free_name, upload_name};
use crate::datasets::import::{Accepted, Rejected, Report as UploadOutcome};
use crate::datasets::store::{Dataset, DatasetSummary};
use crate::datasets::tagging::{tagger_candidates, TagJob, TagRequest};
use crate::datasets::{DatasetError, Datasets};

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn dataset_error(e: DatasetError) -> Response {
    let status = match e {
        DatasetError::Invalid(_) => StatusCode::BAD_REQUEST,
        DatasetError::Forbidden(_) => StatusCode::FORBIDDEN,
        DatasetError::NotFound(_) => StatusCode::NOT_FOUND,
        DatasetError::Conflict(_) => StatusCode::CONFLICT,
        DatasetError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

/// Runs a dataset service off the async threads (it reads and writes files).
async fn blocking<T: Send + 'static>(ds: &Datasets, f: impl FnOnce(&Datasets) -> T + Send + 'static) -> T {
    let ds = ds.clone();
    tokio::task::spawn_blocking(move || f(&ds)).await.expect("a dataset task does not panic")
}

/// The routes that take small bodies (JSON, forms): inside the web app's 1 MiB limit.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/datasets", get(api_list).post(api_create))
        .route("/api/datasets/{name}", get(api_get).put(api_rename).delete(api_delete))
        .route("/api/datasets/{name}/subsets", post(api_create_subset))
        .route("/api/datasets/{name}/subsets/{subset}", axum::routing::put(api_update_subset).delete(api_delete_subset))
        .route("/api/datasets/{name}/captions", post(api_captions))
        .route("/api/datasets/{name}/captions/{subset}/{file}", axum::routing::put(api_put_caption))
        .route("/api/datasets/{name}/tags", get(api_tags))
        .route("/api/datasets/{name}/tag", post(api_tag))
        .route("/ui/datasets/{name}/tag", post(ui_tag))
        .route("/datasets", get(datasets_page))
        .route("/datasets/{name}", get(dataset_page))
        .route("/datasets/{name}/thumbs/{subset}/{file}", get(thumbnail))
        .route("/ui/datasets", post(ui_create))
        .route("/ui/datasets/{name}/captions", post(ui_captions))
        .route("/ui/datasets/{name}/subsets", post(ui_create_subset))
        .route("/ui/datasets/{name}/caption/{subset}/{file}", post(ui_caption))
}

/// The upload routes: their own body limit (the request cap of the settings) instead of the web
/// app's 1 MiB; the caller adds the access-token check.
pub fn upload_routes(limit: u64) -> Router<AppState> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    Router::new()
        .route("/api/datasets/{name}/images", post(api_upload))
        .route("/ui/datasets/{name}/images", post(ui_upload))
        .route("/api/datasets/{name}/import", post(api_import))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
}

// ---------------------------------------------------------------- JSON API

async fn api_list(State(state): State<AppState>) -> Response {
    match blocking(&state.datasets, |d| d.list()).await {
        Ok(list) => Json(json!({ "datasets": list })).into_response(),
        Err(e) => dataset_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewDataset {
    name: String,
}

async fn api_create(State(state): State<AppState>, body: Result<Json<NewDataset>, JsonRejection>) -> Response {
    let req = match json_body(body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match blocking(&state.datasets, move |d| d.create(&req.name).map(|_| req.name)).await {
        Ok(name) => (StatusCode::CREATED, Json(json!({ "name": name }))).into_response(),
        Err(e) => dataset_error(e),
    }
}

/// The images with this tag only (`?tag=…`), for the API and the page.
#[derive(Deserialize, Default)]
struct TagFilter {
    #[serde(default)]
    tag: Option<String>,
}

async fn api_get(State(state): State<AppState>, Path(name): Path<String>, Query(filter): Query<TagFilter>) -> Response {
    match blocking(&state.datasets, move |d| d.get(&name)).await {
        Ok(mut d) => {
            if let Some(tag) = filter.tag.as_deref().filter(|t| !t.trim().is_empty()) {
                d.filter_by_tag(tag);
            }
            Json(d).into_response()
        }
        Err(e) => dataset_error(e),
    }
}

/// `PUT /api/datasets/{name}` `{"name": NEW}`: renames the dataset.
async fn api_rename(State(state): State<AppState>, Path(name): Path<String>, body: Result<Json<NewDataset>, JsonRejection>) -> Response {
    let req = match json_body(body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match blocking(&state.datasets, move |d| d.rename(&name, &req.name).map(|_| req.name)).await {
        Ok(name) => Json(json!({ "name": name })).into_response(),
        Err(e) => dataset_error(e),
    }
}

async fn api_delete(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match blocking(&state.datasets, move |d| d.delete(&name)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => dataset_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSubset {
    /// The class tokens (the folder's name after `N_`).
    name: String,
    #[serde(default = "one")]
    repeats: u32,
}

fn one() -> u32 {
    1
}

async fn api_create_subset(State(state): State<AppState>, Path(name): Path<String>, body: Result<Json<NewSubset>, JsonRejection>) -> Response {
    let req = match json_body(body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match blocking(&state.datasets, move |d| d.create_subset(&name, &req.name, req.repeats)).await {
        Ok(folder) => (StatusCode::CREATED, Json(json!({ "subset": folder }))).into_response(),
        Err(e) => dataset_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubsetUpdate {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    repeats: Option<u32>,
}

async fn api_update_subset(State(state): State<AppState>, Path((name, subset)): Path<(String, String)>, body: Result<Json<SubsetUpdate>, JsonRejection>) -> Response {
    let req = match json_body(body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match blocking(&state.datasets, move |d| d.update_subset(&name, &subset, req.repeats, req.name.as_deref())).await {
        Ok(folder) => Json(json!({ "subset": folder })).into_response(),
        Err(e) => dataset_error(e),
    }
}

async fn api_delete_subset(State(state): State<AppState>, Path((name, subset)): Path<(String, String)>) -> Response {
    match blocking(&state.datasets, move |d| d.delete_subset(&name, &subset)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => dataset_error(e),
    }
}

async fn api_captions(State(state): State<AppState>, Path(name): Path<String>, body: Result<Json<BulkRequest>, JsonRejection>) -> Response {
    let req = match json_body(body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match blocking(&state.datasets, move |d| captions::bulk(d, &name, &req)).await {
        Ok(outcome) => Json(outcome).into_response(),
        Err(e) => dataset_error(e),
    }
}

async fn api_put_caption(State(state): State<AppState>, Path((name, subset, file)): Path<(String, String, String)>, text: String) -> Response {
    match blocking(&state.datasets, move |d| captions::save_caption(d, &name, &subset, &file, &text)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => dataset_error(e),
    }
}

async fn api_tags(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match blocking(&state.datasets, move |d| captions::tag_frequency(d, &name)).await {
        Ok(tags) => Json(json!({ "tags": tags.into_iter().map(|(tag, count)| json!({"tag": tag, "count": count})).collect::<Vec<_>>() })).into_response(),
        Err(e) => dataset_error(e),
    }
}

/// Checks a tagging request and queues it: the job's id, or what is wrong.
async fn queue_tagging(state: &AppState, name: String, req: TagRequest) -> Result<i64, DatasetError> {
    let job = blocking(&state.datasets, move |d| TagJob::from_request(d, &name, &req)).await?;
    let jobs = state.jobs.clone();
    tokio::task::spawn_blocking(move || jobs.enqueue_tag(&job))
        .await
        .expect("a database task does not panic")
        .map_err(|e| DatasetError::Io(format!("the tagging job could not be queued: {e}")))
}

/// `POST /api/datasets/{name}/tag`: queues WD14 tagging of the dataset; answers with the job's id.
async fn api_tag(State(state): State<AppState>, Path(name): Path<String>, body: Result<Json<TagRequest>, JsonRejection>) -> Response {
    let req = match json_body(body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match queue_tagging(&state, name, req).await {
        Ok(id) => (StatusCode::CREATED, [(header::LOCATION, format!("/api/jobs/{id}"))], Json(json!({ "id": id }))).into_response(),
        Err(e) => dataset_error(e),
    }
}

/// The form's values as typed (numbers checked here, so a typo gets a message, not a silent 422).
#[derive(Deserialize)]
struct TagForm {
    model_dir: String,
    general_threshold: String,
    character_threshold: String,
    #[serde(default)]
    exclude: String,
    #[serde(default)]
    trigger: String,
    #[serde(default)]
    mode: String,
}

async fn ui_tag(State(state): State<AppState>, Path(name): Path<String>, Form(form): Form<TagForm>) -> Response {
    let number = |field: &str, v: &str| v.trim().parse::<f64>().map_err(|_| format!("{field}: {v:?} is not a number"));
    let (general_threshold, character_threshold) = match (number("General ≥", &form.general_threshold), number("Character ≥", &form.character_threshold)) {
        (Ok(g), Ok(c)) => (g, c),
        (Err(e), _) | (_, Err(e)) => return render(&Note { ok: false, message: e }),
    };
    let req = TagRequest {
        model_dir: PathBuf::from(form.model_dir.trim()),
        general_threshold,
        character_threshold,
        exclude: form.exclude.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect(),
        trigger: form.trigger,
        mode: if form.mode.is_empty() { "write".into() } else { form.mode },
    };
    match queue_tagging(&state, name, req).await {
        // The job's page shows its progress bar and log.
        Ok(id) => ([("HX-Redirect", format!("/jobs/{id}"))], "").into_response(),
        Err(e) => render(&Note { ok: false, message: e.to_string() }),
    }
}


// ---------------------------------------------------------------- upload

/// A caption that came with the upload, written once its image is known.
struct PendingCaption {
    file: String,
    stem: String,
    text: String,
}

/// Streams every `files` part to a temporary file in the subset (counting bytes against the
/// per-file limit), checks it, and renames it to a free name; `.txt` parts become the captions
/// of the images with their stem. The optional `subset` part must come before the files. A
/// request that fails part-way (over the request limit, a broken body) removes what it stored.
async fn upload(state: &AppState, name: &str, mut multipart: Multipart) -> Result<UploadOutcome, Response> {
    let ds = state.datasets.clone();
    let n = name.to_string();
    if let Err(e) = blocking(&ds, move |d| d.dataset_dir(&n)).await {
        return Err(dataset_error(e));
    }
    let mut subset: Option<String> = None;
    let mut outcome = UploadOutcome::default();
    let mut stored: Vec<PathBuf> = vec![];
    let mut pending: Vec<PendingCaption> = vec![];
    // The images stored by this request: the stem they were uploaded with, and where they are.
    let mut uploaded: Vec<(String, PathBuf)> = vec![];
    let fail = |stored: &[PathBuf], r: Response| {
        for p in stored {
            let _ = std::fs::remove_file(p);
        }
        Err(r)
    };
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return fail(&stored, error(e.status(), format!("upload: {}", e.body_text()))),
        };
        match field.name() {
            Some("subset") => {
                let text = field.text().await.unwrap_or_default();
                let s = text.trim().to_string();
                if s.is_empty() {
                    continue; // the form's "made for the upload" choice: the default subset
                }
                let n = name.to_string();
                let checked = s.clone();
                if let Err(e) = blocking(&ds, move |d| d.subset_dir(&n, &checked)).await {
                    return fail(&stored, dataset_error(e));
                }
                subset = Some(s);
                continue;
            }
            Some("files") => {}
            other => {
                outcome.rejected.push(Rejected { file: other.unwrap_or("").to_string(), reason: "unknown form field: files go in `files`, the subset in `subset`".into() });
                continue;
            }
        }
        let raw_name = field.file_name().unwrap_or("").to_string();
        let (stem, ext) = match upload_name(&raw_name) {
            Ok(v) => v,
            Err(reason) => {
                outcome.rejected.push(Rejected { file: raw_name, reason });
                continue;
            }
        };
        let folder = match &subset {
            Some(s) => s.clone(),
            None => {
                let n = name.to_string();
                match blocking(&ds, move |d| d.default_subset(&n)).await {
                    Ok(s) => {
                        subset = Some(s.clone());
                        s
                    }
                    Err(e) => return fail(&stored, dataset_error(e)),
                }
            }
        };
        let dir = ds.root.join(name).join(&folder);
        let limit = if ext == "txt" { captions::MAX_CAPTION_BYTES as u64 } else { ds.limits.max_file_bytes };
        let part = dir.join(crate::datasets::store::temp_name("upload"));
        match stream_to(field, &part, limit).await {
            Ok(()) => {}
            Err(StreamError::TooLarge) => {
                let _ = tokio::fs::remove_file(&part).await;
                outcome.rejected.push(Rejected { file: raw_name, reason: format!("is larger than the {} byte limit for one file", limit) });
                continue;
            }
            Err(StreamError::Body(r)) => {
                let _ = tokio::fs::remove_file(&part).await;
                return fail(&stored, r);
            }
        }
        if ext == "txt" {
            let bytes = tokio::fs::read(&part).await.unwrap_or_default();
            let _ = tokio::fs::remove_file(&part).await;
            match String::from_utf8(bytes) {
                Ok(text) => pending.push(PendingCaption { file: raw_name, stem, text }),
                Err(_) => outcome.rejected.push(Rejected { file: raw_name, reason: "is not UTF-8 text".into() }),
            }
            continue;
        }
        let limits = ds.limits.clone();
        let uploaded_stem = stem.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let bytes = std::fs::read(&part).map_err(|e| format!("could not be read back: {e}"))?;
            let checked = check_image(&bytes, &ext, &limits);
            let result = checked.and_then(|c| {
                let target = free_name(&dir, &stem, &ext);
                // A hard link cannot replace an existing file: a name taken meanwhile fails.
                std::fs::hard_link(&part, &target).map_err(|e| format!("could not be stored: {e}"))?;
                Ok((c, target))
            });
            let _ = std::fs::remove_file(&part);
            result
        })
        .await
        .expect("the check does not panic");
        match checked {
            Ok((c, target)) => {
                let file = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                stored.push(target.clone());
                uploaded.push((uploaded_stem, target));
                outcome.accepted.push(Accepted { file, subset: folder, width: Some(c.width), height: Some(c.height), notes: c.notes });
            }
            Err(reason) => outcome.rejected.push(Rejected { file: raw_name, reason }),
        }
    }
    // Captions: beside the image of the same stem uploaded now (under the name it was stored
    // as), or already in the subset.
    for c in pending {
        let folder = subset.clone().unwrap_or_default();
        let dir = ds.root.join(name).join(&folder);
        let image = match uploaded.iter().find(|(stem, _)| *stem == c.stem) {
            Some((_, path)) => Some(path.clone()),
            None => crate::datasets::store::IMAGE_EXTENSIONS.iter().map(|e| dir.join(format!("{}.{e}", c.stem))).find(|p| p.is_file()),
        };
        match image {
            Some(image) => {
                let caption = image.with_extension("txt");
                match crate::datasets::store::write_atomic(&caption, c.text.as_bytes()) {
                    Ok(()) => {
                        let file = caption.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                        stored.push(caption);
                        outcome.accepted.push(Accepted { file, subset: folder, width: None, height: None, notes: vec![] });
                    }
                    Err(e) => outcome.rejected.push(Rejected { file: c.file, reason: format!("could not be stored: {e}") }),
                }
            }
            None => outcome.rejected.push(Rejected { file: c.file, reason: format!("no image named {}.* in this upload or in subset {folder}", c.stem) }),
        }
    }
    Ok(outcome)
}

enum StreamError {
    TooLarge,
    Body(Response),
}

async fn stream_to(mut field: axum::extract::multipart::Field<'_>, part: &FsPath, limit: u64) -> Result<(), StreamError> {
    use tokio::io::AsyncWriteExt;
    let io = |e: std::io::Error| StreamError::Body(error(StatusCode::INTERNAL_SERVER_ERROR, format!("upload: cannot write {}: {e}", part.display())));
    let mut file = tokio::fs::OpenOptions::new().write(true).create_new(true).open(part).await.map_err(io)?;
    let mut total = 0u64;
    loop {
        match field.chunk().await {
            Ok(Some(chunk)) => {
                total += chunk.len() as u64;
                if total > limit {
                    return Err(StreamError::TooLarge);
                }
                file.write_all(&chunk).await.map_err(io)?;
            }
            Ok(None) => break,
            Err(e) => return Err(StreamError::Body(error(e.status(), format!("upload: {}", e.body_text())))),
        }
    }
    file.flush().await.map_err(io)?;
    file.sync_all().await.map_err(io)
}

async fn api_upload(State(state): State<AppState>, Path(name): Path<String>, multipart: Multipart) -> Response {
    match upload(&state, &name, multipart).await {
        Ok(outcome) => {
            let status = if outcome.accepted.is_empty() && !outcome.rejected.is_empty() { StatusCode::BAD_REQUEST } else { StatusCode::OK };
            (status, Json(outcome)).into_response()
        }
        Err(r) => r,
    }
}

// ---------------------------------------------------------------- import

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FolderImport {
    folder: PathBuf,
    #[serde(default)]
    subset: Option<String>,
}

/// `POST /api/datasets/{name}/import`: a zip file (multipart, field `file`, optional `subset`
/// first), or `{"folder": PATH, "subset"?}` for a folder under an allowed root.
async fn api_import(State(state): State<AppState>, Path(name): Path<String>, request: axum::extract::Request) -> Response {
    use axum::extract::FromRequest;
    let is_multipart = request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("multipart/form-data"));
    let result = if is_multipart {
        let mut multipart = match Multipart::from_request(request, &state).await {
            Ok(m) => m,
            Err(e) => return error(e.status(), e.body_text()),
        };
        let mut subset = None;
        // Outside the caches (clearing them must not take an import's file), removed on every way out.
        let zip_path = state.jobs.data_dir.join("tmp").join(crate::datasets::store::temp_name("import"));
        let _remove_zip = RemoveOnDrop(zip_path.clone());
        let mut got_file = false;
        loop {
            match multipart.next_field().await {
                Ok(Some(field)) if field.name() == Some("subset") => subset = Some(field.text().await.unwrap_or_default().trim().to_string()).filter(|s| !s.is_empty()),
                Ok(Some(field)) if field.name() == Some("file") && !got_file => {
                    if let Some(dir) = zip_path.parent() {
                        let _ = tokio::fs::create_dir_all(dir).await;
                    }
                    match stream_to(field, &zip_path, state.datasets.limits.max_request_bytes).await {
                        Ok(()) => got_file = true,
                        Err(StreamError::TooLarge) => {
                            let _ = tokio::fs::remove_file(&zip_path).await;
                            return error(StatusCode::PAYLOAD_TOO_LARGE, "the zip file is larger than the request limit");
                        }
                        Err(StreamError::Body(r)) => {
                            let _ = tokio::fs::remove_file(&zip_path).await;
                            return r;
                        }
                    }
                }
                Ok(Some(field)) => return error(StatusCode::BAD_REQUEST, format!("unknown form field {:?}: the zip goes in `file`, the subset in `subset`", field.name().unwrap_or(""))),
                Ok(None) => break,
                Err(e) => {
                    let _ = tokio::fs::remove_file(&zip_path).await;
                    return error(e.status(), format!("upload: {}", e.body_text()));
                }
            }
        }
        if !got_file {
            return error(StatusCode::BAD_REQUEST, "no zip file: send it in the `file` field");
        }
        let path = zip_path.clone();
        let r = blocking(&state.datasets, move |d| crate::datasets::import::import_zip(d, &name, subset.as_deref(), &path)).await;
        let _ = tokio::fs::remove_file(&zip_path).await;
        r
    } else {
        let body = match axum::body::to_bytes(request.into_body(), 1 << 20).await {
            Ok(b) => b,
            Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "request body: larger than 1 MiB"),
        };
        let req: FolderImport = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("request body: {e}; send a zip as multipart `file`, or {{\"folder\": PATH}}")),
        };
        blocking(&state.datasets, move |d| crate::datasets::import::import_folder(d, &name, req.subset.as_deref(), &req.folder)).await
    };
    match result {
        Ok(outcome) => {
            let status = if outcome.accepted.is_empty() && !outcome.rejected.is_empty() { StatusCode::BAD_REQUEST } else { StatusCode::OK };
            (status, Json(outcome)).into_response()
        }
        Err(e) => dataset_error(e),
    }
}

/// Deletes a temporary file when the request ends, however it ends (an early return, an
/// error, the client going away).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ---------------------------------------------------------------- thumbnails

/// A 256-pixel JPEG of the image, cached under the data directory by the image's path, size
/// and modification time.
async fn thumbnail(State(state): State<AppState>, Path((name, subset, file)): Path<(String, String, String)>) -> Response {
    let cache = state.jobs.data_dir.join("cache/thumbs");
    let result = blocking(&state.datasets, move |d| -> Result<Vec<u8>, DatasetError> {
        let path = d.image_path(&name, &subset, &file)?;
        let meta = std::fs::metadata(&path).map_err(|e| crate::datasets::store::io_error("reading the image", e))?;
        let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
        let key = format!("{}|{}|{modified}", path.display(), meta.len());
        let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
        let cached = cache.join(format!("{hash:016x}.jpg"));
        if let Ok(bytes) = std::fs::read(&cached) {
            return Ok(bytes);
        }
        let image = image::open(&path).map_err(|e| DatasetError::Invalid(format!("{file} cannot be decoded: {e}")))?;
        let thumb = image.thumbnail(256, 256).to_rgb8();
        let mut out = std::io::Cursor::new(vec![]);
        thumb.write_to(&mut out, image::ImageFormat::Jpeg).map_err(|e| DatasetError::Io(format!("thumbnail: {e}")))?;
        let bytes = out.into_inner();
        if std::fs::create_dir_all(&cache).is_ok() {
            let _ = crate::datasets::store::write_atomic(&cached, &bytes);
        }
        Ok(bytes)
    })
    .await;
    match result {
        Ok(bytes) => ([(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, "private, max-age=60")], bytes).into_response(),
        Err(e) => dataset_error(e),
    }
}

// ---------------------------------------------------------------- pages

#[derive(askama::Template)]
#[template(path = "datasets.html")]
struct DatasetsPage {
    nav: &'static str,
    datasets: Vec<DatasetSummary>,
    data_root: String,
    message: Option<String>,
}

#[derive(askama::Template)]
#[template(path = "dataset.html")]
struct DatasetPage {
    nav: &'static str,
    d: Dataset,
    images: usize,
    tags: Vec<(String, usize)>,
    max_file_mib: u64,
    min_side: u32,
    /// Tagger folders found under the allowed roots.
    taggers: Vec<String>,
    /// The tag the grid is filtered by.
    filter: Option<String>,
}

async fn datasets_page(State(state): State<AppState>) -> Response {
    let root = state.datasets.root.display().to_string();
    match blocking(&state.datasets, |d| d.list()).await {
        Ok(datasets) => render(&DatasetsPage { nav: "datasets", datasets, data_root: root, message: None }),
        Err(e) => dataset_error(e),
    }
}

async fn dataset_page(State(state): State<AppState>, Path(name): Path<String>, Query(filter): Query<TagFilter>) -> Response {
    let limits = state.datasets.limits.clone();
    let tag = filter.tag.filter(|t| !t.trim().is_empty());
    let shown = tag.clone();
    match blocking(&state.datasets, move |d| Ok::<_, DatasetError>((d.get(&name)?, captions::tag_frequency(d, &name)?, tagger_candidates(d)))).await {
        Ok((mut d, tags, taggers)) => {
            let images = d.subsets.iter().map(|s| s.images.len()).sum();
            if let Some(t) = &shown {
                d.filter_by_tag(t);
            }
            render(&DatasetPage { nav: "datasets", d, images, tags, max_file_mib: limits.max_file_bytes >> 20, min_side: limits.min_side, taggers, filter: tag })
        }
        Err(e) => dataset_error(e),
    }
}

#[derive(Deserialize)]
struct CreateForm {
    name: String,
}

async fn ui_create(State(state): State<AppState>, Form(form): Form<CreateForm>) -> Response {
    let name = form.name.trim().to_string();
    let n = name.clone();
    match blocking(&state.datasets, move |d| d.create(&n)).await {
        // htmx follows HX-Redirect to the new dataset's page.
        Ok(_) => ([("HX-Redirect", format!("/datasets/{}", url_segment(&name)))], "").into_response(),
        Err(e) => super::render(&Note { ok: false, message: e.to_string() }),
    }
}

#[derive(askama::Template)]
#[template(source = r#"<p class="note {% if ok %}ok{% else %}bad{% endif %}" role="status">{{ message }}</p>"#, ext = "html")]
struct Note {
    ok: bool,
    message: String,
}

#[derive(askama::Template)]
#[template(path = "_upload_result.html")]
struct UploadResult {
    outcome: UploadOutcome,
}

async fn ui_upload(State(state): State<AppState>, Path(name): Path<String>, multipart: Multipart) -> Response {
    match upload(&state, &name, multipart).await {
        Ok(outcome) => ([("HX-Trigger", "dataset-changed")], render(&UploadResult { outcome })).into_response(),
        Err(r) => r,
    }
}

#[derive(askama::Template)]
#[template(path = "_caption_preview.html")]
struct CaptionPreview {
    name: String,
    outcome: BulkOutcome,
    /// The request as hidden fields, to apply what was previewed.
    hidden: Vec<(String, String)>,
}

/// The bulk form: `op` and its fields as form values (`tags` comma-separated, `regex` on/off).
async fn ui_captions(State(state): State<AppState>, Path(name): Path<String>, Form(form): Form<Vec<(String, String)>>) -> Response {
    let get = |k: &str| form.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).filter(|v| !v.is_empty());
    let req = BulkRequest {
        op: get("op").unwrap_or_default(),
        apply: get("apply").is_some_and(|v| v == "true"),
        subset: get("subset"),
        files: None,
        word: get("word"),
        position: get("position"),
        tags: get("tags").map(|t| t.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()).unwrap_or_default(),
        find: get("find"),
        with: get("with"),
        regex: get("regex").is_some(),
    };
    let hidden: Vec<(String, String)> = form.iter().filter(|(k, _)| k != "apply").cloned().collect();
    let n = name.clone();
    match blocking(&state.datasets, move |d| captions::bulk(d, &n, &req)).await {
        Ok(outcome) => {
            let changed = outcome.applied;
            let page = render(&CaptionPreview { name, outcome, hidden });
            if changed {
                ([("HX-Trigger", "dataset-changed")], page).into_response()
            } else {
                page
            }
        }
        Err(e) => render(&Note { ok: false, message: e.to_string() }),
    }
}

#[derive(Deserialize)]
struct SubsetForm {
    name: String,
    repeats: String,
}

async fn ui_create_subset(State(state): State<AppState>, Path(name): Path<String>, Form(form): Form<SubsetForm>) -> Response {
    let Ok(repeats) = form.repeats.trim().parse::<u32>() else {
        return render(&Note { ok: false, message: format!("repeats: {:?} is not a whole number", form.repeats) });
    };
    match blocking(&state.datasets, move |d| d.create_subset(&name, form.name.trim(), repeats)).await {
        Ok(_) => ([("HX-Refresh", "true")], "").into_response(),
        Err(e) => render(&Note { ok: false, message: e.to_string() }),
    }
}

#[derive(Deserialize)]
struct CaptionForm {
    caption: String,
}

async fn ui_caption(State(state): State<AppState>, Path((name, subset, file)): Path<(String, String, String)>, Form(form): Form<CaptionForm>) -> Response {
    let shown = file.clone();
    match blocking(&state.datasets, move |d| captions::save_caption(d, &name, &subset, &file, &form.caption)).await {
        Ok(()) => render(&Note { ok: true, message: format!("saved the caption of {shown}") }),
        Err(e) => render(&Note { ok: false, message: e.to_string() }),
    }
}

/// A path segment for a URL (names may hold spaces and other characters).
pub(crate) fn url_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
