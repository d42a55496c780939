//! The `pingora` variant: Pingora 0.9.1's own proxy path with nothing of tollgate's. No key,
//! no body read, no accounting: each request goes to the next replica in turn over Pingora's
//! keep-alive pool and the answer comes back as it is. What this costs per request is what
//! any gateway built on Pingora starts from. The harness runs it as a child process of its
//! own binary (`--serve-floor LISTEN THREADS REPLICA...`), so nothing else needs building.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Floor {
    replicas: Vec<SocketAddr>,
    next: AtomicUsize,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.replicas.len();
        Ok(Box::new(HttpPeer::new(
            self.replicas[i],
            false,
            String::new(),
        )))
    }
}

/// Serves until killed (SIGINT: Pingora's fast shutdown, which lets callgrind write its
/// profile). `args`: the listen address, the worker threads, then the replicas.
pub fn serve(args: &[String]) -> std::result::Result<(), String> {
    let usage = "--serve-floor LISTEN THREADS REPLICA...";
    let (listen, threads, replicas) = match args {
        [listen, threads, replicas @ ..] if !replicas.is_empty() => (listen, threads, replicas),
        _ => return Err(usage.into()),
    };
    let listen: SocketAddr = listen.parse().map_err(|e| format!("{listen}: {e}"))?;
    let threads: usize = threads.parse().map_err(|e| format!("{threads}: {e}"))?;
    let replicas: Vec<SocketAddr> = replicas
        .iter()
        .map(|a| a.parse().map_err(|e| format!("{a}: {e}")))
        .collect::<std::result::Result<_, String>>()?;
    let pid = std::process::id();
    let mut server = Server::new_with_opt_and_conf(
        None,
        ServerConf {
            threads,
            pid_file: format!("/tmp/pingora-floor-{pid}.pid"),
            upgrade_sock: format!("/tmp/pingora-floor-{pid}-upgrade.sock"),
            ..ServerConf::default()
        },
    );
    server.bootstrap();
    let mut proxy = http_proxy_service(
        &server.configuration,
        Floor {
            replicas,
            next: AtomicUsize::new(0),
        },
    );
    proxy.add_tcp(&listen.to_string());
    server.add_service(proxy);
    server.run_forever()
}
