//! The durable usage ledger: SQLite (WAL) under `state.dir`, written by one dedicated thread
//! that batches inserts. Requests hand records over a bounded channel and never wait on disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, Statement};

use super::record::UsageRecord;
use super::spend::{spend_since_in, KeySpend};

/// Records waiting for the writer; past this the newest are dropped and counted.
const QUEUE_CAPACITY: usize = 200_000;
/// Records per transaction at most.
const MAX_BATCH: usize = 4096;
/// How long the writer gathers records before committing them. One commit per window
/// instead of one per request keeps the writer cheap under load; a killed process loses at
/// most this window's records (plus the commit in progress). Short windows keep each commit a
/// short burst of CPU: at 20k requests/s a 50 ms window made ~3 ms bursts that took a core
/// from a request worker and stalled its connections, a visible share of the p99.
const GATHER: Duration = Duration::from_millis(5);
/// Records kept in memory for a retry while the disk refuses writes.
const MAX_PENDING: usize = 1_000_000;

pub const FILE_NAME: &str = "usage.sqlite";

pub struct Ledger {
    sender: SyncSender<Msg>,
    writer: Mutex<Option<JoinHandle<()>>>,
    meters: LedgerMeters,
    path: PathBuf,
}

/// The ledger's own metrics, registered by `metrics` (unregistered ones work the same, for
/// tools and tests that export nothing).
#[derive(Clone)]
pub struct LedgerMeters {
    /// Records waiting for the writer.
    pub queue: prometheus::IntGauge,
    /// Records lost: queue full, or still unwritable at shutdown.
    pub dropped: prometheus::IntCounter,
    /// Failed writes (full or unwritable disk); the batch is retried.
    pub write_errors: prometheus::IntCounter,
}

impl Default for LedgerMeters {
    /// Handles no registry exports.
    fn default() -> Self {
        let counter = || {
            prometheus::IntCounter::new("unexported", "-")
                .unwrap_or_else(|e| unreachable!("a valid metric name: {e}"))
        };
        LedgerMeters {
            queue: prometheus::IntGauge::new("unexported", "-")
                .unwrap_or_else(|e| unreachable!("a valid metric name: {e}")),
            dropped: counter(),
            write_errors: counter(),
        }
    }
}

enum Msg {
    Record(Box<UsageRecord>),
    /// A budget alert fired: remember it so a restart does not fire it again.
    Alert {
        key_id: String,
        period_start: i64,
        threshold: f64,
    },
    /// Write everything before this, then answer.
    Flush(SyncSender<()>),
    /// Write everything before this, then answer with each key's spend in the question's
    /// period: exactly the records handed over before this message, none after.
    SpendSince(Question),
    /// Write everything before this, then stop.
    Close,
}

