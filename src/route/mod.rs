//! Routing: `model` → model entry → pool → a replica, with per-replica in-flight counts.

mod idle;
mod least_inflight;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pingora::protocols::Stream;
use pingora::upstreams::peer::HttpPeer;

use crate::config::{Key, Model, Snapshot};
use idle::IdleConns;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// The slug names no configured model.
    ModelNotFound { model: String },
    /// The model exists but the key's `models` list does not cover it.
    ModelForbidden { model: String, key_id: String },
}

/// The model a request names, if it exists and the key may use it.
pub fn resolve<'s>(
    snapshot: &'s Snapshot,
    key: &Key,
    slug: &str,
) -> Result<&'s Arc<Model>, RouteError> {
    let model = snapshot
        .model(slug)
        .ok_or_else(|| RouteError::ModelNotFound {
            model: slug.to_string(),
        })?;
    if !key.allows(slug) {
        return Err(RouteError::ModelForbidden {
            model: slug.to_string(),
            key_id: key.id.to_string(),
        });
    }
    Ok(model)
}

/// Per-pool replica sets, indexed like `Snapshot::pools`.
pub struct Router {
    pools: Vec<PoolRoute>,
}

impl Router {
    /// Replica sets for a snapshot. A replica address that `previous` also routes to keeps
    /// its in-flight count and its idle connections, so a reload does not forget the load
    /// already on it.
    pub fn build(snapshot: &Snapshot, previous: Option<&Router>) -> Self {
        let idle_limit = snapshot.server.upstream_keepalive_pool_size.get();
        let live_of = |addr: SocketAddr| {
            previous
                .and_then(|r| {
                    r.pools
                        .iter()
                        .flat_map(|p| &p.replicas)
                        .find(|x| x.addr == addr)
                })
                .map(|x| Live {
                    inflight: x.inflight.clone(),
                    idle: x.idle.clone(),
                })
                .unwrap_or_default()
        };
        let pools = snapshot
            .pools
            .iter()
            .map(|p| PoolRoute {
                replicas: p
                    .replicas
                    .iter()
                    .map(|&addr| {
                        let t = &p.timeouts;
                        Arc::new(Replica::new(
                            addr,
                            t.connect,
                            t.pool_idle,
                            idle_limit,
                            live_of(addr),
                        ))
                    })
                    .collect(),
            })
            .collect();
        Router { pools }
    }

    pub fn pool(&self, index: usize) -> &PoolRoute {
        &self.pools[index]
    }
}

pub struct PoolRoute {
    replicas: Vec<Arc<Replica>>,
}

impl PoolRoute {
    /// Picks the replica with the fewest requests in flight, skipping those `tried` says were
    /// tried already; ties are broken at random so equal replicas share load. The lease counts
    /// the request until dropped.
    pub fn pick(&self, tried: impl Fn(SocketAddr) -> bool) -> Option<Lease> {
        let replica = least_inflight::pick(&self.replicas, tried)?;
        replica.inflight.fetch_add(1, Ordering::Relaxed);
        Some(Lease { replica })
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }
}

/// What a replica carries over a reload.
#[derive(Default)]
struct Live {
    inflight: Arc<AtomicUsize>,
    idle: Arc<IdleConns>,
}

/// One upstream server and its live load.
pub struct Replica {
    pub addr: SocketAddr,
    /// `addr` rendered once, for the `host` header of every request sent to it, its ledger
    /// rows and log lines.
    pub authority: Arc<str>,
    inflight: Arc<AtomicUsize>,
    /// Connections to it waiting for the next request.
    idle: Arc<IdleConns>,
    /// How many may wait, and for how long.
    idle_limit: usize,
    pool_idle: std::time::Duration,
    /// Template for new connections: the connect timeout is fixed per replica.
    peer: HttpPeer,
}

impl Replica {
    fn new(
        addr: SocketAddr,
        connect: std::time::Duration,
        pool_idle: std::time::Duration,
        idle_limit: usize,
        live: Live,
    ) -> Self {
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(connect);
        let authority = addr.to_string();
        Replica {
            addr,
            authority: authority.into(),
            inflight: live.inflight,
            idle: live.idle,
            idle_limit,
            pool_idle,
            peer,
        }
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    pub fn peer(&self) -> &HttpPeer {
        &self.peer
    }

    /// An idle connection to this replica, still open and not expired, if there is one.
    pub fn reuse(&self) -> Option<Stream> {
        self.idle.take(self.pool_idle)
    }

    /// Keeps a connection that finished a response cleanly for the next request.
    pub fn keep(&self, stream: Stream) {
        self.idle.put(stream, self.idle_limit, self.pool_idle);
    }
}

/// A request's claim on a replica; dropping it (on any path) releases the in-flight slot.
pub struct Lease {
    replica: Arc<Replica>,
}

impl Lease {
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.replica.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}
