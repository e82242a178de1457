//! The session resources: listing with paging, delete (204, then 404, a seq never reused, a
//! running task cancelled and silenced), interactions newest first with paging, and the exact
//! fields and timestamp format of Session and Interaction objects.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{TIMEOUT, TestServer, interaction_of, words};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn encode(cursor: &str) -> String {
    form_urlencoded::byte_serialize(cursor.as_bytes()).collect()
}

fn keys(value: &Value) -> HashSet<&str> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect()
}

/// RFC 3339 in UTC with at least millisecond precision: `YYYY-MM-DDTHH:MM:SS.mmm…Z`.
fn assert_timestamp(value: &Value, what: &str) {
    let s = value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: not a string: {value}"));
    let b = s.as_bytes();
    assert!(s.ends_with('Z'), "{what}: UTC with Z: {s}");
    assert!(b.len() >= 24, "{what}: too short: {s}");
    for (i, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
    ] {
        assert_eq!(b[i], c, "{what}: {s}");
    }
    let fraction = &s[20..s.len() - 1];
    assert!(
        fraction.len() >= 3 && fraction.bytes().all(|c| c.is_ascii_digit()),
        "{what}: milliseconds: {s}"
    );
    for range in [0..4, 5..7, 8..10, 11..13, 14..16, 17..19] {
        assert!(
            b[range].iter().all(u8::is_ascii_digit),
            "{what}: digits: {s}"
        );
    }
}

const SESSION_FIELDS: [&str; 8] = [
    "id",
    "agent",
    "context",
    "epoch",
    "last_seq",
    "created_at",
    "running",
    "queued",
];
const INTERACTION_FIELDS: [&str; 12] = [
    "id",
    "session",
    "content",
    "metadata",
    "status",
    "response",
    "error",
    "request",
    "cancel_reason",
    "created_at",
    "started_at",
    "finished_at",
];

fn assert_session_shape(session: &Value) {
    assert_eq!(keys(session), HashSet::from(SESSION_FIELDS), "{session}");
    assert!(session["id"].is_string());
    assert!(session["agent"].is_string());
    assert!(session["context"].is_object());
    assert!(session["epoch"].is_u64());
    assert!(session["last_seq"].is_u64());
    assert!(session["queued"].is_u64());
    assert_timestamp(&session["created_at"], "session.created_at");
    if !session["running"].is_null() {
        assert_interaction_shape(&session["running"]);
        assert_eq!(session["running"]["status"], "running");
    }
}

