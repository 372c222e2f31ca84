//! Headless Chromium against the real `loft serve` binary: switch the algorithm from LoRA to LoKr
//! and see Factor appear; switch the model family to SDXL and see clip skip greyed.
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them).
//! Set LOFT_SCREENSHOTS=DIR to also save screenshots (desktop and phone sizes) there.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn wait_http(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if reqwest::get(url).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} did not come up");
}

struct Driver {
    http: reqwest::Client,
    base: String,
}

impl Driver {
    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if !body.is_null() {
            req = req.json(&body);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let v: Value = res.json().await.unwrap();
        assert!(status.is_success(), "webdriver {path}: {v}");
        v["value"].clone()
    }
    async fn find(&self, css: &str) -> Option<String> {
        let res = self
            .http
            .post(format!("{}/element", self.base))
            .json(&json!({"using": "css selector", "value": css}))
            .send()
            .await
            .unwrap();
        if !res.status().is_success() {
            return None;
        }
        let v: Value = res.json().await.unwrap();
        v["value"][ELEMENT].as_str().map(str::to_string)
    }
    async fn wait_for(&self, what: &str, script: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ok = self.call(reqwest::Method::POST, "/execute/sync", json!({"script": script, "args": []})).await;
            if ok == json!(true) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    async fn click(&self, css: &str) {
        let id = self.find(css).await.unwrap_or_else(|| panic!("no element {css}"));
        self.call(reqwest::Method::POST, &format!("/element/{id}/click"), json!({})).await;
    }
    async fn screenshot(&self, name: &str) {
        let Ok(dir) = std::env::var("LOFT_SCREENSHOTS") else { return };
        let png = self.call(reqwest::Method::GET, "/screenshot", Value::Null).await;
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(format!("{dir}/{name}.png"), bytes).unwrap();
    }
}

#[tokio::test]
async fn lokr_shows_factor_and_sdxl_greys_clip_skip() {
    let data = tempfile::tempdir().unwrap();
    let browser = browser(data.path(), &[]).await;
    let (d, app) = (&browser.d, &browser.app);
    d.call(reqwest::Method::POST, "/window/rect", json!({"width": 1280, "height": 800})).await;
    d.call(reqwest::Method::POST, "/url", json!({"url": format!("{app}/")})).await;
    d.wait_for("the model tab", "return !!document.querySelector('#f-model_family')").await;
    d.screenshot("model-tab").await;

    // Network tab, LoRA: no Factor.
    d.click("#tab-network").await;
    d.wait_for("the network tab", "return !!document.querySelector('#f-network_algo')").await;
    assert!(d.find("#row-factor").await.is_none(), "Factor is hidden for LoRA");
    // Switch to LoKr: the section re-renders with Factor.
    d.click("#f-network_algo option[value=lokr]").await;
    d.wait_for("Factor to appear", "return !!document.querySelector('#row-factor')").await;
    // Its help shows on keyboard focus.
    d.call(reqwest::Method::POST, "/execute/sync", json!({"script": "document.querySelector('#row-factor .help').focus()", "args": []})).await;
    d.wait_for("the tooltip", "return getComputedStyle(document.querySelector('#help-factor')).display !== 'none'").await;
    d.screenshot("network-lokr").await;

    // Model tab, SDXL: clip skip greyed, its value kept.
    d.click("#tab-model").await;
    d.wait_for("the model tab", "return !!document.querySelector('#f-clip_skip')").await;
    d.click("#f-model_family option[value=sdxl]").await;
    d.wait_for("clip skip greyed", "return document.querySelector('#f-clip_skip').disabled === true").await;
    // And LoKr is still chosen after the tab switches.
    d.click("#tab-network").await;
    d.wait_for("LoKr kept", "return document.querySelector('#f-network_algo') && document.querySelector('#f-network_algo').value === 'lokr'").await;

    // Typing into a field and going straight to another tab keeps what was typed: the tab button
    // posts the open form along.
    d.click("#tab-saving").await;
    d.wait_for("the saving tab", "return !!document.querySelector('#f-output_name')").await;
    // Empty it without firing a change event, then type as a user would.
    d.call(reqwest::Method::POST, "/execute/sync", json!({"script": "document.querySelector('#f-output_name').value = ''", "args": []})).await;
    let field = d.find("#f-output_name").await.unwrap();
    d.call(reqwest::Method::POST, &format!("/element/{field}/value"), json!({"text": "my_style_v2"})).await;
    d.click("#tab-dataset").await;
    d.wait_for("the dataset tab", "return !!document.querySelector('#f-resolution')").await;
    d.click("#tab-saving").await;
    d.wait_for("the typed name kept", "return document.querySelector('#f-output_name') && document.querySelector('#f-output_name').value === 'my_style_v2'").await;

    // Narrow (phone) screen: the page still lays out in one column without horizontal scrolling.
    d.call(reqwest::Method::POST, "/window/rect", json!({"width": 390, "height": 844})).await;
    d.wait_for("no sideways scroll", "return document.documentElement.scrollWidth <= window.innerWidth + 1").await;
    d.screenshot("network-phone").await;
    d.call(reqwest::Method::DELETE, "", Value::Null).await;
}

// ---------------------------------------------------------------- the queue and the dashboard

/// A server, a chromedriver and a browser session, cleaned up on drop.
struct Browser {
    d: Driver,
    app: String,
    _server: Killed,
    _chromedriver: Killed,
    _profile: tempfile::TempDir,
}

async fn browser(data: &std::path::Path, serve_args: &[&str]) -> Browser {
    let port = free_port();
    let server = Killed(
        Command::new(env!("CARGO_BIN_EXE_loft"))
            .args(["serve", "--port", &port.to_string(), "--data-dir"])
            .arg(data)
            .args(serve_args)
            .stdout(Stdio::null())
            .spawn()
            .expect("start loft serve"),
    );
    let driver_port = free_port();
    let chromedriver = Killed(
        Command::new("chromedriver")
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is installed (Debian package chromium-driver; .ci/run installs it)"),
    );
    let app = format!("http://127.0.0.1:{port}");
    wait_http(&format!("{app}/healthz")).await;
    wait_http(&format!("http://127.0.0.1:{driver_port}/status")).await;
    let http = reqwest::Client::new();
    let profile = tempfile::tempdir().unwrap();
    let session: Value = http
        .post(format!("http://127.0.0.1:{driver_port}/session"))
        .json(&json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", format!("--user-data-dir={}", profile.path().display())]
        }}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = session["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {session}")).to_string();
    let d = Driver { http, base: format!("http://127.0.0.1:{driver_port}/session/{id}") };
    d.call(reqwest::Method::POST, "/window/rect", json!({"width": 1280, "height": 900})).await;
    Browser { d, app, _server: server, _chromedriver: chromedriver, _profile: profile }
}

