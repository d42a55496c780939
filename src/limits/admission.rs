//! The admission policy: a request's output cap, its reservation against the key's and the
//! model's limits and budget, and the rate-limit headers it is answered with.
//!
//! The replica always receives the cap that was reserved: the client's `max_tokens`, or the
//! model's `default_max_tokens` when it set none (see `unasked_cap`), never above the
//! model's `max_output_tokens`, and lower still when a budget clamped it. Each of the `n`
//! choices may use the cap, and all of them are reserved. A request can therefore never
//! generate more than its reservation, which is what keeps limits and budgets exact.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};

use super::shared::Decision;
use super::{
    admit, admit_scoped, admit_within, now_ms, rate_headers, view, Counters, Demand, KeyLimits,
    LimitError, Registry, Ticket,
};
use crate::config::{Budget, Key, Limits, Model, OnRedisDown};
use crate::vocab::OwnFields;

/// The output cap a budget lowered the request's to.
const MAX_TOKENS_CLAMPED: HeaderName = HeaderName::from_static("x-tollgate-max-tokens-clamped");

/// What a request asks of its limits, as the request stage understood it.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    /// The prompt's tokens: exact, or an upper bound (`translate::prompt`).
    pub input_tokens: u64,
    /// The output cap the client set, if any.
    pub max_output: Option<u64>,
    /// Choices the replica generates, each up to the output cap; at least 1.
    pub choices: u64,
    /// When the request started (Unix ms): the budget period its cost belongs to.
    pub started_ms: i64,
}

/// An admitted request.
pub struct Admission {
    /// The output cap the replica must be sent.
    pub cap: u64,
    /// The reservation, settled when the request ends; `None` when nothing is counted.
    pub ticket: Option<Ticket>,
    /// Rate-limit headers and notices for the response.
    pub headers: OwnFields,
}

/// A refused request: why, and the rate-limit headers its error answer carries.
pub struct Refusal {
    pub err: LimitError,
    pub headers: OwnFields,
}

/// Settles the output cap and reserves the request's worst case against the key's and the
/// model's limits and budget.
pub fn admit_request(
    registry: &Registry,
    key: &Key,
    model: &Model,
    ask: Ask,
) -> Result<Admission, Refusal> {
    let input = ask.input_tokens;
    let mut cap = output_cap(key, model, ask);
    // Every configured key and model has counters; nothing to reserve against otherwise.
    let (Some(key_counters), Some(model_counters)) =
        (registry.key(&key.id), registry.model(&model.slug))
    else {
        return Ok(Admission {
            cap,
            ticket: None,
            headers: Vec::new(),
        });
    };
    let demand = Demand {
        input_tokens: input,
        output_tokens: cap,
        choices: ask.choices,
        prices: model.token_prices,
        per_request: 0,
    };
    let now = now_ms();
    let admitted = admit(
        key,
        key_counters,
        model,
        model_counters,
        demand,
        now,
        registry.generation,
    );
    let (mut ticket, view_after) = admitted.map_err(|err| Refusal {
        err,
        headers: rate_headers(&view(key, key_counters, now), now),
    })?;
    // Its cost belongs to the budget period it arrived in, as its ledger row.
    ticket.set_started_ms(ask.started_ms);
    let mut headers = rate_headers(&view_after, now);
    if let Some(n) = ticket.clamped_output {
        cap = n;
        headers.push((MAX_TOKENS_CLAMPED, HeaderValue::from(n)));
    }
    Ok(Admission {
        cap,
        ticket: Some(ticket),
        headers,
    })
}

/// The cap the replica is sent, before any budget clamps it.
fn output_cap(key: &Key, model: &Model, ask: Ask) -> u64 {
    let mut cap = ask
        .max_output
        .unwrap_or(u64::from(model.default_max_tokens));
    if let Some(max) = model.max_output_tokens {
        cap = cap.min(u64::from(max));
    }
    if ask.max_output.is_none() {
        cap = unasked_cap(cap, model, key, ask.input_tokens, ask.choices);
    }
    cap
}

