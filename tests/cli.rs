//! The `baton send` and `baton history` commands against a real server.

mod common;

use std::process::Command;

use common::TestServer;

fn baton(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(args)
        .env("BATON_LOG", "warn")
        .output()
        .expect("run baton")
}

async fn baton_async(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        baton(&args)
    })
    .await
    .expect("join")
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_prints_the_response_and_history_lists_it() {
    let server = TestServer::start_default().await;
    let url = server.url.clone();
    let out = baton_async(args(&[
        "send",
        "cli",
        "hello from the cli",
        "--server",
        &url,
    ]))
    .await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello from the cli"
    );

    let out = baton_async(args(&["send", "cli", "second", "--server", &url])).await;
    assert!(out.status.success(), "{out:?}");

    let out = baton_async(args(&["history", "cli", "--json", "--server", &url])).await;
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["content"], "hello from the cli", "oldest first");
    assert_eq!(lines[1]["response"], "second");

    let out = baton_async(args(&["history", "cli", "--server", &url])).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("completed > hello from the cli"), "{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_fails_with_the_error_when_rejected() {
    let server = TestServer::start_default().await;
    let url = server.url.clone();
    let words = vec!["w"; 40].join(" ");
    let busy = server
        .put("/v1/sessions/busy", &serde_json::json!({"agent": "slow"}))
        .await;
    assert!(busy.status.is_success());
    let first = server.send("busy", &words, "reject").await;
    assert_eq!(first.status, 202);

    let out = baton_async(args(&["send", "busy", "again", "--server", &url])).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("session_busy"), "{err}");

    let out = baton_async(args(&["send", "bad/id", "x", "--server", &url])).await;
    assert!(!out.status.success());

    let out = baton_async(args(&["history", "missing", "--server", &url])).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not_found"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_reports_a_cancelled_interaction_as_a_failure() {
    let server = TestServer::start_default().await;
    let url = server.url.clone();
    server
        .put("/v1/sessions/c", &serde_json::json!({"agent": "slow"}))
        .await;
    let words = vec!["w"; 40].join(" ");
    let sender = tokio::spawn(baton_async(args(&["send", "c", &words, "--server", &url])));
    // Cancel once it runs.
    let deadline = tokio::time::Instant::now() + common::TIMEOUT;
    loop {
        let s = server.get("/v1/sessions/c").await;
        if !s.body["running"].is_null() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let cancelled = server
        .post("/v1/sessions/c/cancel", &serde_json::json!({}))
        .await;
    assert_eq!(
        cancelled.body["cancelled"].as_array().map(Vec::len),
        Some(1)
    );
    let out = sender.await.expect("join");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancelled"));
    server.stop().await;
}
