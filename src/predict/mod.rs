//! The deployed-model surface: predict, `sync/…` pass-through and wake, each stage one line.
//!
//! ```text
//! identify ─▶ model ─▶ action ─▶ target ─▶ pass (replica of the deployment's pool)
//!  (key)      (host or   (method)   (environment, development,
//!              /model/)              deployment; key's grant)
//! ```
//!
//! Nothing of the body is read here: the forward stage passes it to the replica as it
//! arrives (`forward::pass`), so memory does not grow with what a client uploads. Errors are
//! `{"error": "message"}` (`Dialect::Predict`); a replica's own answer passes unchanged.

mod asynchronous;

use std::sync::Arc;

use pingora::proxy::Session;
use tokio::time::Instant;

use crate::account::DeployedCall;
use crate::async_queue::AsyncQueue;
use crate::config::{DeployedModel, Key, Policy};
use crate::ctx::RequestCtx;
use crate::error::GatewayError;
use crate::forward::{forwarded_fields, ForwardError, Pass, PassError, Relayed, Upstream};
use crate::route::deployed::{self, Action, Call, DeployedError};
use crate::route::Placement;
use crate::runtime::Runtime;
use crate::translate::prefix;
use crate::wake::Waker;
use crate::{auth, limits, respond, route};

/// The deployed model a request names by its host or path, if any.
pub fn addressed(req: &http::request::Parts) -> Option<Call<'_>> {
    deployed::address(host_of(req), req.uri.path())
}

fn host_of(req: &http::request::Parts) -> Option<&str> {
    req.headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri.host())
}

