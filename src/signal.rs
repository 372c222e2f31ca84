//! The stop signal every long-running command (`loft serve`, `loft worker`, `loft train`)
//! listens for.

/// Stops on Ctrl-C or SIGTERM.
pub async fn stop_signal() {
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
}

/// Cancels `token` on Ctrl-C or SIGTERM (from a thread of its own), printing `message`: for the
/// commands that run the engine without a server (`loft train`, `loft dataset tag`).
pub fn cancel_on_signal(token: &loft_worker::train::CancelToken, message: &'static str) {
    let token = token.clone();
    std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
            rt.block_on(async {
                stop_signal().await;
                eprintln!("\n{message}");
                token.cancel();
            });
        }
    });
}
