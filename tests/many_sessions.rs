//! Many sessions at once: 30 sessions × 10 concurrent `enqueue` messages, all in parallel.
//! Every interaction completes with its own content, each session's log keeps its invariants,
//! and the deltas of each interaction concatenate to its response.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use common::{TestServer, check_log_invariants};
use reqwest::StatusCode;

const SESSIONS: usize = 30;
const MESSAGES: usize = 10;

fn content(session: usize, message: usize) -> String {
    format!("session {session} says message {message}  with\tsome words\nto echo")
}

/// Sends the session's messages concurrently; returns (id, content) of each.
async fn run_session(server: Arc<TestServer>, s: usize) -> Vec<(String, String)> {
    let session = format!("many-{s}");
    let mut handles = Vec::new();
    for m in 0..MESSAGES {
        let server = Arc::clone(&server);
        let session = session.clone();
        handles.push(tokio::spawn(async move {
            let content = content(s, m);
            let answer = server.send(&session, &content, "enqueue").await;
            assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
            let id = answer.body["id"].as_str().expect("id").to_string();
            (id, content)
        }));
    }
    let mut sent = Vec::new();
    for handle in handles {
        sent.push(handle.await.expect("message task"));
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_sessions_of_ten_concurrent_messages_each_complete_correctly() {
    let server = Arc::new(TestServer::start_default().await);
    let handles: Vec<_> = (0..SESSIONS)
        .map(|s| tokio::spawn(run_session(Arc::clone(&server), s)))
        .collect();
    let mut all = Vec::new();
    for handle in handles {
        all.push(handle.await.expect("session task"));
    }

    let mut every_id = HashSet::new();
    for (s, sent) in all.iter().enumerate() {
        let session = format!("many-{s}");
        server.wait_idle(&session).await;
        let list = server
            .get(&format!("/v1/sessions/{session}/interactions?limit=100"))
            .await;
        assert_eq!(list.status, StatusCode::OK);
        let stored = list.body["interactions"].as_array().expect("list");
        assert_eq!(stored.len(), MESSAGES, "{session}");
        let expected: HashMap<&str, &str> = sent
            .iter()
            .map(|(id, content)| (id.as_str(), content.as_str()))
            .collect();
        for interaction in stored {
            let id = interaction["id"].as_str().expect("id");
            assert!(
                every_id.insert(id.to_string()),
                "ids are unique across sessions"
            );
            assert_eq!(interaction["session"], session.as_str());
            assert_eq!(interaction["status"], "completed", "{interaction}");
            assert_eq!(
                interaction["response"].as_str(),
                expected.get(id).copied(),
                "{interaction}"
            );
            assert_eq!(interaction["content"], interaction["response"]);
        }

        let events = server.stored_events(&session);
        check_log_invariants(&events);
        assert!(events.iter().all(|e| e["session"] == session.as_str()));
        let mut deltas: HashMap<String, String> = HashMap::new();
        for event in events.iter().filter(|e| e["type"] == "task.delta") {
            let id = event["data"]["interaction_id"].as_str().expect("id");
            let text = event["data"]["text"].as_str().expect("text");
            deltas.entry(id.to_string()).or_default().push_str(text);
        }
        for (id, content) in sent {
            assert_eq!(
                deltas.get(id).map(String::as_str),
                Some(content.as_str()),
                "the deltas of {id} concatenate to its response"
            );
        }
        let completed = events
            .iter()
            .filter(|e| e["type"] == "task.completed")
            .count();
        assert_eq!(completed, MESSAGES, "{session}");
    }
    assert_eq!(every_id.len(), SESSIONS * MESSAGES);
    Arc::try_unwrap(server)
        .ok()
        .expect("no other owner")
        .stop()
        .await;
}
