//! Usage queries: totals per time bucket, optionally per key and/or model, empty buckets
//! included, a page at a time (`page`). Read from the ledger file with its own connection,
//! never on the request path.

use std::collections::HashMap;
use std::path::Path;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OpenFlags};
use serde::Serialize;

use super::id_bound;
use super::page::{Cursor, Grid, GroupKey, MAX_ROWS};
/// The last millisecond of 9999-12-31, the latest time a query may name.
const LAST_MS: i64 = 253_402_300_799_999;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Minute,
    Hour,
    Day,
}

impl Bucket {
    pub fn parse(s: &str) -> Option<Bucket> {
        match s {
            "minute" => Some(Bucket::Minute),
            "hour" => Some(Bucket::Hour),
            "day" => Some(Bucket::Day),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Bucket::Minute => "minute",
            Bucket::Hour => "hour",
            Bucket::Day => "day",
        }
    }

    pub fn millis(self) -> i64 {
        match self {
            Bucket::Minute => 60_000,
            Bucket::Hour => 3_600_000,
            Bucket::Day => 86_400_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UsageQuery {
    /// Inclusive, Unix ms; rounded down to the bucket.
    pub from_ms: i64,
    /// Exclusive, Unix ms; rounded up to the bucket.
    pub to_ms: i64,
    pub bucket: Bucket,
    pub by_key: bool,
    pub by_model: bool,
    /// Rows in the page, at most `page::PAGE_ROWS`.
    pub limit: usize,
    /// Where the page starts (`Page::next_cursor` of the one before); `None`: the first.
    pub cursor: Option<String>,
}

/// One page of a report: its rows, and where the next page starts, if there is one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page {
    pub rows: Vec<UsageRow>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UsageRow {
    /// Bucket start, RFC 3339 UTC.
    pub start: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub requests: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub uncached_input_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    /// Integer micro-dollars, rounded from the exact nano-dollar sum.
    pub cost_micros: u64,
    /// The same cost in USD, as a decimal string.
    pub cost_usd: String,
    /// Requests whose counts were estimated (cut short before the replica reported usage).
    pub estimated_requests: u64,
}

impl UsageQuery {
    fn range(&self) -> Result<(i64, i64), String> {
        for (name, ms) in [("from", self.from_ms), ("to", self.to_ms)] {
            if !(0..=LAST_MS).contains(&ms) {
                return Err(format!(
                    "`{name}` is {}; it must lie between 1970-01-01 and 9999-12-31",
                    if ms < 0 { "before 1970" } else { "after 9999" }
                ));
            }
        }
        let b = self.bucket.millis();
        let from = self.from_ms.div_euclid(b) * b;
        let to = (self.to_ms + b - 1).div_euclid(b) * b;
        if to <= from {
            return Err("`to` must be after `from`".into());
        }
        let buckets = (to - from) / b;
        if buckets as u64 > MAX_ROWS {
            return Err(format!(
                "the range holds {buckets} buckets, more than the {MAX_ROWS} rows one report may hold; use a larger bucket or a shorter range (from, to)"
            ));
        }
        Ok((from, to))
    }

    /// Why a report of `buckets` × `groups` rows is refused, and how to narrow it.
    /// `more`: there are more groups than `groups`, which were all that was counted.
    fn too_large(&self, buckets: u64, groups: usize, more: bool) -> String {
        let plural = if groups == 1 { "" } else { "s" };
        let groups = match more {
            true => format!("more than {groups} group{plural}"),
            false => format!("{groups} group{plural}"),
        };
        let by = match (self.by_key, self.by_model) {
            (true, true) => ", or group by key or by model alone",
            (true, false) | (false, true) => ", or leave out by",
            (false, false) => "",
        };
        format!(
            "this report would hold {buckets} buckets × {groups}, more than the {MAX_ROWS} rows one report may hold; narrow it: a larger bucket, a shorter range (from, to){by}"
        )
    }
}

/// One grouped row of the ledger: bucket start, key, model, and the seven sums.
type Sums = (i64, Option<String>, Option<String>, [i64; 7]);
/// A row's bucket start, key and model.
type Group<'a> = (i64, &'a Option<String>, &'a Option<String>);

/// Runs a query against the ledger file at `path`: the page `q.cursor` names, of at most
/// `q.limit` rows. A missing file is an empty ledger. Every group seen in the range gets a
/// row in every bucket, zeros where it was idle; a report of more than `MAX_ROWS` rows in
/// all is refused, saying how to narrow it. Only the page's buckets are summed, so a page
/// costs memory for its own rows and the list of groups, whatever the report's size.
pub fn run(path: &Path, q: &UsageQuery) -> Result<Page, String> {
    let conn = match path.exists() {
        true => Some(
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(|e| format!("ledger {}: {e}", path.display()))?,
        ),
        false => None,
    };
    run_on(conn, q)
}

/// `run` on an open connection whose `usage` is the ledger (or several, `many`).
pub fn run_on(conn: Option<Connection>, q: &UsageQuery) -> Result<Page, String> {
    let (from, to) = q.range()?;
    let b = q.bucket.millis();
    let buckets = ((to - from) / b) as u64;
    // Enough groups to tell a report past the bound, and no more.
    let most = (MAX_ROWS / buckets.max(1)) as usize;
    let mut groups = match &conn {
        Some(conn) => distinct_groups(conn, q, (from, to), most + 1).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    // Ungrouped, an idle range is a row of zeros per bucket; grouped, it has no groups.
    if groups.is_empty() && !q.by_key && !q.by_model {
        groups.push((None, None));
    }
    if groups.len() > most {
        return Err(q.too_large(buckets, most, true));
    }
    let grid = Grid {
        from_ms: from,
        bucket_ms: b,
        buckets,
        groups: &groups,
    };
    if grid.rows() > MAX_ROWS {
        return Err(q.too_large(buckets, groups.len(), false));
    }
    let cursor = match &q.cursor {
        Some(c) => Some(Cursor::decode(c, q.by_key, q.by_model)?),
        None => None,
    };
    let (first, end) = grid.page(cursor.as_ref(), q.limit)?;
    if first == end {
        return Ok(Page::default());
    }
    let (lo, hi) = grid.times((first, end));
    let found = match &conn {
        // SUM is exact but fails past i64; only a ledger holding absurd costs gets there,
        // and its report then saturates (TOTAL sums in floating point) instead of failing.
        Some(conn) => match grouped_sums(conn, q, "SUM", (b, lo, hi)) {
            Err(rusqlite::Error::SqliteFailure(_, Some(m))) if m.contains("integer overflow") => {
                grouped_sums(conn, q, "TOTAL", (b, lo, hi))
            }
            other => other,
        }
        .map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let sums_of: HashMap<Group<'_>, [i64; 7]> =
        found.iter().map(|(s, k, m, v)| ((*s, k, m), *v)).collect();
    let rows = (first..end)
        .map(|pos| {
            let (start, (key, model)) = grid.row(pos);
            let sums = sums_of.get(&(start, key, model)).copied().unwrap_or([0; 7]);
            row(start, key, model, sums, q)
        })
        .collect();
    Ok(Page {
        rows,
        next_cursor: (end < grid.rows()).then(|| grid.cursor_at(end).encode()),
    })
}

/// The groups (key and/or model, as the query groups by) with rows in `[from, to)`, sorted,
/// at most `limit` of them.
fn distinct_groups(
    conn: &Connection,
    q: &UsageQuery,
    (from, to): (i64, i64),
    limit: usize,
) -> rusqlite::Result<Vec<GroupKey>> {
    let key_col = if q.by_key { "key_id" } else { "NULL" };
    let model_col = if q.by_model { "model" } else { "NULL" };
    let sql = format!(
        "SELECT {key_col}, {model_col} FROM usage
         WHERE id >= ?3 AND id < ?4 AND ts_ms >= ?1 AND ts_ms < ?2
         GROUP BY 1, 2 LIMIT ?5"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(
        params![from, to, id_bound(from), id_bound(to.max(1)), limit as i64],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut groups = rows.collect::<rusqlite::Result<Vec<GroupKey>>>()?;
    // The order pages walk; Rust's, so that it is the one `Grid` searches.
    groups.sort();
    Ok(groups)
}

/// The ledger's rows in `[from, to)` summed per bucket of `b` ms (and per key and model if
/// asked), with `agg` (`SUM` or `TOTAL`) as the sum.
fn grouped_sums(
    conn: &Connection,
    q: &UsageQuery,
    agg: &str,
    (b, from, to): (i64, i64, i64),
) -> rusqlite::Result<Vec<Sums>> {
    let key_col = if q.by_key { "key_id" } else { "NULL" };
    let model_col = if q.by_model { "model" } else { "NULL" };
    let sql = format!(
        "SELECT (ts_ms / ?1) * ?1 AS b, {key_col}, {model_col}, COUNT(*),
                {agg}(input_tokens), {agg}(cached_input_tokens), {agg}(output_tokens),
                {agg}(reasoning_tokens), {agg}(cost_nanos), {agg}(estimated)
         FROM usage WHERE id >= ?4 AND id < ?5 AND ts_ms >= ?2 AND ts_ms < ?3
         GROUP BY 1, 2, 3"
    );
    let mut stmt = conn.prepare(&sql)?;
    // Integers from SUM, reals from TOTAL; a real past i64 saturates.
    let int = |r: &rusqlite::Row<'_>, i: usize| -> rusqlite::Result<i64> {
        Ok(match r.get_ref(i)? {
            ValueRef::Integer(n) => n,
            ValueRef::Real(f) => f as i64,
            _ => 0,
        })
    };
    let rows = stmt.query_map(
        params![b, from, to, id_bound(from), id_bound(to.max(1))],
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<String>>(2)?,
                [
                    int(r, 3)?,
                    int(r, 4)?,
                    int(r, 5)?,
                    int(r, 6)?,
                    int(r, 7)?,
                    int(r, 8)?,
                    int(r, 9)?,
                ],
            ))
        },
    )?;
    rows.collect()
}

fn row(
    start: i64,
    key: &Option<String>,
    model: &Option<String>,
    v: [i64; 7],
    q: &UsageQuery,
) -> UsageRow {
    let n = |i: usize| v[i].max(0) as u64;
    let cost_micros = crate::vocab::micros(n(5));
    UsageRow {
        start: rfc3339(start),
        key_id: if q.by_key {
            Some(key.clone().unwrap_or_default())
        } else {
            None
        },
        model: if q.by_model {
            Some(model.clone().unwrap_or_default())
        } else {
            None
        },
        requests: n(0),
        input_tokens: n(1),
        cached_input_tokens: n(2),
        uncached_input_tokens: n(1).saturating_sub(n(2)),
        output_tokens: n(3),
        reasoning_tokens: n(4),
        cost_micros,
        cost_usd: format!("{}.{:06}", cost_micros / 1_000_000, cost_micros % 1_000_000),
        estimated_requests: n(6),
    }
}

pub fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// Parses an RFC 3339 time, a date (`2026-11-22`, midnight UTC) or Unix seconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        if let Some(t) = d.and_hms_opt(0, 0, 0) {
            return Ok(t.and_utc().timestamp_millis());
        }
    }
    if let Ok(secs) = s.parse::<i64>() {
        // Past i64 milliseconds is far past what a query may name; `range` says so.
        return Ok(secs.saturating_mul(1000));
    }
    Err(format!(
        "{s:?} is not a time: use RFC 3339 (2026-11-22T10:00:00Z), a date (2026-11-22) or Unix seconds"
    ))
}

