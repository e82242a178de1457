//! The WebSocket protocol's edges: every malformed frame gets one `reply` with `ok: false` and
//! `invalid_request` (the client's `ref` echoed, or `null`), changes nothing, and the
//! connection stays usable; every valid op gets exactly one reply, in order, with its ref; the
//! per-connection op rate limit answers `rate_limited` and the connection survives; an oversize
//! frame does not hurt the server; a bad `after` or session id refuses the upgrade with `400`
//! and a JSON error body.

mod common;

use std::time::Duration;

use common::stream::{Sse, Ws, WsFrame, metric, wait_metric, ws_refused};
use common::{TIMEOUT, TestServer, check_log_invariants, words};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Sends a raw text frame and expects exactly one `invalid_request` reply with `reference`;
/// then a ping with a fresh ref must get its pong (nothing else in between).
async fn expect_invalid(ws: &mut Ws, frame: &str, reference: Value) {
    ws.send_text(frame).await;
    expect_invalid_reply(ws, frame, reference).await;
}

async fn expect_invalid_reply(ws: &mut Ws, what: &str, reference: Value) {
    let reply = ws.next_json().await;
    assert_eq!(reply["kind"], "reply", "{what}: {reply}");
    assert_eq!(reply["ok"], false, "{what}: {reply}");
    assert_eq!(reply["ref"], reference, "{what}: ref echoed: {reply}");
    assert_eq!(reply["error"]["code"], "invalid_request", "{what}: {reply}");
    assert!(
        reply["error"]["message"].is_string(),
        "{what}: error message: {reply}"
    );
    assert!(reply.get("data").is_none(), "{what}: {reply}");
    // Still usable: the very next frame is the pong.
    let reference = ws.fresh_ref();
    ws.send_json(&json!({"op": "ping", "ref": reference})).await;
    let pong = ws.next_json().await;
    assert_eq!(
        pong,
        json!({"kind": "pong", "ref": reference}),
        "after {what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_invalid_request_and_change_nothing() {
    let server = TestServer::start_default().await;
    let session = "bad-frames";
    let mut ws = Ws::connect(&server, session, "").await;
    let session_before = server.get(&format!("/v1/sessions/{session}")).await;
    assert_eq!(session_before.status, StatusCode::OK);
    let log_before = server.stored_events(session);

    // Not an object with an op: the ref cannot be known.
    for frame in [
        "{not json",
        "",
        "   ",
        "[1, 2, 3]",
        r#"[{"op": "ping", "ref": 1}]"#,
        r#""ping""#,
        "42",
        "null",
    ] {
        expect_invalid(&mut ws, frame, Value::Null).await;
    }
    ws.send_binary(br#"{"op": "ping", "ref": "bin"}"#.to_vec())
        .await;
    expect_invalid_reply(&mut ws, "a binary frame", Value::Null).await;

    // A ref of a wrong type is not echoed.
    for frame in [
        r#"{"op": "ping", "ref": {"a": 1}}"#,
        r#"{"op": "ping", "ref": [1]}"#,
        r#"{"op": "ping", "ref": true}"#,
        r#"{"op": "message", "content": "hi", "ref": {"nested": "object"}}"#,
    ] {
        expect_invalid(&mut ws, frame, Value::Null).await;
    }

    // Everything else: the ref is echoed.
    let cases: Vec<(&str, Value)> = vec![
        // unknown op, missing op, op not a string
        (r#"{"op": "dance", "ref": "u1"}"#, json!("u1")),
        (r#"{"op": "", "ref": "u2"}"#, json!("u2")),
        (r#"{"ref": "m1"}"#, json!("m1")),
        (r#"{"ref": 7, "content": "hi"}"#, json!(7)),
        (r#"{"op": 5, "ref": "o1"}"#, json!("o1")),
        (r#"{"op": null, "ref": "o2"}"#, json!("o2")),
        // wrong types
        (
            r#"{"op": "message", "ref": "t1", "content": 5}"#,
            json!("t1"),
        ),
        (
            r#"{"op": "message", "ref": "t2", "content": null}"#,
            json!("t2"),
        ),
        (r#"{"op": "message", "ref": "t3"}"#, json!("t3")),
        (
            r#"{"op": "message", "ref": "t4", "content": "hi", "policy": "sometimes"}"#,
            json!("t4"),
        ),
        (
            r#"{"op": "message", "ref": "t5", "content": "hi", "policy": 1}"#,
            json!("t5"),
        ),
        (
            r#"{"op": "message", "ref": "t6", "content": "hi", "metadata": [1]}"#,
            json!("t6"),
        ),
        (
            r#"{"op": "message", "ref": "t7", "content": "hi", "metadata": "m"}"#,
            json!("t7"),
        ),
        (
            r#"{"op": "message", "ref": "t8", "content": "hi", "idempotency_key": 5}"#,
            json!("t8"),
        ),
        (
            r#"{"op": "message", "ref": "t9", "content": "hi", "idempotency_key": ""}"#,
            json!("t9"),
        ),
        (r#"{"op": "context", "ref": "c1", "set": [1]}"#, json!("c1")),
        (r#"{"op": "context", "ref": "c2", "set": "x"}"#, json!("c2")),
        (r#"{"op": "context", "ref": "c3", "patch": 3}"#, json!("c3")),
        (
            r#"{"op": "context", "ref": "c5", "set": {"a": 1}, "patch": null, "x": 1}"#,
            json!("c5"),
        ),
        (
            r#"{"op": "cancel", "ref": "x1", "interaction_id": 5}"#,
            json!("x1"),
        ),
        // unknown fields
        (
            r#"{"op": "message", "ref": "f1", "content": "hi", "colour": "red"}"#,
            json!("f1"),
        ),
        (r#"{"op": "ping", "ref": "f2", "extra": 1}"#, json!("f2")),
        (
            r#"{"op": "clear", "ref": "f3", "force": true}"#,
            json!("f3"),
        ),
        (r#"{"op": "cancel", "ref": "f4", "all": true}"#, json!("f4")),
        (
            r#"{"op": "context", "ref": "f5", "merge": {}}"#,
            json!("f5"),
        ),
        // empty content
        (
            r#"{"op": "message", "ref": "e1", "content": ""}"#,
            json!("e1"),
        ),
        (
            r#"{"op": "message", "ref": "e2", "content": " \n\t "}"#,
            json!("e2"),
        ),
        // numeric refs are echoed as numbers
        (r#"{"op": "dance", "ref": -7.25}"#, json!(-7.25)),
        (r#"{"op": "dance", "ref": 0}"#, json!(0)),
        (r#"{"op": "dance", "ref": ""}"#, json!("")),
        (r#"{"op": "dance", "ref": null}"#, Value::Null),
    ];
    for (frame, reference) in cases {
        expect_invalid(&mut ws, frame, reference).await;
    }

    // A context op with neither set nor patch reads the context (API.md: both are optional),
    // and changes nothing either.
    let (reply, _) = ws.request(&json!({"op": "context", "ref": "c4"})).await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["data"], json!({}), "{reply}");

    // Nothing changed: not the session, not its log.
    let session_after = server.get(&format!("/v1/sessions/{session}")).await;
    assert_eq!(session_after.body, session_before.body);
    assert_eq!(server.stored_events(session), log_before);
    let interactions = server
        .get(&format!("/v1/sessions/{session}/interactions"))
        .await;
    assert_eq!(interactions.body["interactions"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_valid_op_gets_one_reply_in_order() {
    let server = TestServer::start_default().await;
    let session = "valid-ops";
    let created = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"agent": "slow"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let mut ws = Ws::connect(&server, session, "").await;
    let first = json!({
        "op": "message", "ref": "m1", "content": words("first", 5), "policy": "reject",
        "metadata": {"tag": "first", "n": [1, 2]}, "idempotency_key": "key-1",
    });
    let mut replayed = first.clone();
    replayed["ref"] = json!("m1-again");
    let mut after_clear = first.clone();
    after_clear["ref"] = json!("m1-after-clear");
    let ops = vec![
        first,
        replayed,
        json!({"op": "message", "ref": 3, "content": "queued one", "policy": "enqueue"}),
        json!({"op": "message", "ref": 4, "content": "rejected", "policy": "reject"}),
        json!({"op": "cancel", "ref": 5}),
        json!({"op": "clear", "ref": 6}),
        json!({"op": "context", "ref": 7, "set": {"a": 1, "b": {"c": 2}}}),
        json!({"op": "context", "ref": 8, "patch": {"b": {"c": null, "d": 3}, "e": 4}}),
        json!({"op": "context", "ref": 9, "set": {"x": 1}, "patch": {"y": 2, "x": null}}),
        json!({"op": "ping", "ref": 10}),
        json!({"op": "ping"}),
        after_clear,
        json!({
            "op": "message", "ref": "mismatch", "content": "different",
            "idempotency_key": "key-1",
        }),
        json!({"op": "message", "ref": "slash", "content": "/clear", "policy": "enqueue"}),
        json!({"op": "cancel", "ref": "nothing"}),
        json!({"op": "ping", "ref": 1.5}),
    ];
    // All sent at once; the replies must come one per op, in the order of the ops.
    for op in &ops {
        ws.send_json(op).await;
    }
    let mut replies = Vec::new();
    let mut events = Vec::new();
    while replies.len() < ops.len() {
        let frame = ws.next_json().await;
        match frame["kind"].as_str() {
            Some("event") => events.push(frame),
            Some("reply" | "pong") => replies.push(frame),
            _ => panic!("unexpected frame: {frame}"),
        }
    }
    for (op, reply) in ops.iter().zip(&replies) {
        assert_eq!(reply["ref"], op["ref"], "op {op} got {reply}");
    }
    let ok = |i: usize| {
        let reply = &replies[i];
        assert_eq!(reply["kind"], "reply", "{}: {reply}", ops[i]);
        assert_eq!(reply["ok"], true, "{}: {reply}", ops[i]);
        reply["data"].clone()
    };
    let failed = |i: usize, code: &str| {
        let reply = &replies[i];
        assert_eq!(reply["kind"], "reply", "{}: {reply}", ops[i]);
        assert_eq!(reply["ok"], false, "{}: {reply}", ops[i]);
        assert_eq!(reply["error"]["code"], code, "{}: {reply}", ops[i]);
        reply["error"].clone()
    };

    let m1 = ok(0);
    assert_eq!(m1["status"], "running", "{m1}");
    assert_eq!(m1["metadata"], json!({"tag": "first", "n": [1, 2]}), "{m1}");
    let m1_id = m1["id"].as_str().expect("id").to_string();
    assert_eq!(
        ok(1)["id"],
        m1_id.as_str(),
        "the same key replays the interaction"
    );
    let queued = ok(2);
    assert_eq!(queued["status"], "queued", "{queued}");
    let busy = failed(3, "session_busy");
    assert_eq!(busy["running"], m1_id.as_str(), "{busy}");
    assert_eq!(ok(4), json!({"cancelled": [m1_id]}));
    assert_eq!(ok(5), json!({"epoch": 1, "cancelled": [queued["id"]]}));
    assert_eq!(ok(6), json!({"a": 1, "b": {"c": 2}}));
    assert_eq!(ok(7), json!({"a": 1, "b": {"d": 3}, "e": 4}));
    assert_eq!(ok(8), json!({"y": 2}));
    assert_eq!(replies[9], json!({"kind": "pong", "ref": 10}));
    assert_eq!(replies[10], json!({"kind": "pong", "ref": null}));
    let renewed = ok(11);
    assert_ne!(renewed["id"], m1_id.as_str(), "a clear forgets the keys");
    assert_eq!(renewed["status"], "running", "{renewed}");
    failed(12, "idempotency_mismatch");
    assert_eq!(ok(13), json!({"epoch": 2, "cancelled": [renewed["id"]]}));
    assert_eq!(ok(14), json!({"cancelled": []}));
    assert_eq!(replies[15], json!({"kind": "pong", "ref": 1.5}));

    // Nothing more: the next reply is the pong to this ping.
    ws.ping().await;

    // One key space for WebSocket and HTTP: each side replays what the other created.
    let (reply, _) = ws
        .request(&json!({
            "op": "message", "ref": "ws-key", "content": "shared key", "idempotency_key": "key-2",
        }))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let ws_created = reply["data"]["id"].clone();
    let body = json!({"content": "shared key"});
    let replay = server
        .request(
            reqwest::Method::POST,
            &format!("/v1/sessions/{session}/messages"),
            Some(&body),
            &[("Idempotency-Key", "key-2")],
        )
        .await;
    assert_eq!(replay.status, StatusCode::OK, "{:?}", replay.body);
    assert_eq!(
        replay.body["id"], ws_created,
        "HTTP replays the WebSocket's key"
    );
    server.wait_idle(session).await;
    let body = json!({"content": "from http"});
    let http_created = server
        .request(
            reqwest::Method::POST,
            &format!("/v1/sessions/{session}/messages"),
            Some(&body),
            &[("Idempotency-Key", "key-3")],
        )
        .await;
    assert_eq!(
        http_created.status,
        StatusCode::ACCEPTED,
        "{:?}",
        http_created.body
    );
    let (reply, _) = ws
        .request(&json!({
            "op": "message", "ref": "ws-replay", "content": "from http",
            "idempotency_key": "key-3",
        }))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(
        reply["data"]["id"], http_created.body["id"],
        "the WebSocket replays HTTP's key"
    );
    server.wait_idle(session).await;
    let stored = server.stored_events(session);
    check_log_invariants(&stored);
    let context = server.get(&format!("/v1/sessions/{session}/context")).await;
    assert_eq!(context.body, json!({}), "the /clear removed the context");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn op_rate_limit_answers_rate_limited_and_keeps_the_connection() {
    let server = TestServer::start(
        r#"
ws_ops_per_second = 5

[agents.default]
kind = "echo"
delay_ms = 0
"#,
    )
    .await;
    let mut ws = Ws::connect(&server, "rate", "").await;
    const BURST: usize = 40;
    for i in 0..BURST {
        ws.send_json(&json!({"op": "ping", "ref": i})).await;
    }
    let mut pongs = 0;
    let mut limited = 0;
    for i in 0..BURST {
        let frame = ws.next_json().await;
        assert_eq!(frame["ref"], i, "answers in order: {frame}");
        match frame["kind"].as_str() {
            Some("pong") => pongs += 1,
            Some("reply") => {
                assert_eq!(frame["ok"], false, "{frame}");
                assert_eq!(frame["error"]["code"], "rate_limited", "{frame}");
                limited += 1;
            }
            _ => panic!("unexpected frame: {frame}"),
        }
    }
    assert!(pongs >= 1, "the first pings of the burst pass");
    assert!(
        limited >= 1,
        "a burst of {BURST} at 5/s is limited ({pongs} pongs)"
    );

    // After a short pause the same connection works again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let reference = ws.fresh_ref();
        ws.send_json(&json!({"op": "ping", "ref": reference})).await;
        let frame = ws.next_json().await;
        assert_eq!(frame["ref"], reference, "{frame}");
        if frame["kind"] == "pong" {
            break;
        }
        assert_eq!(frame["error"]["code"], "rate_limited", "{frame}");
        assert!(tokio::time::Instant::now() < deadline, "never usable again");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(metric(&server, "baton_connections").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_count_toward_the_rate_limit() {
    let server = TestServer::start(
        r#"
ws_ops_per_second = 5

[agents.default]
kind = "echo"
delay_ms = 0
"#,
    )
    .await;
    let mut ws = Ws::connect(&server, "rate-bad", "").await;
    const BURST: usize = 40;
    for _ in 0..BURST {
        ws.send_text("not json").await;
    }
    let mut codes = Vec::new();
    for _ in 0..BURST {
        let frame = ws.next_json().await;
        assert_eq!(frame["kind"], "reply", "{frame}");
        assert_eq!(frame["ok"], false, "{frame}");
        assert_eq!(frame["ref"], Value::Null, "{frame}");
        codes.push(
            frame["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert!(codes.iter().any(|c| c == "invalid_request"), "{codes:?}");
    assert!(
        codes.iter().any(|c| c == "rate_limited"),
        "a burst of {BURST} malformed frames at 5/s is limited: {codes:?}"
    );
    assert_eq!(metric(&server, "baton_connections").await, 1);
}

/// A frame over `max_body_bytes` (API.md does not say what happens). Observed behaviour: the
/// server closes the connection with `1009` ("frame too large"). The client may instead see
/// the connection reset (ECONNRESET) without that close frame: the server closes the socket
/// with the rest of the oversize frame unread, so the kernel sends RST and drops whatever
/// output was not yet transmitted (reproducible when the frame follows an op whose event and
/// reply were just written, e.g. a `clear`). Either way nothing of the frame is stored and the
/// server stays healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frame_is_refused_and_the_server_stays_healthy() {
    let server = TestServer::start(
        r#"
max_body_bytes = 1000

[agents.default]
kind = "echo"
delay_ms = 0
"#,
    )
    .await;
    let session = "oversize";
    let mut ws = Ws::connect(&server, session, "").await;
    // Just under the limit: accepted.
    let content = "y".repeat(900);
    let (reply, _) = ws
        .request(&json!({"op": "message", "ref": "fits", "content": content}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    ws.events_until(|e| e["type"] == "task.completed").await;
    server.wait_idle(session).await;
    let log_before = server.stored_events(session);

    ws.send_json(&json!({"op": "message", "ref": "big", "content": "z".repeat(5000)}))
        .await;
    let mut seen = Vec::new();
    let ending = loop {
        match ws.next_frame().await {
            WsFrame::Json(frame) if frame["kind"] == "event" => seen.push(frame),
            other => break other,
        }
    };
    match &ending {
        WsFrame::Close(Some((code, _))) => assert_eq!(*code, 1009, "{ending:?}"),
        WsFrame::Ended(_) => {}
        other => panic!("expected the connection to close, got {other:?}"),
    }
    drop(ws);
    assert!(seen.is_empty(), "nothing happened: {seen:?}");
    assert_eq!(server.stored_events(session), log_before);

    let health = server.get("/healthz").await;
    assert_eq!(health.status, StatusCode::OK, "{:?}", health.body);
    wait_metric(&server, "baton_connections", 0).await;
    let mut again = Ws::connect(&server, session, "").await;
    again.ping().await;
    let (reply, _) = again
        .request(&json!({"op": "message", "ref": "after", "content": "still here"}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    server
        .wait_final(session, reply["data"]["id"].as_str().expect("id"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_after_or_session_id_refuses_the_upgrade() {
    let server = TestServer::start_default().await;
    for query in [
        "after=-1",
        "after=x",
        "after=1.5",
        "after=",
        "after=99999999999999999999999",
        "replay=maybe",
    ] {
        let refused = ws_refused(&server, "bad-after", query).await;
        assert_eq!(
            refused.status,
            StatusCode::BAD_REQUEST,
            "{query}: {:?}",
            refused.body
        );
        assert_eq!(
            refused.body["error"]["code"], "invalid_request",
            "{query}: {:?}",
            refused.body
        );
        assert!(refused.body["error"]["message"].is_string(), "{query}");
    }
    // The refused upgrades created nothing.
    let absent = server.get("/v1/sessions/bad-after").await;
    assert_eq!(absent.status, StatusCode::NOT_FOUND, "{:?}", absent.body);

    let too_long = "s".repeat(129);
    for id in ["bad%20id", "a%2Fb", "caf%C3%A9", too_long.as_str()] {
        let refused = ws_refused(&server, id, "").await;
        assert_eq!(
            refused.status,
            StatusCode::BAD_REQUEST,
            "{id}: {:?}",
            refused.body
        );
        assert_eq!(
            refused.body["error"]["code"], "invalid_session_id",
            "{id}: {:?}",
            refused.body
        );
    }

    // The same for SSE (on an existing session).
    let created = server.put("/v1/sessions/sse-bad", &json!({})).await;
    assert_eq!(created.status, StatusCode::CREATED);
    for (query, last_event_id) in [("after=-1", None), ("after=x", None), ("", Some("nope"))] {
        let refused = Sse::try_connect(&server, "sse-bad", query, last_event_id)
            .await
            .err()
            .unwrap_or_else(|| panic!("SSE {query} {last_event_id:?} accepted"));
        assert_eq!(
            refused.status,
            StatusCode::BAD_REQUEST,
            "{:?}",
            refused.body
        );
        assert_eq!(refused.body["error"]["code"], "invalid_request");
    }
    let refused = Sse::try_connect(&server, "bad%20id", "", None)
        .await
        .err()
        .expect("refused");
    assert_eq!(
        refused.status,
        StatusCode::BAD_REQUEST,
        "{:?}",
        refused.body
    );
    assert_eq!(refused.body["error"]["code"], "invalid_session_id");

    // And the server still takes good upgrades.
    let mut ws = Ws::connect(&server, "bad-after", "after=0").await;
    ws.ping().await;
    assert_eq!(metric(&server, "baton_connections").await, 1);
}