/// `admit_request` in cluster mode: the reservation is made in Redis, across every node.
/// Without `[cluster]` it is `admit_request` itself.
pub async fn admit_request_shared(
    registry: &Registry,
    key: &Key,
    model: &Model,
    ask: Ask,
) -> Result<Admission, Refusal> {
    let Some(shared) = &registry.shared else {
        return admit_request(registry, key, model, ask);
    };
    let cap = output_cap(key, model, ask);
    let demand = Demand {
        input_tokens: ask.input_tokens,
        output_tokens: cap,
        choices: ask.choices,
        prices: model.token_prices,
        per_request: 0,
    };
    let model_part = (!model.limits.is_empty()).then_some((&model.limits, &*model.slug));
    let (Some(key_counters), Some(model_counters)) =
        (registry.key(&key.id), registry.model(&model.slug))
    else {
        return admit_request(registry, key, model, ask);
    };
    let now = now_ms();
    match shared.admit(key, model_part, demand, now).await {
        Decision::Down(mode) => {
            shared.note_fallback();
            let model = (!model.limits.is_empty()).then_some((&model.limits, model_counters));
            local_share(
                registry,
                mode,
                key,
                key_counters,
                model,
                demand,
                ask.started_ms,
            )
            .map(|admission| Admission {
                cap: admission
                    .ticket
                    .as_ref()
                    .and_then(|t| t.clamped_output)
                    .unwrap_or(cap),
                ..admission
            })
        }
        decision => from_redis(
            key,
            key_counters,
            decision,
            demand,
            cap,
            ask.started_ms,
            now,
        ),
    }
}

/// `admit_call` in cluster mode (see `admit_request_shared`).
pub async fn admit_call_shared(
    registry: &Registry,
    key: &Key,
    price_nanos: u64,
    started_ms: i64,
) -> Result<Admission, Refusal> {
    let (Some(shared), Some(key_counters)) = (&registry.shared, registry.key(&key.id)) else {
        return admit_call(registry, key, price_nanos, started_ms);
    };
    let demand = Demand::call(price_nanos);
    let now = now_ms();
    match shared.admit(key, None, demand, now).await {
        Decision::Down(mode) => {
            shared.note_fallback();
            local_share(registry, mode, key, key_counters, None, demand, started_ms).map(
                |admission| Admission {
                    cap: 0,
                    ..admission
                },
            )
        }
        decision => from_redis(key, key_counters, decision, demand, 0, started_ms, now),
    }
}

fn from_redis(
    key: &Key,
    key_counters: &Arc<Counters>,
    decision: Decision,
    mut demand: Demand,
    mut cap: u64,
    started_ms: i64,
    now: i64,
) -> Result<Admission, Refusal> {
    match decision {
        Decision::Admitted {
            lease,
            view,
            clamped,
        } => {
            let mut headers = rate_headers(&view, now);
            if let Some(n) = clamped {
                cap = n;
                demand.output_tokens = n;
                headers.push((MAX_TOKENS_CLAMPED, HeaderValue::from(n)));
            }
            let ticket = Ticket::shared(
                key,
                key_counters,
                lease,
                started_ms,
                demand.tokens(),
                demand.worst_nanos(),
                clamped,
            );
            Ok(Admission {
                cap,
                ticket: Some(ticket),
                headers,
            })
        }
        Decision::Refused { err, view } => Err(Refusal {
            err,
            headers: rate_headers(&view, now),
        }),
        Decision::Down(_) => Err(Refusal {
            err: LimitError::Unavailable,
            headers: Vec::new(),
        }),
    }
}

