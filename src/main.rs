use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use loft::registry::Registry;
use loft::server::{serve, ServeOptions};

#[derive(Parser)]
#[command(name = "loft", version, about = "Loft: a LoRA training studio for Stable Diffusion-family models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the web app (listens on 127.0.0.1 unless told otherwise).
    Serve {
        /// Port to listen on.
        #[arg(long, default_value_t = 7860)]
        port: u16,
        /// Where Loft keeps its database, datasets and outputs.
        #[arg(long, default_value = "loft-data")]
        data_dir: PathBuf,
        /// Address to bind. Anything but loopback needs --token.
        #[arg(long, default_value = "127.0.0.1")]
        bind: IpAddr,
        /// Access token required on every request (needed when binding beyond loopback).
        #[arg(long, env = "LOFT_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A folder besides the data directory that the app may read from (base models, folders
        /// to import into a dataset). Repeatable.
        #[arg(long = "allow-root", value_name = "DIR")]
        allow_root: Vec<PathBuf>,
        #[command(flatten)]
        jobs: loft::jobs::cli::ServeJobArgs,
    },
    /// Run queued jobs: from this machine's data folder (--data-dir) or for a hub (--hub URL --token T).
    Worker(loft::jobs::cli::WorkerArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: loft::bench::BenchCommand,
    },
    /// Train a network from a TOML config with the registry's keys (Ctrl-C stops with a state).
    Train(loft::train_cli::TrainArgs),
    /// Render an image with a model and optional networks (Euler or DDIM, with CFG).
    Sample(loft::train_cli::SampleArgs),
    /// Print every option in the field registry as a Markdown reference.
    Fields,
    /// Write a config (registry keys) as a kohya sd-scripts --config_file TOML.
    ExportSdScripts(loft::sd_scripts::ExportArgs),
    /// Read a kohya sd-scripts --config_file TOML into a config with the registry's keys.
    ImportSdScripts(loft::sd_scripts::ImportArgs),
    /// Datasets without a server: check what a config's training would make of its images.
    Dataset {
        #[command(subcommand)]
        command: loft::datasets::cli::DatasetCommand,
    },
    /// Inspect or resize LoRA / LyCORIS files.
    Lora {
        #[command(subcommand)]
        command: loft::lora_cli::LoraCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Request and engine logs: `RUST_LOG=debug loft serve` for more.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,loft=info".into()))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Serve { port, data_dir, bind, token, allow_root, jobs } => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(serve(ServeOptions { bind, port, data_dir, access_token: token, allow_root, jobs }))),
        Command::Worker(args) => loft::jobs::cli::worker(args),
        Command::Bench { command } => loft::bench::run(command),
        Command::Train(args) => loft::train_cli::train(args),
        Command::Sample(args) => loft::train_cli::sample(args),
        Command::Fields => Registry::embedded().map(|r| print!("{}", r.markdown())),
        Command::ExportSdScripts(args) => loft::sd_scripts::export_cli(args),
        Command::ImportSdScripts(args) => loft::sd_scripts::import_cli(args),
        Command::Lora { command } => loft::lora_cli::run(command),
        Command::Dataset { command } => loft::datasets::cli::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
