//! Datasets over HTTP, in-process: create/list/read/delete, uploads that are checked image by
//! image (and leave nothing behind when refused), a traversal corpus against every route that
//! takes a name, bulk caption operations with preview and undo, and the pages.

use axum::body::{to_bytes, Body};
use axum::http::{header, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tower::ServiceExt;

use loft::server::open_state;
use loft::web::{router, AppState};

struct App {
    router: Router,
    data: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn app_with(edit: impl FnOnce(&mut AppState)) -> App {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut state = open_state(&data, None).unwrap();
    edit(&mut state);
    App { router: router(state), data, _dir: dir }
}

fn app() -> App {
    // Small images keep the tests fast: the shortest side allowed is 32 here (256 by default).
    app_with(|s| s.datasets.limits.min_side = 32)
}

async fn send(app: &App, req: Request<Body>) -> (StatusCode, String) {
    let res = app.router.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let body = to_bytes(res.into_body(), usize::MAX).await.unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn json_req(app: &App, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    let req = Request::builder().method(method).uri(uri).header(header::CONTENT_TYPE, "application/json");
    let req = req.body(body.map(|b| Body::from(b.to_string())).unwrap_or_else(Body::empty)).unwrap();
    let (status, text) = send(app, req).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn png(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
    let mut out = std::io::Cursor::new(vec![]);
    image::RgbImage::from_pixel(w, h, image::Rgb(rgb)).write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let mut out = std::io::Cursor::new(vec![]);
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 3) as u8, (y * 5) as u8, 120])).write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn webp(w: u32, h: u32) -> Vec<u8> {
    let mut out = std::io::Cursor::new(vec![]);
    image::RgbaImage::from_pixel(w, h, image::Rgba([200, 100, 50, 255])).write_to(&mut out, image::ImageFormat::WebP).unwrap();
    out.into_inner()
}

/// A multipart body: `(field, file name or None, bytes)`.
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "loftboundary7MA4YWxkTrZu0gW";
    let mut body = vec![];
    for (field, file, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match file {
            Some(f) => body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{field}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes()),
            None => body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{field}\"\r\n\r\n").as_bytes()),
        }
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn upload(app: &App, dataset: &str, parts: &[(&str, Option<&str>, &[u8])]) -> (StatusCode, Value) {
    let (content_type, body) = multipart(parts);
    let req = Request::post(format!("/api/datasets/{dataset}/images")).header(header::CONTENT_TYPE, content_type).body(Body::from(body)).unwrap();
    let (status, text) = send(app, req).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Every file under `dir`, relative, sorted (dot-files included: nothing half-written may hide).
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = vec![];
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[tokio::test]
async fn create_list_read_and_delete() {
    let app = app();
    let (s, v) = json_req(&app, "POST", "/api/datasets", Some(json!({"name": "my cat"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, _) = json_req(&app, "POST", "/api/datasets", Some(json!({"name": "my cat"}))).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, v) = json_req(&app, "POST", "/api/datasets", Some(json!({"name": "bad:name"}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"].as_str().unwrap().contains("':'"), "{v}");
    let (s, v) = json_req(&app, "POST", "/api/datasets/my%20cat/subsets", Some(json!({"name": "ohwx cat", "repeats": 10}))).await;
    assert_eq!((s, v["subset"].as_str()), (StatusCode::CREATED, Some("10_ohwx cat")));
    let (s, v) = json_req(&app, "PUT", "/api/datasets/my%20cat/subsets/10_ohwx%20cat", Some(json!({"repeats": 4}))).await;
    assert_eq!((s, v["subset"].as_str()), (StatusCode::OK, Some("4_ohwx cat")), "{v}");
    assert!(app.data.join("datasets/my cat/4_ohwx cat").is_dir());
    let (s, v) = upload(&app, "my%20cat", &[("subset", None, b"4_ohwx cat"), ("files", Some("a.png"), &png(40, 48, [9, 9, 9])), ("files", Some("a.txt"), b"a cat, sitting")]).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = json_req(&app, "GET", "/api/datasets", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["datasets"][0]["name"], "my cat");
    assert_eq!(v["datasets"][0]["images"], 1);
    let (s, v) = json_req(&app, "GET", "/api/datasets/my%20cat", None).await;
    assert_eq!(s, StatusCode::OK);
    let img = &v["subsets"][0]["images"][0];
    assert_eq!((img["file"].as_str(), img["width"].as_u64(), img["height"].as_u64(), img["caption"].as_str()), (Some("a.png"), Some(40), Some(48), Some("a cat, sitting")));
    assert_eq!(v["subsets"][0]["repeats"], 4);
    let (s, _) = json_req(&app, "GET", "/api/datasets/nope", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    json_req(&app, "POST", "/api/datasets", Some(json!({"name": "other"}))).await;
    let (s, _) = json_req(&app, "PUT", "/api/datasets/my%20cat", Some(json!({"name": "other"}))).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = json_req(&app, "PUT", "/api/datasets/my%20cat", Some(json!({"name": "../escape"}))).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = json_req(&app, "PUT", "/api/datasets/my%20cat", Some(json!({"name": "cats"}))).await;
    assert_eq!((s, v["name"].as_str()), (StatusCode::OK, Some("cats")));
    assert!(app.data.join("datasets/cats/4_ohwx cat/a.png").is_file());
    let (s, _) = json_req(&app, "DELETE", "/api/datasets/cats", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(!app.data.join("datasets/cats").exists());
}

#[tokio::test]
async fn uploads_are_checked_one_by_one_and_refused_files_leave_nothing() {
    let app = app_with(|s| {
        s.datasets.limits.min_side = 32;
        s.datasets.limits.max_file_bytes = 20_000;
    });
    json_req(&app, "POST", "/api/datasets", Some(json!({"name": "set"}))).await;
    let good_jpeg = jpeg(64, 40);
    let cut_jpeg = &good_jpeg[..good_jpeg.len() / 2];
    let p = png(50, 50, [1, 2, 3]);
    let big = vec![0u8; 30_000];
    let (s, v) = upload(
        &app,
        "set",
        &[
            ("files", Some("photo.jpg"), &good_jpeg),
            ("files", Some("photo.txt"), b"1girl, smile\n"),
            ("files", Some("web.webp"), &webp(40, 40)),
            ("files", Some("flat.png"), &p),
            ("files", Some("cut.jpg"), cut_jpeg),
            ("files", Some("cut.png"), &p[..p.len() - 20]),
            ("files", Some("notes.png"), b"this is not an image"),
            ("files", Some("renamed.jpg"), &p),
            ("files", Some("tiny.png"), &png(16, 64, [5, 5, 5])),
            ("files", Some("huge.png"), &big),
            ("files", Some("script.exe"), b"MZ"),
            ("files", Some("../../escape.png"), &p),
            ("files", Some("orphan.txt"), b"no image"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let accepted: Vec<&str> = v["accepted"].as_array().unwrap().iter().map(|a| a["file"].as_str().unwrap()).collect();
    assert_eq!(accepted, ["photo.jpg", "web.webp", "flat.png", "escape.png", "photo.txt"], "{v}");
    let reason = |f: &str| v["rejected"].as_array().unwrap().iter().find(|r| r["file"] == f).map(|r| r["reason"].as_str().unwrap().to_string()).unwrap_or_else(|| panic!("{f} not rejected: {v}"));
    assert!(reason("cut.jpg").contains("truncated"));
    assert!(reason("cut.png").contains("truncated"));
    assert!(reason("notes.png").contains("not an image"));
    assert!(reason("renamed.jpg").contains("PNG file named .jpg"));
    assert!(reason("tiny.png").contains("16×64") && reason("tiny.png").contains("32"));
    assert!(reason("huge.png").contains("20000 byte limit"));
    assert!(reason("script.exe").contains(".exe is not accepted"));
    assert!(reason("orphan.txt").contains("no image named orphan"));
    // Only the accepted files are on disk: no part files, nothing of the refused ones.
    let dir = app.data.join("datasets/set");
    assert_eq!(files_under(&dir), ["1_set/escape.png", "1_set/flat.png", "1_set/photo.jpg", "1_set/photo.txt", "1_set/web.webp"]);
    assert_eq!(std::fs::read_to_string(dir.join("1_set/photo.txt")).unwrap(), "1girl, smile\n");
    // A second upload of the same name is stored beside it, never over it.
    let (_, v) = upload(&app, "set", &[("files", Some("flat.png"), &png(40, 40, [7, 7, 7])), ("files", Some("flat.txt"), b"second")]).await;
    assert_eq!(v["accepted"][0]["file"], "flat_1.png", "{v}");
    assert_eq!(std::fs::read_to_string(dir.join("1_set/flat_1.txt")).unwrap(), "second");
    // Everything refused: 400, and the same report.
    let (s, v) = upload(&app, "set", &[("files", Some("x.png"), b"nope")]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["rejected"][0]["file"], "x.png");
    // An unknown subset or dataset: refused before anything is written.
    let (s, _) = upload(&app, "set", &[("subset", None, b"9_nothing"), ("files", Some("y.png"), &p)]).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = upload(&app, "other", &[("files", Some("y.png"), &p)]).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(files_under(&dir).len(), 7);
}

#[tokio::test]
async fn a_request_over_the_limit_keeps_nothing() {
    let app = app_with(|s| {
        s.datasets.limits.min_side = 32;
        s.datasets.limits.max_request_bytes = 3000;
    });
    json_req(&app, "POST", "/api/datasets", Some(json!({"name": "set"}))).await;
    let p = png(40, 40, [1, 1, 1]);
    assert!(p.len() < 1500, "{}", p.len());
    let (s, v) = upload(&app, "set", &[("files", Some("a.png"), &p), ("files", Some("b.png"), &png(300, 300, [1, 2, 3])), ("files", Some("c.png"), &jpeg(300, 300))]).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(files_under(&app.data.join("datasets/set")), Vec::<String>::new(), "a.png was removed again");
}

#[tokio::test]
async fn traversal_and_symlink_escapes_are_forbidden_and_touch_nothing() {
    let app = app();
    json_req(&app, "POST", "/api/datasets", Some(json!({"name": "set"}))).await;
    upload(&app, "set", &[("files", Some("a.png"), &png(40, 40, [1, 1, 1]))]).await;
    // A symlink inside the root that points out of it.
    let outside = app.data.parent().unwrap().join("outside");
    std::fs::create_dir_all(outside.join("1_x")).unwrap();
    std::fs::write(outside.join("1_x/secret.png"), png(40, 40, [0, 0, 0])).unwrap();
    std::os::unix::fs::symlink(&outside, app.data.join("datasets/link")).unwrap();
    std::os::unix::fs::symlink(&outside, app.data.join("datasets/set/1_link")).unwrap();
    let names = ["..", "%2e%2e", "..%2F..%2Fetc", "%2e%2e%2fpasswd", "..%5C..%5Cwindows", "%252e%252e", "%2Fetc", ".hidden", "link"];
    for n in names {
        // `link` is a dataset that resolves out of the root; as a subset or file name it is
        // simply absent (404), so only the dataset-level routes are checked with it.
        let dataset_level = 10;
        let uris = [
            ("GET", format!("/api/datasets/{n}")),
            ("DELETE", format!("/api/datasets/{n}")),
            ("PUT", format!("/api/datasets/{n}")),
            ("POST", format!("/api/datasets/{n}/subsets")),
            ("POST", format!("/api/datasets/{n}/captions")),
            ("GET", format!("/api/datasets/{n}/tags")),
            ("POST", format!("/api/datasets/{n}/import")),
            ("POST", format!("/api/datasets/{n}/tag")),
            ("GET", format!("/datasets/{n}")),
            ("GET", format!("/datasets/{n}?tag=x")),
            ("PUT", format!("/api/datasets/set/captions/{n}/a.png")),
            ("PUT", format!("/api/datasets/set/captions/1_set/{n}")),
            ("GET", format!("/datasets/set/thumbs/1_set/{n}")),
            ("GET", format!("/datasets/set/thumbs/{n}/a.png")),
            ("DELETE", format!("/api/datasets/set/subsets/{n}")),
        ];
        for (method, uri) in uris.into_iter().take(if n == "link" { dataset_level } else { usize::MAX }) {
            let body = match (method, uri.rsplit('/').next().unwrap_or("")) {
                ("POST", "subsets") | ("PUT", _) if !uri.contains("/captions/") => Some(json!({"name": "x"})),
                ("POST", "captions") => Some(json!({"op": "sort", "apply": true})),
                ("POST", "import") => Some(json!({"folder": "/tmp"})),
                ("POST", "tag") => Some(json!({"model_dir": "/tmp"})),
                _ => None,
            };
            let (s, v) = json_req(&app, method, &uri, body).await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{method} {uri}: {v}");
        }
        let (s, _) = upload(&app, n, &[("files", Some("z.png"), &png(40, 40, [2, 2, 2]))]).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "upload to {n}");
    }
    // The subset symlink is forbidden too (it resolves out of the root).
    let (s, _) = json_req(&app, "GET", "/datasets/set/thumbs/1_link/secret.png", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = json_req(&app, "DELETE", "/api/datasets/set/subsets/1_link", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(outside.join("1_x/secret.png").is_file(), "nothing outside the root was touched");
    assert_eq!(files_under(&outside), ["1_x/secret.png"]);
}

#[tokio::test]
async fn bulk_caption_operations_preview_apply_and_undo() {
    let app = app();
    json_req(&app, "POST", "/api/datasets", Some(json!({"name": "set"}))).await;
    let p = png(40, 40, [3, 3, 3]);
    upload(&app, "set", &[("files", Some("a.png"), &p), ("files", Some("a.txt"), b"1girl, smile, watermark\n"), ("files", Some("b.png"), &p), ("files", Some("b.txt"), b"1girl, Smile, smile, hat")]).await;
    let dir = app.data.join("datasets/set/1_set");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let captions = |op: Value| json_req(&app, "POST", "/api/datasets/set/captions", Some(op));

    // A preview changes nothing.
    let (s, v) = captions(json!({"op": "trigger", "word": "ohwx"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["applied"].as_bool(), v["files"].as_u64(), v["changes"].as_array().unwrap().len()), (Some(false), Some(2), 2));
    assert_eq!(v["changes"][0], json!({"file": "1_set/a.png", "before": "1girl, smile, watermark", "after": "ohwx, 1girl, smile, watermark"}));
    assert_eq!(read("a.txt"), "1girl, smile, watermark\n");
    // Applied, and never twice.
    captions(json!({"op": "trigger", "word": "ohwx", "apply": true})).await;
    assert_eq!(read("a.txt"), "ohwx, 1girl, smile, watermark\n");
    let (_, v) = captions(json!({"op": "trigger", "word": "ohwx", "apply": true})).await;
    assert_eq!(v["changes"].as_array().unwrap().len(), 0);
    // Each operation, on a selection or a subset.
    captions(json!({"op": "remove", "tags": ["WATERMARK"], "apply": true, "files": ["1_set/a.png"]})).await;
    assert_eq!(read("a.txt"), "ohwx, 1girl, smile\n");
    captions(json!({"op": "dedupe", "apply": true, "subset": "1_set"})).await;
    assert_eq!(read("b.txt"), "ohwx, 1girl, Smile, hat\n");
    captions(json!({"op": "sort", "apply": true})).await;
    assert_eq!(read("b.txt"), "1girl, hat, ohwx, Smile\n");
    let (_, v) = captions(json!({"op": "replace", "find": "^1girl", "with": "1woman", "regex": true, "apply": true})).await;
    assert_eq!(v["changes"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(read("a.txt"), "1woman, ohwx, smile\n");
    // Undo puts back what the last operation changed: preview first, then apply; then there is
    // nothing left to undo.
    let (_, v) = captions(json!({"op": "undo"})).await;
    assert_eq!(v["changes"][0]["after"], "1girl, ohwx, smile");
    assert_eq!(read("a.txt"), "1woman, ohwx, smile\n");
    captions(json!({"op": "undo", "apply": true})).await;
    assert_eq!((read("a.txt"), read("b.txt")), ("1girl, ohwx, smile\n".to_string(), "1girl, hat, ohwx, Smile\n".to_string()));
    let (s, _) = captions(json!({"op": "undo", "apply": true})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Bad requests are named and write nothing.
    for (op, needle) in [(json!({"op": "shout"}), "op"), (json!({"op": "trigger"}), "word"), (json!({"op": "replace", "find": "(", "regex": true}), "regular expression"), (json!({"op": "sort", "files": ["1_set/zzz.png"]}), "zzz.png"), (json!({"op": "sort", "bogus": 1}), "bogus")] {
        let (s, v) = captions(op.clone()).await;
        assert!(s.is_client_error() && v.to_string().contains(needle), "{op}: {s} {v}");
    }
    // An image without a caption: a trigger gives it one, undo takes the file away again (an
    // empty caption file would train an empty caption, and sd-scripts refuses one); saving an
    // empty caption removes the file too.
    upload(&app, "set", &[("files", Some("c.png"), &p)]).await;
    captions(json!({"op": "trigger", "word": "ohwx", "apply": true, "files": ["1_set/c.png"]})).await;
    assert_eq!(read("c.txt"), "ohwx\n");
    captions(json!({"op": "undo", "apply": true})).await;
    assert!(!dir.join("c.txt").exists());
    captions(json!({"op": "trigger", "word": "ohwx", "apply": true, "files": ["1_set/c.png"]})).await;
    let req = Request::put("/api/datasets/set/captions/1_set/c.png").body(Body::from("  \n")).unwrap();
    assert_eq!(send(&app, req).await.0, StatusCode::NO_CONTENT);
    assert!(!dir.join("c.txt").exists());
    // One caption, edited in place.
    let req = Request::put("/api/datasets/set/captions/1_set/b.png").body(Body::from("a hat\r\nsecond line")).unwrap();
    assert_eq!(send(&app, req).await.0, StatusCode::NO_CONTENT);
    assert_eq!(read("b.txt"), "a hat\nsecond line\n");
    let (s, v) = json_req(&app, "GET", "/api/datasets/set/tags", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["tags"][0], json!({"tag": "1girl", "count": 1}));
    // Filtered by a tag: the API and the page show only the images that have it.
    let (_, v) = json_req(&app, "GET", "/api/datasets/set?tag=OHWX", None).await;
    let files: Vec<&str> = v["subsets"][0]["images"].as_array().unwrap().iter().map(|i| i["file"].as_str().unwrap()).collect();
    assert_eq!(files, ["a.png"]);
    let (_, html) = send(&app, Request::get("/datasets/set?tag=ohwx").body(Body::empty()).unwrap()).await;
    assert!(html.contains("id=\"tag-filter\"") && html.contains("Caption of a.png") && !html.contains("Caption of b.png"), "{html}");
}

#[tokio::test]
async fn pages_thumbnails_and_the_form_flow() {
    let app = app();
    let (s, html) = send(&app, Request::get("/datasets").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(html.contains("No dataset yet") && html.contains("aria-current=\"page\">Datasets"), "{html}");
    let req = Request::post("/ui/datasets").header(header::CONTENT_TYPE, "application/x-www-form-urlencoded").body(Body::from("name=cats+and+dogs")).unwrap();
    let res = app.router.clone().oneshot(req).await.unwrap();
    assert_eq!(res.headers()["HX-Redirect"], "/datasets/cats%20and%20dogs");
    upload(&app, "cats%20and%20dogs", &[("files", Some("c.png"), &png(300, 200, [250, 10, 10])), ("files", Some("c.txt"), b"red, cat")]).await;
    let (s, html) = send(&app, Request::get("/datasets/cats%20and%20dogs").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(html.contains("/datasets/cats%20and%20dogs/thumbs/1_cats%20and%20dogs/c.png") && html.contains("red, cat") && html.contains("300×200"), "{html}");
    let res = app.router.clone().oneshot(Request::get("/datasets/cats%20and%20dogs/thumbs/1_cats%20and%20dogs/c.png").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(res.headers()[header::CONTENT_TYPE], "image/jpeg");
    let bytes = to_bytes(res.into_body(), usize::MAX).await.unwrap();
    let thumb = image::load_from_memory(&bytes).unwrap();
    assert!(thumb.width() == 256 && (170..=171).contains(&thumb.height()), "{}×{}", thumb.width(), thumb.height());
    // The bulk form previews, then applies with the same values.
    let req = Request::post("/ui/datasets/cats%20and%20dogs/captions").header(header::CONTENT_TYPE, "application/x-www-form-urlencoded").body(Body::from("op=trigger&word=ohwx&position=end&subset=")).unwrap();
    let (_, html) = send(&app, req).await;
    assert!(html.contains("would change") && html.contains("red, cat, ohwx") && html.contains("name=\"apply\" value=\"true\""), "{html}");
    let req = Request::post("/ui/datasets/cats%20and%20dogs/captions").header(header::CONTENT_TYPE, "application/x-www-form-urlencoded").body(Body::from("op=trigger&word=ohwx&position=end&subset=&apply=true")).unwrap();
    let (_, html) = send(&app, req).await;
    assert!(html.contains("1 caption changed"), "{html}");
    assert_eq!(std::fs::read_to_string(app.data.join("datasets/cats and dogs/1_cats and dogs/c.txt")).unwrap(), "red, cat, ohwx\n");
}

const COOKIE: &str = "loft_draft=00112233445566778899aabbccddeeff";

async fn post_form(app: &App, uri: &str, form: &str) -> (StatusCode, String) {
    let req = Request::post(uri).header(header::COOKIE, COOKIE).header(header::CONTENT_TYPE, "application/x-www-form-urlencoded").body(Body::from(form.to_string())).unwrap();
    send(app, req).await
}

/// The Dataset tab offers the datasets as the training folder; the Queue button shows the
/// pre-flight (buckets, what is dropped) before queueing; a dataset with nothing usable is
/// refused by the API and the form.
#[tokio::test]
async fn the_dataset_picker_and_the_preflight_before_queueing() {
    let app = app();
    json_req(&app, "POST", "/api/datasets", Some(json!({"name": "good"}))).await;
    upload(&app, "good", &[("files", Some("a.png"), &png(48, 32, [1, 1, 1])), ("files", Some("a.txt"), b"a thing"), ("files", Some("b.png"), &png(32, 32, [9, 9, 9]))]).await;
    let good = app.data.join("datasets/good").canonicalize().unwrap();
    let req = Request::get("/ui/tab/dataset").header(header::COOKIE, COOKIE).body(Body::empty()).unwrap();
    let (_, html) = send(&app, req).await;
    assert!(html.contains("list=\"dl-train_data_dir\"") && html.contains(&format!("<option value=\"{}\" label=\"dataset good (2 images)\">", good.display())), "{html}");
    // Something the upload would refuse, put there by hand: the pre-flight names it.
    std::fs::write(good.join("1_good/broken.png"), b"not a png").unwrap();

    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/tiny-sd15");
    post_form(&app, "/ui/tab/model", &format!("pretrained_model_name_or_path={model}")).await;
    post_form(&app, "/ui/tab/dataset", &format!("train_data_dir={}&resolution=32&min_bucket_reso=16&max_bucket_reso=64&bucket_reso_steps=8", good.display())).await;
    let (s, html) = post_form(&app, "/ui/preflight", "").await;
    assert_eq!(s, StatusCode::OK);
    assert!(html.contains("id=\"queue-confirm\"") && html.contains("Ready to queue:</strong> 2 images"), "{html}");
    assert!(html.contains("broken.png") && html.contains("1 dropped"), "{html}");
    let (_, jobs) = json_req(&app, "GET", "/api/jobs", None).await;
    assert_eq!(jobs["jobs"], json!([]), "the pre-flight queues nothing");
    // The draft's sd-scripts dataset config downloads beside its TOML; kohya LoRA has no preset.
    let (s, toml) = send(&app, Request::get("/ui/export/dataset.toml").header(header::COOKIE, COOKIE).body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(toml.contains("[[datasets.subsets]]") && toml.contains("1_good") && toml.contains("class_tokens = \"good\""), "{toml}");
    let (s, _) = send(&app, Request::get("/ui/export/lycoris_preset.toml").header(header::COOKIE, COOKIE).body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Nothing usable: refused by name, by the API and the confirmation alike.
    json_req(&app, "POST", "/api/datasets", Some(json!({"name": "bad"}))).await;
    json_req(&app, "POST", "/api/datasets/bad/subsets", Some(json!({"name": "x", "repeats": 2}))).await;
    let bad = app.data.join("datasets/bad").canonicalize().unwrap();
    std::fs::write(bad.join("2_x/only.jpg"), b"nope").unwrap();
    let config = json!({"pretrained_model_name_or_path": model, "train_data_dir": bad, "resolution": 32});
    let (s, v) = json_req(&app, "POST", "/api/jobs", Some(json!({"config": config}))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(v.to_string().contains("train_data_dir") && v.to_string().contains("no usable training image") && v.to_string().contains("only.jpg"), "{v}");
    post_form(&app, "/ui/tab/dataset", &format!("train_data_dir={}", bad.display())).await;
    let (_, html) = post_form(&app, "/ui/preflight", "").await;
    assert!(html.contains("no usable training image") && !html.contains("queue-confirm"), "{html}");
}

/// `POST /api/datasets/{name}/tag` checks the request (dataset, a tagger folder inside an allowed
/// root, thresholds) and queues a job of the second kind; the queue's worker runner runs it and
/// the captions appear, with progress as training steps.
#[tokio::test]
async fn tagging_is_a_queued_job() {
    let tagger_src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tagger");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let state = open_state(&data, None).unwrap();
    let jobs = state.jobs.clone();
    let mut state = state;
    state.datasets.limits.min_side = 32;
    // The tagger is in a folder allowed with --allow-root; another folder is not allowed.
    let models = dir.path().join("models");
    std::fs::create_dir_all(models.join("wd14")).unwrap();
    for f in ["model.onnx", "selected_tags.csv"] {
        std::fs::copy(tagger_src.join("tiny-wd14").join(f), models.join("wd14").join(f)).unwrap();
    }
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    state.datasets.allow_roots(std::slice::from_ref(&models)).unwrap();
    let app = App { router: router(state), data: data.clone(), _dir: dir };
    json_req(&app, "POST", "/api/datasets", Some(json!({"name": "set"}))).await;
    let blue = std::fs::read(tagger_src.join("images/blue.png")).unwrap();
    let red = std::fs::read(tagger_src.join("images/red.png")).unwrap();
    upload(&app, "set", &[("files", Some("blue.png"), &blue), ("files", Some("red.png"), &red)]).await;

    for (body, status, needle) in [
        (json!({"model_dir": elsewhere}), StatusCode::FORBIDDEN, "outside the allowed folders"),
        (json!({"model_dir": models}), StatusCode::BAD_REQUEST, "model.onnx and selected_tags.csv"),
        (json!({"model_dir": models.join("wd14"), "general_threshold": 1.5}), StatusCode::BAD_REQUEST, "general_threshold"),
        (json!({"model_dir": models.join("wd14"), "mode": "append"}), StatusCode::BAD_REQUEST, "mode"),
        (json!({"model_dir": models.join("wd14").join("..%2F..")}), StatusCode::FORBIDDEN, "percent"),
    ] {
        let (s, v) = json_req(&app, "POST", "/api/datasets/set/tag", Some(body.clone())).await;
        assert_eq!(s, status, "{body}: {v}");
        assert!(v.to_string().contains(needle), "{body}: {v}");
    }
    let (s, _) = json_req(&app, "POST", "/api/datasets/nope/tag", Some(json!({"model_dir": models.join("wd14")}))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The page's forms name a typo instead of failing silently.
    let form = |uri: &str, body: String| Request::post(uri).header(header::CONTENT_TYPE, "application/x-www-form-urlencoded").body(Body::from(body)).unwrap();
    let (_, html) = send(&app, form("/ui/datasets/set/tag", format!("model_dir={}&general_threshold=0,35&character_threshold=0.85", models.join("wd14").display()))).await;
    assert!(html.contains("note bad") && html.contains("General ≥: &#34;0,35&#34; is not a number"), "{html}");
    let (_, html) = send(&app, form("/ui/datasets/set/subsets", "name=cat&repeats=ten".into())).await;
    assert!(html.contains("note bad") && html.contains("repeats"), "{html}");
    let (_, list) = json_req(&app, "GET", "/api/jobs", None).await;
    assert_eq!(list["jobs"], json!([]), "nothing queued by a refused request");

    let (s, v) = json_req(&app, "POST", "/api/datasets/set/tag", Some(json!({"model_dir": models.join("wd14"), "trigger": "ohwx", "exclude": ["solo"]}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_i64().unwrap();
    let (_, job) = json_req(&app, "GET", &format!("/api/jobs/{id}"), None).await;
    assert_eq!((job["name"].as_str(), job["config"]["job_kind"].as_str()), (Some("tag set"), Some("tag")), "{job}");
    // A trainer-only worker on another machine does not take it (it reads this machine's
    // folders); the worker beside the queue does, and runs it as `loft serve` does.
    let remote = jobs.claim_wait("remote r", std::time::Duration::from_secs(60), std::time::Duration::from_millis(10)).await.unwrap();
    assert!(remote.is_none(), "a remote worker took a tagging job");
    // ...but takes a training job queued behind it.
    let config = json!({"pretrained_model_name_or_path": "/m", "train_data_dir": data.join("datasets/set")});
    let train = jobs.enqueue(None, loft::jobs::JobSource::Config(config.as_object().unwrap()), 0).unwrap();
    let remote = jobs.claim_wait("remote r", std::time::Duration::from_secs(60), std::time::Duration::from_millis(10)).await.unwrap();
    assert_eq!(remote.map(|c| c.job_id), Some(train));
    let claim = jobs.claim("w", std::time::Duration::from_secs(60)).unwrap().unwrap();
    let spec = loft::jobs::runner::JobSpec { id, name: claim.name.clone(), config: claim.config.clone(), job_dir: jobs.job_dir(id), resume: false };
    let runner = loft::jobs::runner::EngineRunner { registry: std::sync::Arc::new(loft::registry::Registry::embedded().unwrap()), device: None };
    let mut events = loft_worker::train::EventLog::default();
    use loft::jobs::runner::JobRunner;
    let outcome = runner.run(&spec, &mut events, &loft_worker::train::CancelToken::new()).unwrap();
    assert_eq!(outcome.final_step, 2);
    let steps = events.0.iter().filter(|e| matches!(e, loft_worker::train::TrainEvent::Step { .. })).count();
    assert_eq!(steps, 2, "one step per image");
    let sub = data.join("datasets/set/1_set");
    assert_eq!(std::fs::read_to_string(sub.join("blue.txt")).unwrap(), "ohwx, blue theme, star (sky)\n");
    assert_eq!(std::fs::read_to_string(sub.join("red.txt")).unwrap(), "ohwx, ^_^, red theme\n");
}

fn zip_of(entries: &[(&str, &[u8])], symlink: Option<(&str, &str)>) -> Vec<u8> {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(vec![]));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in entries {
        w.start_file(*name, opts).unwrap();
        w.write_all(bytes).unwrap();
    }
    if let Some((name, target)) = symlink {
        w.add_symlink(name, target, opts).unwrap();
    }
    w.finish().unwrap().into_inner()
}

async fn import_zip(app: &App, dataset: &str, zip: &[u8]) -> (StatusCode, Value) {
    let (content_type, body) = multipart(&[("file", Some("set.zip"), zip)]);
    let req = Request::post(format!("/api/datasets/{dataset}/import")).header(header::CONTENT_TYPE, content_type).body(Body::from(body)).unwrap();
    let (status, text) = send(app, req).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Zip import: subsets from `N_class` folders, captions kept, each image checked; a zip-slip
/// entry and a symlink refused by name; a bomb and too many entries refuse the archive and
/// write nothing. Folder import: only under an allowed root, symlinks not followed.
#[tokio::test]
async fn zip_and_folder_imports_are_checked_and_confined() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    let allowed = dir.path().join("pictures");
    let app = {
        let data = dir.path().join("data");
        let mut state = open_state(&data, None).unwrap();
        state.datasets.limits.min_side = 32;
        state.datasets.limits.max_request_bytes = 1_000_000;
        std::fs::create_dir_all(&allowed).unwrap();
        state.datasets.allow_roots(std::slice::from_ref(&allowed)).unwrap();
        App { router: router(state), data, _dir: tempfile::tempdir().unwrap() }
    };
    json_req(&app, "POST", "/api/datasets", Some(json!({"name": "set"}))).await;
    let p = png(40, 40, [5, 6, 7]);
    let zip = zip_of(
        &[
            ("10_cat/a.png", &p),
            ("10_cat/a.txt", b"a cat"),
            ("loose.png", &p),
            ("notes/readme.md", b"hi"),
            ("10_cat/broken.png", b"nope"),
            ("../evil.png", &p),
        ],
        Some(("link.png", "/etc/passwd")),
    );
    let (s, v) = import_zip(&app, "set", &zip).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let accepted: Vec<String> = v["accepted"].as_array().unwrap().iter().map(|a| format!("{}/{}", a["subset"].as_str().unwrap(), a["file"].as_str().unwrap())).collect();
    assert_eq!(accepted, ["10_cat/a.png", "10_cat/loose.png", "10_cat/a.txt"], "loose files go to the first subset: {v}");
    let reason = |f: &str| v["rejected"].as_array().unwrap().iter().find(|r| r["file"] == f).map(|r| r["reason"].as_str().unwrap().to_string()).unwrap_or_else(|| panic!("{f}: {v}"));
    assert!(reason("../evil.png").contains("zip slip"));
    assert!(reason("link.png").contains("symbolic link"));
    assert!(reason("broken.png").contains("not an image"));
    assert!(reason("readme.md").contains(".md is not accepted"));
    assert!(!app.data.join("datasets/evil.png").exists() && !app.data.join("evil.png").exists());
    assert_eq!(std::fs::read_to_string(app.data.join("datasets/set/10_cat/a.txt")).unwrap(), "a cat");
    let before = files_under(&app.data.join("datasets/set"));
    // A bomb: 5 MB of zeros packs into a few KB; its declared size is over the 1 MB limit.
    let zeros = vec![0u8; 5_000_000];
    let bomb = zip_of(&[("10_cat/b.png", &p), ("10_cat/zeros.png", &zeros)], None);
    assert!(bomb.len() < 50_000);
    let (s, v) = import_zip(&app, "set", &bomb).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"].as_str().unwrap().contains("unpacks to"), "{v}");
    let many: Vec<(String, Vec<u8>)> = (0..10_001).map(|i| (format!("f{i}.txt"), vec![])).collect();
    let many_refs: Vec<(&str, &[u8])> = many.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    let (s, v) = import_zip(&app, "set", &zip_of(&many_refs, None)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"].as_str().unwrap().contains("10001 entries"), "{v}");
    let (s, v) = import_zip(&app, "set", b"PK not really a zip").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(files_under(&app.data.join("datasets/set")), before, "refused archives wrote nothing");

    // An archive with nothing usable makes no subset folder.
    json_req(&app, "POST", "/api/datasets", Some(json!({"name": "empty"}))).await;
    let (s, _) = import_zip(&app, "empty", &zip_of(&[("7_x/bad.png", b"nope")], None)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(std::fs::read_dir(app.data.join("datasets/empty")).unwrap().next().is_none(), "no folder left behind");
    // Folders: outside the allowed roots, refused; inside, imported (symlinks not followed).
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("x.png"), &p).unwrap();
    let (s, v) = json_req(&app, "POST", "/api/datasets/set/import", Some(json!({"folder": outside}))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    std::fs::create_dir_all(allowed.join("3_dog")).unwrap();
    std::fs::write(allowed.join("3_dog/d.png"), &p).unwrap();
    std::fs::write(allowed.join("3_dog/d.txt"), "a dog").unwrap();
    std::os::unix::fs::symlink(outside.join("x.png"), allowed.join("3_dog/x.png")).unwrap();
    let (s, v) = json_req(&app, "POST", "/api/datasets/set/import", Some(json!({"folder": allowed}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["accepted"].as_array().unwrap().len(), 2, "{v}");
    assert!(app.data.join("datasets/set/3_dog/d.png").is_file() && !app.data.join("datasets/set/3_dog/x.png").exists());
    let (s, _) = json_req(&app, "POST", "/api/datasets/set/import", Some(json!({"folder": allowed.join("..%2Foutside")}))).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

/// The Settings page: tokens masked, limits and allowed folders stored (and in force from the
/// next start), bad values named and not stored, disk use, the caches cleared unless a job runs.
#[tokio::test]
async fn settings_are_stored_masked_and_applied_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = "tok0123456789abcdefXYZW";
    let state = open_state(&data, Some(token.into())).unwrap();
    let jobs = state.jobs.clone();
    let app = App { router: router(state), data: data.clone(), _dir: tempfile::tempdir().unwrap() };
    let auth = format!("Bearer {token}");
    let get = |uri: &str| Request::get(uri).header(header::AUTHORIZATION, auth.clone()).body(Body::empty()).unwrap();
    let post = |uri: &str, form: String| Request::post(uri).header(header::AUTHORIZATION, auth.clone()).header(header::CONTENT_TYPE, "application/x-www-form-urlencoded").body(Body::from(form)).unwrap();
    let (s, html) = send(&app, get("/settings")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(html.contains("tok0…XYZW") && !html.contains(token), "the token is masked");
    // A few cached files, then their disk use and clearing.
    std::fs::create_dir_all(data.join("cache/thumbs")).unwrap();
    std::fs::write(data.join("cache/thumbs/x.jpg"), vec![0u8; 3000]).unwrap();
    let (_, v) = send(&app, get("/api/settings")).await;
    let v: Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["access_token"], "tok0…XYZW");
    assert!(v["folders"].as_array().unwrap().iter().any(|f| f["size"] == "2.9 KB"), "{v}");

    let roots = dir.path().join("models");
    std::fs::create_dir_all(&roots).unwrap();
    let (_, html) = send(&app, post("/ui/settings", format!("max_file_mib=10&max_request_mib=5&allowed_roots={}%0A/", dir.path().join("missing").display()))).await;
    assert!(html.contains("max_request_mib: 5 MiB") && html.contains("is not an existing folder") && html.contains("the whole disk"), "{html}");
    assert_eq!(crate_settings(&data).max_file_mib, 64, "nothing stored");
    let (_, html) = send(&app, post("/ui/settings", format!("max_file_mib=10&max_request_mib=100&allowed_roots={}", roots.display()))).await;
    assert!(html.contains("Saved."), "{html}");
    drop(app);
    let next = open_state(&data, None).unwrap();
    assert_eq!((next.datasets.limits.max_file_bytes, next.datasets.limits.max_request_bytes), (10 << 20, 100 << 20));
    assert!(next.datasets.allowed_roots.contains(&roots.canonicalize().unwrap()));

    // Clearing the caches: refused while a job runs, done when the queue is idle.
    let app = App { router: router(next), data: data.clone(), _dir: tempfile::tempdir().unwrap() };
    let ds = data.join("pics/5_x");
    std::fs::create_dir_all(&ds).unwrap();
    image::RgbImage::from_pixel(32, 32, image::Rgb([1, 2, 3])).save(ds.join("a.png")).unwrap();
    let config = json!({"pretrained_model_name_or_path": "/m", "train_data_dir": data.join("pics")});
    let id = jobs.enqueue(None, loft::jobs::JobSource::Config(config.as_object().unwrap()), 0).unwrap();
    let claim = jobs.claim("w", std::time::Duration::from_secs(60)).unwrap().unwrap();
    let req = Request::post("/ui/settings/clear-cache").body(Body::empty()).unwrap();
    let (s, html) = send(&app, req).await;
    assert_eq!(s, StatusCode::CONFLICT, "{html}");
    assert!(data.join("cache/thumbs/x.jpg").is_file());
    jobs.finish(id, &claim.lease, &loft::jobs::RunEnd::Done { final_step: 1, network_file: None, cancelled: false }).unwrap();
    let req = Request::post("/ui/settings/clear-cache").body(Body::empty()).unwrap();
    let (s, html) = send(&app, req).await;
    assert_eq!(s, StatusCode::OK, "{html}");
    assert!(!data.join("cache").exists() && html.contains("Cleared the caches: 2.9 KB freed"), "{html}");
}

fn crate_settings(data: &std::path::Path) -> loft::settings::Settings {
    loft::settings::Settings::load(&loft::db::Db::open(&data.join("loft.db")).unwrap())
}
