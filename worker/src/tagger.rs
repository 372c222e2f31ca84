//! WD14-style auto-tagging on the CPU: a tagger folder (`model.onnx` + `selected_tags.csv`, as
//! SmilingWolf's taggers ship) run in-process with tract (pure Rust, nothing downloaded), with the
//! reference preprocessing and thresholds of SmilingWolf's own tagger app:
//!
//! - RGBA composited on white, padded to a white centred square, resized (bicubic) to the
//!   model's input size when not already at it, RGB → BGR, float 0..255, NHWC;
//! - the graph's sigmoid outputs taken as probabilities; character tags with p > the character
//!   threshold (0.85) first, then general tags with p > the general threshold (0.35), each by
//!   probability; underscores become spaces except in kaomoji (`^_^`); parentheses kept as they
//!   are (captions are training text, not prompts);
//! - tags to exclude (case-insensitive, `_` and space alike), a trigger word first (never twice),
//!   and the caption written, or merged with the one already there.
//!
//! [`tag_folder`] tags a dataset as a job: progress through the training events (one step per
//! image), cancellable, and resumable — images tagged by an earlier attempt with the same
//! settings are skipped.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tract_onnx::prelude::*;

use crate::data::write_atomic;
use crate::train::{CancelToken, EventSink, TrainEvent, TrainOutcome};

/// Tag names whose underscores are part of the face, kept as they are (SmilingWolf's list).
const KAOMOJI: &[&str] = &[
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
];

/// The tag categories of `selected_tags.csv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Category {
    Rating,
    General,
    Character,
    Other,
}

type Plan = std::sync::Arc<TypedRunnableModel>;

/// A loaded tagger.
pub struct Tagger {
    plan: Plan,
    /// The model's square input side (448 for SmilingWolf's taggers), read from the model.
    pub size: usize,
    tags: Vec<(String, Category)>,
}

/// What to keep and how to write it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TagOptions {
    pub general_threshold: f64,
    pub character_threshold: f64,
    /// Tags never written (case-insensitive; `_` and space alike).
    pub exclude: Vec<String>,
    /// Put first in every caption (and never twice).
    pub trigger: String,
    /// Merge with the caption already there (its tags first) instead of replacing it.
    pub merge: bool,
}

impl Default for TagOptions {
    fn default() -> Self {
        Self { general_threshold: 0.35, character_threshold: 0.85, exclude: vec![], trigger: String::new(), merge: false }
    }
}

impl TagOptions {
    pub fn check(&self) -> Result<()> {
        for (name, t) in [("general_threshold", self.general_threshold), ("character_threshold", self.character_threshold)] {
            if !(0.0..1.0).contains(&t) {
                bail!("{name} is {t}: a probability from 0 to below 1");
            }
        }
        if self.trigger.contains(',') {
            bail!("trigger {:?}: one tag, without a comma", self.trigger);
        }
        Ok(())
    }
}

fn normalise(tag: &str) -> String {
    tag.trim().to_lowercase().replace('_', " ")
}

fn display_name(tag: &str) -> String {
    if KAOMOJI.contains(&tag) {
        tag.to_string()
    } else {
        tag.replace('_', " ")
    }
}

impl Tagger {
    /// Loads `DIR/model.onnx` and `DIR/selected_tags.csv`.
    pub fn load(dir: &Path) -> Result<Tagger> {
        let model_path = dir.join("model.onnx");
        let csv_path = dir.join("selected_tags.csv");
        if !model_path.is_file() || !csv_path.is_file() {
            bail!("{} is not a tagger folder: it needs model.onnx and selected_tags.csv (as SmilingWolf's WD14 taggers ship them)", dir.display());
        }
        let tags = read_tags(&csv_path)?;
        let model = tract_onnx::onnx().model_for_path(&model_path).with_context(|| format!("{} is not a readable ONNX model", model_path.display()))?;
        // The input side comes from the model ([batch, S, S, 3]); the batch is fixed to 1 here,
        // which also serves taggers exported with a fixed batch.
        let typed = model.clone().into_typed().with_context(|| format!("{}: cannot type the graph", model_path.display()))?;
        let fact = typed.input_fact(0)?.clone();
        let dims: Vec<Option<i64>> = fact.shape.iter().map(|d| d.to_i64().ok()).collect();
        let size = match dims.as_slice() {
            [_, Some(h), Some(w), Some(3)] if h == w && *h > 0 => *h as usize,
            _ => bail!("{}: the input is {:?}, not [batch, S, S, 3] (NHWC, BGR) as WD14 taggers take", model_path.display(), fact.shape),
        };
        let plan = model
            .with_input_fact(0, f32::fact([1, size, size, 3]).into())?
            .into_optimized()
            .with_context(|| format!("{}: cannot optimise the graph", model_path.display()))?
            .into_runnable()?;
        let tagger = Tagger { plan, size, tags };
        Ok(tagger)
    }

