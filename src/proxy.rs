//! The one `impl ProxyHttp`: the table of contents of a request.
//!
//! ```text
//! request_filter  accept ─▶ identify ─▶ read body ─▶ understand ─▶ route ─▶ vet media ─▶ admit ─▶ forward
//!                 (id,       (key)       (cap→413)    (parse,       (model)  (modalities, (limits,  (replica,
//!                  snapshot)                           translate)            URLs)        budget)   relay)
//! logging         account ─▶ observe ─▶ log
//!                 (usage, cost,  (metrics,   (access
//!                  ledger)        alerts)     log line)
//! ```
//!
//! Before it, `early_request_filter` only stops the request head's deadline (conn.rs): the
//! head is in. Each stage is one line below, in that order; `RequestCtx` (ctx.rs) says which
//! stage writes each piece of per-request state and which read it. Every request is answered
//! inside `request_filter`, which returns `Ok(true)`; the hooks are run by tollgate's request
//! loop (conn.rs), not Pingora's proxy, whose upstream phase routes before reading the body,
//! and the Model API routes on a field of the body (ARCHITECTURE.md, "Why tollgate drives the
//! exchange itself"). `logging` runs
//! exactly once per request, however it ended; a request whose task is dropped before it (a
//! shutdown past the grace period) is ended by `Ctx`'s `Drop` instead.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};

use crate::account::Ledger;
use crate::alerts::Alerter;
use crate::async_queue::AsyncQueue;
use crate::config::{Key, Model, Policy, Pool, PromptRules, Snapshot};
use crate::ctx::{InFlight, RequestCtx};
use crate::error::GatewayError;
use crate::forward::{Exchange, Relayed, Upstream};
use crate::limits::{self, Ask};
use crate::metrics::Metrics;
use crate::route::{Placement, RouteError};
use crate::runtime::Runtime;
use crate::translate::{anthropic, prefix, ModelRequest};
use crate::vocab::{self, Endpoint};
use crate::{access_log, auth, body, catalog, conn, media, predict, respond, route};

pub struct Gateway {
    runtime: Arc<ArcSwap<Runtime>>,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    ledger: Option<Arc<Ledger>>,
    alerter: Alerter,
    waker: crate::wake::Waker,
    /// Async predict's queue; `None` when its database could not be opened.
    queue: Option<Arc<AsyncQueue>>,
}

