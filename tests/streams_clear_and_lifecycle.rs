//! Streams across a session's life: a clear during a run seen over a WebSocket (the `clear` op
//! and a `/clear` message op: every `task.cancelled` before `session.cleared`, nothing about an
//! old interaction after it); closing a WebSocket does not cancel its session's task; `DELETE`
//! sends `session.deleted` then closes WebSockets with 1000 and ends SSE streams; I6: 2,000
//! WebSocket connections opened and dropped leave no connection or subscription counted; the
//! connection bounds refuse upgrades with an HTTP error and a JSON body, and accept again once
//! connections close.

mod common;

use std::collections::HashSet;

use common::stream::{Sse, Ws, WsFrame, assert_exactly, metric, seq_of, wait_metric, ws_refused};
use common::{TestServer, check_log_invariants, interaction_of, words};
use reqwest::StatusCode;
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug)]
enum ClearBy {
    /// `{"op": "clear"}`
    Op,
    /// `{"op": "message", "content": " /clear\n"}` while busy, with policy `reject`.
    Message,
}

async fn clear_over_websocket(server: &TestServer, how: ClearBy) {
    let session = format!("clear-{how:?}").to_lowercase();
    let created = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"agent": "slow", "context": {"k": 1}}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let mut ws = Ws::connect(server, &session, "").await;
    let start = ws.hello_last_seq();
    let mut seen = Vec::new();

    // One running (40 words: 4 s) and two queued, all sent over the WebSocket.
    let (reply, events) = ws
        .request(&json!({"op": "message", "ref": "run", "content": words("run", 40)}))
        .await;
    seen.extend(events);
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["data"]["status"], "running", "{reply}");
    let mut old = vec![reply["data"]["id"].as_str().expect("id").to_string()];
    for i in 0..2 {
        let (reply, events) = ws
            .request(&json!({
                "op": "message", "ref": format!("q{i}"), "content": words(&format!("q{i}"), 3),
                "policy": "enqueue",
            }))
            .await;
        seen.extend(events);
        assert_eq!(reply["ok"], true, "{reply}");
        assert_eq!(reply["data"]["status"], "queued", "{reply}");
        old.push(reply["data"]["id"].as_str().expect("id").to_string());
    }
    // The running task is producing output when the clear comes.
    while seen
        .iter()
        .filter(|e: &&Value| e["type"] == "task.delta")
        .count()
        < 2
    {
        seen.push(ws.next_event().await);
    }

    let clear = match how {
        ClearBy::Op => json!({"op": "clear", "ref": "clear"}),
        ClearBy::Message => json!({
            "op": "message", "ref": "clear", "content": " /clear\n", "policy": "reject",
            "idempotency_key": "ignored-for-clear",
        }),
    };
    let (reply, events) = ws.request(&clear).await;
    seen.extend(events);
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["data"]["epoch"], 1, "{reply}");
    let mut cancelled: Vec<String> = reply["data"]["cancelled"]
        .as_array()
        .expect("cancelled")
        .iter()
        .map(|v| v.as_str().expect("id").to_string())
        .collect();
    cancelled.sort();
    let mut expected = old.clone();
    expected.sort();
    assert_eq!(
        cancelled, expected,
        "the clear cancelled the running and queued ones"
    );
    if !seen.iter().any(|e| e["type"] == "session.cleared") {
        seen.extend(ws.events_until(|e| e["type"] == "session.cleared").await);
    }

    // A message after the clear belongs to the new epoch and runs to completion (2 words:
    // 200 ms, time for a stale task to misbehave if it could).
    let (reply, events) = ws
        .request(&json!({"op": "message", "ref": "after", "content": "new epoch"}))
        .await;
    seen.extend(events);
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["data"]["status"], "running", "{reply}");
    let new_id = reply["data"]["id"].as_str().expect("id").to_string();
    if !seen
        .iter()
        .any(|e| e["type"] == "task.completed" && interaction_of(e).as_deref() == Some(&new_id))
    {
        seen.extend(
            ws.events_until(|e| {
                e["type"] == "task.completed" && interaction_of(e).as_deref() == Some(&new_id)
            })
            .await,
        );
    }
    let extra = ws.ping().await;
    assert!(
        extra.is_empty(),
        "events after the last completion: {extra:?}"
    );

    let cleared_at = seen
        .iter()
        .position(|e| e["type"] == "session.cleared")
        .expect("session.cleared");
    assert_eq!(seen[cleared_at]["data"]["epoch"], 1, "{}", seen[cleared_at]);
    for id in &old {
        let finals: Vec<(usize, &Value)> = seen
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                interaction_of(e).as_deref() == Some(id)
                    && e["type"].as_str().is_some_and(common::is_final_type)
            })
            .collect();
        assert_eq!(finals.len(), 1, "one final event for {id}: {finals:?}");
        let (at, event) = finals[0];
        assert_eq!(event["type"], "task.cancelled", "{event}");
        assert_eq!(
            event["data"]["interaction"]["cancel_reason"], "clear",
            "{event}"
        );
        assert!(
            at < cleared_at,
            "task.cancelled of {id} after session.cleared"
        );
    }
    let old: HashSet<&String> = old.iter().collect();
    for event in &seen[cleared_at..] {
        if let Some(id) = interaction_of(event) {
            assert!(
                !old.contains(&id),
                "an event about an old interaction after the clear: {event}"
            );
        }
    }
    let context = server.get(&format!("/v1/sessions/{session}/context")).await;
    assert_eq!(context.body, json!({}), "the clear removed the context");

    let stored = server.stored_events(&session);
    check_log_invariants(&stored);
    assert_exactly(&format!("clear by {how:?}"), &seen, &stored, start);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_during_a_run_seen_over_websocket() {
    let server = TestServer::start_default().await;
    tokio::join!(
        clear_over_websocket(&server, ClearBy::Op),
        clear_over_websocket(&server, ClearBy::Message),
    );
}

