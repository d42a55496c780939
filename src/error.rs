//! The gateway error: every stage's error folded into one type whose HTTP status, error type,
//! code (also the metric label) and message are each decided by a single `match`.

use crate::async_queue::AsyncError;
use crate::auth::AuthError;
use crate::body::BodyError;
use crate::forward::ForwardError;
use crate::limits::{LimitError, LimitKind, Scope};
use crate::media::MediaError;
use crate::route::deployed::DeployedError;
use crate::route::RouteError;
use crate::translate::RequestError;
use crate::vocab::{echo, Problem};

#[derive(Debug)]
pub enum GatewayError {
    Auth(AuthError),
    Body(BodyError),
    Request(RequestError),
    Route(RouteError),
    Media(MediaError),
    Forward(ForwardError),
    Deployed(DeployedError),
    Async(AsyncError),
    /// A limit or budget refused the request.
    Limit {
        err: LimitError,
        key_id: String,
        model: String,
    },
    UnknownRoute {
        method: String,
        path: String,
    },
    MethodNotAllowed {
        path: String,
        allow: &'static str,
    },
    /// An HTTP/1.1 request without `Host` (RFC 9112 §3.2 requires a 400).
    MissingHost,
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        use GatewayError::*;
        match self {
            Auth(_) => 401,
            Body(BodyError::TooLarge { .. }) => 413,
            Body(BodyError::BadLength) => 400,
            Body(BodyError::TimedOut) => 408,
            Body(BodyError::TooSlow(_)) => 408,
            Body(BodyError::ClientGone) => 499,
            Body(BodyError::Read(_)) => 400,
            Request(_) => 400,
            Route(RouteError::ModelNotFound { .. }) => 404,
            Route(RouteError::ModelForbidden { .. }) => 403,
            Media(_) => 400,
            Route(RouteError::SessionTooLong { .. }) => 400,
            Forward(ForwardError::NoReplica { .. }) => 503,
            Forward(ForwardError::QueueFull { .. }) => 429,
            Forward(ForwardError::NoCapacity { .. }) => 503,
            Forward(ForwardError::Unreachable { .. }) => 502,
            Forward(ForwardError::Broken { .. }) => 502,
            Forward(ForwardError::Timeout { .. }) => 504,
            Deployed(DeployedError::Forbidden { .. }) => 403,
            Deployed(DeployedError::PredictTimeout { .. }) => 504,
            Deployed(DeployedError::WakeTimeout { .. }) => 503,
            Deployed(_) => 404,
            Async(AsyncError::BadField { .. }) => 400,
            Async(AsyncError::TooLarge { .. }) => 413,
            Async(AsyncError::CapacityExceeded { .. }) => 429,
            Async(AsyncError::NotFound { .. } | AsyncError::NoOutput { .. }) => 404,
            Async(AsyncError::Store { .. } | AsyncError::Unavailable) => 503,
            // Nobody reads it: the client left. Logged as nginx does.
            Forward(ForwardError::ClientGone) => 499,
            Limit {
                err: LimitError::Limited { .. },
                ..
            } => 429,
            Limit {
                err: LimitError::TooLarge { .. },
                ..
            } => 400,
            Limit {
                err: LimitError::Budget { .. },
                ..
            } => 402,
            Limit {
                err: LimitError::Unavailable,
                ..
            } => 503,
            UnknownRoute { .. } => 404,
            MethodNotAllowed { .. } => 405,
            MissingHost => 400,
        }
    }

    /// OpenAI's `error.type`.
    pub fn kind(&self) -> &'static str {
        use GatewayError::*;
        match self {
            Auth(_) => "authentication_error",
            Deployed(DeployedError::Forbidden { .. }) => "permission_error",
            Deployed(DeployedError::PredictTimeout { .. } | DeployedError::WakeTimeout { .. }) => {
                "api_error"
            }
            Deployed(_) => "invalid_request_error",
            Async(AsyncError::CapacityExceeded { .. }) => "rate_limit_error",
            Async(AsyncError::Store { .. } | AsyncError::Unavailable) => "api_error",
            Async(_) => "invalid_request_error",
            Route(RouteError::ModelForbidden { .. }) => "permission_error",
            Forward(ForwardError::QueueFull { .. }) => "rate_limit_error",
            Forward(_) => "api_error",
            Limit {
                err: LimitError::Limited { .. },
                ..
            } => "rate_limit_error",
            Limit {
                err: LimitError::Budget { .. },
                ..
            } => "insufficient_quota",
            Limit {
                err: LimitError::TooLarge { .. },
                ..
            } => "invalid_request_error",
            Limit {
                err: LimitError::Unavailable,
                ..
            } => "api_error",
            Body(_)
            | Request(_)
            | Route(_)
            | Media(_)
            | UnknownRoute { .. }
            | MethodNotAllowed { .. }
            | MissingHost => "invalid_request_error",
        }
    }

    /// A stable, low-cardinality code: OpenAI's `error.code` and the metric label.
    pub fn code(&self) -> &'static str {
        use GatewayError::*;
        match self {
            Auth(AuthError::Missing) => "missing_api_key",
            Auth(AuthError::Unknown) => "invalid_api_key",
            Body(BodyError::TooLarge { .. }) => "request_too_large",
            Body(BodyError::BadLength) => "invalid_content_length",
            Body(BodyError::TimedOut) => "request_timeout",
            Body(BodyError::TooSlow(_)) => "request_timeout",
            Body(BodyError::ClientGone) => "client_disconnected",
            Body(BodyError::Read(_)) => "body_read_error",
            Request(e) => e.code,
            Route(RouteError::ModelNotFound { .. }) => "model_not_found",
            Route(RouteError::ModelForbidden { .. }) => "model_not_allowed",
            Media(MediaError::Modality { .. }) => "unsupported_modality",
            Media(MediaError::Url { .. }) => "media_url_refused",
            Route(RouteError::SessionTooLong { .. }) => "invalid_session_affinity",
            Forward(ForwardError::NoReplica { .. }) => "no_healthy_replica",
            Forward(ForwardError::QueueFull { .. }) => "queue_full",
            Forward(ForwardError::NoCapacity { .. }) => "no_capacity",
            Forward(ForwardError::Unreachable { .. }) => "upstream_unreachable",
            Forward(ForwardError::Broken { .. }) => "upstream_error",
            Forward(ForwardError::Timeout { .. }) => "upstream_timeout",
            Forward(ForwardError::ClientGone) => "client_disconnected",
            Deployed(DeployedError::ModelNotFound { .. }) => "model_not_found",
            Deployed(DeployedError::EnvironmentNotFound { .. }) => "environment_not_found",
            Deployed(DeployedError::DeploymentNotFound { .. }) => "deployment_not_found",
            Deployed(DeployedError::NoDevelopment { .. }) => "deployment_not_found",
            Deployed(DeployedError::UnknownPath { .. }) => "unknown_url",
            Deployed(DeployedError::Forbidden { .. }) => "model_not_allowed",
            Deployed(DeployedError::PredictTimeout { .. }) => "upstream_timeout",
            Deployed(DeployedError::WakeTimeout { .. }) => "no_healthy_replica",
            Async(AsyncError::BadField { .. }) => "invalid_async_request",
            Async(AsyncError::TooLarge { .. }) => "request_too_large",
            Async(AsyncError::CapacityExceeded { .. }) => "CAPACITY_EXCEEDED",
            Async(AsyncError::NotFound { .. }) => "async_request_not_found",
            Async(AsyncError::NoOutput { .. }) => "async_output_not_kept",
            Async(AsyncError::Store { .. }) => "async_store_error",
            Async(AsyncError::Unavailable) => "async_unavailable",
            Limit {
                err:
                    LimitError::Limited {
                        kind: LimitKind::Requests,
                        ..
                    },
                ..
            } => "rate_limit_requests",
            Limit {
                err:
                    LimitError::Limited {
                        kind: LimitKind::Tokens,
                        ..
                    },
                ..
            } => "rate_limit_tokens",
            Limit {
                err:
                    LimitError::Limited {
                        kind: LimitKind::Concurrency,
                        ..
                    },
                ..
            } => "concurrency_limit",
            Limit {
                err:
                    LimitError::Limited {
                        kind: LimitKind::Metadata,
                        ..
                    },
                ..
            } => "rate_limit_metadata",
            Limit {
                err: LimitError::TooLarge { .. },
                ..
            } => "max_tokens_too_large",
            Limit {
                err: LimitError::Budget { .. },
                ..
            } => "budget_exceeded",
            Limit {
                err: LimitError::Unavailable,
                ..
            } => "limits_unavailable",
            UnknownRoute { .. } => "unknown_url",
            MethodNotAllowed { .. } => "method_not_allowed",
            MissingHost => "missing_host",
        }
    }

    /// OpenAI's `error.param`.
    pub fn param(&self) -> Option<&str> {
        match self {
            GatewayError::Request(e) => e.param.as_deref(),
            GatewayError::Route(RouteError::SessionTooLong { .. }) => None,
            GatewayError::Route(_) => Some("model"),
            GatewayError::Media(MediaError::Modality { at, .. } | MediaError::Url { at, .. }) => {
                Some(at)
            }
            GatewayError::Limit {
                err: LimitError::TooLarge { .. },
                ..
            } => Some("max_tokens"),
            _ => None,
        }
    }

    /// What went wrong and how to fix it. Never contains a secret.
    pub fn message(&self) -> String {
        use GatewayError::*;
        match self {
            Auth(AuthError::Missing) => "No API key provided. Send it as 'Authorization: Bearer YOUR_KEY' or 'x-api-key: YOUR_KEY'.".into(),
            Auth(AuthError::Unknown) => "Invalid API key. Check the key you sent; an operator can issue one with `tollgate key new`.".into(),
            Body(BodyError::TooLarge { limit }) => format!(
                "Request body is larger than the limit of {limit} bytes. Send a smaller request (fewer or smaller messages or images)."
            ),
            Body(BodyError::BadLength) => "The Content-Length header is not a number. Send a valid Content-Length or use chunked encoding.".into(),
            Body(BodyError::TimedOut) => "The request body stopped arriving before it was complete. Retry the request.".into(),
            Body(BodyError::TooSlow(pace)) => format!(
                "The request body arrived too slowly. A body may take {} ms, plus 1 s for every {} bytes it has sent. Send the body without pauses (a client library sends it at once), over a faster link, or make it smaller.",
                pace.grace.as_millis(),
                pace.min_rate
            ),
            Body(BodyError::ClientGone) => "The client disconnected before the request body was complete.".into(),
            Body(BodyError::Read(detail)) => format!("The request body is malformed ({}). Check its framing (Content-Length or chunked encoding).", echo(detail)),
            Request(e) => e.message.clone(),
            // Names and paths come from the client: repeated only in part (`echo`).
            Route(RouteError::ModelNotFound { model }) => format!(
                "The model '{}' does not exist. GET /v1/models lists the models you can use.",
                echo(model)
            ),
            Route(RouteError::ModelForbidden { model, key_id }) => format!(
                "The API key '{key_id}' is not allowed to use the model '{}'. Use a model listed for this key or ask the operator to add it to the key's models.",
                echo(model)
            ),
            Media(MediaError::Modality { at, part_type, modality, model, accepted }) => format!(
                "{at} is a{} {part_type} part ({modality} input), but the model '{}' takes only {}. Leave the part out, or use a model whose input_modalities in GET /v1/models include \"{modality}\".",
                if part_type.starts_with(['a', 'e', 'i', 'o', 'u']) { "n" } else { "" },
                echo(model),
                accepted.join(", ")
            ),
            Media(MediaError::Url { at, part_type, reason }) => format!(
                "The URL of the {part_type} part at {at} is refused: {reason}. The model's replicas fetch media URLs themselves, so the operator limits which ones they are sent (media_urls); send the data inline instead, as a base64 data: URL or source."
            ),
            Route(RouteError::SessionTooLong { len }) => format!(
                "The x-session-affinity header is {len} bytes long; at most {} are accepted. Send a shorter session id, such as a UUID or a hash of yours.",
                crate::route::MAX_SESSION_ID
            ),
            Forward(ForwardError::NoReplica { pool }) => format!(
                "No replica of pool '{pool}' is available to serve this model right now. Retry later."
            ),
            Forward(ForwardError::Unreachable { attempts }) => format!(
                "Could not connect to a replica for this model ({attempts} attempt(s) failed). Retry later."
            ),
            Forward(ForwardError::Broken { detail }) => format!(
                "The replica broke off the exchange ({detail}). Retry the request."
            ),
            Forward(ForwardError::Timeout { phase }) => format!(
                "The replica did not answer in time ({phase}). Retry, or send a smaller request."
            ),
            Forward(ForwardError::ClientGone) => "The client disconnected before the response was complete.".into(),
            Forward(ForwardError::QueueFull { pool, max_waiting }) => format!(
                "Every replica of pool '{pool}' is busy and {max_waiting} request(s) are already waiting for one. Retry after the time in the retry-after header, or send fewer requests at once."
            ),
            Forward(ForwardError::NoCapacity { pool, waited_ms }) => format!(
                "No replica of pool '{pool}' had room for this request within {waited_ms} ms of waiting (all busy or unhealthy). Retry after the time in the retry-after header."
            ),
            Deployed(e) => deployed_message(e),
            Async(e) => async_message(e),
            Limit { err, key_id, model } => limit_message(err, key_id, model),
            UnknownRoute { method, path } => format!(
                "Unknown request URL: {} {}. The API serves POST /v1/chat/completions, POST /v1/messages, POST /v1/messages/count_tokens and GET /v1/models.",
                echo(method),
                echo(path)
            ),
            MethodNotAllowed { path, allow } => format!("{} only accepts {allow}.", echo(path)),
            MissingHost => "An HTTP/1.1 request must carry a Host header (RFC 9112, section 3.2). Send 'Host: <the host and port you connect to>', as HTTP clients do, or use HTTP/1.0.".into(),
        }
    }
}

