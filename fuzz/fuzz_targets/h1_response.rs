//! The upstream HTTP/1.1 client's response reading (`tollgate::forward::h1::Conn`) under
//! arbitrary bytes from a replica, delivered in arbitrary pieces.
//!
//! Input: a flags byte (bit 0: the stream ends after the bytes, else it waits for more; bit 1:
//! build a response from the rest, else the rest is the wire), a count byte and that many
//! piece sizes (at most 15), then the wire or the description of a response to build.
//!
//! Checked on every input, besides no panic: the same head, body and outcome whether the wire
//! arrives whole or in the chosen pieces (reusability compared as "reusable with nothing left
//! to read"); no more body bytes out than wire bytes in; a Content-Length body is exactly its
//! length when complete and never longer; at most one Content-Length, none beside
//! Transfer-Encoding; a head within the cap in size and field count; the connection reusable
//! only after a response that ended cleanly. A built response that was not damaged must
//! decode to exactly what was built.
//!
//!     RUSTC_BOOTSTRAP=1 cargo fuzz run -s none h1_response -- -dict=fuzz/h1_response.dict
//!
//! The seeds in `fuzz/corpus/h1_response/` are replica answers as vLLM sends them (JSON with
//! Content-Length, SSE chunked) and a few framing corner cases.
#![no_main]

use std::collections::VecDeque;
use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};

use http::HeaderMap;
use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tollgate::forward::h1::{Conn, H1Error};

/// Small enough for the fuzzer to reach with inputs of a few KiB.
const MAX_HEAD: usize = 1024;
/// The field count `Conn` takes in a head.
const MAX_HEADERS: usize = 128;

/// Hands out its pieces one read at a time, then ends or waits forever (never wakes).
struct Pieces {
    pieces: VecDeque<Vec<u8>>,
    eof: bool,
}