/// Closing (with a close handshake, or by dropping the TCP connection) does not cancel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_websocket_does_not_cancel_the_task() {
    let server = TestServer::start_default().await;
    let content = words("keeps-running", 10);
    let mut ids = Vec::new();
    for graceful in [true, false] {
        let session = format!("close-{graceful}");
        let created = server
            .put(
                &format!("/v1/sessions/{session}"),
                &json!({"agent": "slow"}),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
        let mut ws = Ws::connect(&server, &session, "").await;
        let (reply, _) = ws
            .request(&json!({"op": "message", "ref": 1, "content": content}))
            .await;
        assert_eq!(reply["ok"], true, "{reply}");
        let id = reply["data"]["id"].as_str().expect("id").to_string();
        ws.events_until(|e| e["type"] == "task.delta").await;
        if graceful {
            ws.close().await;
        } else {
            drop(ws);
        }
        ids.push((session, id));
    }
    wait_metric(&server, "baton_connections", 0).await;
    for (session, id) in &ids {
        let done = server.wait_final(session, id).await;
        assert_eq!(done["status"], "completed", "{done}");
        assert_eq!(done["response"], content.as_str(), "{done}");
        let stored = server.stored_events(session);
        check_log_invariants(&stored);
        let finals: Vec<&Value> = stored
            .iter()
            .filter(|e| e["type"].as_str().is_some_and(common::is_final_type))
            .collect();
        assert_eq!(finals.len(), 1, "{finals:?}");
        assert_eq!(finals[0]["type"], "task.completed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_sends_session_deleted_then_closes_streams() {
    let server = TestServer::start_default().await;
    let session = "deleted";
    let created = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"agent": "slow"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let mut sockets = vec![
        Ws::connect(&server, session, "").await,
        Ws::connect(&server, session, "").await,
    ];
    let mut sse = Sse::connect(&server, session, "", None).await;
    let sent = server.send(session, &words("doomed", 50), "reject").await;
    assert_eq!(sent.status, StatusCode::ACCEPTED, "{:?}", sent.body);
    let id = sent.body["id"].as_str().expect("id").to_string();
    sockets[0].events_until(|e| e["type"] == "task.delta").await;
    assert_eq!(metric(&server, "baton_connections").await, 3);

    let deleted = server.delete(&format!("/v1/sessions/{session}")).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{:?}", deleted.body);

    let mut deleted_seq = 0;
    for (i, mut ws) in sockets.into_iter().enumerate() {
        let mut events = ws.events_until(|e| e["type"] == "session.deleted").await;
        let last = events.pop().expect("session.deleted");
        assert_eq!(last["data"], json!({}), "{last}");
        deleted_seq = seq_of(&last);
        let cancelled = events
            .iter()
            .find(|e| e["type"] == "task.cancelled")
            .unwrap_or_else(|| panic!("WebSocket {i}: no task.cancelled before session.deleted"));
        assert_eq!(cancelled["data"]["interaction"]["id"], id.as_str());
        assert_eq!(
            cancelled["data"]["interaction"]["cancel_reason"], "delete",
            "{cancelled}"
        );
        match ws.next_frame().await {
            WsFrame::Close(Some((code, _))) => assert_eq!(code, 1000, "WebSocket {i}"),
            other => panic!("WebSocket {i}: expected a close frame 1000, got {other:?}"),
        }
    }
    let events = sse.events_until(|e| e["type"] == "session.deleted").await;
    assert!(
        events.iter().any(|e| e["type"] == "task.cancelled"
            && e["data"]["interaction"]["cancel_reason"] == "delete"),
        "{events:?}"
    );
    assert_eq!(
        sse.next_event().await,
        None,
        "the SSE stream ends after session.deleted"
    );

    wait_metric(&server, "baton_connections", 0).await;
    wait_metric(&server, "baton_subscribers", 0).await;
    let gone = server.get(&format!("/v1/sessions/{session}")).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND, "{:?}", gone.body);
    // The id can be used again; its seqs are never reused (a client resuming cannot mistake
    // new events for old ones).
    let mut again = Ws::connect(&server, session, "replay=true").await;
    assert_eq!(again.hello["session"]["epoch"], 0, "{}", again.hello);
    assert!(
        again.hello["session"]["running"].is_null(),
        "{}",
        again.hello
    );
    let created = again.next_event().await;
    assert_eq!(created["type"], "session.created", "{created}");
    assert!(
        seq_of(&created) > deleted_seq,
        "seq {} reused after the delete ({deleted_seq})",
        seq_of(&created)
    );
}

/// I6: 2,000 WebSocket connections, in batches of 250 opened concurrently (half on one
/// session, a quarter spread over ten sessions, a quarter on sessions of their own), then
/// dropped (closed, cut, or cut with an op in flight): the counts go back to exactly zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_leave_nothing_behind() {
    const BATCHES: usize = 8;
    const BATCH: usize = 250;
    let server = std::sync::Arc::new(TestServer::start_default().await);
    for batch in 0..BATCHES {
        let mut opening = Vec::new();
        for i in 0..BATCH {
            let session = match i % 4 {
                0 | 1 => "churn-shared".to_string(),
                2 => format!("churn-group-{}", i % 10),
                _ => format!("churn-own-{batch}-{i}"),
            };
            let server = std::sync::Arc::clone(&server);
            opening.push(tokio::spawn(async move {
                Ws::connect(&server, &session, "").await
            }));
        }
        let mut open = Vec::new();
        for task in opening {
            open.push(task.await.expect("connect"));
        }
        assert_eq!(
            metric(&server, "baton_connections").await,
            BATCH as u64,
            "batch {batch}: every open connection is counted"
        );
        let mut closing = Vec::new();
        for (i, mut ws) in open.into_iter().enumerate() {
            closing.push(tokio::spawn(async move {
                match i % 3 {
                    0 => ws.close().await,
                    1 => drop(ws),
                    _ => {
                        ws.send_json(&json!({"op": "ping", "ref": i})).await;
                        drop(ws);
                    }
                }
            }));
        }
        for task in closing {
            task.await.expect("close");
        }
        wait_metric(&server, "baton_connections", 0).await;
    }
    wait_metric(&server, "baton_connections", 0).await;
    wait_metric(&server, "baton_connected_sessions", 0).await;
    wait_metric(&server, "baton_subscribers", 0).await;
    wait_metric(&server, "baton_subscribed_sessions", 0).await;
    // Still serving.
    let mut ws = Ws::connect(&server, "churn-shared", "").await;
    ws.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_bounds_refuse_with_json_and_recover() {
    let server = TestServer::start(
        r#"
max_connections = 5
max_connections_per_session = 3

[agents.default]
kind = "echo"
delay_ms = 0
"#,
    )
    .await;
    for id in ["b-a", "b-b", "b-c"] {
        let created = server.put(&format!("/v1/sessions/{id}"), &json!({})).await;
        assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    }
    let mut on_a = Vec::new();
    for _ in 0..3 {
        on_a.push(Ws::connect(&server, "b-a", "").await);
    }
    // The fourth on one session: 429 rate_limited, WebSocket or SSE alike.
    let refused = ws_refused(&server, "b-a", "").await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{:?}",
        refused.body
    );
    assert_eq!(
        refused.body["error"]["code"], "rate_limited",
        "{:?}",
        refused.body
    );
    assert!(
        refused.body["error"]["message"].is_string(),
        "{:?}",
        refused.body
    );
    let refused = Sse::try_connect(&server, "b-a", "", None)
        .await
        .err()
        .expect("a fourth SSE on the session is refused");
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{:?}",
        refused.body
    );
    assert_eq!(
        refused.body["error"]["code"], "rate_limited",
        "{:?}",
        refused.body
    );

    let on_b = Ws::connect(&server, "b-b", "").await;
    let sse_c = Sse::connect(&server, "b-c", "", None).await;
    assert_eq!(metric(&server, "baton_connections").await, 5);
    // The sixth in all, on other sessions: 503 unavailable; nothing is created.
    for session in ["b-d", "b-b"] {
        let refused = ws_refused(&server, session, "").await;
        assert_eq!(
            refused.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{:?}",
            refused.body
        );
        assert_eq!(
            refused.body["error"]["code"], "unavailable",
            "{:?}",
            refused.body
        );
    }
    let refused = Sse::try_connect(&server, "b-c", "", None)
        .await
        .err()
        .expect("a sixth connection (SSE) is refused");
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        refused.body
    );
    let absent = server.get("/v1/sessions/b-d").await;
    assert_eq!(absent.status, StatusCode::NOT_FOUND, "{:?}", absent.body);
    assert_eq!(metric(&server, "baton_connections").await, 5);

    // Close one on b-a: b-a takes a third one again.
    on_a.pop().expect("socket").close().await;
    wait_metric(&server, "baton_connections", 4).await;
    on_a.push(Ws::connect(&server, "b-a", "").await);
    // End the SSE stream: a new session is accepted.
    drop(sse_c);
    wait_metric(&server, "baton_connections", 4).await;
    let mut on_d = Ws::connect(&server, "b-d", "").await;
    on_d.ping().await;
    assert_eq!(metric(&server, "baton_connections").await, 5);

    drop(on_b);
    drop(on_d);
    for ws in on_a {
        ws.close().await;
    }
    wait_metric(&server, "baton_connections", 0).await;
    wait_metric(&server, "baton_subscribers", 0).await;
}

