//! Accounting: what every finished request used and cost, kept in a durable ledger and
//! queryable by key, model and time bucket.

pub mod ledger;
pub mod many;
pub mod page;
pub mod query;
pub mod record;
pub mod spend;
pub mod sqlite_memory;

pub use ledger::Ledger;
pub use record::{DeployedUse, UsageRecord};

use std::sync::Arc;
use std::time::Instant;

use crate::config::{DeployedModel, Model};
use crate::forward::Outcome;
use crate::limits::{self, Settlement, Ticket};
use crate::vocab::{Endpoint, Usage};

/// What accounting needs of a request from the stages before the exchange.
pub struct Bill<'a> {
    pub endpoint: Endpoint,
    pub request_id: &'a str,
    pub started: Instant,
    /// The same moment in Unix milliseconds: the ledger row's time, and the budget period
    /// its cost belongs to.
    pub started_ms: i64,
    pub key_id: Option<&'a Arc<str>>,
    pub model: Option<&'a Arc<Model>>,
    /// The prompt's estimated tokens, used when the replica reports no usage.
    pub input_estimate: u32,
    /// The most output the replica was allowed: the output cap it was sent, times the
    /// choices. What a whole answer the client left before it arrived is billed.
    pub output_cap: u64,
    /// The client asked for a stream.
    pub stream: bool,
    /// The status the client was sent (499: it left).
    pub status: u16,
    /// A deployed model's call.
    pub deployed: Option<&'a DeployedCall>,
    /// An async submit: settled (charged) now, its one ledger record written when the request
    /// ends (`async_queue::ledger_record`).
    pub record_later: bool,
}

/// Which deployed model, deployment and environment a call reached (written by the predict
/// surface once it resolved the target).
#[derive(Debug, Clone)]
pub struct DeployedCall {
    pub model: Arc<DeployedModel>,
    pub deployment: Arc<str>,
    pub environment: Option<Arc<str>>,
}

/// What a finished request used, and whether that had to be estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub usage: Usage,
    pub estimated: bool,
    pub cost_nanos: u64,
}

/// The usage of a finished request: the replica's own count when it reported one; else, if
/// the request reached a replica and was not refused by it (cut short by a disconnect, a
/// reset, a timeout, a stream without a usage chunk), the prompt estimate and an output
/// estimate (`estimated_output`), marked estimated; else zero: refused before forwarding, or
/// answered with an error status and no usage (an engine that rejects a request has not
/// generated anything for it, and the client got no answer).
fn settle(bill: &Bill, outcome: &Outcome) -> Settled {
    if let Some(call) = bill.deployed {
        // A deployed model's call costs its price once it reached a replica that did not
        // refuse it, whatever came back: the replica may have worked on it.
        return Settled {
            usage: Usage::default(),
            estimated: false,
            cost_nanos: if outcome.sent {
                call.model.price_nanos
            } else {
                0
            },
        };
    }
    let (usage, estimated) = match outcome.usage {
        Some(u) => (u, false),
        None if outcome.sent && outcome.upstream_status < 400 => (
            Usage {
                input: u64::from(bill.input_estimate),
                output: estimated_output(bill, outcome),
                ..Usage::default()
            },
            true,
        ),
        None => (Usage::default(), false),
    };
    let cost_nanos = bill.model.map_or(0, |m| m.token_prices.cost_nanos(&usage));
    Settled {
        usage,
        estimated,
        cost_nanos,
    }
}

/// The output of a request that reached a replica and got no usage from it. A stream shows
/// what was generated as it goes: what was relayed (`Outcome::output_estimate`). A whole
/// answer comes only once generated, so when its client leaves first (499) nothing says how
/// far the replica got before tollgate closed its connection: it is billed at its output
/// cap, which was reserved and so fits the budget. Billing less would let a client pay for
/// the prompt only by hanging up just before the answer comes; a client that wants to stop
/// early and pay for what was generated streams.
fn estimated_output(bill: &Bill, outcome: &Outcome) -> u64 {
    if bill.status == 499 && !bill.stream {
        outcome.output_estimate.max(bill.output_cap)
    } else {
        outcome.output_estimate
    }
}

