//! `?wait=SECONDS`: holds the answer until the interaction is final (`200`), or answers `202`
//! with its current state when time runs out; a bad `wait` is `400` and stores nothing; a
//! refused message answers at once.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, words};
use reqwest::StatusCode;
use serde_json::json;

async fn slow_session(server: &TestServer, session: &str) {
    let created = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"agent": "slow"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_on_the_instant_agent_answers_200_with_the_final_state() {
    let server = TestServer::start_default().await;
    for (session, wait) in [("w-instant", "5"), ("w-max", "300"), ("w-frac", "2.5")] {
        let content = "the quick brown fox";
        let answer = server
            .post(
                &format!("/v1/sessions/{session}/messages?wait={wait}"),
                &json!({"content": content}),
            )
            .await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "wait={wait}: {:?}",
            answer.body
        );
        assert_eq!(answer.body["status"], "completed");
        assert_eq!(answer.body["response"], content);
        assert!(answer.body["finished_at"].is_string());
        assert!(answer.headers.get("idempotent-replayed").is_none());
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_that_runs_out_answers_202_with_the_current_state() {
    let server = TestServer::start_default().await;
    let session = "w-slow";
    slow_session(&server, session).await;
    // 30 words at 100 ms: at least 3 s, never final within the 1 s wait.
    let content = words("slow", 30);
    let started = Instant::now();
    let answer = server
        .post(
            &format!("/v1/sessions/{session}/messages?wait=1"),
            &json!({"content": content}),
        )
        .await;
    let elapsed = started.elapsed();
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
    assert_eq!(answer.body["status"], "running");
    assert!(answer.body["finished_at"].is_null());
    assert!(
        elapsed >= Duration::from_millis(950),
        "the server held the answer for the wait: {elapsed:?}"
    );
    // The answer is the state at the end of the wait: a prefix of the content so far.
    let response = answer.body["response"].as_str().expect("response");
    assert!(content.starts_with(response), "{response:?}");

    // A queued message with a wait that runs out is answered 202 `queued`.
    let queued = server
        .post(
            &format!("/v1/sessions/{session}/messages?wait=1"),
            &json!({"content": "behind it", "policy": "enqueue"}),
        )
        .await;
    assert_eq!(queued.status, StatusCode::ACCEPTED, "{:?}", queued.body);
    assert_eq!(queued.body["status"], "queued");

    let cleared = server
        .post(&format!("/v1/sessions/{session}/clear"), &json!({}))
        .await;
    assert_eq!(cleared.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_ends_when_the_interaction_is_cancelled() {
    let server = std::sync::Arc::new(TestServer::start_default().await);
    let session = "w-cancelled";
    slow_session(&server, session).await;
    let first = server.send(session, &words("long", 100), "reject").await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    // A queued one waits; cancelling it ends the wait with its final state.
    let waiter = {
        let server = std::sync::Arc::clone(&server);
        tokio::spawn(async move {
            server
                .post(
                    &format!("/v1/sessions/{session}/messages?wait=60"),
                    &json!({"content": "waiting in line", "policy": "enqueue"}),
                )
                .await
        })
    };
    // Find the queued one and cancel it by name.
    let deadline = tokio::time::Instant::now() + common::TIMEOUT;
    let queued_id = loop {
        let list = server
            .get(&format!("/v1/sessions/{session}/interactions"))
            .await;
        let items = list.body["interactions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(q) = items.iter().find(|i| i["status"] == "queued") {
            break q["id"].as_str().expect("id").to_string();
        }
        assert!(tokio::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let cancel = server
        .post(
            &format!("/v1/sessions/{session}/cancel"),
            &json!({"interaction_id": queued_id}),
        )
        .await;
    assert_eq!(cancel.body, json!({"cancelled": [queued_id]}));
    let answer = tokio::time::timeout(common::TIMEOUT, waiter)
        .await
        .expect("the wait ends")
        .expect("waiter task");
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.body["id"].as_str(), Some(queued_id.as_str()));
    assert_eq!(answer.body["status"], "cancelled");
    assert_eq!(answer.body["cancel_reason"], "cancel");
    server
        .post(&format!("/v1/sessions/{session}/cancel"), &json!({}))
        .await;
    std::sync::Arc::try_unwrap(server)
        .ok()
        .expect("no other owner")
        .stop()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_wait_values_are_invalid_requests_and_store_nothing() {
    let server = TestServer::start_default().await;
    for (i, wait) in ["0", "301", "abc", "-1", "", "0.5", "nan", "inf", "1e9"]
        .into_iter()
        .enumerate()
    {
        let session = format!("w-bad-{i}");
        let answer = server
            .post(
                &format!("/v1/sessions/{session}/messages?wait={wait}"),
                &json!({"content": "never stored"}),
            )
            .await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "wait={wait}: {:?}",
            answer.body
        );
        assert_eq!(answer.code(), Some("invalid_request"), "wait={wait}");
        let absent = server.get(&format!("/v1/sessions/{session}")).await;
        assert_eq!(
            absent.status,
            StatusCode::NOT_FOUND,
            "wait={wait} created the session: {:?}",
            absent.body
        );
    }
    // On an existing session nothing is stored either.
    let session = "w-bad-existing";
    let created = server
        .put(&format!("/v1/sessions/{session}"), &json!({}))
        .await;
    let last_seq = created.body["last_seq"].clone();
    let answer = server
        .post(
            &format!("/v1/sessions/{session}/messages?wait=0"),
            &json!({"content": "never stored"}),
        )
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    let list = server
        .get(&format!("/v1/sessions/{session}/interactions"))
        .await;
    assert_eq!(list.body["interactions"], json!([]));
    let state = server.get(&format!("/v1/sessions/{session}")).await;
    assert_eq!(state.body["last_seq"], last_seq);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_or_invalid_message_with_wait_answers_at_once() {
    let server = TestServer::start_default().await;
    let session = "w-reject";
    slow_session(&server, session).await;
    // 300 words: 30 s of work, longer than the client's timeout, so an answer that waited
    // for it could not arrive.
    let running = server.send(session, &words("long", 300), "reject").await;
    assert_eq!(running.status, StatusCode::ACCEPTED);
    let running_id = running.body["id"].as_str().expect("id").to_string();

    let started = Instant::now();
    let answer = server
        .post(
            &format!("/v1/sessions/{session}/messages?wait=300"),
            &json!({"content": "let me in", "policy": "reject"}),
        )
        .await;
    assert_eq!(answer.status, StatusCode::CONFLICT, "{:?}", answer.body);
    assert_eq!(answer.code(), Some("session_busy"));
    assert_eq!(
        answer.body["error"]["running"].as_str(),
        Some(running_id.as_str())
    );
    let invalid = server
        .post(
            &format!("/v1/sessions/{session}/messages?wait=300"),
            &json!({"content": "   "}),
        )
        .await;
    assert_eq!(
        invalid.status,
        StatusCode::BAD_REQUEST,
        "{:?}",
        invalid.body
    );
    assert_eq!(invalid.code(), Some("invalid_request"));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "answered without waiting for the running one"
    );
    let cancel = server
        .post(&format!("/v1/sessions/{session}/cancel"), &json!({}))
        .await;
    assert_eq!(cancel.body, json!({"cancelled": [running_id]}));
    server.stop().await;
}
