//! Cancelling many `command` tasks at once leaves no process, zombie or pipe behind. Alone in
//! its test binary, so the process and pipe counts are this test's own.

mod common;

use common::TestServer;
use common::process::{eventually, group_alive, open_pipes, recorded_groups, zombie_children};
use reqwest::StatusCode;
use serde_json::json;

const TASKS: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_hundred_tasks_leaves_no_child_process_or_pipe_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pids = dir.path().join("pids");
    std::fs::create_dir(&pids).expect("pids dir");
    // A shell that records its pid (= its process group) and waits in a child of its own.
    let config = format!(
        r#"
[agents.default]
kind = "echo"

[agents.waits]
kind = "command"
program = "/bin/sh"
args = ["-c", ': > "$1/$$"; printf "%s\n" "{{\"type\":\"delta\",\"text\":\"waiting\"}}"; sleep 60', "agent", "{}"]
kill_grace_ms = 5000
"#,
        pids.display()
    );
    let server = TestServer::start(&config).await;
    let pipes_before = open_pipes();

    let sessions: Vec<String> = (0..TASKS).map(|i| format!("s{i}")).collect();
    futures_util::future::join_all(sessions.iter().map(|s| {
        let server = &server;
        async move {
            let put = server
                .put(&format!("/v1/sessions/{s}"), &json!({"agent": "waits"}))
                .await;
            assert!(put.status.is_success());
            let sent = server.send(s, "wait", "reject").await;
            assert_eq!(sent.status, StatusCode::ACCEPTED, "{:?}", sent.body);
        }
    }))
    .await;
    eventually("every program started", || {
        recorded_groups(&pids).len() == TASKS
    })
    .await;
    let groups = recorded_groups(&pids);
    assert!(groups.iter().all(|&g| group_alive(g)));

    let cancels = futures_util::future::join_all(sessions.iter().map(|s| {
        let server = &server;
        async move {
            server
                .post(&format!("/v1/sessions/{s}/cancel"), &json!({}))
                .await
        }
    }))
    .await;
    for cancel in &cancels {
        assert_eq!(cancel.status, StatusCode::OK, "{:?}", cancel.body);
        assert_eq!(cancel.body["cancelled"].as_array().map(Vec::len), Some(1));
    }

    eventually("every process group is gone", || {
        groups.iter().all(|&g| !group_alive(g))
    })
    .await;
    eventually("no zombie child is left", || zombie_children() == 0).await;
    eventually("every pipe of the agents is closed", || {
        open_pipes() <= pipes_before
    })
    .await;
    for s in &sessions {
        let session = server.get(&format!("/v1/sessions/{s}")).await;
        assert!(session.body["running"].is_null());
        common::check_log_invariants(&server.stored_events(s));
    }
    server.stop().await;
}
