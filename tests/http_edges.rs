//! The edges of HTTP that clients hit without meaning to: percent-encoded ids, oversized or
//! broken bodies read by clients that upload everything first, bodies on routes that take
//! none, empty cursors, `null` fields, slow or idle connections, and the WebSocket close code
//! of each protocol violation.

mod common;

use std::time::Duration;

use common::TestServer;
use common::stream::{Sse, Ws};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Short wait for something that must not happen.
const QUIET: Duration = Duration::from_millis(500);

/// Writes `request` (head and body) completely, and only then reads the whole answer, as
/// clients that upload before they read do. Returns the status and the JSON body.
async fn write_all_then_read(server: &TestServer, request: &[u8]) -> (u16, Value) {
    let mut socket = TcpStream::connect(server.handle.as_ref().expect("running").addr)
        .await
        .expect("connect");
    // In paced pieces, so the upload is still going when the answer is ready (loopback
    // buffers would otherwise swallow the whole body at once).
    for piece in request.chunks(64 * 1024) {
        timeout(common::TIMEOUT, socket.write_all(piece))
            .await
            .expect("the upload is not stalled")
            .expect("the server takes the whole upload without a reset");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let answer = timeout(common::TIMEOUT, read_answer(&mut socket))
        .await
        .expect("an answer in time");
    parse_answer(&answer)
}

/// Reads until the server closes the connection (or one whole answer with a length).
async fn read_answer(socket: &mut TcpStream) -> Vec<u8> {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match socket.read(&mut buffer).await {
            Ok(0) => return answer,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
            Err(e) => panic!(
                "reading the answer failed ({e}) after {:?}",
                String::from_utf8_lossy(&answer)
            ),
        }
        if let Some(length) = complete_length(&answer)
            && answer.len() >= length
        {
            return answer;
        }
    }
}

/// The length of a complete answer with a `content-length`, once its head is in.
fn complete_length(answer: &[u8]) -> Option<usize> {
    let text = String::from_utf8_lossy(answer);
    let head_end = text.find("\r\n\r\n")?;
    let length = text[..head_end].lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    })?;
    Some(head_end + 4 + length)
}

fn parse_answer(answer: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .unwrap_or_default();
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, body)
}

fn head(method: &str, path: &str, headers: &[&str]) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: test\r\n");
    for header in headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