#[cfg(test)]
pub(super) mod tests {

    use super::*;
    use crate::account::ledger::LedgerMeters;
    use crate::account::page::PAGE_ROWS;
    use crate::account::{Ledger, UsageRecord};
    use crate::vocab::Usage;

    /// A ledger record as `record_id` would name it.
    pub(in crate::account) fn record(
        id: &str,
        ts_ms: i64,
        key: &str,
        model: &str,
        input: u64,
        output: u64,
    ) -> UsageRecord {
        UsageRecord {
            // Ids start with their time, as `record_id` makes them.
            id: format!("{}{id}", id_bound(ts_ms)),
            request_id: id.into(),
            ts_ms,
            key_id: key.into(),
            model: model.into(),
            surface: "chat_completions",
            status: 200,
            usage: Usage {
                input,
                cached_input: input / 2,
                output,
                reasoning: 0,
            },
            cost_nanos: 1_500 * output,
            estimated: false,
            ttft_ms: Some(1.0),
            duration_ms: 2.0,
            replica: None,
            queue_ms: None,
            deployed: None,
        }
    }

    #[test]
    fn buckets_group_and_include_empty_ones_and_ids_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), LedgerMeters::default()).unwrap();
        let t0 = 1_795_000_000_000i64 / 60_000 * 60_000;
        ledger.record(record("a", t0 + 1, "k1", "m1", 10, 4));
        ledger.record(record("b", t0 + 2, "k2", "m1", 20, 6));
        ledger.record(record("c", t0 + 120_500, "k1", "m2", 30, 8));
        ledger.record(record("a", t0 + 1, "k1", "m1", 10, 4)); // the same record again
        ledger.close();

        let q = UsageQuery {
            from_ms: t0,
            to_ms: t0 + 180_000,
            bucket: Bucket::Minute,
            by_key: false,
            by_model: false,
            limit: PAGE_ROWS,
            cursor: None,
        };
        let rows = run(&dir.path().join(super::super::ledger::FILE_NAME), &q)
            .unwrap()
            .rows;
        assert_eq!(rows.len(), 3, "three minutes, the middle one empty");
        assert_eq!(
            (
                rows[0].requests,
                rows[0].input_tokens,
                rows[0].output_tokens
            ),
            (2, 30, 10)
        );
        assert_eq!(
            rows[0].cached_input_tokens + rows[0].uncached_input_tokens,
            30
        );
        assert_eq!(rows[1].requests, 0);
        assert_eq!(rows[2].requests, 1);
        assert_eq!(rows[0].cost_micros, 15);
        assert_eq!(rows[0].cost_usd, "0.000015");

        let q = UsageQuery {
            by_key: true,
            by_model: true,
            ..q
        };
        let rows = run(&dir.path().join(super::super::ledger::FILE_NAME), &q)
            .unwrap()
            .rows;
        assert_eq!(rows.len(), 9, "3 groups × 3 buckets");
        let k1m2: Vec<_> = rows
            .iter()
            .filter(|r| r.key_id.as_deref() == Some("k1") && r.model.as_deref() == Some("m2"))
            .collect();
        assert_eq!(
            k1m2.iter().map(|r| r.requests).collect::<Vec<_>>(),
            vec![0, 0, 1]
        );
    }

    #[test]
    fn pages_join_into_the_whole_report_and_a_report_past_the_bound_says_how_to_narrow() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), LedgerMeters::default()).unwrap();
        let t0 = 1_795_000_000_000i64 / 60_000 * 60_000;
        ledger.record(record("a", t0 + 1, "k1", "m1", 10, 4));
        ledger.record(record("b", t0 + 2, "k2", "m1", 20, 6));
        ledger.record(record("c", t0 + 120_500, "k1", "m2", 30, 8));
        ledger.close();
        let path = dir.path().join(super::super::ledger::FILE_NAME);
        let whole = UsageQuery {
            from_ms: t0,
            to_ms: t0 + 180_000,
            bucket: Bucket::Minute,
            by_key: true,
            by_model: true,
            limit: PAGE_ROWS,
            cursor: None,
        };
        let all = run(&path, &whole).unwrap();
        assert_eq!((all.rows.len(), &all.next_cursor), (9, &None));
        let mut q = UsageQuery { limit: 2, ..whole };
        let mut joined = Vec::new();
        loop {
            let page = run(&path, &q).unwrap();
            assert!(page.rows.len() <= 2);
            joined.extend(page.rows);
            match page.next_cursor {
                Some(c) => q.cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(joined, all.rows);

        // 100,000 minutes fit one group but not three.
        let wide = UsageQuery {
            from_ms: t0 - 99_997 * 60_000,
            cursor: None,
            ..q
        };
        let e = run(&path, &wide).unwrap_err();
        assert!(
            e.starts_with("this report would hold 100000 buckets × more than 1 group, more than the 100000 rows"),
            "{e}"
        );
        assert!(e.ends_with("or group by key or by model alone"), "{e}");
        let ungrouped = UsageQuery {
            by_key: false,
            by_model: false,
            limit: PAGE_ROWS,
            ..wide
        };
        assert_eq!(run(&path, &ungrouped).unwrap().rows.len(), PAGE_ROWS);
    }

    #[test]
    fn a_report_over_absurd_costs_saturates_instead_of_failing() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), LedgerMeters::default()).unwrap();
        let t0 = 1_795_000_000_000i64 / 60_000 * 60_000;
        for id in ["x", "y"] {
            let mut r = record(id, t0, "k", "m", 10, 4);
            // Stored as i64::MAX; two of them overflow SQLite's integer SUM.
            r.cost_nanos = u64::MAX;
            ledger.record(r);
        }
        ledger.record(record("z", t0 + 60_000, "k", "m", 10, 4));
        ledger.close();
        let q = UsageQuery {
            from_ms: t0,
            to_ms: t0 + 120_000,
            bucket: Bucket::Minute,
            by_key: true,
            by_model: false,
            limit: PAGE_ROWS,
            cursor: None,
        };
        let rows = run(&dir.path().join(super::super::ledger::FILE_NAME), &q)
            .unwrap()
            .rows;
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].requests, rows[0].input_tokens), (2, 20));
        assert_eq!(rows[0].cost_micros, crate::vocab::micros(i64::MAX as u64));
        // The other bucket, summed in the same fallback, is still exact.
        assert_eq!((rows[1].requests, rows[1].cost_micros), (1, 6));
    }

    #[test]
    fn times_parse_in_three_forms_and_ranges_are_bounded() {
        assert_eq!(parse_time("1970-01-02").unwrap(), 86_400_000);
        assert_eq!(parse_time("1970-01-01T00:01:00Z").unwrap(), 60_000);
        assert_eq!(parse_time("120").unwrap(), 120_000);
        assert!(parse_time("yesterday").is_err());
        let q = UsageQuery {
            from_ms: 0,
            to_ms: 365 * 86_400_000,
            bucket: Bucket::Minute,
            by_key: false,
            by_model: false,
            limit: PAGE_ROWS,
            cursor: None,
        };
        assert!(run(Path::new("/nonexistent/ledger"), &q)
            .unwrap_err()
            .contains("buckets"));
        // Times no calendar holds are refused, not overflowed.
        for (from, to) in [
            (parse_time("-9223372036854").unwrap(), 0),
            (0, parse_time("9223372030000000").unwrap()),
            (0, parse_time(&i64::MAX.to_string()).unwrap()),
        ] {
            let q = UsageQuery {
                from_ms: from,
                to_ms: to,
                bucket: Bucket::Hour,
                ..q.clone()
            };
            let e = run(Path::new("/nonexistent/ledger"), &q).unwrap_err();
            assert!(e.contains("between 1970-01-01 and 9999-12-31"), "{e}");
        }
        // Grouped by key, a range without usage has no rows (no key named "").
        let q = UsageQuery {
            from_ms: 0,
            to_ms: 3_600_000,
            bucket: Bucket::Hour,
            by_key: true,
            by_model: false,
            limit: PAGE_ROWS,
            cursor: None,
        };
        assert!(run(Path::new("/nonexistent/ledger"), &q)
            .unwrap()
            .rows
            .is_empty());
    }
}
