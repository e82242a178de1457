//! Busy-session policies and cancel: `interrupt` cancels the running and queued ones and starts
//! the new one in the same step; `POST .../cancel` cancels the running one (the next queued one
//! then starts) or a named one, and answers `[]` or `404` exactly as the contract says.

mod common;

use std::collections::HashSet;

use common::{TestServer, check_log_invariants, interaction_of, words};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn id_of(answer: &common::Answer) -> String {
    answer.body["id"]
        .as_str()
        .expect("an interaction id")
        .to_string()
}

async fn slow_session(server: &TestServer, session: &str) {
    let created = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"agent": "slow"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
}

async fn interaction(server: &TestServer, session: &str, id: &str) -> Value {
    let answer = server
        .get(&format!("/v1/sessions/{session}/interactions/{id}"))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    answer.body
}

/// Index in `events` of the (only) event of `kind` about `id`.
fn position(events: &[Value], kind: &str, id: &str) -> usize {
    let found: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e["type"] == kind && interaction_of(e).as_deref() == Some(id))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} for {id}: {events:#?}");
    found[0]
}

async fn cancel(server: &TestServer, session: &str, body: Option<&Value>) -> common::Answer {
    server
        .request(
            Method::POST,
            &format!("/v1/sessions/{session}/cancel"),
            body,
            &[],
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_cancels_running_and_queued_and_starts_at_once() {
    let server = TestServer::start_default().await;
    let session = "interrupting";
    slow_session(&server, session).await;
    let running = server.send(session, &words("long", 100), "reject").await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{:?}", running.body);
    let mut victims = vec![id_of(&running)];
    for i in 0..2 {
        let queued = server
            .send(session, &words(&format!("q{i}"), 20), "enqueue")
            .await;
        assert_eq!(queued.status, StatusCode::ACCEPTED, "{:?}", queued.body);
        assert_eq!(queued.body["status"], "queued");
        victims.push(id_of(&queued));
    }

    let content = "interrupting you now";
    let new = server.send(session, content, "interrupt").await;
    assert_eq!(new.status, StatusCode::ACCEPTED, "{:?}", new.body);
    assert_eq!(
        new.body["status"], "running",
        "starts at once: {:?}",
        new.body
    );
    assert!(new.body["started_at"].is_string());
    let new_id = id_of(&new);

    for id in &victims {
        let victim = interaction(&server, session, id).await;
        assert_eq!(victim["status"], "cancelled", "{victim}");
        assert_eq!(victim["cancel_reason"], "interrupt", "{victim}");
        assert!(victim["finished_at"].is_string());
    }
    let done = server.wait_final(session, &new_id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["response"], content);

    let events = server.stored_events(session);
    check_log_invariants(&events);
    let started = position(&events, "task.started", &new_id);
    assert!(started >= victims.len());
    // One atomic step: the cancellations immediately precede the new start.
    let step: HashSet<String> = events[started - victims.len()..started]
        .iter()
        .map(|e| {
            assert_eq!(e["type"], "task.cancelled", "{e}");
            assert_eq!(
                e["data"]["interaction"]["cancel_reason"], "interrupt",
                "{e}"
            );
            interaction_of(e).expect("names its interaction")
        })
        .collect();
    assert_eq!(step, victims.iter().cloned().collect::<HashSet<_>>());
    for id in &victims {
        assert!(position(&events, "task.cancelled", id) < started);
        // Nothing about a victim after its cancellation.
        assert!(
            events[started..]
                .iter()
                .all(|e| interaction_of(e).as_deref() != Some(id.as_str())),
            "event about {id} after the interrupt"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_on_an_idle_session_just_starts() {
    let server = TestServer::start_default().await;
    let answer = server
        .send("idle-interrupt", "hello you", "interrupt")
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
    assert_eq!(answer.body["status"], "running");
    let done = server.wait_final("idle-interrupt", &id_of(&answer)).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["response"], "hello you");
    assert!(
        !server
            .stored_events("idle-interrupt")
            .iter()
            .any(|e| e["type"] == "task.cancelled")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_without_body_cancels_the_running_one_and_the_next_starts() {
    let server = TestServer::start_default().await;
    let session = "cancelling";
    slow_session(&server, session).await;
    let running = server.send(session, &words("long", 100), "reject").await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{:?}", running.body);
    let running_id = id_of(&running);
    let next_content = "next one";
    let next = server.send(session, next_content, "enqueue").await;
    assert_eq!(next.body["status"], "queued", "{:?}", next.body);
    let next_id = id_of(&next);

    let answer = cancel(&server, session, None).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.body, json!({"cancelled": [running_id]}));
    let cancelled = interaction(&server, session, &running_id).await;
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["cancel_reason"], "cancel");

    let done = server.wait_final(session, &next_id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["response"], next_content);

    let events = server.stored_events(session);
    check_log_invariants(&events);
    assert!(
        position(&events, "task.cancelled", &running_id)
            < position(&events, "task.started", &next_id)
    );
    server.wait_idle(session).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_with_an_empty_object_body_cancels_the_running_one() {
    let server = TestServer::start_default().await;
    let session = "cancel-empty-object";
    slow_session(&server, session).await;
    let running = server.send(session, &words("long", 100), "reject").await;
    let running_id = id_of(&running);
    let answer = cancel(&server, session, Some(&json!({}))).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.body, json!({"cancelled": [running_id]}));
    let state = server.get(&format!("/v1/sessions/{session}")).await;
    assert!(state.body["running"].is_null(), "{:?}", state.body);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_a_named_queued_one_cancels_just_that_one() {
    let server = TestServer::start_default().await;
    let session = "cancel-named";
    slow_session(&server, session).await;
    let running = server.send(session, &words("long", 100), "reject").await;
    let running_id = id_of(&running);
    let b = server.send(session, "second one", "enqueue").await;
    let c = server.send(session, "third one", "enqueue").await;
    let (b_id, c_id) = (id_of(&b), id_of(&c));

    let answer = cancel(&server, session, Some(&json!({"interaction_id": b_id}))).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.body, json!({"cancelled": [b_id]}));
    let b_now = interaction(&server, session, &b_id).await;
    assert_eq!(b_now["status"], "cancelled");
    assert_eq!(b_now["cancel_reason"], "cancel");
    assert_eq!(
        interaction(&server, session, &running_id).await["status"],
        "running"
    );
    assert_eq!(
        interaction(&server, session, &c_id).await["status"],
        "queued"
    );
    let state = server.get(&format!("/v1/sessions/{session}")).await;
    assert_eq!(state.body["queued"], 1);
    assert_eq!(
        state.body["running"]["id"].as_str(),
        Some(running_id.as_str())
    );

    // Cancelling it again: already final, nothing to do.
    let again = cancel(&server, session, Some(&json!({"interaction_id": b_id}))).await;
    assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
    assert_eq!(again.body, json!({"cancelled": []}));

    // Naming the running one cancels it; the remaining queued one runs.
    let answer = cancel(
        &server,
        session,
        Some(&json!({"interaction_id": running_id})),
    )
    .await;
    assert_eq!(answer.body, json!({"cancelled": [running_id]}));
    let done = server.wait_final(session, &c_id).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["response"], "third one");

    let events = server.stored_events(session);
    check_log_invariants(&events);
    assert!(
        !events
            .iter()
            .any(|e| e["type"] == "task.started" && interaction_of(e).as_deref() == Some(&b_id)),
        "the cancelled queued one never started"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_with_nothing_to_cancel_answers_an_empty_list() {
    let server = TestServer::start_default().await;
    let session = "cancel-nothing";
    // A session that exists but never ran anything.
    let created = server
        .put(&format!("/v1/sessions/{session}"), &json!({}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let answer = cancel(&server, session, None).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.body, json!({"cancelled": []}));

    // A completed interaction: nothing running, and naming it gives [] too.
    let done = server
        .post(
            &format!("/v1/sessions/{session}/messages?wait=30"),
            &json!({"content": "all done"}),
        )
        .await;
    assert_eq!(done.status, StatusCode::OK, "{:?}", done.body);
    assert_eq!(done.body["status"], "completed");
    let done_id = id_of(&done);
    let answer = cancel(&server, session, None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, json!({"cancelled": []}));
    let answer = cancel(&server, session, Some(&json!({"interaction_id": done_id}))).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.body, json!({"cancelled": []}));
    let still = interaction(&server, session, &done_id).await;
    assert_eq!(
        still["status"], "completed",
        "a final interaction never changes"
    );
    assert!(still["cancel_reason"].is_null());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_an_unknown_id_or_session_is_not_found() {
    let server = TestServer::start_default().await;
    let session = "cancel-unknown";
    let created = server
        .put(&format!("/v1/sessions/{session}"), &json!({}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let last_seq = created.body["last_seq"].clone();

    let unknown = json!({"interaction_id": "01900000-0000-7000-8000-000000000000"});
    let answer = cancel(&server, session, Some(&unknown)).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{:?}", answer.body);
    assert_eq!(answer.code(), Some("not_found"));

    // An id that belongs to another session is unknown in this one.
    let other = server.send("cancel-other", &words("x", 3), "reject").await;
    let other_id = id_of(&other);
    let answer = cancel(&server, session, Some(&json!({"interaction_id": other_id}))).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{:?}", answer.body);
    assert_eq!(answer.code(), Some("not_found"));

    // A session that does not exist: 404, and it is not created.
    for body in [None, Some(&json!({})), Some(&unknown)] {
        let answer = cancel(&server, "never-created", body).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{:?}", answer.body);
        assert_eq!(answer.code(), Some("not_found"));
    }
    let absent = server.get("/v1/sessions/never-created").await;
    assert_eq!(absent.status, StatusCode::NOT_FOUND);

    let state = server.get(&format!("/v1/sessions/{session}")).await;
    assert_eq!(
        state.body["last_seq"], last_seq,
        "a 404 cancel wrote nothing"
    );
    server.wait_idle("cancel-other").await;
    server.stop().await;
}
