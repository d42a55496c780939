//! How responses are framed: lengths, chunks, heads refused, fed in every split.

use super::*;

/// A stream that hands out `pieces` one read at a time, then ends (`eof`) or has nothing more
/// for now (pending, never woken).
struct Pieces {
    pieces: std::collections::VecDeque<Vec<u8>>,
    eof: bool,
}

impl AsyncRead for Pieces {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let Some(front) = self.pieces.front_mut() else {
            return if self.eof {
                std::task::Poll::Ready(Ok(()))
            } else {
                std::task::Poll::Pending
            };
        };
        let n = front.len().min(buf.remaining());
        buf.put_slice(&front[..n]);
        front.drain(..n);
        if front.is_empty() {
            self.pieces.pop_front();
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Pieces {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// What a connection made of a response.
#[derive(Debug, PartialEq)]
enum Got {
    Done {
        status: u16,
        headers: HeaderMap,
        body: Vec<u8>,
        reusable: bool,
    },
    Failed(&'static str),
    /// Waiting for bytes that are not coming, with the body so far.
    Stalled(Vec<u8>),
}

impl Got {
    fn body(&self) -> &[u8] {
        match self {
            Got::Done { body, .. } => body,
            other => panic!("no complete response: {other:?}"),
        }
    }
}

/// Reads one response from `pieces` (then the end of the stream if `eof`).
fn fed(pieces: Vec<Vec<u8>>, eof: bool, max_head: Option<usize>) -> Got {
    let mut conn = Conn::new(Pieces {
        pieces: pieces.into(),
        eof,
    });
    if let Some(max) = max_head {
        conn = conn.with_max_head(max);
    }
    let mut body = Vec::new();
    let polled = {
        let exchange = async {
            let head = conn.read_head().await?;
            while let Some(chunk) = conn.read_body().await? {
                body.extend_from_slice(&chunk);
            }
            Ok::<_, H1Error>(head)
        };
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        std::pin::pin!(exchange).poll(&mut cx)
    };
    let got = match polled {
        std::task::Poll::Ready(Ok(head)) => {
            return Got::Done {
                status: head.status.as_u16(),
                headers: head.headers,
                body,
                reusable: conn.reusable(),
            }
        }
        std::task::Poll::Ready(Err(e)) => Got::Failed(e.0),
        std::task::Poll::Pending => Got::Stalled(body),
    };
    assert!(!conn.reusable(), "reusable after {got:?}");
    got
}

/// Reads `wire` whole, then in pieces of every size, and checks every way gives the same.
fn decode_with(wire: &[u8], eof: bool, max_head: Option<usize>) -> Got {
    let whole = fed(vec![wire.to_vec()], eof, max_head);
    for step in 1..wire.len() {
        let pieces = wire.chunks(step).map(<[u8]>::to_vec).collect();
        assert_eq!(fed(pieces, eof, max_head), whole, "in pieces of {step}");
    }
    whole
}

fn decode(wire: &[u8]) -> Got {
    decode_with(wire, false, None)
}

fn refused(wire: &[u8]) -> &'static str {
    match decode(wire) {
        Got::Failed(e) => e,
        other => panic!("accepted {:?}: {other:?}", String::from_utf8_lossy(wire)),
    }
}

fn ok_head(fields: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\n{fields}\r\n").into_bytes()
}

fn with_body(fields: &str, body: &[u8]) -> Vec<u8> {
    [ok_head(fields), body.to_vec()].concat()
}

const CHUNKED_HELLO: &str = "transfer-encoding: chunked\r\n";

#[test]
fn content_length_is_one_decimal_number() {
    for value in [
        "+5",
        "-5",
        "",
        "5 5",
        "0x5",
        "5.0",
        "1e3",
        "18446744073709551616",
        "99999999999999999999999999",
        "5\u{a0}",
        "\u{a0}5",
        "5,",
        ",5",
        "5,,5",
    ] {
        let wire = with_body(&format!("content-length: {value}\r\n"), b"hello");
        assert_eq!(refused(&wire), "invalid content-length", "{value:?}");
    }
    let got = decode(&with_body("content-length: 005\r\n", b"hello"));
    assert_eq!(got.body(), b"hello");
    // The largest length is taken as it is; the body is then read as it comes.
    let wire = with_body("content-length: 18446744073709551615\r\n", b"hello");
    assert_eq!(decode(&wire), Got::Stalled(b"hello".to_vec()));
    assert_eq!(
        decode_with(&wire, true, None),
        Got::Failed("connection closed before the response body ended")
    );
}

#[test]
fn content_lengths_that_differ_are_refused() {
    for fields in [
        "content-length: 1\r\ncontent-length: 2\r\n",
        "content-length: 1, 2\r\n",
        "content-length: 5\r\ncontent-length: 5, 6\r\n",
        "content-length: 5\r\ncontent-type: text/plain\r\ncontent-length: 4\r\n",
    ] {
        let wire = with_body(fields, b"hello");
        assert_eq!(refused(&wire), "conflicting content-length", "{fields:?}");
    }
}

/// RFC 9110 §8.6 lets a recipient take the same value repeated, as field lines or as a list,
/// as one value: the body is framed by it and the head keeps one field.
#[test]
fn the_same_content_length_repeated_is_one_length() {
    for fields in [
        "content-length: 5\r\ncontent-length: 5\r\n",
        "content-length: 5, 5\r\n",
        "content-length: 5,5\r\ncontent-length: 05\r\n",
    ] {
        let Got::Done {
            headers,
            body,
            reusable,
            ..
        } = decode(&with_body(fields, b"hello"))
        else {
            panic!("{fields:?} refused");
        };
        assert_eq!(body, b"hello");
        let lengths: Vec<_> = headers.get_all("content-length").iter().collect();
        assert_eq!(lengths, ["5"], "{fields:?}");
        assert!(reusable);
    }
}

#[test]
fn transfer_encoding_wins_over_content_length_and_the_connection_is_closed() {
    for fields in [
        "content-length: 3\r\ntransfer-encoding: chunked\r\n",
        "transfer-encoding: chunked\r\ncontent-length: 300\r\n",
    ] {
        let Got::Done {
            headers,
            body,
            reusable,
            ..
        } = decode(&with_body(fields, b"5\r\nhello\r\n0\r\n\r\n"))
        else {
            panic!("{fields:?} refused");
        };
        assert_eq!(body, b"hello");
        assert!(!headers.contains_key("content-length"));
        assert!(!reusable);
    }
    // A Content-Length that is invalid or conflicting is refused even so.
    let wire = with_body(
        "transfer-encoding: chunked\r\ncontent-length: +3\r\n",
        b"0\r\n\r\n",
    );
    assert_eq!(refused(&wire), "invalid content-length");
}

/// RFC 9112 §6.3, rule 4: in a response, a Transfer-Encoding whose last coding is not chunked
/// means the body runs until the connection closes.
#[test]
fn transfer_encoding_not_ending_in_chunked_runs_until_close() {
    let body = b"5\r\nhello\r\n0\r\n\r\n";
    for fields in [
        "transfer-encoding: chunked, gzip\r\n",
        "transfer-encoding: identity\r\n",
        "transfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n",
        "transfer-encoding: chunked;q=1\r\n",
        "transfer-encoding: chunked\r\ntransfer-encoding: gzip\r\ncontent-length: 5\r\n",
        "transfer-encoding:\r\n",
    ] {
        let wire = with_body(fields, body);
        assert_eq!(decode(&wire), Got::Stalled(body.to_vec()), "{fields:?}");
        let Got::Done {
            headers,
            body: got,
            reusable,
            ..
        } = decode_with(&wire, true, None)
        else {
            panic!("{fields:?} refused");
        };
        assert_eq!(got, body);
        assert!(!headers.contains_key("content-length"));
        assert!(!reusable);
    }
    // The codings of all field lines are one list, whose empty elements do not count.
    for fields in [
        "transfer-encoding: gzip, chunked\r\n",
        "transfer-encoding: gzip\r\ntransfer-encoding: CHUNKED\r\n",
        "transfer-encoding: chunked,\r\n",
        "transfer-encoding: chunked\r\ntransfer-encoding: ,\r\n",
    ] {
        let got = decode(&with_body(fields, body));
        assert_eq!(got.body(), b"hello", "{fields:?}");
    }
}

#[test]
fn http_1_0_responses_are_never_reused() {
    for wire in [
        &b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok"[..],
        b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ] {
        let got = decode(wire);
        assert_eq!(got.body(), b"ok");
        assert!(matches!(
            got,
            Got::Done {
                reusable: false,
                ..
            }
        ));
    }
}

#[test]
fn obs_fold_and_space_before_a_colon_are_refused() {
    for fields in [
        "x-a: 1\r\n folded\r\ncontent-length: 0\r\n",
        "x-a: 1\r\n\tfolded\r\ncontent-length: 0\r\n",
        " x-a: 1\r\ncontent-length: 0\r\n",
        "content-length : 0\r\n",
        "content-length\t: 0\r\n",
    ] {
        assert_eq!(
            refused(&ok_head(fields)),
            "malformed response header",
            "{fields:?}"
        );
    }
}

#[test]
fn control_characters_in_header_values_are_refused() {
    for value in ["a\0b", "a\x01b", "a\x1bb", "a\x7fb", "a\rb", "\0"] {
        let wire = ok_head(&format!("x-a: {value}\r\ncontent-length: 0\r\n"));
        assert_eq!(refused(&wire), "malformed response header", "{value:?}");
    }
    // A tab and bytes past ASCII are field content.
    let wire = ok_head("x-a: a\tb\u{e9}\r\ncontent-length: 0\r\n");
    let Got::Done { headers, .. } = decode(&wire) else {
        panic!("refused");
    };
    assert_eq!(headers["x-a"].as_bytes(), "a\tb\u{e9}".as_bytes());
}

/// RFC 9112 §2.2 lets a recipient take a bare LF as the end of a start line or field line;
/// chunk framing lines must end in CRLF.
#[test]
fn bare_lf_ends_head_and_trailer_lines_but_not_chunk_lines() {
    let got = decode(b"HTTP/1.1 200 OK\ncontent-length: 2\n\nok");
    assert_eq!(got.body(), b"ok");
    assert!(matches!(got, Got::Done { reusable: true, .. }));
    let got = decode(&with_body(CHUNKED_HELLO, b"2\r\nok\r\n0\r\nx-t: 1\n\n"));
    assert_eq!(got.body(), b"ok");
    assert!(matches!(got, Got::Done { reusable: true, .. }));

    let wire = with_body(CHUNKED_HELLO, b"2\nok\r\n0\r\n\r\n");
    assert_eq!(refused(&wire), "malformed chunk size");
    let wire = with_body(CHUNKED_HELLO, b"2\r\nok\n0\r\n\r\n");
    assert_eq!(refused(&wire), "malformed chunk end");
    let wire = with_body(CHUNKED_HELLO, b"2\r\nok\r\n0\n\r\n");
    assert_eq!(refused(&wire), "malformed chunk size");
}

#[test]
fn chunk_sizes_are_hex_digits_that_fit_64_bits() {
    for line in [
        "",
        " 5",
        "5 ",
        "-5",
        "+5",
        "0x5",
        "zz",
        ";ext",
        "5;a\nb",
        "5;a\0b",
        "5;a\rb",
        "5 5",
        "5\t",
        "fffffffffffffffff",
        "10000000000000000",
        "00000000000000000000ffffffffffffffff0",
    ] {
        let wire = with_body(
            CHUNKED_HELLO,
            format!("{line}\r\nhello\r\n0\r\n\r\n").as_bytes(),
        );
        assert_eq!(refused(&wire), "malformed chunk size", "{line:?}");
    }
    for line in [
        "5",
        "0000000000000000000000005",
        "5;ext",
        "5 ;ext",
        "5\t; a = b ;c=\"d e\\\"\"",
        "5;\u{e9}",
    ] {
        let wire = with_body(
            CHUNKED_HELLO,
            format!("{line}\r\nhello\r\n0\r\n\r\n").as_bytes(),
        );
        assert_eq!(decode(&wire).body(), b"hello", "{line:?}");
    }
    // The largest size is read as the data comes.
    let wire = with_body(CHUNKED_HELLO, b"ffffffffffffffff\r\nhello");
    assert_eq!(decode(&wire), Got::Stalled(b"hello".to_vec()));
}

#[test]
fn a_chunk_size_line_over_1_kib_is_refused_at_any_split() {
    // 1024 bytes with its CRLF: the longest line taken.
    let ext = "a".repeat(1024 - 4);
    let wire = with_body(
        CHUNKED_HELLO,
        format!("5;{ext}\r\nhello\r\n0\r\n\r\n").as_bytes(),
    );
    assert_eq!(decode(&wire).body(), b"hello");
    let wire = with_body(
        CHUNKED_HELLO,
        format!("5;{ext}a\r\nhello\r\n0\r\n\r\n").as_bytes(),
    );
    assert_eq!(refused(&wire), "chunk-size line too long");
}

#[test]
fn trailer_fields_are_checked_and_dropped() {
    let got = decode(&with_body(
        CHUNKED_HELLO,
        b"2\r\nok\r\n0\r\nx-a: 1\r\nx-b: two\r\n\r\n",
    ));
    assert_eq!(got.body(), b"ok");
    assert!(
        matches!(got, Got::Done { reusable: true, ref headers, .. } if !headers.contains_key("x-a"))
    );
    for trailer in [
        "x a: 1\r\n\r\n",
        " folded\r\n\r\n",
        "x-a: 1\r\n folded\r\n\r\n",
        "x-a: a\0b\r\n\r\n",
        "no colon\r\n\r\n",
        "x-a: 1\r\r\n",
    ] {
        let wire = with_body(
            CHUNKED_HELLO,
            format!("2\r\nok\r\n0\r\n{trailer}").as_bytes(),
        );
        assert_eq!(refused(&wire), "malformed response trailer", "{trailer:?}");
    }
}

#[test]
fn a_trailer_section_over_the_cap_is_refused_at_any_split() {
    let trailer = |n: usize| {
        let pad = "a".repeat(n - "x: \r\n\r\n".len());
        with_body(
            CHUNKED_HELLO,
            format!("2\r\nok\r\n0\r\nx: {pad}\r\n\r\n").as_bytes(),
        )
    };
    assert_eq!(decode_with(&trailer(64), false, Some(64)).body(), b"ok");
    assert_eq!(
        decode_with(&trailer(65), false, Some(64)),
        Got::Failed("response trailer too large")
    );
    let many = with_body(
        CHUNKED_HELLO,
        format!("2\r\nok\r\n0\r\n{}\r\n", "x: 1\r\n".repeat(MAX_HEADERS + 1)).as_bytes(),
    );
    assert_eq!(
        fed(vec![many], false, None),
        Got::Failed("too many response trailer fields")
    );
}

#[test]
fn a_head_over_the_cap_is_refused_at_any_split() {
    // A head of `n` bytes.
    let head = |n: usize, status: &str| {
        let start = format!("HTTP/1.1 {status}\r\nx: ");
        let pad = "a".repeat(n - start.len() - "\r\ncontent-length: 0\r\n\r\n".len());
        format!("{start}{pad}\r\ncontent-length: 0\r\n\r\n").into_bytes()
    };
    assert!(matches!(
        decode_with(&head(64, "200 OK"), false, Some(64)),
        Got::Done { reusable: true, .. }
    ));
    assert_eq!(
        decode_with(&head(65, "200 OK"), false, Some(64)),
        Got::Failed("response header too large")
    );
    // An informational head counts on its own.
    let wire = [head(64, "100 Continue"), head(64, "200 OK")].concat();
    assert!(matches!(
        decode_with(&wire, false, Some(64)),
        Got::Done { status: 200, .. }
    ));
    let wire = [head(65, "100 Continue"), head(64, "200 OK")].concat();
    assert_eq!(
        decode_with(&wire, false, Some(64)),
        Got::Failed("response header too large")
    );
    // The real cap, the last bytes arriving with the end of the head in one read.
    let wire = head(MAX_HEAD + 1, "200 OK");
    let (first, rest) = wire.split_at(MAX_HEAD - 100);
    let pieces = vec![first.to_vec(), rest.to_vec()];
    assert_eq!(
        fed(pieces, false, None),
        Got::Failed("response header too large")
    );
    let wire = head(MAX_HEAD, "200 OK");
    let pieces = wire.chunks(READ_CHUNK).map(<[u8]>::to_vec).collect();
    assert!(matches!(fed(pieces, false, None), Got::Done { .. }));
}

#[test]
fn too_many_header_fields_are_refused() {
    let fields = |n: usize| format!("{}content-length: 0\r\n", "x: 1\r\n".repeat(n - 1));
    let wire = ok_head(&fields(MAX_HEADERS));
    assert!(matches!(fed(vec![wire], false, None), Got::Done { .. }));
    let wire = ok_head(&fields(MAX_HEADERS + 1));
    assert_eq!(
        fed(vec![wire], false, None),
        Got::Failed("too many response header fields")
    );
}

#[test]
fn status_codes_frame_the_body() {
    assert_eq!(refused(b"HTTP/1.1 099 Low\r\n\r\n"), "invalid status code");
    assert_eq!(
        refused(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n"),
        "unexpected protocol switch"
    );
    // Informational responses have no body, whatever their fields say.
    let wire = b"HTTP/1.1 100 Continue\r\ncontent-length: 5\r\n\r\n\
        HTTP/1.1 103 Early Hints\r\ntransfer-encoding: chunked\r\n\r\n\
        HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let got = decode(wire);
    assert_eq!(got.body(), b"ok");
    assert!(matches!(
        got,
        Got::Done {
            status: 200,
            reusable: true,
            ..
        }
    ));
    // Nor have 204 and 304; bytes after them are not a body but keep the connection from
    // being reused.
    for status in ["204 No Content", "304 Not Modified"] {
        let head =
            format!("HTTP/1.1 {status}\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n");
        let got = decode(head.as_bytes());
        assert_eq!(got.body(), b"");
        let got = fed(vec![[head.as_bytes(), b"hello"].concat()], false, None);
        assert!(matches!(got, Got::Done { reusable: false, ref body, .. } if body.is_empty()));
    }
}

#[test]
fn a_connection_is_reusable_only_after_a_response_ended_cleanly() {
    let mut conn = Conn::new(Pieces {
        pieces: vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()].into(),
        eof: true,
    });
    assert!(!conn.reusable(), "nothing read yet");
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut exchange = |conn: &mut Conn<Pieces>| {
        let fut = async {
            conn.read_head().await?;
            while conn.read_body().await?.is_some() {}
            Ok::<_, H1Error>(())
        };
        match std::pin::pin!(fut).poll(&mut cx) {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => panic!("stalled"),
        }
    };
    exchange(&mut conn).unwrap();
    assert!(conn.reusable());
    // The replica closes the idle connection: the next response fails, and so does reuse.
    assert_eq!(
        exchange(&mut conn),
        Err(H1Error("connection closed before the response header"))
    );
    assert!(!conn.reusable());
}
