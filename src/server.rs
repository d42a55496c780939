//! Assembly: Pingora server, the public proxy service, the admin service, and sockets bound
//! before start so that `:0` listeners work and bind errors surface before anything runs.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{IntoRawFd, RawFd};
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::ServerConf;
use pingora::server::{ListenFds, RunArgs, Server, ShutdownWatch};
use pingora::services::background::background_service;
use pingora::services::listening::Service as ListeningService;
use pingora::services::{ServiceReadyNotifier, ServiceWithDependents};

use crate::account::Ledger;
use crate::admin::Admin;
use crate::alerts::Alerter;
use crate::async_queue::AsyncQueue;
use crate::config::Snapshot;
use crate::conn::Clients;
use crate::dispatch::{self, Dispatcher};
use crate::limits::shared::{OnCrossed, Shared};
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::reload::{ConfigFile, ReloadTriggers, Reloader};
use crate::runtime::Runtime;

/// The addresses actually bound (a configured port 0 becomes a real port).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub public: SocketAddr,
    pub admin: SocketAddr,
}

/// Binds the listeners, then serves until SIGTERM (graceful) or SIGINT (fast).
/// `on_ready` runs once the sockets accept connections (they queue until served).
pub fn run(
    snapshot: Snapshot,
    config_file: Option<ConfigFile>,
    on_ready: impl FnOnce(Bound),
) -> Result<(), String> {
    if !crate::reclaim::no_huge_pages() {
        tracing::debug!("transparent huge pages stay allowed");
    }
    // Before any database is opened (the ledger, async predict's queue).
    if !crate::account::sqlite_memory::use_process_allocator() {
        tracing::debug!("SQLite was in use already; it keeps its own allocator");
    }
    let public = bind(snapshot.server.listen, "server.listen")?;
    let admin = bind(snapshot.admin.listen, "admin.listen")?;
    let bound = Bound {
        public: public.0,
        admin: admin.0,
    };

    let mut server = Server::new_with_opt_and_conf(None, server_conf(&snapshot));
    server.bootstrap();

    let metrics = Arc::new(Metrics::new());
    let ledger = match snapshot.state.ledger {
        true => Some(Arc::new(Ledger::open(
            &snapshot.state.dir,
            metrics.ledger_meters(),
        )?)),
        false => None,
    };
    let mut runtime = Runtime::new(snapshot, None, &metrics);
    // Async predict's queue, when a deployed model exists at start (a restart, not a reload,
    // turns it on). Opened before budgets are rebuilt: what its requests were charged is
    // not in the ledger until they end.
    let queue = match runtime.config.deployed_models.is_empty() {
        true => None,
        false => Some(Arc::new(AsyncQueue::open(
            &runtime.config.state.dir,
            crate::limits::now_ms(),
        )?)),
    };
    if let Some(queue) = &queue {
        let config = &runtime.config;
        queue.owe_open(|model| config.deployed_model(model).map_or(0, |m| m.price_nanos));
    }
    if let Some(ledger) = &ledger {
        runtime.seed_budgets(ledger, None, queue.as_deref().map(|q| &q.charges))?;
    }
    if let Some(settings) = runtime.config.cluster.clone() {
        let shared = Shared::start(settings, metrics.cluster_meters())?;
        shared.track(&runtime.config);
        runtime.limits.shared = Some(shared);
    }
    let runtime = Arc::new(ArcSwap::from_pointee(runtime));
    if let Some(shared) = &runtime.load().limits.shared {
        let current = runtime.clone();
        shared.begin(Box::new(move || current.load().budget_spends()));
    }
    runtime.load().take_over(None);
    let reloader = config_file.map(|file| {
        Arc::new(Reloader::new(
            file,
            runtime.clone(),
            metrics.clone(),
            ledger.clone(),
            queue.clone(),
        ))
    });

    if let Some(shared) = &runtime.load().limits.shared {
        shared.on_crossed(alert_hook(runtime.clone(), metrics.clone(), ledger.clone()));
    }

    let sockets = server.add_service(Sockets {
        fds: vec![
            (public.0.to_string(), public.1),
            (admin.0.to_string(), admin.1),
        ],
    });
    // The gateway's hooks, run by tollgate's keep-alive loop: each request head has a deadline.
    let gateway = Gateway::new(
        runtime.clone(),
        metrics.clone(),
        ledger.clone(),
        queue.clone(),
    );
    let mut proxy = ListeningService::new(
        "tollgate".into(),
        Clients::new(
            gateway,
            runtime.clone(),
            metrics.client_timeouts("head"),
            metrics.inflight.clone(),
        ),
    );
    // No read buffer under Pingora's own: it reads a request head into a buffer of its own
    // and a body into another, so a 64 KiB buffer beneath them (Pingora's default, which
    // pays off under TLS's 16 KiB records) only saves a copy, and costs 64 KiB of memory per
    // client connection, held for as long as a stream stays open.
    proxy.add_listener(
        ListenerConfig::tcp(public.0.to_string()).l4_buffer(L4BufferSettings::default().read(0)),
    );
    let proxy = server.add_service(proxy);
    proxy.add_dependency(&sockets);

    let mut admin_service = ListeningService::new(
        "tollgate admin".into(),
        HttpServer::new_app(Admin::new(
            metrics.clone(),
            ledger.clone(),
            runtime.clone(),
            reloader.clone(),
        )),
    );
    admin_service.add_tcp(&admin.0.to_string());
    admin_service.threads = Some(1);
    let admin_handle = server.add_service(admin_service);
    admin_handle.add_dependency(&sockets);

    if let Some(reloader) = reloader {
        server.add_service(background_service(
            "tollgate reload",
            ReloadTriggers(reloader),
        ));
    }

    if let Some(queue) = queue {
        let dispatcher = Dispatcher::new(runtime.clone(), queue, ledger.clone(), &metrics);
        let mut service = background_service("tollgate async", dispatch::Service(dispatcher));
        service.threads = Some(1);
        server.add_service(service);
    }

    on_ready(bound);
    server.run(RunArgs::default());
    // Every request has finished or been cut; the cut ones hand their records as the workers
    // drop them. Then write what the ledger still holds before exiting.
    if !metrics.wait_idle(IDLE_AT_EXIT) {
        tracing::warn!(
            in_flight = metrics.inflight.get(),
            "requests still unrecorded at exit; their usage is lost"
        );
    }
    if let Some(ledger) = ledger {
        ledger.close();
    }
    Ok(())
}

