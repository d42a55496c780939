//! HTTP/1.1 on one upstream connection. The request is complete in memory, so its head and
//! body leave in a single write; the response head is parsed with `httparse` and its body
//! de-framed (Content-Length, chunked, or until close) chunk by chunk as it arrives, without
//! copying. The connection is a Pingora stream, opened by its transport connector and kept
//! between requests in the replica's idle pool (`pool.rs`).
//!
//! Every read is cancel-safe: a caller may race it against the client's departure or a
//! timeout and drop it; bytes already received stay in the buffer.
//!
//! # Framing rules (RFC 9112 §6, §7; RFC 9110 §8.6)
//!
//! Refused, as an [`H1Error`] (the caller then drops the connection):
//! - a head (1xx heads included, each on its own) over 64 KiB or with over 128 fields, however
//!   its bytes arrive; anything httparse refuses in a head: a malformed status line, obs-fold
//!   (a line starting with SP or HTAB), whitespace before a field's colon, a control
//!   character other than HTAB in a field value (NUL and a bare CR included);
//! - a status under 100, and 101 (tollgate never asks for an upgrade);
//! - a Content-Length that is not `1*DIGIT` within 64 bits (no sign, no inner space, not
//!   empty), or values that differ, whether in several field lines or in one list;
//! - a chunk-size line that is not `1*HEXDIG [BWS ";" chunk-ext] CRLF`: a size that does not
//!   fit 64 bits, whitespace not followed by `;`, a control character other than HTAB in an
//!   extension, a bare LF, or more than 1 KiB with its CRLF;
//! - chunk data not followed by CRLF; a trailer section that is malformed (checked as a
//!   head's fields), over 64 KiB or over 128 fields;
//! - the connection closing before the head ends, or before a Content-Length or chunked body
//!   ends.
//!
//! Accepted, and how:
//! - the same Content-Length repeated (field lines, or a list like `42, 42`) is one length,
//!   and the head keeps one field with it (RFC 9110 §8.6 allows this or a refusal);
//! - Transfer-Encoding: the codings of all its field lines form one list, empty elements
//!   ignored. `chunked` last frames the body as chunked; any other last coding, or none, means
//!   the body runs until the replica closes (§6.3 rule 4). With Transfer-Encoding present,
//!   Content-Length is ignored (still refused if invalid) and removed from the head;
//! - a bare LF ends a line of the head or of the trailer section (§2.2 allows it there), never
//!   a chunk-size line nor chunk data;
//! - 1xx responses other than 101 are skipped with their fields; 204 and 304 have no body
//!   whatever their fields say; trailer fields are dropped. The request's method is not known
//!   here: tollgate only sends POST, so a response is never one to HEAD.
//!
//! Not reused ([`Conn::reusable`] is false, so the connection is closed after the response):
//! until a response has been read to its end without error; after an HTTP/1.0 response, a
//! `Connection: close`, a body delimited by the close, or both Transfer-Encoding and
//! Content-Length (§6.3 rule 3); when bytes past the end of the response were received.

use std::future::Future;
use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use pingora::protocols::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A response head (or trailer section) larger than this is refused rather than buffered
/// without end.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// The longest chunk-size line taken, with its extensions and CRLF.
const MAX_CHUNK_LINE: usize = 1024;
const READ_CHUNK: usize = 16 * 1024;

/// The replica's response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

/// What went wrong on the connection; the text names it for logs and error details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H1Error(pub &'static str);

enum Parsed {
    Head(Head),
    /// A 1xx response was skipped; the real one follows.
    Informational,
    /// More bytes are needed.
    Partial,
}

/// How the rest of the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Bytes left of a Content-Length body.
    Length(u64),
    Chunked(Chunk),
    /// Until the replica closes the connection.
    Close,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Bytes left of the current chunk's data.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: optional trailer fields, then an empty line.
    Trailer,
}

/// One upstream connection; `S` is a Pingora stream except in unit tests.
pub struct Conn<S = Stream> {
    stream: S,
    buf: BytesMut,
    framing: Framing,
    keep_alive: bool,
    max_head: usize,
    /// Some byte of a response arrived on this connection.
    heard: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(stream: S) -> Self {
        Conn {
            stream,
            buf: BytesMut::new(),
            framing: Framing::Done,
            keep_alive: false,
            max_head: MAX_HEAD,
            heard: false,
        }
    }

