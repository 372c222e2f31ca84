//! The dashboard's HTML: the job list, a job's page and the fragments the SSE streams swap in
//! (head with progress, loss and LR charts, samples, saved files, log, toasts). Everything is
//! rendered here on the server from the job row, its artifacts and its events.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

use askama::Template;
use serde_json::Value;

use super::clients::{views, ClientView};
use crate::jobs::charts::{line_chart, short, smooth, Line};
use crate::jobs::convert::{file_clients, CONVERTED_KIND};
use crate::jobs::{fmt_duration, Artifact, EventRow, JobState, JobSummary};

/// A job as a card (list) or page head.
pub struct JobCard {
    pub id: i64,
    pub name: String,
    pub state: &'static str,
    pub state_label: String,
    pub percent: String,
    pub stats: String,
    pub error: String,
    pub can_move: bool,
    pub can_cancel: bool,
    pub can_retry: bool,
    pub can_delete: bool,
}

pub fn card(j: &JobSummary) -> JobCard {
    let state_label = match j.state {
        JobState::Queued if j.attempts > 0 || j.started_at.is_some() => format!("Waiting to resume · #{}", j.position.unwrap_or(0)),
        JobState::Queued => format!("Queued · #{}", j.position.unwrap_or(0)),
        JobState::Running if j.cancel_requested => "Stopping…".into(),
        JobState::Running => "Running".into(),
        JobState::Succeeded => "Finished".into(),
        JobState::Failed => "Failed".into(),
        JobState::Cancelled => "Cancelled".into(),
    };
    let mut stats = Vec::new();
    if j.total_steps > 0 {
        stats.push(format!("step {} / {}", j.step, j.total_steps));
    }
    if j.total_epochs > 0 {
        stats.push(format!("epoch {} / {}", j.epoch.min(j.total_epochs), j.total_epochs));
    }
    if let Some(r) = j.it_per_sec.filter(|r| *r > 0.0) {
        stats.push(format!("{} it/s", short(r)));
    }
    if let Some(eta) = j.eta_secs {
        stats.push(format!("ETA {}", fmt_duration(eta)));
    }
    if let Some(l) = j.loss {
        stats.push(format!("loss {}", short(l)));
    }
    if j.state == JobState::Running && j.attempts > 1 {
        stats.push(format!("attempt {} of {}", j.attempts, j.max_attempts));
    }
    if let Some(w) = j.worker.as_ref().filter(|_| j.state == JobState::Running) {
        stats.push(format!("on {w}"));
    }
    if stats.is_empty() {
        stats.push(match j.state {
            JobState::Queued => "waiting for a worker".into(),
            JobState::Running => "starting…".into(),
            _ => String::new(),
        });
    }
    JobCard {
        id: j.id,
        name: j.name.clone(),
        state: j.state.as_str(),
        state_label,
        percent: format!("{:.0}", j.progress * 100.0),
        stats: stats.join(" · "),
        error: j.error.clone().unwrap_or_default(),
        can_move: j.state == JobState::Queued,
        can_cancel: matches!(j.state, JobState::Queued | JobState::Running) && !j.cancel_requested,
        can_retry: matches!(j.state, JobState::Failed | JobState::Cancelled),
        can_delete: j.state != JobState::Running,
    }
}

#[derive(Template)]
#[template(path = "jobs.html")]
pub struct QueuePage {
    pub nav: &'static str,
    pub last_event: i64,
    pub list: String,
    pub in_process: bool,
    pub data_dir: String,
    pub hub_url: String,
    pub token_masked: String,
}

#[derive(Template)]
#[template(path = "job.html")]
pub struct JobPage {
    pub nav: &'static str,
    pub id: i64,
    pub name: String,
    pub last_event: i64,
    pub head: String,
    pub loss: String,
    /// The run holds out a validation split (the loss chart's key shows its line).
    pub has_validation: bool,
    pub lr: String,
    pub samples: String,
    pub files: String,
    pub log: String,
    pub config: String,
}