impl Ledger {
    /// Opens (or creates) the ledger in `dir` and starts its writer thread.
    pub fn open(dir: &Path, meters: LedgerMeters) -> Result<Ledger, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("state.dir {}: {e}", dir.display()))?;
        let path = dir.join(FILE_NAME);
        let conn = open_rw(&path)?;
        let (sender, rx) = mpsc::sync_channel(QUEUE_CAPACITY);
        let writer_meters = meters.clone();
        let writer = std::thread::Builder::new()
            .name("tollgate-ledger".into())
            .spawn({
                let path = path.clone();
                move || write_loop(conn, &path, rx, &writer_meters)
            })
            .map_err(|e| format!("cannot start the ledger writer: {e}"))?;
        Ok(Ledger {
            sender,
            writer: Mutex::new(Some(writer)),
            meters,
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands a record to the writer without blocking. A full queue drops it and counts it.
    pub fn record(&self, record: UsageRecord) {
        match self.sender.try_send(Msg::Record(Box::new(record))) {
            Ok(()) => self.meters.queue.inc(),
            Err(TrySendError::Full(_)) => {
                self.meters.dropped.inc();
                tracing::error!("usage ledger queue full; a record was dropped");
            }
            Err(TrySendError::Disconnected(_)) => self.meters.dropped.inc(),
        }
    }

    /// Remembers a fired budget alert (written off the request path, like records).
    pub fn record_alert(&self, key_id: &str, period_start: i64, threshold: f64) {
        let msg = Msg::Alert {
            key_id: key_id.to_string(),
            period_start,
            threshold,
        };
        if self.sender.try_send(msg).is_err() {
            tracing::error!("usage ledger queue full; an alert was not persisted");
        }
    }

    /// Waits until every record handed over so far is written (or failed). Off the request
    /// path: for shutdown, admin queries and tests.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.sender.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Asks for each key's spend in `[since_ms, until_ms)`, as of this moment: the answer
    /// holds exactly the records handed over before this call. Asking never waits; read the
    /// answer with `SpendAnswer::wait`. The writer commits what came before the question,
    /// takes a read snapshot and goes on writing while another thread reads it.
    pub fn ask_spend_since(&self, since_ms: i64, until_ms: Option<i64>) -> SpendAnswer {
        let (reply, rx) = mpsc::sync_channel(1);
        // Never waits: the caller holds counters that request workers need.
        match self.sender.try_send(Msg::SpendSince(Question {
            since_ms,
            until_ms,
            reply,
        })) {
            Ok(()) => SpendAnswer(Ok(rx)),
            Err(TrySendError::Full(_)) => SpendAnswer(Err(
                "the ledger's queue is full; budgets cannot be rebuilt now, try again".into(),
            )),
            Err(TrySendError::Disconnected(_)) => {
                SpendAnswer(Err("the ledger writer has stopped".into()))
            }
        }
    }

    /// Writes everything queued and stops the writer; records after this are dropped.
    pub fn close(&self) {
        let _ = self.sender.send(Msg::Close);
        if let Ok(mut w) = self.writer.lock() {
            if let Some(handle) = w.take() {
                let _ = handle.join();
            }
        }
    }
}

/// Each key's spend in a period, from the ledger.
pub type SpendByKey = HashMap<String, KeySpend>;

/// The writer's answer to `Ledger::ask_spend_since`.
pub struct SpendAnswer(Result<Receiver<Result<SpendByKey, String>>, String>);

impl SpendAnswer {
    pub fn wait(self) -> Result<SpendByKey, String> {
        self.0?
            .recv()
            .unwrap_or_else(|_| Err("the ledger writer has stopped".into()))
    }
}

fn open_rw(path: &Path) -> Result<Connection, String> {
    let conn = Connection::open(path).map_err(|e| format!("ledger {}: {e}", path.display()))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         PRAGMA busy_timeout = 5000;
         PRAGMA cache_size = -65536;
         CREATE TABLE IF NOT EXISTS usage (
             id TEXT PRIMARY KEY,
             request_id TEXT NOT NULL,
             ts_ms INTEGER NOT NULL,
             key_id TEXT NOT NULL,
             model TEXT NOT NULL,
             surface TEXT NOT NULL,
             status INTEGER NOT NULL,
             input_tokens INTEGER NOT NULL,
             cached_input_tokens INTEGER NOT NULL,
             output_tokens INTEGER NOT NULL,
             reasoning_tokens INTEGER NOT NULL,
             cost_nanos INTEGER NOT NULL,
             estimated INTEGER NOT NULL,
             ttft_ms REAL,
             duration_ms REAL NOT NULL,
             replica TEXT,
             queue_ms REAL,
             deployment TEXT,
             environment TEXT,
             bytes_in INTEGER,
             bytes_out INTEGER
         ) WITHOUT ROWID;
         -- Rows are found by time through the primary key: an id starts with its row's
         -- ts_ms in hex (see account::record_id). A separate time index cost every insert.
         DROP INDEX IF EXISTS usage_ts;
         CREATE TABLE IF NOT EXISTS alerts (
             key_id TEXT NOT NULL,
             period_start INTEGER NOT NULL,
             threshold REAL NOT NULL,
             fired_ms INTEGER NOT NULL,
             PRIMARY KEY (key_id, period_start, threshold)
         );",
    )
    .map_err(|e| format!("ledger {}: {e}", path.display()))?;
    add_missing_columns(&conn).map_err(|e| format!("ledger {}: {e}", path.display()))?;
    Ok(conn)
}