fn assert_interaction_shape(interaction: &Value) {
    // `answers` appears once the agent has asked; none of these agents asks.
    assert_eq!(
        keys(interaction),
        HashSet::from(INTERACTION_FIELDS),
        "{interaction}"
    );
    assert_eq!(
        interaction["request"].is_null(),
        interaction["status"] != "waiting",
        "{interaction}"
    );
    assert!(interaction["id"].is_string());
    assert!(interaction["session"].is_string());
    assert!(interaction["content"].is_string());
    assert!(interaction["metadata"].is_object());
    assert!(interaction["response"].is_string());
    assert_timestamp(&interaction["created_at"], "created_at");
    let status = interaction["status"].as_str().expect("status");
    match status {
        "queued" => {
            assert!(interaction["started_at"].is_null());
            assert!(interaction["finished_at"].is_null());
        }
        "running" => {
            assert_timestamp(&interaction["started_at"], "started_at");
            assert!(interaction["finished_at"].is_null());
        }
        "completed" | "failed" | "cancelled" => {
            assert_timestamp(&interaction["finished_at"], "finished_at");
        }
        other => panic!("unknown status {other}"),
    }
    if status == "cancelled" {
        assert!(interaction["cancel_reason"].is_string(), "{interaction}");
    } else {
        assert!(interaction["cancel_reason"].is_null(), "{interaction}");
    }
    if status == "failed" {
        assert!(interaction["error"]["code"].is_string(), "{interaction}");
        assert!(interaction["error"]["message"].is_string(), "{interaction}");
    } else {
        assert!(interaction["error"].is_null(), "{interaction}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_listed_by_id_and_paged() {
    let server = TestServer::start_default().await;
    let mut ids = vec![
        "s-e", "s-a", "s-d", "S-z", "s-c", "s-b", "s.b", "s_a", "s:9",
    ];
    for id in &ids {
        let created = server.put(&format!("/v1/sessions/{id}"), &json!({})).await;
        assert_eq!(
            created.status,
            StatusCode::CREATED,
            "{id}: {:?}",
            created.body
        );
    }
    ids.sort();

    let all = server.get("/v1/sessions").await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(keys(&all.body), HashSet::from(["sessions", "next"]));
    assert!(all.body["next"].is_null());
    let listed: Vec<&str> = all.body["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|s| {
            assert_session_shape(s);
            s["id"].as_str().expect("id")
        })
        .collect();
    assert_eq!(listed, ids, "ordered by id");

    let mut seen = Vec::new();
    let mut path = "/v1/sessions?limit=2".to_string();
    for _ in 0..=ids.len() {
        let page = server.get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}: {:?}", page.body);
        let sessions = page.body["sessions"].as_array().expect("sessions");
        assert!(sessions.len() <= 2, "{path}");
        seen.extend(
            sessions
                .iter()
                .map(|s| s["id"].as_str().expect("id").to_string()),
        );
        match page.body["next"].as_str() {
            Some(next) => path = format!("/v1/sessions?limit=2&after={}", encode(next)),
            None => break,
        }
    }
    assert_eq!(seen, ids, "every session once, in order");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_the_session_and_a_seq_is_never_reused() {
    let server = TestServer::start_default().await;
    let session = "phoenix";
    for content in ["first life", "still first life"] {
        let done = server
            .post(
                &format!("/v1/sessions/{session}/messages?wait=30"),
                &json!({"content": content}),
            )
            .await;
        assert_eq!(done.status, StatusCode::OK, "{:?}", done.body);
    }
    server
        .put(&format!("/v1/sessions/{session}/context"), &json!({"a": 1}))
        .await;
    let before = server.get(&format!("/v1/sessions/{session}")).await;
    let last_seq = before.body["last_seq"].as_u64().expect("last_seq");
    assert!(last_seq > 0);

    let deleted = server.delete(&format!("/v1/sessions/{session}")).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{:?}", deleted.body);
    assert!(deleted.body.is_null(), "204 has no body");
    for path in [
        format!("/v1/sessions/{session}"),
        format!("/v1/sessions/{session}/interactions"),
        format!("/v1/sessions/{session}/context"),
    ] {
        let answer = server.get(&path).await;
        assert_eq!(
            answer.status,
            StatusCode::NOT_FOUND,
            "{path}: {:?}",
            answer.body
        );
        assert_eq!(answer.code(), Some("not_found"));
    }
    let again = server.delete(&format!("/v1/sessions/{session}")).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert_eq!(again.code(), Some("not_found"));
    assert!(server.stored_events(session).is_empty(), "its log is gone");
    let list = server.get("/v1/sessions").await;
    assert_eq!(list.body["sessions"], json!([]));

    // The id can be created again, as a new session whose seqs continue.
    let reborn = server
        .post(
            &format!("/v1/sessions/{session}/messages?wait=30"),
            &json!({"content": "second life"}),
        )
        .await;
    assert_eq!(reborn.status, StatusCode::OK, "{:?}", reborn.body);
    let events = server.stored_events(session);
    let first_seq = events[0]["seq"].as_u64().expect("seq");
    assert!(
        first_seq > last_seq,
        "a seq is never reused: first {first_seq} after deleted last_seq {last_seq}"
    );
    assert_eq!(events[0]["type"], "session.created");
    let state = server.get(&format!("/v1/sessions/{session}")).await;
    assert_eq!(state.body["epoch"], 0);
    assert_eq!(state.body["context"], json!({}));
    assert!(state.body["last_seq"].as_u64() > Some(last_seq));
    let history = server
        .get(&format!("/v1/sessions/{session}/interactions"))
        .await;
    let items = history.body["interactions"].as_array().expect("list");
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["content"], "second life");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_cancels_a_running_task_which_then_writes_nothing() {
    let server = Arc::new(TestServer::start_default().await);
    let session = "doomed";
    let created = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"agent": "slow"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);

    // A client waits on the running interaction; another one is queued.
    let waiter = {
        let server = Arc::clone(&server);
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
    let running_id = loop {
        let state = server.get(&format!("/v1/sessions/{session}")).await;
        if let Some(id) = state.body["running"]["id"].as_str()
            && !state.body["running"]["response"]
                .as_str()
                .unwrap_or_default()
                .is_empty()
        {
            break id.to_string();
        }
        assert!(tokio::time::Instant::now() < deadline, "never running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let queued = server.send(session, "queued behind", "enqueue").await;
    assert_eq!(queued.status, StatusCode::ACCEPTED);

    let deleted = server.delete(&format!("/v1/sessions/{session}")).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{:?}", deleted.body);

    // The waiter sees its interaction end, cancelled by the delete.
    let answer = tokio::time::timeout(TIMEOUT, waiter)
        .await
        .expect("the wait ends")
        .expect("waiter task");
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.body["id"].as_str(), Some(running_id.as_str()));
    assert_eq!(answer.body["status"], "cancelled", "{:?}", answer.body);
    assert_eq!(answer.body["cancel_reason"], "delete");

    // Give the cancelled task the chance to misbehave: it must not write anything.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.get(&format!("/v1/sessions/{session}")).await.status,
        StatusCode::NOT_FOUND
    );
    assert!(
        server.stored_events(session).is_empty(),
        "stray events: {:?}",
        server.stored_events(session)
    );

    // Recreated, the session has nothing of the old one, even a while later.
    let recreated = server
        .put(&format!("/v1/sessions/{session}"), &json!({}))
        .await;
    assert_eq!(
        recreated.status,
        StatusCode::CREATED,
        "{:?}",
        recreated.body
    );
    assert_eq!(recreated.body["agent"], "default");
    assert!(recreated.body["running"].is_null());
    assert_eq!(recreated.body["queued"], 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let history = server
        .get(&format!("/v1/sessions/{session}/interactions"))
        .await;
    assert_eq!(history.body["interactions"], json!([]));
    let events = server.stored_events(session);
    assert!(
        events.iter().all(|e| interaction_of(e).is_none()),
        "stray interaction events: {events:?}"
    );
    let gone = server
        .get(&format!("/v1/sessions/{session}/interactions/{running_id}"))
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    Arc::try_unwrap(server)
        .ok()
        .expect("no other owner")
        .stop()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactions_are_listed_newest_first_and_paged() {
    let server = TestServer::start_default().await;
    let session = "history";
    let mut ids = Vec::new();
    for i in 0..5 {
        let done = server
            .post(
                &format!("/v1/sessions/{session}/messages?wait=30"),
                &json!({"content": format!("message {i}"), "metadata": {"i": i}}),
            )
            .await;
        assert_eq!(done.status, StatusCode::OK, "{:?}", done.body);
        ids.push(done.body["id"].as_str().expect("id").to_string());
    }
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, ids, "ids follow acceptance order");
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();

    let all = server
        .get(&format!("/v1/sessions/{session}/interactions"))
        .await;
    assert_eq!(keys(&all.body), HashSet::from(["interactions", "next"]));
    assert!(all.body["next"].is_null());
    let listed: Vec<String> = all.body["interactions"]
        .as_array()
        .expect("list")
        .iter()
        .map(|i| {
            assert_interaction_shape(i);
            i["id"].as_str().expect("id").to_string()
        })
        .collect();
    assert_eq!(listed, newest_first);

    let mut seen = Vec::new();
    let base = format!("/v1/sessions/{session}/interactions?limit=2");
    let mut path = base.clone();
    for _ in 0..=ids.len() {
        let page = server.get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}: {:?}", page.body);
        let items = page.body["interactions"].as_array().expect("list");
        assert!(items.len() <= 2);
        seen.extend(
            items
                .iter()
                .map(|i| i["id"].as_str().expect("id").to_string()),
        );
        match page.body["next"].as_str() {
            Some(next) => path = format!("{base}&before={}", encode(next)),
            None => break,
        }
    }
    assert_eq!(seen, newest_first, "every interaction once, newest first");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_and_interaction_objects_have_exactly_the_contract_fields() {
    let server = TestServer::start_default().await;
    let session = "shapes";
    let created = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"agent": "slow", "context": {"k": "v"}}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_session_shape(&created.body);
    assert_eq!(created.body["id"], session);
    assert_eq!(created.body["agent"], "slow");
    assert_eq!(created.body["context"], json!({"k": "v"}));
    assert_eq!(created.body["epoch"], 0);
    assert!(created.body["running"].is_null());
    assert_eq!(created.body["queued"], 0);

    let running = server.send(session, &words("long", 100), "reject").await;
    assert_eq!(running.status, StatusCode::ACCEPTED);
    assert_interaction_shape(&running.body);
    assert_eq!(running.body["session"], session);
    assert_eq!(running.body["status"], "running");
    assert_eq!(running.body["metadata"], json!({}));
    let queued = server
        .post(
            &format!("/v1/sessions/{session}/messages"),
            &json!({"content": "wait for it", "policy": "enqueue", "metadata": {"m": [1]}}),
        )
        .await;
    assert_eq!(queued.status, StatusCode::ACCEPTED);
    assert_interaction_shape(&queued.body);
    assert_eq!(queued.body["status"], "queued");
    assert_eq!(queued.body["response"], "");
    assert_eq!(queued.body["metadata"], json!({"m": [1]}));

    let state = server.get(&format!("/v1/sessions/{session}")).await;
    assert_session_shape(&state.body);
    assert_eq!(state.body["running"]["id"], running.body["id"]);
    assert_eq!(state.body["queued"], 1);
    assert!(state.body["last_seq"].as_u64() >= created.body["last_seq"].as_u64());

    let cancel = server
        .post(&format!("/v1/sessions/{session}/cancel"), &json!({}))
        .await;
    assert_eq!(cancel.status, StatusCode::OK);
    let cancelled = server
        .get(&format!(
            "/v1/sessions/{session}/interactions/{}",
            running.body["id"].as_str().expect("id")
        ))
        .await;
    assert_interaction_shape(&cancelled.body);
    assert_eq!(cancelled.body["cancel_reason"], "cancel");
    let done = server
        .wait_final(session, queued.body["id"].as_str().expect("id"))
        .await;
    assert_interaction_shape(&done);
    assert_eq!(done["status"], "completed");
    assert_timestamp(&done["started_at"], "started_at");
    assert!(done["created_at"].as_str() <= done["started_at"].as_str());
    assert!(done["started_at"].as_str() <= done["finished_at"].as_str());

    // Event envelopes too.
    for event in server.stored_events(session) {
        assert_eq!(
            keys(&event),
            HashSet::from(["seq", "session", "type", "at", "data"]),
            "{event}"
        );
        assert_timestamp(&event["at"], "event.at");
        assert_eq!(event["session"], session);
    }
    server.stop().await;
}
