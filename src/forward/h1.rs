//! HTTP/1.1 on one upstream connection. The request is complete in memory, so its head and
//! body leave in a single write; the response head is parsed with `httparse` and its body
//! de-framed (Content-Length, chunked, or until close) chunk by chunk as it arrives, without
//! copying. The connection is a Pingora stream, opened by its transport connector and kept
//! between requests in the replica's idle pool (`pool.rs`).
//!
//! Every read is cancel-safe: a caller may race it against the client's departure or a
//! timeout and drop it; bytes already received stay in the buffer.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use pingora::protocols::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A response head larger than this is refused rather than buffered without end.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
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
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(stream: S) -> Self {
        Conn {
            stream,
            buf: BytesMut::new(),
            framing: Framing::Done,
            keep_alive: true,
        }
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
        loop {
            match self.parse_head()? {
                Parsed::Head(head) => return Ok(head),
                Parsed::Informational => continue,
                Parsed::Partial => {}
            }
            if self.buf.len() > MAX_HEAD {
                return Err(H1Error("response header too large"));
            }
            if self.fill().await? == 0 {
                return Err(H1Error("connection closed before the response header"));
            }
        }
    }

    /// Parses a complete head out of the buffer, if one is there.
    fn parse_head(&mut self) -> Result<Parsed, H1Error> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut fields);
        let len = match response.parse(&self.buf) {
            Ok(httparse::Status::Complete(len)) => len,
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
            let _ = self.buf.split_to(len);
            return Ok(Parsed::Informational);
        }
        let mut headers = HeaderMap::with_capacity(response.headers.len());
        let mut chunked = false;
        let mut coded = false;
        let mut length: Option<u64> = None;
        let mut close = response.version != Some(1);
        for field in response.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| H1Error("invalid response header name"))?;
            let value = HeaderValue::from_bytes(field.value)
                .map_err(|_| H1Error("invalid response header value"))?;
            if name == http::header::TRANSFER_ENCODING {
                coded = true;
                // Only the last coding frames the message (RFC 9112 §6.3).
                chunked = last_token(field.value).eq_ignore_ascii_case(b"chunked");
            } else if name == http::header::CONTENT_LENGTH {
                let n = std::str::from_utf8(field.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or(H1Error("invalid content-length"))?;
                if length.is_some_and(|m| m != n) {
                    return Err(H1Error("conflicting content-length"));
                }
                length = Some(n);
            } else if name == http::header::CONNECTION {
                close |= has_token(field.value, b"close");
            }
            headers.append(name, value);
        }
        if coded && length.is_some() {
            // Both framings given (RFC 9112 §6.1): Transfer-Encoding wins, the length is wrong
            // for what is passed on, and the connection is not trusted for another message.
            headers.remove(http::header::CONTENT_LENGTH);
            close = true;
        }
        let _ = self.buf.split_to(len);
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
                return Ok(step);
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

    /// Takes what the buffer holds of the body: `Some(Some(data))`, `Some(None)` at the end,
    /// or `None` when more bytes must be read first.
    fn decode(&mut self) -> Result<Option<Option<Bytes>>, H1Error> {
        loop {
            match self.framing {
                Framing::Done => return Ok(Some(None)),
                Framing::Length(0) => {
                    self.framing = Framing::Done;
                    return Ok(Some(None));
                }
                Framing::Length(left) => {
                    let Some(data) = self.take(left) else {
                        return Ok(None);
                    };
                    self.framing = Framing::Length(left - data.len() as u64);
                    return Ok(Some(Some(data)));
                }
                Framing::Close => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Some(self.buf.split().freeze())));
                }
                Framing::Chunked(Chunk::Size) => match httparse::parse_chunk_size(&self.buf) {
                    Ok(httparse::Status::Complete((used, 0))) => {
                        let _ = self.buf.split_to(used);
                        self.framing = Framing::Chunked(Chunk::Trailer);
                    }
                    Ok(httparse::Status::Complete((used, size))) => {
                        let _ = self.buf.split_to(used);
                        self.framing = Framing::Chunked(Chunk::Data(size));
                    }
                    Ok(httparse::Status::Partial) if self.buf.len() < 1024 => return Ok(None),
                    _ => return Err(H1Error("malformed chunk size")),
                },
                Framing::Chunked(Chunk::Data(0)) => {
                    self.framing = Framing::Chunked(Chunk::DataEnd);
                }
                Framing::Chunked(Chunk::Data(left)) => {
                    let Some(data) = self.take(left) else {
                        return Ok(None);
                    };
                    self.framing = Framing::Chunked(Chunk::Data(left - data.len() as u64));
                    return Ok(Some(Some(data)));
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if !b"\r\n".starts_with(&self.buf[..self.buf.len().min(2)]) {
                        return Err(H1Error("malformed chunk end"));
                    }
                    if self.buf.len() < 2 {
                        return Ok(None);
                    }
                    let _ = self.buf.split_to(2);
                    self.framing = Framing::Chunked(Chunk::Size);
                }
                Framing::Chunked(Chunk::Trailer) => {
                    // Trailer fields are not relayed; skip them up to the empty line.
                    let end = if self.buf.starts_with(b"\r\n") {
                        Some(2)
                    } else {
                        memchr::memmem::find(&self.buf, b"\r\n\r\n").map(|i| i + 4)
                    };
                    match end {
                        Some(n) => {
                            let _ = self.buf.split_to(n);
                            self.framing = Framing::Done;
                        }
                        None if self.buf.len() > MAX_HEAD => {
                            return Err(H1Error("response trailer too large"))
                        }
                        None => return Ok(None),
                    }
                }
            }
        }
    }

    /// Up to `limit` buffered body bytes, without copying; `None` when the buffer is empty.
    fn take(&mut self, limit: u64) -> Option<Bytes> {
        if self.buf.is_empty() {
            return None;
        }
        let n = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .min(self.buf.len());
        Some(self.buf.split_to(n).freeze())
    }

    async fn fill(&mut self) -> Result<usize, H1Error> {
        self.buf.reserve(READ_CHUNK);
        self.stream
            .read_buf(&mut self.buf)
            .await
            .map_err(|_| H1Error("read error"))
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

fn last_token(value: &[u8]) -> &[u8] {
    let last = value.rsplit(|&b| b == b',').next().unwrap_or(value);
    last.trim_ascii()
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncWriteExt};

    /// Feeds `wire` to a connection in pieces of `step` bytes and collects the response.
    async fn read_all(wire: &[u8], step: usize) -> Result<(Head, Vec<u8>, bool), H1Error> {
        let (client, mut server) = duplex(64 * 1024);
        let wire = wire.to_vec();
        let feeder = tokio::spawn(async move {
            for piece in wire.chunks(step) {
                if server.write_all(piece).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
            // Keep the connection open: framing, not EOF, must end the body.
            std::future::pending::<()>().await;
        });
        let mut conn = Conn::new(client);
        let result = async {
            let head = conn.read_head().await?;
            let mut body = Vec::new();
            while let Some(chunk) = conn.read_body().await? {
                body.extend_from_slice(&chunk);
            }
            Ok((head, body, conn.reusable()))
        }
        .await;
        feeder.abort();
        result
    }

    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
        transfer-encoding: chunked\r\n\r\n\
        6\r\ndata: \r\n9;ext=1\r\n{\"a\":1}\n\n\r\n0\r\nx-trailer: 1\r\n\r\n";

    #[tokio::test]
    async fn chunked_bodies_decode_at_every_split() {
        for step in 1..=CHUNKED.len() {
            let (head, body, reusable) = read_all(CHUNKED, step).await.unwrap();
            assert_eq!(head.status, 200);
            assert_eq!(head.headers["content-type"], "text/event-stream");
            assert_eq!(body, b"data: {\"a\":1}\n\n", "step {step}");
            assert!(reusable, "step {step}");
        }
    }

    #[tokio::test]
    async fn content_length_bodies_end_at_their_length() {
        let wire =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 5\r\n\r\nhello";
        for step in 1..=wire.len() {
            let (head, body, reusable) = read_all(wire, step).await.unwrap();
            assert_eq!(head.status, 201);
            assert_eq!(body, b"hello");
            assert!(reusable);
        }
    }

    #[tokio::test]
    async fn transfer_encoding_overrides_a_length_and_the_connection_is_not_reused() {
        let wire = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 99\r\n\
            transfer-encoding: chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n";
        let (head, body, reusable) = read_all(wire, wire.len()).await.unwrap();
        assert_eq!(body, b"no");
        assert!(!head.headers.contains_key("content-length"));
        assert!(!reusable);
    }

    #[tokio::test]
    async fn connection_close_and_bodies_without_length_are_not_reused() {
        let wire = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok";
        let (_, body, reusable) = read_all(wire, 7).await.unwrap();
        assert_eq!(body, b"ok");
        assert!(!reusable);

        let (client, mut server) = duplex(1024);
        server
            .write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
            .await
            .unwrap();
        drop(server);
        let mut conn = Conn::new(client);
        conn.read_head().await.unwrap();
        let mut body = Vec::new();
        while let Some(chunk) = conn.read_body().await.unwrap() {
            body.extend_from_slice(&chunk);
        }
        assert_eq!(body, b"until the end");
        assert!(!conn.reusable());
    }

    #[tokio::test]
    async fn broken_responses_are_errors_not_hangs() {
        let cases: &[(&[u8], &str)] = &[
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
                "invalid content-length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                "conflicting content-length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                "malformed chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabX",
                "malformed chunk end",
            ),
            (b"SMTP ready\r\n\r\n", "malformed response header"),
        ];
        for (wire, expected) in cases {
            let err = read_all(wire, wire.len()).await.unwrap_err();
            assert_eq!(err, H1Error(expected));
        }
        // The replica closing early is an error too, before and inside the body.
        for wire in [
            &b"HTTP/1.1 200 OK\r\ncont"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc",
        ] {
            let (client, mut server) = duplex(1024);
            server.write_all(wire).await.unwrap();
            drop(server);
            let mut conn = Conn::new(client);
            let result = async {
                conn.read_head().await?;
                while conn.read_body().await?.is_some() {}
                Ok::<_, H1Error>(())
            };
            assert!(result.await.is_err());
        }
    }

    #[tokio::test]
    async fn the_request_leaves_in_one_write() {
        let (client, mut server) = duplex(1024);
        let mut conn = Conn::new(client);
        conn.send(b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\n", b"{}")
            .await
            .unwrap();
        let mut got = vec![0u8; 1024];
        let n = tokio::io::AsyncReadExt::read(&mut server, &mut got)
            .await
            .unwrap();
        assert_eq!(&got[..n], b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}");
    }
}