/// Columns added since the first ledger, so that a ledger written by an older tollgate
/// opens: its rows read NULL there.
fn add_missing_columns(conn: &Connection) -> rusqlite::Result<()> {
    const ADDED: [(&str, &str); 5] = [
        ("queue_ms", "REAL"),
        // Deployed models' calls.
        ("deployment", "TEXT"),
        ("environment", "TEXT"),
        ("bytes_in", "INTEGER"),
        ("bytes_out", "INTEGER"),
    ];
    for (name, kind) in ADDED {
        let has: bool = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('usage') WHERE name = ?1",
            [name],
            |row| row.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !has {
            conn.execute_batch(&format!("ALTER TABLE usage ADD COLUMN {name} {kind}"))?;
        }
    }
    Ok(())
}

/// First wait before writing again after a failed write; it doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

fn write_loop(conn: Connection, path: &Path, rx: Receiver<Msg>, meters: &LedgerMeters) {
    let mut batch: Vec<UsageRecord> = Vec::with_capacity(MAX_BATCH);
    // Prepared once for the writer's life (again after a failure to prepare them).
    let mut writer: Option<Writer> = None;
    let mut waiters: Vec<SyncSender<()>> = Vec::new();
    let mut questions: Vec<Question> = Vec::new();
    let mut alerts: Vec<(String, i64, f64)> = Vec::new();
    // While the disk refuses writes: when to try again, and the wait after that.
    let mut retry: Option<(Instant, Duration)> = None;
    let mut closing = false;
    while !closing {
        // Block for the first message (while failing, no later than the next try), then let
        // `GATHER` pass before draining the queue: one transaction per window under load,
        // and no wake-up of this thread per record.
        let mut next = match retry {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some((at, _)) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
        }
        .map_err(|e| closing = e == RecvTimeoutError::Disconnected)
        .ok();
        let mut gathered = 0;
        let mut slept = false;
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record(r) => {
                    batch.push(*r);
                    gathered += 1;
                }
                Msg::Alert {
                    key_id,
                    period_start,
                    threshold,
                } => alerts.push((key_id, period_start, threshold)),
                Msg::Flush(w) => waiters.push(w),
                Msg::SpendSince(q) => questions.push(q),
                Msg::Close => closing = true,
            }
            // A question is answered as of its place in the queue: nothing after it may be
            // written before the answer.
            if gathered >= MAX_BATCH || closing || !questions.is_empty() {
                break;
            }
            next = rx.try_recv().ok();
            if next.is_none() && !slept && waiters.is_empty() && retry.is_none() {
                std::thread::sleep(GATHER);
                slept = true;
                next = rx.try_recv().ok();
            }
        }
        // After a failure, records only gather until the next try, unless someone waits.
        let due = retry.is_none_or(|(at, _)| Instant::now() >= at);
        let asked = !waiters.is_empty() || !questions.is_empty();
        if !(due || closing || asked) {
            continue;
        }
        let taken = batch.len();
        let written = match &mut writer {
            Some(w) => w.insert(&batch),
            None => Writer::prepare(&conn).and_then(|w| writer.insert(w).insert(&batch)),
        };
        if let Err(e) = written {
            meters.write_errors.inc();
            let wait = retry.map_or(FIRST_BACKOFF, |(_, w)| (w * 2).min(MAX_BACKOFF));
            retry = Some((Instant::now() + wait, wait));
            tracing::error!(error = %e, records = batch.len(), retry_in_ms = wait.as_millis() as u64, "usage ledger write failed; will retry");
            if batch.len() > MAX_PENDING || closing {
                // Past the memory bound, or out of time at shutdown: lost, and counted.
                let lost = if closing {
                    batch.len()
                } else {
                    batch.len() - MAX_PENDING
                };
                batch.drain(..lost);
                meters.dropped.inc_by(lost as u64);
            }
        } else {
            batch.clear();
            retry = None;
        }
        meters.queue.sub(taken as i64 - batch.len() as i64);
        for (key_id, period_start, threshold) in alerts.drain(..) {
            let fired = conn.execute(
                "INSERT OR IGNORE INTO alerts (key_id, period_start, threshold, fired_ms)
                 VALUES (?1, ?2, ?3, strftime('%s','now') * 1000)",
                rusqlite::params![key_id, period_start, threshold],
            );
            if let Err(e) = fired {
                meters.write_errors.inc();
                tracing::error!(error = %e, "could not persist a budget alert");
            }
        }
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
        for q in questions.drain(..) {
            if !batch.is_empty() {
                // Records handed before the question are not written: the answer would
                // miss them.
                let _ = q.reply.send(Err(
                    "the ledger cannot write its records; budgets cannot be rebuilt now".into(),
                ));
                continue;
            }
            answer_off_thread(path, q);
        }
    }
}

