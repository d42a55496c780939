//! The way admissions and settlements reach Redis: a lane per worker thread, one task that
//! owns a connection and sends whatever has queued as one script call (`lua::step`), then
//! the next batch once that one is answered. An idle lane sends a request at once, so one
//! request alone waits one round trip; under load, every request that arrived during a round
//! trip shares the next, and Redis runs one script for all of them.
//!
//! The lane's task and its connection live on the runtime of the thread that first used it:
//! a worker waiting for its answer is woken by its own runtime's reactor, not by another
//! thread.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, oneshot};

use super::quota::{Pool, Return};
use super::{reply, Shared};

/// Operations one script call carries at most.
const MOST: usize = 64;

/// One operation of a batch: its keys and arguments as `lua::STEP_BODY` reads them.
pub(super) struct Op {
    pub pool: Arc<Pool>,
    /// The budget's hash for the period, if the key has a budget.
    pub budget: Option<String>,
    pub kind: Kind,
}

pub(super) enum Kind {
    Grant {
        /// The name the granted slots are numbered from.
        base: String,
        /// This node's budget hold under the current connection.
        hold: String,
        nums: [u64; 23],
        reply: oneshot::Sender<String>,
    },
    Return(Return),
}

/// Sets apart the lanes of two `Shared` in one process (tests start several).
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static LANES: RefCell<Vec<(u64, mpsc::UnboundedSender<Op>)>> = const { RefCell::new(Vec::new()) };
}

/// Where a `Shared` keeps what its lanes need.
pub(super) struct Lanes {
    id: u64,
    /// The lane of threads without a runtime, on the cluster thread.
    outside: OnceLock<mpsc::UnboundedSender<Op>>,
}

impl Lanes {
    pub fn new() -> Lanes {
        Lanes {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            outside: OnceLock::new(),
        }
    }
}

/// Queues `op` on its quota's lane: the lane of the thread that first sent one of the
/// quota's operations (started on first use, and again if the runtime it ran on is gone).
/// One lane per quota keeps its operations in the order they were made, so a slot a
/// request gave back is back in Redis before the next grant of its quota is asked for.
pub(super) fn send(shared: &Arc<Shared>, op: Op) {
    let pool = op.pool.clone();
    let mut home = pool.lane.lock().unwrap_or_else(|e| e.into_inner());
    let op = match home.as_ref() {
        Some(tx) => match tx.send(op) {
            Ok(()) => return,
            Err(mpsc::error::SendError(op)) => op,
        },
        None => op,
    };
    let tx = this_thread(shared);
    let _ = tx.send(op);
    *home = Some(tx);
}

/// This thread's lane (the cluster thread's for threads without a runtime).
fn this_thread(shared: &Arc<Shared>) -> mpsc::UnboundedSender<Op> {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return shared
            .lanes
            .outside
            .get_or_init(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                shared.handle.spawn(run(shared.clone(), rx));
                tx
            })
            .clone();
    };
    let id = shared.lanes.id;
    LANES.with(|lanes| {
        let mut lanes = lanes.borrow_mut();
        if let Some(at) = lanes.iter().position(|(lane, _)| *lane == id) {
            if !lanes[at].1.is_closed() {
                return lanes[at].1.clone();
            }
            lanes.swap_remove(at);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        rt.spawn(run(shared.clone(), rx));
        lanes.push((id, tx.clone()));
        tx
    })
}

async fn run(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Op>) {
    let mut conn = None;
    let mut ops = Vec::with_capacity(MOST);
    // A batch of settlements only, still out. Nothing waits for its answer but its alerts,
    // so the next batch is sent behind it on the same connection rather than after it:
    // Redis runs them in the order sent, and an admission does not wait a round trip more.
    let mut behind: Option<Pin<Box<dyn Future<Output = ()> + Send>>> = None;
    loop {
        let got = match behind.as_mut() {
            Some(out) => tokio::select! {
                biased;
                () = out => {
                    behind = None;
                    continue;
                }
                got = rx.recv_many(&mut ops, MOST) => got,
            },
            None => rx.recv_many(&mut ops, MOST).await,
        };
        if got == 0 {
            if let Some(out) = behind {
                out.await;
            }
            return;
        }
        let settlements = ops.iter().all(|op| matches!(op.kind, Kind::Return(_)));
        match connection(&shared, &mut conn).await {
            None => {}
            Some(c) if settlements && behind.is_none() => {
                let batch = std::mem::replace(&mut ops, Vec::with_capacity(MOST));
                let mut out: Pin<Box<dyn Future<Output = ()> + Send>> =
                    Box::pin(step(shared.clone(), c.clone(), batch));
                // Polled once here, so that its command is queued before any later one.
                if std::future::poll_fn(|cx| Poll::Ready(out.as_mut().poll(cx)))
                    .await
                    .is_pending()
                {
                    behind = Some(out);
                }
            }
            Some(c) => step(shared.clone(), c.clone(), std::mem::take(&mut ops)).await,
        }
        ops.clear();
    }
}

