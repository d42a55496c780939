//! Config reload without dropping a request: parse and validate the file, build a new runtime
//! that carries over the counters of keys, models and replicas that still exist, and swap it
//! in one atomic store. Requests in flight keep the snapshot they started with.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};

use crate::account::Ledger;
use crate::config::{self, Snapshot};
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
    /// What the process started with of the settings only a restart applies.
    at_start: AtStart,
    /// The file as it was when last read, valid or not: what `server.reload_on_change`
    /// compares it with.
    read: Mutex<Option<Stamp>>,
}

/// What tells a changed config file apart: its size, inode, and modification and status
/// change times (the latter moves on chmod and chown too, so fixing the permissions of a
/// file tollgate could not read counts), read through symlinks (a Kubernetes ConfigMap
/// update swaps a symlink to a new file).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Stamp {
    len: u64,
    inode: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            len: m.len(),
            inode: m.ino(),
            modified: (m.mtime(), m.mtime_nsec()),
            changed: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// The config file a process runs from, as it was when it was read.
pub struct ConfigFile {
    path: PathBuf,
    read: Option<Stamp>,
}

impl ConfigFile {
    /// Reads and validates the file; the stamp is taken first, so that a change made while
    /// it is read, or while tollgate starts, is seen by `server.reload_on_change`.
    pub fn load(path: &Path) -> Result<(Snapshot, ConfigFile), config::ConfigError> {
        let read = Stamp::of(path);
        let snapshot = config::load(path)?;
        let file = ConfigFile {
            path: path.to_path_buf(),
            read,
        };
        Ok((snapshot, file))
    }
}

/// The settings read once at start. A reload compares the file with these, not with the
/// previous reload, so a change waiting for a restart is reported until it is applied.
#[derive(Clone, PartialEq)]
struct AtStart {
    listen: SocketAddr,
    admin_listen: SocketAddr,
    threads: usize,
    state_dir: PathBuf,
    ledger: bool,
    grace_period: Duration,
    cluster: Option<crate::config::ClusterSettings>,
}

impl AtStart {
    fn of(s: &Snapshot) -> Self {
        AtStart {
            listen: s.server.listen,
            admin_listen: s.admin.listen,
            threads: s.server.threads.get(),
            state_dir: s.state.dir.clone(),
            ledger: s.state.ledger,
            grace_period: s.server.grace_period,
            cluster: s.cluster.clone(),
        }
    }

    /// The TOML names of the settings where `fresh` differs from these.
    fn changed_in(&self, fresh: &AtStart) -> Vec<&'static str> {
        let mut names = Vec::new();
        if fresh.listen != self.listen {
            names.push("server.listen");
        }
        if fresh.threads != self.threads {
            names.push("server.threads");
        }
        if fresh.grace_period != self.grace_period {
            names.push("server.grace_period_secs");
        }
        if fresh.admin_listen != self.admin_listen {
            names.push("admin.listen");
        }
        if fresh.state_dir != self.state_dir || fresh.ledger != self.ledger {
            names.push("state");
        }
        if fresh.cluster != self.cluster {
            names.push("cluster");
        }
        names
    }
}

impl Reloader {
    pub fn new(
        file: ConfigFile,
        runtime: Arc<ArcSwap<Runtime>>,
        metrics: Arc<Metrics>,
        ledger: Option<Arc<Ledger>>,
    ) -> Self {
        let at_start = AtStart::of(&runtime.load().config);
        Reloader {
            path: file.path,
            runtime,
            metrics,
            ledger,
            busy: Mutex::new(()),
            at_start,
            read: Mutex::new(file.read),
        }
    }