    /// The same connection with another cap on the size of a response head and of a trailer
    /// section (64 KiB by default); lets tests and fuzzing reach the cap with small inputs.
    pub fn with_max_head(mut self, max: usize) -> Self {
        self.max_head = max;
        self
    }

    /// Writes the request: `head` (request line and header fields, ending in an empty line)
    /// and `body`, gathered into one write on streams that take vectored writes.
    pub async fn send(&mut self, head: &[u8], body: &[u8]) -> std::io::Result<()> {
        self.stream
            .write_all_buf(&mut Buf::chain(head, body))
            .await?;
        self.stream.flush().await
    }

    /// Reads up to the end of the response head; informational (1xx) responses are skipped.
    pub async fn read_head(&mut self) -> Result<Head, H1Error> {
        // Not reusable until this response has ended cleanly.
        self.keep_alive = false;
        loop {
            // Nothing received yet (the usual case, right after the request) is not parsed.
            if !self.buf.is_empty() {
                match self.parse_head()? {
                    Parsed::Head(head) => return Ok(head),
                    Parsed::Informational => continue,
                    Parsed::Partial => {}
                }
            }
            if self.fill().await? == 0 {
                return Err(H1Error("connection closed before the response header"));
            }
        }
    }

    /// Parses a complete head out of the buffer, if one is there.
    fn parse_head(&mut self) -> Result<Parsed, H1Error> {
        // Left uninitialised for httparse to fill: writing 128 empty fields first cost more
        // than parsing a typical head.
        let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        // Only the first `max_head` bytes are looked at, so whether a head is refused as too
        // large, or for what it holds, does not depend on how its bytes arrived.
        let window = &self.buf[..self.buf.len().min(self.max_head)];
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            window,
            &mut fields,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if window.len() == self.max_head => {
                return Err(H1Error("response header too large"))
            }
            Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(H1Error("too many response header fields"))
            }
            Err(_) => return Err(H1Error("malformed response header")),
        };
        let code = response.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| H1Error("invalid status code"))?;
        if status.is_informational() {
            if code == 101 {
                return Err(H1Error("unexpected protocol switch"));
            }
            self.buf.advance(len);
            return Ok(Parsed::Informational);
        }
        let mut headers = HeaderMap::with_capacity(response.headers.len());
        let mut chunked = false;
        let mut coded = false;
        let mut length: Option<u64> = None;
        let mut lengths = 0;
        let mut close = response.version != Some(1);
        for field in response.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| H1Error("invalid response header name"))?;
            let value = HeaderValue::from_bytes(field.value)
                .map_err(|_| H1Error("invalid response header value"))?;
            if name == http::header::TRANSFER_ENCODING {
                coded = true;
                // The field lines make one list; its last coding frames the message (RFC
                // 9112 §6.3), and a line of empty elements leaves it as it was.
                if let Some(last) = list(field.value).last() {
                    chunked = last.eq_ignore_ascii_case(b"chunked");
                }
            } else if name == http::header::CONTENT_LENGTH {
                for item in list_with_empty(field.value) {
                    let n = decimal(item).ok_or(H1Error("invalid content-length"))?;
                    if length.is_some_and(|m| m != n) {
                        return Err(H1Error("conflicting content-length"));
                    }
                    length = Some(n);
                    lengths += 1;
                }
            } else if name == http::header::CONNECTION {
                close |= list(field.value).any(|t| t.eq_ignore_ascii_case(b"close"));
            }
            headers.append(name, value);
        }
        if coded && length.is_some() {
            // Both framings given (RFC 9112 §6.1): Transfer-Encoding wins, the length is wrong
            // for what is passed on, and the connection is not trusted for another message.
            headers.remove(http::header::CONTENT_LENGTH);
            close = true;
        } else if let Some(n) = length.filter(|_| lengths > 1) {
            // The same length repeated: one field with it (RFC 9110 §8.6).
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        self.buf.advance(len);
        self.framing = if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            Framing::Done
        } else if coded {
            if chunked {
                Framing::Chunked(Chunk::Size)
            } else {
                Framing::Close
            }
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            Framing::Close
        };
        self.keep_alive = !close && self.framing != Framing::Close;
        Ok(Parsed::Head(Head { status, headers }))
    }

    /// The next piece of the body as it arrives, `None` once it is complete.
    pub async fn read_body(&mut self) -> Result<Option<Bytes>, H1Error> {
        loop {
            if let Some(step) = self.decode()? {
                return Ok(step.map(|n| self.buf.split_to(n).freeze()));
            }
            if self.fill().await? == 0 {
                if self.framing == Framing::Close {
                    self.framing = Framing::Done;
                    return Ok(None);
                }
                return Err(H1Error("connection closed before the response body ended"));
            }
        }
    }

    /// A piece of the body that is already read, without waiting for the network: `None`
    /// when the next step needs a read, or is the end of the body or a failure, which the
    /// next `read_body` reports (decoding them again changes nothing).
    pub fn buffered_body(&mut self) -> Option<Bytes> {
        match self.decode() {
            Ok(Some(Some(n))) => Some(self.buf.split_to(n).freeze()),
            _ => None,
        }
    }

    /// Hands `each` every piece of the body already read, in order, as `buffered_body` would
    /// return them, but borrowed where they lie: a stream whose events came together makes
    /// no `Bytes` (and no reference count) per event. Stops at the first error of `each`.
    pub fn each_buffered<E>(
        &mut self,
        mut each: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        while let Ok(Some(Some(n))) = self.decode() {
            let fed = each(&self.buf[..n]);
            self.buf.advance(n);
            fed?;
        }
        Ok(())
    }

    /// Bytes received and not yet taken: no more than this is left of the body already read.
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// Decodes what the buffer holds of the body: `Some(Some(n))` when its first `n` bytes
    /// are body data (for the caller to take), `Some(None)` at the end, or `None` when more
    /// bytes must be read first.
    fn decode(&mut self) -> Result<Option<Option<usize>>, H1Error> {
        loop {
            match self.framing {
                Framing::Done => return Ok(Some(None)),
                Framing::Length(0) => {
                    self.framing = Framing::Done;
                    return Ok(Some(None));
                }
                Framing::Length(left) => {
                    let Some(n) = self.available(left) else {
                        return Ok(None);
                    };
                    self.framing = Framing::Length(left - n as u64);
                    return Ok(Some(Some(n)));
                }
                Framing::Close => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Some(self.buf.len())));
                }
                Framing::Chunked(Chunk::Size) => match chunk_size(&self.buf)? {
                    Some((used, 0)) => {
                        self.buf.advance(used);
                        self.framing = Framing::Chunked(Chunk::Trailer);
                    }
                    Some((used, size)) => {
                        self.buf.advance(used);
                        self.framing = Framing::Chunked(Chunk::Data(size));
                    }
                    None => return Ok(None),
                },
                Framing::Chunked(Chunk::Data(0)) => {
                    self.framing = Framing::Chunked(Chunk::DataEnd);
                }
                Framing::Chunked(Chunk::Data(left)) => {
                    let Some(n) = self.available(left) else {
                        return Ok(None);
                    };
                    self.framing = Framing::Chunked(Chunk::Data(left - n as u64));
                    return Ok(Some(Some(n)));
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if !b"\r\n".starts_with(&self.buf[..self.buf.len().min(2)]) {
                        return Err(H1Error("malformed chunk end"));
                    }
                    if self.buf.len() < 2 {
                        return Ok(None);
                    }
                    self.buf.advance(2);
                    self.framing = Framing::Chunked(Chunk::Size);
                }
                Framing::Chunked(Chunk::Trailer) => {
                    // Trailer fields are checked as a head's are, then dropped: they are not
                    // relayed. As for a head, only the first `max_head` bytes are looked at.
                    let window = &self.buf[..self.buf.len().min(self.max_head)];
                    // Nearly every trailer section is empty: room for a few fields first,
                    // all of them only when there are more.
                    let mut few = [httparse::EMPTY_HEADER; 4];
                    let mut parsed = trailer_len(window, &mut few);
                    if parsed == Err(httparse::Error::TooManyHeaders) {
                        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                        parsed = trailer_len(window, &mut fields);
                    }
                    match parsed {
                        Ok(httparse::Status::Complete(n)) => {
                            self.buf.advance(n);
                            self.framing = Framing::Done;
                        }
                        Ok(httparse::Status::Partial) if window.len() == self.max_head => {
                            return Err(H1Error("response trailer too large"))
                        }
                        Ok(httparse::Status::Partial) => return Ok(None),
                        Err(httparse::Error::TooManyHeaders) => {
                            return Err(H1Error("too many response trailer fields"))
                        }
                        Err(_) => return Err(H1Error("malformed response trailer")),
                    }
                }
            }
        }
    }

    /// How many of the buffered bytes, up to `limit`, are body data ready to take; `None`
    /// when the buffer is empty.
    fn available(&self, limit: u64) -> Option<usize> {
        if self.buf.is_empty() {
            return None;
        }
        Some(
            usize::try_from(limit)
                .unwrap_or(usize::MAX)
                .min(self.buf.len()),
        )
    }

    async fn fill(&mut self) -> Result<usize, H1Error> {
        let n = std::future::poll_fn(|cx| {
            self.buf.reserve(READ_CHUNK);
            let read = std::pin::pin!(self.stream.read_buf(&mut self.buf)).poll(cx);
            if read.is_pending() && self.buf.is_empty() {
                // Nothing to read yet: wait without a read buffer, which comes back when
                // bytes do. A stream idle between two tokens then holds no 16 KiB buffer.
                self.buf = BytesMut::new();
            }
            read
        })
        .await
        .map_err(|_| H1Error("read error"))?;
        self.heard |= n > 0;
        Ok(n)
    }

    /// Not one byte of a response arrived: a failure now (a reset, a close) happened before
    /// the replica answered anything, and the request may go to another replica.
    pub fn heard_nothing(&self) -> bool {
        !self.heard
    }

    /// The answer's body has been read to its end.
    pub fn complete(&self) -> bool {
        self.framing == Framing::Done
    }

    /// The response is complete and nothing else arrived: the connection may carry another
    /// request.
    pub fn reusable(&self) -> bool {
        self.keep_alive && self.framing == Framing::Done && self.buf.is_empty()
    }

    pub fn into_stream(self) -> S {
        self.stream
    }
}

