//! Pre-flight: what a run would make of its dataset, before it waits in the queue — the buckets
//! it builds, every image it drops or changes and why, and the steps per epoch. The same scan,
//! split and bucket choice as [`super::data::TrainSet::load`] and the same batch arithmetic as
//! its `epoch_batches`, without the model: `loft dataset check`, and the queue's confirmation.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use super::config::TrainConfig;
use crate::data::buckets::BucketManager;
use crate::data::dataset::{load_subset, scan_train_dir, BadImagePolicy, ImageEntry};

#[derive(Debug, Clone, Serialize)]
pub struct Preflight {
    /// Training images that will be used (regularisation and held-out ones not counted).
    pub images: usize,
    pub reg_images: usize,
    /// Held out by `validation_split`.
    pub held_out: usize,
    /// Samples per epoch (training images × repeats, plus as many regularisation samples).
    pub samples_per_epoch: usize,
    pub buckets: Vec<BucketLine>,
    /// Images (and folders) training will not use.
    pub dropped: Vec<Note>,
    /// Images training uses, changed: cropped to their bucket, upscaled, without a caption.
    pub adjusted: Vec<Note>,
    pub batches_per_epoch: usize,
    pub steps_per_epoch: u64,
    pub epochs: u64,
    pub total_steps: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BucketLine {
    pub width: u32,
    pub height: u32,
    /// Distinct images in this bucket.
    pub images: usize,
    /// Samples per epoch (with repeats and regularisation).
    pub samples: usize,
    pub batches: usize,
    /// Samples in the last, smaller batch (0: every batch is full).
    pub remainder: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Note {
    pub file: PathBuf,
    pub reason: String,
}

impl Preflight {
    /// Whether there is anything to train on.
    pub fn usable(&self) -> bool {
        self.images > 0
    }

    /// A few lines for a terminal or a log.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} images ({} samples per epoch{}{}) in {} buckets; {} batches → {} steps per epoch, {} epochs, {} steps",
            self.images,
            self.samples_per_epoch,
            if self.reg_images > 0 { format!(", {} regularisation images", self.reg_images) } else { String::new() },
            if self.held_out > 0 { format!(", {} held out for validation", self.held_out) } else { String::new() },
            self.buckets.len(),
            self.batches_per_epoch,
            self.steps_per_epoch,
            self.epochs,
            self.total_steps
        );
        for b in &self.buckets {
            out += &format!("\n  bucket {}×{}: {} images, {} samples, {} batches{}", b.width, b.height, b.images, b.samples, b.batches, if b.remainder > 0 { format!(" (the last has {})", b.remainder) } else { String::new() });
        }
        for n in &self.dropped {
            out += &format!("\n  dropped {}: {}", n.file.display(), n.reason);
        }
        for n in &self.adjusted {
            out += &format!("\n  {}: {}", n.file.display(), n.reason);
        }
        out
    }
}

