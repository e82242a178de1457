//! The `command` agent: the JSON-lines protocol, exit codes, limits, and stopping the process
//! group on every way a task ends. Agents are small `/bin/sh` scripts; each gets a scratch
//! directory as `$1` where it records what it saw (its stdin, its pid, that it ran).

mod common;

use std::path::Path;

use common::TestServer;
use common::process::{eventually, group_alive, recorded_groups};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A `command` agent named `name` running `script` with `sh`, `$1` = `dir`, plus `extra` keys.
fn sh_agent(name: &str, script: &str, dir: &Path, extra: &str) -> String {
    format!(
        "[agents.{name}]\nkind = \"command\"\nprogram = \"/bin/sh\"\nargs = [\"-c\", '''{script}''', \"agent\", \"{dir}\"]\n{extra}\n",
        dir = dir.display()
    )
}

/// Records the pid (= process group) of the script in `$1/pids`.
const RECORD_PID: &str = r#"mkdir -p "$1/pids"; : > "$1/pids/$$";"#;

async fn start(agents: &[String]) -> TestServer {
    let config = format!("[agents.default]\nkind = \"echo\"\n{}", agents.concat());
    TestServer::start(&config).await
}

async fn message(server: &TestServer, session: &str, agent: &str, content: &str) -> Value {
    let put = server
        .put(&format!("/v1/sessions/{session}"), &json!({"agent": agent}))
        .await;
    assert!(put.status.is_success(), "{:?}", put.body);
    let sent = server.send(session, content, "enqueue").await;
    assert_eq!(sent.status, StatusCode::ACCEPTED, "{:?}", sent.body);
    server
        .wait_final(session, sent.body["id"].as_str().expect("id"))
        .await
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("the agent wrote its stdin");
    serde_json::from_str(&text).expect("stdin was one JSON object")
}

