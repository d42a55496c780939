//! The one `impl ProxyHttp`: the table of contents of a request.
//!
//! Stage order (each hook calls one stage; `RequestCtx` in `ctx.rs` says who writes what):
//!
//! 0. `init_downstream_modules`  none (no compression module).
//! 1. `new_ctx`         start the clock.
//! 2. `request_filter`  accept (request id, config snapshot, endpoint) → identify (key) →
//!    read body (capped, 413 before any upstream work) → understand (parse, validate) →
//!    route (model, pool) → forward (replica, send, relay). Every Model API request is
//!    answered here and the hook returns `Ok(true)`: Pingora's own upstream loop is never
//!    entered, because it cannot route on a body it would then fail to send (DESIGN.md §2).
//! 3. `fail_to_proxy`   errors Pingora raised itself, or a relayed body cut short.
//! 4. `logging`         exactly once per request: usage settled and sent to the ledger,
//!    metrics, the access log line.

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};

use crate::account::{self, Ledger};
use crate::alerts::Alerter;
use crate::config::{Key, Model};
use crate::ctx::{Endpoint, InFlight, RequestCtx};
use crate::error::GatewayError;
use crate::forward::{Exchange, Relayed, Upstream};
use crate::limits::{self, Demand};
use crate::metrics::Metrics;
use crate::respond;
use crate::runtime::Runtime;
use crate::translate::anthropic::{self, MessagesRequest};
use crate::translate::openai::ChatRequest;
use crate::translate::ModelRequest;
use crate::{access_log, auth, body, catalog, route};

pub struct Gateway {
    runtime: Arc<ArcSwap<Runtime>>,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    ledger: Option<Arc<Ledger>>,
    alerter: Alerter,
}

impl Gateway {
    pub fn new(
        runtime: Arc<ArcSwap<Runtime>>,
        metrics: Arc<Metrics>,
        ledger: Option<Arc<Ledger>>,
    ) -> Self {
        Gateway {
            runtime,
            upstream: Upstream::default(),
            alerter: Alerter::new(metrics.clone(), ledger.clone()),
            metrics,
            ledger,
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.ledger.clone())
    }

