//! `baton chat` beyond the terminal: with stdin from a pipe it is a script that waits for each
//! reply and fails like `send`; at a terminal, Ctrl-C first stops the running reply, then
//! quits.

#[path = "common/cli_child.rs"]
mod cli_child;
mod common;

use std::time::Duration;

use cli_child::{Running, run_with_input, text};
use common::TestServer;
use common::access::{self, mint};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// Piped lines are sent one after another, each reply awaited to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_chat_waits_for_each_reply() {
    let server = TestServer::start_default().await;
    let out = run_with_input(
        &["chat", "piped", "--agent", "slow", "--server", &server.url],
        &[],
        "first one\nsecond one\n",
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(stdout.contains("agent> first one\n"), "{stdout}");
    assert!(stdout.contains("agent> second one\n"), "{stdout}");
    let page = server.get("/v1/sessions/piped/interactions").await;
    let statuses: Vec<&str> = page.body["interactions"]
        .as_array()
        .expect("interactions")
        .iter()
        .filter_map(|i| i["status"].as_str())
        .collect();
    assert_eq!(statuses, ["completed", "completed"], "{}", page.body);
    server.stop().await;
}

/// A refusal ends a piped chat with the error and a failing status, never a silent 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_chat_fails_on_an_error() {
    let server = TestServer::start_with_config(access::config()).await;
    let token = mint(&server, "readonly", "read", 600).await;
    let out = run_with_input(
        &["chat", "readonly", "--server", &server.url, "--key", &token],
        &[],
        "hello\n",
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("error: forbidden: "), "{stderr}");
    assert!(stderr.contains("can only read"), "{stderr}");
    server.stop().await;
}

/// A failed reply fails a piped chat too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_chat_fails_when_a_reply_fails() {
    let config = format!(
        "{}\n[agents.broken]\nkind = \"command\"\nprogram = \"/bin/sh\"\nargs = [\"-c\", \"exit 3\"]\n",
        common::BASE_CONFIG
    );
    let server = TestServer::start(&config).await;
    let out = run_with_input(
        &[
            "chat",
            "broken",
            "--agent",
            "broken",
            "--server",
            &server.url,
        ],
        &[],
        "hello\n",
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).starts_with("error: "), "{out:?}");
    server.stop().await;
}

async fn session(server: &TestServer, id: &str) -> Value {
    server.get(&format!("/v1/sessions/{id}")).await.body
}

/// Ctrl-C (SIGINT) while a reply runs cancels it and leaves the chat open; a second quits
/// with 130, as a shell expects of an interrupted command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_cancels_the_running_reply_and_a_second_quits() {
    let server = TestServer::start_default().await;
    let url = server.url.clone();
    server
        .put("/v1/sessions/ctrl", &json!({"agent": "slow"}))
        .await;
    let mut chat = Running::start(&["chat", "ctrl", "--server", &url]);
    chat.read_until("/help lists the commands.");
    chat.type_line(&vec!["w"; 200].join(" "));
    chat.read_until("agent> w");
    let running = session(&server, "ctrl").await["running"]["id"]
        .as_str()
        .expect("a reply runs")
        .to_string();

    kill(Pid::from_raw(chat.pid()), Signal::SIGINT).expect("SIGINT");
    let done = server.wait_final("ctrl", &running).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(done["cancel_reason"], "cancel", "{done}");
    chat.read_until("[cancelled");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!chat.has_exited(), "the first Ctrl-C only cancels");

    kill(Pid::from_raw(chat.pid()), Signal::SIGINT).expect("SIGINT");
    let out = tokio::task::spawn_blocking(move || chat.wait_output())
        .await
        .expect("join");
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    server.stop().await;
}