    /// The reference preprocessing: composite on white, white centred square, bicubic resize to
    /// the model's side when needed, BGR floats 0..255 in NHWC order.
    pub fn preprocess(&self, image: &image::DynamicImage) -> Vec<f32> {
        let rgba = image.to_rgba8();
        let (w, h) = rgba.dimensions();
        let side = w.max(h);
        let mut square = image::RgbImage::from_pixel(side, side, image::Rgb([255, 255, 255]));
        let (left, top) = ((side - w) / 2, (side - h) / 2);
        for (x, y, p) in rgba.enumerate_pixels() {
            let a = p[3] as f32 / 255.0;
            let blend = |c: u8| (c as f32 * a + 255.0 * (1.0 - a)).round().clamp(0.0, 255.0) as u8;
            square.put_pixel(x + left, y + top, image::Rgb([blend(p[0]), blend(p[1]), blend(p[2])]));
        }
        let square = if side as usize != self.size {
            image::imageops::resize(&square, self.size as u32, self.size as u32, image::imageops::FilterType::CatmullRom)
        } else {
            square
        };
        let mut out = Vec::with_capacity(self.size * self.size * 3);
        for p in square.pixels() {
            out.extend_from_slice(&[p[2] as f32, p[1] as f32, p[0] as f32]);
        }
        out
    }

    /// The tag probabilities of one preprocessed image, in `selected_tags.csv` order.
    pub fn probabilities(&self, pixels: Vec<f32>) -> Result<Vec<f32>> {
        let input = tract_ndarray::Array4::from_shape_vec((1, self.size, self.size, 3), pixels)?;
        let out = self.plan.run(tvec!(Tensor::from(input).into()))?;
        let probs: Vec<f32> = out[0].to_plain_array_view::<f32>()?.iter().copied().collect();
        if probs.len() != self.tags.len() {
            bail!("the model gives {} outputs but selected_tags.csv lists {} tags", probs.len(), self.tags.len());
        }
        Ok(probs)
    }

    /// The tags kept from `probs`: characters, then general tags, each by probability.
    pub fn tags(&self, probs: &[f32], opts: &TagOptions) -> Vec<String> {
        let excluded: HashSet<String> = opts.exclude.iter().map(|t| normalise(t)).collect();
        // Compared as doubles, as the reference's NumPy float32 > Python float does.
        let pick = |category: Category, threshold: f64| {
            let mut v: Vec<(f32, &str)> = self.tags.iter().zip(probs).filter(|((_, c), p)| *c == category && **p as f64 > threshold).map(|((t, _), p)| (*p, t.as_str())).collect();
            v.sort_by(|a, b| b.0.total_cmp(&a.0));
            v.into_iter().map(|(_, t)| display_name(t)).filter(|t| !excluded.contains(&normalise(t))).collect::<Vec<_>>()
        };
        let mut tags = pick(Category::Character, opts.character_threshold);
        tags.extend(pick(Category::General, opts.general_threshold));
        tags
    }

    /// Tags one image file.
    pub fn tag_file(&self, path: &Path, opts: &TagOptions) -> Result<Vec<String>> {
        let image = image::open(path).with_context(|| format!("{} cannot be decoded", path.display()))?;
        let probs = self.probabilities(self.preprocess(&image))?;
        Ok(self.tags(&probs, opts))
    }
}

