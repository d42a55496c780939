//! Budget spend as the ledger has it: what each key spent in a period, and the alert
//! thresholds already fired for it. Budgets are rebuilt from this at startup and reload.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{params, Connection, OpenFlags};

use super::id_bound;

/// What each key spent since `since_ms` (nano-dollars), and the alert thresholds already
/// fired for the period starting then: what budgets are rebuilt from at startup and reload.
/// One pass over the period's rows for all keys, whatever their number.
pub fn spend_since(path: &Path, since_ms: i64) -> Result<HashMap<String, KeySpend>, String> {
    if !path.exists() {
        return Ok(HashMap::new());
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("ledger {}: {e}", path.display()))?;
    spend_since_in(&conn, since_ms, None)
}

/// `spend_since` on an open connection, for the period `[since_ms, until_ms)` (see
/// `Ledger::ask_spend_since`).
pub fn spend_since_in(
    conn: &Connection,
    since_ms: i64,
    until_ms: Option<i64>,
) -> Result<HashMap<String, KeySpend>, String> {
    let until_ms = until_ms.unwrap_or(i64::MAX);
    let mut by_key: HashMap<String, KeySpend> = HashMap::new();
    let err = |e: rusqlite::Error| e.to_string();
    let mut stmt = conn
        .prepare(
            // TOTAL, not SUM: a sum past i64 (absurd costs a replica reported) must not
            // fail the rebuild; it is exact up to 2^53 nano-dollars (9 million USD).
            "SELECT key_id, TOTAL(cost_nanos) FROM usage
             WHERE id >= ?2 AND ts_ms >= ?1 AND ts_ms < ?3 GROUP BY key_id",
        )
        .map_err(err)?;
    let rows = stmt
        .query_map(params![since_ms, id_bound(since_ms), until_ms], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, f64>(1)?))
        })
        .map_err(err)?;
    for row in rows {
        let (key, spent) = row.map_err(err)?;
        // Saturating: negative or past u64 cannot be a spend.
        by_key.entry(key).or_default().spent_nanos = spent as u64;
    }
    let mut stmt = conn
        .prepare("SELECT key_id, threshold FROM alerts WHERE period_start = ?1")
        .map_err(err)?;
    let fired = stmt
        .query_map(params![since_ms], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, f64>(1)?))
        })
        .map_err(err)?;
    for row in fired {
        let (key, threshold) = row.map_err(err)?;
        by_key.entry(key).or_default().fired.push(threshold);
    }
    Ok(by_key)
}

/// One key's spend in a period, as the ledger has it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct KeySpend {
    pub spent_nanos: u64,
    /// Alert thresholds already fired in the period.
    pub fired: Vec<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::account::ledger::LedgerMeters;
    use crate::account::query::tests::record;
    use crate::account::Ledger;

    #[test]
    fn spend_since_sums_every_key_of_the_period_in_one_pass() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), LedgerMeters::default()).unwrap();
        let day = 1_795_000_000_000i64 / 86_400_000 * 86_400_000;
        ledger.record(record("old", day - 1, "k1", "m", 1, 1000)); // the day before
        ledger.record(record("a", day, "k1", "m", 1, 10));
        ledger.record(record("b", day + 5, "k1", "m", 1, 20));
        ledger.record(record("c", day + 9, "k2", "m", 1, 7));
        ledger.record_alert("k1", day, 0.5);
        ledger.record_alert("k1", day - 86_400_000, 0.9);
        ledger.close();
        let spend = spend_since(&dir.path().join(super::super::ledger::FILE_NAME), day).unwrap();
        assert_eq!(spend.len(), 2);
        assert_eq!(spend["k1"].spent_nanos, 1_500 * 30);
        assert_eq!(spend["k1"].fired, vec![0.5]);
        assert_eq!(spend["k2"].spent_nanos, 1_500 * 7);
        assert!(spend["k2"].fired.is_empty());
        // Costs past what SQLite's integers sum (a replica reporting nonsense) saturate
        // instead of failing the rebuild of every budget.
        let dir2 = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir2.path(), LedgerMeters::default()).unwrap();
        for id in ["x", "y"] {
            let mut r = record(id, day, "k3", "m", 1, 1);
            r.cost_nanos = u64::MAX;
            ledger.record(r);
        }
        ledger.close();
        let spend = spend_since(&dir2.path().join(super::super::ledger::FILE_NAME), day).unwrap();
        assert!(spend["k3"].spent_nanos >= i64::MAX as u64);
        assert!(spend_since(Path::new("/nonexistent/ledger"), day)
            .unwrap()
            .is_empty());
    }
}
