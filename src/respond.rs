//! Responses tollgate writes itself: errors in the client's dialect and direct JSON answers.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::StatusCode;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorType};
use serde_json::json;

use crate::error::GatewayError;

/// The error shape a client understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `{"error": {"message", "type", "param", "code"}}`
    OpenAi,
    /// `{"type": "error", "error": {"type", "message"}}`
    Anthropic,
}

pub fn error_body(dialect: Dialect, err: &GatewayError) -> Bytes {
    let value = match dialect {
        Dialect::OpenAi => json!({
            "error": {
                "message": err.message(),
                "type": err.kind(),
                "param": err.param(),
                "code": err.code(),
            }
        }),
        Dialect::Anthropic => json!({
            "type": "error",
            "error": { "type": err.anthropic_type(), "message": err.message() },
        }),
    };
    Bytes::from(value.to_string())
}

/// A response header for the client from its status and fields. It keeps no record of how
/// each name was spelt (Pingora's case map): HTTP field names are case-insensitive, and
/// without the map a field is one insert into an `http::HeaderMap`, with no re-parsing or
/// copying of its name. Standard names still go out in their usual title case.
pub fn client_header(status: StatusCode, fields: HeaderMap) -> ResponseHeader {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.headers = fields;
    ResponseHeader::from(parts)
}

/// tollgate's own fields, last on every response it answers: rate-limit headers and notices
/// (`extra`), and the request id under the names the OpenAI (`x-request-id`) and Anthropic
/// (`request-id`) SDKs read. Each replaces a field of the same name.
pub fn add_own_fields(
    fields: &mut HeaderMap,
    request_id: &str,
    extra: &[(&'static str, String)],
) -> pingora::Result<()> {
    for (name, value) in extra {
        fields.insert(HeaderName::from_static(name), field_value(value)?);
    }
    let id = field_value(request_id)?;
    fields.insert(HeaderName::from_static("x-request-id"), id.clone());
    fields.insert(HeaderName::from_static("request-id"), id);
    Ok(())
}

fn field_value(value: &str) -> pingora::Result<HeaderValue> {
    HeaderValue::from_str(value).map_err(|_| {
        Error::explain(
            ErrorType::InvalidHTTPHeader,
            "a response field value is not valid in a header",
        )
    })
}

/// Writes a complete JSON response with an exact Content-Length.
pub async fn send_json(
    session: &mut Session,
    status: u16,
    body: Bytes,
    request_id: &str,
    extra: &[(&'static str, String)],
) -> pingora::Result<()> {
    let status = StatusCode::from_u16(status)
        .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "invalid status"))?;
    let mut fields = HeaderMap::with_capacity(4 + extra.len());
    fields.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    fields.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    add_own_fields(&mut fields, request_id, extra)?;
    session
        .write_response_header(Box::new(client_header(status, fields)), false)
        .await?;
    session.write_response_body(Some(body), true).await
}

/// A server-sent event that ends an OpenAI stream whose replica failed after the status was
/// sent. The OpenAI SDKs raise an `APIError` when an event carries an `error` object.
pub fn stream_error_event(dialect: Dialect, err: &GatewayError) -> Bytes {
    let mut out = match dialect {
        Dialect::OpenAi => b"data: ".to_vec(),
        Dialect::Anthropic => b"event: error\ndata: ".to_vec(),
    };
    out.extend_from_slice(&error_body(dialect, err));
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}
