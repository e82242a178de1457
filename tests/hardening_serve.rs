//! Hardening through the real `baton` binary, where the process's environment, umask and log
//! matter: a `command` agent never sees the server's secrets, the SQLite files are the
//! owner's only, and no log line holds what users sent, at any level.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::TIMEOUT;
use common::child::{serve, terminate};
use common::stream::Ws;
use serde_json::{Value, json};

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(TIMEOUT)
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_prints_its_environment_shows_no_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = r#"
[agents.default]
kind = "command"
program = "python3"
args = ["-c", "import json,os,sys; sys.stdin.readline(); print(json.dumps({'type':'result','response':json.dumps(dict(os.environ))}))"]
env = { AGENT_OWN = "from-its-table" }

[agents.llm]
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
model = "m"
api_key_env = "LLM_API_KEY_FOR_TEST"

[auth]
mode = "none"
token_secret_env = ["TOKEN_SECRET_FOR_TEST"]
"#;
    let secrets = [
        ("TOKEN_SECRET_FOR_TEST", "token-secret-value-0123456789"),
        ("LLM_API_KEY_FOR_TEST", "sk-llm-key-value-0123456789"),
        ("BATON_SOMETHING", "baton-setting-value"),
        ("BATON_HISTORY_LIMIT", "31337"),
    ];
    let mut env = secrets.to_vec();
    env.push(("PLAIN_FOR_TEST", "inherited"));
    let (child, url) = serve(&dir, config, &env);
    let answer: Value = http()
        .post(format!("{url}/v1/sessions/e/messages?wait=30"))
        .json(&json!({"content": "print your environment"}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(answer["status"], "completed", "{answer}");
    let seen: Value =
        serde_json::from_str(answer["response"].as_str().expect("response")).expect("env");
    for (name, value) in secrets {
        assert!(seen.get(name).is_none(), "{name} reached the agent");
        let text = answer["response"].as_str().expect("response");
        assert!(
            !text.contains(value),
            "the value of {name} reached the agent"
        );
    }
    assert_eq!(seen["PLAIN_FOR_TEST"], "inherited", "the rest is inherited");
    assert_eq!(
        seen["AGENT_OWN"], "from-its-table",
        "its own table is added"
    );
    assert!(seen.get("PATH").is_some());
    terminate(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_files_are_the_owners_only_whatever_the_umask() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The test runner's umask is the usual 022; the server's children inherit it.
    let prior = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let (child, url) = serve(&dir, "", &[]);
    nix::sys::stat::umask(prior);
    let sent = http()
        .post(format!("{url}/v1/sessions/f/messages?wait=30"))
        .json(&json!({"content": "hello"}))
        .send()
        .await
        .expect("send");
    assert_eq!(sent.status(), 200);
    for name in ["baton.db", "baton.db-wal", "baton.db-shm"] {
        let path = dir.path().join(name);
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name} is {:o}", mode & 0o777);
    }
    terminate(child);
}

/// Strings that only users send: none may appear in the log.
const MARKERS: [&str; 4] = [
    "content-marker-7f3a",
    "context-marker-91bc",
    "metadata-marker-44de",
    "frame-marker-c0ffee",
];

/// Exercises every path user data takes (HTTP, WebSocket ops and events, SSE, context
/// patches, answers to errors) on a server logging at `trace`, then reads its log.
async fn user_data_stays_out_of_the_log(database: Option<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (child, url) = match &database {
        Some(database) => common::child::serve_on(&dir, "", database, &[]),
        None => serve(&dir, "", &[]),
    };
    let http = http();
    let [content, context, metadata, frame] = MARKERS;
    let sent = http
        .post(format!("{url}/v1/sessions/l/messages?wait=30"))
        .json(&json!({"content": content, "metadata": {"m": metadata}}))
        .send()
        .await
        .expect("send");
    assert_eq!(sent.status(), 200);
    let patched = http
        .patch(format!("{url}/v1/sessions/l/context"))
        .json(&json!({"c": context}))
        .send()
        .await
        .expect("patch");
    assert_eq!(patched.status(), 200);
    // A malformed body that holds a marker: its error must not log it either.
    let malformed = http
        .post(format!("{url}/v1/sessions/l/messages"))
        .header("content-type", "application/json")
        .body(format!("{{\"content\": 5, \"x\": \"{content}\""))
        .send()
        .await
        .expect("malformed");
    assert_eq!(malformed.status(), 400);
    let ws_url = format!("{}/v1/sessions/l/ws?replay=true", url.replace("http", "ws"));
    let (socket, _) = tokio_tungstenite::connect_async(ws_url)
        .await
        .expect("WebSocket");
    let mut ws = Ws::from_socket(socket).await;
    for op in [
        json!({"op": "message", "content": frame, "policy": "enqueue"}),
        json!({"op": "context", "patch": {"f": frame}}),
        json!({"op": "nonsense", "payload": frame}),
    ] {
        let mut op = op;
        op["ref"] = ws.fresh_ref();
        ws.request(&op).await;
    }
    ws.send_text(format!("not json {frame}")).await;
    let refused = loop {
        let frame = ws.next_json().await;
        if frame["kind"] == "reply" {
            break frame;
        }
    };
    assert_eq!(refused["ok"], false, "{refused}");
    ws.ping().await;
    ws.close().await;
    let sse = http
        .get(format!("{url}/v1/sessions/l/events?replay=true"))
        .send()
        .await
        .expect("events");
    assert_eq!(sse.status(), 200);
    drop(sse);
    let log = terminate(child);
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "the server logged at trace: {}",
        &log[..log.len().min(2000)]
    );
    for marker in MARKERS {
        let line = log.lines().find(|l| l.contains(marker));
        assert!(line.is_none(), "user data in the log: {line:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_user_data_in_trace_logs_on_sqlite() {
    user_data_stays_out_of_the_log(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_postgres_tests),
    ignore = "needs PostgreSQL: set BATON_TEST_POSTGRES to an admin URL"
)]
async fn no_user_data_in_trace_logs_on_postgres() {
    let admin = common::pg::postgres_admin_url();
    let database = common::pg::TestDatabase::create(&admin).await;
    user_data_stays_out_of_the_log(Some(database.url.clone())).await;
}
