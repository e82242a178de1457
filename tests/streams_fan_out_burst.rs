//! I4 under a burst: fifty WebSocket subscribers of one session, all connected before a long
//! message is echoed by the instant agent (thousands of deltas produced far faster than fifty
//! sockets can carry them), each read everything. Every subscriber ends up with every event
//! of the session after its `hello` exactly once, in seq order, with the deltas spelling the
//! content exactly; a subscriber the server finds lagging is closed with `1013` and
//! `after=<the last seq it was sent>`, and resuming from there loses nothing. No timing is
//! asserted.

mod common;

use std::sync::Arc;

use common::stream::{Ws, WsFrame, envelope_of, seq_of};
use common::{TestServer, words};
use reqwest::StatusCode;
use serde_json::{Value, json};

const CONFIG: &str = r#"
queue_limit = 16

[agents.default]
kind = "echo"
delay_ms = 0
"#;

const SUBSCRIBERS: usize = 50;
const WORDS: usize = 10_000;
/// Resumes one subscriber may need at most (a bound for the loop, far above what happens).
const MAX_RESUMES: usize = 1_000;

/// What one subscriber saw: every event after its hello, and how often it resumed.
struct Seen {
    first_after: i64,
    events: Vec<Value>,
    resumes: usize,
}

/// Reads until the `task.completed` of `interaction`, resuming after every `1013`.
async fn read_all(
    server: Arc<TestServer>,
    session: String,
    mut ws: Ws,
    interaction: String,
) -> Seen {
    let first_after = ws.hello_last_seq();
    let mut last = first_after;
    let mut events = Vec::new();
    let mut resumes = 0;
    loop {
        match ws.next_frame().await {
            WsFrame::Json(frame) if frame["kind"] == "event" => {
                let event = envelope_of(&frame);
                last = seq_of(&event);
                let done = event["type"] == "task.completed"
                    && event["data"]["interaction"]["id"] == interaction.as_str();
                events.push(event);
                if done {
                    return Seen {
                        first_after,
                        events,
                        resumes,
                    };
                }
            }
            WsFrame::Json(_) => {}
            WsFrame::Close(Some((1013, reason))) => {
                assert_eq!(
                    reason,
                    format!("after={last}"),
                    "a lagging subscriber is told to resume after the last seq it was sent"
                );
                resumes += 1;
                assert!(resumes <= MAX_RESUMES, "{resumes} resumes");
                ws = Ws::connect(&server, &session, &format!("after={last}")).await;
            }
            other => panic!("unexpected frame: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_subscribers_get_every_delta_of_a_burst_once_in_order() {
    let server = Arc::new(TestServer::start(CONFIG).await);
    let session = "burst";
    let created = server
        .put(&format!("/v1/sessions/{session}"), &json!({}))
        .await;
    assert!(created.status.is_success(), "{:?}", created.body);
    let mut sockets = Vec::with_capacity(SUBSCRIBERS);
    for _ in 0..SUBSCRIBERS {
        sockets.push(Ws::connect(&server, session, "").await);
    }
    let content = words("w", WORDS);
    let accepted = server
        .post(
            &format!("/v1/sessions/{session}/messages"),
            &json!({"content": content}),
        )
        .await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{:?}", accepted.body);
    let interaction = accepted.body["id"]
        .as_str()
        .expect("interaction id")
        .to_string();

    // The first subscriber starts reading only once the interaction is final, far behind:
    // the server then either still holds everything for it or closes it with 1013 (both
    // lawful; either way it must end up with every event).
    let late = sockets.remove(0);
    let spawn = |ws: Ws| {
        tokio::spawn(read_all(
            server.clone(),
            session.to_string(),
            ws,
            interaction.clone(),
        ))
    };
    let mut readers: Vec<_> = sockets.into_iter().map(spawn).collect();
    let finished = server.wait_final(session, &interaction).await;
    assert_eq!(finished["status"], "completed", "{finished}");
    readers.insert(0, spawn(late));
    let mut resumed = 0;
    for (i, reader) in readers.into_iter().enumerate() {
        let seen = reader.await.expect("subscriber");
        resumed += seen.resumes;
        // Every seq after the hello, once, in order: no gap, no duplicate.
        for (n, event) in seen.events.iter().enumerate() {
            assert_eq!(
                seq_of(event),
                seen.first_after + 1 + n as i64,
                "subscriber {i}: event {n} out of order or missing"
            );
        }
        let deltas: Vec<&str> = seen
            .events
            .iter()
            .filter(|e| e["type"] == "task.delta" && e["data"]["interaction_id"] == interaction)
            .map(|e| e["data"]["text"].as_str().expect("delta text"))
            .collect();
        assert_eq!(deltas.len(), WORDS, "subscriber {i}: one delta per word");
        assert!(
            deltas.concat() == content,
            "subscriber {i}: the deltas spell the content exactly"
        );
    }
    eprintln!("{SUBSCRIBERS} subscribers, {resumed} resumes after 1013");
}