/// A read of a session that does not exist (SSE) is `404 not_found` and leaves no connection
/// or subscription counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_on_a_missing_session_is_404_and_leaves_nothing() {
    let server = TestServer::start_default().await;
    for (query, last_event_id) in [("", None), ("after=0", None), ("replay=true", Some("3"))] {
        let refused = Sse::try_connect(&server, "never-created", query, last_event_id)
            .await
            .err()
            .expect("SSE on a missing session is refused");
        assert_eq!(refused.status, StatusCode::NOT_FOUND, "{:?}", refused.body);
        assert_eq!(
            refused.body["error"]["code"], "not_found",
            "{:?}",
            refused.body
        );
    }
    let absent = server.get("/v1/sessions/never-created").await;
    assert_eq!(absent.status, StatusCode::NOT_FOUND, "{:?}", absent.body);
    wait_metric(&server, "baton_connections", 0).await;
    wait_metric(&server, "baton_subscribers", 0).await;
    wait_metric(&server, "baton_subscribed_sessions", 0).await;
}

/// A peer that never answers the server's pings is dropped after two intervals (and uncounted);
/// a peer that keeps talking stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_is_dropped_by_the_ping_interval() {
    let server = TestServer::start(
        r#"
ws_ping_interval_s = 0.5

[agents.default]
kind = "echo"
delay_ms = 0
"#,
    )
    .await;
    // Connected, then never read from: it cannot answer pings.
    let silent = Ws::connect(&server, "pinged", "").await;
    let mut talking = Ws::connect(&server, "pinged", "").await;
    assert_eq!(metric(&server, "baton_connections").await, 2);
    // The talking peer sends an op every 100 ms until the silent one is gone.
    let deadline = tokio::time::Instant::now() + common::TIMEOUT;
    while metric(&server, "baton_connections").await != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the silent peer was never dropped"
        );
        talking.ping().await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    talking.ping().await;
    drop(silent);
    talking.close().await;
    wait_metric(&server, "baton_connections", 0).await;
}