/// Serves a request for a deployed model.
pub async fn serve(
    upstream: &Upstream,
    waker: &Waker,
    queue: Option<&AsyncQueue>,
    session: &mut Session,
    ctx: &mut RequestCtx,
    runtime: &Runtime,
) -> Result<Relayed, GatewayError> {
    let snapshot = &runtime.config;
    let key = auth::identify(snapshot, &session.req_header().headers)?;
    ctx.key = Some(key.clone());
    let req = session.req_header();
    let Some(call) = addressed(req) else {
        return Err(GatewayError::UnknownRoute {
            method: req.method.to_string(),
            path: req.uri.path().to_string(),
        });
    };
    let model = deployed::model(snapshot, &call)?.clone();
    let Some(action) = call.action else {
        return Err(DeployedError::UnknownPath {
            model: model.id.to_string(),
            path: req.uri.path().to_string(),
        }
        .into());
    };
    let method = req.method.as_str();
    if let Some(allow) = action
        .method()
        .filter(|m| !m.split(", ").any(|m| m == method))
    {
        return Err(GatewayError::MethodNotAllowed {
            path: req.uri.path().to_string(),
            allow,
        });
    }
    if let Action::AsyncPredict
    | Action::AsyncQueueStatus
    | Action::AsyncRequest(_)
    | Action::AsyncOutput(_) = action
    {
        // Owned: the call borrows the request head, which the async route reads on.
        let host = host_of(req).map(str::to_string);
        let path = req.uri.path().to_string();
        let Some((target, Some(action))) =
            deployed::address(host.as_deref(), &path).map(|c| (c.target, c.action))
        else {
            unreachable!("the same head addressed this model above");
        };
        let at = (&*key, &model);
        return asynchronous::serve(queue, session, ctx, runtime, at, (target, action)).await;
    }
    let resolved = deployed::resolve(&model, &key, call.target)?;
    let deployment = &model.deployments[resolved.deployment];
    ctx.deployed = Some(DeployedCall {
        model: model.clone(),
        deployment: deployment.id.clone(),
        environment: resolved.environment.as_deref().map(Into::into),
    });
    let path = match action {
        Action::Predict => model.predict_path.as_str(),
        Action::Sync(route) => route,
        Action::Wake => {
            waker.wake(&model, &deployment.id);
            ctx.status = 202;
            let body = bytes::Bytes::from_static(b"{}");
            let _ = respond::send_json(session, 202, body, &ctx.request_id, &ctx.headers).await;
            return Ok(Relayed::Complete);
        }
        _ => unreachable!("async actions are served above"),
    };
    admit(ctx, runtime, &key, &model).await?;
    let req = session.req_header();
    let target = match req.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let method = req.method.as_str().to_string();
    let client = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip());
    let fields = forwarded_fields(&req.headers, client);
    let pool = &snapshot.pools[deployment.pool];
    let placement = place(pool.fleet.policy, &req.headers)?;
    let route = runtime.router.pool(deployment.pool);
    // No replica healthy: the deployment is scaled to zero or starting. The request waits
    // for one up to wake_ms, and the wake action runs (once per cooldown).
    let parked = route.eligible() == 0;
    let (patience, budget) = if parked {
        waker.wake(&model, &deployment.id);
        (
            model.wake_timeout,
            model.wake_timeout + model.predict_timeout,
        )
    } else {
        (pool.fleet.queue.timeout, model.predict_timeout)
    };
    let pass = Pass {
        pool,
        route,
        patience,
        placement,
        method: &method,
        target: &target,
        fields: &fields,
        request_id: &ctx.request_id,
        started: ctx.started,
        deadline: Instant::now() + budget,
        max_body: snapshot.server.max_body_bytes,
        pace: snapshot.server.body_pace,
        own_fields: &ctx.headers,
        ticket: ctx.ticket.as_mut(),
    };
    let relayed = upstream.pass(session, pass, &mut ctx.outcome).await;
    ctx.status = ctx.outcome.status;
    match relayed {
        Ok(relayed) => {
            ctx.body_read = true;
            ctx.error = match &ctx.outcome.broke_off {
                Some(e) => Some(GatewayError::of_forward(e).code),
                None if ctx.outcome.upstream_status >= 400 => Some("upstream_status"),
                None => None,
            };
            Ok(relayed)
        }
        Err(PassError::Body(e)) => Err(e.into()),
        Err(PassError::Forward(ForwardError::Timeout { .. })) => Err(timeout(&model)),
        Err(PassError::Forward(ForwardError::NoCapacity { .. })) if parked => {
            Err(DeployedError::WakeTimeout {
                deployment: deployment.id.to_string(),
                secs: model.wake_timeout.as_secs().max(1),
            }
            .into())
        }
        Err(PassError::Forward(e)) => Err(e.into()),
    }
}

/// Stage "admit": the key's rpm and max_concurrent, and the call's price against its
/// budget, reserved until it ends.
async fn admit(
    ctx: &mut RequestCtx,
    runtime: &Runtime,
    key: &Key,
    model: &DeployedModel,
) -> Result<(), GatewayError> {
    let admitted =
        limits::admit_call_shared(&runtime.limits, key, model.price_nanos, ctx.started_ms()).await;
    match admitted {
        Ok(admission) => {
            ctx.ticket = admission.ticket;
            ctx.headers = admission.headers;
            Ok(())
        }
        Err(refusal) => {
            ctx.headers = refusal.headers;
            Err(GatewayError::Limit {
                err: refusal.err,
                key_id: key.id.to_string(),
                model: model.id.to_string(),
            })
        }
    }
}

fn timeout(model: &Arc<DeployedModel>) -> GatewayError {
    DeployedError::PredictTimeout {
        secs: model.predict_timeout.as_secs().max(1),
    }
    .into()
}

/// Where the `affinity` policy places the request: by its `x-session-affinity` id.
fn place(policy: Policy, headers: &http::HeaderMap) -> Result<Placement, GatewayError> {
    let session = route::session_id(headers)?;
    Ok(match (policy, session) {
        (Policy::Affinity, Some(id)) => Placement {
            hash: Some(prefix::session_hash(id.as_bytes())),
        },
        _ => Placement::default(),
    })
}
