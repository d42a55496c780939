//! Config reload without dropping a request: parse and validate the file, build a new runtime
//! that carries over the counters of keys, models and replicas that still exist, and swap it
//! in one atomic store. Requests in flight keep the snapshot they started with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};

use crate::account::Ledger;
use crate::config;
use crate::metrics::Metrics;
use crate::runtime::Runtime;

pub struct Reloader {
    path: PathBuf,
    runtime: Arc<ArcSwap<Runtime>>,
    metrics: Arc<Metrics>,
    /// Where budgets a reload adds or changes rebuild their spend from.
    ledger: Option<Arc<Ledger>>,
    /// One reload at a time: two at once could each build on the same running config and
    /// the later store would drop what the other carried over.
    busy: Mutex<()>,
}

impl Reloader {
    pub fn new(
        path: &Path,
        runtime: Arc<ArcSwap<Runtime>>,
        metrics: Arc<Metrics>,
        ledger: Option<Arc<Ledger>>,
    ) -> Self {
        Reloader {
            path: path.to_path_buf(),
            runtime,
            metrics,
            ledger,
            busy: Mutex::new(()),
        }
    }

    /// Reloads now. A file that fails validation is logged and counted, and the running
    /// config stays. Returns what happened, for the admin API.
    pub fn reload(&self) -> Result<String, String> {
        let _one = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = match config::load(&self.path) {
            Ok(s) => s,
            Err(e) => {
                self.metrics.observe_reload(false);
                tracing::error!(error = %e, "config reload refused; keeping the running config");
                return Err(e.to_string());
            }
        };
        let current = self.runtime.load();
        let old = &current.config;
        let mut restart = Vec::new();
        if fresh.server.listen != old.server.listen {
            restart.push("server.listen");
        }
        if fresh.admin.listen != old.admin.listen {
            restart.push("admin.listen");
        }
        if fresh.server.threads != old.server.threads {
            restart.push("server.threads");
        }
        if fresh.state.dir != old.state.dir || fresh.state.ledger != old.state.ledger {
            restart.push("state");
        }
        let next = Runtime::new(fresh, Some(&current), &self.metrics);
        if let Some(ledger) = &self.ledger {
            if let Err(e) = next.seed_budgets(ledger, Some(old)) {
                self.metrics.observe_reload(false);
                tracing::error!(error = %e, "config reload refused: budgets could not be rebuilt from the ledger; keeping the running config");
                return Err(format!("budgets could not be rebuilt from the ledger: {e}"));
            }
        }
        self.runtime.store(Arc::new(next));
        self.metrics.observe_reload(true);
        let note = if restart.is_empty() {
            "config reloaded".to_string()
        } else {
            format!(
                "config reloaded; changes to {} take effect after a restart",
                restart.join(", ")
            )
        };
        tracing::info!(restart_needed = ?restart, "{note}");
        Ok(note)
    }
}

/// Reloads on SIGHUP (what `systemctl reload` sends).
pub struct ReloadOnSignal(pub Arc<Reloader>);

#[async_trait]
impl BackgroundService for ReloadOnSignal {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGHUP; reload with POST /admin/reload");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    let _ = self.0.reload();
                }
            }
        }
    }
}
