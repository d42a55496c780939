//! Accounting: what every finished request used and cost, kept in a durable ledger and
//! queryable by key, model and time bucket.

pub mod cost;
pub mod ledger;
pub mod query;
pub mod record;

pub use cost::TokenPrices;
pub use ledger::Ledger;
pub use record::UsageRecord;

use std::time::UNIX_EPOCH;

use crate::ctx::{Endpoint, RequestCtx};
use crate::limits::{self, Settlement, Ticket};
use crate::translate::usage::Usage;

/// What a finished request used, and whether that had to be estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub usage: Usage,
    pub estimated: bool,
    pub cost_nanos: u64,
}

/// The usage of a finished request: the replica's own count when it reported one; else, if
/// the request reached a replica and was not refused by it (cut short by a disconnect, a
/// reset, a timeout, a stream without a usage chunk), the prompt estimate and the output
/// estimate of what was relayed (`Observed::output_estimate`), marked estimated; else zero:
/// refused before forwarding, or answered with an error status and no usage (an engine that
/// rejects a request has not generated anything for it, and the client got no answer).
fn settle(ctx: &RequestCtx) -> Settled {
    let (usage, estimated) = match ctx.usage {
        Some(u) => (u, false),
        None if ctx.sent && ctx.upstream_status < 400 => (
            Usage {
                input: u64::from(ctx.input_estimate),
                output: ctx.output_estimate,
                ..Usage::default()
            },
            true,
        ),
        None => (Usage::default(), false),
    };
    let cost_nanos = ctx
        .model
        .as_ref()
        .map_or(0, |m| m.token_prices.cost_nanos(&usage));
    Settled {
        usage,
        estimated,
        cost_nanos,
    }
}

/// Ends a request's accounting, once, however it ended (`logging`, or the context dropped
/// at shutdown): what it used is settled, its record handed to the context's ledger, and its
/// reservation released at that use. Marks the context done so it is never ended twice.
pub fn finish(ctx: &mut RequestCtx) -> (Settled, Option<Settlement>) {
    let settled = settle(ctx);
    ctx.logged = true;
    let ledger = ctx.ledger.take();
    let row = ledger
        .as_deref()
        .and_then(|l| Some((l, record(ctx, &settled, ctx.ticket.is_some())?)));
    let settlement = close(ctx.ticket.take(), &settled, row);
    (settled, settlement)
}

/// Settles the reservation, if there is one, at what the request used, handing its ledger
/// record over in the same step (`Ticket::settle_with`), so a budget rebuilt from the ledger
/// counts it exactly once; without a reservation, only hands the record over.
fn close(
    ticket: Option<Ticket>,
    settled: &Settled,
    record: Option<(&Ledger, UsageRecord)>,
) -> Option<Settlement> {
    let hand = move || {
        if let Some((ledger, record)) = record {
            ledger.record(record);
        }
    };
    match ticket {
        Some(ticket) => Some(ticket.settle_with(
            settled.usage.total(),
            settled.cost_nanos,
            limits::now_ms(),
            hand,
        )),
        None => {
            hand();
            None
        }
    }
}

/// The ledger record of a finished Model API request that was admitted (`admitted`: it held
/// a reservation, or reached a replica); `None` for other endpoints and for requests refused
/// before that (401, 413, 429, 402…), which cost nothing and are counted in the metrics and
/// the access log instead: the ledger cannot be grown by requests nobody pays for.
fn record(ctx: &RequestCtx, settled: &Settled, admitted: bool) -> Option<UsageRecord> {
    if !matches!(ctx.endpoint, Endpoint::ChatCompletions | Endpoint::Messages)
        || !(admitted || ctx.sent)
    {
        return None;
    }
    let ts_ms = started_ms(ctx);
    Some(UsageRecord {
        id: record_id(ts_ms),
        request_id: ctx.request_id.clone(),
        ts_ms,
        key_id: ctx.key_id.clone().unwrap_or_else(|| "-".into()),
        model: ctx
            .model
            .as_ref()
            .map_or_else(|| "-".into(), |m| m.slug.clone()),
        surface: ctx.endpoint.label(),
        status: ctx.status,
        usage: settled.usage,
        cost_nanos: settled.cost_nanos,
        estimated: settled.estimated,
        ttft_ms: ctx
            .first_token
            .or(ctx.first_byte)
            .map(|d| d.as_secs_f64() * 1e3),
        duration_ms: ctx.started.elapsed().as_secs_f64() * 1e3,
        replica: ctx.replica.clone(),
    })
}

/// When the request arrived, in Unix milliseconds: its ledger row's time, and the budget
/// period its cost belongs to.
pub fn started_ms(ctx: &RequestCtx) -> i64 {
    ctx.started_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The least id a row at or after `ts_ms` can have (see `record_id`), so time ranges are read
/// through the primary key. As an exclusive upper bound it holds for `ts_ms` > 0 only: ids of
/// rows before 1970 all start at zero.
pub fn id_bound(ts_ms: i64) -> String {
    if ts_ms > 0xffff_ffff_ffff {
        // Past what 12 hex digits hold (year 10889): sorts after every id.
        return "g".into();
    }
    format!("{:012x}", ts_ms.max(0))
}

/// A unique ledger id that sorts by time, so inserts append to the table's B-tree instead of
/// landing at random places: 12 hex digits of milliseconds, then 16 random ones.
pub fn record_id(ts_ms: i64) -> String {
    // Past what 12 hex digits hold (year 10889), every id shares the largest prefix.
    let ts = ts_ms.clamp(0, 0xffff_ffff_ffff);
    let mut raw = [0u8; 14];
    raw[..6].copy_from_slice(&ts.to_be_bytes()[2..]);
    raw[6..].copy_from_slice(&rand::random::<u64>().to_be_bytes());
    hex::encode(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_bounds_enclose_exactly_the_ids_of_their_millisecond() {
        for ts in [-5, 0, 1, 15, 16, 1_795_000_000_000, 0xffff_ffff_ffff] {
            let id = record_id(ts);
            assert!(id_bound(ts) <= id, "{ts}");
            assert!(id < id_bound((ts + 1).max(1)), "{ts}");
            assert!(id_bound(ts - 1) <= id, "{ts}");
        }
        assert!(record_id(0xffff_ffff_ffff) < id_bound(i64::MAX));
        assert!(id_bound(i64::MIN) <= record_id(0));
    }
}
