//! The web app over HTTP, in-process: every tab, the form round trip, the JSON API, presets,
//! access tokens, and the database's start-up behaviour.

use axum::body::{to_bytes, Body};
use axum::http::{header, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tower::ServiceExt;

use loft::server::open_state;
use loft::web::router;

struct App {
    router: Router,
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
}

fn app_with_token(token: Option<&str>) -> App {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let state = open_state(&data, token.map(str::to_string)).unwrap();
    App { router: router(state), dir: data, _dir: dir }
}

fn app() -> App {
    app_with_token(None)
}

const COOKIE: &str = "loft_draft=0123456789abcdef0123456789abcdef";

async fn send(app: &App, req: Request<Body>) -> (StatusCode, String) {
    let res = app.router.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let body = to_bytes(res.into_body(), usize::MAX).await.unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn get(app: &App, uri: &str) -> (StatusCode, String) {
    send(app, Request::get(uri).header(header::COOKIE, COOKIE).body(Body::empty()).unwrap()).await
}

async fn post_form(app: &App, uri: &str, form: &str) -> (StatusCode, String) {
    let req = Request::post(uri)
        .header(header::COOKIE, COOKIE)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form.to_string()))
        .unwrap();
    send(app, req).await
}

async fn json_req(app: &App, method: &str, uri: &str, body: Value) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let (status, text) = send(app, req).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The HTML of one field row, for asserting on its state.
fn row<'a>(html: &'a str, key: &str) -> Option<&'a str> {
    let start = html.find(&format!("id=\"row-{key}\""))?;
    let rest = &html[start..];
    let end = rest[1..].find("id=\"row-").map(|i| i + 1).unwrap_or(rest.len());
    Some(&rest[..end])
}

