//! Cluster mode: the limits and budgets of several nodes counted in one Redis. Redis grants
//! each node blocks of a (key, model) pair's limits, checking every limit and counting the
//! block in one atomic script (`lua.rs`), and the node admits and settles against its block
//! without a round trip (`quota.rs`, `admit.rs`); near a limit a block is one request's
//! worth, so the nodes together never pass one. Grants and returns travel in batches, one
//! script call for every operation queued on a worker thread while the previous call was out
//! (`lane.rs`). Slots and budget holds are leases that this node renews in one round trip
//! for all of them; a node that stops stops renewing, and what it held lapses after
//! `cluster.lease_ttl_ms`.
//!
//! Whether Redis answers is one atomic flag, read by every admission: while it is down,
//! nothing waits on Redis, and `probe` reconnects in the background.

mod admit;
mod lane;
mod lua;
mod quota;
mod reply;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use prometheus::{IntCounter, IntGauge};
use redis::aio::MultiplexedConnection;
use redis::{FromRedisValue, ScriptInvocation};

use super::{period, Crossed, LimitError, RateView};
use crate::config::{ClusterSettings, Limits, OnRedisDown, Snapshot};
use quota::Pool;

pub use reply::Lease;

/// The metrics cluster mode keeps, registered by `metrics`.
pub struct ClusterMeters {
    /// 1 while Redis answers, 0 while this node decides without it.
    pub up: IntGauge,
    /// Requests decided without Redis (counted locally, or refused).
    pub fallback: IntCounter,
}

/// This node's quotas: per key, one per model with limits (`None`: the key's alone).
type Pools = HashMap<Arc<str>, Vec<(Option<String>, Arc<Pool>)>>;

/// Each budget's current period as this node counts it: (key id, period start, spent,
/// thresholds fired).
pub type Seeds = Box<dyn Fn() -> Vec<(Arc<str>, i64, u64, Vec<f64>)> + Send + Sync>;

/// Called with the budget thresholds a settlement crossed, once across the cluster.
pub type OnCrossed = Box<dyn Fn(&str, Vec<Crossed>) + Send + Sync>;

pub struct Shared {
    settings: ClusterSettings,
    client: redis::Client,
    conn: ArcSwapOption<MultiplexedConnection>,
    up: AtomicBool,
    /// Counts the times Redis came back: a lane whose connection is older makes a new one.
    epoch: AtomicU64,
    /// `<node id>:<random per start>:`: this process's leases, apart from an earlier run's.
    lease_prefix: String,
    seq: AtomicU64,
    /// The lease and hold sets of every configured key and model (from the config in use).
    lease_keys: ArcSwap<Vec<String>>,
    /// This node's quota of each (key, model with limits) pair, kept across reloads; read
    /// without a lock, copied on the rare write (a pair's first request).
    pools: ArcSwap<Pools>,
    new_pool: Mutex<()>,
    /// The Redis key names of every configured key and model, made once per config.
    names: ArcSwap<Names>,
    scripts: Scripts,
    meters: ClusterMeters,
    handle: tokio::runtime::Handle,
    on_crossed: OnceLock<OnCrossed>,
    /// Wakes `probe` when a call finds Redis gone.
    down: tokio::sync::Notify,
    lanes: lane::Lanes,
}

/// The Redis keys of one API key: its window, lease set and hold set, and the stand-ins the
/// script is given where there is no budget or no model.
pub(super) struct KeyNames {
    w: String,
    ls: String,
    hs: String,
    no_budget: String,
    no_model: ModelNames,
}

impl KeyNames {
    fn of(id: &str) -> KeyNames {
        let p = key_prefix(id);
        KeyNames {
            w: format!("{p}:w"),
            ls: format!("{p}:ls"),
            hs: format!("{p}:hs"),
            no_budget: format!("{p}:b:none"),
            no_model: ModelNames::with_prefix(&format!("{p}:none")),
        }
    }
}

/// The Redis keys of one model's limits.
pub(super) struct ModelNames {
    w: String,
    ls: String,
}

impl ModelNames {
    fn with_prefix(p: &str) -> ModelNames {
        ModelNames {
            w: format!("{p}:w"),
            ls: format!("{p}:ls"),
        }
    }
}

#[derive(Default)]
struct Names {
    keys: HashMap<Arc<str>, Arc<KeyNames>>,
    models: HashMap<String, Arc<ModelNames>>,
}

struct Scripts {
    step: redis::Script,
    renew: redis::Script,
    seed: redis::Script,
}

/// What Redis decided about a request.
pub enum Decision {
    Admitted {
        lease: Lease,
        view: RateView,
        clamped: Option<u64>,
    },
    Refused {
        err: LimitError,
        view: RateView,
    },
    /// Redis did not answer in time: the node's `on_redis_down` decides.
    Down(OnRedisDown),
}

