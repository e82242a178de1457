//! I3 when agents misbehave: a panicking agent, an agent that fails, an agent that ignores
//! cancellation, a timeout and a shutdown each end the interaction exactly once, and the
//! session's queue goes on.

mod common;

use std::sync::Arc;
use std::time::Duration;

use baton::agent::{Agent, AgentRegistry, AgentRequest, AgentResult, ConfiguredAgent, OutputSink};
use baton::model::ErrorInfo;
use baton::store::TaskOutput;
use common::{BASE_CONFIG, TestServer, check_log_invariants, interaction_of, is_final_type};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// What the test agent does after its first delta.
#[derive(Clone, Copy)]
enum Behaviour {
    Panic,
    Fail,
    /// Sleeps for an hour without looking at its cancellation token.
    IgnoreCancel,
}

struct TestAgent(Behaviour);

impl Agent for TestAgent {
    fn run(
        &self,
        request: AgentRequest,
        outputs: OutputSink,
        _cancel: CancellationToken,
    ) -> BoxFuture<'static, AgentResult> {
        let behaviour = self.0;
        async move {
            let _ = outputs
                .send(TaskOutput::Delta(format!(
                    "about {} ",
                    request.interaction.content
                )))
                .await;
            match behaviour {
                Behaviour::Panic => panic!("the test agent panics on purpose"),
                Behaviour::Fail => Err(ErrorInfo {
                    code: "agent_error".into(),
                    message: "the model is unhappy".into(),
                }),
                Behaviour::IgnoreCancel => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(None)
                }
            }
        }
        .boxed()
    }
}

fn registry() -> AgentRegistry {
    let config = baton::config::Config::from_toml(BASE_CONFIG).expect("config");
    let mut agents = AgentRegistry::from_config(&config.agents).expect("agents");
    for (name, behaviour) in [
        ("panics", Behaviour::Panic),
        ("fails", Behaviour::Fail),
        ("stubborn", Behaviour::IgnoreCancel),
    ] {
        agents.insert(
            name,
            ConfiguredAgent {
                kind: "test",
                timeout: None,
                input_timeout: std::time::Duration::from_secs(86_400),
                max_history: None,
                executor: Arc::new(TestAgent(behaviour)),
            },
        );
    }
    agents
}

fn finals_of(events: &[serde_json::Value], id: &str) -> usize {
    events
        .iter()
        .filter(|e| {
            e["type"].as_str().is_some_and(is_final_type)
                && interaction_of(e).as_deref() == Some(id)
        })
        .count()
}