    fn init_downstream_modules(&self, _modules: &mut HttpModules) {
        // None. Pingora's default adds a response compression module, disabled, whose hooks
        // would still run (and allocate) on every request; tollgate relays responses as the
        // replica encoded them.
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.in_flight = Some(InFlight::new(&self.metrics.inflight));
        // tollgate watches the client while a replica works, to cancel on disconnect; a
        // client's next request arriving meanwhile must be kept for it, not lost.
        if let ServerSession::H1(h1) = session.as_downstream_mut() {
            h1.set_pipelining_enabled(true);
        }
        let runtime = self.runtime.load_full();
        // A client that stops reading fails the write, which the relay treats as a departure.
        session
            .as_downstream_mut()
            .set_write_timeout(Some(runtime.config.server.client_write_timeout));
        accept(session, ctx, &runtime);
        match self.serve(session, ctx, &runtime).await {
            Ok(Relayed::Complete) => Ok(true),
            Ok(Relayed::Cut) => Error::e_explain(
                ErrorType::ConnectionClosed,
                "replica cut the response short",
            ),
            Err(e) => {
                reject(session, ctx, &e).await;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, _: &mut Session, _: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        // Unreachable by construction: `request_filter` answers every request.
        Error::e_explain(
            ErrorType::InternalError,
            "the standard proxy loop is not used",
        )
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(c) => *c,
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                _ => 500,
            },
        };
        if code > 0 && session.response_written().is_none() {
            ctx.status = code;
            let body = serde_json::json!({"error": {
                "message": "The request could not be processed. Check the request and retry.",
                "type": if code < 500 { "invalid_request_error" } else { "api_error" },
                "param": null, "code": "gateway_error"}});
            if let Ok(mut h) = pingora::http::ResponseHeader::build(code, Some(3)) {
                let body = bytes::Bytes::from(body.to_string());
                let _ = h.insert_header("content-type", "application/json");
                let _ = h.insert_header("content-length", body.len());
                let _ = h.insert_header("x-request-id", ctx.request_id.as_str());
                let _ = session
                    .as_downstream_mut()
                    .write_error_response(h, body)
                    .await;
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        // Uncounted once the request is recorded, at the end of this call.
        let _in_flight = ctx.in_flight.take();
        if ctx.status == 0 {
            ctx.status = session.response_written().map_or(0, |h| h.status.as_u16());
        }
        access_log::record(&self.metrics, &self.alerter, ctx, e);
    }
}

impl Gateway {
    async fn serve(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        runtime: &Runtime,
    ) -> Result<Relayed, GatewayError> {
        let snapshot = &runtime.config;
        match ctx.endpoint {
            Endpoint::ChatCompletions | Endpoint::Messages => {
                let key = auth::identify(snapshot, &session.req_header().headers)?;
                ctx.key_id = Some(key.id.clone());
                ctx.key = Some(key.clone());
                let bytes = body::read_capped(session, snapshot.server.max_body_bytes).await?;
                ctx.body_read = true;
                let mut request = if ctx.endpoint == Endpoint::Messages {
                    ModelRequest::Messages(MessagesRequest::parse(&bytes)?)
                } else {
                    ModelRequest::Chat(ChatRequest::parse(&bytes)?)
                };
                ctx.stream = request.stream();
                ctx.input_estimate = request.estimate_input_tokens();
                let model = route::resolve(snapshot, &key, request.model())?;
                ctx.model = Some(model.clone());
                admit(ctx, runtime, &key, model, &mut request)?;
                request.set_model_takes_images(model.input_modalities.contains(&"image"));
                let (body, plan) = request.into_upstream(
                    &model.upstream_model,
                    model.reasoning_switch,
                    message_id,
                );
                let exchange = Exchange {
                    pool: &snapshot.pools[model.pool],
                    route: runtime.router.pool(model.pool),
                    path: "/v1/chat/completions",
                    body: body.into(),
                    stream: ctx.stream,
                    plan,
                };
                Ok(self
                    .upstream
                    .forward(session, ctx, &self.metrics, exchange)
                    .await?)
            }
            Endpoint::CountTokens => {
                let key = auth::identify(snapshot, &session.req_header().headers)?;
                ctx.key_id = Some(key.id.clone());
                let bytes = body::read_capped(session, snapshot.server.max_body_bytes).await?;
                ctx.body_read = true;
                let request = anthropic::parse_count_tokens(&bytes)?;
                let model = route::resolve(snapshot, &key, &request.model)?;
                ctx.model = Some(model.clone());
                let value = serde_json::json!({ "input_tokens": request.estimate_input_tokens() });
                ctx.status = 200;
                let _ = respond::send_json(
                    session,
                    200,
                    value.to_string().into(),
                    &ctx.request_id,
                    &[],
                )
                .await;
                Ok(Relayed::Complete)
            }
            Endpoint::Models | Endpoint::Model => {
                let key = auth::identify(snapshot, &session.req_header().headers)?;
                ctx.key_id = Some(key.id.clone());
                let value = match model_path(session.req_header().uri.path()) {
                    None => catalog::list(snapshot, &key),
                    Some(slug) => catalog::get(snapshot, &key, &slug)
                        .ok_or(route::RouteError::ModelNotFound { model: slug })?,
                };
                ctx.status = 200;
                let body = bytes::Bytes::from(value.to_string());
                // A failed write means the client left; logging still runs.
                let _ = respond::send_json(session, 200, body, &ctx.request_id, &[]).await;
                Ok(Relayed::Complete)
            }
            Endpoint::Unknown => {
                let req = session.req_header();
                let (method, path) = (req.method.as_str(), req.uri.path());
                Err(match allowed_method(path) {
                    Some(allow) => GatewayError::MethodNotAllowed {
                        path: path.to_string(),
                        allow,
                    },
                    None => GatewayError::UnknownRoute {
                        method: method.to_string(),
                        path: path.to_string(),
                    },
                })
            }
        }
    }
}

/// Stage "admit": settle the request's output cap, reserve its worst case against the key's
/// and the model's limits and budget (settled in `logging`), and prepare the rate-limit
/// headers.
///
/// The replica always receives the cap that was reserved: the client's `max_tokens`, or the
/// model's `default_max_tokens` when it set none (see `unasked_cap`), never above the
/// model's `max_output_tokens`, and lower still when a budget clamped it. Each of the `n`
/// choices may use the cap, and all of them are reserved. A request can therefore never
/// generate more than its reservation, which is what keeps limits and budgets exact.
fn admit(
    ctx: &mut RequestCtx,
    runtime: &Runtime,
    key: &Key,
    model: &Model,
    request: &mut ModelRequest,
) -> Result<(), GatewayError> {
    let asked = request.max_output_tokens();
    let choices = request.choices();
    let input = u64::from(ctx.input_estimate);
    let mut cap = asked.unwrap_or(u64::from(model.default_max_tokens));
    if let Some(max) = model.max_output_tokens {
        cap = cap.min(u64::from(max));
    }
    if asked.is_none() {
        cap = unasked_cap(cap, model, key, input, choices);
    }
    // Every configured key and model has counters; nothing to reserve against otherwise.
    if let (Some(key_counters), Some(model_counters)) = (
        runtime.limits.key(&key.id),
        runtime.limits.model(&model.slug),
    ) {
        let demand = Demand {
            input_tokens: input,
            output_tokens: cap,
            choices,
            prices: model.token_prices,
        };
        let now = limits::now_ms();
        let generation = runtime.limits.generation;
        let (mut ticket, view) = limits::admit(
            key,
            key_counters,
            model,
            model_counters,
            demand,
            now,
            generation,
        )
        .map_err(|err| {
            ctx.headers = limits::rate_headers(&limits::view(key, key_counters, now), now);
            GatewayError::Limit {
                err,
                key_id: key.id.to_string(),
                model: model.slug.to_string(),
            }
        })?;
        // Its cost belongs to the budget period it arrived in, as its ledger row.
        ticket.set_started_ms(account::started_ms(ctx));
        ctx.headers = limits::rate_headers(&view, now);
        if let Some(n) = ticket.clamped_output {
            cap = n;
            ctx.headers
                .push(("x-tollgate-max-tokens-clamped", n.to_string()));
        }
        ctx.ticket = Some(ticket);
    }
    if asked != Some(cap) || request.sets_both_caps() {
        request.set_max_output_tokens(cap);
    }
    Ok(())
}

/// The output cap sent for a request that set none: `default` (the model's), lowered so
/// that a cap the client never asked for cannot be what fails its request. Engines refuse a
/// prompt plus cap past the context window, so it leaves room for the prompt; and a cap no
/// tpm limit could ever admit would be refused, so it fits the key's and the model's.
fn unasked_cap(default: u64, model: &Model, key: &Key, input: u64, choices: u64) -> u64 {
    let mut cap = default;
    if let Some(context) = model.context_tokens.map(u64::from) {
        // The prompt estimate (about 4 bytes a token) runs short for some text and
        // tokenizers, so a margin is kept: a quarter of the prompt plus 64 tokens, but never
        // more than half of what the estimate leaves free. The room left falls steadily as
        // the prompt grows, so a longer prompt never gets a larger cap.
        let free = context.saturating_sub(input);
        let margin = (input / 4 + 64).min(free / 2);
        let room = free - margin;
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

/// Stage "accept": request id, config snapshot, endpoint.
fn accept(session: &Session, ctx: &mut RequestCtx, runtime: &Arc<Runtime>) {
    let req = session.req_header();
    ctx.request_id = match req
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
    {
        Some(id) if is_safe_request_id(id) => id.to_string(),
        _ => generated_request_id(),
    };
    ctx.runtime = Some(runtime.clone());
    let path = req.uri.path();
    ctx.endpoint = match (req.method.as_str(), path) {
        ("POST", "/v1/chat/completions") => Endpoint::ChatCompletions,
        ("POST", "/v1/messages") => Endpoint::Messages,
        ("POST", "/v1/messages/count_tokens") => Endpoint::CountTokens,
        ("GET", "/v1/models") => Endpoint::Models,
        ("GET", p) if p.starts_with("/v1/models/") => Endpoint::Model,
        _ => Endpoint::Unknown,
    };
}

/// Writes a gateway error in the client's dialect. After an early answer to a request whose
/// body was not read, the connection is closed rather than drained.
async fn reject(session: &mut Session, ctx: &mut RequestCtx, err: &GatewayError) {
    ctx.status = err.status();
    ctx.error = Some(err.code());
    if !ctx.body_read {
        session.set_keepalive(None);
    }
    if ctx.status == 499 {
        return;
    }
    if let Some(secs) = err.retry_after() {
        ctx.headers.push(("retry-after", secs.to_string()));
    }
    if let GatewayError::MethodNotAllowed { allow, .. } = err {
        ctx.headers.push(("allow", (*allow).to_string()));
    }
    let body = respond::error_body(ctx.endpoint.dialect(session.req_header()), err);
    let _ = respond::send_json(session, ctx.status, body, &ctx.request_id, &ctx.headers).await;
}

/// An Anthropic message id: `msg_` and 24 random base-62 characters.
fn message_id() -> String {
    use rand::distributions::{Alphanumeric, DistString};
    format!(
        "msg_{}",
        Alphanumeric.sample_string(&mut rand::thread_rng(), 24)
    )
}

/// `req_` and 32 random hex digits.
fn generated_request_id() -> String {
    let mut hex = [0u8; 32];
    // Cannot fail: the output is exactly twice the input's length.
    let _ = hex::encode_to_slice(rand::random::<u128>().to_be_bytes(), &mut hex);
    let mut id = String::with_capacity(4 + hex.len());
    id.push_str("req_");
    id.extend(hex.iter().map(|&b| char::from(b)));
    id
}

/// A client-chosen request id is kept when it is short and made of safe characters.
fn is_safe_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// The slug a `/v1/models/{slug}` path names, percent-decoded (slugs contain `/`, which
/// clients may send as `%2F`). It may be empty or not name any model; the lookup then
/// answers 404 `model_not_found`.
fn model_path(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v1/models/")?;
    Some(
        percent_encoding::percent_decode_str(rest)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

fn allowed_method(path: &str) -> Option<&'static str> {
    match path {
        "/v1/chat/completions" | "/v1/messages" | "/v1/messages/count_tokens" => Some("POST"),
        "/v1/models" => Some("GET"),
        p if p.starts_with("/v1/models/") => Some("GET"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_and_model_paths() {
        assert!(is_safe_request_id("abc-123_x.y:z"));
        assert!(!is_safe_request_id(""));
        assert!(!is_safe_request_id("a b"));
        assert!(!is_safe_request_id(&"a".repeat(129)));
        assert_eq!(
            model_path("/v1/models/org/name").as_deref(),
            Some("org/name")
        );
        assert_eq!(
            model_path("/v1/models/org%2Fname").as_deref(),
            Some("org/name")
        );
        assert_eq!(model_path("/v1/models/").as_deref(), Some(""));
        assert_eq!(model_path("/v1/models/%zz").as_deref(), Some("%zz"));
        assert_eq!(model_path("/v1/models/%FF").as_deref(), Some("\u{FFFD}"));
        assert_eq!(model_path("/v1/modelsx"), None);
    }
}