#[derive(Template)]
#[template(path = "_job_list.html")]
pub struct JobList {
    pub cards: Vec<JobCard>,
}

#[derive(Template)]
#[template(path = "_job_head.html")]
pub struct JobHead {
    pub c: JobCard,
}

pub struct SampleView {
    pub id: i64,
    pub index: usize,
    pub step: u64,
    pub epoch: u64,
    pub prompt: String,
}

#[derive(Template)]
#[template(path = "_job_samples.html")]
pub struct Samples {
    pub job: i64,
    pub samples: Vec<SampleView>,
    pub has_prompts: bool,
}

pub struct FileView {
    pub id: i64,
    pub name: String,
    pub kind: String,
    pub epoch: u64,
    pub step: u64,
    pub size: String,
    pub on_disk: bool,
    pub kept: String,
    /// How each client loads it (empty when it cannot be read as a network file).
    pub clients: Vec<ClientView>,
    /// A client falls short and a plain LoRA would fix it: offer "Convert to LoRA…".
    pub convertible: bool,
}

#[derive(Template)]
#[template(path = "_job_files.html")]
pub struct Files {
    pub job: i64,
    pub files: Vec<FileView>,
}

pub struct LogLine {
    pub time: String,
    pub class: &'static str,
    pub text: String,
}

#[derive(Template)]
#[template(path = "_job_log.html")]
pub struct Log<'a> {
    /// Newest first.
    pub lines: Vec<&'a LogLine>,
}

#[derive(Template)]
#[template(path = "_toast.html")]
pub struct Toast {
    pub class: String,
    pub text: String,
}

pub fn toast(class: &str, text: impl Into<String>) -> String {
    Toast { class: class.into(), text: text.into() }.render().unwrap_or_default()
}

fn render<T: Template>(t: &T) -> String {
    t.render().unwrap_or_else(|e| format!("<p class=\"error\">template error: {e}</p>"))
}

pub fn list_html(jobs: &[JobSummary]) -> String {
    render(&JobList { cards: jobs.iter().map(card).collect() })
}

pub fn head_html(job: &JobSummary) -> String {
    render(&JobHead { c: card(job) })
}

/// A removed job's head (its stream stops).
pub fn gone_html(id: i64) -> String {
    format!("<div class=\"job-head\"><p class=\"notice bad\">Job {id} was deleted. <a href=\"/jobs\">Back to the queue</a></p></div>")
}

pub fn samples_html(job: i64, artifacts: &[Artifact], has_prompts: bool) -> String {
    let mut samples: Vec<SampleView> = artifacts
        .iter()
        .filter(|a| a.kind == "sample" && !a.pruned)
        .map(|a| SampleView {
            id: a.id,
            index: 0,
            step: a.step,
            epoch: a.epoch,
            prompt: a.label.clone(),
        })
        .collect();
    samples.reverse();
    samples.truncate(48);
    render(&Samples { job, samples, has_prompts })
}

pub fn human_size(bytes: u64) -> String {
    match bytes {
        0..=1023 => format!("{bytes} B"),
        1024..=1_048_575 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    }
}

/// The saved-files table. It reads each network file once (cached until it changes) to say how
/// the clients load it: call it off the async threads.
pub fn files_html(job: i64, artifacts: &[Artifact]) -> String {
    let files = artifacts
        .iter()
        .filter(|a| matches!(a.kind.as_str(), "epoch" | "step" | "final" | CONVERTED_KIND))
        .filter(|a| !a.pruned || a.kept.is_some())
        .map(|a| {
            let path = Path::new(&a.path);
            let size = path.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
            let on_disk = if size.is_some() { Some(path) } else { a.kept.as_deref().map(Path::new) };
            let clients = on_disk.and_then(file_clients);
            FileView {
                convertible: clients.as_ref().is_some_and(|c| c.needs_conversion),
                clients: clients.map(|c| views(&c.verdicts)).unwrap_or_default(),
                id: a.id,
                name: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| a.path.clone()),
                kind: a.kind.clone(),
                epoch: a.epoch,
                step: a.step,
                size: size.map(human_size).unwrap_or_else(|| "—".into()),
                on_disk: size.is_some(),
                kept: a.kept.clone().unwrap_or_default(),
            }
        })
        .collect();
    render(&Files { job, files })
}