impl GatewayError {
    /// The error as the client reads it, in any dialect.
    pub fn problem(&self) -> Problem {
        Problem {
            status: self.status(),
            kind: self.kind(),
            code: self.code(),
            param: self.param().map(str::to_string),
            message: self.message(),
        }
    }

    /// How a failure of the exchange reads to the client: what the forward stage puts in the
    /// event that ends a stream the replica broke off.
    pub fn of_forward(e: &ForwardError) -> Problem {
        GatewayError::Forward(e.clone()).problem()
    }
}

/// Seconds to wait before retrying, for `retry-after`.
impl GatewayError {
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            GatewayError::Limit {
                err: LimitError::Limited { retry_after, .. },
                ..
            } => Some((*retry_after).max(1)),
            GatewayError::Limit {
                err: LimitError::Budget { retry_after, .. },
                ..
            } => *retry_after,
            GatewayError::Limit {
                err: LimitError::Unavailable,
                ..
            } => Some(1),
            GatewayError::Forward(ForwardError::NoReplica { .. }) => Some(1),
            GatewayError::Forward(ForwardError::QueueFull { .. }) => Some(1),
            GatewayError::Forward(ForwardError::NoCapacity { .. }) => Some(1),
            GatewayError::Async(AsyncError::CapacityExceeded { .. }) => Some(1),
            _ => None,
        }
    }
}