/// Redis is down. `reject`: 503. `local`: this node's counters, against its share of each
/// limit and of the budget (divided by `cluster.expected_nodes`), so that the nodes
/// together stay within the limits while each counts alone.
fn local_share(
    registry: &Registry,
    mode: OnRedisDown,
    key: &Key,
    key_counters: &Arc<Counters>,
    model: Option<(&Limits, &Arc<Counters>)>,
    demand: Demand,
    started_ms: i64,
) -> Result<Admission, Refusal> {
    let OnRedisDown::Local = mode else {
        return Err(Refusal {
            err: LimitError::Unavailable,
            headers: Vec::new(),
        });
    };
    let n = registry
        .shared
        .as_ref()
        .map_or(1, |s| s.settings().expected_nodes.get());
    let limits = share(&key.limits, n);
    let budget = key.budget.as_ref().map(|b| Budget {
        nanos: b.nanos / n,
        ..b.clone()
    });
    let model_limits = model.map(|(l, _)| share(l, n));
    let model = model
        .map(|(_, c)| c)
        .and_then(|c| model_limits.as_ref().map(|l| (l, c)));
    let own = KeyLimits {
        limits: &limits,
        budget: budget.as_ref(),
    };
    let now = now_ms();
    let shown = Key {
        limits,
        budget: budget.clone(),
        id: key.id.clone(),
        models: crate::config::ModelAccess::All,
        deployed: Vec::new(),
    };
    let (mut ticket, view_after) =
        admit_within(own, key_counters, model, demand, now, registry.generation).map_err(
            |err| Refusal {
                err,
                headers: rate_headers(&view(&shown, key_counters, now), now),
            },
        )?;
    ticket.set_started_ms(started_ms);
    let mut headers = rate_headers(&view_after, now);
    if let Some(n) = ticket.clamped_output {
        headers.push((MAX_TOKENS_CLAMPED, HeaderValue::from(n)));
    }
    Ok(Admission {
        cap: 0,
        ticket: Some(ticket),
        headers,
    })
}

/// One node's share of `limits` among `n`: at least 1 of each, so nothing is shut off.
fn share(limits: &Limits, n: u64) -> Limits {
    let part = |v: Option<u64>| v.map(|v| (v / n).max(1));
    Limits {
        rpm: part(limits.rpm),
        tpm: part(limits.tpm),
        max_concurrent: part(limits.max_concurrent),
    }
}

/// The output cap sent for a request that set none: `default` (the model's), lowered so
/// that a cap the client never asked for cannot be what fails its request. Engines refuse a
/// prompt plus cap past the context window, so it leaves room for the prompt; and a cap no
/// tpm limit could ever admit would be refused, so it fits the key's and the model's.
fn unasked_cap(default: u64, model: &Model, key: &Key, input: u64, choices: u64) -> u64 {
    let mut cap = default;
    if let Some(context) = model.context_tokens.map(u64::from) {
        // The prompt's count is never below the replica's (exact with a tokenizer, else an
        // upper bound), so a cap of what it leaves free always fits the window. A longer
        // prompt never gets a larger cap.
        let room = context.saturating_sub(input);
        // No room at all: the prompt alone fills the window, which the replica will say.
        if room > 0 {
            cap = cap.min(room);
        }
    }
    for tpm in [key.limits.tpm, model.limits.tpm].into_iter().flatten() {
        let room = tpm.saturating_sub(input) / choices.max(1);
        if room > 0 {
            cap = cap.min(room);
        }
    }
    cap
}

/// Reserves a deployed model's call against the key's rpm, max_concurrent and budget: its
/// worst case is its price per call, known before it starts, so the budget holds exactly.
/// It uses no tokens.
pub fn admit_call(
    registry: &Registry,
    key: &Key,
    price_nanos: u64,
    started_ms: i64,
) -> Result<Admission, Refusal> {
    let Some(key_counters) = registry.key(&key.id) else {
        return Ok(Admission {
            cap: 0,
            ticket: None,
            headers: Vec::new(),
        });
    };
    let demand = Demand::call(price_nanos);
    let now = now_ms();
    let (mut ticket, view_after) =
        admit_scoped(key, key_counters, None, demand, now, registry.generation).map_err(|err| {
            Refusal {
                err,
                headers: rate_headers(&view(key, key_counters, now), now),
            }
        })?;
    ticket.set_started_ms(started_ms);
    Ok(Admission {
        cap: 0,
        ticket: Some(ticket),
        headers: rate_headers(&view_after, now),
    })
}

#[cfg(test)]
mod share_tests {
    use super::*;

    #[test]
    fn each_node_gets_its_share_and_never_nothing() {
        let limits = Limits {
            rpm: Some(100),
            tpm: Some(2),
            max_concurrent: None,
        };
        let part = share(&limits, 3);
        assert_eq!(part.rpm, Some(33));
        assert_eq!(
            part.tpm,
            Some(1),
            "a limit below the node count still admits one"
        );
        assert_eq!(part.max_concurrent, None);
    }
}