impl AsyncRead for Pieces {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let Some(front) = self.pieces.front_mut() else {
            return if self.eof {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            };
        };
        let n = front.len().min(buf.remaining());
        buf.put_slice(&front[..n]);
        front.drain(..n);
        if front.is_empty() {
            self.pieces.pop_front();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Pieces {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[derive(Debug, PartialEq)]
enum End {
    /// The response ended; `reusable` only if nothing was left to read either.
    Complete {
        reusable: bool,
    },
    Failed(&'static str),
    /// Waiting for bytes that are not coming.
    Stalled,
}

#[derive(Debug, PartialEq)]
struct Got {
    head: Option<(u16, HeaderMap)>,
    body: Vec<u8>,
    end: End,
}

/// Reads one response from `pieces`. The only thing that can leave a read pending is the
/// stream running dry, so one poll runs the exchange as far as the bytes allow.
fn read(pieces: Vec<Vec<u8>>, eof: bool) -> Got {
    let mut conn = Conn::new(Pieces {
        // An empty read would be taken as the end of the stream.
        pieces: pieces.into_iter().filter(|p| !p.is_empty()).collect(),
        eof,
    })
    .with_max_head(MAX_HEAD);
    let mut head = None;
    let mut body = Vec::new();
    let polled = {
        let exchange = async {
            let h = conn.read_head().await?;
            head = Some((h.status.as_u16(), h.headers));
            while let Some(chunk) = conn.read_body().await? {
                body.extend_from_slice(&chunk);
            }
            Ok::<_, H1Error>(())
        };
        pin!(exchange).poll(&mut Context::from_waker(Waker::noop()))
    };
    let reusable = conn.reusable();
    let end = match polled {
        Poll::Ready(Ok(())) => {
            let drained = conn.into_stream().pieces.is_empty();
            End::Complete {
                reusable: reusable && drained,
            }
        }
        Poll::Ready(Err(e)) => End::Failed(e.0),
        Poll::Pending => End::Stalled,
    };
    if !matches!(end, End::Complete { .. }) {
        assert!(!reusable, "reusable after {end:?}");
    }
    Got { head, body, end }
}

fn decimal(v: &[u8]) -> u64 {
    std::str::from_utf8(v).unwrap().parse().unwrap()
}

/// What holds for any response read from `wire`.
fn check(got: &Got, wire: &[u8]) {
    assert!(got.body.len() <= wire.len());
    let Some((status, headers)) = &got.head else {
        assert!(got.body.is_empty());
        return;
    };
    assert!((200..1000).contains(status), "{status}");
    assert!(headers.len() <= MAX_HEADERS);
    let size: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 3)
        .sum();
    assert!(size <= MAX_HEAD, "a head of at least {size} bytes taken");
    let lengths: Vec<_> = headers.get_all("content-length").iter().collect();
    assert!(lengths.len() <= 1, "{lengths:?}");
    if headers.contains_key("transfer-encoding") {
        assert!(lengths.is_empty());
    } else if let (Some(length), false) = (lengths.first(), *status == 204 || *status == 304) {
        let length = decimal(length.as_bytes());
        assert!(got.body.len() as u64 <= length);
        if matches!(got.end, End::Complete { .. }) {
            assert_eq!(got.body.len() as u64, length);
        }
    }
    if *status == 204 || *status == 304 {
        assert!(got.body.is_empty());
    }
}

/// A field outside framing: a name from a short list and a value of visible bytes.
#[derive(Arbitrary, Debug)]
struct Field {
    name: u8,
    value: Vec<u8>,
}

impl Field {
    fn name(&self) -> &'static str {
        const NAMES: [&str; 8] = [
            "content-type",
            "server",
            "date",
            "x-request-id",
            "x-a",
            "vary",
            "cache-control",
            "x-b",
        ];
        NAMES[usize::from(self.name) % NAMES.len()]
    }

    fn value(&self) -> Vec<u8> {
        self.value
            .iter()
            .map(|&b| if b >= 0x80 { b } else { b'!' + b % 94 })
            .collect()
    }

    fn write(&self, wire: &mut Vec<u8>) {
        wire.extend_from_slice(self.name().as_bytes());
        wire.extend_from_slice(b": ");
        wire.extend_from_slice(&self.value());
        wire.extend_from_slice(b"\r\n");
    }
}

#[derive(Arbitrary, Debug)]
struct Chunk {
    data: Vec<u8>,
    extension: Option<(u8, u8)>,
    upper: bool,
    zeros: u8,
}

#[derive(Arbitrary, Debug)]
enum Body {
    /// `repeat`: 0 one field, 1 two equal fields, 2 one field with the value listed twice.
    Length {
        data: Vec<u8>,
        repeat: u8,
    },
    Chunked {
        chunks: Vec<Chunk>,
        trailers: Vec<Field>,
        gzip_first: bool,
        also_length: bool,
    },
    Close(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Response {
    informational: Vec<(u8, Vec<Field>)>,
    http10: bool,
    status: u8,
    fields: Vec<Field>,
    close: bool,
    body: Body,
    /// Bytes after the response.
    extra: Vec<u8>,
    /// One byte overwritten: then only what holds for any wire is checked.
    damage: Option<(u16, u8)>,
}

impl Response {
    fn status(&self) -> u16 {
        const STATUSES: [u16; 10] = [200, 201, 204, 304, 400, 404, 429, 500, 503, 299];
        STATUSES[usize::from(self.status) % STATUSES.len()]
    }

    /// Whether the built response stays within every cap of `Conn`, so that it must be read
    /// as built.
    fn within_caps(&self) -> bool {
        let fields = |fields: &[Field]| {
            let size: usize = fields
                .iter()
                .map(|f| f.name().len() + f.value.len() + 4)
                .sum();
            fields.len() + 3 <= MAX_HEADERS && size + 128 <= MAX_HEAD
        };
        let trailers = match &self.body {
            Body::Chunked { trailers, .. } => trailers,
            _ => &[][..],
        };
        self.informational.iter().all(|(_, f)| fields(f))
            && fields(&self.fields)
            && fields(trailers)
    }

    fn no_body(&self) -> bool {
        matches!(self.status(), 204 | 304)
    }

    /// The wire, and what reading it must give.
    fn build(&self, eof: bool) -> (Vec<u8>, Got) {
        let mut wire = Vec::new();
        for (code, fields) in &self.informational {
            // 100 to 199 but 101.
            let code = 100 + u16::from(*code) % 100;
            let code = if code == 101 { 102 } else { code };
            wire.extend_from_slice(format!("HTTP/1.1 {code} Info\r\n").as_bytes());
            fields.iter().for_each(|f| f.write(&mut wire));
            wire.extend_from_slice(b"\r\n");
        }
        let version = if self.http10 { "1.0" } else { "1.1" };
        let status = self.status();
        wire.extend_from_slice(format!("HTTP/{version} {status} Something\r\n").as_bytes());
        let mut headers = HeaderMap::new();
        for field in &self.fields {
            field.write(&mut wire);
            headers.append(field.name(), field.value().try_into().unwrap());
        }
        if self.close {
            wire.extend_from_slice(b"connection: close\r\n");
            headers.append("connection", "close".try_into().unwrap());
        }
        let mut body = Vec::new();
        let mut payload = Vec::new();
        let mut keep = !self.http10 && !self.close;
        let mut ends = true;
        match &self.body {
            Body::Length { data, repeat } => {
                let n = data.len();
                match repeat % 3 {
                    0 => wire.extend_from_slice(format!("content-length: {n}\r\n").as_bytes()),
                    1 => wire.extend_from_slice(
                        format!("content-length: {n}\r\ncontent-length: {n}\r\n").as_bytes(),
                    ),
                    _ => wire.extend_from_slice(format!("content-length: {n}, {n}\r\n").as_bytes()),
                }
                headers.append("content-length", n.into());
                body.extend_from_slice(data);
                payload.extend_from_slice(data);
            }
            Body::Chunked {
                chunks,
                trailers,
                gzip_first,
                also_length,
            } => {
                let codings = if *gzip_first {
                    "gzip, chunked"
                } else {
                    "chunked"
                };
                wire.extend_from_slice(format!("transfer-encoding: {codings}\r\n").as_bytes());
                headers.append("transfer-encoding", codings.try_into().unwrap());
                if *also_length {
                    wire.extend_from_slice(b"content-length: 7\r\n");
                    keep = false;
                }
                for chunk in chunks.iter().filter(|c| !c.data.is_empty()) {
                    let zeros = "0".repeat(usize::from(chunk.zeros % 4));
                    let size = if chunk.upper {
                        format!("{zeros}{:X}", chunk.data.len())
                    } else {
                        format!("{zeros}{:x}", chunk.data.len())
                    };
                    body.extend_from_slice(size.as_bytes());
                    if let Some((name, value)) = chunk.extension {
                        let value = char::from(b'a' + value % 26);
                        body.extend_from_slice(format!(" ; e{name}={value}").as_bytes());
                    }
                    body.extend_from_slice(b"\r\n");
                    body.extend_from_slice(&chunk.data);
                    body.extend_from_slice(b"\r\n");
                    payload.extend_from_slice(&chunk.data);
                }
                body.extend_from_slice(b"0\r\n");
                trailers.iter().for_each(|f| f.write(&mut body));
                body.extend_from_slice(b"\r\n");
            }
            Body::Close(data) => {
                body.extend_from_slice(data);
                payload.extend_from_slice(data);
                if !self.no_body() {
                    keep = false;
                    ends = eof;
                    // Whatever follows is body too.
                    payload.extend_from_slice(&self.extra);
                }
            }
        }
        wire.extend_from_slice(b"\r\n");
        if self.no_body() {
            payload.clear();
        } else {
            wire.extend_from_slice(&body);
        }
        wire.extend_from_slice(&self.extra);
        let end = if ends {
            End::Complete {
                reusable: keep && self.extra.is_empty(),
            }
        } else {
            End::Stalled
        };
        let expected = Got {
            head: Some((status, headers)),
            body: payload,
            end,
        };
        (wire, expected)
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&flags, rest)) = input.split_first() else {
        return;
    };
    let eof = flags & 1 == 1;
    let Some((&count, rest)) = rest.split_first() else {
        return;
    };
    let (cuts, rest) = rest.split_at(usize::from(count % 16).min(rest.len()));
    let (wire, expected) = if flags & 2 == 2 {
        let Ok(response) = Response::arbitrary_take_rest(Unstructured::new(rest)) else {
            return;
        };
        let (mut wire, expected) = response.build(eof);
        let expected = Some(expected).filter(|_| response.within_caps());
        match response.damage {
            Some((at, byte)) if !wire.is_empty() => {
                let at = usize::from(at) % wire.len();
                wire[at] = byte;
                (wire, None)
            }
            _ => (wire, expected),
        }
    } else {
        (rest.to_vec(), None)
    };

    let whole = read(vec![wire.clone()], eof);
    check(&whole, &wire);
    let mut pieces = Vec::new();
    let mut left = &wire[..];
    for &cut in cuts
        .iter()
        .cycle()
        .take(if cuts.is_empty() { 0 } else { 1 << 16 })
    {
        if left.is_empty() {
            break;
        }
        let (piece, tail) = left.split_at((usize::from(cut) + 1).min(left.len()));
        pieces.push(piece.to_vec());
        left = tail;
    }
    if !left.is_empty() {
        pieces.push(left.to_vec());
    }
    let split = read(pieces, eof);
    check(&split, &wire);
    assert_eq!(whole, split);

    if let Some(expected) = expected {
        assert_eq!(whole, expected);
    }
});
