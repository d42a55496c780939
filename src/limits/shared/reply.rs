//! Reading the scripts' replies: a lease for an admitted request, a `LimitError` and the
//! rate-limit view for a refused one, the thresholds a settlement crossed.

use std::sync::Arc;

use super::quota::{Granted, Held, Pool};
use super::{Decision, Shared};
use crate::config::Key;
use crate::limits::{Crossed, Demand, LimitError, LimitKind, RateView, Scope, Spend};

/// A request admitted against this node's quota: what its settlement gives back.
pub struct Lease {
    pub(super) pool: Arc<Pool>,
    /// The Redis connection its holdings belong to.
    pub(super) epoch: u64,
    pub(super) held: Held,
    /// Tokens and nano-dollars reserved.
    pub(super) tokens: u64,
    pub(super) nanos: u64,
    /// The key's spend as the admission saw it, for the budget gauges.
    pub spend: Spend,
    pub(super) shared: Arc<Shared>,
}

impl Lease {
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// One operation's answer: its values, as the script joined them with `,`.
pub(super) struct Fields<'a>(Vec<&'a str>);

impl<'a> Fields<'a> {
    pub fn of(answer: &'a str) -> Fields<'a> {
        Fields(answer.split(',').collect())
    }

    fn signed(&self, at: usize) -> i64 {
        self.0.get(at).and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    fn int(&self, at: usize) -> u64 {
        self.signed(at).max(0) as u64
    }

    /// A grant, if Redis made one: the grant, and the output cap a budget clamped.
    pub fn granted(&self, demand: &Demand) -> Option<(Granted, Option<u64>, (u64, u64))> {
        if self.int(0) != 1 {
            return None;
        }
        let clamped = u64::try_from(self.signed(1)).ok();
        let output = clamped.unwrap_or(demand.output_tokens);
        let tokens = demand
            .input_tokens
            .saturating_add(output.saturating_mul(demand.choices.max(1)));
        let granted = Granted {
            sec: self.int(7),
            ms: self.int(12),
            units: self.int(9),
            tokens,
            slots: self.int(10),
            nanos: self.int(11),
            unit_nanos: self.int(8),
            key_requests: self.int(2),
            key_tokens: self.int(3),
        };
        Some((granted, clamped, (self.int(5), self.int(6))))
    }
}

/// A refused grant: why, and the key's windows.
pub(super) fn refusal(key: &Key, v: &Fields, now_ms: i64) -> Decision {
    let scope = if v.int(2) == 2 {
        Scope::Model
    } else {
        Scope::Key
    };
    let (limit, retry_after, need, committed) = (v.int(3), v.int(4), v.int(5), v.int(6));
    let limited = |kind| LimitError::Limited {
        kind,
        scope,
        limit,
        retry_after: retry_after.max(1),
    };
    let err = match v.int(1) {
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
    let view = view(key, v.int(7), v.int(8), v.int(9), v.int(10));
    Decision::Refused { err, view }
}

/// The key's windows from the script's sums: what the next request would see.
pub(super) fn view(
    key: &Key,
    requests: u64,
    requests_reset: u64,
    tokens: u64,
    tokens_reset: u64,
) -> RateView {
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

/// The thresholds in a settlement's answer: `spent,reserved,threshold…`.
pub(super) fn crossed(answer: &str, budget_nanos: u64, period_start: i64) -> Vec<Crossed> {
    let mut fields = answer.split(',');
    let spent = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    fields
        .skip(1)
        .filter_map(|t| t.parse::<f64>().ok())
        .map(|threshold| Crossed {
            threshold,
            spent_nanos: spent,
            budget_nanos,
            period_start,
        })
        .collect()
}
