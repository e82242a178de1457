//! I5 and I3 across a real `kill -9`: a child `baton serve` process is killed mid-task; after
//! a restart on the same database everything acknowledged is there, the interrupted task is
//! `failed` with code `interrupted` (one final event), and the queued work runs in order.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::{TIMEOUT, check_log_invariants, stored_events};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A child server, killed when dropped.
struct ChildServer {
    child: Child,
    url: String,
}

impl ChildServer {
    fn start(dir: &Path) -> Self {
        let config = dir.join("baton.toml");
        std::fs::write(
            &config,
            "queue_limit = 16\n[agents.default]\nkind = \"echo\"\n[agents.slow]\nkind = \"echo\"\ndelay_ms = 50\n",
        )
        .expect("write config");
        let mut child = common::child::baton()
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--database")
            .arg(format!("sqlite://{}", dir.join("baton.db").display()))
            .env("BATON_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn baton serve");
        let url = common::child::listening_url(child.stdout.take().expect("stdout"))
            .expect("the server prints its address");
        Self { child, url }
    }

    fn kill9(mut self) {
        // std's kill is SIGKILL on Unix: no shutdown code runs.
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = http.request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_acknowledged_and_interrupts_the_running_task() {
    let dir = tempfile::tempdir().expect("tempdir");
    let http = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .build()
        .expect("client");
    let server = ChildServer::start(dir.path());
    let base = server.url.clone();

    // Acknowledged state before the crash.
    let (status, _) = call(
        &http,
        reqwest::Method::PUT,
        format!("{base}/v1/sessions/crash"),
        Some(json!({"agent": "slow", "context": {"k": "v"}})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, done) = call(
        &http,
        reqwest::Method::POST,
        format!("{base}/v1/sessions/other/messages?wait=10"),
        Some(json!({"content": "finished before the crash"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(done["status"], "completed");

    let words = (0..60)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let (status, running) = call(
        &http,
        reqwest::Method::POST,
        format!("{base}/v1/sessions/crash/messages"),
        Some(json!({"content": words})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let mut queued = Vec::new();
    for i in 0..3 {
        let (status, q) = call(
            &http,
            reqwest::Method::POST,
            format!("{base}/v1/sessions/crash/messages"),
            Some(json!({"content": format!("queued {i}"), "policy": "enqueue"})),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(q["status"], "queued");
        queued.push(q["id"].as_str().expect("id").to_string());
    }
    // A burst of acknowledged writes right before the kill.
    let mut burst = Vec::new();
    for i in 0..40 {
        let (status, b) = call(
            &http,
            reqwest::Method::POST,
            format!("{base}/v1/sessions/burst-{i}/messages"),
            Some(json!({"content": format!("burst {i}")})),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED);
        burst.push((
            format!("burst-{i}"),
            b["id"].as_str().expect("id").to_string(),
        ));
    }
    // Let the slow task produce some deltas, then kill -9.
    let running_id = running["id"].as_str().expect("id").to_string();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let (_, i) = call(
            &http,
            reqwest::Method::GET,
            format!("{base}/v1/sessions/crash/interactions/{running_id}"),
            None,
        )
        .await;
        if i["response"].as_str().is_some_and(|r| r.len() > 10) {
            assert_eq!(i["status"], "running");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no deltas in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seqs_before: Vec<i64> = stored_events(&dir.path().join("baton.db"), "crash")
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    server.kill9();

    // Restart on the same database.
    let server = ChildServer::start(dir.path());
    let base = server.url.clone();
    let (_, failed) = call(
        &http,
        reqwest::Method::GET,
        format!("{base}/v1/sessions/crash/interactions/{running_id}"),
        None,
    )
    .await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "interrupted");
    for id in &queued {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let (_, q) = call(
                &http,
                reqwest::Method::GET,
                format!("{base}/v1/sessions/crash/interactions/{id}"),
                None,
            )
            .await;
            if q["status"] == "completed" {
                assert!(
                    q["content"]
                        .as_str()
                        .expect("content")
                        .starts_with("queued")
                );
                assert_eq!(q["response"], q["content"]);
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "queued work did not run: {q}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (_, context) = call(
        &http,
        reqwest::Method::GET,
        format!("{base}/v1/sessions/crash/context"),
        None,
    )
    .await;
    assert_eq!(context, json!({"k": "v"}));
    let (_, other) = call(
        &http,
        reqwest::Method::GET,
        format!(
            "{base}/v1/sessions/other/interactions/{}",
            done["id"].as_str().expect("id")
        ),
        None,
    )
    .await;
    assert_eq!(
        other, done,
        "a completed interaction is unchanged by the crash"
    );
    for (session, id) in &burst {
        let (status, b) = call(
            &http,
            reqwest::Method::GET,
            format!("{base}/v1/sessions/{session}/interactions/{id}"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "acknowledged message {id} lost");
        assert!(
            matches!(b["status"].as_str(), Some("completed" | "failed")),
            "{b}"
        );
    }

    // The log: seqs kept and never reused; exactly one final event for the interrupted task;
    // the queued ones started in FIFO order after it.
    let events = stored_events(&dir.path().join("baton.db"), "crash");
    check_log_invariants(&events);
    let seqs: Vec<i64> = events
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(&seqs[..seqs_before.len()], &seqs_before[..]);
    let finals_of_running = events
        .iter()
        .filter(|e| {
            e["type"].as_str().is_some_and(common::is_final_type)
                && common::interaction_of(e).as_deref() == Some(running_id.as_str())
        })
        .count();
    assert_eq!(finals_of_running, 1);
    let started: Vec<String> = events
        .iter()
        .filter(|e| e["type"] == "task.started")
        .filter_map(common::interaction_of)
        .collect();
    assert_eq!(started[1..], queued[..]);
}