/// The lane's connection, made again when Redis has been away since it was made; `None`
/// while Redis is down.
async fn connection<'c>(
    shared: &Shared,
    conn: &'c mut Option<(u64, MultiplexedConnection)>,
) -> Option<&'c mut MultiplexedConnection> {
    if !shared.is_up() {
        *conn = None;
        return None;
    }
    // A connection made before Redis last went away is not used again.
    let epoch = shared.epoch.load(Ordering::Acquire);
    if conn.as_ref().is_none_or(|(made, _)| *made != epoch) {
        let wait = shared.settings.timeout.max(Duration::from_millis(250));
        // The call's own timeout (`cluster.timeout_ms`) bounds each answer; the connection's
        // second timer per call would only cost.
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let connect = shared
            .client
            .get_multiplexed_async_connection_with_config(&config);
        match tokio::time::timeout(wait, connect).await {
            Ok(Ok(c)) => *conn = Some((epoch, c)),
            _ => {
                shared.mark_down();
                return None;
            }
        }
    }
    conn.as_mut().map(|(_, c)| c)
}

/// Sends one batch and hands out the answers. An operation left unanswered (Redis down or
/// late: `Shared::step` marks it down) drops its reply sender, which its admission reads as
/// Redis being down.
async fn step(shared: Arc<Shared>, mut conn: MultiplexedConnection, ops: Vec<Op>) {
    let Ok(answers) = shared.step(&mut conn, &command(&shared, &ops)).await else {
        return;
    };
    for (op, answer) in ops.into_iter().zip(answers.split(';')) {
        match op.kind {
            Kind::Grant { reply, .. } => {
                let _ = reply.send(answer.to_string());
            }
            Kind::Return(Return {
                alerts: Some((nanos, start, _)),
                ..
            }) => {
                let crossed = reply::crossed(answer, nanos, start);
                if !crossed.is_empty() {
                    if let Some(hook) = shared.on_crossed.get() {
                        hook(&op.pool.key_id, crossed);
                    }
                }
            }
            Kind::Return(_) => {}
        }
    }
}

/// The batch as one `EVALSHA`, built in one buffer: every operation's keys, then the lease
/// TTL and every operation's arguments.
fn command(shared: &Shared, ops: &[Op]) -> redis::Cmd {
    let keys = ops.len() * 6;
    let mut cmd = redis::Cmd::with_capacity(3 + keys * 2 + ops.len() * 28, 64 * keys);
    cmd.arg("EVALSHA")
        .arg(shared.scripts.step.get_hash())
        .arg(keys);
    for op in ops {
        let names = &op.pool.names;
        let m = op.pool.model.as_deref().unwrap_or(&names.no_model);
        cmd.arg(&names.w)
            .arg(&names.ls)
            .arg(op.budget.as_ref().unwrap_or(&names.no_budget))
            .arg(&m.w)
            .arg(&m.ls)
            .arg(&names.hs);
    }
    cmd.arg(shared.settings.lease_ttl.as_millis() as u64);
    for op in ops {
        match &op.kind {
            Kind::Grant {
                base, hold, nums, ..
            } => {
                cmd.arg("g").arg(base).arg(hold);
                for n in nums {
                    cmd.arg(*n);
                }
            }
            Kind::Return(r) => {
                cmd.arg("r")
                    .arg(shared.hold_id(r.epoch))
                    .arg(u64::from(op.pool.model.is_some()))
                    .arg(u64::from(op.budget.is_some()))
                    .arg(r.alerts.as_ref().map_or(0, |a| super::lua_int(a.0)))
                    .arg(super::lua_int(r.spent))
                    .arg(super::lua_int(r.leaving))
                    .arg(u64::from(r.release))
                    .arg(r.slots.len());
                for slot in &r.slots {
                    cmd.arg(slot);
                }
                cmd.arg(r.corrections.len());
                for &(sec, requests, tokens) in &r.corrections {
                    cmd.arg(sec)
                        .arg(super::lua_int(requests))
                        .arg(super::lua_int(tokens));
                }
                let thresholds = r.alerts.as_ref().map_or(&[][..], |a| &a.2[..]);
                cmd.arg(thresholds.len());
                for t in thresholds {
                    cmd.arg(t.to_string());
                }
            }
        }
    }
    cmd
}
