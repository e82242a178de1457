//! I4 resume: a client that drops mid-task and comes back with `after=<last seq it received>`
//! (WebSocket `?after=`, SSE `Last-Event-ID`, SSE `?after=`) misses nothing and gets nothing
//! twice: the union of both connections is exactly the stored log from its first seq on,
//! ending in `task.completed` whose `response` is the concatenated deltas. `?replay=true` gives
//! every retained event; with neither `after` nor `replay`, only events after
//! `hello.session.last_seq` (WebSocket) or after the session's `last_seq` (SSE) follow.

mod common;

use common::stream::{
    Sse, Ws, assert_contiguous, assert_exactly, deltas_text, last_stored_seq, seq_of, seqs,
    wait_last_seq,
};
use common::{TestServer, check_log_invariants, words};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Words of the running task: 40 × 100 ms, so it is still running across the reconnect.
const WORDS: usize = 40;
/// Deltas received before the first connection is dropped.
const DELTAS_BEFORE_DROP: usize = 8;

#[derive(Clone, Copy, Debug)]
enum Transport {
    WsAfter,
    SseLastEventId,
    SseAfter,
}

/// A stream client of either kind, for the resume scenario.
enum Client {
    Ws(Box<Ws>),
    Sse(Sse),
}

impl Client {
    /// Connects resuming after `after` (`None`: live only).
    async fn connect(
        server: &TestServer,
        session: &str,
        transport: Transport,
        after: Option<i64>,
    ) -> Client {
        match (transport, after) {
            (Transport::WsAfter, Some(after)) => Client::Ws(Box::new(
                Ws::connect(server, session, &format!("after={after}")).await,
            )),
            (Transport::WsAfter, None) => {
                Client::Ws(Box::new(Ws::connect(server, session, "").await))
            }
            (Transport::SseLastEventId, Some(after)) => {
                Client::Sse(Sse::connect(server, session, "", Some(&after.to_string())).await)
            }
            (Transport::SseAfter, Some(after)) => {
                Client::Sse(Sse::connect(server, session, &format!("after={after}"), None).await)
            }
            (_, None) => Client::Sse(Sse::connect(server, session, "", None).await),
        }
    }

    async fn next_event(&mut self) -> Value {
        match self {
            Client::Ws(ws) => ws.next_event().await,
            Client::Sse(sse) => sse.expect_event().await,
        }
    }
}

async fn resume_mid_task(server: &TestServer, transport: Transport) {
    let session = format!("resume-{transport:?}").to_lowercase();
    let created = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"agent": "slow"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let start = created.body["last_seq"].as_i64().expect("last_seq");

    // First connection: live events only (nothing happens between the PUT and here).
    let mut first = Client::connect(server, &session, transport, None).await;
    if let Client::Ws(ws) = &first {
        assert_eq!(ws.hello_last_seq(), start, "{}", ws.hello);
    }
    let content = words("resume", WORDS);
    let sent = server.send(&session, &content, "reject").await;
    assert_eq!(sent.status, StatusCode::ACCEPTED, "{:?}", sent.body);
    let id = sent.body["id"].as_str().expect("id").to_string();

    let mut received = Vec::new();
    while received
        .iter()
        .filter(|e: &&Value| e["type"] == "task.delta")
        .count()
        < DELTAS_BEFORE_DROP
    {
        received.push(first.next_event().await);
    }
    let dropped_at = received.last().map(seq_of).expect("events");
    drop(first);

    // The task goes on while nobody listens: wait for three more stored events.
    wait_last_seq(server, &session, dropped_at + 3).await;
    let running = server
        .get(&format!("/v1/sessions/{session}/interactions/{id}"))
        .await;
    assert_eq!(running.body["status"], "running", "{:?}", running.body);

    let mut second = Client::connect(server, &session, transport, Some(dropped_at)).await;
    if let Client::Ws(ws) = &second {
        let hello = &ws.hello["session"];
        assert_eq!(hello["running"]["id"], id.as_str(), "{hello}");
        assert!(
            hello["last_seq"].as_i64() >= Some(dropped_at + 3),
            "{hello}"
        );
    }
    loop {
        let event = second.next_event().await;
        let done = event["type"] == "task.completed";
        received.push(event);
        if done {
            break;
        }
    }
    if let Client::Ws(mut ws) = second {
        let extra = ws.ping().await;
        assert!(extra.is_empty(), "events after the final one: {extra:?}");
    }

    let stored = server.stored_events(&session);
    check_log_invariants(&stored);
    // Union of both connections == the stored log after the session's creation.
    assert_exactly(&format!("{transport:?}"), &received, &stored, start);
    let last = received.last().expect("events");
    assert_eq!(last["type"], "task.completed", "{last}");
    assert_eq!(last["data"]["interaction"]["id"], id.as_str(), "{last}");
    let response = last["data"]["interaction"]["response"]
        .as_str()
        .expect("response");
    assert_eq!(response, content);
    assert_eq!(deltas_text(&received, &id), response, "deltas add up");
}

/// The three ways of resuming, each on its own session of one server, at the same time (each
/// takes the 4 s of its slow task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_client_resumes_without_gap_or_duplicate() {
    let server = TestServer::start_default().await;
    tokio::join!(
        resume_mid_task(&server, Transport::WsAfter),
        resume_mid_task(&server, Transport::SseLastEventId),
        resume_mid_task(&server, Transport::SseAfter),
    );
}

