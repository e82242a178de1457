//! I4 at the replay/live seam, under load: while the instant echo agent writes events as fast
//! as it can (a producer keeps the queue full of long messages), a client connects again and
//! again with `after=<a recent seq>` (sometimes the newest, sometimes further back, across a
//! replay page) and reads until it is well past where it started. Every sequence it received
//! must be exactly the stored log after its `after`: no gap, no duplicate at the seam.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::stream::{
    Sse, SseItem, Ws, WsFrame, assert_contiguous, check_sse_message, envelope_of, seq_of,
    wait_last_seq,
};
use common::{TestServer, check_log_invariants, words};
use reqwest::StatusCode;
use serde_json::{Value, json};

const CONFIG: &str = r#"
queue_limit = 8

[agents.default]
kind = "echo"
delay_ms = 0
"#;

/// Connections per test.
const ROUNDS: usize = 30;
/// Each connection reads until it is this far past the newest seq at connect time.
const BEYOND: i64 = 200;
/// How far back from the newest seq each connection starts (cycled); 1100 crosses a replay
/// page (1000 events).
const BACK: [i64; 7] = [0, 1, 2, 7, 40, 300, 1100];

#[derive(Clone, Copy, Debug)]
enum Transport {
    Ws,
    /// SSE, alternating between `?after=` and `Last-Event-ID`.
    Sse,
}

/// Keeps the session's queue full until `stop`; returns how many messages were accepted.
fn start_producer(
    server: Arc<TestServer>,
    session: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut accepted = 0;
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let answer = server
                .send(session, &words(&format!("p{i}"), 100), "enqueue")
                .await;
            match answer.status {
                StatusCode::ACCEPTED => {
                    accepted += 1;
                }
                StatusCode::TOO_MANY_REQUESTS => {
                    assert_eq!(answer.code(), Some("queue_full"), "{:?}", answer.body);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                other => panic!("producer: unexpected {other}: {:?}", answer.body),
            }
        }
        accepted
    })
}

/// Reads from `after` until an event with `seq >= target`. A client closed for being too slow
/// (1013, `after=<seq>`: possible on a loaded machine, not expected) resumes from there, so the
/// sequence must still be contiguous.
async fn read_ws_through(
    server: &TestServer,
    session: &str,
    after: i64,
    target: i64,
    newest: i64,
) -> Vec<Value> {
    let mut events: Vec<Value> = Vec::new();
    let mut from = after;
    loop {
        let mut ws = Ws::connect(server, session, &format!("after={from}")).await;
        assert!(ws.hello_last_seq() >= newest, "{}", ws.hello);
        loop {
            match ws.next_frame().await {
                WsFrame::Json(frame) if frame["kind"] == "event" => {
                    let event = envelope_of(&frame);
                    let seq = seq_of(&event);
                    events.push(event);
                    if seq >= target {
                        return events;
                    }
                }
                WsFrame::Close(Some((1013, reason))) => {
                    from = events.last().map(seq_of).unwrap_or(from);
                    assert_eq!(
                        reason,
                        format!("after={from}"),
                        "1013 names the last seq sent"
                    );
                    eprintln!("WebSocket lagged at {from}; resuming");
                    break;
                }
                other => panic!("unexpected WebSocket frame: {other:?}"),
            }
        }
    }
}

/// Like [`read_ws_through`] for SSE (a lagging stream ends after a `too slow` comment).
async fn read_sse_through(
    server: &TestServer,
    session: &str,
    after: i64,
    target: i64,
    by_header: bool,
) -> Vec<Value> {
    let mut events: Vec<Value> = Vec::new();
    let mut from = after;
    loop {
        let mut sse = if by_header {
            Sse::connect(server, session, "", Some(&from.to_string())).await
        } else {
            Sse::connect(server, session, &format!("after={from}"), None).await
        };
        let mut last_comment = String::new();
        loop {
            match sse.next_item().await {
                Some(SseItem::Message(message)) => {
                    let event = check_sse_message(&message);
                    let seq = seq_of(&event);
                    events.push(event);
                    if seq >= target {
                        return events;
                    }
                }
                Some(SseItem::Comment(comment)) => last_comment = comment,
                None => {
                    from = events.last().map(seq_of).unwrap_or(from);
                    assert!(
                        last_comment.contains(&format!("after={from}")),
                        "an SSE stream ended early without saying where to resume: \
                         {last_comment:?}"
                    );
                    eprintln!("SSE lagged at {from}; resuming");
                    break;
                }
            }
        }
    }
}

async fn seam_under_load(transport: Transport) {
    let server = Arc::new(TestServer::start(CONFIG).await);
    let session = "seam";
    let created = server
        .put(&format!("/v1/sessions/{session}"), &json!({}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let stop = Arc::new(AtomicBool::new(false));
    let producer = start_producer(Arc::clone(&server), session, Arc::clone(&stop));
    // Some history first, so that going back has something to replay.
    wait_last_seq(&server, session, 1500).await;

    let mut rounds: Vec<(i64, i64, Vec<Value>)> = Vec::new();
    for round in 0..ROUNDS {
        let newest = server.get(&format!("/v1/sessions/{session}")).await.body["last_seq"]
            .as_i64()
            .expect("last_seq");
        let after = (newest - BACK[round % BACK.len()]).max(0);
        let target = newest + BEYOND;
        let events = match transport {
            Transport::Ws => read_ws_through(&server, session, after, target, newest).await,
            Transport::Sse => {
                let by_header = round % 2 == 1;
                read_sse_through(&server, session, after, target, by_header).await
            }
        };
        rounds.push((after, target, events));
    }

    stop.store(true, Ordering::Relaxed);
    let accepted = producer.await.expect("producer");
    assert!(accepted > 0);
    server.wait_idle(session).await;

    let stored = server.stored_events(session);
    check_log_invariants(&stored);
    for (round, (after, target, events)) in rounds.iter().enumerate() {
        assert_contiguous(
            &format!("{transport:?} round {round} (after={after})"),
            events,
            &stored,
            *after,
        );
        let last = events.last().map(seq_of).expect("events");
        assert!(last >= *target, "round {round}: read up to {last}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_seam_is_gap_free_under_load() {
    seam_under_load(Transport::Ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_seam_is_gap_free_under_load() {
    seam_under_load(Transport::Sse).await;
}