pub fn log_html(lines: &VecDeque<LogLine>) -> String {
    render(&Log { lines: lines.iter().rev().collect() })
}

/// What new events changed, so a stream re-renders only those fragments.
#[derive(Default, Clone, Copy)]
pub struct Changed {
    pub steps: bool,
    pub log: bool,
    pub files: bool,
    pub any: bool,
}

impl Changed {
    pub fn merge(&mut self, o: Changed) {
        self.steps |= o.steps;
        self.log |= o.log;
        self.files |= o.files;
        self.any |= o.any;
    }
}

const LOG_LINES: usize = 300;

/// A job's events folded into what the page shows: the loss and LR series (a step run again
/// after a resume replaces the earlier value) and the log tail.
#[derive(Default)]
pub struct JobLive {
    pub last_id: i64,
    loss: BTreeMap<u64, f64>,
    /// The validation loss by step (runs with a validation split).
    validation: BTreeMap<u64, f64>,
    lr: BTreeMap<u64, f64>,
    pub log: VecDeque<LogLine>,
}

fn file_name(v: &Value) -> String {
    v.as_str().map(|p| Path::new(p).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.to_string())).unwrap_or_default()
}

impl JobLive {
    pub fn apply(&mut self, row: &EventRow) -> Changed {
        self.last_id = self.last_id.max(row.id);
        let v: Value = serde_json::from_str(&row.payload).unwrap_or(Value::Null);
        let n = |k: &str| v[k].as_f64().unwrap_or(0.0);
        let u = |k: &str| v[k].as_u64().unwrap_or(0);
        let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
        let mut changed = Changed { any: true, ..Changed::default() };
        let line = match row.kind.as_str() {
            "step" => {
                if v["loss"].as_f64().is_some_and(f64::is_finite) {
                    self.loss.insert(u("step"), n("loss"));
                }
                if v["lr"].as_f64().is_some_and(f64::is_finite) {
                    self.lr.insert(u("step"), n("lr"));
                }
                changed.steps = true;
                None
            }
            "started" => {
                let resume = if u("start_step") > 0 { format!(", resuming at step {}", u("start_step")) } else { String::new() };
                Some(("info", format!("Training starts: {} steps, {} epochs, {} images{resume}", u("total_steps"), u("total_epochs"), u("images"))))
            }
            "epoch" => Some(("info", format!("Epoch {} of {} done, average loss {}", u("epoch"), u("total_epochs"), short(n("avg_loss"))))),
            "validation" => {
                if v["loss"].as_f64().is_some_and(f64::is_finite) {
                    self.validation.insert(u("step"), n("loss"));
                }
                changed.steps = true;
                let divergence = n("divergence");
                let sign = if divergence >= 0.0 { "+" } else { "" };
                Some(("info", format!("Validation loss {} at step {} ({sign}{} against the training loss)", short(n("loss")), u("step"), short(divergence))))
            }
            "sample" => {
                changed.files = true;
                Some(("info", format!("Sample {} at step {}: {}", u("index"), u("step"), s("prompt"))))
            }
            "checkpoint" => {
                changed.files = true;
                Some(("info", format!("Saved {} file {} (step {})", s("checkpoint"), file_name(&v["path"]), u("step"))))
            }
            "pruned" => {
                changed.files = true;
                Some(("info", format!("Removed the older file {}", file_name(&v["path"]))))
            }
            "log" => Some((if s("level") == "warn" || s("level") == "warning" { "warn" } else { "info" }, s("message"))),
            "finished" if v["cancelled"].as_bool() == Some(true) => Some(("warn", format!("Stopped at step {} (cancelled)", u("step")))),
            "finished" => {
                changed.files = true;
                Some(("ok", format!("Finished at step {}", u("step"))))
            }
            "failed" => Some(("bad", format!("Failed: {}", s("error")))),
            "state" => {
                changed.files = true;
                let class = match s("state").as_str() {
                    "failed" => "bad",
                    "succeeded" => "ok",
                    "cancelled" => "warn",
                    _ => "state",
                };
                Some((class, format!("{}: {}", s("state"), s("message"))))
            }
            _ => None,
        };
        if let Some((class, text)) = line {
            let time = row.time.get(11..19).unwrap_or("").to_string();
            self.log.push_back(LogLine { time, class, text });
            while self.log.len() > LOG_LINES {
                self.log.pop_front();
            }
            changed.log = true;
        }
        changed
    }

