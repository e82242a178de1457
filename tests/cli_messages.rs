//! What the command-line clients say to a person: hints that name the real session, choices
//! listed in words, a console URL that can be opened, and a refusal that says why.

#[path = "common/cli_child.rs"]
mod cli_child;
mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use cli_child::{run, text};
use common::TestServer;
use common::access::{self, mint};

/// `send` left waiting: the hint names the session, with commands that can be pasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waiting_hint_names_the_session() {
    let server = TestServer::start(common::APPROVAL).await;
    server
        .put(
            "/v1/sessions/ask-7",
            &serde_json::json!({"agent": "careful"}),
        )
        .await;
    let out = run(
        &["send", "ask-7", "drop the table", "--server", &server.url],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("SESSION"), "{stderr}");
    assert!(stderr.contains("baton chat ask-7"), "{stderr}");
    assert!(stderr.contains("baton answer ask-7 "), "{stderr}");
    assert!(
        stderr.contains("/v1/sessions/ask-7/interactions/"),
        "{stderr}"
    );
    server.stop().await;
}

/// A policy the server does not know is refused before anything is sent, with the choices.
#[tokio::test]
async fn a_bogus_policy_lists_the_policies_in_words() {
    let out = run(
        &[
            "send",
            "s",
            "x",
            "--policy",
            "bogus",
            "--server",
            "http://127.0.0.1:9",
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("Policy"), "a type name: {stderr}");
    assert!(
        stderr.contains("possible values: reject, enqueue, interrupt"),
        "{stderr}"
    );
    // And the help lists them too.
    let help = run(&["send", "--help"], &[]).await;
    assert!(
        text(&help.stdout).contains("[possible values: reject, enqueue, interrupt]"),
        "{}",
        text(&help.stdout)
    );
}

/// `serve` on every interface: the console line is a URL a browser on this machine opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_every_interface_prints_a_loopback_console_url() {
    let dir = tempfile::tempdir().expect("tempdir");
    let database = format!("sqlite://{}/baton.db", dir.path().display());
    // Open on purpose: every interface without access control is refused otherwise.
    let config = dir.path().join("baton.toml");
    std::fs::write(&config, "[auth]\nmode = \"none\"\n").expect("config");
    let config = config.to_str().expect("path");
    let mut child = cli_child::command(&[
        "serve",
        "--config",
        config,
        "--listen",
        "0.0.0.0:0",
        "--database",
        &database,
    ]);
    child
        .current_dir(dir.path())
        .env_remove("BATON_LISTEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = KillOnDrop(child.spawn().expect("serve"));
    let stdout = child.0.stdout.take().expect("stdout");
    let lines = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("line");
            let done = line.starts_with("console: ");
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    })
    .await
    .expect("join");
    let console = lines
        .iter()
        .find_map(|l| l.strip_prefix("console: "))
        .unwrap_or_else(|| panic!("no console line: {lines:?}"));
    assert!(
        console.starts_with("http://127.0.0.1:") && console.ends_with("/console/"),
        "{console}"
    );
    assert!(!console.contains("0.0.0.0"), "{console}");
    let page = reqwest::get(console).await.expect("console answers");
    assert!(page.status().is_success(), "{}", page.status());
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A read token's `send` is refused in plain words, not in the WebSocket's terms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_token_send_says_the_token_can_only_read() {
    let server = TestServer::start_with_config(access::config()).await;
    let token = mint(&server, "reader", "read", 600).await;
    let out = run(
        &[
            "send",
            "reader",
            "hello",
            "--server",
            &server.url,
            "--key",
            &token,
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("ping"), "jargon: {stderr}");
    assert!(stderr.starts_with("error: forbidden: "), "{stderr}");
    assert!(stderr.contains("can only read"), "{stderr}");
    server.stop().await;
}