async fn wait_groups_gone(dir: &Path, expected: usize) {
    let pids = dir.join("pids");
    eventually("the agent recorded its pid", || {
        recorded_groups(&pids).len() >= expected
    })
    .await;
    let groups = recorded_groups(&pids);
    eventually("every process of the agent is gone", || {
        groups.iter().all(|&g| !group_alive(g))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_deltas_progress_and_context_and_gets_the_request_on_stdin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = r#"cat > "$1/stdin.json"
printf '%s\n' '{"type":"progress","data":{"step":1}}' '{"type":"delta","text":"Hel"}' '' \
  '{"type":"delta","text":"lo","ignored":true}' '{"type":"context","patch":{"seen":true,"drop":null}}' \
  '{"type":"result"}'"#;
    let server = start(&[sh_agent("sh", script, dir.path(), "")]).await;
    server
        .put(
            "/v1/sessions/s",
            &json!({"context": {"drop": 1, "keep": "k"}}),
        )
        .await;

    let first = message(&server, "s", "sh", "hi there").await;
    assert_eq!(first["status"], "completed", "{first:?}");
    assert_eq!(first["response"], "Hello");
    let stdin = read_json(&dir.path().join("stdin.json"));
    assert_eq!(stdin["interaction"]["content"], "hi there");
    assert_eq!(stdin["interaction"]["status"], "running");
    assert_eq!(stdin["session"]["id"], "s");
    assert_eq!(stdin["session"]["agent"], "sh");
    assert_eq!(stdin["history"], json!([]));
    assert_eq!(stdin["context"], json!({"drop": 1, "keep": "k"}));

    let context = server.get("/v1/sessions/s/context").await;
    assert_eq!(context.body, json!({"keep": "k", "seen": true}));
    let events = server.stored_events("s");
    let progress: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "task.progress")
        .collect();
    assert_eq!(progress.len(), 1);
    assert_eq!(progress[0]["data"]["data"], json!({"step": 1}));
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "task.delta")
        .map(|e| e["data"]["text"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(deltas, "Hello");
    common::check_log_invariants(&events);

    // The second request carries the first as history, and the patched context.
    let second = message(&server, "s", "sh", "again").await;
    assert_eq!(second["status"], "completed");
    let stdin = read_json(&dir.path().join("stdin.json"));
    let history = stdin["history"].as_array().expect("history");
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["content"], "hi there");
    assert_eq!(history[0]["response"], "Hello");
    assert_eq!(stdin["context"], json!({"keep": "k", "seen": true}));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_response_replaces_deltas_and_exit_codes_decide_without_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agents = [
        sh_agent(
            "replace",
            r#"printf '%s\n' '{"type":"delta","text":"draft"}' '{"type":"result","response":"final"}'"#,
            dir.path(),
            "",
        ),
        sh_agent(
            "zero",
            r#"printf '%s\n' '{"type":"delta","text":"a"}' '{"type":"delta","text":"b"}'"#,
            dir.path(),
            "",
        ),
        sh_agent(
            "crash",
            r#"printf '%s\n' '{"type":"delta","text":"partial"}'; echo "something broke" >&2; exit 3"#,
            dir.path(),
            "",
        ),
        sh_agent(
            "reports",
            r#"printf '%s\n' '{"type":"error","message":"no quota left"}'; sleep 30"#,
            dir.path(),
            "",
        ),
        sh_agent("missing", "", dir.path(), "").replace("/bin/sh", "/nonexistent/program"),
    ];
    let server = start(&agents).await;

    let replaced = message(&server, "r", "replace", "x").await;
    assert_eq!(replaced["status"], "completed");
    assert_eq!(replaced["response"], "final");

    let zero = message(&server, "z", "zero", "x").await;
    assert_eq!(zero["status"], "completed");
    assert_eq!(zero["response"], "ab");

    let crash = message(&server, "c", "crash", "x").await;
    assert_eq!(crash["status"], "failed");
    assert_eq!(crash["error"]["code"], "agent_error");
    let text = crash["error"]["message"].as_str().expect("message");
    assert!(text.contains("status 3"), "{text}");
    assert!(text.contains("something broke"), "{text}");

    let reports = message(&server, "e", "reports", "x").await;
    assert_eq!(reports["status"], "failed");
    assert_eq!(reports["error"]["code"], "agent_error");
    assert_eq!(reports["error"]["message"], "no quota left");

    let missing = message(&server, "m", "missing", "x").await;
    assert_eq!(missing["status"], "failed");
    assert_eq!(missing["error"]["code"], "agent_error");
    assert!(
        missing["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot start")),
        "{missing:?}"
    );
    for session in ["r", "z", "c", "e", "m"] {
        common::check_log_invariants(&server.stored_events(session));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_line_fails_naming_its_number_and_stops_the_program() {
    let cases = [
        ("notjson", "this is not json"),
        ("unknown", r#"{"type":"shout","text":"x"}"#),
        ("wrongtype", r#"{"type":"delta","text":5}"#),
        ("badpatch", r#"{"type":"context","patch":[1,2]}"#),
    ];
    let dirs: Vec<_> = cases
        .iter()
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let agents: Vec<String> = cases
        .iter()
        .zip(&dirs)
        .map(|((name, line), dir)| {
            let script = format!(
                "{RECORD_PID} printf '%s\\n' '{{\"type\":\"delta\",\"text\":\"ok\"}}' '{line}'; sleep 30"
            );
            sh_agent(name, &script, dir.path(), "kill_grace_ms = 5000")
        })
        .collect();
    let server = start(&agents).await;
    for ((name, _), dir) in cases.iter().zip(&dirs) {
        let done = message(&server, name, name, "x").await;
        assert_eq!(done["status"], "failed", "{name}: {done:?}");
        assert_eq!(done["error"]["code"], "agent_protocol", "{name}: {done:?}");
        let text = done["error"]["message"].as_str().expect("message");
        assert!(text.contains("line 2"), "{name}: {text}");
        // The shell honours SIGTERM: gone well before the grace period would force it.
        wait_groups_gone(dir.path(), 1).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_lines_and_endless_output_are_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = "max_line_bytes = 1024\nmax_output_bytes = 65536";
    let agents = [
        sh_agent(
            "huge",
            &format!("{RECORD_PID} head -c 100000 /dev/zero | tr '\\0' x; sleep 30"),
            dir.path(),
            limits,
        ),
        sh_agent(
            "endless",
            &format!(
                "{RECORD_PID} while :; do printf '%s\\n' '{{\"type\":\"delta\",\"text\":\"more\"}}'; done"
            ),
            dir.path(),
            limits,
        ),
    ];
    let server = start(&agents).await;
    let huge = message(&server, "h", "huge", "x").await;
    assert_eq!(huge["status"], "failed", "{huge:?}");
    assert_eq!(huge["error"]["code"], "agent_protocol");
    let text = huge["error"]["message"].as_str().expect("message");
    assert!(text.contains("line 1") && text.contains("1024"), "{text}");

    let endless = message(&server, "e", "endless", "x").await;
    assert_eq!(endless["status"], "failed", "{endless:?}");
    assert_eq!(endless["error"]["code"], "output_limit");
    // What was delivered before the limit is at most the limit.
    let delivered = endless["response"].as_str().expect("response").len();
    assert!(delivered <= 65536, "{delivered}");
    wait_groups_gone(dir.path(), 2).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_a_program_that_ignores_sigterm_after_the_grace_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = format!(
        "trap '' TERM; {RECORD_PID} printf '%s\\n' '{{\"type\":\"delta\",\"text\":\"started\"}}'; while :; do sleep 1; done"
    );
    let server = start(&[sh_agent(
        "stubborn",
        &script,
        dir.path(),
        "kill_grace_ms = 1500",
    )])
    .await;
    server
        .put("/v1/sessions/s", &json!({"agent": "stubborn"}))
        .await;
    let sent = server.send("s", "x", "reject").await;
    assert_eq!(sent.status, StatusCode::ACCEPTED);
    let id = sent.body["id"].as_str().expect("id").to_string();
    let pids = dir.path().join("pids");
    eventually("the program started", || !recorded_groups(&pids).is_empty()).await;

    let cancel = server.post("/v1/sessions/s/cancel", &json!({})).await;
    assert_eq!(cancel.status, StatusCode::OK, "{:?}", cancel.body);
    let done = server.wait_final("s", &id).await;
    assert_eq!(done["status"], "cancelled");
    assert_eq!(done["cancel_reason"], "cancel");
    // SIGTERM first, which it ignores: still there inside the grace period...
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let groups = recorded_groups(&pids);
    assert!(
        groups.iter().all(|&g| group_alive(g)),
        "killed before the grace period"
    );
    // ...and SIGKILL after it.
    wait_groups_gone(dir.path(), 1).await;
    let events = server.stored_events("s");
    common::check_log_invariants(&events);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_cancels_the_task_and_stops_the_program() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = format!("{RECORD_PID} sleep 30");
    let server = start(&[sh_agent("sleepy", &script, dir.path(), "timeout_s = 0.5")]).await;
    let done = message(&server, "s", "sleepy", "x").await;
    assert_eq!(done["status"], "cancelled");
    assert_eq!(done["cancel_reason"], "timeout");
    wait_groups_gone(dir.path(), 1).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_and_cleared_messages_never_run_their_program() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = r#"echo run >> "$1/runs"; printf '%s\n' '{"type":"delta","text":"x"}'; sleep 30"#;
    let server = start(&[sh_agent("counted", script, dir.path(), "")]).await;
    let runs = || {
        std::fs::read_to_string(dir.path().join("runs"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    server
        .put("/v1/sessions/s", &json!({"agent": "counted"}))
        .await;
    let first = server.send("s", "first", "reject").await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    eventually("the first program ran", || runs() == 1).await;

    let rejects = futures_util::future::join_all((0..20).map(|i| {
        let server = &server;
        async move { server.send("s", &format!("r{i}"), "reject").await }
    }))
    .await;
    assert!(rejects.iter().all(|a| a.status == StatusCode::CONFLICT));
    for i in 0..3 {
        let queued = server.send("s", &format!("q{i}"), "enqueue").await;
        assert_eq!(queued.status, StatusCode::ACCEPTED);
        assert_eq!(queued.body["status"], "queued");
    }
    let cleared = server.post("/v1/sessions/s/clear", &json!({})).await;
    assert_eq!(cleared.status, StatusCode::OK, "{:?}", cleared.body);
    assert_eq!(cleared.body["cancelled"].as_array().map(Vec::len), Some(4));
    // Give a wrongly started program time to show itself.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(runs(), 1, "only the first message ran its program");

    let after = server.send("s", "after the clear", "reject").await;
    assert_eq!(after.status, StatusCode::ACCEPTED);
    eventually("the next message runs", || runs() == 2).await;
    server.post("/v1/sessions/s/cancel", &json!({})).await;
    server.wait_idle("s").await;
    common::check_log_invariants(&server.stored_events("s"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_agent_works_as_documented() {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("python3 not found: skipping the example agent test");
        return;
    }
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/agent.py");
    let config = format!(
        "[agents.default]\nkind = \"echo\"\n[agents.py]\nkind = \"command\"\nprogram = \"python3\"\nargs = [\"{example}\"]\ntimeout_s = 30\n"
    );
    let server = TestServer::start(&config).await;
    let first = message(&server, "s", "py", "hello world").await;
    assert_eq!(first["status"], "completed", "{first:?}");
    assert_eq!(
        first["response"],
        "You said: hello world (message 1 of this conversation)"
    );
    let second = message(&server, "s", "py", "again").await;
    assert_eq!(
        second["response"],
        "You said: again (message 2 of this conversation)"
    );
    let context = server.get("/v1/sessions/s/context").await;
    assert_eq!(context.body, json!({"messages_seen": 2}));
    let events = server.stored_events("s");
    assert!(events.iter().any(|e| e["type"] == "task.progress"));
    common::check_log_invariants(&events);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_listed_by_name_and_kind_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = sh_agent(
        "secretive",
        "true",
        dir.path(),
        "env = { TOKEN = \"hunter2\" }",
    );
    let server = start(&[agent]).await;
    let listed = server.get("/v1/agents").await;
    assert_eq!(listed.status, StatusCode::OK);
    assert_eq!(
        listed.body,
        json!({"agents": [
            {"name": "default", "kind": "echo", "default": true},
            {"name": "secretive", "kind": "command", "default": false},
        ]})
    );
    assert!(!listed.body.to_string().contains("hunter2"));
    let unknown = server
        .put("/v1/sessions/s", &json!({"agent": "nobody"}))
        .await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
    assert_eq!(unknown.body["error"]["code"], "unknown_agent");
    server.stop().await;
}
