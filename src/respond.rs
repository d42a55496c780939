//! Responses tollgate writes itself: errors in the client's dialect and direct JSON answers.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::StatusCode;
use pingora::proxy::Session;
use pingora::{Error, ErrorType};

use crate::error::GatewayError;
use crate::translate::problem;
use crate::vocab::{self, Dialect};

/// The body of `err` in the client's dialect.
pub fn error_body(dialect: Dialect, err: &GatewayError) -> Bytes {
    problem::body(dialect, &err.problem())
}

/// Writes a complete JSON response with an exact Content-Length.
pub async fn send_json(
    session: &mut Session,
    status: u16,
    body: Bytes,
    request_id: &str,
    extra: &[(HeaderName, HeaderValue)],
) -> pingora::Result<()> {
    let status = StatusCode::from_u16(status)
        .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "invalid status"))?;
    let mut fields = HeaderMap::with_capacity(2 + extra.len() + vocab::ID_FIELDS);
    fields.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    fields.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    vocab::add_own_fields(&mut fields, request_id, extra)?;
    session
        .write_response_header(Box::new(vocab::client_header(status, fields)), false)
        .await?;
    session.write_response_body(Some(body), true).await
}