/// `selected_tags.csv`: a header with `name` and `category`, one tag per row.
fn read_tags(path: &Path) -> Result<Vec<(String, Category)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').map(str::trim).collect();
    let (Some(name_col), Some(cat_col)) = (header.iter().position(|h| *h == "name"), header.iter().position(|h| *h == "category")) else {
        bail!("{}: the header has no name and category columns", path.display());
    };
    let mut tags = vec![];
    for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let cols = split_csv(line);
        let (Some(name), Some(cat)) = (cols.get(name_col), cols.get(cat_col)) else {
            bail!("{}: row {} has too few columns", path.display(), i + 2);
        };
        let category = match cat.trim() {
            "9" => Category::Rating,
            "0" => Category::General,
            "4" => Category::Character,
            _ => Category::Other,
        };
        tags.push((name.to_string(), category));
    }
    Ok(tags)
}

/// One CSV row, with double-quoted fields (tag names may hold commas).
fn split_csv(line: &str) -> Vec<String> {
    let mut out = vec![];
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    out.push(field);
    out
}

/// The caption to write: the trigger first, the existing caption's tags when merging, then the
/// new tags, none twice.
pub fn caption_for(existing: Option<&str>, new_tags: &[String], opts: &TagOptions) -> String {
    let mut seen = HashSet::new();
    let mut out: Vec<String> = vec![];
    let mut push = |t: &str| {
        let t = t.trim();
        if !t.is_empty() && seen.insert(normalise(t)) {
            out.push(t.to_string());
        }
    };
    push(&opts.trigger);
    if opts.merge {
        for t in existing.unwrap_or("").split(',') {
            push(t);
        }
    }
    for t in new_tags {
        push(t);
    }
    out.join(", ")
}

/// The images a tagging run covers: those in `dir` and in its subfolders one level down (a
/// dataset's `N_class` subsets), sorted.
pub fn images_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![];
    let mut add = |d: &Path| -> Result<()> {
        for e in std::fs::read_dir(d).with_context(|| format!("cannot read {}", d.display()))?.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_file() && !name.starts_with('.') && crate::data::dataset::is_image(&p) {
                out.push(p);
            }
        }
        Ok(())
    };
    add(dir)?;
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.') {
            add(&e.path())?;
        }
    }
    out.sort();
    Ok(out)
}

/// The record of an interrupted run: its settings on the first line, then one tagged image a
/// line (appended as each is written, so a killed run loses at most the image in hand).
fn read_done(path: &Path, settings: &str) -> HashSet<PathBuf> {
    let Ok(text) = std::fs::read_to_string(path) else { return HashSet::new() };
    let mut lines = text.lines();
    if lines.next() != Some(settings) {
        return HashSet::new();
    }
    lines.map(PathBuf::from).collect()
}

/// The file that records a run's progress, inside the folder (a dot-file no trainer reads).
const DONE_FILE: &str = ".loft-tagging.json";

