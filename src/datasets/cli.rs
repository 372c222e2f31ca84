//! `loft dataset …`: the datasets work without a server.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;

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
    }
}
