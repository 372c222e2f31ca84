//! The command-line side of jobs: `loft serve`'s queue options and `loft worker`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use tokio::sync::watch;

use super::hub::HubQueue;
use super::runner::{EngineRunner, JobRunner, SimulatedRunner};
use super::worker::{default_worker_name, run_worker, LocalQueue};
use super::Jobs;
use crate::db::Db;
use crate::registry::Registry;

/// `loft serve` options for the queue.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeJobArgs {
    /// Run no worker in this process; start `loft worker --data-dir DIR` beside it instead.
    #[arg(long)]
    pub no_worker: bool,
    /// The token trainer-only workers must present (`loft worker --hub URL --token T`), at least
    /// 16 characters. Default: one generated on first start and kept in the database.
    #[arg(long, env = "LOFT_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<String>,
    /// Seconds a worker's lease lasts without renewal; a job whose worker stops for this long
    /// goes back to the queue and resumes from its last checkpoint.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub lease_secs: u64,
    /// The in-process worker's device for every job: auto, cpu, cuda or cuda:N (default: each
    /// job's own `device` field, `auto` unless set).
    #[arg(long)]
    pub device: Option<String>,
    /// Test aid: run jobs with a simulated training loop (STEPS:STEP_MS[:EPOCHS]) instead of the engine.
    #[arg(long, hide = true)]
    pub simulate: Option<String>,
}

impl Default for ServeJobArgs {
    fn default() -> Self {
        ServeJobArgs { no_worker: false, worker_token: None, lease_secs: super::DEFAULT_LEASE.as_secs(), device: None, simulate: None }
    }
}

/// `loft worker`: runs queued jobs, from this machine's data folder or from a hub.
#[derive(clap::Args, Clone, Debug)]
pub struct WorkerArgs {
    /// The data folder of a `loft serve --no-worker` on this machine (its database and job folders).
    #[arg(long, conflicts_with = "hub")]
    pub data_dir: Option<PathBuf>,
    /// A Loft server's URL, to train for it from another machine (trainer-only), e.g. http://192.168.1.10:7860.
    #[arg(long, requires = "token")]
    pub hub: Option<String>,
    /// The hub's worker token (printed by `loft serve`).
    #[arg(long, env = "LOFT_WORKER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Trainer-only: where downloaded datasets, cached models and outputs go.
    #[arg(long, default_value = "loft-worker-data")]
    pub work_dir: PathBuf,
    /// The name this worker shows in the queue (default: host/pid).
    #[arg(long)]
    pub name: Option<String>,
    /// Seconds a lease lasts without renewal (with --data-dir; a hub sets its own).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub lease_secs: u64,
    /// The device for every job this worker runs: auto, cpu, cuda or cuda:N (default: each
    /// job's own `device` field, `auto` unless set).
    #[arg(long)]
    pub device: Option<String>,
    /// Test aid: run jobs with a simulated training loop (STEPS:STEP_MS[:EPOCHS]) instead of the engine.
    #[arg(long, hide = true)]
    pub simulate: Option<String>,
}

/// The job runner: the real engine (on `device` when given, else on each job's own), or the
/// simulated loop the fault tests use.
pub fn runner(registry: Arc<Registry>, simulate: Option<&str>, device: Option<&str>) -> Result<Arc<dyn JobRunner>> {
    Ok(match simulate {
        Some(spec) => Arc::new(SimulatedRunner::parse(spec)?),
        None => {
            let device = match device {
                Some(spec) => {
                    let (device, line) = loft_worker::device::select(spec).map_err(|e| anyhow::anyhow!("--device: {e:#}"))?;
                    eprintln!("worker {line}");
                    Some(device)
                }
                None => None,
            };
            Arc::new(EngineRunner { registry, device })
        }
    })
}

/// `loft worker`.
pub fn worker(args: WorkerArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let registry = Arc::new(Registry::embedded()?);
        let runner = runner(registry.clone(), args.simulate.as_deref(), args.device.as_deref())?;
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            crate::signal::stop_signal().await;
            println!("Stopping: the running job (if any) saves its state and goes back to the queue…");
            let _ = stop_tx.send(true);
        });
        match (args.hub, args.data_dir) {
            (Some(hub), _) => {
                let token = args.token.unwrap_or_default();
                let queue = HubQueue::new(&hub, &token, &args.work_dir)?;
                let name = args.name.unwrap_or_else(|| default_worker_name(""));
                println!("Loft worker {name}: training for the hub {hub} (files under {})", args.work_dir.display());
                run_worker(Arc::new(queue), runner, name, stop_rx).await;
            }
            (None, Some(dir)) => {
                if !dir.join("loft.db").is_file() {
                    bail!("no Loft database in {}: give the --data-dir of `loft serve`", dir.display());
                }
                let db = Db::open(&dir.join("loft.db"))?;
                let mut jobs = Jobs::new(db, registry, &dir);
                jobs.lease = Duration::from_secs(args.lease_secs);
                jobs.watch_other_processes()?;
                jobs.expire_dead_local_workers()?;
                let name = args.name.unwrap_or_else(|| default_worker_name(""));
                println!("Loft worker {name}: running jobs from {}", dir.display());
                let lease = jobs.lease;
                run_worker(Arc::new(LocalQueue { jobs, lease }), runner, name, stop_rx).await;
            }
            (None, None) => bail!("give --data-dir DIR (the folder of `loft serve --no-worker --data-dir DIR` on this machine) or --hub URL --token T"),
        }
        Ok(())
    })
}
