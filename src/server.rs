//! `loft serve`: data directory, database, listener, graceful shutdown.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::db::Db;
use crate::registry::Registry;
use crate::web::{router, AppState};

pub struct ServeOptions {
    pub bind: IpAddr,
    pub port: u16,
    pub data_dir: PathBuf,
    pub access_token: Option<String>,
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
    Ok(AppState { registry: Arc::new(registry), db, access_token: access_token.map(Arc::new) })
}

pub async fn serve(options: ServeOptions) -> Result<()> {
    if !options.bind.is_loopback() && options.access_token.as_deref().is_none_or(|t| t.len() < 16) {
        bail!(
            "binding to {} exposes Loft beyond this machine: give an access token of at least 16 characters with --token (or LOFT_TOKEN)",
            options.bind
        );
    }
    let state = open_state(&options.data_dir, options.access_token.clone())?;
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
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown_signal()).await?;
    println!("Loft stopped.");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        tokio::signal::ctrl_c().await.ok();
    };
    #[cfg(unix)]
    let terminate = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    println!("Shutting down: finishing open requests…");
}