/// A budget rebuild's question: each key's spend in `[since_ms, until_ms)`.
struct Question {
    since_ms: i64,
    until_ms: Option<i64>,
    reply: SyncSender<Result<SpendByKey, String>>,
}

/// Answers a question as of now (everything written so far) without holding up the
/// writer: a read transaction taken here fixes what the answer sees (WAL readers keep their
/// snapshot while the writer goes on), and another thread reads through it.
fn answer_off_thread(path: &Path, q: Question) {
    let Question {
        since_ms,
        until_ms,
        reply,
    } = q;
    let snapshot =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).and_then(|reader| {
            reader.execute_batch("BEGIN")?;
            reader.query_row("SELECT count(*) FROM alerts", [], |_| Ok(()))?;
            Ok(reader)
        });
    let reader = match snapshot {
        Ok(reader) => reader,
        Err(e) => {
            let _ = reply.send(Err(format!("ledger {}: {e}", path.display())));
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("tollgate-ledger-read".into())
        .spawn(move || {
            let _ = reply.send(spend_since_in(&reader, since_ms, until_ms));
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start a ledger reader");
    }
}

/// Rows per INSERT statement: one statement step for many rows is most of the speed.
const ROWS_PER_STATEMENT: usize = 64;
/// Rows per INSERT statement for the rest of a batch: at a few thousand requests a second a
/// window gathers a few dozen rows, which would otherwise each take a statement step.
const ROWS_PER_SMALL_STATEMENT: usize = 8;
const COLUMNS: usize = 21;

/// The writer's statements, prepared once: a transaction's two ends, and inserts of one row,
/// of `ROWS_PER_SMALL_STATEMENT` and of `ROWS_PER_STATEMENT` rows. Preparing (or finding a
/// prepared statement in a cache by its text) cost more than binding and inserting a row.
struct Writer<'c> {
    begin: Statement<'c>,
    commit: Statement<'c>,
    rollback: Statement<'c>,
    one: Statement<'c>,
    small: Statement<'c>,
    full: Statement<'c>,
}

impl<'c> Writer<'c> {
    fn prepare(conn: &'c Connection) -> rusqlite::Result<Self> {
        Ok(Writer {
            begin: conn.prepare("BEGIN")?,
            commit: conn.prepare("COMMIT")?,
            rollback: conn.prepare("ROLLBACK")?,
            one: conn.prepare(&insert_sql(1))?,
            small: conn.prepare(&insert_sql(ROWS_PER_SMALL_STATEMENT))?,
            full: conn.prepare(&insert_sql(ROWS_PER_STATEMENT))?,
        })
    }

    /// Writes `batch` in one transaction, or nothing of it.
    fn insert(&mut self, batch: &[UsageRecord]) -> rusqlite::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.begin.raw_execute()?;
        let inserted = self.rows(batch).and_then(|()| self.commit.raw_execute());
        if inserted.is_err() {
            // A failed COMMIT may leave the transaction open; a failed ROLLBACK leaves
            // nothing to undo.
            let _ = self.rollback.raw_execute();
        }
        inserted.map(drop)
    }

    fn rows(&mut self, batch: &[UsageRecord]) -> rusqlite::Result<()> {
        let (full, rest) = batch.split_at(batch.len() - batch.len() % ROWS_PER_STATEMENT);
        for rows in full.chunks(ROWS_PER_STATEMENT) {
            for (i, r) in rows.iter().enumerate() {
                bind(&mut self.full, i * COLUMNS, r)?;
            }
            self.full.raw_execute()?;
        }
        let (small, rest) = rest.split_at(rest.len() - rest.len() % ROWS_PER_SMALL_STATEMENT);
        for rows in small.chunks(ROWS_PER_SMALL_STATEMENT) {
            for (i, r) in rows.iter().enumerate() {
                bind(&mut self.small, i * COLUMNS, r)?;
            }
            self.small.raw_execute()?;
        }
        for r in rest {
            bind(&mut self.one, 0, r)?;
            self.one.raw_execute()?;
        }
        Ok(())
    }
}