#[tokio::test]
async fn page_and_every_tab_render() {
    let app = app();
    let (status, page) = get(&app, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("/static/vendor/htmx-2.0.11.min.js") && page.contains("/static/loft.css"));
    for tab in ["model", "dataset", "network", "optimizer", "training", "sampling", "saving", "presets"] {
        assert!(page.contains(&format!("hx-post=\"/ui/tab/{tab}\"")), "tab button {tab}");
        let (status, html) = get(&app, &format!("/ui/tab/{tab}")).await;
        assert_eq!(status, StatusCode::OK, "{tab}");
        assert!(html.contains(&format!("id=\"section-{tab}\"")), "{tab} fragment");
        assert!(html.contains("hx-swap-oob"), "{tab} refreshes the tab bar");
    }
    let (status, _) = get(&app, "/ui/tab/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, css) = get(&app, "/static/loft.css").await;
    assert_eq!(status, StatusCode::OK);
    assert!(css.contains(".tabs"));
    let (status, _) = get(&app, "/static/../Cargo.toml").await;
    assert_ne!(status, StatusCode::OK);
}

#[tokio::test]
async fn changing_the_algorithm_rerenders_the_network_section() {
    let app = app();
    let (_, html) = get(&app, "/ui/tab/network").await;
    assert!(row(&html, "factor").is_none(), "no Factor for LoRA");
    let (status, html) = post_form(&app, "/ui/tab/network", "network_algo=lokr&network_dim=8").await;
    assert_eq!(status, StatusCode::OK);
    assert!(row(&html, "factor").is_some(), "Factor appears for LoKr");
    assert!(row(&html, "factor").unwrap().contains("class=\"tip\""), "with its tooltip");
    // The draft survives switching tabs: go elsewhere and come back.
    get(&app, "/ui/tab/dataset").await;
    let (_, html) = get(&app, "/ui/tab/network").await;
    assert!(html.contains("<option value=\"lokr\" selected>"), "LoKr still selected");
    // A tab switch carries the open form along: typed values are kept even without a change event,
    // and only the posted section's own fields are taken.
    let (_, html) = post_form(&app, "/ui/tab/dataset", "_section=saving&output_name=typed_name&resolution=128").await;
    assert!(html.contains("id=\"section-dataset\""));
    assert!(row(&html, "resolution").unwrap().contains("value=\"512\""), "a saving form cannot set resolution");
    let (_, html) = get(&app, "/ui/tab/saving").await;
    assert!(row(&html, "output_name").unwrap().contains("value=\"typed_name\""));
    // Model family SDXL greys clip skip (value kept) and moves the resolution default.
    let (_, html) = post_form(&app, "/ui/tab/model", "model_family=sdxl&clip_skip=2").await;
    let clip = row(&html, "clip_skip").unwrap();
    assert!(clip.contains("disabled") && clip.contains("value=\"2\""), "{clip}");
    let (_, html) = get(&app, "/ui/tab/dataset").await;
    assert!(row(&html, "resolution").unwrap().contains("value=\"1024\""));
}

#[tokio::test]
async fn bad_form_values_show_next_to_their_field_and_block_saving() {
    let app = app();
    let (_, html) = post_form(&app, "/ui/tab/dataset", "resolution=16&train_data_dir=%2Fdata%2Fimgs").await;
    let res = row(&html, "resolution").unwrap();
    assert!(res.contains("class=\"error\"") && res.contains("at least 32"), "{res}");
    assert!(res.contains("value=\"16\""), "the bad value is shown back");
    assert!(html.contains("class=\"badge\""), "the tab shows a problem count");
    let (_, html) = post_form(&app, "/ui/tab/dataset", "resolution=abc").await;
    assert!(row(&html, "resolution").unwrap().contains("whole number"));
    let (_, html) = post_form(&app, "/ui/presets", "name=mine").await;
    assert!(html.contains("Not saved") && html.contains("Resolution"), "save refused, naming the field");
    let (_, list) = json_req(&app, "GET", "/api/presets", Value::Null).await;
    assert_eq!(list["presets"], json!([]), "nothing saved");
}

#[tokio::test]
async fn presets_from_the_form_save_load_duplicate_rename_delete() {
    let app = app();
    post_form(&app, "/ui/tab/model", "model_family=sdxl&pretrained_model_name_or_path=%2Fm%2Fsdxl.safetensors").await;
    post_form(&app, "/ui/tab/dataset", "train_data_dir=%2Fdata%2Fimgs").await;
    post_form(&app, "/ui/tab/network", "network_algo=lokr&factor=8").await;
    let (_, html) = post_form(&app, "/ui/presets", "name=SDXL+LoKr").await;
    assert!(html.contains("Saved preset &#39;SDXL LoKr&#39;"), "{html}");
    let (status, preset) = json_req(&app, "GET", "/api/presets/SDXL%20LoKr", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(preset["config"]["factor"], json!(8));
    assert_eq!(preset["config"]["resolution"], json!(1024));
    // Reset, then load it back into the form.
    post_form(&app, "/ui/draft/reset", "").await;
    let (_, html) = get(&app, "/ui/tab/network").await;
    assert!(row(&html, "factor").is_none());
    post_form(&app, "/ui/presets/SDXL%20LoKr/load", "").await;
    let (_, html) = get(&app, "/ui/tab/network").await;
    assert!(row(&html, "factor").unwrap().contains("value=\"8\""));
    let (_, html) = post_form(&app, "/ui/presets/SDXL%20LoKr/duplicate", "").await;
    assert!(html.contains("SDXL LoKr (copy)"));
    let (_, html) = post_form(&app, "/ui/presets/SDXL%20LoKr%20(copy)/rename", "new_name=Second").await;
    assert!(html.contains("Renamed"), "{html}");
    let (_, html) = post_form(&app, "/ui/presets/Second/rename", "new_name=SDXL+LoKr").await;
    assert!(html.contains("already exists"));
    post_form(&app, "/ui/presets/Second/delete", "").await;
    let (_, list) = json_req(&app, "GET", "/api/presets", Value::Null).await;
    let names: Vec<&str> = list["presets"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["SDXL LoKr"]);
}

#[tokio::test]
async fn preset_api_validates_and_round_trips() {
    let app = app();
    let good = json!({"name": "base", "config": {"model_family": "sd15", "train_data_dir": "/d", "pretrained_model_name_or_path": "/m.safetensors", "network_dim": 32}});
    let (status, body) = json_req(&app, "POST", "/api/presets", good.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _) = json_req(&app, "POST", "/api/presets", good).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let bad = json!({"name": "bad", "config": {"network_dim": 0, "resolution": 99999, "optimizer_type": "Adam9", "bogus": 1}});
    let (status, body) = json_req(&app, "POST", "/api/presets", bad).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let fields: Vec<&str> = body["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    for f in ["network_dim", "resolution", "optimizer_type", "bogus"] {
        assert!(fields.contains(&f), "{f} in {fields:?}");
    }
    let (status, body) = json_req(&app, "POST", "/api/presets", json!({"name": "", "config": {}})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["errors"][0]["field"], "name");
    let huge = json!({"name": "big", "config": {"training_comment": "x".repeat(2 << 20)}});
    let (status, _) = json_req(&app, "POST", "/api/presets", huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "oversize bodies are refused");
    let (status, body) = json_req(&app, "POST", "/api/presets", json!({"config": {}})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("name"), "{body}");
    // PUT replaces, validates; GET reflects; DELETE removes.
    let (status, _) = json_req(&app, "PUT", "/api/presets/base", json!({"config": {"train_data_dir": "/d", "pretrained_model_name_or_path": "/m", "network_dim": 64}})).await;
    assert_eq!(status, StatusCode::OK);
    let (_, p) = json_req(&app, "GET", "/api/presets/base", Value::Null).await;
    assert_eq!(p["config"]["network_dim"], json!(64));
    assert!(p["config"].as_object().unwrap().len() > 100, "stored resolved");
    let (status, _) = json_req(&app, "PUT", "/api/presets/base", json!({"config": {"network_dim": -3}})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (_, p) = json_req(&app, "GET", "/api/presets/base", Value::Null).await;
    assert_eq!(p["config"]["network_dim"], json!(64), "a refused PUT changes nothing");
    let (status, _) = json_req(&app, "DELETE", "/api/presets/base", Value::Null).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = json_req(&app, "GET", "/api/presets/base", Value::Null).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn fields_api_applies_the_rules() {
    let app = app();
    let (status, body) = json_req(&app, "GET", "/api/fields?section=network&network_algo=lokr", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    let factor = body["fields"].as_array().unwrap().iter().find(|f| f["key"] == "factor").unwrap();
    assert_eq!(factor["visible"], json!(true));
    assert_eq!(factor["value"], json!(-1));
    assert!(factor["help"].as_str().unwrap().len() > 10);
    let (_, body) = json_req(&app, "GET", "/api/fields?section=model&model_family=sdxl", Value::Null).await;
    let clip = body["fields"].as_array().unwrap().iter().find(|f| f["key"] == "clip_skip").unwrap();
    assert_eq!((clip["visible"].clone(), clip["enabled"].clone()), (json!(true), json!(false)));
    let (_, body) = json_req(&app, "GET", "/api/fields?section=dataset&model_family=sdxl", Value::Null).await;
    let res = body["fields"].as_array().unwrap().iter().find(|f| f["key"] == "resolution").unwrap();
    assert_eq!((res["value"].clone(), res["min"].clone()), (json!(1024), json!(512.0)));
    let (status, body) = json_req(&app, "GET", "/api/fields?section=nope", Value::Null).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].as_str().unwrap().contains("nope"));
    let (status, _) = json_req(&app, "GET", "/api/fields?section=network&zzz=1", Value::Null).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn access_token_guards_every_route() {
    let app = app_with_token(Some("0123456789abcdef-secret"));
    let (status, _) = send(&app, Request::get("/api/presets").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = send(&app, Request::get("/api/presets").header(header::AUTHORIZATION, "Bearer wrong").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = send(&app, Request::get("/api/presets").header(header::AUTHORIZATION, "Bearer 0123456789abcdef-secret").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let res = app.router.clone().oneshot(Request::get("/?token=0123456789abcdef-secret").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().get_all(header::SET_COOKIE).iter().any(|c| c.to_str().unwrap().starts_with("loft_token=")));
    assert!(app.dir.join("loft.db").exists());
}

/// Another web site driving the user's browser gets nothing: a rebinding host name is refused
/// outright, a cross-site form post or fetch changes nothing, the same origin and non-browser
/// clients pass.
#[tokio::test]
async fn other_sites_cannot_reach_a_loopback_server() {
    let app = app();
    let preset = |origin: Option<&str>, site: Option<&str>| {
        let mut req = Request::post("/api/presets").header(header::HOST, "127.0.0.1:7860").header(header::CONTENT_TYPE, "application/json");
        if let Some(o) = origin {
            req = req.header(header::ORIGIN, o);
        }
        if let Some(s) = site {
            req = req.header("sec-fetch-site", s);
        }
        let config = json!({"model_family": "sd15", "train_data_dir": "/d", "pretrained_model_name_or_path": "/m.safetensors"});
        req.body(Body::from(json!({"name": "p", "config": config}).to_string())).unwrap()
    };
    // DNS rebinding: the page's own name in Host, even for a GET.
    let (status, text) = send(&app, Request::get("/api/presets").header(header::HOST, "evil.example:7860").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{text}");
    assert!(text.contains("evil.example"), "{text}");
    // Cross-site writes, by Origin (another site, another local port, an opaque origin) or by
    // the browser's Sec-Fetch-Site.
    for (origin, site) in [
        (Some("http://evil.example"), None),
        (Some("http://127.0.0.1:8188"), Some("same-site")),
        (Some("null"), None),
        (None, Some("cross-site")),
    ] {
        let (status, text) = send(&app, preset(origin, site)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{origin:?} {site:?}: {text}");
        assert!(text.contains("cross-site"), "{text}");
    }
    let (_, list) = json_req(&app, "GET", "/api/presets", json!(null)).await;
    assert_eq!(list["presets"].as_array().map(|a| a.len()), Some(0), "nothing was saved: {list}");
    // The page itself, and clients that are not browsers.
    let (status, text) = send(&app, preset(Some("http://127.0.0.1:7860"), Some("same-origin"))).await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let (status, _) = send(&app, Request::get("/").header(header::HOST, "localhost:7860").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = json_req(&app, "DELETE", "/api/presets/p", json!(null)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

/// The form's configuration as kohya sd-scripts' --config_file TOML: the JSON API, the
/// "sd-scripts…" panel (problems first when the form is not valid) and the download.
#[tokio::test]
async fn sd_scripts_export_over_http() {
    let app = app();
    let config = json!({"model_family": "sdxl", "pretrained_model_name_or_path": "/m.safetensors", "train_data_dir": "/d", "network_algo": "lokr"});
    let (status, body) = json_req(&app, "POST", "/api/export/sd-scripts", json!({"config": config})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["script"], "sdxl_train_network.py");
    assert!(body["toml"].as_str().unwrap().contains("network_module = \"lycoris.kohya\""), "{body}");
    let (status, body) = json_req(&app, "POST", "/api/export/sd-scripts", json!({"config": {"network_dim": -1}})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["errors"].as_array().unwrap().iter().any(|e| e["field"] == "network_dim"), "{body}");

    // The form: refused with the fields to fix, then shown once the paths are given.
    let (_, html) = post_form(&app, "/ui/export/sd-scripts", "").await;
    assert!(html.contains("Not exported") && html.contains("Training images"), "{html}");
    post_form(&app, "/ui/tab/model", "pretrained_model_name_or_path=%2Fm%2Fsd15").await;
    let (_, html) = post_form(&app, "/ui/export/sd-scripts", "_section=dataset&train_data_dir=%2Fdata%2Fimgs").await;
    assert!(html.contains("accelerate launch train_network.py") && html.contains("train_data_dir = &#34;/data/imgs&#34;"), "{html}");
    let res = app.router.clone().oneshot(Request::get("/ui/export/sd-scripts.toml").header(header::COOKIE, COOKIE).body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers()[header::CONTENT_DISPOSITION].to_str().unwrap().contains("sd-scripts.toml"));
    let text = String::from_utf8(to_bytes(res.into_body(), usize::MAX).await.unwrap().to_vec()).unwrap();
    let parsed: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(parsed["model"]["pretrained_model_name_or_path"].as_str(), Some("/m/sd15"));
}

#[test]
fn an_old_database_upgrades_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loft.db");
    {
        // A database left by a Loft that knew only the first migration, with a preset in it.
        let mut conn = rusqlite::Connection::open(&path).unwrap();
        loft::db::migrations().to_version(&mut conn, 1).unwrap();
        conn.execute("INSERT INTO presets (name, config) VALUES ('old', '{\"network_dim\": 12}')", []).unwrap();
        assert_eq!(loft::db::schema_version(&conn).unwrap(), 1);
    }
    let db = loft::db::Db::open(&path).unwrap();
    let conn = db.conn();
    assert_eq!(loft::db::schema_version(&conn).unwrap(), loft::db::latest_version());
    let (config, description): (String, String) =
        conn.query_row("SELECT config, description FROM presets WHERE name = 'old'", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    assert_eq!((config.as_str(), description.as_str()), ("{\"network_dim\": 12}", ""));
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
    drop(conn);
    drop(db);

    // A database from before converted files: its job files survive the artifacts table's
    // rebuild, ids and all, and a converted file can be recorded.
    let path = dir.path().join("v3.db");
    {
        let mut conn = rusqlite::Connection::open(&path).unwrap();
        loft::db::migrations().to_version(&mut conn, 3).unwrap();
        conn.execute("INSERT INTO jobs (name, config, seq) VALUES ('j', '{}', 1)", []).unwrap();
        conn.execute("INSERT INTO artifacts (id, job_id, kind, path, step, epoch) VALUES (7, 1, 'epoch', '/x/a.safetensors', 3, 1)", []).unwrap();
        assert!(conn.execute("INSERT INTO artifacts (job_id, kind, path) VALUES (1, 'converted', '/x/b.safetensors')", []).is_err());
    }
    let db = loft::db::Db::open(&path).unwrap();
    let conn = db.conn();
    let (id, kind, step): (i64, String, i64) = conn.query_row("SELECT id, kind, step FROM artifacts", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap();
    assert_eq!((id, kind.as_str(), step), (7, "epoch", 3));
    conn.execute("INSERT INTO artifacts (job_id, kind, path) VALUES (1, 'converted', '/x/b.safetensors')", []).unwrap();
    assert!(conn.execute("INSERT INTO artifacts (job_id, kind, path) VALUES (1, 'nonsense', '/x/c')", []).is_err());
}

#[test]
fn start_up_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let err = open_state(&file.join("data"), None).err().unwrap();
    assert!(format!("{err:#}").contains("cannot create the data directory"), "{err:#}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = rt
        .block_on(loft::server::serve(loft::server::ServeOptions {
            bind: "127.0.0.1".parse().unwrap(),
            port,
            data_dir: dir.path().join("d"),
            access_token: None,
            allow_root: vec![],
            jobs: Default::default(),
        }))
        .unwrap_err();
    assert!(err.to_string().contains(&format!("port {port}")) && err.to_string().contains("already in use"), "{err}");
    let err = rt
        .block_on(loft::server::serve(loft::server::ServeOptions {
            bind: "0.0.0.0".parse().unwrap(),
            port: 0,
            data_dir: dir.path().join("d"),
            access_token: None,
            allow_root: vec![],
            jobs: Default::default(),
        }))
        .unwrap_err();
    assert!(err.to_string().contains("--token"), "{err}");
}

/// The Network tab says, before training, how ComfyUI, A1111/Forge and diffusers will load the
/// current choice, and warns where one falls short.
#[tokio::test]
async fn network_tab_warns_when_a_client_misreads_the_choice() {
    let app = app();
    let (_, html) = get(&app, "/ui/tab/network").await;
    assert!(html.contains("id=\"clients\"") && html.contains("Clients that load this network"), "plain LoRA: every client exact");
    assert!(!html.contains("Not every client"));
    let (_, html) = post_form(&app, "/ui/tab/network", "_section=network&network_algo=ia3").await;
    assert!(html.contains("Not every client will apply this network"), "IA3 warns");
    assert!(html.contains("ComfyUI has no IA3 loader") && html.contains("Convert to LoRA"), "and says what to do");
    let (_, html) = post_form(&app, "/ui/tab/network", "_section=network&network_algo=lycoris_locon&dora_wd=true&wd_on_output=true").await;
    assert!(html.contains("DoRA per output row"), "DoRA per row: ComfyUI misreads it");
    assert!(html.contains("dora_scale"), "diffusers drops DoRA's scale");
    // Other tabs have no such box.
    let (_, html) = get(&app, "/ui/tab/dataset").await;
    assert!(!html.contains("id=\"clients\""));
}

/// "Convert to LoRA…" on a job's file: the file table shows each client's verdict and offers the
/// conversion; the preview gives ranks and energy and writes nothing; writing adds the plain
/// LoRA to the job's files, where every client is exact. The JSON API does the same.
#[tokio::test]
async fn a_job_file_converts_to_a_plain_lora_from_its_page() {
    use loft::jobs::queue::{PostedEvent, RunEnd};
    use loft::jobs::JobSource;
    use loft_worker::train::{CheckpointKind, TrainEvent};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let state = open_state(&data, None).unwrap();
    let jobs = state.jobs.clone();
    let app = App { router: router(state), dir: data.clone(), _dir: tempfile::tempdir().unwrap() };
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let ds = dir.path().join("dataset/5_thing");
    std::fs::create_dir_all(&ds).unwrap();
    image::RgbImage::from_pixel(32, 32, image::Rgb([10, 20, 30])).save(ds.join("a.png")).unwrap();
    let config = json!({
        "pretrained_model_name_or_path": fixtures.join("tiny-sd15"),
        "train_data_dir": ds.parent().unwrap(),
        "output_name": "x",
    });
    let id = jobs.enqueue(Some("lokr"), JobSource::Config(config.as_object().unwrap()), 0).unwrap();
    let claim = jobs.claim("w", std::time::Duration::from_secs(60)).unwrap().unwrap();
    std::fs::create_dir_all(jobs.job_dir(id)).unwrap();
    let file = jobs.job_dir(id).join("x-000001.safetensors");
    std::fs::copy(fixtures.join("merge/tiny-sd15-lokr.safetensors"), &file).unwrap();
    let saved = TrainEvent::Checkpoint { step: 4, epoch: 1, checkpoint: CheckpointKind::Epoch, path: file.clone() };
    jobs.record(id, &claim.lease, &[PostedEvent { seq: 1, event: saved }], std::time::Duration::from_secs(60)).unwrap();
    jobs.finish(id, &claim.lease, &RunEnd::Done { final_step: 4, network_file: None, cancelled: false }).unwrap();
    let artifact = jobs.artifacts(id).unwrap().into_iter().find(|a| a.kind == "epoch").unwrap().id;

    let (status, page) = get(&app, &format!("/jobs/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("badge level-loads") && page.contains("badge level-no"), "LoKr: A1111 loads, diffusers does not");
    assert!(page.contains(&format!("/ui/jobs/{id}/files/{artifact}/convert")), "offers Convert to LoRA…");

    let (_, panel) = get(&app, &format!("/ui/jobs/{id}/files/{artifact}/convert")).await;
    assert!(panel.contains("x-000001.safetensors") && panel.contains("value=\"0.999\""), "{panel}");
    let url = format!("/ui/jobs/{id}/files/{artifact}/convert");
    let (_, preview) = post_form(&app, &url, "how=energy&energy=0.999&apply=0").await;
    assert!(preview.contains("Retained energy") && preview.contains("Write x-000001-lora.safetensors"), "{preview}");
    assert!(!jobs.job_dir(id).join("x-000001-lora.safetensors").exists(), "a preview writes nothing");
    let (_, bad) = post_form(&app, &url, "how=rank&rank=abc&apply=0").await;
    assert!(bad.contains("Rank must be a whole number"), "{bad}");
    let (_, written) = post_form(&app, &url, "how=energy&energy=0.999&apply=1").await;
    assert!(written.contains("Wrote ") && written.contains("hx-swap-oob"), "{written}");
    let converted = jobs.job_dir(id).join("x-000001-lora.safetensors");
    let f = loft_worker::lora_file::LoraFile::load(&converted).unwrap();
    assert_eq!(f.metadata["ss_network_module"], "networks.lora");
    let rows = jobs.artifacts(id).unwrap();
    let row = rows.iter().find(|a| a.kind == "converted").expect("the converted file is one of the job's files");
    assert!(row.label.contains("energy"), "{}", row.label);
    let (_, page) = get(&app, &format!("/jobs/{id}")).await;
    assert!(page.contains("x-000001-lora.safetensors"));

    // The JSON API: a full-rank preview keeps all the energy; bad requests name the field.
    let api = format!("/api/jobs/{id}/files/{artifact}/convert");
    let (status, r) = json_req(&app, "POST", &api, json!({ "rank": 100000 })).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert!((r["retained_energy"].as_f64().unwrap() - 1.0).abs() < 1e-9 && r["written"].is_null(), "{r}");
    let (status, r) = json_req(&app, "POST", &api, json!({ "rank": 4, "energy": 0.9 })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{r}");
    let (status, r) = json_req(&app, "POST", &api, json!({ "energy": 1.5 })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r["errors"][0]["field"], "energy", "{r}");
    let (status, r) = json_req(&app, "POST", &api, json!({ "energy": 0.99, "apply": true })).await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    assert!(r["written"].as_str().unwrap().ends_with("x-000001-lora-2.safetensors"), "{r}");
    let (status, _) = json_req(&app, "POST", &format!("/api/jobs/{id}/files/99999/convert"), json!({ "energy": 0.99 })).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let _ = app.dir;
}
