//! Test harness: a real Baton server on an ephemeral loopback port, a JSON HTTP client, and
//! read access to the stored event log. Every wait has a timeout; the server and its
//! database directory are removed when the [`TestServer`] is dropped.
#![allow(dead_code)]

pub mod access;
pub mod browser;
pub mod child;
pub mod cluster;
pub mod mock_openai;
pub mod pg;
pub mod process;
pub mod stream;
use std::path::PathBuf;
use std::time::Duration;

use baton::agent::AgentRegistry;
use baton::config::Config;
use baton::server::ServerHandle;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Default bound for any single wait in a test.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Config with `default` (echo) and `careful`, the example agent that asks for approval
/// (`examples/approval_agent.py`, run with `python3`).
pub const APPROVAL: &str = concat!(
    "[agents.default]\nkind = \"echo\"\n\n[agents.careful]\nkind = \"command\"\n",
    "program = \"python3\"\nargs = [\"",
    env!("CARGO_MANIFEST_DIR"),
    "/examples/approval_agent.py\"]\n"
);

/// Config with the two echo agents most tests use: `default` (instant) and `slow`.
pub const BASE_CONFIG: &str = r#"
queue_limit = 16

[agents.default]
kind = "echo"
delay_ms = 0

[agents.slow]
kind = "echo"
delay_ms = 100
"#;

/// An answer: status, headers and the JSON body (`Null` when empty).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    /// The contract's error code, if this is an error answer.
    pub fn code(&self) -> Option<&str> {
        self.body["error"]["code"].as_str()
    }
}

pub struct TestServer {
    pub handle: Option<ServerHandle>,
    pub url: String,
    pub db_path: PathBuf,
    pub http: reqwest::Client,
    // Dropped last: the database lives here.
    dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts a server with `config_toml` (listen and database are set by the harness).
    pub async fn start(config_toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let db_path = dir.path().join("baton.db");
        Self::start_at(config_toml, dir, db_path).await
    }

    pub async fn start_default() -> Self {
        Self::start(BASE_CONFIG).await
    }

    async fn start_at(config_toml: &str, dir: tempfile::TempDir, db_path: PathBuf) -> Self {
        let config = Config::from_toml(config_toml).expect("test config parses");
        let agents = AgentRegistry::from_config(&config.agents).expect("agents");
        Self::start_with(config_toml, agents, dir, db_path).await
    }