impl Gateway {
    pub fn new(
        runtime: Arc<ArcSwap<Runtime>>,
        metrics: Arc<Metrics>,
        ledger: Option<Arc<Ledger>>,
        queue: Option<Arc<AsyncQueue>>,
    ) -> Self {
        Gateway {
            runtime,
            upstream: Upstream::new(GatewayError::of_forward),
            alerter: Alerter::new(metrics.clone(), ledger.clone()),
            waker: crate::wake::Waker::new(metrics.clone()),
            metrics,
            ledger,
            queue,
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx(RequestCtx::new(self.ledger.clone()))
    }

    async fn early_request_filter(&self, session: &mut Session, _ctx: &mut Ctx) -> Result<()> {
        // The head is in: its deadline no longer applies (the body has its own pace).
        conn::head_read(session.as_downstream());
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
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
        let served = match ctx.endpoint {
            _ if lacks_host(session.req_header()) => Err(GatewayError::MissingHost),
            Endpoint::ChatCompletions | Endpoint::Messages => {
                self.model_api(session, ctx, &runtime).await
            }
            Endpoint::CountTokens => count_tokens(session, ctx, &runtime).await,
            Endpoint::Models | Endpoint::Model => models(session, ctx, &runtime).await,
            Endpoint::Predict => {
                let queue = self.queue.as_deref();
                predict::serve(&self.upstream, &self.waker, queue, session, ctx, &runtime).await
            }
            Endpoint::Unknown => Err(unknown_route(session)),
        };
        match served {
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

    async fn upstream_peer(&self, _: &mut Session, _: &mut Ctx) -> Result<Box<HttpPeer>> {
        // Unreachable by construction: `request_filter` answers every request.
        Error::e_explain(
            ErrorType::InternalError,
            "the standard proxy loop is not used",
        )
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
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
                let body = Bytes::from(body.to_string());
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

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        // Uncounted once the request is recorded, at the end of this call.
        let _in_flight = ctx.in_flight.take();
        if ctx.status == 0 {
            ctx.status = session.response_written().map_or(0, |h| h.status.as_u16());
        }
        let error = ctx.error.or_else(|| e.map(|_| "connection_error"));
        let (settled, settlement) = ctx.account();
        access_log::observe(
            &self.metrics,
            &self.alerter,
            ctx,
            &settled,
            settlement,
            error,
        );
        access_log::line(ctx, error, &settled);
    }
}

impl Gateway {
    /// The Model API: chat completions and messages, each stage one line.
    async fn model_api(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        runtime: &Runtime,
    ) -> Result<Relayed, GatewayError> {
        let snapshot = &runtime.config;
        let key = identify(session, ctx, snapshot)?;
        let bytes = read_body(session, ctx, snapshot).await?;
        let mut request = understand(ctx, &bytes)?;
        let model = resolve(ctx, snapshot, &key, request.model())?;
        vet_media(&model, &request).await?;
        let affinity = route::session_id(&session.req_header().headers)?.cloned();
        count_prompt(ctx, &model, &mut request, bytes.len()).await;
        admit(ctx, runtime, &key, &model, &mut request).await?;
        let prompt = u64::from(ctx.input_estimate);
        let (body, plan) = request.into_upstream(&model, prompt, vocab::message_id);
        let placement = place(ctx, &snapshot.pools[model.pool], affinity, &body);
        let exchange = Exchange {
            pool: &snapshot.pools[model.pool],
            route: runtime.router.pool(model.pool),
            placement,
            path: "/v1/chat/completions",
            body,
            stream: ctx.stream,
            plan,
            request_id: &ctx.request_id,
            started: ctx.started,
            own_fields: &ctx.headers,
            inter_token: runtime.meters.model(&model.slug).map(|m| m.itl.clone()),
            ticket: ctx.ticket.as_mut(),
        };
        let relayed = self
            .upstream
            .forward(session, exchange, &mut ctx.outcome)
            .await;
        note_relayed(ctx);
        Ok(relayed?)
    }
}

/// Stage "accept": request id, config snapshot, endpoint.
fn accept(session: &Session, ctx: &mut RequestCtx, runtime: &Arc<Runtime>) {
    let req = session.req_header();
    let client_id = req
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok());
    ctx.request_id = vocab::request_id(client_id);
    ctx.runtime = Some(runtime.clone());
    ctx.endpoint = match predict::addressed(req) {
        Some(_) => Endpoint::Predict,
        None => Endpoint::of(req.method.as_str(), req.uri.path()),
    };
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host` is answered 400. HTTP/1.0 predates the
/// field and is served without it. (Pingora refuses a request with two.)
fn lacks_host(req: &http::request::Parts) -> bool {
    req.version == http::Version::HTTP_11 && !req.headers.contains_key(http::header::HOST)
}

/// Stage "identify": the key the request presents.
fn identify(
    session: &Session,
    ctx: &mut RequestCtx,
    snapshot: &Snapshot,
) -> Result<Arc<Key>, GatewayError> {
    let key = auth::identify(snapshot, &session.req_header().headers)?;
    ctx.key = Some(key.clone());
    Ok(key)
}

/// Stage "read body": the whole body, capped (413 before any upstream work).
async fn read_body(
    session: &mut Session,
    ctx: &mut RequestCtx,
    snapshot: &Snapshot,
) -> Result<Bytes, GatewayError> {
    let server = &snapshot.server;
    let bytes = body::read_capped(session, server.max_body_bytes, &server.body_pace).await?;
    ctx.body_read = true;
    Ok(bytes)
}

/// Stage "understand": the request parsed and checked.
fn understand(ctx: &mut RequestCtx, bytes: &Bytes) -> Result<ModelRequest, GatewayError> {
    let request = ModelRequest::parse_body(ctx.endpoint, bytes.clone())?;
    ctx.stream = request.stream();
    Ok(request)
}

/// Stage "route": the model the request names, if the key may use it.
fn resolve(
    ctx: &mut RequestCtx,
    snapshot: &Snapshot,
    key: &Key,
    slug: &str,
) -> Result<Arc<Model>, GatewayError> {
    let model = route::resolve(snapshot, key, slug)?.clone();
    ctx.model = Some(model.clone());
    Ok(model)
}

/// Stage "vet media": images, audio and video the model takes, from URLs its replicas may
/// fetch (see `media`).
async fn vet_media(model: &Model, request: &ModelRequest) -> Result<(), GatewayError> {
    Ok(media::vet(model, request.media()).await?)
}

/// Bodies past this size are tokenized on a blocking thread: with the pure-Rust regex, a
/// byte-level BPE counts about 4 MB a second (`cargo bench --bench translate --
/// prompt_count`), so 4 KiB already take about a millisecond, which would stall every
/// other request on this worker.
const TOKENIZE_INLINE_BYTES: usize = 4 * 1024;

/// Stage "admit", first half: the prompt counted as the model counts it (exact with its
/// tokenizer, else an upper bound; see `translate::prompt`), for the reservation.
async fn count_prompt(
    ctx: &mut RequestCtx,
    model: &Arc<Model>,
    request: &mut ModelRequest,
    body_bytes: usize,
) -> u64 {
    let count = if model.prompt.tokenizer.is_none() || body_bytes <= TOKENIZE_INLINE_BYTES {
        request.prompt_tokens(model)
    } else {
        let body = Arc::new(request.prompt_body(model));
        let (on_thread, model_there) = (body.clone(), model.clone());
        let counted =
            tokio::task::spawn_blocking(move || on_thread.tokens(&model_there.prompt)).await;
        match counted {
            Ok(n) => n,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down: the bound needs no tokenizer.
            Err(_) => {
                let rules = PromptRules {
                    tokenizer: None,
                    ..model.prompt.clone()
                };
                body.tokens(&rules)
            }
        }
    };
    ctx.input_estimate = u32::try_from(count).unwrap_or(u32::MAX);
    count
}

/// Stage "admit": the output cap, and the request's worst case reserved against the key's
/// and the model's limits and budget (settled by `account`). See `limits::admission`.
async fn admit(
    ctx: &mut RequestCtx,
    runtime: &Runtime,
    key: &Key,
    model: &Model,
    request: &mut ModelRequest,
) -> Result<(), GatewayError> {
    let ask = Ask {
        input_tokens: u64::from(ctx.input_estimate),
        max_output: request.max_output_tokens(),
        choices: request.choices(),
        started_ms: ctx.started_ms(),
    };
    match limits::admit_request_shared(&runtime.limits, key, model, ask).await {
        Ok(admission) => {
            ctx.ticket = admission.ticket;
            ctx.headers = admission.headers;
            ctx.output_cap = admission.cap.saturating_mul(ask.choices.max(1));
            request.cap_output(admission.cap);
            Ok(())
        }
        Err(refusal) => {
            ctx.headers = refusal.headers;
            Err(GatewayError::Limit {
                err: refusal.err,
                key_id: key.id.to_string(),
                model: model.slug.to_string(),
            })
        }
    }
}

/// Where the `affinity` policy places the request: by its session id (sent back to the
/// client), else by its prompt's prefix as the replica will see it.
fn place(
    ctx: &mut RequestCtx,
    pool: &Pool,
    session: Option<http::HeaderValue>,
    upstream_body: &[u8],
) -> Placement {
    if let Some(id) = &session {
        if id.to_str().is_ok() {
            ctx.headers.push((route::SESSION_HEADER, id.clone()));
        }
    }
    if pool.fleet.policy != Policy::Affinity {
        return Placement::default();
    }
    let hash = match &session {
        Some(id) => Some(prefix::session_hash(id.as_bytes())),
        None => prefix::prefix_hash(upstream_body),
    };
    Placement { hash }
}

/// After forward: the status the client was sent, and the error its answer carried.
fn note_relayed(ctx: &mut RequestCtx) {
    let outcome = &ctx.outcome;
    ctx.status = outcome.status;
    ctx.error = match &outcome.broke_off {
        Some(e) => Some(GatewayError::of_forward(e).code),
        None if outcome.upstream_status >= 400 => Some("upstream_status"),
        None => None,
    };
}

/// Stage "admit" of the metadata endpoints: the key's own requests-per-minute for them,
/// apart from its `rpm` (see `limits::admit_metadata`).
fn admit_metadata(ctx: &mut RequestCtx, runtime: &Runtime, key: &Key) -> Result<(), GatewayError> {
    let rpm = runtime.config.server.metadata_rpm;
    match limits::admit_metadata(&runtime.limits, key, rpm, limits::now_ms()) {
        Ok(headers) => {
            ctx.headers = headers;
            Ok(())
        }
        Err(refusal) => {
            ctx.headers = refusal.headers;
            Err(GatewayError::Limit {
                err: refusal.err,
                key_id: key.id.to_string(),
                model: String::new(),
            })
        }
    }
}

/// `POST /v1/messages/count_tokens`: the prompt's tokens as a request to the model would
/// reserve them, for a model the key may use.
async fn count_tokens(
    session: &mut Session,
    ctx: &mut RequestCtx,
    runtime: &Runtime,
) -> Result<Relayed, GatewayError> {
    let snapshot = &runtime.config;
    let key = identify(session, ctx, snapshot)?;
    admit_metadata(ctx, runtime, &key)?;
    let bytes = read_body(session, ctx, snapshot).await?;
    let mut request = ModelRequest::Messages(anthropic::parse_count_tokens(&bytes)?);
    let model = resolve(ctx, snapshot, &key, request.model())?;
    let tokens = count_prompt(ctx, &model, &mut request, bytes.len()).await;
    let value = serde_json::json!({ "input_tokens": tokens });
    answer(session, ctx, value).await
}

/// `GET /v1/models` and `GET /v1/models/{slug}`: the models the key may use.
async fn models(
    session: &mut Session,
    ctx: &mut RequestCtx,
    runtime: &Runtime,
) -> Result<Relayed, GatewayError> {
    let snapshot = &runtime.config;
    let key = identify(session, ctx, snapshot)?;
    admit_metadata(ctx, runtime, &key)?;
    let value = catalog::answer(snapshot, &key, session.req_header().uri.path())
        .map_err(|model| RouteError::ModelNotFound { model })?;
    answer(session, ctx, value).await
}

/// A 200 JSON answer tollgate gives itself. A failed write means the client left; logging
/// still runs.
async fn answer(
    session: &mut Session,
    ctx: &mut RequestCtx,
    value: serde_json::Value,
) -> Result<Relayed, GatewayError> {
    ctx.status = 200;
    let body = Bytes::from(value.to_string());
    let _ = respond::send_json(session, 200, body, &ctx.request_id, &ctx.headers).await;
    Ok(Relayed::Complete)
}

/// A path tollgate does not serve (404), or a known one with the wrong method (405).
fn unknown_route(session: &Session) -> GatewayError {
    let req = session.req_header();
    let (method, path) = (req.method.as_str(), req.uri.path());
    match Endpoint::allowed_method(path) {
        Some(allow) => GatewayError::MethodNotAllowed {
            path: path.to_string(),
            allow,
        },
        None => GatewayError::UnknownRoute {
            method: method.to_string(),
            path: path.to_string(),
        },
    }
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
        ctx.headers.push((http::header::RETRY_AFTER, secs.into()));
    }
    if let GatewayError::MethodNotAllowed { allow, .. } = err {
        ctx.headers
            .push((http::header::ALLOW, http::HeaderValue::from_static(allow)));
    }
    let body = respond::error_body(ctx.endpoint.dialect(session.req_header()), err);
    let _ = respond::send_json(session, ctx.status, body, &ctx.request_id, &ctx.headers).await;
}

/// Pingora's context for a request: its state, accounted exactly once. `logging` accounts
/// it; a request whose task is dropped before `logging` (a shutdown past the grace period
/// cuts whatever still runs) may have used a replica, and is accounted when dropped,
/// estimated from what it relayed.
pub struct Ctx(RequestCtx);

impl Drop for Ctx {
    fn drop(&mut self) {
        if !self.0.accounted {
            // Settled at the estimate the record carries, not at its worst case.
            let (settled, _) = self.0.account();
            access_log::line(&self.0, Some("cut_at_shutdown"), &settled);
        }
    }
}

impl Deref for Ctx {
    type Target = RequestCtx;
    fn deref(&self) -> &RequestCtx {
        &self.0
    }
}

impl DerefMut for Ctx {
    fn deref_mut(&mut self) -> &mut RequestCtx {
        &mut self.0
    }
}
