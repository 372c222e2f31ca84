//! `loft serve`: data directory, database, listener, graceful shutdown.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio::sync::watch;

use crate::db::Db;
use crate::jobs::cli::ServeJobArgs;
use crate::jobs::worker::{default_worker_name, run_worker, LocalQueue};
use crate::jobs::Jobs;
use crate::registry::Registry;
use crate::web::{router, AppState};

pub struct ServeOptions {
    pub bind: IpAddr,
    pub port: u16,
    pub data_dir: PathBuf,
    pub access_token: Option<String>,
    /// Folders besides the data directory that requests may point into (models, folders to
    /// import): `--allow-root DIR`, repeatable.
    pub allow_root: Vec<PathBuf>,
    /// The queue: in-process worker or not, worker token, lease.
    pub jobs: ServeJobArgs,
}

/// Creates the data directory and proves it is writable, so the user gets one clear error up front
/// rather than a failure on the first upload.
pub fn prepare_data_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    let probe = dir.join(".loft-write-test");
    std::fs::write(&probe, b"ok").with_context(|| format!("the data directory {} is not writable", dir.display()))?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}

/// Everything `serve` needs before it listens: registry, data dir, migrated database.
pub fn open_state(data_dir: &Path, access_token: Option<String>) -> Result<AppState> {
    let registry = Registry::embedded()?;
    prepare_data_dir(data_dir)?;
    let db = Db::open(&data_dir.join("loft.db"))?;
    let registry = Arc::new(registry);
    let jobs = Jobs::new(db.clone(), registry.clone(), data_dir);
    // Uploaded images must reach the smallest training bucket the registry allows by default.
    let min_side = registry.field("min_bucket_reso").and_then(|f| f.default.as_u64()).map(|v| v as u32).unwrap_or(256);
    let limits = crate::datasets::store::UploadLimits { min_side, ..Default::default() };
    let mut datasets = crate::datasets::Datasets::new(data_dir.join("datasets"), limits).with_context(|| format!("cannot create {}", data_dir.join("datasets").display()))?;
    crate::settings::Settings::load(&db).apply(&mut datasets);
    Ok(AppState { registry, db, access_token: access_token.map(Arc::new), jobs, worker_in_process: false, datasets })
}

pub async fn serve(options: ServeOptions) -> Result<()> {
    if !options.bind.is_loopback() && options.access_token.as_deref().is_none_or(|t| t.len() < 16) {
        bail!(
            "binding to {} exposes Loft beyond this machine: give an access token of at least 16 characters with --token (or LOFT_TOKEN)",
            options.bind
        );
    }
    let mut state = open_state(&options.data_dir, options.access_token.clone())?;
    state.datasets.allow_roots(&options.allow_root)?;
    let worker_token = crate::jobs::hub::worker_token(&state.db, options.jobs.worker_token.clone())?;
    state.jobs.worker_token = Some(Arc::new(worker_token.clone()));
    state.jobs.lease = std::time::Duration::from_secs(options.jobs.lease_secs);
    state.worker_in_process = !options.jobs.no_worker;
    let runner = crate::jobs::cli::runner(state.registry.clone(), options.jobs.simulate.as_deref(), options.jobs.device.as_deref())?;
    let addr = SocketAddr::new(options.bind, options.port);
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            bail!("port {} on {} is already in use (is another Loft running?); choose another with --port", options.port, options.bind)
        }
        Err(e) => bail!("cannot listen on {addr}: {e}"),
    };
    let local = listener.local_addr()?;
    println!("Loft is listening on http://{local}/  (data: {})", options.data_dir.display());
    let jobs = state.jobs.clone();
    jobs.watch_other_processes()?;
    // Jobs this server's previous run (or a killed worker on this machine) held resume first.
    if let Err(e) = jobs.expire_dead_local_workers() {
        tracing::warn!("checking for dead workers: {e}");
    }
    tokio::spawn(sweep_expired_leases(jobs.clone()));
    let (stop_worker, worker_stop) = watch::channel(false);
    let worker = if options.jobs.no_worker {
        println!("No worker in this process: start `loft worker --data-dir {}` to run the queue.", options.data_dir.display());
        None
    } else {
        let queue = Arc::new(LocalQueue { jobs: jobs.clone(), lease: jobs.lease });
        Some(tokio::spawn(run_worker(queue, runner, default_worker_name("serve "), worker_stop)))
    };
    println!("Trainer-only workers on other machines: loft worker --hub http://{local} --token {worker_token}");
    let stopping = jobs.clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            // Endless event streams end now, so the server can finish its open requests.
            stopping.shut_down();
            let _ = stop_worker.send(true);
        })
        .await?;
    if let Some(worker) = worker {
        println!("Waiting for the running job to save its state…");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(120), worker).await;
    }
    println!("Loft stopped.");
    Ok(())
}

/// Every few seconds, returns jobs whose worker stopped renewing its lease to the queue, so the
/// dashboard never shows a dead worker's job as running.
async fn sweep_expired_leases(jobs: Jobs) {
    loop {
        let j = jobs.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || j.expire_dead_local_workers().and_then(|_| j.sweep())).await {
            tracing::warn!("lease sweep: {e}");
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

async fn shutdown_signal() {
    crate::signal::stop_signal().await;
    println!("Shutting down: finishing open requests…");
}