/// Ends a request's accounting: what it used is settled, its record handed to the ledger,
/// and its reservation (`ticket`) released at that use. Called once per request, however it
/// ended.
pub fn finish(
    bill: &Bill,
    outcome: &Outcome,
    ticket: Option<Ticket>,
    ledger: Option<&Ledger>,
) -> (Settled, Option<Settlement>) {
    let settled = settle(bill, outcome);
    let row = ledger.and_then(|l| Some((l, record(bill, outcome, &settled, ticket.is_some())?)));
    let settlement = close(ticket, &settled, row);
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
fn record(
    bill: &Bill,
    outcome: &Outcome,
    settled: &Settled,
    admitted: bool,
) -> Option<UsageRecord> {
    if bill.record_later || !bill.endpoint.is_billable() || !(admitted || outcome.sent) {
        return None;
    }
    let deployed = bill.deployed.map(|call| DeployedUse {
        deployment: call.deployment.clone(),
        environment: call.environment.clone(),
        bytes_in: outcome.bytes_in,
        bytes_out: outcome.bytes_out,
    });
    Some(UsageRecord {
        id: record_id(bill.started_ms),
        request_id: bill.request_id.to_string(),
        ts_ms: bill.started_ms,
        key_id: bill.key_id.cloned().unwrap_or_else(|| "-".into()),
        model: match (bill.model, bill.deployed) {
            (Some(m), _) => m.slug.clone(),
            (None, Some(call)) => call.model.id.clone(),
            (None, None) => "-".into(),
        },
        surface: bill.endpoint.label(),
        status: bill.status,
        usage: settled.usage,
        cost_nanos: settled.cost_nanos,
        estimated: settled.estimated,
        ttft_ms: outcome
            .first_token
            .or(outcome.first_byte)
            .map(|d| d.as_secs_f64() * 1e3),
        duration_ms: bill.started.elapsed().as_secs_f64() * 1e3,
        replica: outcome.replica().cloned(),
        queue_ms: outcome.queued.map(|d| d.as_secs_f64() * 1e3),
        deployed,
    })
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
    // Into a buffer first: `hex::encode` collects its digits one `char` at a time.
    let mut hex = [0u8; 28];
    // Cannot fail: the output is exactly twice the input's length.
    let _ = hex::encode_to_slice(raw, &mut hex);
    let mut id = String::with_capacity(hex.len());
    id.extend(hex.iter().map(|&b| char::from(b)));
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_answer_the_client_left_is_billed_at_its_cap_and_a_stream_at_what_was_relayed() {
        let bill = |status, stream| Bill {
            endpoint: Endpoint::ChatCompletions,
            request_id: "r",
            started: Instant::now(),
            started_ms: 0,
            key_id: None,
            model: None,
            input_estimate: 7,
            output_cap: 400,
            stream,
            status,
            deployed: None,
            record_later: false,
        };
        let outcome = Outcome {
            sent: true,
            output_estimate: 3,
            ..Outcome::default()
        };
        let billed = |status, stream| {
            let s = settle(&bill(status, stream), &outcome);
            (s.usage.input, s.usage.output, s.estimated)
        };
        assert_eq!(billed(499, false), (7, 400, true));
        assert_eq!(billed(499, true), (7, 3, true));
        // Cut by the replica or a timeout: what was relayed.
        assert_eq!(billed(502, false), (7, 3, true));
        // Never reached a replica: nothing.
        let unsent = Outcome::default();
        assert_eq!(settle(&bill(499, false), &unsent).usage, Usage::default());
    }

    #[test]
    fn id_bounds_enclose_exactly_the_ids_of_their_millisecond() {
        for ts in [-5, 0, 1, 15, 16, 1_795_000_000_000, 0xffff_ffff_ffff] {
            let id = record_id(ts);
            assert!(id_bound(ts) <= id, "{ts}");
            assert!(id < id_bound((ts + 1).max(1)), "{ts}");
            assert!(id_bound(ts - 1) <= id, "{ts}");
        }
        let id = record_id(0x0123_4567_89ab);
        assert!(id.starts_with("0123456789ab") && id.len() == 28, "{id}");
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert!(record_id(0xffff_ffff_ffff) < id_bound(i64::MAX));
        assert!(id_bound(i64::MIN) <= record_id(0));
    }
}
