//! The durable queue: one SQLite database (`async.sqlite`, WAL) under `state.dir`, written
//! by one thread of its own. Callers hand it commands over a channel and await its answer
//! on a oneshot, so no proxy or dispatcher thread ever waits on the disk.
//!
//! Durability: `synchronous = FULL`. A commit returns once the WAL is synced to disk, so a
//! request acknowledged with 202 survives a crash of the process and of the machine. The
//! writer takes every command waiting when it wakes (up to 1,024) into one transaction, so
//! concurrent submits share one sync.
//!
//! Restart rule: requests `QUEUED` at start stay queued. A request `IN_PROGRESS` when the
//! process died is not run again: it becomes `FAILED` with `INTERNAL_SERVER_ERROR`, and its
//! webhook (if any) is delivered. The replica may have finished it; tollgate cannot know.

use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use super::{Job, JobError, Retry, Status, WebhookStatus};

pub const FILE_NAME: &str = "async.sqlite";
/// Commands waiting for the writer; past this, submits are refused rather than queued in
/// memory without bound.
const BACKLOG: usize = 65_536;
const BATCH: usize = 1024;

type Reply<T> = oneshot::Sender<Result<T, String>>;
/// An answer to send once the batch's transaction has committed (or failed).
type Answer = Box<dyn FnOnce(Result<(), String>)>;

enum Command {
    Insert(Box<Job>, String, Reply<()>),
    /// Marks the request `IN_PROGRESS` and answers its input.
    Start(Box<Job>, Reply<Option<String>>),
    /// Writes the request's state; its output too when given.
    Save(Box<Job>, Option<Vec<u8>>, Option<Reply<()>>),
    Output(String, Reply<Option<Vec<u8>>>),
    /// Deletes requests that ended before this time.
    Purge(i64),
}

/// The handle to the writer thread.
pub struct Store {
    tx: SyncSender<Command>,
}

impl Store {
    /// Opens (creating) the database, applies the restart rule, and starts the writer.
    /// Returns every request it holds, and the ids of those the restart rule ended.
    pub fn open(dir: &Path, now_ms: i64) -> Result<(Store, Vec<Job>, Vec<String>), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join(FILE_NAME);
        let shown = path.display().to_string();
        let conn = Connection::open(&path).map_err(|e| format!("{shown}: {e}"))?;
        conn.execute_batch(SCHEMA)
            .map_err(|e| format!("{shown}: {e}"))?;
        let interrupted = serde_json::to_string(&[JobError::new(
            "INTERNAL_SERVER_ERROR",
            "tollgate stopped while this request ran; it was not run again",
        )])
        .unwrap_or_default();
        let ended: Vec<String> = conn
            .prepare("SELECT id FROM jobs WHERE status = 'IN_PROGRESS'")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(|e| format!("{shown}: {e}"))?;
        conn.execute(
            "UPDATE jobs SET status = 'FAILED', status_ms = ?1, errors = ?2 WHERE status = 'IN_PROGRESS'",
            params![now_ms, interrupted],
        )
        .map_err(|e| format!("{shown}: {e}"))?;
        let jobs = load(&conn).map_err(|e| format!("{shown}: {e}"))?;
        let (tx, rx) = sync_channel(BACKLOG);
        std::thread::Builder::new()
            .name("tollgate-async-store".into())
            .spawn(move || write(conn, rx))
            .map_err(|e| format!("async store thread: {e}"))?;
        Ok((Store { tx }, jobs, ended))
    }

    fn send(&self, c: Command) -> Result<(), String> {
        self.tx.try_send(c).map_err(|e| match e {
            TrySendError::Full(_) => "the async queue's database is behind; retry shortly".into(),
            TrySendError::Disconnected(_) => "the async queue's database is closed".into(),
        })
    }

    /// Writes a new request; resolves once it is committed to disk.
    pub async fn insert(&self, job: &Job, input: String) -> Result<(), String> {
        let (done, rx) = oneshot::channel();
        self.send(Command::Insert(Box::new(job.clone()), input, done))?;
        rx.await
            .map_err(|_| "the async store stopped".to_string())?
    }

    /// Marks the request started (committed) and answers its input.
    pub async fn start(&self, job: &Job) -> Result<Option<String>, String> {
        let (done, rx) = oneshot::channel();
        self.send(Command::Start(Box::new(job.clone()), done))?;
        rx.await
            .map_err(|_| "the async store stopped".to_string())?
    }

    /// Writes the request's state (and its output, if given); resolves once committed.
    pub async fn save(&self, job: &Job, output: Option<Vec<u8>>) -> Result<(), String> {
        let (done, rx) = oneshot::channel();
        self.send(Command::Save(Box::new(job.clone()), output, Some(done)))?;
        rx.await
            .map_err(|_| "the async store stopped".to_string())?
    }

    /// Writes the request's state without waiting.
    pub fn save_later(&self, job: &Job) {
        if let Err(e) = self.send(Command::Save(Box::new(job.clone()), None, None)) {
            tracing::warn!(request_id = %job.id, error = %e, "async request state not written");
        }
    }

    pub async fn output(&self, id: &str) -> Result<Option<Vec<u8>>, String> {
        let (done, rx) = oneshot::channel();
        self.send(Command::Output(id.to_string(), done))?;
        rx.await
            .map_err(|_| "the async store stopped".to_string())?
    }

    pub fn purge(&self, before_ms: i64) {
        let _ = self.send(Command::Purge(before_ms));
    }
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = FULL;
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    model TEXT NOT NULL,
    deployment TEXT NOT NULL,
    key_id TEXT NOT NULL,
    priority INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    status TEXT NOT NULL,
    status_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    webhook TEXT,
    webhook_status TEXT NOT NULL,
    retry TEXT NOT NULL,
    errors TEXT NOT NULL,
    started_ms INTEGER,
    attempts INTEGER NOT NULL,
    input TEXT,
    output BLOB
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, status_ms);
";

