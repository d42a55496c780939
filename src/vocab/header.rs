//! The response header tollgate sends a client, whoever built its fields: the relay (a
//! replica's answer) or tollgate itself (errors, the catalog).

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use pingora::http::ResponseHeader;
use pingora::{Error, ErrorType};

/// tollgate's own fields for a response (rate-limit headers, notices), built once by the
/// stage that knows them. Names and values are ready to insert: a header map clones them
/// without checking or copying a byte again.
pub type OwnFields = Vec<(HeaderName, HeaderValue)>;

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

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");

/// How many fields `add_own_fields` adds beyond its `extra`: the request id, twice.
pub const ID_FIELDS: usize = 2;

/// tollgate's own fields, last on every response it answers: rate-limit headers and notices
/// (`extra`), and the request id under the names the OpenAI (`x-request-id`) and Anthropic
/// (`request-id`) SDKs read. Each replaces a field of the same name.
pub fn add_own_fields(
    fields: &mut HeaderMap,
    request_id: &str,
    extra: &[(HeaderName, HeaderValue)],
) -> pingora::Result<()> {
    for (name, value) in extra {
        fields.insert(name.clone(), value.clone());
    }
    let id = HeaderValue::from_str(request_id).map_err(|_| {
        Error::explain(
            ErrorType::InvalidHTTPHeader,
            "a response field value is not valid in a header",
        )
    })?;
    fields.insert(X_REQUEST_ID, id.clone());
    fields.insert(REQUEST_ID, id);
    Ok(())
}
