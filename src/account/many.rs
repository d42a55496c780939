//! Several ledgers read as one: each node of a cluster keeps its own, and `tollgate usage
//! --ledger A B…` (or a directory of them) reports the cluster. The files are attached
//! read-only to one in-memory connection, and a temporary view named `usage`, the rows
//! of all of them, stands in front of them: every query of `query.rs` then runs unchanged.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::ledger::FILE_NAME;
use super::query::{run_on, Page, UsageQuery};

/// SQLite attaches at most 10 databases to one connection.
pub const MAX_LEDGERS: usize = 10;

/// The ledger files `args` name: files as they are; a directory gives its `*.sqlite` files
/// and the ledger of each state directory in it (`<dir>/<node>/usage.sqlite`).
pub fn ledger_files(args: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for arg in args {
        if arg.is_dir() {
            let entries = std::fs::read_dir(arg)
                .map_err(|e| format!("cannot read the directory {}: {e}", arg.display()))?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter_map(|p| {
                    if p.is_dir() {
                        Some(p.join(FILE_NAME)).filter(|f| f.is_file())
                    } else {
                        (p.extension().is_some_and(|x| x == "sqlite")).then_some(p)
                    }
                })
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(format!(
                    "no ledger in {}: expected *.sqlite files, or state directories holding {FILE_NAME}",
                    arg.display()
                ));
            }
            files.extend(found);
        } else if arg.is_file() {
            files.push(arg.clone());
        } else {
            return Err(format!("no ledger at {}", arg.display()));
        }
    }
    files.dedup();
    if files.len() > MAX_LEDGERS {
        return Err(format!(
            "{} ledgers named; at most {MAX_LEDGERS} can be read at once: report fewer nodes at a time",
            files.len()
        ));
    }
    Ok(files)
}

/// `query::run` over every ledger in `files` together.
pub fn run(files: &[PathBuf], q: &UsageQuery) -> Result<Page, String> {
    run_on(Some(open(files)?), q)
}

fn open(files: &[PathBuf]) -> Result<Connection, String> {
    let conn = Connection::open_with_flags(
        ":memory:",
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(|e| e.to_string())?;
    let mut parts = Vec::with_capacity(files.len());
    for (i, file) in files.iter().enumerate() {
        conn.execute("ATTACH DATABASE ?1 AS ?2", (uri(file)?, format!("l{i}")))
            .map_err(|e| format!("ledger {}: {e}", file.display()))?;
        parts.push(format!(
            "SELECT id, ts_ms, key_id, model, input_tokens, cached_input_tokens, output_tokens,
                    reasoning_tokens, cost_nanos, estimated FROM l{i}.usage"
        ));
    }
    conn.execute_batch(&format!(
        "CREATE TEMP VIEW usage AS {}",
        parts.join(" UNION ALL ")
    ))
    .map_err(|e| format!("the ledgers cannot be read together: {e}"))?;
    Ok(conn)
}

/// A read-only `file:` URI for `path`, its special characters escaped.
fn uri(path: &Path) -> Result<String, String> {
    let abs = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let text = abs
        .to_str()
        .ok_or_else(|| format!("{}: the path is not UTF-8", path.display()))?;
    let escaped: String = text
        .chars()
        .map(|c| match c {
            '?' => "%3f".to_string(),
            '#' => "%23".to_string(),
            '%' => "%25".to_string(),
            c => c.to_string(),
        })
        .collect();
    Ok(format!("file:{escaped}?mode=ro"))
}