fn deployed_message(e: &DeployedError) -> String {
    match e {
        DeployedError::ModelNotFound { model } => format!(
            "The model '{}' does not exist. Check the model id in the URL (model-{{id}}.… or /model/{{id}}/…).",
            echo(model)
        ),
        DeployedError::EnvironmentNotFound { model, environment } => format!(
            "The model '{model}' has no environment '{}'. Call /production/predict, or an environment the model has.",
            echo(environment)
        ),
        DeployedError::DeploymentNotFound { model, deployment } => format!(
            "The model '{model}' has no deployment '{}'. Check the deployment id, or call /production/predict.",
            echo(deployment)
        ),
        DeployedError::NoDevelopment { model } => format!(
            "The model '{model}' has no development deployment. Call /production/predict, or /deployment/{{id}}/predict."
        ),
        DeployedError::UnknownPath { model, path } => format!(
            "Unknown request URL for model '{model}': {}. The model serves POST /production/predict, /environments/{{env}}/predict, /development/predict, /deployment/{{id}}/predict, any method on /{{target}}/sync/{{route}}, and POST /{{target}}/wake or /wake.",
            echo(path)
        ),
        DeployedError::Forbidden { model, key_id } => format!(
            "The API key '{key_id}' is not allowed to call this target of the model '{model}'. Use a target the key may call, or ask the operator to add it to the key's deployed_models."
        ),
        DeployedError::PredictTimeout { secs } => format!(
            "The model did not answer within {secs} s, the limit of a sync predict: use async_predict for work longer than {secs} s."
        ),
        DeployedError::WakeTimeout { deployment, secs } => format!(
            "No replica of deployment '{deployment}' became ready within {secs} s of waking it. Retry later."
        ),
    }
}