/// How long the exit waits for the records of requests cut at shutdown.
const IDLE_AT_EXIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Alerts of budgets shared in Redis: the cluster reports each threshold once, to the node
/// whose settlement crossed it.
fn alert_hook(
    runtime: Arc<ArcSwap<Runtime>>,
    metrics: Arc<Metrics>,
    ledger: Option<Arc<Ledger>>,
) -> OnCrossed {
    let alerter = Alerter::new(metrics, ledger);
    Box::new(move |key_id, crossed| {
        let runtime = runtime.load();
        if let Some(budget) = runtime
            .config
            .key_by_id(key_id)
            .and_then(|k| k.budget.as_ref())
        {
            alerter.fire(&runtime.config.alerts, key_id, budget, crossed);
        }
    })
}

fn server_conf(snapshot: &Snapshot) -> ServerConf {
    let pid = std::process::id();
    ServerConf {
        threads: snapshot.server.threads.get(),
        grace_period_seconds: Some(snapshot.server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(5),
        pid_file: format!("/tmp/tollgate-{pid}.pid"),
        upgrade_sock: format!("/tmp/tollgate-{pid}-upgrade.sock"),
        ..ServerConf::default()
    }
}

fn bind(addr: SocketAddr, what: &str) -> Result<(SocketAddr, RawFd), String> {
    let listener =
        TcpListener::bind(addr).map_err(|e| format!("{what}: cannot listen on {addr}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("{what}: {addr}: {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("{what}: {addr}: {e}"))?;
    Ok((local, listener.into_raw_fd()))
}

/// Hands the pre-bound sockets to Pingora's listener table before the listening services
/// start; Pingora then serves on them instead of binding again.
struct Sockets {
    fds: Vec<(String, RawFd)>,
}

#[async_trait]
impl ServiceWithDependents for Sockets {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        _shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
        ready: ServiceReadyNotifier,
    ) {
        if let Some(table) = fds {
            let mut table = table.lock();
            for (addr, fd) in self.fds.drain(..) {
                if table.get(&addr).is_none() {
                    table.add(addr, fd);
                }
            }
        }
        ready.notify_ready();
    }

    fn name(&self) -> &str {
        "tollgate sockets"
    }

    fn threads(&self) -> Option<usize> {
        Some(1)
    }
}