impl Shared {
    /// Starts the cluster runtime (one thread: the Redis connection, settlements, lease
    /// renewals, reconnects) and waits for the first connect, up to a second. A node whose
    /// Redis is down at start serves in its `on_redis_down` mode until it comes up.
    pub fn start(settings: ClusterSettings, meters: ClusterMeters) -> Result<Arc<Shared>, String> {
        let client = redis::Client::open(settings.redis_url.as_str())
            .map_err(|_| "cluster.redis_url is not a Redis URL".to_string())?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("tollgate-cluster".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = tx.send(Ok(rt.handle().clone()));
                rt.block_on(std::future::pending::<()>());
            })
            .map_err(|e| format!("cannot start the cluster thread: {e}"))?;
        let handle = rx
            .recv()
            .map_err(|_| "the cluster thread did not start".to_string())??;
        meters.up.set(0);
        let lease_prefix = format!("{}:{:016x}:", settings.node_id, rand::random::<u64>());
        let shared = Arc::new(Shared {
            lease_prefix,
            settings,
            client,
            conn: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            lease_keys: ArcSwap::from_pointee(Vec::new()),
            pools: ArcSwap::from_pointee(HashMap::new()),
            new_pool: Mutex::new(()),
            names: ArcSwap::from_pointee(Names::default()),
            scripts: Scripts {
                step: lua::step(),
                renew: lua::renew(),
                seed: lua::seed(),
            },
            meters,
            handle,
            on_crossed: OnceLock::new(),
            down: tokio::sync::Notify::new(),
            lanes: lane::Lanes::new(),
        });
        Ok(shared)
    }

    /// Connects, and keeps connecting whenever Redis is lost: each connect first seeds the
    /// budgets Redis holds nothing of from `seeds` (this node's spend of each budget's
    /// period, from its ledger and what it settled since), then shares the limits. Waits up
    /// to a second for the first connect.
    pub fn begin(self: &Arc<Self>, seeds: Seeds) {
        let (first, connected) = mpsc::channel();
        self.handle.spawn(probe(self.clone(), seeds, first));
        self.handle.spawn(renew(self.clone()));
        self.handle.spawn(tend(self.clone()));
        let _ = connected.recv_timeout(Duration::from_secs(1));
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Where alerts of shared budgets go (set once, at start).
    pub fn on_crossed(&self, hook: OnCrossed) {
        let _ = self.on_crossed.set(hook);
    }

    /// Notes the keys and models of the config in use: whose leases renewals extend.
    pub fn track(&self, snapshot: &Snapshot) {
        let keys = snapshot
            .keys()
            .flat_map(|k| {
                let p = key_prefix(&k.id);
                [format!("{p}:ls"), format!("{p}:hs")]
            })
            .chain(
                snapshot
                    .models
                    .iter()
                    .map(|m| format!("{}:ls", model_prefix(&m.slug))),
            )
            .collect();
        self.lease_keys.store(Arc::new(keys));
        self.names.store(Arc::new(Names {
            keys: snapshot
                .keys()
                .map(|k| (k.id.clone(), Arc::new(KeyNames::of(&k.id))))
                .collect(),
            models: snapshot
                .models
                .iter()
                .map(|m| {
                    let names = ModelNames::with_prefix(&model_prefix(&m.slug));
                    (m.slug.to_string(), Arc::new(names))
                })
                .collect(),
        }));
    }

    /// Counts a request decided without Redis.
    pub fn note_fallback(&self) {
        self.meters.fallback.inc();
    }

    /// Seeds each budget's current period where Redis holds none yet (`HSETNX`): the first
    /// node to connect after Redis lost its data seeds it, the others find it there.
    async fn seed(&self, conn: &mut MultiplexedConnection, seeds: &Seeds) -> bool {
        let mut ok = true;
        for (id, start, spent, fired) in seeds() {
            let mut inv = self.scripts.seed.prepare_invoke();
            inv.key(budget_hash(&id, start)).arg(lua_int(spent));
            for t in fired {
                inv.arg(t.to_string());
            }
            let r = tokio::time::timeout(Duration::from_secs(1), inv.invoke_async::<i64>(conn));
            ok &= matches!(r.await, Ok(Ok(_)));
        }
        ok
    }

    /// Runs a script on the cluster thread's connection (renewals).
    async fn call<T: FromRedisValue>(&self, inv: &ScriptInvocation<'_>) -> Result<T, ()> {
        let Some(conn) = self.conn.load_full() else {
            self.mark_down();
            return Err(());
        };
        self.invoke(&mut (*conn).clone(), inv).await
    }

    /// Runs a batch (`lane::command`) within `cluster.timeout_ms`, loading the script first
    /// where Redis does not hold it (a restarted Redis answers NOSCRIPT).
    async fn step(&self, conn: &mut MultiplexedConnection, cmd: &redis::Cmd) -> Result<String, ()> {
        let run = async {
            match cmd.query_async::<String>(conn).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    self.scripts.step.prepare_invoke().load_async(conn).await?;
                    cmd.query_async::<String>(conn).await
                }
                answer => answer,
            }
        };
        self.decide(tokio::time::timeout(self.settings.timeout, run).await)
    }

    /// Runs a script within `cluster.timeout_ms`; Redis is marked down if it fails.
    async fn invoke<T: FromRedisValue>(
        &self,
        conn: &mut MultiplexedConnection,
        inv: &ScriptInvocation<'_>,
    ) -> Result<T, ()> {
        self.decide(tokio::time::timeout(self.settings.timeout, inv.invoke_async(conn)).await)
    }

    /// A call's outcome: its answer, or Redis marked down.
    fn decide<T>(
        &self,
        outcome: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, ()> {
        match outcome {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if !is_connection_error(&e) => {
                // A script error is a bug, not an outage: said, and decided as one.
                tracing::error!(error = %e, "cluster script failed");
                self.mark_down();
                Err(())
            }
            _ => {
                self.mark_down();
                Err(())
            }
        }
    }

    fn mark_down(&self) {
        if self.up.swap(false, Ordering::AcqRel) {
            self.meters.up.set(0);
            self.conn.store(None);
            tracing::warn!(
                on_redis_down = mode_name(self.settings.on_redis_down),
                "redis unreachable: limits are {} until it answers again",
                match self.settings.on_redis_down {
                    OnRedisDown::Reject => "refused (503 limits_unavailable)",
                    OnRedisDown::Local => "counted on this node, divided by cluster.expected_nodes",
                }
            );
            self.down.notify_one();
        }
    }
}

fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

fn mode_name(mode: OnRedisDown) -> &'static str {
    match mode {
        OnRedisDown::Reject => "reject",
        OnRedisDown::Local => "local",
    }
}

const NONE: Limits = Limits {
    rpm: None,
    tpm: None,
    max_concurrent: None,
};

/// Lua counts in doubles: integers are exact up to 2^53 (9 million dollars in nano-dollars,
/// 9·10^15 tokens). Larger values are held at that, which no real limit reaches.
fn lua_int(v: u64) -> u64 {
    v.min(1 << 53)
}

pub(super) fn key_prefix(id: &str) -> String {
    format!("tollgate:k:{id}")
}

fn model_prefix(slug: &str) -> String {
    format!("tollgate:m:{slug}")
}

fn budget_hash(id: &str, period_start: i64) -> String {
    format!("tollgate:k:{id}:b:{period_start}")
}

/// Connects while Redis is down, every 200 ms, and says when it answers again.
async fn probe(shared: Arc<Shared>, seeds: Seeds, first: mpsc::Sender<()>) {
    let mut first = Some(first);
    let mut said_down = false;
    loop {
        if !shared.is_up() {
            let attempt = tokio::time::timeout(Duration::from_secs(1), async {
                let mut conn = shared.client.get_multiplexed_async_connection().await?;
                redis::cmd("PING").query_async::<String>(&mut conn).await?;
                Ok::<_, redis::RedisError>(conn)
            })
            .await;
            match attempt {
                Ok(Ok(mut conn)) => {
                    if !shared.seed(&mut conn, &seeds).await {
                        tracing::warn!(
                            "budgets could not be seeded in Redis from this node's spend"
                        );
                    }
                    shared.conn.store(Some(Arc::new(conn)));
                    shared.epoch.fetch_add(1, Ordering::AcqRel);
                    shared.up.store(true, Ordering::Release);
                    shared.meters.up.set(1);
                    tracing::info!(node_id = %shared.settings.node_id, "redis answers: limits and budgets are shared");
                    said_down = false;
                }
                _ if !said_down && first.is_some() => {
                    tracing::warn!(
                        on_redis_down = mode_name(shared.settings.on_redis_down),
                        "redis unreachable at start; retrying in the background"
                    );
                    said_down = true;
                }
                _ => {}
            }
            if let Some(tx) = first.take() {
                let _ = tx.send(());
            }
        }
        if shared.is_up() {
            shared.down.notified().await;
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Extends this node's leases every third of their TTL, all in one round trip.
async fn renew(shared: Arc<Shared>) {
    let ttl = shared.settings.lease_ttl;
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !shared.is_up() || shared.pools.load().is_empty() {
            continue;
        }
        let keys = shared.lease_keys.load_full();
        let mut inv = shared.scripts.renew.prepare_invoke();
        for k in keys.iter() {
            inv.key(k);
        }
        let epoch = shared.epoch.load(Ordering::Acquire);
        inv.arg(shared.prefix(epoch)).arg(ttl.as_millis() as u64);
        let _ = shared.call::<i64>(&inv).await;
    }
}

/// Every tick, each quota gives back what it owes: the rate units of a second that is over,
/// and what is free in a quota that was idle since the last tick or is tight.
async fn tend(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !shared.is_up() {
            continue;
        }
        let epoch = shared.epoch.load(Ordering::Acquire);
        let now = Instant::now();
        let pools = shared.pools.load_full();
        for pool in pools.values().flatten().map(|(_, p)| p) {
            let owed = pool.tick(epoch, now);
            shared.send_returns(pool, owed);
        }
    }
}

/// How often quotas give back what they do not use.
const TICK: Duration = Duration::from_millis(50);
