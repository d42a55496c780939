//! The gateway error: every stage's error folded into one type whose HTTP status, error type,
//! code (also the metric label) and message are each decided by a single `match`.

use crate::auth::AuthError;
use crate::body::BodyError;
use crate::forward::ForwardError;
use crate::route::RouteError;
use crate::translate::RequestError;

#[derive(Debug)]
pub enum GatewayError {
    Auth(AuthError),
    Body(BodyError),
    Request(RequestError),
    Route(RouteError),
    Forward(ForwardError),
    UnknownRoute { method: String, path: String },
    MethodNotAllowed { path: String, allow: &'static str },
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        use GatewayError::*;
        match self {
            Auth(_) => 401,
            Body(BodyError::TooLarge { .. }) => 413,
            Body(BodyError::BadLength) => 400,
            Body(BodyError::Read(_)) => 400,
            Request(_) => 400,
            Route(RouteError::ModelNotFound { .. }) => 404,
            Route(RouteError::ModelForbidden { .. }) => 403,
            Forward(ForwardError::NoReplica { .. }) => 503,
            Forward(ForwardError::Unreachable { .. }) => 502,
            Forward(ForwardError::Broken { .. }) => 502,
            Forward(ForwardError::Timeout { .. }) => 504,
            // Nobody reads it: the client left. Logged as nginx does.
            Forward(ForwardError::ClientGone) => 499,
            UnknownRoute { .. } => 404,
            MethodNotAllowed { .. } => 405,
        }
    }

    /// OpenAI's `error.type`.
    pub fn kind(&self) -> &'static str {
        use GatewayError::*;
        match self {
            Auth(_) => "authentication_error",
            Route(RouteError::ModelForbidden { .. }) => "permission_error",
            Forward(_) => "api_error",
            Body(_) | Request(_) | Route(_) | UnknownRoute { .. } | MethodNotAllowed { .. } => {
                "invalid_request_error"
            }
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
            Body(BodyError::Read(_)) => "body_read_error",
            Request(e) => e.code,
            Route(RouteError::ModelNotFound { .. }) => "model_not_found",
            Route(RouteError::ModelForbidden { .. }) => "model_not_allowed",
            Forward(ForwardError::NoReplica { .. }) => "no_healthy_replica",
            Forward(ForwardError::Unreachable { .. }) => "upstream_unreachable",
            Forward(ForwardError::Broken { .. }) => "upstream_error",
            Forward(ForwardError::Timeout { .. }) => "upstream_timeout",
            Forward(ForwardError::ClientGone) => "client_disconnected",
            UnknownRoute { .. } => "unknown_url",
            MethodNotAllowed { .. } => "method_not_allowed",
        }
    }

    /// OpenAI's `error.param`.
    pub fn param(&self) -> Option<&str> {
        match self {
            GatewayError::Request(e) => e.param.as_deref(),
            GatewayError::Route(_) => Some("model"),
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
            Body(BodyError::Read(detail)) => format!("The request body could not be read ({detail}). Retry the request."),
            Request(e) => e.message.clone(),
            Route(RouteError::ModelNotFound { model }) => format!(
                "The model '{model}' does not exist. GET /v1/models lists the models you can use."
            ),
            Route(RouteError::ModelForbidden { model, key_id }) => format!(
                "The API key '{key_id}' is not allowed to use the model '{model}'. Use a model listed for this key or ask the operator to add it to the key's models."
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
            UnknownRoute { method, path } => format!(
                "Unknown request URL: {method} {path}. The API serves POST /v1/chat/completions and GET /v1/models."
            ),
            MethodNotAllowed { path, allow } => format!("{path} only accepts {allow}."),
        }
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
impl From<ForwardError> for GatewayError {
    fn from(e: ForwardError) -> Self {
        GatewayError::Forward(e)
    }
}