/// Tags every image of `dir` with the tagger in `model_dir` and writes the captions (`.txt`
/// beside each image), reporting one step per image. Cancelling stops after the current image.
/// With `resume` (a retried job, the command run again) the images an interrupted run with the
/// same settings tagged are skipped; without it every image is tagged.
pub fn tag_folder(dir: &Path, model_dir: &Path, opts: &TagOptions, resume: bool, sink: &mut dyn EventSink, cancel: &CancelToken) -> Result<TrainOutcome> {
    opts.check()?;
    let started = Instant::now();
    let tagger = Tagger::load(model_dir)?;
    sink.emit(TrainEvent::Log { level: "info".into(), message: format!("tagger {} loaded in {:.1} s ({}×{} input)", model_dir.display(), started.elapsed().as_secs_f64(), tagger.size, tagger.size) });
    let images = images_in(dir)?;
    if images.is_empty() {
        bail!("{} holds no image to tag (PNG, JPEG, WebP, BMP, in it or in its subfolders)", dir.display());
    }
    let settings = serde_json::to_string(&(model_dir, opts))?;
    let done_path = dir.join(DONE_FILE);
    let done = if resume { read_done(&done_path, &settings) } else { HashSet::new() };
    if done.is_empty() {
        std::fs::write(&done_path, format!("{settings}\n")).with_context(|| format!("cannot write {}", done_path.display()))?;
    }
    let mut record = std::fs::OpenOptions::new().append(true).open(&done_path).with_context(|| format!("cannot write {}", done_path.display()))?;
    let total = images.len() as u64;
    let skipped = images.iter().filter(|p| done.contains(*p)).count() as u64;
    sink.emit(TrainEvent::Started { total_steps: total, total_epochs: 1, start_step: skipped, steps_per_epoch: total, images: images.len() });
    if skipped > 0 {
        sink.emit(TrainEvent::Log { level: "info".into(), message: format!("resuming: {skipped} images were tagged by an earlier attempt") });
    }
    let mut step = skipped;
    let run_start = Instant::now();
    let mut failed = vec![];
    for path in &images {
        if done.contains(path) {
            continue;
        }
        if cancel.is_cancelled() {
            sink.emit(TrainEvent::Finished { step, path: None, cancelled: true });
            return Ok(TrainOutcome { final_step: step, network_file: None, cancelled: true });
        }
        let caption_path = path.with_extension("txt");
        let tagged = match tagger.tag_file(path, opts) {
            Ok(tags) => {
                let existing = std::fs::read_to_string(&caption_path).ok();
                let caption = caption_for(existing.as_deref(), &tags, opts);
                write_atomic(&caption_path, format!("{caption}\n").as_bytes()).with_context(|| format!("cannot write {}", caption_path.display()))?;
                if step < skipped + 3 {
                    sink.emit(TrainEvent::Log { level: "info".into(), message: format!("{}: {caption}", path.display()) });
                }
                true
            }
            Err(e) => {
                sink.emit(TrainEvent::Log { level: "warn".into(), message: format!("skipped {}: {e:#}", path.display()) });
                failed.push(path.clone());
                false
            }
        };
        // A failed image is not recorded: a retry tries it again.
        if tagged {
            use std::io::Write;
            writeln!(record, "{}", path.display()).with_context(|| format!("cannot write {}", done_path.display()))?;
        }
        step += 1;
        let rate = (step - skipped) as f64 / run_start.elapsed().as_secs_f64().max(1e-6);
        sink.emit(TrainEvent::Step {
            step,
            total_steps: total,
            epoch: 1,
            loss: 0.0,
            avg_loss: 0.0,
            lr: 0.0,
            lrs: vec![],
            it_per_sec: rate,
            eta_secs: (total - step) as f64 / rate.max(1e-9),
        });
    }
    let _ = std::fs::remove_file(&done_path);
    let per_image = run_start.elapsed().as_secs_f64() / (total - skipped).max(1) as f64;
    sink.emit(TrainEvent::Log {
        level: "info".into(),
        message: format!("tagged {} images ({:.3} s per image){}", total - failed.len() as u64, per_image, if failed.is_empty() { String::new() } else { format!(", {} could not be read", failed.len()) }),
    });
    sink.emit(TrainEvent::Finished { step, path: None, cancelled: false });
    Ok(TrainOutcome { final_step: step, network_file: None, cancelled: false })
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_put_the_trigger_first_and_merge_without_repeats() {
        let opts = TagOptions { trigger: "ohwx".into(), ..TagOptions::default() };
        let new = vec!["solo".to_string(), "blue theme".to_string()];
        assert_eq!(caption_for(Some("old, tags"), &new, &opts), "ohwx, solo, blue theme");
        let merge = TagOptions { merge: true, ..opts };
        assert_eq!(caption_for(Some("old, Solo, ohwx"), &new, &merge), "ohwx, old, Solo, blue theme");
        assert_eq!(split_csv(r#"1,"star, (sky)",0,5"#), ["1", "star, (sky)", "0", "5"]);
        assert_eq!(display_name("^_^"), "^_^");
        assert_eq!(display_name("star_(sky)"), "star (sky)");
    }
}