    /// Reloads now. A file that fails validation is logged and counted, and the running
    /// config stays. Returns what happened, for the admin API.
    pub fn reload(&self) -> Result<String, String> {
        let _one = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        // Before reading: a change made while this reload reads is seen as a change after.
        let stamp = Stamp::of(&self.path);
        *self.read.lock().unwrap_or_else(|e| e.into_inner()) = stamp;
        // An empty file parses as a valid config that serves nothing; on a reload it is far
        // more likely a file caught between truncation and write.
        if stamp.is_some_and(|s| s.len == 0) {
            return self.refuse("the config file is empty".into());
        }
        let fresh = match config::load(&self.path) {
            Ok(s) => s,
            Err(e) => return self.refuse(e.to_string()),
        };
        let current = self.runtime.load();
        let old = &current.config;
        let restart = self.at_start.changed_in(&AtStart::of(&fresh));
        let dropped = config::dropped_protections(old, &fresh);
        let next = Runtime::new(fresh, Some(&current), &self.metrics);
        if let Some(ledger) = &self.ledger {
            if let Err(e) = next.seed_budgets(ledger, Some(old)) {
                return self.refuse(format!("budgets could not be rebuilt from the ledger: {e}"));
            }
        }
        let next = Arc::new(next);
        self.runtime.store(next.clone());
        next.take_over(Some(&current));
        self.metrics.observe_reload(true);
        let mut note = if restart.is_empty() {
            "config reloaded".to_string()
        } else {
            format!(
                "config reloaded; changes to {} take effect after a restart",
                restart.join(", ")
            )
        };
        if dropped.is_empty() {
            tracing::info!(restart_needed = ?restart, "{note}");
        } else {
            // Valid, and possibly meant; but a file cut short after a key's `models` line
            // reads the same way, so it is said where the operator looks.
            note.push_str(&format!(
                "; no longer limited or priced (if the file was cut short, restore it): {}",
                dropped.join("; ")
            ));
            tracing::warn!(restart_needed = ?restart, dropped = ?dropped, "{note}");
        }
        Ok(note)
    }

    /// A reload that changes nothing: logged and counted; the running config stays.
    fn refuse(&self, why: String) -> Result<String, String> {
        self.metrics.observe_reload(false);
        tracing::error!(error = %why, "config reload refused; keeping the running config");
        Err(why)
    }
}

/// Set by a SIGHUP that arrives before `ReloadTriggers` watches for them.
static EARLY_HANGUP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// First thing in `tollgate run`: from here on a SIGHUP no longer terminates the process
/// (its default action). One that arrives while tollgate is still starting (loading the
/// config, opening the ledger, rebuilding budgets) reloads as soon as `ReloadTriggers`
/// runs. systemd counts the service as started at exec, so `systemctl reload` can come
/// that early.
pub fn catch_hangup() -> Result<(), String> {
    let mut caught = Ok(());
    EARLY_HANGUP.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGHUP, flag.clone()) {
            caught = Err(format!("cannot catch SIGHUP: {e}"));
        }
        flag
    });
    caught
}

/// How often the config file is looked at for `server.reload_on_change`.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Reloads on SIGHUP (what `systemctl reload` sends) and, with `server.reload_on_change`,
/// when the config file changes: its size, time or inode differ from the last look. A file
/// caught half-written is refused like any invalid one; the next look, once the write is
/// done, reloads it. Reloads block this service's own thread, never a request worker.
pub struct ReloadTriggers(pub Arc<Reloader>);

