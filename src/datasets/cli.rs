//! `loft dataset …`: the datasets work without a server.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;
use loft_worker::tagger::TagOptions;
use loft_worker::train::{EventSink, TrainEvent};

/// Prints a tagging run's log lines and a progress line every few images.
struct Printer;

impl EventSink for Printer {
    fn emit(&mut self, event: TrainEvent) {
        match event {
            TrainEvent::Log { level, message } => println!("{level}: {message}"),
            TrainEvent::Step { step, total_steps, it_per_sec, .. } if step % 10 == 0 || step == total_steps => {
                println!("{step}/{total_steps} images ({it_per_sec:.1} images/s)")
            }
            _ => {}
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum DatasetCommand {
    /// What a training config would make of its dataset: buckets, every image it drops or
    /// changes and why, steps per epoch. Exits non-zero when no image is usable.
    Check {
        /// A TOML file with the registry's keys (as for `loft train`).
        config: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Tag every image of a folder (and its N_class subfolders) with a WD14 tagger on disk and
    /// write the captions (.txt beside each image), without a server.
    Tag {
        /// The images' folder (a dataset, or one subset).
        dir: PathBuf,
        /// A tagger folder: model.onnx and selected_tags.csv (SmilingWolf's WD14 taggers).
        #[arg(long)]
        model: PathBuf,
        /// Keep general tags with a probability above this.
        #[arg(long, default_value_t = 0.35)]
        general: f64,
        /// Keep character tags with a probability above this.
        #[arg(long, default_value_t = 0.85)]
        character: f64,
        /// Tags never written, comma-separated.
        #[arg(long, value_delimiter = ',')]
        exclude: Vec<String>,
        /// A word put first in every caption.
        #[arg(long, default_value = "")]
        trigger: String,
        /// Keep the tags of existing captions and add the new ones (default: replace them).
        #[arg(long)]
        merge: bool,
    },
}

pub fn run(command: DatasetCommand) -> Result<()> {
    match command {
        DatasetCommand::Check { config, json } => {
            let cfg = crate::train_cli::load_train_config(&config)?;
            let report = loft_worker::train::preflight::preflight(&cfg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}: {}", cfg.train_data_dir.display(), report.summary());
            }
            if !report.usable() {
                bail!("{}: no usable training image; a job on it would not be queued", cfg.train_data_dir.display());
            }
            Ok(())
        }
        DatasetCommand::Tag { dir, model, general, character, exclude, trigger, merge } => {
            let options = TagOptions { general_threshold: general, character_threshold: character, exclude, trigger, merge };
            let mut printer = Printer;
            let cancel = loft_worker::train::CancelToken::new();
            crate::signal::cancel_on_signal(&cancel, "stopping after this image (run the same command again to tag the rest)…");
            let outcome = loft_worker::tagger::tag_folder(&dir, &model, &options, true, &mut printer, &cancel)?;
            if outcome.cancelled {
                bail!("stopped after {} images; run the same command again to tag the rest", outcome.final_step);
            }
            Ok(())
        }
    }
}