/// Scans `cfg`'s dataset as a run would. An error is a dataset that cannot be read at all.
pub fn preflight(cfg: &TrainConfig) -> Result<Preflight> {
    let (mut subsets, ignored) = scan_train_dir(&cfg.train_data_dir, &cfg.caption_extension, false)?;
    let mut dropped: Vec<Note> = ignored
        .into_iter()
        .map(|f| Note { file: f, reason: "a folder without a repeat count (N_name): not read, as in sd-scripts".into() })
        .collect();
    if !cfg.reg_data_dir.as_os_str().is_empty() {
        subsets.extend(scan_train_dir(&cfg.reg_data_dir, &cfg.caption_extension, true)?.0);
    }
    let manager = cfg
        .enable_bucket
        .then(|| BucketManager::new((cfg.resolution, cfg.resolution), cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps, cfg.bucket_no_upscale));
    let mut adjusted = vec![];
    let mut train: Vec<(ImageEntry, (u32, u32))> = vec![];
    let mut reg: Vec<(ImageEntry, (u32, u32))> = vec![];
    let mut held_out = 0;
    for s in &mut subsets {
        if s.class_tokens.is_empty() {
            s.class_tokens = cfg.class_tokens.clone();
        }
        let (entries, bad) = load_subset(s, BadImagePolicy::Skip)?;
        dropped.extend(bad.into_iter().map(|b| Note { file: b.path, reason: b.reason }));
        let mut readable = vec![];
        for e in entries {
            match crate::data::images::check_readable(&e.path) {
                Ok(_) => readable.push(e),
                Err(reason) => dropped.push(Note { file: e.path.clone(), reason: format!("{reason}: training would stop on it (or skip it with skip_bad_images)") }),
            }
        }
        let (kept, held) = if s.is_reg { (readable, vec![]) } else { super::data::split_for_validation(readable, cfg.validation_split, super::data::validation_seed(cfg)) };
        held_out += held.len();
        for e in kept {
            let has_caption_file = e.path.with_extension(cfg.caption_extension.trim_start_matches('.')).is_file();
            if e.caption.trim().is_empty() {
                adjusted.push(Note { file: e.path.clone(), reason: "no caption and no class tokens: trains with an empty caption".into() });
            } else if !has_caption_file {
                adjusted.push(Note { file: e.path.clone(), reason: format!("no caption file: trains with the class tokens {:?}", e.caption) });
            }
            let choice = match &manager {
                Some(m) => m.select(e.width, e.height),
                None => super::data::fixed_bucket(e.width, e.height, cfg.resolution),
            };
            let (rw, rh) = choice.resized;
            let (bw, bh) = choice.bucket;
            if rw > e.width || rh > e.height {
                adjusted.push(Note { file: e.path.clone(), reason: format!("{}×{} is upscaled to {rw}×{rh} for the {bw}×{bh} bucket (smaller than the bucket)", e.width, e.height) });
            }
            if (rw, rh) != (bw, bh) {
                adjusted.push(Note { file: e.path.clone(), reason: format!("cropped from {rw}×{rh} to the {bw}×{bh} bucket ({} px cut)", (rw - bw.min(rw)) + (rh - bh.min(rh))) });
            }
            if e.is_reg {
                reg.push((e, choice.bucket));
            } else {
                train.push((e, choice.bucket));
            }
        }
    }
    // Samples per bucket, as epoch_batches makes them: training images × repeats, then the
    // regularisation samples cycled up to as many.
    let mut samples: BTreeMap<(u32, u32), (usize, usize)> = BTreeMap::new();
    for (e, b) in &train {
        let s = samples.entry(*b).or_default();
        s.0 += 1;
        s.1 += e.num_repeats as usize;
    }
    let n_train: usize = train.iter().map(|(e, _)| e.num_repeats as usize).sum();
    let reg_items: Vec<(u32, u32)> = reg.iter().flat_map(|(e, b)| std::iter::repeat_n(*b, e.num_repeats as usize)).collect();
    if !reg_items.is_empty() {
        for (_, b) in &reg {
            samples.entry(*b).or_default().0 += 1;
        }
        for b in reg_items.iter().cycle().take(n_train) {
            samples.entry(*b).or_default().1 += 1;
        }
    }
    let bs = cfg.train_batch_size.max(1);
    let buckets: Vec<BucketLine> = samples
        .into_iter()
        .filter(|(_, (_, n))| *n > 0)
        .map(|((width, height), (images, n))| BucketLine { width, height, images, samples: n, batches: n.div_ceil(bs), remainder: n % bs })
        .collect();
    let batches_per_epoch: usize = buckets.iter().map(|b| b.batches).sum();
    let accum = cfg.gradient_accumulation_steps.max(1);
    let steps_per_epoch = batches_per_epoch.div_ceil(accum) as u64;
    let (total_steps, epochs) = if steps_per_epoch == 0 {
        (0, 0)
    } else if cfg.max_train_epochs > 0 {
        (cfg.max_train_epochs * steps_per_epoch, cfg.max_train_epochs)
    } else {
        (cfg.max_train_steps, cfg.max_train_steps.div_ceil(steps_per_epoch))
    };
    Ok(Preflight {
        images: train.len(),
        reg_images: reg.len(),
        held_out,
        samples_per_epoch: buckets.iter().map(|b| b.samples).sum(),
        buckets,
        dropped,
        adjusted,
        batches_per_epoch,
        steps_per_epoch,
        epochs,
        total_steps,
    })
}
