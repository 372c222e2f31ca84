//! `loft bench …`: Loft measured against the reference systems in the same run on the same
//! machine — the queue against Huey, training steps against PyTorch + LyCORIS — and the device
//! check that compares every op on a GPU with the CPU reference.

use std::path::PathBuf;

use anyhow::Result;

pub mod kernels;
pub mod queue;
pub mod train;

#[derive(clap::Subcommand, Clone, Debug)]
pub enum BenchCommand {
    /// Enqueue + claim + complete throughput of Loft's queue against Huey's SqliteHuey.
    Queue {
        /// How many jobs.
        #[arg(long, default_value_t = 2000)]
        jobs: usize,
        /// The Python that has `huey` (default: .venv-bench/bin/python).
        #[arg(long)]
        python: Option<PathBuf>,
    },
    /// Training steps of Loft's engine against PyTorch + LyCORIS with the same shapes.
    Train(train::BenchTrainArgs),
    /// Loft's ops (outputs and gradients) and the tiny fixture models' gradients on a device
    /// against the CPU reference: the GPU machine's correctness check.
    CheckDevice {
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// The folder holding the tiny-sd15 and tiny-sdxl fixture models.
        #[arg(long, default_value = "tests/fixtures/models")]
        fixtures: PathBuf,
    },
    /// Loft's hand-written kernels on a device against their CPU references (every dtype,
    /// outputs pre-filled with NaN), then their speeds beside the card's copy bandwidth.
    Kernels {
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// The folder holding the tiny-sd15 fixture model (the training comparison).
        #[arg(long, default_value = "tests/fixtures/models")]
        fixtures: PathBuf,
    },
}

/// `loft bench …`.
pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Queue { jobs, python } => queue::run(jobs.max(1), python),
        BenchCommand::Train(args) => train::run_bench(args),
        BenchCommand::CheckDevice { device, fixtures } => train::check_device(&device, &fixtures),
        BenchCommand::Kernels { device, fixtures } => kernels::run(&device, &fixtures),
    }
}
