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

/// Reads the child's output until `needle` shows up (or panics after the timeout).
fn read_until(output: &std::sync::mpsc::Receiver<String>, seen: &mut String, needle: &str) {
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match output.recv_timeout(left) {
            Ok(chunk) => seen.push_str(&chunk),
            Err(_) => panic!("{needle:?} never appeared; output so far: {seen:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_in_a_terminal_streams_replies_and_handles_commands() {
    use std::io::{Read, Write};
    let server = TestServer::start_default().await;
    // `script` runs the chat on a pseudo-terminal, as a person at a terminal would.
    let command = format!(
        "{} chat tty --agent slow --server {}",
        env!("CARGO_BIN_EXE_baton"),
        server.url
    );
    let mut child = Command::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .env("BATON_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("script is installed (util-linux)");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let (tx, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0
                || tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
            {
                break;
            }
        }
    });
    let mut seen = String::new();
    let result = tokio::task::spawn_blocking(move || {
        read_until(&output, &mut seen, "baton chat: session tty (agent slow)");
        stdin.write_all(b"hello from a terminal\n").expect("type");
        read_until(&output, &mut seen, "agent> hello from a terminal");
        stdin.write_all(b"/clear\n").expect("type");
        read_until(&output, &mut seen, "[cleared: epoch 1]");
        stdin.write_all(b"/quit\n").expect("type");
        seen
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let seen = result.expect("the chat behaved");
    // Streamed once: the reply is not printed twice.
    assert_eq!(
        seen.matches("agent> hello from a terminal").count(),
        1,
        "{seen}"
    );
    let list = server.get("/v1/sessions/tty/interactions").await;
    assert_eq!(list.body["interactions"], serde_json::json!([]), "cleared");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_the_event_stream_as_json_lines() {
    let server = TestServer::start_default().await;
    let done = server
        .post(
            "/v1/sessions/w/messages?wait=10",
            &serde_json::json!({"content": "a b"}),
        )
        .await;
    assert_eq!(done.status, 200);
    let mut child = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["watch", "w", "--replay", "--server", &server.url])
        .env("BATON_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("watch");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(format!("{line}\n")).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let (output, mut seen) = tokio::task::spawn_blocking(move || {
        read_until(&output, &mut seen, "task.completed");
        (output, seen)
    })
    .await
    .expect("watch replays");
    let deleted = server.delete("/v1/sessions/w").await;
    assert_eq!(deleted.status, 204);
    let seen = tokio::task::spawn_blocking(move || {
        read_until(&output, &mut seen, "session.deleted");
        seen
    })
    .await
    .expect("watch output");
    let status = child
        .wait()
        .expect("watch exits after the session is deleted");
    assert!(status.success());
    let events: Vec<serde_json::Value> = seen
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"session.created"));
    assert!(kinds.contains(&"task.completed"));
    assert_eq!(kinds.last(), Some(&"session.deleted"));
    let seqs: Vec<i64> = events.iter().filter_map(|e| e["seq"].as_i64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    server.stop().await;
}

/// The entries of a `-h` listing (`Arguments:` and `Options:`) that have no description.
fn undescribed(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let mut missing = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if indent < 2 || !(trimmed.starts_with('-') || trimmed.starts_with('<')) {
            continue;
        }
        // `  --name <NAME>  description`, or the description on the next, deeper line.
        let inline = trimmed.split_once("  ").map(|(_, rest)| rest.trim());
        let below = lines.get(i + 1).and_then(|next| {
            let rest = next.trim_start();
            (next.len() - rest.len() > indent && !rest.starts_with('-')).then_some(rest)
        });
        let description = inline.filter(|d| !d.is_empty()).or(below).unwrap_or("");
        if description.is_empty() || description.starts_with('[') {
            missing.push(trimmed.to_string());
        }
    }
    missing
}

#[test]
fn every_argument_and_flag_is_described() {
    for command in ["serve", "send", "chat", "watch", "bench", "history"] {
        for flag in ["-h", "--help"] {
            let out = baton(&[command, flag]);
            assert!(out.status.success());
            let help = String::from_utf8_lossy(&out.stdout);
            assert_eq!(undescribed(&help), Vec::<String>::new(), "{command} {flag}");
        }
    }
    let out = baton(&["bench", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(!help.contains("seed peer"), "{help}");
    assert!(help.contains("reference Python server"), "{help}");
    let out = baton(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(!help.contains("seed peer"), "{help}");
}
