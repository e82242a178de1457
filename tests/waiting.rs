//! Waiting for input (API.md "Waiting for input"), black box: an agent asks, the interaction
//! waits, one answer resumes it, and it completes with the text before and after the ask;
//! the policies, cancel, clear, delete and the timeout while it waits; racing answers; and a
//! waiting interaction across `kill -9` of its server.

mod common;

use std::time::Duration;

use common::cluster::{Cluster, Node};
use common::pg::postgres_admin_url;
use common::stream::Ws;
use common::{TIMEOUT, TestServer, check_log_invariants, types};
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};

const AGENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/approval_agent.py");
/// Replies "You said: … (message N of this conversation)", N = its history's length + 1.
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/agent.py");

fn config() -> String {
    format!(
        r#"
queue_limit = 16

[agents.default]
kind = "echo"

[agents.careful]
kind = "command"
program = "python3"
args = ["{AGENT}"]

[agents.py]
kind = "command"
program = "python3"
args = ["{EXAMPLE}"]

[agents.twice]
kind = "command"
program = "/bin/sh"
args = ["-c", """
input=$(cat)
case "$input" in
  *'"answers":[]'*) printf '%s\n' '{{"type":"delta","text":"one "}}' '{{"type":"ask","data":1}}' ;;
  *'"answer":"a"}}]'*) printf '%s\n' '{{"type":"delta","text":"two "}}' '{{"type":"ask","data":2}}' ;;
  *) printf '%s\n' '{{"type":"delta","text":"three"}}' '{{"type":"result"}}' ;;
esac
"""]

[agents.brief]
kind = "command"
program = "python3"
args = ["{AGENT}"]
input_timeout_s = 1
"#
    )
}

async fn server_with(session: &str, agent: &str) -> TestServer {
    let server = TestServer::start(&config()).await;
    let put = server
        .put(&format!("/v1/sessions/{session}"), &json!({"agent": agent}))
        .await;
    assert!(put.status.is_success(), "{}", put.body);
    server
}