#[async_trait]
impl BackgroundService for ReloadTriggers {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGHUP; reload with POST /admin/reload");
                None
            }
        };
        // Watched from here on; one that came while starting is acted on now.
        if EARLY_HANGUP
            .get()
            .is_some_and(|early| early.swap(false, Ordering::Relaxed))
        {
            tracing::info!("SIGHUP received while starting; reloading now");
            let _ = self.0.reload();
        }
        let path = self.0.path.clone();
        // A change is acted on once the file has stayed the same for one more look, so that
        // a file being written is not read halfway.
        let mut settling: Option<Stamp> = None;
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                got = async { hup.as_mut()?.recv().await }, if hup.is_some() => {
                    if got.is_none() {
                        hup = None;
                        continue;
                    }
                    let _ = self.0.reload();
                    settling = None;
                }
                _ = tick.tick() => {
                    let now = Stamp::of(&path);
                    let read = *self.0.read.lock().unwrap_or_else(|e| e.into_inner());
                    // A file gone for a moment (being replaced) is not a change yet.
                    if now.is_none() || now == read {
                        settling = None;
                        continue;
                    }
                    if settling != now {
                        settling = now;
                        continue;
                    }
                    settling = None;
                    if self.0.runtime.load().config.server.reload_on_change {
                        tracing::info!("config file changed; reloading");
                        let _ = self.0.reload();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &str = "[[pools]]\nname = \"p\"\n[[models]]\nslug = \"m\"\npool = \"p\"\n\
        [[keys]]\nid = \"k\"\nmodels = [\"*\"]\n\
        sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n";

    fn reloader(dir: &Path, server: &str) -> Reloader {
        let path = dir.join("tollgate.toml");
        std::fs::write(&path, format!("{server}\n{KEYS}")).unwrap();
        let (snapshot, file) = ConfigFile::load(&path).unwrap();
        let metrics = Arc::new(Metrics::new());
        let runtime = Arc::new(ArcSwap::from_pointee(Runtime::new(
            snapshot, None, &metrics,
        )));
        Reloader::new(file, runtime, metrics, None)
    }

    #[test]
    fn a_setting_waiting_for_a_restart_is_reported_until_it_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let r = reloader(dir.path(), "[server]\nlisten = \"127.0.0.1:0\"");
        let write = |server: &str| {
            std::fs::write(
                dir.path().join("tollgate.toml"),
                format!("{server}\n{KEYS}"),
            )
            .unwrap()
        };
        write("[server]\nlisten = \"127.0.0.2:0\"\ngrace_period_secs = 5");
        let first = r.reload().unwrap();
        assert!(
            first.contains("server.listen") && first.contains("server.grace_period_secs"),
            "{first}"
        );
        // Nothing edited since: the restart is still due.
        assert_eq!(r.reload().unwrap(), first);
        // Back to what runs: nothing waits any more.
        write("[server]\nlisten = \"127.0.0.1:0\"");
        assert_eq!(r.reload().unwrap(), "config reloaded");
    }

    #[test]
    fn a_change_of_permissions_or_one_made_while_starting_counts_as_a_change() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.toml");
        std::fs::write(&path, KEYS).unwrap();
        let (snapshot, file) = ConfigFile::load(&path).unwrap();
        // Written after the file was read, while tollgate still starts (ledger, budgets).
        std::fs::write(
            &path,
            format!("{KEYS}[[models]]\nslug = \"late\"\npool = \"p\"\n"),
        )
        .unwrap();
        let metrics = Arc::new(Metrics::new());
        let runtime = Arc::new(ArcSwap::from_pointee(Runtime::new(
            snapshot, None, &metrics,
        )));
        let r = Reloader::new(file, runtime, metrics, None);
        let read = *r.read.lock().unwrap();
        assert_ne!(Stamp::of(&path), read, "the edit is a change still to read");
        // Permissions fixed on a file that could not be read: same bytes, still a change.
        let before = Stamp::of(&path);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_ne!(Stamp::of(&path), before);
    }

    #[test]
    fn an_empty_or_cut_file_is_not_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let r = reloader(dir.path(), "");
        let path = dir.path().join("tollgate.toml");
        for (text, why) in [
            ("", "empty"),
            ("# comments\n\n  \n", "defines no [[models]]"),
            ("[state]\ndir = \"/tmp\"\n", "defines no [[models]]"),
            (
                "[[pools]]\nname = \"p\"\n[[models]]\nslug = \"m\"\npool = \"p\"\n",
                "defines no [[keys]]",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = r.reload().unwrap_err();
            assert!(e.contains(why), "{e}");
            assert!(
                r.runtime.load().config.key_by_id("k").is_some(),
                "the running config stays"
            );
        }
    }

    #[test]
    fn a_reload_that_drops_a_keys_limits_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.toml");
        let r = reloader(dir.path(), "");
        std::fs::write(&path, format!("{KEYS}rpm = 5\n")).unwrap();
        assert_eq!(r.reload().unwrap(), "config reloaded");
        // Cut after the key's `models` line.
        std::fs::write(&path, KEYS).unwrap();
        let note = r.reload().unwrap();
        assert!(note.ends_with("key \"k\": rpm"), "{note}");
    }

    #[test]
    fn a_sighup_while_starting_reloads_once_the_service_runs() {
        let dir = tempfile::tempdir().unwrap();
        let r = Arc::new(reloader(dir.path(), ""));
        catch_hangup().unwrap();
        // Without the early catch, SIGHUP's default action would end this test process.
        signal_hook::low_level::raise(signal_hook::consts::SIGHUP).unwrap();
        std::fs::write(
            dir.path().join("tollgate.toml"),
            format!("{KEYS}[[models]]\nslug = \"added\"\npool = \"p\"\n"),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (stop, watch) = tokio::sync::watch::channel(false);
            let service = ReloadTriggers(r.clone());
            let running = tokio::spawn(async move { service.start(watch).await });
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while r.runtime.load().config.model("added").is_none() {
                assert!(tokio::time::Instant::now() < deadline, "no reload");
                tokio::task::yield_now().await;
            }
            let _ = stop.send(true);
            running.await.unwrap();
        });
    }
}