fn load(conn: &Connection) -> rusqlite::Result<Vec<Job>> {
    let mut stmt = conn.prepare(
        "SELECT id, seq, model, deployment, key_id, priority, created_ms, status, status_ms,
                expires_ms, webhook, webhook_status, retry, errors, started_ms, attempts,
                output IS NOT NULL
         FROM jobs ORDER BY seq",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Job {
            id: r.get(0)?,
            seq: r.get::<_, i64>(1)? as u64,
            model: r.get(2)?,
            deployment: r.get(3)?,
            key_id: r.get(4)?,
            priority: r.get::<_, i64>(5)? as u8,
            created_ms: r.get(6)?,
            status: Status::parse(&r.get::<_, String>(7)?).unwrap_or(Status::Failed),
            status_ms: r.get(8)?,
            expires_ms: r.get(9)?,
            webhook: r.get(10)?,
            webhook_status: WebhookStatus::parse(&r.get::<_, String>(11)?)
                .unwrap_or(WebhookStatus::Failed),
            retry: serde_json::from_str(&r.get::<_, String>(12)?).unwrap_or_default(),
            errors: serde_json::from_str(&r.get::<_, String>(13)?).unwrap_or_default(),
            started_ms: r.get(14)?,
            attempts: r.get::<_, i64>(15)? as u32,
            has_output: r.get(16)?,
        })
    })?;
    rows.collect()
}

fn write(mut conn: Connection, rx: Receiver<Command>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let mut replies: Vec<Answer> = Vec::with_capacity(batch.len());
        let result = (|| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            for c in batch {
                apply(&tx, c, &mut replies)?;
            }
            tx.commit()
        })();
        let result = result.map_err(|e| format!("async store: {e}"));
        if let Err(e) = &result {
            tracing::error!(error = %e, "async queue database write failed");
        }
        for reply in replies {
            reply(result.clone());
        }
    }
}

/// Runs one command inside the batch's transaction; its answer is sent after the commit.
fn apply(
    tx: &rusqlite::Transaction,
    c: Command,
    replies: &mut Vec<Answer>,
) -> rusqlite::Result<()> {
    match c {
        Command::Insert(job, input, done) => {
            tx.execute(
                "INSERT INTO jobs (id, seq, model, deployment, key_id, priority, created_ms,
                    status, status_ms, expires_ms, webhook, webhook_status, retry, errors,
                    started_ms, attempts, input)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
                params![
                    job.id,
                    job.seq as i64,
                    job.model,
                    job.deployment,
                    job.key_id,
                    job.priority as i64,
                    job.created_ms,
                    job.status.as_str(),
                    job.status_ms,
                    job.expires_ms,
                    job.webhook,
                    job.webhook_status.as_str(),
                    serde_json::to_string(&job.retry).unwrap_or_default(),
                    serde_json::to_string(&job.errors).unwrap_or_default(),
                    job.started_ms,
                    job.attempts as i64,
                    input,
                ],
            )?;
            replies.push(Box::new(move |r| {
                let _ = done.send(r);
            }));
        }
        Command::Start(job, done) => {
            save(tx, &job, None)?;
            let input: Option<String> = tx
                .query_row("SELECT input FROM jobs WHERE id = ?1", [&job.id], |r| {
                    r.get(0)
                })
                .optional()?
                .flatten();
            replies.push(Box::new(move |r| {
                let _ = done.send(r.map(|()| input));
            }));
        }
        Command::Save(job, output, done) => {
            save(tx, &job, output)?;
            if let Some(done) = done {
                replies.push(Box::new(move |r| {
                    let _ = done.send(r);
                }));
            }
        }
        Command::Output(id, done) => {
            let output: Option<Vec<u8>> = tx
                .query_row("SELECT output FROM jobs WHERE id = ?1", [&id], |r| r.get(0))
                .optional()?
                .flatten();
            replies.push(Box::new(move |r| {
                let _ = done.send(r.map(|()| output));
            }));
        }
        Command::Purge(before) => {
            tx.execute(
                "DELETE FROM jobs WHERE status NOT IN ('QUEUED', 'IN_PROGRESS') AND status_ms < ?1",
                [before],
            )?;
        }
    }
    Ok(())
}

fn save(tx: &rusqlite::Transaction, job: &Job, output: Option<Vec<u8>>) -> rusqlite::Result<()> {
    // A finished request no longer needs its input.
    let drop_input = job.status.is_final();
    tx.execute(
        "UPDATE jobs SET status = ?2, status_ms = ?3, webhook_status = ?4, errors = ?5,
            started_ms = ?6, attempts = ?7, output = COALESCE(?8, output),
            input = CASE WHEN ?9 THEN NULL ELSE input END
         WHERE id = ?1",
        params![
            job.id,
            job.status.as_str(),
            job.status_ms,
            job.webhook_status.as_str(),
            serde_json::to_string(&job.errors).unwrap_or_default(),
            job.started_ms,
            job.attempts as i64,
            output,
            drop_input,
        ],
    )?;
    Ok(())
}

/// The jobs in a database, for `tollgate async list/show` (read-only, the process may run).
pub fn read_all(dir: &Path) -> Result<Vec<Job>, String> {
    let path = dir.join(FILE_NAME);
    let conn = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    load(&conn).map_err(|e| format!("{}: {e}", path.display()))
}

impl Retry {
    /// For `tollgate async show`.
    pub fn describe(&self) -> String {
        format!(
            "{} attempts, {}..{} ms",
            self.max_attempts, self.initial_delay_ms, self.max_delay_ms
        )
    }
}
