//! I4 fan-out: four WebSocket clients and one SSE client of one session, all connected before
//! the work starts, receive the same events in the same order — exactly the stored log after
//! the position they connected at (same seqs, same envelopes, no gap, no duplicate). `hello`
//! comes first on each WebSocket and carries the Session as it was.

mod common;

use common::stream::{Sse, Ws, assert_exactly, last_stored_seq, seqs};
use common::{TestServer, check_log_invariants, interaction_of, words};
use reqwest::StatusCode;
use serde_json::{Value, json};

const CONFIG: &str = r#"
queue_limit = 64

[agents.default]
kind = "echo"
delay_ms = 0
"#;

const MESSAGES: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscriber_sees_the_stored_log_in_order() {
    let server = TestServer::start(CONFIG).await;
    let session = "fan-out";
    let created = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"context": {"k": "v"}}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let before = server.get(&format!("/v1/sessions/{session}")).await.body;
    let start = before["last_seq"].as_i64().expect("last_seq");
    assert_eq!(start, last_stored_seq(&server, session));

    let mut sockets = Vec::new();
    for _ in 0..4 {
        let ws = Ws::connect(&server, session, "").await;
        // hello: the Session as it is now (nothing runs, nothing changed since the GET).
        let hello = &ws.hello["session"];
        assert_eq!(hello["id"], session, "{hello}");
        assert_eq!(hello["agent"], "default", "{hello}");
        assert_eq!(hello["context"], json!({"k": "v"}), "{hello}");
        assert_eq!(hello["epoch"], 0, "{hello}");
        assert_eq!(hello["last_seq"], start, "{hello}");
        assert_eq!(hello["created_at"], before["created_at"], "{hello}");
        assert!(hello["running"].is_null(), "{hello}");
        assert_eq!(hello["queued"], 0, "{hello}");
        sockets.push(ws);
    }
    let sse = Sse::connect(&server, session, "", None).await;

    // Every subscriber reads live, concurrently, until it has seen all 20 completions.
    let all_done = |events: &[Value]| {
        events
            .iter()
            .filter(|e| e["type"] == "task.completed")
            .count()
            == MESSAGES
    };
    let mut readers = Vec::new();
    for (i, mut ws) in sockets.into_iter().enumerate() {
        readers.push(tokio::spawn(async move {
            let mut events = Vec::new();
            while !all_done(&events) {
                events.push(ws.next_event().await);
            }
            // Nothing else is pending: the next frame is the pong.
            let extra = ws.ping().await;
            assert!(
                extra.is_empty(),
                "events after the last completion: {extra:?}"
            );
            (format!("WebSocket {i}"), events)
        }));
    }
    readers.push(tokio::spawn(async move {
        let mut sse = sse;
        let mut events = Vec::new();
        while !all_done(&events) {
            events.push(sse.expect_event().await);
        }
        ("SSE".to_string(), events)
    }));

    // The work: 20 messages, enqueued behind each other.
    let mut ids = Vec::new();
    for i in 0..MESSAGES {
        let answer = server
            .send(session, &words(&format!("m{i}"), 8), "enqueue")
            .await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
        ids.push(answer.body["id"].as_str().expect("id").to_string());
    }
    let mut received: Vec<(String, Vec<Value>)> = Vec::new();
    for reader in readers {
        received.push(reader.await.expect("reader"));
    }
    server.wait_idle(session).await;

    let stored = server.stored_events(session);
    check_log_invariants(&stored);
    let completed: Vec<String> = stored
        .iter()
        .filter(|e| e["type"] == "task.completed")
        .filter_map(interaction_of)
        .collect();
    assert_eq!(completed, ids, "every message completed, in order");

    for (what, events) in &received {
        let seqs = seqs(events);
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{what}: seqs not strictly increasing: {seqs:?}"
        );
        assert_exactly(what, events, &stored, start);
    }
    // Identical to each other too (follows from the above; said explicitly).
    for (what, events) in &received[1..] {
        assert_eq!(events, &received[0].1, "{what} differs from WebSocket 0");
    }
}