    /// Starts a server whose agents are `agents` (e.g. test agents written in Rust).
    pub async fn start_with_agents(config_toml: &str, agents: AgentRegistry) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let db_path = dir.path().join("baton.db");
        Self::start_with(config_toml, agents, dir, db_path).await
    }

    /// Starts a server on an existing database directory (to restart on the same data).
    pub async fn restart_in(config_toml: &str, dir: tempfile::TempDir) -> Self {
        let db_path = dir.path().join("baton.db");
        Self::start_at(config_toml, dir, db_path).await
    }

    /// Starts a server with `config` on an existing database directory.
    pub async fn restart_with_config(config: Config, dir: tempfile::TempDir) -> Self {
        let db_path = dir.path().join("baton.db");
        let agents = AgentRegistry::from_config(&config.agents).expect("agents");
        Self::start_configured(config, agents, dir, db_path).await
    }

    /// Stops the server and hands back its database directory, for a restart.
    pub async fn stop_keeping_data(mut self) -> tempfile::TempDir {
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(TIMEOUT, handle.stop())
                .await
                .expect("server stops in time")
                .expect("server stops cleanly");
        }
        let empty = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, empty)
    }

    /// Starts a server with a configuration built by the test (listen and database are set
    /// by the harness), e.g. with token secrets that no file can hold.
    pub async fn start_with_config(config: Config) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let db_path = dir.path().join("baton.db");
        let agents = AgentRegistry::from_config(&config.agents).expect("agents");
        Self::start_configured(config, agents, dir, db_path).await
    }

    async fn start_with(
        config_toml: &str,
        agents: AgentRegistry,
        dir: tempfile::TempDir,
        db_path: PathBuf,
    ) -> Self {
        let config = Config::from_toml(config_toml).expect("test config parses");
        Self::start_configured(config, agents, dir, db_path).await
    }

    async fn start_configured(
        mut config: Config,
        agents: AgentRegistry,
        dir: tempfile::TempDir,
        db_path: PathBuf,
    ) -> Self {
        config.listen = "127.0.0.1:0".into();
        config.database = format!("sqlite://{}", db_path.display());
        config.validate().expect("test config is valid");
        let handle = tokio::time::timeout(TIMEOUT, ServerHandle::start_with_agents(config, agents))
            .await
            .expect("server starts in time")
            .expect("server starts");
        let url = handle.url();
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .pool_max_idle_per_host(512)
            .build()
            .expect("client");
        Self {
            handle: Some(handle),
            url,
            db_path,
            http,
            dir,
        }
    }

    /// Sends `method path` with an optional JSON body and extra headers.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request.json(body);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("request reaches the server");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("response body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("non-JSON body for {path} ({status}): {e}: {bytes:?}"))
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    /// Sends raw bytes as the body (for malformed-input tests).
    pub async fn request_raw(&self, method: Method, path: &str, body: Vec<u8>) -> Answer {
        let response = self
            .http
            .request(method, format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request reaches the server");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("response body");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.request(Method::GET, path, None, &[]).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Answer {
        self.request(Method::POST, path, Some(body), &[]).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Answer {
        self.request(Method::PUT, path, Some(body), &[]).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> Answer {
        self.request(Method::PATCH, path, Some(body), &[]).await
    }

    pub async fn delete(&self, path: &str) -> Answer {
        self.request(Method::DELETE, path, None, &[]).await
    }

    /// `POST /v1/sessions/{session}/messages` with `{"content", "policy"}`.
    pub async fn send(&self, session: &str, content: &str, policy: &str) -> Answer {
        let body = serde_json::json!({"content": content, "policy": policy});
        self.post(&format!("/v1/sessions/{session}/messages"), &body)
            .await
    }

    /// Polls the interaction until it is final; panics after [`TIMEOUT`].
    pub async fn wait_final(&self, session: &str, id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let answer = self
                .get(&format!("/v1/sessions/{session}/interactions/{id}"))
                .await;
            assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
            if matches!(
                answer.body["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            ) {
                return answer.body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "interaction {id} not final in time: {:?}",
                answer.body
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until nothing runs or waits in the session.
    pub async fn wait_idle(&self, session: &str) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let s = self.get(&format!("/v1/sessions/{session}")).await;
            if s.status == StatusCode::OK && s.body["running"].is_null() && s.body["queued"] == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "session {session} not idle in time: {:?}",
                s.body
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The stored event log of a session (envelopes, in seq order), read from the database.
    pub fn stored_events(&self, session: &str) -> Vec<Value> {
        stored_events(&self.db_path, session)
    }

    /// Shuts the server down gracefully.
    pub async fn stop(mut self) {
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(TIMEOUT, handle.stop())
                .await
                .expect("server stops in time")
                .expect("server stops cleanly");
        }
    }
}

/// `n` words `tag-0 tag-1 …` separated by single spaces: the echo agent replies with them one
/// by one, so with `slow` (100 ms a word) a reply of `n` words runs `n / 10` seconds.
pub fn words(tag: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("{tag}-{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The store's key of a session: `tenant/name`; a bare name is tenant `default`'s.
pub fn session_key(session: &str) -> String {
    if session.contains('/') {
        session.to_string()
    } else {
        format!("default/{session}")
    }
}

/// Reads a session's stored events straight from the SQLite file (read-only). `session` is
/// a name of tenant `default`, or `tenant/name`.
pub fn stored_events(db_path: &std::path::Path, session: &str) -> Vec<Value> {
    let session = session_key(session);
    let conn =
        rusqlite::Connection::open_with_flags(db_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open the database read-only");
    let mut stmt = conn
        .prepare("SELECT envelope FROM events WHERE session = ?1 ORDER BY seq")
        .expect("prepare");
    let rows = stmt
        .query_map([&session], |r| r.get::<_, String>(0))
        .expect("query");
    // A run of deltas stored together holds one envelope per line.
    rows.flat_map(|r| {
        let text = r.expect("row");
        text.lines()
            .map(|line| serde_json::from_str(line).expect("envelope is JSON"))
            .collect::<Vec<Value>>()
    })
    .collect()
}

/// Event types of a log, in order.
pub fn types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The interaction id an event is about, if any.
pub fn interaction_of(event: &Value) -> Option<String> {
    let data = &event["data"];
    data["interaction"]["id"]
        .as_str()
        .or(data["interaction_id"].as_str())
        .map(str::to_string)
}

pub fn is_final_type(t: &str) -> bool {
    matches!(t, "task.completed" | "task.failed" | "task.cancelled")
}

/// Checks the invariants every stored log must satisfy: strictly increasing seqs, never two
/// running at once (starts and final events of running ones alternate), exactly one final
/// event per interaction and nothing about an interaction after its final event.
pub fn check_log_invariants(events: &[Value]) {
    let mut last_seq = 0;
    let mut running: Option<String> = None;
    let mut finals = std::collections::HashSet::new();
    for event in events {
        let seq = event["seq"].as_i64().expect("seq");
        assert!(seq > last_seq, "seq not increasing at {event}");
        last_seq = seq;
        let kind = event["type"].as_str().expect("type");
        let id = interaction_of(event);
        if let Some(id) = &id {
            assert!(!finals.contains(id), "event after the final one: {event}");
        }
        match kind {
            "task.started" => {
                assert!(running.is_none(), "two running at {event}");
                running = id;
            }
            "task.delta" | "task.progress" => {
                assert_eq!(running, id, "output of a non-running interaction: {event}");
            }
            t if is_final_type(t) => {
                let id = id.expect("final event names its interaction");
                if running.as_ref() == Some(&id) {
                    running = None;
                }
                finals.insert(id);
            }
            "session.cleared" | "session.deleted" => {
                assert!(
                    running.is_none(),
                    "clear with a task still running: {event}"
                );
            }
            _ => {}
        }
    }
}