/// Polls the interaction until its status is `status`.
async fn until_status(server: &TestServer, session: &str, id: &str, status: &str) -> Value {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let answer = server
            .get(&format!("/v1/sessions/{session}/interactions/{id}"))
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        if answer.body["status"] == status {
            return answer.body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} never became {status}: {}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `content` and waits until the agent asks; the interaction as it waits.
async fn asked(server: &TestServer, session: &str, content: &str, policy: &str) -> Value {
    let sent = server.send(session, content, policy).await;
    assert_eq!(sent.status, StatusCode::ACCEPTED, "{}", sent.body);
    let id = sent.body["id"].as_str().expect("id").to_string();
    until_status(server, session, &id, "waiting").await
}

async fn answer(
    server: &TestServer,
    session: &str,
    waiting: &Value,
    answer: Value,
) -> common::Answer {
    let id = waiting["id"].as_str().expect("id");
    let request_id = waiting["request"]["id"].as_str().expect("request id");
    server
        .post(
            &format!("/v1/sessions/{session}/interactions/{id}/answer"),
            &json!({"request_id": request_id, "answer": answer}),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_wait_answer_resume_complete_over_http() {
    let server = server_with("h", "careful").await;
    let waiting = asked(&server, "h", "delete 40 files", "reject").await;
    assert_eq!(waiting["response"], "Plan: delete 40 files. ");
    assert_eq!(
        waiting["request"]["data"],
        json!({"question": "May I delete 40 files?", "options": ["yes", "no"]})
    );
    // The session shows it as its active interaction.
    let session = server.get("/v1/sessions/h").await;
    assert_eq!(session.body["running"]["status"], "waiting");
    let resumed = answer(&server, "h", &waiting, json!("yes")).await;
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.body);
    assert_eq!(resumed.body["status"], "running");
    assert!(resumed.body["request"].is_null());
    let id = waiting["id"].as_str().expect("id");
    let done = server.wait_final("h", id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["response"], "Plan: delete 40 files. Approved: done.");
    assert!(done["request"].is_null());
    assert_eq!(done["answers"][0]["request"], waiting["request"]);
    assert_eq!(done["answers"][0]["answer"], "yes");
    let events = server.stored_events("h");
    check_log_invariants(&events);
    let kinds = types(&events);
    let from = kinds
        .iter()
        .position(|k| k == "task.started")
        .expect("started");
    assert_eq!(
        &kinds[from..],
        [
            "task.started",
            "task.delta",
            "task.waiting",
            "task.resumed",
            "task.delta",
            "task.completed"
        ]
    );
    // Answering again: not waiting.
    let again = answer(&server, "h", &waiting, json!("yes")).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(again.code(), Some("not_waiting"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_wait_answer_resume_complete_over_websocket() {
    let server = server_with("w", "careful").await;
    let mut ws = Ws::connect(&server, "w", "").await;
    let (reply, _) = ws
        .request(&json!({"op": "message", "content": "rename the folder", "ref": 1}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let id = reply["data"]["id"].clone();
    let waiting = ws
        .events_until(|e| e["type"] == "task.waiting")
        .await
        .pop()
        .expect("task.waiting");
    let interaction = &waiting["data"]["interaction"];
    assert_eq!(interaction["id"], id);
    assert_eq!(interaction["status"], "waiting");
    let (reply, mut events) = ws
        .request(&json!({
            "op": "answer", "ref": 2, "interaction_id": id,
            "request_id": interaction["request"]["id"], "answer": {"approved": false}
        }))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["data"]["status"], "running");
    // The resumed event may come before the reply or after it.
    events.extend(ws.events_until(|e| e["type"] == "task.completed").await);
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"task.resumed"), "{kinds:?}");
    let done = &events.last().expect("completed")["data"]["interaction"];
    assert_eq!(
        done["response"],
        "Plan: rename the folder. Not approved: nothing was changed."
    );
    // An answer to an interaction that does not wait: ok false, not_waiting.
    let (reply, _) = ws
        .request(&json!({
            "op": "answer", "ref": 3, "interaction_id": id,
            "request_id": interaction["request"]["id"], "answer": true
        }))
        .await;
    assert_eq!(reply["error"]["code"], "not_waiting", "{reply}");
    ws.close().await;
    server.stop().await;
}

/// A program that asks again goes through the same path: wait, answer, run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_that_asks_twice_waits_twice() {
    let server = server_with("twice", "twice").await;
    let first = asked(&server, "twice", "go", "reject").await;
    assert_eq!(first["request"]["data"], 1);
    let id = first["id"].as_str().expect("id");
    assert_eq!(
        answer(&server, "twice", &first, json!("a")).await.status,
        StatusCode::OK
    );
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let second = loop {
        let now = server
            .get(&format!("/v1/sessions/twice/interactions/{id}"))
            .await
            .body;
        if now["status"] == "waiting" && now["request"]["data"] == 2 {
            break now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never asked again: {now}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(second["response"], "one two ");
    assert_eq!(
        answer(&server, "twice", &second, json!("b")).await.status,
        StatusCode::OK
    );
    let done = server.wait_final("twice", id).await;
    assert_eq!(done["response"], "one two three");
    let answers: Vec<&Value> = done["answers"]
        .as_array()
        .expect("answers")
        .iter()
        .collect();
    assert_eq!(answers.len(), 2);
    assert_eq!(
        (answers[0]["answer"].clone(), answers[1]["answer"].clone()),
        (json!("a"), json!("b"))
    );
    assert_eq!(answers[0]["request"]["data"], 1);
    assert_eq!(answers[1]["request"]["data"], 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_twenty_concurrent_answers_exactly_one_wins() {
    let server = server_with("race", "careful").await;
    let waiting = asked(&server, "race", "send the invoice", "reject").await;
    let answers = join_all((0..20).map(|i| answer(&server, "race", &waiting, json!(i)))).await;
    let won: Vec<_> = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .collect();
    assert_eq!(won.len(), 1, "{answers:?}");
    for lost in answers.iter().filter(|a| a.status != StatusCode::OK) {
        assert_eq!(lost.status, StatusCode::CONFLICT, "{:?}", lost.body);
        assert_eq!(lost.code(), Some("not_waiting"));
    }
    let id = waiting["id"].as_str().expect("id");
    let done = server.wait_final("race", id).await;
    assert_eq!(done["answers"].as_array().expect("answers").len(), 1);
    let events = server.stored_events("race");
    check_log_invariants(&events);
    assert_eq!(
        types(&events)
            .iter()
            .filter(|k| *k == "task.resumed")
            .count(),
        1
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_policy_while_waiting() {
    let server = server_with("p", "careful").await;
    let waiting = asked(&server, "p", "first", "reject").await;
    let id = waiting["id"].as_str().expect("id");
    let busy = server.send("p", "second", "reject").await;
    assert_eq!(busy.status, StatusCode::CONFLICT);
    assert_eq!(busy.body["error"]["running"], id);
    let queued = server.send("p", "second", "enqueue").await;
    assert_eq!(queued.status, StatusCode::ACCEPTED);
    assert_eq!(queued.body["status"], "queued");
    // Still waiting, the queued one does not start.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second_id = queued.body["id"].as_str().expect("id");
    let second = server
        .get(&format!("/v1/sessions/p/interactions/{second_id}"))
        .await;
    assert_eq!(second.body["status"], "queued");
    // Interrupt: the waiting one and the queued one are cancelled, the new one runs.
    let third = server.send("p", "third", "interrupt").await;
    assert_eq!(third.status, StatusCode::ACCEPTED);
    let first = server.wait_final("p", id).await;
    assert_eq!(first["status"], "cancelled");
    assert_eq!(first["cancel_reason"], "interrupt");
    assert!(first["request"].is_null());
    let second = server.wait_final("p", second_id).await;
    assert_eq!(second["cancel_reason"], "interrupt");
    let third_id = third.body["id"].as_str().expect("id");
    until_status(&server, "p", third_id, "waiting").await;
    check_log_invariants(&server.stored_events("p"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_clear_and_delete_end_a_waiting_interaction() {
    let server = server_with("c", "careful").await;
    let waiting = asked(&server, "c", "one", "reject").await;
    let id = waiting["id"].as_str().expect("id");
    let cancelled = server.post("/v1/sessions/c/cancel", &json!({})).await;
    assert_eq!(cancelled.body["cancelled"], json!([id]));
    let done = server.wait_final("c", id).await;
    assert_eq!(done["cancel_reason"], "cancel");
    assert_eq!(
        answer(&server, "c", &waiting, json!("yes")).await.status,
        StatusCode::CONFLICT
    );

    let waiting = asked(&server, "c", "two", "reject").await;
    let id = waiting["id"].as_str().expect("id");
    let cleared = server.post("/v1/sessions/c/clear", &json!({})).await;
    assert_eq!(cleared.body["cancelled"], json!([id]));
    // Removed by the clear: not found.
    assert_eq!(
        answer(&server, "c", &waiting, json!("yes")).await.status,
        StatusCode::NOT_FOUND
    );

    let waiting = asked(&server, "c", "three", "reject").await;
    let deleted = server.delete("/v1/sessions/c").await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(
        answer(&server, "c", &waiting, json!("yes")).await.status,
        StatusCode::NOT_FOUND
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_request_times_out_and_the_queue_goes_on() {
    let server = server_with("t", "brief").await;
    let waiting = asked(&server, "t", "wait for me", "reject").await;
    let next = server.send("t", "next", "enqueue").await;
    let id = waiting["id"].as_str().expect("id");
    let done = server.wait_final("t", id).await;
    assert_eq!(done["status"], "cancelled");
    assert_eq!(done["cancel_reason"], "timeout");
    // The queued one starts (and asks in its turn).
    until_status(
        &server,
        "t",
        next.body["id"].as_str().expect("id"),
        "waiting",
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_holds_completed_answers_never_cancelled_ones() {
    let server = server_with("hist", "careful").await;
    let waiting = asked(&server, "hist", "first", "reject").await;
    answer(&server, "hist", &waiting, json!("yes")).await;
    server
        .wait_final("hist", waiting["id"].as_str().expect("id"))
        .await;
    let cancelled = asked(&server, "hist", "second", "reject").await;
    server.post("/v1/sessions/hist/cancel", &json!({})).await;
    server
        .wait_final("hist", cancelled["id"].as_str().expect("id"))
        .await;
    // The next agent's history: the completed one only (so this is message 2).
    server
        .put("/v1/sessions/hist", &json!({"agent": "py"}))
        .await;
    let sent = server
        .post(
            "/v1/sessions/hist/messages?wait=30",
            &json!({"content": "third"}),
        )
        .await;
    assert_eq!(sent.body["status"], "completed", "{}", sent.body);
    assert_eq!(
        sent.body["response"],
        "You said: third (message 2 of this conversation)"
    );
    server.stop().await;
}

/// A waiting interaction is stored state: `kill -9`, restart on the same database, answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_interaction_survives_kill_9_and_is_answered_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config_file = dir.path().join("baton.toml");
    std::fs::write(&config_file, config()).expect("config");
    let database = format!("sqlite://{}", dir.path().join("baton.db").display());
    let http = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .build()
        .expect("client");
    let mut node = Node::spawn("a", &database, &config_file, http.clone());
    let api = node.api.clone();
    api.put_session("k", "careful").await;
    let sent = api.send("k", "archive the logs", "reject").await;
    let id = sent.body["id"].as_str().expect("id").to_string();
    let waiting = api
        .wait_interaction("k", &id, TIMEOUT, "waiting", |i| i["status"] == "waiting")
        .await;
    node.kill9();
    let node = Node::spawn("b", &database, &config_file, http);
    let api = node.api.clone();
    let still = api.interaction("k", &id).await;
    assert_eq!(
        still["status"], "waiting",
        "nothing was interrupted: {still}"
    );
    assert_eq!(still["request"], waiting["request"]);
    let resumed = api
        .post(
            &format!("/v1/sessions/k/interactions/{id}/answer"),
            &json!({"request_id": waiting["request"]["id"], "answer": "yes"}),
        )
        .await;
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.body);
    let done = api.wait_final("k", &id, TIMEOUT).await;
    assert_eq!(done["response"], "Plan: archive the logs. Approved: done.");
    check_log_invariants(&common::stored_events(&dir.path().join("baton.db"), "k"));
}

/// On PostgreSQL: the node the interaction waited on is killed; the answer goes to another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_postgres_tests),
    ignore = "needs PostgreSQL: set BATON_TEST_POSTGRES to an admin URL"
)]
async fn the_answer_reaches_another_node_after_the_waiting_one_is_killed() {
    let admin = postgres_admin_url();
    let config = format!("node_lease_s = 2\n{}", config());
    let mut cluster = Cluster::start(&admin, 2, &config).await;
    let a = cluster.api(0);
    let b = cluster.api(1);
    a.put_session("pg", "careful").await;
    let sent = a.send("pg", "restart the service", "reject").await;
    let id = sent.body["id"].as_str().expect("id").to_string();
    let waiting = a
        .wait_interaction("pg", &id, TIMEOUT, "waiting", |i| i["status"] == "waiting")
        .await;
    cluster.nodes[0].kill9();
    // Past the dead node's lease, it is still waiting: nothing ran, nothing was lost.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let still = b.interaction("pg", &id).await;
    assert_eq!(still["status"], "waiting", "{still}");
    let resumed = b
        .post(
            &format!("/v1/sessions/pg/interactions/{id}/answer"),
            &json!({"request_id": waiting["request"]["id"], "answer": "yes"}),
        )
        .await;
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.body);
    let done = b.wait_final("pg", &id, TIMEOUT).await;
    assert_eq!(
        done["response"],
        "Plan: restart the service. Approved: done."
    );
    let events = cluster.pg.stored_events("pg").await;
    check_log_invariants(&events);
}