/// Server shutdown closes WebSockets with 1001 and ends SSE streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_websockets_with_1001() {
    let server = TestServer::start_default().await;
    let created = server
        .put("/v1/sessions/shutdown", &json!({"agent": "slow"}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let mut ws = Ws::connect(&server, "shutdown", "").await;
    let mut sse = Sse::connect(&server, "shutdown", "", None).await;
    let sent = server.send("shutdown", &words("long", 100), "reject").await;
    assert_eq!(sent.status, StatusCode::ACCEPTED, "{:?}", sent.body);
    ws.events_until(|e| e["type"] == "task.delta").await;
    let ws_reader = tokio::spawn(async move { ws.until_close().await });
    let sse_reader = tokio::spawn(async move {
        while let Some(event) = sse.next_event().await {
            let _ = event;
        }
    });
    server.stop().await;
    let (_, close) = tokio::time::timeout(common::TIMEOUT, ws_reader)
        .await
        .expect("the WebSocket is closed in time")
        .expect("reader");
    let (code, _) = close.expect("a close frame with a code");
    assert_eq!(code, 1001);
    tokio::time::timeout(common::TIMEOUT, sse_reader)
        .await
        .expect("the SSE stream ends in time")
        .expect("reader");
}

/// RFC 6455 §5.5.1: a client's close is answered with a close frame echoing its code, idle or
/// while events stream, so browsers and Node see a clean close (not `1006`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_close_is_answered_with_its_code() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let server = TestServer::start_default().await;
    for (code, streaming) in [(1000u16, false), (4000, false), (1000, true), (4000, true)] {
        let session = format!("close-{code}-{streaming}");
        server
            .put(
                &format!("/v1/sessions/{session}"),
                &json!({"agent": "slow"}),
            )
            .await;
        let mut ws = Ws::connect(&server, &session, "").await;
        if streaming {
            let (reply, _) = ws
                .request(&json!({"op": "message", "ref": 1, "content": words("closing", 40)}))
                .await;
            assert_eq!(reply["ok"], true, "{reply}");
            ws.events_until(|e| e["type"] == "task.delta").await;
        }
        futures_util::SinkExt::send(
            &mut ws.socket,
            tokio_tungstenite::tungstenite::Message::Close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: "bye".into(),
            })),
        )
        .await
        .expect("send close");
        let answer = loop {
            match ws.next_frame().await {
                WsFrame::Json(frame) if frame["kind"] == "event" => continue,
                other => break other,
            }
        };
        assert!(
            matches!(&answer, WsFrame::Close(Some((echoed, _))) if *echoed == code),
            "close {code} (streaming: {streaming}) answered with {answer:?}"
        );
    }
    wait_metric(&server, "baton_connections", 0).await;
    server.stop().await;
}