/// The length of the trailer section at the start of `window`, once it is complete.
fn trailer_len<'b>(
    window: &'b [u8],
    fields: &mut [httparse::Header<'b>],
) -> Result<httparse::Status<usize>, httparse::Error> {
    Ok(match httparse::parse_headers(window, fields)? {
        httparse::Status::Complete((n, _)) => httparse::Status::Complete(n),
        httparse::Status::Partial => httparse::Status::Partial,
    })
}

/// The elements of a comma-separated field value, trimmed of optional whitespace, with the
/// empty ones (RFC 9110 §5.6.1).
fn list_with_empty(value: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// The elements of a comma-separated field value, the empty ones left out.
fn list(value: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    list_with_empty(value).filter(|item| !item.is_empty())
}

/// `1*DIGIT` as a number, if it fits 64 bits. (`u64::from_str` would also take a `+`.)
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// A chunk-size line at the start of `buf`: `1*HEXDIG [BWS ";" chunk-ext] CRLF` (RFC 9112
/// §7.1), extensions skipped. Its length and the size, or `None` while it is incomplete.
/// Only the first `MAX_CHUNK_LINE` bytes are looked at, so the outcome does not depend on how
/// the line arrived.
fn chunk_size(buf: &[u8]) -> Result<Option<(usize, u64)>, H1Error> {
    const MALFORMED: H1Error = H1Error("malformed chunk size");
    let line = &buf[..buf.len().min(MAX_CHUNK_LINE)];
    let mut size = 0u64;
    let mut at = 0;
    while let Some(digit) = line.get(at).and_then(|&b| char::from(b).to_digit(16)) {
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(digit)))
            .ok_or(MALFORMED)?;
        at += 1;
    }
    if at == 0 && !line.is_empty() {
        return Err(MALFORMED);
    }
    // Whitespace may only lead to an extension.
    let ws = line[at..]
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    match line.get(at + ws) {
        Some(b';') => {
            // An extension: anything but control characters (HTAB aside) up to the CR.
            at += ws;
            at += line[at..]
                .iter()
                .take_while(|&&b| b == b'\t' || (b >= b' ' && b != 0x7f))
                .count();
        }
        Some(b'\r') if ws == 0 => {}
        Some(_) => return Err(MALFORMED),
        None => at += ws,
    }
    match line.get(at..at + 2) {
        Some(b"\r\n") => Ok(Some((at + 2, size))),
        Some(_) => Err(MALFORMED),
        None if line.get(at).is_some_and(|&b| b != b'\r') => Err(MALFORMED),
        None if line.len() == MAX_CHUNK_LINE => Err(H1Error("chunk-size line too long")),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests;
