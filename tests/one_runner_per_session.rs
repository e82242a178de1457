//! I1 under real concurrency: at most one interaction of a session runs at any instant, the
//! `reject` race on an idle session has exactly one winner, `enqueue` keeps FIFO order, and the
//! queue bound refuses without storing anything.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::{TestServer, check_log_invariants, interaction_of, is_final_type, words};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn interactions(server: &TestServer, session: &str) -> Vec<Value> {
    let answer = server
        .get(&format!("/v1/sessions/{session}/interactions?limit=1000"))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert!(answer.body["next"].is_null(), "{:?}", answer.body);
    answer.body["interactions"]
        .as_array()
        .expect("interactions")
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_rejects_on_an_idle_session_accept_exactly_one() {
    let server = Arc::new(TestServer::start_default().await);
    let session = "race";
    let created = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"agent": "slow"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert!(created.body["running"].is_null());
    assert_eq!(created.body["queued"], 0);

    // 100 words: the winner runs for 10 s, far longer than the race takes.
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let mut handles = Vec::new();
    for i in 0..50 {
        let server = Arc::clone(&server);
        let barrier = Arc::clone(&barrier);
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            server
                .send(session, &words(&format!("r{i}"), 100), "reject")
                .await
        }));
    }
    let mut answers = Vec::new();
    for handle in handles {
        answers.push(handle.await.expect("request task"));
    }

    let accepted: Vec<_> = answers
        .iter()
        .filter(|a| a.status == StatusCode::ACCEPTED)
        .collect();
    assert_eq!(accepted.len(), 1, "exactly one 202: {answers:#?}");
    let winner = accepted[0].body["id"].as_str().expect("id").to_string();
    assert_eq!(accepted[0].body["status"], "running");
    let rejected: Vec<_> = answers
        .iter()
        .filter(|a| a.status != StatusCode::ACCEPTED)
        .collect();
    assert_eq!(rejected.len(), 49);
    for answer in rejected {
        assert_eq!(answer.status, StatusCode::CONFLICT, "{:?}", answer.body);
        assert_eq!(answer.code(), Some("session_busy"), "{:?}", answer.body);
        assert_eq!(
            answer.body["error"]["running"].as_str(),
            Some(winner.as_str()),
            "{:?}",
            answer.body
        );
    }

    let stored = interactions(&server, session).await;
    assert_eq!(stored.len(), 1, "{stored:#?}");
    assert_eq!(stored[0]["id"].as_str(), Some(winner.as_str()));
    assert_eq!(stored[0]["status"], "running");
    let session_now = server.get(&format!("/v1/sessions/{session}")).await;
    assert_eq!(
        session_now.body["running"]["id"].as_str(),
        Some(winner.as_str())
    );
    assert_eq!(session_now.body["queued"], 0);

    // Only the winner ever appears in the log.
    let events = server.stored_events(session);
    check_log_invariants(&events);
    for event in &events {
        if let Some(id) = interaction_of(event) {
            assert_eq!(id, winner, "a refused message left an event: {event}");
        }
    }

    let cancel = server
        .post(&format!("/v1/sessions/{session}/cancel"), &json!({}))
        .await;
    assert_eq!(cancel.status, StatusCode::OK, "{:?}", cancel.body);
    assert_eq!(cancel.body["cancelled"], json!([winner]));
    Arc::try_unwrap(server)
        .ok()
        .expect("no other owner")
        .stop()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_enqueues_run_one_at_a_time_in_fifo_order() {
    let config = r#"
queue_limit = 200

[agents.default]
kind = "echo"
delay_ms = 0
"#;
    let server = Arc::new(TestServer::start(config).await);
    let session = "fifo";
    let barrier = Arc::new(tokio::sync::Barrier::new(100));
    let mut handles = Vec::new();
    for i in 0..100 {
        let server = Arc::clone(&server);
        let barrier = Arc::clone(&barrier);
        handles.push(tokio::spawn(async move {
            let content = format!("message {i} of the fifo test");
            barrier.wait().await;
            let answer = server.send(session, &content, "enqueue").await;
            (content, answer)
        }));
    }
    let mut sent = Vec::new();
    let mut said_queued = std::collections::HashMap::new();
    for handle in handles {
        let (content, answer) = handle.await.expect("request task");
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
        let status = answer.body["status"].as_str().expect("status");
        assert!(
            matches!(status, "running" | "queued"),
            "a 202 says running or queued: {:?}",
            answer.body
        );
        assert_eq!(answer.body["content"].as_str(), Some(content.as_str()));
        sent.push((answer.body["id"].as_str().expect("id").to_string(), content));
        said_queued.insert(
            answer.body["id"].as_str().expect("id").to_string(),
            status == "queued",
        );
    }
    server.wait_idle(session).await;

    // Acceptance order is id order.
    sent.sort();
    let ids: Vec<String> = sent.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        100,
        "ids are unique"
    );

    let events = server.stored_events(session);
    check_log_invariants(&events);

    let started: Vec<String> = events
        .iter()
        .filter(|e| e["type"] == "task.started")
        .map(|e| interaction_of(e).expect("started names its interaction"))
        .collect();
    let finished: Vec<String> = events
        .iter()
        .filter(|e| is_final_type(e["type"].as_str().unwrap_or_default()))
        .map(|e| interaction_of(e).expect("final names its interaction"))
        .collect();
    assert_eq!(started, ids, "task.started follows the order of the ids");
    assert_eq!(finished, ids, "completion follows the order of the ids");

    // Never two running: starts and final events strictly alternate, each final closing the
    // interaction that the start before it opened.
    let lifecycle: Vec<(&str, String)> = events
        .iter()
        .filter_map(|e| {
            let kind = e["type"].as_str()?;
            (kind == "task.started" || is_final_type(kind))
                .then(|| (kind, interaction_of(e).expect("names its interaction")))
        })
        .collect();
    assert_eq!(lifecycle.len(), 200);
    for pair in lifecycle.chunks(2) {
        assert_eq!(pair[0].0, "task.started", "{lifecycle:?}");
        assert_eq!(pair[1].0, "task.completed", "{lifecycle:?}");
        assert_eq!(pair[0].1, pair[1].1, "{lifecycle:?}");
    }

    // Queued announcements (when any) also follow acceptance order.
    let queued: Vec<String> = events
        .iter()
        .filter(|e| e["type"] == "interaction.queued")
        .map(|e| interaction_of(e).expect("names its interaction"))
        .collect();
    let mut queued_sorted = queued.clone();
    queued_sorted.sort();
    assert_eq!(queued, queued_sorted, "interaction.queued in id order");
    // A 202 says `queued` exactly when an `interaction.queued` event was emitted.
    let queued_set: HashSet<&String> = queued.iter().collect();
    for (id, was_queued) in &said_queued {
        assert_eq!(
            queued_set.contains(id),
            *was_queued,
            "{id}: answer said queued={was_queued}"
        );
    }

    let stored = interactions(&server, session).await;
    assert_eq!(stored.len(), 100);
    let mut previous_created = String::new();
    let mut previous_finished = String::new();
    // Newest first: walk it oldest first.
    for (interaction, (id, content)) in stored.iter().rev().zip(&sent) {
        assert_eq!(interaction["id"].as_str(), Some(id.as_str()));
        assert_eq!(interaction["status"], "completed", "{interaction}");
        assert_eq!(interaction["response"].as_str(), Some(content.as_str()));
        let created = interaction["created_at"].as_str().expect("created_at");
        let finished = interaction["finished_at"].as_str().expect("finished_at");
        assert!(
            created >= previous_created.as_str(),
            "created_at in id order"
        );
        assert!(
            finished >= previous_finished.as_str(),
            "finished_at in id order"
        );
        previous_created = created.to_string();
        previous_finished = finished.to_string();
    }
    Arc::try_unwrap(server)
        .ok()
        .expect("no other owner")
        .stop()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_past_the_queue_limit_is_queue_full_and_stores_nothing() {
    let server = TestServer::start_default().await; // queue_limit = 16
    let session = "bounded";
    let created = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"agent": "slow"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);

    let first = server
        .send(session, &words("running", 100), "enqueue")
        .await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{:?}", first.body);
    assert_eq!(first.body["status"], "running");
    for i in 0..16 {
        let answer = server
            .send(session, &format!("queued number {i}"), "enqueue")
            .await;
        assert_eq!(
            answer.status,
            StatusCode::ACCEPTED,
            "{i}: {:?}",
            answer.body
        );
        assert_eq!(answer.body["status"], "queued", "{i}: {:?}", answer.body);
    }
    let session_now = server.get(&format!("/v1/sessions/{session}")).await;
    assert_eq!(session_now.body["queued"], 16);
    let last_seq = session_now.body["last_seq"].clone();

    let refused = server.send(session, "one too many", "enqueue").await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{:?}",
        refused.body
    );
    assert_eq!(refused.code(), Some("queue_full"), "{:?}", refused.body);
    assert!(refused.body["error"]["message"].is_string());

    let stored = interactions(&server, session).await;
    assert_eq!(stored.len(), 17, "nothing stored for the refused one");
    assert!(
        stored.iter().all(|i| i["content"] != "one too many"),
        "{stored:#?}"
    );
    assert!(
        server
            .stored_events(session)
            .iter()
            .all(|e| e["data"]["interaction"]["content"] != "one too many"),
        "no event for the refused one"
    );
    let session_after = server.get(&format!("/v1/sessions/{session}")).await;
    assert_eq!(session_after.body["queued"], 16);
    // The running task may have written deltas since; the refusal itself wrote nothing:
    // the refused content is nowhere and the queue is unchanged.
    assert!(session_after.body["last_seq"].as_i64() >= last_seq.as_i64());

    // Clean up quickly: clear cancels everything.
    let cleared = server
        .post(&format!("/v1/sessions/{session}/clear"), &json!({}))
        .await;
    assert_eq!(cleared.status, StatusCode::OK, "{:?}", cleared.body);
    assert_eq!(cleared.body["cancelled"].as_array().map(Vec::len), Some(17));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rejects_on_a_session_that_does_not_exist_yet_accept_exactly_one() {
    let server = Arc::new(TestServer::start_default().await);
    let session = "race-fresh";
    let barrier = Arc::new(tokio::sync::Barrier::new(20));
    let mut handles = Vec::new();
    for i in 0..20 {
        let server = Arc::clone(&server);
        let barrier = Arc::clone(&barrier);
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            // The default agent is instant: the winner may even finish before a loser
            // arrives, then that one is accepted too. So count running at acceptance.
            server.send(session, &format!("fresh {i}"), "reject").await
        }));
    }
    let mut accepted = 0;
    for handle in handles {
        let answer = handle.await.expect("request task");
        match answer.status {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::CONFLICT => assert_eq!(answer.code(), Some("session_busy")),
            other => panic!("unexpected {other}: {:?}", answer.body),
        }
    }
    assert!(accepted >= 1);
    server.wait_idle(session).await;
    let stored = interactions(&server, session).await;
    assert_eq!(stored.len(), accepted, "one interaction per 202");
    let events = server.stored_events(session);
    check_log_invariants(&events);
    let created = events
        .iter()
        .filter(|e| e["type"] == "session.created")
        .count();
    assert_eq!(created, 1, "the session was created once");
    Arc::try_unwrap(server)
        .ok()
        .expect("no other owner")
        .stop()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_interrupts_leave_exactly_one_survivor() {
    let server = Arc::new(TestServer::start_default().await);
    let session = "interrupt-storm";
    let created = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"agent": "slow"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let barrier = Arc::new(tokio::sync::Barrier::new(20));
    let mut handles = Vec::new();
    for i in 0..20 {
        let server = Arc::clone(&server);
        let barrier = Arc::clone(&barrier);
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            server
                .send(session, &words(&format!("i{i}"), 100), "interrupt")
                .await
        }));
    }
    let mut ids = Vec::new();
    for handle in handles {
        let answer = handle.await.expect("request task");
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
        assert_eq!(answer.body["status"], "running", "{:?}", answer.body);
        ids.push(answer.body["id"].as_str().expect("id").to_string());
    }
    ids.sort();
    let survivor = ids.last().expect("ids").clone();
    let state = server.get(&format!("/v1/sessions/{session}")).await;
    assert_eq!(
        state.body["running"]["id"].as_str(),
        Some(survivor.as_str()),
        "the last accepted one runs"
    );
    assert_eq!(state.body["queued"], 0);
    for id in &ids[..ids.len() - 1] {
        let interaction = server
            .get(&format!("/v1/sessions/{session}/interactions/{id}"))
            .await;
        assert_eq!(
            interaction.body["status"], "cancelled",
            "{:?}",
            interaction.body
        );
        assert_eq!(interaction.body["cancel_reason"], "interrupt");
    }
    let events = server.stored_events(session);
    check_log_invariants(&events);
    let started: Vec<String> = events
        .iter()
        .filter(|e| e["type"] == "task.started")
        .map(|e| interaction_of(e).expect("names its interaction"))
        .collect();
    assert_eq!(started, ids, "each started once, in acceptance order");

    let cancel = server
        .post(&format!("/v1/sessions/{session}/cancel"), &json!({}))
        .await;
    assert_eq!(cancel.body["cancelled"], json!([survivor]));
    Arc::try_unwrap(server)
        .ok()
        .expect("no other owner")
        .stop()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_mixed_operations_keeps_one_runner() {
    let config = r#"
queue_limit = 1000

[agents.default]
kind = "echo"
delay_ms = 1
"#;
    let server = Arc::new(TestServer::start(config).await);
    let session = "storm";
    let mut handles = Vec::new();
    for i in 0..60 {
        let server = Arc::clone(&server);
        handles.push(tokio::spawn(async move {
            let path = format!("/v1/sessions/{session}");
            match i % 6 {
                0 | 1 => {
                    server
                        .send(session, &words(&format!("e{i}"), 5), "enqueue")
                        .await
                }
                2 => {
                    server
                        .send(session, &words(&format!("r{i}"), 5), "reject")
                        .await
                }
                3 => {
                    server
                        .send(session, &words(&format!("x{i}"), 5), "interrupt")
                        .await
                }
                4 => server.post(&format!("{path}/cancel"), &json!({})).await,
                _ => server.post(&format!("{path}/clear"), &json!({})).await,
            }
        }));
    }
    for handle in handles {
        let answer = handle.await.expect("request task");
        assert!(
            matches!(answer.status.as_u16(), 200 | 202 | 404 | 409),
            "{:?}",
            answer
        );
    }
    server.wait_idle(session).await;
    let events = server.stored_events(session);
    check_log_invariants(&events);
    // Every interaction that was ever queued or started ended exactly once.
    let mut opened = HashSet::new();
    let mut ended = HashSet::new();
    for event in &events {
        let kind = event["type"].as_str().unwrap_or_default();
        if let Some(id) = interaction_of(event) {
            if kind == "task.started" || kind == "interaction.queued" {
                opened.insert(id);
            } else if is_final_type(kind) {
                assert!(ended.insert(id), "two final events: {event}");
            }
        }
    }
    // (A subset, not equality: a clear may compact the events before it.)
    assert!(
        opened.is_subset(&ended),
        "every accepted interaction reached one end: {:?}",
        opened.difference(&ended).collect::<Vec<_>>()
    );
    Arc::try_unwrap(server)
        .ok()
        .expect("no other owner")
        .stop()
        .await;
}
