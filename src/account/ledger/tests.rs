use super::*;
use crate::account::record_id;
use crate::vocab::Usage;

fn record(ts_ms: i64) -> UsageRecord {
    UsageRecord {
        id: record_id(ts_ms),
        request_id: "r".into(),
        ts_ms,
        key_id: "k".into(),
        model: "m".into(),
        surface: "chat_completions",
        status: 200,
        usage: Usage {
            input: u64::MAX,
            ..Usage::default()
        },
        cost_nanos: 1,
        estimated: false,
        ttft_ms: None,
        duration_ms: 1.0,
        replica: None,
        queue_ms: None,
        deployed: None,
    }
}

fn rows(path: &Path) -> i64 {
    Connection::open(path)
        .unwrap()
        .query_row("SELECT count(*) FROM usage", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn a_failing_disk_is_retried_with_backoff_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let meters = LedgerMeters::default();
    let ledger = Ledger::open(dir.path(), meters.clone()).unwrap();
    let path = ledger.path().to_path_buf();
    // The table disappears under the writer: every insert fails until it is back.
    let other = Connection::open(&path).unwrap();
    other
        .execute_batch("ALTER TABLE usage RENAME TO usage_away")
        .unwrap();
    for i in 0..(MAX_BATCH as i64 + 10) {
        ledger.record(record(1_795_000_000_000 + i));
    }
    ledger.flush();
    // Records keep arriving one by one, more than a batch already pending: they are
    // kept for the next try instead of each causing a write (and an error line) of its own.
    for i in 0..300 {
        ledger.record(record(1_796_000_000_000 + i));
    }
    ledger.flush();
    let errors = meters.write_errors.get();
    assert!((1..=4).contains(&errors), "{errors} failed writes");
    assert_eq!(meters.dropped.get(), 0);

    other
        .execute_batch("ALTER TABLE usage_away RENAME TO usage")
        .unwrap();
    ledger.flush();
    assert_eq!(rows(&path), MAX_BATCH as i64 + 310);
    assert_eq!(meters.queue.get(), 0);
    ledger.close();
}

#[test]
fn a_ledger_from_before_queue_ms_opens_and_takes_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE TABLE usage (id TEXT PRIMARY KEY, request_id TEXT NOT NULL,
             ts_ms INTEGER NOT NULL, key_id TEXT NOT NULL, model TEXT NOT NULL,
             surface TEXT NOT NULL, status INTEGER NOT NULL, input_tokens INTEGER NOT NULL,
             cached_input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
             reasoning_tokens INTEGER NOT NULL, cost_nanos INTEGER NOT NULL,
             estimated INTEGER NOT NULL, ttft_ms REAL, duration_ms REAL NOT NULL,
             replica TEXT) WITHOUT ROWID;",
        )
        .unwrap();
    let ledger = Ledger::open(dir.path(), LedgerMeters::default()).unwrap();
    assert_eq!(ledger.path(), path, "the same file");
    let mut r = record(1_795_000_000_000);
    r.queue_ms = Some(12.5);
    ledger.record(r);
    ledger.flush();
    let queued: f64 = Connection::open(&path)
        .unwrap()
        .query_row("SELECT queue_ms FROM usage", [], |r| r.get(0))
        .unwrap();
    assert_eq!(queued, 12.5);
    ledger.close();
}