    pub fn loss_svg(&self) -> String {
        let raw: Vec<(f64, f64)> = self.loss.iter().map(|(s, l)| (*s as f64, *l)).collect();
        let smoothed = smooth(&raw, 0.9);
        let validation: Vec<(f64, f64)> = self.validation.iter().map(|(s, l)| (*s as f64, *l)).collect();
        let mut lines = vec![Line { points: &raw, class: "raw", label: "raw", dots: false }, Line { points: &smoothed, class: "smooth", label: "smoothed", dots: false }];
        if !validation.is_empty() {
            lines.push(Line { points: &validation, class: "validation", label: "validation", dots: true });
        }
        line_chart("Loss", &lines)
    }

    pub fn lr_svg(&self) -> String {
        let lr: Vec<(f64, f64)> = self.lr.iter().map(|(s, l)| (*s as f64, *l)).collect();
        line_chart("Learning rate", &[Line { points: &lr, class: "lr", label: "learning rate", dots: false }])
    }
}

/// A toast for a state change (or `None` for other events).
pub fn state_toast(row: &EventRow, job_name: &str) -> Option<String> {
    if row.kind != "state" {
        return None;
    }
    let v: Value = serde_json::from_str(&row.payload).ok()?;
    let state = v["state"].as_str()?;
    let class = match state {
        "succeeded" => "ok",
        "failed" => "bad",
        "cancelled" => "warn",
        _ => "info",
    };
    let verb = match state {
        "queued" => "queued",
        "running" => "is running",
        "succeeded" => "finished",
        "failed" => "failed",
        "cancelled" => "was cancelled",
        other => other,
    };
    let message = v["message"].as_str().unwrap_or("");
    Some(toast(class, format!("Job #{} {job_name} {verb}{}", row.job_id, if message.is_empty() || message == "queued" { String::new() } else { format!(": {message}") })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use loft_worker::train::TrainEvent;

    fn row(id: i64, event: TrainEvent) -> EventRow {
        EventRow {
            id,
            job_id: 1,
            kind: crate::jobs::queue::event_kind(&event).to_string(),
            payload: serde_json::to_string(&event).unwrap(),
            time: "2026-12-04 20:30:00".into(),
        }
    }

    #[test]
    fn validation_events_draw_a_second_loss_line_and_log_their_value() {
        let mut live = JobLive::default();
        for step in 1..=4u64 {
            let step_event = TrainEvent::Step { step, total_steps: 4, epoch: 1, loss: 0.2, avg_loss: 0.2, lr: 1e-4, lrs: vec![], it_per_sec: 1.0, eta_secs: 0.0 };
            live.apply(&row(step as i64, step_event));
        }
        assert!(!live.loss_svg().contains("validation"), "no line without validation events");
        let changed = live.apply(&row(5, TrainEvent::Validation { step: 4, epoch: 1, loss: 0.25, divergence: 0.05, at_epoch_end: false }));
        assert!(changed.steps && changed.log);
        let svg = live.loss_svg();
        assert!(svg.contains("line validation") && svg.contains("circle class=\"dot validation\""), "{svg}");
        let last = &live.log.back().unwrap().text;
        assert!(last.contains("Validation loss") && last.contains("step 4") && last.contains("+0.05"), "{last}");
    }
}