impl Driver {
    async fn wait_long(&self, what: &str, script: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let ok = self.call(reqwest::Method::POST, "/execute/sync", json!({"script": script, "args": []})).await;
            if ok == json!(true) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    async fn eval(&self, script: &str) -> Value {
        self.call(reqwest::Method::POST, "/execute/sync", json!({"script": script, "args": []})).await
    }
    async fn type_into(&self, css: &str, text: &str) {
        self.eval(&format!("document.querySelector('{css}').value = ''")).await;
        let field = self.find(css).await.unwrap_or_else(|| panic!("no element {css}"));
        self.call(reqwest::Method::POST, &format!("/element/{field}/value"), json!({"text": text})).await;
    }
}

/// Watches a job page until it reaches 100 % through SSE, shows a sample image, and offers its
/// files; returns the first epoch (or final) file's bytes, downloaded through its link.
async fn watch_job_finish(b: &Browser, secs: u64) -> Vec<u8> {
    let d = &b.d;
    d.wait_long("progress to reach 100 % (SSE)", "return document.querySelector('#job-percent') && document.querySelector('#job-percent').textContent.trim() === '100%'", secs).await;
    d.wait_long("the finished state", "return document.querySelector('#job-head [data-state]').dataset.state === 'succeeded'", 30).await;
    d.wait_long("a sample image", "var i = document.querySelector('#samples img'); return !!i && i.complete && i.naturalWidth > 0", 30).await;
    d.wait_long("the loss chart", "return !!document.querySelector('#loss-chart path.line.smooth')", 10).await;
    d.wait_long("a toast", "return !!document.querySelector('#toasts .toast')", 10).await;
    let href = d.eval("var a = document.querySelector('#files tr.kind-epoch a.download') || document.querySelector('#files a.download'); return a ? a.getAttribute('href') : null").await;
    let href = href.as_str().expect("a download link for a saved epoch").to_string();
    let res = reqwest::get(format!("{}{href}", b.app)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-disposition"].to_str().unwrap().starts_with("attachment"));
    res.bytes().await.unwrap().to_vec()
}

/// The form's Queue button: first with problems (listed, nothing queued), then a valid job whose
/// progress, sample and files arrive live. Runs on the simulated training loop, so it tests the
/// dashboard, not the engine.
#[tokio::test]
async fn queue_from_the_form_and_watch_it_live() {
    let data = tempfile::tempdir().unwrap();
    let dataset = data.path().join("pictures");
    std::fs::create_dir_all(dataset.join("5_thing")).unwrap();
    // The queue's pre-flight wants one usable picture (the simulated loop does not read it).
    image::RgbImage::from_pixel(64, 64, image::Rgb([90, 140, 200])).save(dataset.join("5_thing/a.png")).unwrap();
    let b = browser(&data.path().join("data"), &["--simulate", "60:60:3"]).await;
    let d = &b.d;
    d.call(reqwest::Method::POST, "/url", json!({"url": format!("{}/", b.app)})).await;
    d.wait_for("the model tab", "return !!document.querySelector('#f-pretrained_model_name_or_path')").await;
    d.click("#queue-job").await;
    d.wait_for("the problems listed", "return !!document.querySelector('#notice .notice.bad li')").await;
    d.screenshot("queue-refused").await;
    let jobs: Value = reqwest::get(format!("{}/api/jobs", b.app)).await.unwrap().json().await.unwrap();
    assert_eq!(jobs["jobs"], json!([]), "nothing queued");

    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/tiny-sd15");
    d.type_into("#f-pretrained_model_name_or_path", model).await;
    d.click("#tab-dataset").await;
    d.wait_for("the dataset tab", "return !!document.querySelector('#f-train_data_dir')").await;
    d.type_into("#f-train_data_dir", dataset.to_str().unwrap()).await;
    d.click("#queue-job").await; // the typed path goes along with the click
    d.wait_for("the pre-flight", "return !!document.querySelector('#queue-confirm')").await;
    d.screenshot("queue-preflight").await;
    d.click("#queue-confirm").await;
    d.wait_for("the job page", "return /^\\/jobs\\/\\d+$/.test(location.pathname)").await;
    d.wait_long("a running job", "var h = document.querySelector('#job-head [data-state]'); return !!h && h.dataset.state === 'running' && parseInt(document.querySelector('#job-percent').textContent) > 10", 30).await;
    d.screenshot("job-running").await;
    let file = watch_job_finish(&b, 60).await;
    assert!(!file.is_empty());
    d.eval("window.scrollTo(0, 0)").await;
    d.screenshot("job-finished").await;

    // Keep the first epoch; the queue lists the finished job.
    d.click("#files button.keep").await;
    d.wait_for("kept", "return !!document.querySelector('#files .kept')").await;
    d.call(reqwest::Method::POST, "/url", json!({"url": format!("{}/jobs", b.app)})).await;
    d.wait_for("the queue", "return !!document.querySelector('#job-list .job.state-succeeded')").await;
    d.screenshot("queue").await;
    d.call(reqwest::Method::POST, "/window/rect", json!({"width": 390, "height": 844})).await;
    d.wait_for("no sideways scroll", "return document.documentElement.scrollWidth <= window.innerWidth + 1").await;
    d.screenshot("queue-phone").await;
    d.call(reqwest::Method::DELETE, "", Value::Null).await;
}

/// The built-in demo on the real engine: Try the demo → progress to 100 % over SSE → a sample
/// image → the epoch file downloads as a safetensors file.
#[tokio::test]
async fn demo_trains_on_the_real_engine_and_its_epoch_downloads() {
    let data = tempfile::tempdir().unwrap();
    let b = browser(&data.path().join("data"), &[]).await;
    let d = &b.d;
    d.call(reqwest::Method::POST, "/url", json!({"url": format!("{}/jobs", b.app)})).await;
    d.wait_for("the queue page", "return !!document.querySelector('#try-demo')").await;
    d.click("#try-demo").await;
    d.wait_for("the demo's page", "return /^\\/jobs\\/\\d+$/.test(location.pathname)").await;
    let file = watch_job_finish(&b, 600).await;
    // A safetensors file: an 8-byte header length, then a JSON header.
    assert!(file.len() > 8);
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&file[8..8 + n]).expect("a safetensors header");
    assert!(header.as_object().unwrap().keys().any(|k| k.starts_with("lora_unet_")), "kohya key names");
    d.screenshot("demo-finished").await;
    d.call(reqwest::Method::DELETE, "", Value::Null).await;
}

/// A dataset as a new user makes one: create it, upload three pictures (one broken, refused
/// with its reason), tag the rest with a WD14 tagger from disk as a queued job, add a trigger
/// word to every caption (preview, then apply), edit one caption, and queue a training job on it
/// through the Queue button's pre-flight.
#[tokio::test]
async fn a_dataset_from_upload_to_a_queued_job() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let files = tmp.path().join("to-upload");
    std::fs::create_dir_all(&files).unwrap();
    for f in ["blue.png", "red.png"] {
        std::fs::copy(fixtures.join("tagger/images").join(f), files.join(f)).unwrap();
    }
    let mut jpeg = std::io::Cursor::new(vec![]);
    image::RgbImage::from_fn(300, 300, |x, y| image::Rgb([x as u8, y as u8, 90])).write_to(&mut jpeg, image::ImageFormat::Jpeg).unwrap();
    let jpeg = jpeg.into_inner();
    std::fs::write(files.join("broken.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    let data = tmp.path().join("data");
    let b = browser(&data, &["--allow-root", fixtures.join("tagger").to_str().unwrap()]).await;
    let (d, app) = (&b.d, &b.app);
    d.call(reqwest::Method::POST, "/window/rect", json!({"width": 1280, "height": 1000})).await;

    d.call(reqwest::Method::POST, "/url", json!({"url": format!("{app}/datasets")})).await;
    d.wait_for("the datasets page", "return !!document.querySelector('#new-dataset')").await;
    d.type_into("#new-dataset input[name=name]", "shapes").await;
    d.click("#new-dataset button[type=submit]").await;
    d.wait_for("the dataset's page", "return location.pathname === '/datasets/shapes' && !!document.querySelector('#upload-files')").await;

    // Upload through the file picker (the drop zone sends the same form).
    d.eval("document.querySelector('#upload-files').hidden = false").await;
    let input = d.find("#upload-files").await.unwrap();
    let paths: Vec<String> = ["blue.png", "red.png", "broken.jpg"].iter().map(|f| files.join(f).display().to_string()).collect();
    d.call(reqwest::Method::POST, &format!("/element/{input}/value"), json!({"text": paths.join("\n")})).await;
    d.wait_long("the upload's report", "var r = document.querySelector('#upload-result'); return !!r && r.textContent.includes('2 files added')", 20).await;
    let report = d.eval("return document.querySelector('#upload-result').textContent").await;
    assert!(report.as_str().unwrap().contains("broken.jpg") && report.as_str().unwrap().contains("truncated"), "{report}");
    d.wait_for("the thumbnails", "return document.querySelectorAll('#grid figure.thumb').length === 2").await;
    d.wait_for("the count in the heading", "return document.querySelector('#head-count').textContent.includes('2 images in 1 subset')").await;
    d.screenshot("dataset-upload").await;

    // Tag with the tiny tagger: a job in the queue, watched on its page.
    d.type_into("#tag-form input[name=model_dir]", fixtures.join("tagger/tiny-wd14").to_str().unwrap()).await;
    d.click("#tag-form button[type=submit]").await;
    d.wait_for("the tagging job's page", "return /^\\/jobs\\/\\d+$/.test(location.pathname)").await;
    d.wait_long("the tagging job to finish", "var h = document.querySelector('#job-head [data-state]'); return !!h && h.dataset.state === 'succeeded'", 60).await;
    d.call(reqwest::Method::POST, "/url", json!({"url": format!("{app}/datasets/shapes")})).await;
    d.wait_for("the tagged captions", "var t = document.querySelector('textarea[aria-label=\"Caption of blue.png\"]'); return !!t && t.value.includes('blue theme')").await;

    // A trigger word on every caption: preview, then apply.
    d.type_into("#bulk-form input[name=word]", "ohwx").await;
    d.click("#bulk-form button[type=submit]").await;
    d.wait_for("the preview", "return !!document.querySelector('#apply-bulk')").await;
    d.click("#apply-bulk").await;
    d.wait_long("the captions to change", "var t = document.querySelectorAll('#grid textarea'); return t.length === 2 && Array.from(t).every(x => x.value.startsWith('ohwx, '))", 15).await;

    // One caption edited in place.
    d.type_into("textarea[aria-label=\"Caption of red.png\"]", "ohwx, a red square").await;
    d.click("h1").await; // leaving the box commits the edit (a change event), as a user does
    d.wait_for("the saved caption", "return !!document.querySelector('.saved .note.ok')").await;
    let dir = data.join("datasets/shapes/1_shapes");
    assert_eq!(std::fs::read_to_string(dir.join("red.txt")).unwrap(), "ohwx, a red square\n");
    assert!(std::fs::read_to_string(dir.join("blue.txt")).unwrap().starts_with("ohwx, blue theme"));
    d.eval("window.scrollTo(0, 0)").await;
    d.screenshot("datasets").await;

    // Train on it: the dataset is offered in the Dataset tab, the pre-flight shows it, the job queues.
    d.call(reqwest::Method::POST, "/url", json!({"url": format!("{app}/")})).await;
    d.wait_for("the model tab", "return !!document.querySelector('#f-pretrained_model_name_or_path')").await;
    d.type_into("#f-pretrained_model_name_or_path", fixtures.join("models/tiny-sd15").to_str().unwrap()).await;
    d.click("#tab-dataset").await;
    d.wait_for("the dataset picker", "return !!document.querySelector('#dl-train_data_dir option[label^=\"dataset shapes\"]')").await;
    let path = d.eval("return document.querySelector('#dl-train_data_dir option[label^=\"dataset shapes\"]').value").await;
    d.type_into("#f-train_data_dir", path.as_str().unwrap()).await;
    d.click("#queue-job").await;
    d.wait_long("the pre-flight", "var c = document.querySelector('#queue-confirm'); return !!c && document.querySelector('.preflight').textContent.includes('2 images')", 20).await;
    d.screenshot("queue-preflight-dataset").await;
    d.click("#queue-confirm").await;
    d.wait_for("the training job's page", "return /^\\/jobs\\/\\d+$/.test(location.pathname)").await;
    let jobs: Value = reqwest::get(format!("{app}/api/jobs")).await.unwrap().json().await.unwrap();
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 2, "the tagging job and the training job: {jobs}");
}
