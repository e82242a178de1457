//! `Idempotency-Key`: a retry returns the interaction created the first time (`200`,
//! `Idempotent-Replayed: true`) and starts nothing — also on a busy session with `reject`,
//! also when many first uses race; a different content or metadata is `422`; invalid keys are
//! `400`; a clear forgets the keys of what it removed.

mod common;

use std::sync::Arc;

use common::{TestServer, interaction_of, words};
use reqwest::header::HeaderValue;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// `POST .../messages` with an `Idempotency-Key` header.
async fn send_keyed(
    server: &TestServer,
    session: &str,
    query: &str,
    body: &Value,
    key: &str,
) -> common::Answer {
    server
        .request(
            Method::POST,
            &format!("/v1/sessions/{session}/messages{query}"),
            Some(body),
            &[("Idempotency-Key", key)],
        )
        .await
}

fn replayed(answer: &common::Answer) -> bool {
    answer
        .headers
        .get("idempotent-replayed")
        .and_then(|v| v.to_str().ok())
        == Some("true")
}

async fn count_interactions(server: &TestServer, session: &str) -> usize {
    let answer = server
        .get(&format!("/v1/sessions/{session}/interactions?limit=1000"))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    answer.body["interactions"].as_array().expect("list").len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_twice_replays_the_first_interaction() {
    let server = TestServer::start_default().await;
    let session = "idem";
    let body = json!({"content": "hello world", "metadata": {"client": "test"}});
    let first = send_keyed(&server, session, "", &body, "key-1").await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{:?}", first.body);
    assert!(!replayed(&first), "a first use is not a replay");
    let id = first.body["id"].as_str().expect("id").to_string();
    server.wait_final(session, &id).await;

    let second = send_keyed(&server, session, "", &body, "key-1").await;
    assert_eq!(second.status, StatusCode::OK, "{:?}", second.body);
    assert!(replayed(&second), "{:?}", second.headers);
    assert_eq!(second.body["id"].as_str(), Some(id.as_str()));
    // It returns the interaction in its current state.
    assert_eq!(second.body["status"], "completed");
    assert_eq!(second.body["response"], "hello world");
    assert_eq!(second.body["metadata"], json!({"client": "test"}));
    assert_eq!(count_interactions(&server, session).await, 1);
    let started = server
        .stored_events(session)
        .iter()
        .filter(|e| e["type"] == "task.started")
        .count();
    assert_eq!(started, 1, "a replay starts nothing");

    // The key space is per session: the same key elsewhere is a first use.
    let elsewhere = send_keyed(&server, "idem-other", "", &body, "key-1").await;
    assert_eq!(
        elsewhere.status,
        StatusCode::ACCEPTED,
        "{:?}",
        elsewhere.body
    );
    assert!(!replayed(&elsewhere));
    assert_ne!(elsewhere.body["id"].as_str(), Some(id.as_str()));
    server.wait_idle("idem-other").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_on_a_busy_session_with_reject_is_a_replay_not_a_conflict() {
    let server = TestServer::start_default().await;
    let session = "idem-busy";
    let created = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"agent": "slow"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let body = json!({"content": words("long", 100), "policy": "reject"});
    let first = send_keyed(&server, session, "", &body, "busy-key").await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{:?}", first.body);
    let id = first.body["id"].as_str().expect("id").to_string();

    let retry = send_keyed(&server, session, "", &body, "busy-key").await;
    assert_eq!(retry.status, StatusCode::OK, "{:?}", retry.body);
    assert!(replayed(&retry));
    assert_eq!(retry.body["id"].as_str(), Some(id.as_str()));
    assert_eq!(retry.body["status"], "running");

    // Without the key the session is busy indeed.
    let other = server.send(session, "something else", "reject").await;
    assert_eq!(other.status, StatusCode::CONFLICT, "{:?}", other.body);
    assert_eq!(other.body["error"]["running"].as_str(), Some(id.as_str()));
    assert_eq!(count_interactions(&server, session).await, 1);

    let cancelled = server
        .post(&format!("/v1/sessions/{session}/cancel"), &json!({}))
        .await;
    assert_eq!(cancelled.body, json!({"cancelled": [id]}));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_with_other_content_or_metadata_is_a_mismatch() {
    let server = TestServer::start_default().await;
    let session = "idem-mismatch";
    let body = json!({"content": "original", "metadata": {"a": 1}});
    let first = send_keyed(&server, session, "?wait=30", &body, "k").await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let last_seq = server.get(&format!("/v1/sessions/{session}")).await.body["last_seq"].clone();

    for (what, other) in [
        (
            "content",
            json!({"content": "changed", "metadata": {"a": 1}}),
        ),
        (
            "metadata",
            json!({"content": "original", "metadata": {"a": 2}}),
        ),
        ("metadata missing", json!({"content": "original"})),
        (
            "metadata extended",
            json!({"content": "original", "metadata": {"a": 1, "b": 2}}),
        ),
    ] {
        let answer = send_keyed(&server, session, "", &other, "k").await;
        assert_eq!(
            answer.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{what}: {:?}",
            answer.body
        );
        assert_eq!(answer.code(), Some("idempotency_mismatch"), "{what}");
        assert!(answer.body["error"]["message"].is_string());
        assert!(!replayed(&answer));
    }
    assert_eq!(count_interactions(&server, session).await, 1);
    let state = server.get(&format!("/v1/sessions/{session}")).await;
    assert_eq!(
        state.body["last_seq"], last_seq,
        "a mismatch writes nothing"
    );

    // The original is still replayable (policy does not take part in the comparison).
    let again = send_keyed(
        &server,
        session,
        "",
        &json!({"content": "original", "metadata": {"a": 1}, "policy": "enqueue"}),
        "k",
    )
    .await;
    assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
    assert!(replayed(&again));
    assert_eq!(again.body["id"], first.body["id"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_with_wait_waits_for_the_same_interaction() {
    let server = TestServer::start_default().await;
    let session = "idem-wait";
    let created = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"agent": "slow"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let content = words("w", 5); // 0.5 s with the slow agent
    let body = json!({"content": content});
    let first = send_keyed(&server, session, "", &body, "wait-key").await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{:?}", first.body);
    assert_eq!(first.body["status"], "running");
    let id = first.body["id"].as_str().expect("id").to_string();

    let replay = send_keyed(&server, session, "?wait=5", &body, "wait-key").await;
    assert_eq!(replay.status, StatusCode::OK, "{:?}", replay.body);
    assert!(replayed(&replay));
    assert_eq!(replay.body["id"].as_str(), Some(id.as_str()));
    assert_eq!(replay.body["status"], "completed", "{:?}", replay.body);
    assert_eq!(replay.body["response"].as_str(), Some(content.as_str()));
    assert_eq!(count_interactions(&server, session).await, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_with_wait_that_times_out_answers_200_with_the_current_state() {
    let server = TestServer::start_default().await;
    let session = "idem-wait-short";
    let created = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"agent": "slow"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let body = json!({"content": words("w", 100)});
    let first = send_keyed(&server, session, "", &body, "k").await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{:?}", first.body);
    let replay = send_keyed(&server, session, "?wait=1", &body, "k").await;
    assert_eq!(
        replay.status,
        StatusCode::OK,
        "a replay answers 200: {:?}",
        replay.body
    );
    assert!(replayed(&replay));
    assert_eq!(replay.body["id"], first.body["id"]);
    assert_eq!(replay.body["status"], "running");
    server
        .post(&format!("/v1/sessions/{session}/cancel"), &json!({}))
        .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_uses_of_one_key_store_one_interaction() {
    let server = Arc::new(TestServer::start_default().await);
    let session = "idem-race";
    let barrier = Arc::new(tokio::sync::Barrier::new(20));
    let mut handles = Vec::new();
    for _ in 0..20 {
        let server = Arc::clone(&server);
        let barrier = Arc::clone(&barrier);
        handles.push(tokio::spawn(async move {
            let body = json!({"content": "only once please"});
            barrier.wait().await;
            send_keyed(&server, session, "", &body, "race-key").await
        }));
    }
    let mut answers = Vec::new();
    for handle in handles {
        answers.push(handle.await.expect("request task"));
    }
    let firsts: Vec<_> = answers
        .iter()
        .filter(|a| a.status == StatusCode::ACCEPTED)
        .collect();
    assert_eq!(firsts.len(), 1, "{answers:#?}");
    assert!(!replayed(firsts[0]));
    let id = firsts[0].body["id"].as_str().expect("id").to_string();
    for answer in &answers {
        if answer.status != StatusCode::ACCEPTED {
            assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
            assert!(replayed(answer), "every other answer is a replay");
        }
        assert_eq!(answer.body["id"].as_str(), Some(id.as_str()));
    }
    server.wait_idle(session).await;
    assert_eq!(count_interactions(&server, session).await, 1);
    let events = server.stored_events(session);
    for event in &events {
        if let Some(about) = interaction_of(event) {
            assert_eq!(about, id);
        }
    }
    Arc::try_unwrap(server)
        .ok()
        .expect("no other owner")
        .stop()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_keys_are_invalid_requests_and_store_nothing() {
    let server = TestServer::start_default().await;
    let session = "idem-invalid";
    let body = json!({"content": "hi"});

    let too_long = "k".repeat(256);
    let answer = send_keyed(&server, session, "", &body, &too_long).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{:?}", answer.body);
    assert_eq!(answer.code(), Some("invalid_request"));

    // A non-ASCII byte in the header value.
    let response = server
        .http
        .post(format!("{}/v1/sessions/{session}/messages", server.url))
        .header(
            "idempotency-key",
            HeaderValue::from_bytes(b"caf\xe9").expect("obs-text is a valid header byte"),
        )
        .json(&body)
        .send()
        .await
        .expect("request reaches the server");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let error: Value = response.json().await.expect("JSON error body");
    assert_eq!(error["error"]["code"], "invalid_request", "{error}");

    // Nothing was stored, not even the session.
    let absent = server.get(&format!("/v1/sessions/{session}")).await;
    assert_eq!(absent.status, StatusCode::NOT_FOUND, "{:?}", absent.body);

    // The longest valid key works.
    let longest = "k".repeat(255);
    let answer = send_keyed(&server, session, "?wait=30", &body, &longest).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.body["status"], "completed");
    let again = send_keyed(&server, session, "", &body, &longest).await;
    assert_eq!(again.status, StatusCode::OK);
    assert!(replayed(&again));
    assert_eq!(again.body["id"], answer.body["id"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clear_forgets_the_keys_of_what_it_removed() {
    let server = TestServer::start_default().await;
    let session = "idem-clear";
    let body = json!({"content": "remember me"});
    let first = send_keyed(&server, session, "?wait=30", &body, "forget-me").await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let old_id = first.body["id"].as_str().expect("id").to_string();

    let cleared = server
        .post(&format!("/v1/sessions/{session}/clear"), &json!({}))
        .await;
    assert_eq!(cleared.status, StatusCode::OK, "{:?}", cleared.body);

    let reused = send_keyed(&server, session, "", &body, "forget-me").await;
    assert_eq!(reused.status, StatusCode::ACCEPTED, "{:?}", reused.body);
    assert!(!replayed(&reused));
    let new_id = reused.body["id"].as_str().expect("id").to_string();
    assert_ne!(new_id, old_id);
    server.wait_final(session, &new_id).await;

    // And after another clear, the key goes with a different content without a mismatch.
    server
        .post(&format!("/v1/sessions/{session}/clear"), &json!({}))
        .await;
    let different = send_keyed(
        &server,
        session,
        "",
        &json!({"content": "something new"}),
        "forget-me",
    )
    .await;
    assert_eq!(
        different.status,
        StatusCode::ACCEPTED,
        "{:?}",
        different.body
    );
    server.wait_idle(session).await;
    assert_eq!(count_interactions(&server, session).await, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_with_policy_interrupt_starts_and_cancels_nothing() {
    let server = TestServer::start_default().await;
    let session = "idem-interrupt";
    let created = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"agent": "slow"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let running_body = json!({"content": words("long", 100)});
    let running = send_keyed(&server, session, "", &running_body, "run-key").await;
    assert_eq!(running.status, StatusCode::ACCEPTED);
    let queued_body = json!({"content": "behind", "policy": "enqueue"});
    let queued = send_keyed(&server, session, "", &queued_body, "queue-key").await;
    assert_eq!(queued.status, StatusCode::ACCEPTED);
    assert_eq!(queued.body["status"], "queued");

    for (body, key, expected) in [
        (&running_body, "run-key", &running),
        (&queued_body, "queue-key", &queued),
    ] {
        let mut retry = body.clone();
        retry["policy"] = json!("interrupt");
        let answer = send_keyed(&server, session, "", &retry, key).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        assert!(replayed(&answer));
        assert_eq!(answer.body["id"], expected.body["id"]);
    }
    let state = server.get(&format!("/v1/sessions/{session}")).await;
    assert_eq!(
        state.body["running"]["id"], running.body["id"],
        "nothing was interrupted"
    );
    assert_eq!(state.body["queued"], 1);
    assert!(
        !server
            .stored_events(session)
            .iter()
            .any(|e| e["type"] == "task.cancelled"),
        "a replay cancels nothing"
    );
    server
        .post(&format!("/v1/sessions/{session}/clear"), &json!({}))
        .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_does_not_spend_its_key() {
    let config = r#"
queue_limit = 1

[agents.default]
kind = "echo"
delay_ms = 100
"#;
    let server = TestServer::start(config).await;
    let session = "idem-refused";
    let running = server.send(session, &words("long", 100), "reject").await;
    assert_eq!(running.status, StatusCode::ACCEPTED);
    let filler = server.send(session, &words("filler", 100), "enqueue").await;
    assert_eq!(filler.body["status"], "queued");

    let body = json!({"content": "try again later"});
    let busy = send_keyed(&server, session, "", &body, "later").await;
    assert_eq!(busy.status, StatusCode::CONFLICT, "{:?}", busy.body);
    let mut enqueue = body.clone();
    enqueue["policy"] = json!("enqueue");
    let full = send_keyed(&server, session, "", &enqueue, "later").await;
    assert_eq!(
        full.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{:?}",
        full.body
    );
    assert_eq!(full.code(), Some("queue_full"));
    // A different content with the same key is not a mismatch: nothing holds the key.
    let other = send_keyed(&server, session, "", &json!({"content": "else"}), "later").await;
    assert_eq!(other.status, StatusCode::CONFLICT, "{:?}", other.body);

    // Cancel (not clear: a clear would forget keys anyway) the running one, then the
    // filler that started after it.
    for expected in [&running, &filler] {
        let cancelled = server
            .post(&format!("/v1/sessions/{session}/cancel"), &json!({}))
            .await;
        assert_eq!(cancelled.status, StatusCode::OK);
        assert_eq!(cancelled.body["cancelled"], json!([expected.body["id"]]));
    }
    server.wait_idle(session).await;
    let accepted = send_keyed(&server, session, "", &body, "later").await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{:?}", accepted.body);
    assert!(!replayed(&accepted));
    server.stop().await;
}
