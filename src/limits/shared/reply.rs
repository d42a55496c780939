//! Reading the scripts' replies: a lease for an admitted request, a `LimitError` and the
//! rate-limit view for a refused one, the thresholds a settlement crossed.

use std::sync::Arc;

use redis::Value;

use super::{Decision, Shared};
use crate::config::Key;
use crate::limits::{Crossed, Demand, LimitError, LimitKind, RateView, Scope, Spend};

/// A request admitted by Redis: what its settlement must give back.
pub struct Lease {
    pub(super) id: String,
    pub(super) key_id: Arc<str>,
    /// The model's key prefix, when its limits were counted too.
    pub(super) model: Option<String>,
    /// The second (Redis's clock) its tokens were counted in.
    pub(super) at_sec: u64,
    /// Tokens reserved.
    pub(super) tokens: u64,
    /// The key's spend as the admission saw it, for the budget gauges.
    pub spend: Spend,
    pub(super) shared: Arc<Shared>,
}

impl Lease {
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

fn int(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::Int(n)) => (*n).max(0) as u64,
        Some(Value::BulkString(b)) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

fn signed(v: Option<&Value>) -> i64 {
    match v {
        Some(Value::Int(n)) => *n,
        _ => 0,
    }
}

pub(super) fn admission(
    shared: &Arc<Shared>,
    key: &Key,
    v: &[Value],
    now_ms: i64,
    lease_id: String,
    model: Option<String>,
    demand: Demand,
) -> Decision {
    let now_sec = (now_ms / 1000).max(0) as u64;
    if int(v.first()) == 1 {
        let clamped = u64::try_from(signed(v.get(1))).ok();
        let output = clamped.unwrap_or(demand.output_tokens);
        let tokens = demand
            .input_tokens
            .saturating_add(output.saturating_mul(demand.choices.max(1)));
        let view = view(key, int(v.get(2)), 60, int(v.get(3)), int(v.get(4)));
        return Decision::Admitted {
            lease: Lease {
                id: lease_id,
                key_id: key.id.clone(),
                model,
                at_sec: now_sec,
                tokens,
                spend: Spend {
                    spent: int(v.get(5)),
                    reserved: int(v.get(6)),
                    ..Spend::default()
                },
                shared: shared.clone(),
            },
            view,
            clamped,
        };
    }
    let scope = if int(v.get(2)) == 2 {
        Scope::Model
    } else {
        Scope::Key
    };
    let (limit, retry_after, need, committed) =
        (int(v.get(3)), int(v.get(4)), int(v.get(5)), int(v.get(6)));
    let limited = |kind| LimitError::Limited {
        kind,
        scope,
        limit,
        retry_after: retry_after.max(1),
    };
    let err = match int(v.get(1)) {
        1 => limited(LimitKind::Requests),
        2 => limited(LimitKind::Tokens),
        3 => limited(LimitKind::Concurrency),
        4 => LimitError::TooLarge { scope, limit, need },
        _ => LimitError::Budget {
            budget_nanos: limit,
            spent_nanos: committed,
            worst_nanos: need,
            retry_after: key.budget.as_ref().and_then(|b| {
                super::period::end(b.period, now_ms)
                    .map(|e| ((e - now_ms).max(0) as u64).div_ceil(1000))
            }),
        },
    };
    let view = view(
        key,
        int(v.get(7)),
        int(v.get(8)),
        int(v.get(9)),
        int(v.get(10)),
    );
    Decision::Refused { err, view }
}

/// The key's windows from the script's sums: what the next request would see.
fn view(key: &Key, requests: u64, requests_reset: u64, tokens: u64, tokens_reset: u64) -> RateView {
    RateView {
        requests: key
            .limits
            .rpm
            .map(|l| (l, l.saturating_sub(requests), requests_reset)),
        tokens: key
            .limits
            .tpm
            .map(|l| (l, l.saturating_sub(tokens), tokens_reset)),
    }
}

/// The thresholds in a settlement's reply: `{spent, reserved, threshold…}`.
pub(super) fn crossed(v: &[Value], budget_nanos: u64, period_start: i64) -> Vec<Crossed> {
    let spent = int(v.first());
    v.iter()
        .skip(2)
        .filter_map(|t| match t {
            Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse::<f64>().ok(),
            _ => None,
        })
        .map(|threshold| Crossed {
            threshold,
            spent_nanos: spent,
            budget_nanos,
            period_start,
        })
        .collect()
}