async fn running_tasks(server: &TestServer) -> u64 {
    let response = server
        .http
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .expect("metrics");
    let text = response.text().await.expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix("baton_running_tasks "))
        .and_then(|v| v.trim().parse().ok())
        .expect("baton_running_tasks")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_agent_fails_its_interaction_and_the_queue_goes_on() {
    let server = TestServer::start_with_agents(BASE_CONFIG, registry()).await;
    server
        .put("/v1/sessions/p", &json!({"agent": "panics"}))
        .await;
    let first = server.send("p", "one", "reject").await;
    assert_eq!(first.status, 202);
    let second = server.send("p", "two", "enqueue").await;
    assert_eq!(second.status, 202);
    let id1 = first.body["id"].as_str().expect("id");
    let id2 = second.body["id"].as_str().expect("id");
    for id in [id1, id2] {
        let done = server.wait_final("p", id).await;
        assert_eq!(done["status"], "failed", "{done}");
        assert_eq!(done["error"]["code"], "agent_error");
        assert!(
            done["error"]["message"]
                .as_str()
                .expect("message")
                .contains("panicked")
        );
    }
    let events = server.stored_events("p");
    check_log_invariants(&events);
    assert_eq!(finals_of(&events, id1), 1);
    assert_eq!(finals_of(&events, id2), 1);
    assert_eq!(running_tasks(&server).await, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_error_fails_with_its_code_and_keeps_the_partial_response() {
    let server = TestServer::start_with_agents(BASE_CONFIG, registry()).await;
    server
        .put("/v1/sessions/f", &json!({"agent": "fails"}))
        .await;
    let answer = server
        .post("/v1/sessions/f/messages?wait=10", &json!({"content": "x"}))
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["status"], "failed");
    assert_eq!(answer.body["error"]["message"], "the model is unhappy");
    assert_eq!(answer.body["response"], "about x ");
    // A failed interaction is not part of the history an agent sees, but it is listed.
    let list = server.get("/v1/sessions/f/interactions").await;
    assert_eq!(list.body["interactions"].as_array().map(Vec::len), Some(1));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_an_agent_that_ignores_cancellation() {
    let server = TestServer::start_with_agents(BASE_CONFIG, registry()).await;
    server
        .put("/v1/sessions/s", &json!({"agent": "stubborn"}))
        .await;
    let first = server.send("s", "one", "reject").await;
    let id = first.body["id"].as_str().expect("id").to_string();
    // Wait until its first delta is stored: the agent is now asleep, deaf to cancellation.
    let deadline = tokio::time::Instant::now() + common::TIMEOUT;
    while server
        .get(&format!("/v1/sessions/s/interactions/{id}"))
        .await
        .body["response"]
        == ""
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cancelled = server.post("/v1/sessions/s/cancel", &json!({})).await;
    assert_eq!(cancelled.body["cancelled"], json!([id]));
    let done = server
        .get(&format!("/v1/sessions/s/interactions/{id}"))
        .await;
    assert_eq!(done.body["status"], "cancelled");
    assert_eq!(done.body["cancel_reason"], "cancel");
    let deadline = tokio::time::Instant::now() + common::TIMEOUT;
    while running_tasks(&server).await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the task was not stopped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(finals_of(&server.stored_events("s"), &id), 1);
    server.stop().await;
}

const TIMEOUT_CONFIG: &str = r#"
[agents.default]
kind = "echo"

[agents.tight]
kind = "echo"
delay_ms = 100
timeout_s = 0.3
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_cancels_with_reason_timeout_and_starts_the_next() {
    let server = TestServer::start(TIMEOUT_CONFIG).await;
    server
        .put("/v1/sessions/t", &json!({"agent": "tight"}))
        .await;
    let words = vec!["w"; 30].join(" ");
    let long = server.send("t", &words, "reject").await;
    let short = server.send("t", "ok", "enqueue").await;
    let long_id = long.body["id"].as_str().expect("id");
    let done = server.wait_final("t", long_id).await;
    assert_eq!(done["status"], "cancelled");
    assert_eq!(done["cancel_reason"], "timeout");
    assert!(done["response"].as_str().expect("response").len() < words.len());
    let next = server
        .wait_final("t", short.body["id"].as_str().expect("id"))
        .await;
    assert_eq!(next["status"], "completed");
    assert_eq!(next["response"], "ok");
    check_log_invariants(&server.stored_events("t"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cancels_the_running_task_and_keeps_the_queue_for_the_next_start() {
    let server = TestServer::start(BASE_CONFIG).await;
    server
        .put("/v1/sessions/sd", &json!({"agent": "slow"}))
        .await;
    let words = vec!["w"; 50].join(" ");
    let running = server.send("sd", &words, "reject").await;
    let q1 = server.send("sd", "first after restart", "enqueue").await;
    let q2 = server.send("sd", "second after restart", "enqueue").await;
    let dir = server.stop_keeping_data().await;

    let server = TestServer::restart_in(BASE_CONFIG, dir).await;
    let stopped = server
        .get(&format!(
            "/v1/sessions/sd/interactions/{}",
            running.body["id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(stopped.body["status"], "cancelled");
    assert_eq!(stopped.body["cancel_reason"], "shutdown");
    for q in [&q1, &q2] {
        let id = q.body["id"].as_str().expect("id");
        let done = server.wait_final("sd", id).await;
        assert_eq!(done["status"], "completed");
        assert_eq!(done["response"], q.body["content"]);
    }
    let events = server.stored_events("sd");
    check_log_invariants(&events);
    let started: Vec<String> = events
        .iter()
        .filter(|e| e["type"] == "task.started")
        .filter_map(interaction_of)
        .collect();
    assert_eq!(
        started,
        vec![
            running.body["id"].as_str().expect("id").to_string(),
            q1.body["id"].as_str().expect("id").to_string(),
            q2.body["id"].as_str().expect("id").to_string(),
        ]
    );
    server.stop().await;
}