fn json_of_size(bytes: usize) -> Vec<u8> {
    let mut body = b"{\"content\": \"".to_vec();
    body.resize(bytes - 2, b'x');
    body.extend_from_slice(b"\"}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoded_ids_are_decoded_then_validated() {
    let server = TestServer::start_default().await;
    let created = server.put("/v1/sessions/a%3Ab", &json!({})).await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(created.body["id"], "a:b");
    // Any character may be encoded: %61 is `a`.
    let same = server.get("/v1/sessions/%61:b").await;
    assert_eq!(same.status, StatusCode::OK);
    assert_eq!(same.body["id"], "a:b");

    let sent = server
        .post(
            "/v1/sessions/a%3Ab/messages?wait=30",
            &json!({"content": "encoded"}),
        )
        .await;
    assert_eq!(sent.status, StatusCode::OK, "{:?}", sent.body);
    assert_eq!(sent.body["session"], "a:b");
    let iid = sent.body["id"].as_str().expect("id").to_string();
    let encoded_iid = iid.replace('-', "%2d");
    let fetched = server
        .get(&format!("/v1/sessions/a%3ab/interactions/{encoded_iid}"))
        .await;
    assert_eq!(fetched.status, StatusCode::OK, "{:?}", fetched.body);
    assert_eq!(fetched.body["id"], iid.as_str());
    let context = server
        .patch("/v1/sessions/a%3Ab/context", &json!({"k": 1}))
        .await;
    assert_eq!(context.status, StatusCode::OK);
    assert_eq!(server.get("/v1/sessions/a:b/context").await.body["k"], 1);

    // The streams decode too.
    let mut ws = Ws::connect(&server, "a%3Ab", "replay=true").await;
    assert_eq!(ws.hello["session"]["id"], "a:b");
    let events = ws.events_through(1).await;
    assert_eq!(events[0]["session"], "a:b");
    ws.close().await;
    let mut sse = Sse::connect(&server, "a%3Ab", "after=0", None).await;
    let first = sse.next_event().await.expect("an event");
    assert_eq!(first["session"], "a:b");

    // What decodes to something an id cannot hold stays a 400, never a 404.
    for bad in ["a%2Fb", "a%2fb", "%", "a%zz", "a%4", "%C3%A9", "a%20b"] {
        let answer = server.get(&format!("/v1/sessions/{bad}")).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(answer.code(), Some("invalid_session_id"), "{bad}");
    }
    // A malformed escape in an interaction id is an unknown interaction.
    let unknown = server.get("/v1/sessions/a%3Ab/interactions/%zz").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_answered_413_to_a_client_that_uploads_first() {
    let server = TestServer::start_default().await;
    let body = json_of_size(2 * 1024 * 1024);
    for round in 0..20 {
        // With Content-Length: refused before reading, then drained.
        let mut request = head(
            "POST",
            "/v1/sessions/big/messages",
            &[
                "content-type: application/json",
                &format!("content-length: {}", body.len()),
            ],
        );
        request.extend_from_slice(&body);
        let (status, answer) = write_all_then_read(&server, &request).await;
        assert_eq!(status, 413, "round {round}: {answer}");
        assert_eq!(answer["error"]["code"], "payload_too_large");
    }
    // Chunked (no Content-Length): the limit is found while reading.
    let mut request = head(
        "POST",
        "/v1/sessions/big/messages",
        &[
            "content-type: application/json",
            "transfer-encoding: chunked",
        ],
    );
    for chunk in body.chunks(64 * 1024) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let (status, answer) = write_all_then_read(&server, &request).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"]["code"], "payload_too_large");
    // Nothing was stored, and the server serves on.
    assert_eq!(
        server.get("/v1/sessions/big").await.status,
        StatusCode::NOT_FOUND
    );
    let fine = server
        .post(
            "/v1/sessions/big/messages?wait=30",
            &json!({"content": "ok"}),
        )
        .await;
    assert_eq!(fine.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_body_is_a_bad_request_not_too_large() {
    let server = TestServer::start_default().await;
    // Malformed chunked encoding.
    let mut request = head(
        "POST",
        "/v1/sessions/broken/messages",
        &[
            "content-type: application/json",
            "transfer-encoding: chunked",
        ],
    );
    request.extend_from_slice(b"zz\r\n{\"content\": \"hi\"}\r\n0\r\n\r\n");
    let (status, answer) = write_all_then_read(&server, &request).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "invalid_request");

    // Fewer bytes than the Content-Length, then the client stops sending.
    let mut socket = TcpStream::connect(server.handle.as_ref().expect("running").addr)
        .await
        .expect("connect");
    let mut request = head(
        "POST",
        "/v1/sessions/broken/messages",
        &["content-type: application/json", "content-length: 100"],
    );
    request.extend_from_slice(b"{\"content\": \"hi\"}");
    socket.write_all(&request).await.expect("write");
    socket.shutdown().await.expect("half-close");
    let answer = timeout(common::TIMEOUT, read_answer(&mut socket))
        .await
        .expect("answer");
    let (status, answer) = parse_answer(&answer);
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "invalid_request");
    assert_eq!(
        server.get("/v1/sessions/broken").await.status,
        StatusCode::NOT_FOUND
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_and_delete_refuse_a_body_and_change_nothing() {
    let server = TestServer::start_default().await;
    let sent = server
        .post(
            "/v1/sessions/keep/messages?wait=30",
            &json!({"content": "one"}),
        )
        .await;
    assert_eq!(sent.status, StatusCode::OK);
    let before = server.get("/v1/sessions/keep").await.body;
    let oversize = vec![b' '; 1024 * 1024 + 100 * 1024];
    for path in ["/v1/sessions/keep/clear", "/v1/sessions/keep"] {
        let method = if path.ends_with("clear") {
            reqwest::Method::POST
        } else {
            reqwest::Method::DELETE
        };
        for (body, status, code) in [
            (oversize.clone(), 413, "payload_too_large"),
            (b"{not json".to_vec(), 400, "invalid_request"),
            (b"{\"force\": true}".to_vec(), 400, "invalid_request"),
            (b"[]".to_vec(), 400, "invalid_request"),
        ] {
            let answer = server.request_raw(method.clone(), path, body).await;
            assert_eq!(answer.status.as_u16(), status, "{method} {path}");
            assert_eq!(answer.code(), Some(code), "{method} {path}");
        }
        assert_eq!(
            server.get("/v1/sessions/keep").await.body,
            before,
            "{method} {path} with a bad body changed nothing"
        );
    }
    // An empty object is no body at all.
    let cleared = server
        .request_raw(
            reqwest::Method::POST,
            "/v1/sessions/keep/clear",
            b"{}".to_vec(),
        )
        .await;
    assert_eq!(cleared.status, StatusCode::OK);
    assert_eq!(cleared.body["epoch"], 1);
    let deleted = server
        .request_raw(reqwest::Method::DELETE, "/v1/sessions/keep", b"{}".to_vec())
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_cursors_are_bad_requests_and_null_means_absent() {
    let server = TestServer::start_default().await;
    server.put("/v1/sessions/paged", &json!({})).await;
    for path in [
        "/v1/sessions?after=",
        "/v1/sessions?after=bad%20cursor",
        "/v1/sessions/paged/interactions?before=",
    ] {
        let answer = server.get(path).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(answer.code(), Some("invalid_request"), "{path}");
    }
    let created = server
        .put(
            "/v1/sessions/nulls",
            &json!({"agent": null, "context": null}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(created.body["agent"], "default");
    assert_eq!(created.body["context"], json!({}));
    let sent = server
        .post(
            "/v1/sessions/nulls/messages?wait=30",
            &json!({"content": "hi", "metadata": null, "policy": null}),
        )
        .await;
    assert_eq!(sent.status, StatusCode::OK, "{:?}", sent.body);
    assert_eq!(sent.body["metadata"], json!({}));
    let cancelled = server
        .post(
            "/v1/sessions/nulls/cancel",
            &json!({"interaction_id": null}),
        )
        .await;
    assert_eq!(cancelled.status, StatusCode::OK);
    assert_eq!(cancelled.body["cancelled"], json!([]));
    server.stop().await;
}

const SLOW_CLIENTS: &str = r#"
http_header_timeout_s = 1
http_body_timeout_s = 1

[agents.default]
kind = "echo"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_and_idle_connections_are_dropped_while_others_are_served() {
    let server = TestServer::start(SLOW_CLIENTS).await;
    let addr = server.handle.as_ref().expect("running").addr;
    // 20 clients trickling a head, 20 trickling a body, 20 idle.
    let mut tricklers = Vec::new();
    for kind in 0..3 {
        for _ in 0..20 {
            tricklers.push(tokio::spawn(async move {
                let mut socket = TcpStream::connect(addr).await.expect("connect");
                let (first, rest): (&[u8], &[u8]) = match kind {
                    0 => (b"GET /healthz HTTP/1.1\r\n", b"host: x\r\nx-slow: yes\r\n"),
                    1 => (
                        b"POST /v1/sessions/t/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 40\r\n\r\n",
                        b"{\"content\": \"trickled one byte a time\"}",
                    ),
                    _ => (b"", b""),
                };
                socket.write_all(first).await.expect("write");
                let mut answer = Vec::new();
                let mut buffer = [0u8; 1024];
                let mut rest = rest.iter();
                let started = tokio::time::Instant::now();
                // Until the server closes; one byte every 200 ms meanwhile.
                loop {
                    tokio::select! {
                        read = socket.read(&mut buffer) => match read {
                            Ok(0) | Err(_) => break,
                            Ok(n) => answer.extend_from_slice(&buffer[..n]),
                        },
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {
                            if let Some(byte) = rest.next() {
                                let _ = socket.write_all(&[*byte]).await;
                            }
                        }
                    }
                    assert!(
                        started.elapsed() < common::TIMEOUT,
                        "kind {kind}: the connection is never dropped"
                    );
                }
                (kind, answer)
            }));
        }
    }
    // Meanwhile, ordinary requests are served.
    for i in 0..10 {
        let answer = server
            .post(
                &format!("/v1/sessions/fast-{i}/messages?wait=30"),
                &json!({"content": "quick"}),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    for trickler in tricklers {
        let (kind, answer) = timeout(common::TIMEOUT, trickler)
            .await
            .expect("every slow connection is dropped in time")
            .expect("join");
        if kind == 1 {
            // The body did not arrive in time: a 400 (or just the close).
            if !answer.is_empty() {
                let (status, body) = parse_answer(&answer);
                assert_eq!(status, 400, "{body}");
            }
        }
    }
    assert_eq!(
        server.get("/v1/sessions/t").await.status,
        StatusCode::NOT_FOUND,
        "the trickled message was never accepted"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_http_connections_are_bounded() {
    let server =
        TestServer::start("max_http_connections = 2\n[agents.default]\nkind = \"echo\"\n").await;
    let addr = server.handle.as_ref().expect("running").addr;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut socket = TcpStream::connect(addr).await.expect("connect");
        socket
            .write_all(&head("GET", "/healthz", &[]))
            .await
            .expect("write");
        let answer = timeout(common::TIMEOUT, read_answer(&mut socket))
            .await
            .expect("answer");
        assert_eq!(parse_answer(&answer).0, 200);
        held.push(socket); // kept alive, idle
    }
    let mut third = TcpStream::connect(addr)
        .await
        .expect("the kernel queues it");
    third
        .write_all(&head("GET", "/healthz", &[]))
        .await
        .expect("write");
    let mut buffer = [0u8; 1024];
    assert!(
        timeout(QUIET, third.read(&mut buffer)).await.is_err(),
        "a third connection waits while two are open"
    );
    drop(held.pop());
    let answer = timeout(common::TIMEOUT, read_answer(&mut third))
        .await
        .expect("served once a slot is free");
    assert_eq!(parse_answer(&answer).0, 200);
    server.stop().await;
}

/// A raw WebSocket: the handshake by hand, so frames can break the protocol on purpose.
async fn raw_websocket(server: &TestServer, session: &str) -> TcpStream {
    let mut socket = TcpStream::connect(server.handle.as_ref().expect("running").addr)
        .await
        .expect("connect");
    let request = head(
        "GET",
        &format!("/v1/sessions/{session}/ws"),
        &[
            "connection: upgrade",
            "upgrade: websocket",
            "sec-websocket-version: 13",
            "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==",
        ],
    );
    socket.write_all(&request).await.expect("handshake");
    let mut response = Vec::new();
    let mut byte = [0u8; 1];
    while !response.ends_with(b"\r\n\r\n") {
        timeout(common::TIMEOUT, socket.read_exact(&mut byte))
            .await
            .expect("handshake answer")
            .expect("read");
        response.push(byte[0]);
    }
    assert!(
        response.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    socket
}

/// A client frame, masked unless `masked` is false.
fn frame(first_byte: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut frame = vec![first_byte];
    let mask_bit = if masked { 0x80 } else { 0 };
    if payload.len() < 126 {
        frame.push(mask_bit | payload.len() as u8);
    } else {
        frame.push(mask_bit | 126);
        frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    let key = [0x12, 0x34, 0x56, 0x78];
    if masked {
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        frame.extend_from_slice(payload);
    }
    frame
}

/// Reads server frames until a close frame; returns its code.
async fn close_code(socket: &mut TcpStream) -> Option<u16> {
    loop {
        let mut header = [0u8; 2];
        socket.read_exact(&mut header).await.ok()?;
        let opcode = header[0] & 0x0f;
        let mut length = u64::from(header[1] & 0x7f);
        if length == 126 {
            let mut extended = [0u8; 2];
            socket.read_exact(&mut extended).await.ok()?;
            length = u64::from(u16::from_be_bytes(extended));
        } else if length == 127 {
            let mut extended = [0u8; 8];
            socket.read_exact(&mut extended).await.ok()?;
            length = u64::from_be_bytes(extended);
        }
        let mut payload = vec![0u8; length as usize];
        socket.read_exact(&mut payload).await.ok()?;
        if opcode == 0x8 {
            return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_protocol_violations_close_with_their_own_codes() {
    let server = TestServer::start_default().await;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "text that is not UTF-8",
            frame(0x81, &[0xff, 0xfe, 0xfd], true),
            1007,
        ),
        ("an unmasked client frame", frame(0x81, b"{}", false), 1002),
        ("a reserved opcode", frame(0x83, b"{}", true), 1002),
        ("a reserved bit", frame(0xC1, b"{}", true), 1002),
        (
            "a control frame over 125 bytes",
            frame(0x89, &[b'p'; 200], true),
            1002,
        ),
    ];
    for (what, bytes, expected) in cases {
        let mut socket = raw_websocket(&server, "violations").await;
        socket.write_all(&bytes).await.expect("send the bad frame");
        let code = timeout(common::TIMEOUT, close_code(&mut socket))
            .await
            .unwrap_or_else(|_| panic!("{what}: a close frame in time"));
        assert_eq!(code, Some(expected), "{what}");
    }
    // The session is untouched and the server healthy.
    assert_eq!(server.get("/healthz").await.status, StatusCode::OK);
    server.stop().await;
}