/// A session with some history: a PUT (created, context) and two completed messages.
async fn session_with_history(server: &TestServer, session: &str) -> Vec<Value> {
    let created = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"context": {"a": 1}}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    for i in 0..2 {
        let sent = server
            .send(session, &words(&format!("h{i}"), 5), "reject")
            .await;
        assert_eq!(sent.status, StatusCode::ACCEPTED, "{:?}", sent.body);
        server
            .wait_final(session, sent.body["id"].as_str().expect("id"))
            .await;
    }
    server.wait_idle(session).await;
    let stored = server.stored_events(session);
    assert!(stored.len() > 10, "{stored:?}");
    stored
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_true_gives_every_retained_event() {
    let server = TestServer::start_default().await;
    let session = "replay";
    let stored = session_with_history(&server, session).await;
    let last = stored.last().map(seq_of).expect("events");

    let mut ws = Ws::connect(&server, session, "replay=true").await;
    assert_eq!(ws.hello_last_seq(), last, "{}", ws.hello);
    let events = ws.events_through(last).await;
    assert_exactly("WebSocket replay=true", &events, &stored, 0);
    assert_eq!(seqs(&events), seqs(&stored));
    let extra = ws.ping().await;
    assert!(extra.is_empty(), "nothing follows the replay: {extra:?}");

    let mut sse = Sse::connect(&server, session, "replay=true", None).await;
    let events = sse.events_through(last).await;
    assert_exactly("SSE replay=true", &events, &stored, 0);

    // `after` wins over `replay` when both are given (`replay` is for when `after` is absent).
    let mut ws = Ws::connect(&server, session, "replay=true&after=3").await;
    let events = ws.events_through(last).await;
    assert_exactly("WebSocket replay=true&after=3", &events, &stored, 3);

    // Still live afterwards: a new message arrives on both.
    let sent = server.send(session, "one more", "reject").await;
    assert_eq!(sent.status, StatusCode::ACCEPTED, "{:?}", sent.body);
    let live_ws = ws.events_until(|e| e["type"] == "task.completed").await;
    let mut sse_live = Vec::new();
    let mut sse = sse;
    while sse_live
        .last()
        .map(|e: &Value| e["type"] != "task.completed")
        .unwrap_or(true)
    {
        sse_live.push(sse.expect_event().await);
    }
    let stored = server.stored_events(session);
    assert_exactly("WebSocket live after replay", &live_ws, &stored, last);
    assert_exactly("SSE live after replay", &sse_live, &stored, last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_after_or_replay_only_new_events_follow() {
    let server = TestServer::start_default().await;
    let session = "live-only";
    let stored = session_with_history(&server, session).await;
    let last = stored.last().map(seq_of).expect("events");

    let mut ws = Ws::connect(&server, session, "").await;
    assert_eq!(ws.hello_last_seq(), last, "{}", ws.hello);
    let mut sse = Sse::connect(&server, session, "", None).await;
    // No replay: the first frame after hello is the pong.
    let extra = ws.ping().await;
    assert!(
        extra.is_empty(),
        "no replay without after/replay: {extra:?}"
    );

    let sent = server.send(session, "fresh words here", "reject").await;
    assert_eq!(sent.status, StatusCode::ACCEPTED, "{:?}", sent.body);
    let live_ws = ws.events_until(|e| e["type"] == "task.completed").await;
    let mut live_sse = Vec::new();
    while live_sse
        .last()
        .map(|e: &Value| e["type"] != "task.completed")
        .unwrap_or(true)
    {
        live_sse.push(sse.expect_event().await);
    }
    let stored = server.stored_events(session);
    check_log_invariants(&stored);
    assert_eq!(
        seq_of(&live_ws[0]),
        last + 1,
        "the first live event: {:?}",
        live_ws[0]
    );
    assert_exactly("WebSocket live only", &live_ws, &stored, last);
    assert_exactly("SSE live only", &live_sse, &stored, last);
    assert_eq!(
        last_stored_seq(&server, session),
        seq_of(live_ws.last().expect("events"))
    );

    // A replay from the middle (after=N) gives exactly the stored events after N.
    let middle = seq_of(&stored[stored.len() / 2]);
    let mut ws = Ws::connect(&server, session, &format!("after={middle}")).await;
    let events = ws.events_through(last_stored_seq(&server, session)).await;
    assert_exactly("WebSocket after=middle", &events, &stored, middle);
    let mut sse = Sse::connect(&server, session, "", Some(&middle.to_string())).await;
    let events = sse.events_through(last_stored_seq(&server, session)).await;
    assert_contiguous("SSE Last-Event-ID=middle", &events, &stored, middle);
    assert_exactly("SSE Last-Event-ID=middle", &events, &stored, middle);
}

/// The test's own SSE parser: fields split across chunks at every byte, CRLF line ends,
/// multi-line data, comments, and blank lines without an event.
#[test]
fn sse_parser_reassembles_events_from_any_chunking() {
    use common::stream::{SseItem, SseMessage, SseParser};
    let text = "\n: keepalive\r\nid: 7\r\nevent: task.delta\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n\
                data:x\nretry: 5\n\nid:8\nevent:e\ndata\n\n";
    let expected = vec![
        SseItem::Comment("keepalive".into()),
        SseItem::Message(SseMessage {
            id: Some("7".into()),
            event: Some("task.delta".into()),
            data: "{\"a\":\n1}".into(),
        }),
        SseItem::Message(SseMessage {
            id: None,
            event: None,
            data: "x".into(),
        }),
        SseItem::Message(SseMessage {
            id: Some("8".into()),
            event: Some("e".into()),
            data: String::new(),
        }),
    ];
    let mut whole = SseParser::default();
    assert_eq!(whole.push(text.as_bytes()), expected);
    let mut bytewise = SseParser::default();
    let items: Vec<SseItem> = text
        .as_bytes()
        .iter()
        .flat_map(|b| bytewise.push(std::slice::from_ref(b)))
        .collect();
    assert_eq!(items, expected);
}
