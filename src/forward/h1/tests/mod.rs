use super::*;
use std::future::Future;
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

mod framing;

#[tokio::test]
async fn buffered_pieces_come_without_a_read_and_leave_the_end_to_read_body() {
    let (client, mut server) = duplex(64 * 1024);
    // Sent whole: one read takes the head and both chunks.
    server.write_all(CHUNKED).await.unwrap();
    let mut conn = Conn::new(client);
    conn.read_head().await.unwrap();
    let first = conn.read_body().await.unwrap().unwrap();
    assert_eq!(&first[..], b"data: ");
    assert_eq!(conn.buffered_body().as_deref(), Some(&b"{\"a\":1}\n\n"[..]));
    // The last chunk and the trailer are buffered too, but the end is `read_body`'s to say,
    // as many times as it is asked.
    assert_eq!(conn.buffered_body(), None);
    assert_eq!(conn.buffered_body(), None);
    assert_eq!(conn.read_body().await.unwrap(), None);
    assert!(conn.reusable());

    // Nothing buffered: no piece, and no read either.
    let (client, mut server) = duplex(1024);
    server
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
        .await
        .unwrap();
    let mut conn = Conn::new(client);
    conn.read_head().await.unwrap();
    assert_eq!(conn.read_body().await.unwrap().as_deref(), Some(&b"ab"[..]));
    assert_eq!(conn.buffered_body(), None);
    server.write_all(b"cd").await.unwrap();
    assert_eq!(conn.buffered_body(), None);
    assert_eq!(conn.read_body().await.unwrap().as_deref(), Some(&b"cd"[..]));
}

#[tokio::test]
async fn buffered_pieces_lent_in_place_are_the_pieces_buffered_body_gives() {
    let (client, mut server) = duplex(64 * 1024);
    server.write_all(CHUNKED).await.unwrap();
    let mut conn = Conn::new(client);
    conn.read_head().await.unwrap();
    assert!(conn.buffered_len() > 0);
    let mut pieces = Vec::new();
    conn.each_buffered(|piece| {
        pieces.push(piece.to_vec());
        Ok::<_, ()>(())
    })
    .unwrap();
    assert_eq!(pieces, [&b"data: "[..], &b"{\"a\":1}\n\n"[..]]);
    // The end and the trailer were buffered too: the body is complete, with nothing left.
    assert!(conn.complete());
    assert_eq!(conn.buffered_len(), 0);
    assert_eq!(conn.read_body().await.unwrap(), None);
    assert!(conn.reusable());

    // A piece refused stops the walk; the pieces after it stay for later.
    let (client, mut server) = duplex(64 * 1024);
    server.write_all(CHUNKED).await.unwrap();
    let mut conn = Conn::new(client);
    conn.read_head().await.unwrap();
    assert_eq!(conn.each_buffered(|_| Err("no")), Err("no"));
    assert_eq!(conn.buffered_body().as_deref(), Some(&b"{\"a\":1}\n\n"[..]));
}