fn limit_message(err: &LimitError, key_id: &str, model: &str) -> String {
    let whose = |scope: Scope| match scope {
        Scope::Key => format!("API key '{key_id}'"),
        Scope::Model => format!("model '{model}' (shared by all keys)"),
    };
    match err {
        LimitError::Limited { kind: LimitKind::Requests, scope, limit, retry_after } => format!(
            "Rate limit reached for {}: {limit} requests per minute. Retry after {retry_after} s.",
            whose(*scope)
        ),
        LimitError::Limited { kind: LimitKind::Tokens, scope, limit, retry_after } => format!(
            "Rate limit reached for {}: {limit} tokens per minute (prompt plus max_tokens are reserved). Retry after {retry_after} s, or lower max_tokens.",
            whose(*scope)
        ),
        LimitError::Limited { kind: LimitKind::Concurrency, scope, limit, .. } => format!(
            "Concurrency limit reached for {}: {limit} requests at once. Retry when one of your requests has finished.",
            whose(*scope)
        ),
        LimitError::Limited { kind: LimitKind::Metadata, scope, limit, retry_after } => format!(
            "Rate limit reached for {}: {limit} requests per minute to POST /v1/messages/count_tokens and GET /v1/models together (apart from its chat requests). Retry after {retry_after} s, and keep the model list rather than fetching it for every request.",
            whose(*scope)
        ),
        LimitError::TooLarge { scope, limit, need } => format!(
            "This request may use up to {need} tokens (prompt plus max_tokens), more than the limit of {limit} tokens per minute for {}. Lower max_tokens (or max_completion_tokens) so the total fits.",
            whose(*scope)
        ),
        LimitError::Budget { budget_nanos, spent_nanos, worst_nanos, .. } => format!(
            "The budget of ${:.2} for API key '{key_id}' would be exceeded: ${:.6} is spent or reserved and this request may cost up to ${:.6}. Lower max_tokens, or wait for the next budget period.",
            *budget_nanos as f64 / 1e9,
            *spent_nanos as f64 / 1e9,
            *worst_nanos as f64 / 1e9
        ),
        LimitError::Unavailable => "The limits shared by this gateway's nodes cannot be checked right now (their store does not answer), so the request was not admitted. Retry in a second; if it persists, the operator should check the cluster's Redis.".to_string(),
    }
}

