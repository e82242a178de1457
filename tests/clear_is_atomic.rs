//! I2: a clear during a slow run with queued work cancels everything (`cancel_reason:
//! "clear"`), removes the history and the context and bumps the epoch in one step; every
//! `task.cancelled` precedes `session.cleared`, and nothing about an old interaction follows it —
//! whether the clear comes from `POST .../clear` or from a `/clear` message (any policy, with
//! surrounding whitespace, while busy).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{TIMEOUT, TestServer, check_log_invariants, interaction_of, words};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// How the clear is asked for.
enum ClearBy {
    Endpoint,
    /// A message with this content and policy.
    Message(&'static str, &'static str),
}

/// Waits until the running interaction has written some of its response, so the clear hits a
/// task that is actively producing output.
async fn wait_for_output(server: &TestServer, session: &str, id: &str) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let answer = server
            .get(&format!("/v1/sessions/{session}/interactions/{id}"))
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        assert_eq!(answer.body["status"], "running", "{:?}", answer.body);
        if !answer.body["response"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no output in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn clear_during_a_slow_run(how: ClearBy) {
    let server = TestServer::start_default().await;
    let session = "clearing";
    let created = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"agent": "slow", "context": {"topic": "weather", "nested": {"n": 1}}}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let epoch_before = created.body["epoch"].as_i64().expect("epoch");

    // One running (50 words: 5 s) and three queued.
    let running = server.send(session, &words("run", 50), "reject").await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{:?}", running.body);
    assert_eq!(running.body["status"], "running");
    let mut old_ids = vec![running.body["id"].as_str().expect("id").to_string()];
    for i in 0..3 {
        let queued = server
            .send(session, &words(&format!("q{i}"), 5), "enqueue")
            .await;
        assert_eq!(queued.status, StatusCode::ACCEPTED, "{:?}", queued.body);
        assert_eq!(queued.body["status"], "queued");
        old_ids.push(queued.body["id"].as_str().expect("id").to_string());
    }
    wait_for_output(&server, session, &old_ids[0]).await;
    let context = server.get(&format!("/v1/sessions/{session}/context")).await;
    assert_eq!(
        context.body,
        json!({"topic": "weather", "nested": {"n": 1}})
    );

    let answer = match how {
        ClearBy::Endpoint => {
            server
                .request(
                    reqwest::Method::POST,
                    &format!("/v1/sessions/{session}/clear"),
                    None,
                    &[],
                )
                .await
        }
        ClearBy::Message(content, policy) => server.send(session, content, policy).await,
    };
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let keys: HashSet<&str> = answer
        .body
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        HashSet::from(["epoch", "cancelled"]),
        "{:?}",
        answer.body
    );
    assert_eq!(answer.body["epoch"].as_i64(), Some(epoch_before + 1));
    let cancelled: HashSet<String> = answer.body["cancelled"]
        .as_array()
        .expect("cancelled")
        .iter()
        .map(|v| v.as_str().expect("id").to_string())
        .collect();
    assert_eq!(
        cancelled,
        old_ids.iter().cloned().collect::<HashSet<_>>(),
        "running and queued are all cancelled"
    );

    // Give a fenced task the chance to misbehave.
    tokio::time::sleep(Duration::from_millis(400)).await;

    let events = server.stored_events(session);
    check_log_invariants(&events);
    let cleared_at = events
        .iter()
        .rposition(|e| e["type"] == "session.cleared")
        .expect("session.cleared stored");
    assert_eq!(
        events[cleared_at]["data"]["epoch"].as_i64(),
        Some(epoch_before + 1)
    );
    for id in &old_ids {
        let finals: Vec<usize> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                interaction_of(e).as_deref() == Some(id.as_str())
                    && matches!(
                        e["type"].as_str(),
                        Some("task.completed" | "task.failed" | "task.cancelled")
                    )
            })
            .map(|(i, _)| i)
            .collect();
        assert_eq!(finals.len(), 1, "one final event for {id}");
        let event = &events[finals[0]];
        assert_eq!(event["type"], "task.cancelled", "{event}");
        assert_eq!(event["data"]["interaction"]["cancel_reason"], "clear");
        assert_eq!(event["data"]["interaction"]["status"], "cancelled");
        assert!(
            finals[0] < cleared_at,
            "task.cancelled before session.cleared"
        );
    }
    for event in &events[cleared_at + 1..] {
        if let Some(id) = interaction_of(event) {
            assert!(
                !old_ids.contains(&id),
                "an old interaction wrote after the clear: {event}"
            );
        }
        assert_ne!(
            event["type"], "context.updated",
            "context changed after the clear: {event}"
        );
    }
    assert_eq!(
        cleared_at,
        events.len() - 1,
        "nothing at all followed the clear: {:?}",
        &events[cleared_at..]
    );

    let history = server
        .get(&format!("/v1/sessions/{session}/interactions"))
        .await;
    assert_eq!(history.status, StatusCode::OK);
    assert_eq!(history.body["interactions"], json!([]));
    assert!(history.body["next"].is_null());
    for id in &old_ids {
        let gone = server
            .get(&format!("/v1/sessions/{session}/interactions/{id}"))
            .await;
        assert_eq!(gone.status, StatusCode::NOT_FOUND, "{:?}", gone.body);
        assert_eq!(gone.code(), Some("not_found"));
    }
    let context = server.get(&format!("/v1/sessions/{session}/context")).await;
    assert_eq!(context.status, StatusCode::OK);
    assert_eq!(context.body, json!({}));
    let state = server.get(&format!("/v1/sessions/{session}")).await;
    assert_eq!(state.body["epoch"].as_i64(), Some(epoch_before + 1));
    assert!(state.body["running"].is_null(), "{:?}", state.body);
    assert_eq!(state.body["queued"], 0);
    assert_eq!(state.body["context"], json!({}));
    assert_eq!(state.body["agent"], "slow", "a clear keeps the agent");

    // A message after the clear belongs to the new epoch and completes.
    let content = "after the clear";
    let fresh = server.send(session, content, "reject").await;
    assert_eq!(fresh.status, StatusCode::ACCEPTED, "{:?}", fresh.body);
    assert_eq!(fresh.body["status"], "running");
    let id = fresh.body["id"].as_str().expect("id").to_string();
    let done = server.wait_final(session, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["response"], content);
    let history = server
        .get(&format!("/v1/sessions/{session}/interactions"))
        .await;
    let listed: Vec<&Value> = history.body["interactions"]
        .as_array()
        .expect("interactions")
        .iter()
        .collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"].as_str(), Some(id.as_str()));

    let events = server.stored_events(session);
    check_log_invariants(&events);
    for event in &events[cleared_at + 1..] {
        if let Some(about) = interaction_of(event) {
            assert_eq!(
                about, id,
                "only the new interaction after the clear: {event}"
            );
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_endpoint_during_a_slow_run_with_queued_work() {
    clear_during_a_slow_run(ClearBy::Endpoint).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_message_during_a_slow_run_with_queued_work() {
    clear_during_a_slow_run(ClearBy::Message("/clear", "enqueue")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_message_with_surrounding_whitespace_clears() {
    clear_during_a_slow_run(ClearBy::Message("  \t/clear \n", "enqueue")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_message_with_policy_reject_while_busy_still_clears() {
    clear_during_a_slow_run(ClearBy::Message("/clear", "reject")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_message_with_policy_interrupt_clears() {
    clear_during_a_slow_run(ClearBy::Message(" /clear ", "interrupt")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_message_ignores_wait_and_idempotency_key() {
    let server = TestServer::start_default().await;
    let session = "clear-extras";
    let body = json!({"content": "/clear"});
    let path = format!("/v1/sessions/{session}/messages?wait=5");
    for expected_epoch in 1..=2 {
        let answer = server
            .request(
                reqwest::Method::POST,
                &path,
                Some(&body),
                &[("Idempotency-Key", "same-key")],
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        assert_eq!(answer.body["epoch"], expected_epoch, "{:?}", answer.body);
        assert_eq!(answer.body["cancelled"], json!([]));
        assert!(
            answer.headers.get("idempotent-replayed").is_none(),
            "a /clear is never a replay"
        );
    }
    // Not even read: a malformed key or `wait` is no reason to refuse a /clear…
    let malformed = format!("/v1/sessions/{session}/messages?wait=soon");
    let too_long = "k".repeat(256);
    let answer = server
        .request(
            reqwest::Method::POST,
            &malformed,
            Some(&body),
            &[("Idempotency-Key", &too_long)],
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.body["epoch"], 3, "{:?}", answer.body);
    // …but refuses any other message, storing nothing.
    for (path, key) in [(&malformed, "fine"), (&path, too_long.as_str())] {
        let answer = server
            .request(
                reqwest::Method::POST,
                path,
                Some(&json!({"content": "not a clear"})),
                &[("Idempotency-Key", key)],
            )
            .await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{path}: {:?}",
            answer.body
        );
        assert_eq!(answer.body["error"]["code"], "invalid_request");
    }
    let stored = server
        .get(&format!("/v1/sessions/{session}/interactions"))
        .await;
    assert_eq!(stored.body["interactions"], json!([]), "{:?}", stored.body);
    // The key was not spent on the /clear.
    let answer = server
        .request(
            reqwest::Method::POST,
            &format!("/v1/sessions/{session}/messages"),
            Some(&json!({"content": "hello there"})),
            &[("Idempotency-Key", "same-key")],
        )
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_merely_mentions_clear_is_an_ordinary_message() {
    let server = TestServer::start_default().await;
    let session = "not-a-clear";
    for content in ["/clear now", "please /clear", "/CLEAR", "/clearx"] {
        let answer = server
            .post(
                &format!("/v1/sessions/{session}/messages?wait=30"),
                &json!({"content": content}),
            )
            .await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{content}: {:?}",
            answer.body
        );
        assert_eq!(answer.body["status"], "completed");
        assert_eq!(answer.body["response"], content);
    }
    let state = server.get(&format!("/v1/sessions/{session}")).await;
    assert_eq!(state.body["epoch"], 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_a_cleared_interaction_gets_its_cancelled_state() {
    let server = std::sync::Arc::new(TestServer::start_default().await);
    let session = "clear-waiter";
    let created = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"agent": "slow"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let waiter = {
        let server = std::sync::Arc::clone(&server);
        tokio::spawn(async move {
            server
                .post(
                    &format!("/v1/sessions/{session}/messages?wait=60"),
                    &json!({"content": words("long", 100)}),
                )
                .await
        })
    };
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let id = loop {
        let state = server.get(&format!("/v1/sessions/{session}")).await;
        if let Some(id) = state.body["running"]["id"].as_str() {
            break id.to_string();
        }
        assert!(tokio::time::Instant::now() < deadline, "never running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    wait_for_output(&server, session, &id).await;
    let cleared = server
        .post(&format!("/v1/sessions/{session}/clear"), &json!({}))
        .await;
    assert_eq!(cleared.body["cancelled"], json!([id]));
    let answer = tokio::time::timeout(TIMEOUT, waiter)
        .await
        .expect("the wait ends")
        .expect("waiter task");
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.body["id"].as_str(), Some(id.as_str()));
    assert_eq!(answer.body["status"], "cancelled");
    assert_eq!(answer.body["cancel_reason"], "clear");
    std::sync::Arc::try_unwrap(server)
        .ok()
        .expect("no other owner")
        .stop()
        .await;
}