/// Binds `r`'s columns to the parameters after the first `before`.
fn bind(stmt: &mut Statement, before: usize, r: &UsageRecord) -> rusqlite::Result<()> {
    // SQLite integers are signed; counts past that were saturated already.
    let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let deployed = r.deployed.as_ref();
    let at = |column: usize| before + column;
    stmt.raw_bind_parameter(at(1), r.id.as_str())?;
    stmt.raw_bind_parameter(at(2), r.request_id.as_str())?;
    stmt.raw_bind_parameter(at(3), r.ts_ms)?;
    stmt.raw_bind_parameter(at(4), &*r.key_id)?;
    stmt.raw_bind_parameter(at(5), &*r.model)?;
    stmt.raw_bind_parameter(at(6), r.surface)?;
    stmt.raw_bind_parameter(at(7), r.status)?;
    stmt.raw_bind_parameter(at(8), int(r.usage.input))?;
    stmt.raw_bind_parameter(at(9), int(r.usage.cached_input))?;
    stmt.raw_bind_parameter(at(10), int(r.usage.output))?;
    stmt.raw_bind_parameter(at(11), int(r.usage.reasoning))?;
    stmt.raw_bind_parameter(at(12), int(r.cost_nanos))?;
    stmt.raw_bind_parameter(at(13), r.estimated)?;
    stmt.raw_bind_parameter(at(14), r.ttft_ms)?;
    stmt.raw_bind_parameter(at(15), r.duration_ms)?;
    stmt.raw_bind_parameter(at(16), r.replica.as_deref())?;
    stmt.raw_bind_parameter(at(17), r.queue_ms)?;
    stmt.raw_bind_parameter(at(18), deployed.map(|d| &*d.deployment))?;
    stmt.raw_bind_parameter(at(19), deployed.and_then(|d| d.environment.as_deref()))?;
    stmt.raw_bind_parameter(at(20), deployed.map(|d| int(d.bytes_in)))?;
    stmt.raw_bind_parameter(at(21), deployed.map(|d| int(d.bytes_out)))
}

fn insert_sql(rows: usize) -> String {
    let row = format!("({})", vec!["?"; COLUMNS].join(","));
    format!(
        "INSERT OR IGNORE INTO usage (id, request_id, ts_ms, key_id, model, surface, status,
             input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, cost_nanos,
             estimated, ttft_ms, duration_ms, replica, queue_ms, deployment, environment,
             bytes_in, bytes_out) VALUES {}",
        vec![row; rows].join(",")
    )
}

#[cfg(test)]
mod tests;
