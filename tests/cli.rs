//! The command-line clients (`send`, `chat`, `watch`, `history`) against a real server: what
//! they print, how they fail, and that they end quietly when their output is closed.

mod common;

use std::process::Command;

use common::TestServer;
use common::child::Baton;

fn baton(args: &[&str]) -> std::process::Output {
    common::child::baton()
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

/// A person at `baton chat`'s terminal: types lines, reads what appears.
struct Terminal {
    keyboard: std::process::ChildStdin,
    screen: std::sync::mpsc::Receiver<String>,
    /// Everything shown so far, as the terminal shows it (typed lines are echoed, `\r\n`).
    seen: String,
}

impl Terminal {
    fn type_line(&mut self, line: &str) {
        use std::io::Write;
        self.keyboard
            .write_all(format!("{line}\n").as_bytes())
            .expect("type");
    }

    fn wait_for(&mut self, needle: &str) {
        read_until(&self.screen, &mut self.seen, needle);
    }
}

/// Runs `steps` on the terminal off the async runtime, and hands it back.
async fn at_the_terminal(
    terminal: Terminal,
    steps: impl FnOnce(&mut Terminal) + Send + 'static,
) -> Terminal {
    tokio::task::spawn_blocking(move || {
        let mut terminal = terminal;
        steps(&mut terminal);
        terminal
    })
    .await
    .expect("the chat behaved")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_in_a_terminal_streams_replies_and_handles_commands() {
    use std::io::Read;
    let server = TestServer::start_default().await;
    // `script` runs the chat on a pseudo-terminal, as a person at a terminal would.
    let command = format!(
        "{} chat tty --agent slow --server {}",
        common::child::BIN,
        server.url
    );
    let mut child = Baton(
        Command::new("script")
            .args(["-qfec", &command, "/dev/null"])
            .env("BATON_LOG", "warn")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("script is installed (util-linux)"),
    );
    let keyboard = child.0.stdin.take().expect("stdin");
    let mut stdout = child.0.stdout.take().expect("stdout");
    let (tx, screen) = std::sync::mpsc::channel();
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
    let terminal = Terminal {
        keyboard,
        screen,
        seen: String::new(),
    };
    // The slow agent takes 100 ms a word: two seconds to type during its reply.
    let long: Vec<String> = (1..=20).map(|i| format!("w{i:02}")).collect();
    let long = long.join(" ");
    let long_reply = long.clone();
    let terminal = at_the_terminal(terminal, move |t| {
        t.wait_for("baton chat: session tty (agent slow). /help lists the commands.");
        t.type_line("/help");
        for command in ["/clear   ", "/cancel  ", "/help    ", "/quit    "] {
            t.wait_for(command);
        }
        t.type_line("/cancel");
        t.wait_for("[nothing to cancel]");
        t.type_line("/bogus now");
        t.wait_for("[unknown command /bogus: /help lists them]");
        t.type_line(&long_reply);
        t.wait_for("agent> w01 ");
        t.type_line("typed during the reply");
        t.wait_for("agent> typed during the reply\r\n");
    })
    .await;
    // The commands went to the chat, not to the agent.
    let list = server.get("/v1/sessions/tty/interactions").await;
    let contents: Vec<&str> = list.body["interactions"]
        .as_array()
        .expect("interactions")
        .iter()
        .filter_map(|i| i["content"].as_str())
        .collect();
    assert_eq!(
        contents,
        ["typed during the reply", long.as_str()],
        "newest first"
    );

    let terminal = at_the_terminal(terminal, |t| {
        t.type_line("hello from a terminal");
        t.wait_for("agent> hello from a terminal");
        t.type_line("/clear");
        t.wait_for("[cleared: epoch 1]");
        t.type_line("/quit");
    })
    .await;
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut child.0, "chat"))
        .await
        .expect("join");
    assert!(status.success(), "/quit leaves");
    let seen = terminal.seen;
    // The line typed during the reply is echoed by the terminal where it was typed; apart from
    // that, the reply is one whole line, the queued notice follows it on its own line, and the
    // next reply starts a line of its own.
    let shown = seen.replacen("typed during the reply\r\n", "", 1);
    let expected = format!(
        "agent> {long}\r\n[queued: typed during the reply]\r\nagent> typed during the reply\r\n"
    );
    assert!(shown.contains(&expected), "{seen:?}");
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
    let mut child = common::child::baton()
        .args(["watch", "w", "--replay", "--server", &server.url])
        .env("BATON_LOG", "warn")
        .stderr(std::process::Stdio::inherit())
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

/// Waits for the child to exit; kills it and panics after the timeout.
fn wait_exit(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit in time");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Runs `baton args` with stdout a pipe that is closed before anything is written to it.
fn run_with_stdout_closed(args: &[&str]) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let mut child = common::child::baton()
        .args(args)
        .env("BATON_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run baton");
    drop(child.stdout.take());
    let status = wait_exit(&mut child, &args.join(" "));
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    (status, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_ends_quietly_when_stdout_is_closed() {
    let server = TestServer::start_default().await;
    let url = server.url.clone();
    for text in ["one two three", "four five six"] {
        let done = server
            .post(
                "/v1/sessions/pipe/messages?wait=10",
                &serde_json::json!({ "content": text }),
            )
            .await;
        assert_eq!(done.status, 200);
    }
    let commands: [&[&str]; 3] = [
        &["send", "pipe", "seven eight", "--policy", "enqueue"],
        &["history", "pipe"],
        &["history", "pipe", "--json"],
    ];
    for command in commands {
        let mut full = args(command);
        full.extend(args(&["--server", &url]));
        let (status, stderr) = tokio::task::spawn_blocking(move || {
            let full: Vec<&str> = full.iter().map(String::as_str).collect();
            run_with_stdout_closed(&full)
        })
        .await
        .expect("join");
        assert!(status.success(), "{command:?}: {status:?} {stderr}");
        assert_eq!(stderr, "", "{command:?} ends quietly");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_ends_quietly_when_its_reader_stops_reading() {
    use std::io::{BufRead, Read};
    let server = TestServer::start_default().await;
    let done = server
        .post(
            "/v1/sessions/head/messages?wait=10",
            &serde_json::json!({"content": "a b c d e f"}),
        )
        .await;
    assert_eq!(done.status, 200);
    // `baton watch head --replay | head -3`
    let mut child = common::child::baton()
        .args(["watch", "head", "--replay", "--server", &server.url])
        .env("BATON_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("watch");
    let stdout = child.stdout.take().expect("stdout");
    let (child, read) = tokio::task::spawn_blocking(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        let read: Vec<String> = lines.by_ref().take(3).map_while(Result::ok).collect();
        drop(lines);
        (child, read)
    })
    .await
    .expect("join");
    assert_eq!(read.len(), 3, "{read:?}");
    // More events while it follows: its next write finds the pipe closed, if nothing sooner.
    let more = server
        .post(
            "/v1/sessions/head/messages?wait=10",
            &serde_json::json!({"content": "g h"}),
        )
        .await;
    assert_eq!(more.status, 200);
    let (status, stderr) = tokio::task::spawn_blocking(move || {
        let mut child = child;
        let status = wait_exit(&mut child, "watch");
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut stderr)
            .expect("read stderr");
        (status, stderr)
    })
    .await
    .expect("join");
    assert!(status.success(), "{status:?} {stderr}");
    assert_eq!(stderr, "", "ends quietly");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_ends_when_its_reader_goes_away_even_without_new_events() {
    let server = TestServer::start_default().await;
    let done = server
        .post(
            "/v1/sessions/idle/messages?wait=10",
            &serde_json::json!({"content": "a"}),
        )
        .await;
    assert_eq!(done.status, 200);
    let url = server.url.clone();
    // `baton watch idle | head -1` on a session where nothing happens: watch must not wait
    // for the next event to notice that nobody reads any more.
    let (status, stderr) = tokio::task::spawn_blocking(move || {
        run_with_stdout_closed(&["watch", "idle", "--server", &url])
    })
    .await
    .expect("join");
    assert!(status.success(), "{status:?} {stderr}");
    assert_eq!(stderr, "");
    server.stop().await;
}

/// A server address where nothing listens.
fn nothing_listens() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_one_shape_code_colon_message() {
    let server = TestServer::start_default().await;
    let url = server.url.clone();
    let not_found = "error: not_found: session not found\n";
    let cases: Vec<(Vec<String>, &str)> = vec![
        (args(&["history", "missing"]), not_found),
        (args(&["watch", "missing"]), not_found),
        (args(&["watch", "missing", "--replay"]), not_found),
        (
            args(&["send", "bad id", "x"]),
            "error: invalid_session_id: ",
        ),
        (
            args(&["send", "bad/id", "x"]),
            "error: invalid_session_id: ",
        ),
        (args(&["history", "bad/id"]), "error: invalid_session_id: "),
        (args(&["watch", "bad/id"]), "error: invalid_session_id: "),
        (
            args(&["chat", "c", "--agent", "nope"]),
            "error: unknown_agent: ",
        ),
    ];
    for (mut command, expected) in cases {
        command.extend(args(&["--server", &url]));
        let out = baton_async(command.clone()).await;
        assert!(!out.status.success(), "{command:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with(expected), "{command:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{command:?}: {stderr}");
    }
    server.stop().await;

    let nowhere = nothing_listens();
    let expected = format!("error: cannot reach the server at {nowhere}: ");
    for command in [
        &["send", "s", "x"][..],
        &["chat", "s"],
        &["chat", "s", "--agent", "default"],
        &["watch", "s"],
        &["watch", "s", "--replay"],
        &["history", "s"],
    ] {
        let mut command = args(command);
        command.extend(args(&["--server", &nowhere]));
        let started = std::time::Instant::now();
        let out = baton_async(command.clone()).await;
        assert!(!out.status.success(), "{command:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with(&expected), "{command:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{command:?}: {stderr}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{command:?} gives up at once when the server was never reached"
        );
    }
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
    for command in [
        "serve", "send", "chat", "watch", "bench", "history", "sessions", "delete", "cancel",
        "answer",
    ] {
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

/// `send` cannot answer: it says how, and exits with its own status (3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_exits_3_when_its_interaction_waits_for_input() {
    let server = TestServer::start(common::APPROVAL).await;
    server
        .put("/v1/sessions/ask", &serde_json::json!({"agent": "careful"}))
        .await;
    let out = baton_async(args(&[
        "send",
        "ask",
        "drop the table",
        "--server",
        &server.url,
    ]))
    .await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Plan: drop the table."
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("waiting for input") && stderr.contains("May I drop the table?"),
        "{stderr}"
    );
    server.stop().await;
}

/// `chat` shows the agent's question and sends the next line as the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_shows_a_question_and_answers_it() {
    use std::io::Write;
    let server = TestServer::start(common::APPROVAL).await;
    let mut child = Baton(
        common::child::baton()
            .args([
                "chat",
                "talk",
                "--agent",
                "careful",
                "--server",
                &server.url,
            ])
            .env("BATON_LOG", "warn")
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("chat"),
    );
    let mut stdin = child.0.stdin.take().expect("stdin");
    let stdout = child.0.stdout.take().expect("stdout");
    let (tx, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdout = stdout;
        let mut buffer = [0u8; 1024];
        while let Ok(n) = stdout.read(&mut buffer) {
            if n == 0
                || tx
                    .send(String::from_utf8_lossy(&buffer[..n]).into_owned())
                    .is_err()
            {
                break;
            }
        }
    });
    let seen = tokio::task::spawn_blocking(move || {
        let mut seen = String::new();
        writeln!(stdin, "rotate the keys").expect("write");
        read_until(&output, &mut seen, "agent asks> May I rotate the keys?");
        writeln!(stdin, "yes").expect("write");
        read_until(&output, &mut seen, "Approved: done.");
        writeln!(stdin, "/quit").expect("write");
        seen
    })
    .await
    .expect("chat");
    assert!(seen.contains("Plan: rotate the keys."), "{seen}");
    let status = wait_exit(&mut child.0, "chat");
    assert!(status.success());
    server.stop().await;
}