impl From<AuthError> for GatewayError {
    fn from(e: AuthError) -> Self {
        GatewayError::Auth(e)
    }
}
impl From<BodyError> for GatewayError {
    fn from(e: BodyError) -> Self {
        GatewayError::Body(e)
    }
}
impl From<RequestError> for GatewayError {
    fn from(e: RequestError) -> Self {
        GatewayError::Request(e)
    }
}
impl From<RouteError> for GatewayError {
    fn from(e: RouteError) -> Self {
        GatewayError::Route(e)
    }
}
impl From<MediaError> for GatewayError {
    fn from(e: MediaError) -> Self {
        GatewayError::Media(e)
    }
}
impl From<DeployedError> for GatewayError {
    fn from(e: DeployedError) -> Self {
        GatewayError::Deployed(e)
    }
}
impl From<ForwardError> for GatewayError {
    fn from(e: ForwardError) -> Self {
        GatewayError::Forward(e)
    }
}

fn async_message(e: &AsyncError) -> String {
    match e {
        AsyncError::BadField { message } => format!("{message}. See the async_predict body: model_input, webhook_endpoint, priority (0-2), max_time_in_queue_seconds (10-259200), inference_retry_config."),
        AsyncError::TooLarge { size, limit } => format!(
            "payload size of {size} bytes exceeds maximum size of {limit} bytes. Send a smaller model_input, or pass large inputs by URL."
        ),
        AsyncError::CapacityExceeded { deployment, max } => format!(
            "CAPACITY_EXCEEDED: deployment '{}' already queues {max} async requests, the most it takes. Retry later, or wait for queued requests to finish.",
            echo(deployment)
        ),
        AsyncError::NotFound { id } => format!(
            "No async request '{}' exists for this API key (finished requests are kept for the retention window).",
            echo(id)
        ),
        AsyncError::NoOutput { id, reason } => format!("The output of async request '{}' is not available: {reason}.", echo(id)),
        AsyncError::Store { detail } => format!("The async queue could not record the request ({detail}). Retry shortly."),
        AsyncError::Unavailable => "Async predict is not available on this gateway: its queue database could not be opened at start. An operator must check state.dir.".into(),
    }
}
impl From<AsyncError> for GatewayError {
    fn from(e: AsyncError) -> Self {
        GatewayError::Async(e)
    }
}
