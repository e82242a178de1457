//! Several real `baton serve` processes on one PostgreSQL database, for the multi-node
//! black-box tests: a throwaway database per test (created through the admin URL in
//! `BATON_TEST_POSTGRES`, dropped when its guard drops, also on panic), nodes as child processes
//! killed when dropped, a JSON HTTP client per node, WebSocket subscribers that collect what they
//! receive, the stored log read straight from PostgreSQL, and the checks every multi-node log and
//! stream must pass.
//!
//! Every wait has a timeout and panics with what it was waiting for.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::task::JoinHandle;

use super::stream::{Ws, WsFrame, assert_exactly, envelope_of, seq_of, stored_after, ws_open};
use super::{Answer, TIMEOUT, check_log_invariants, interaction_of, is_final_type};

#[allow(unused_imports)] // used by some test binaries only
pub use super::pg::{TestDatabase, admin_url_from, database_url, postgres_admin_url};

// ---------------------------------------------------------------------------------------------
// The database

/// A connection of the test itself (`application_name = 'baton-test'`).
pub struct Pg {
    pub client: tokio_postgres::Client,
    // Aborted on drop: the connection lives exactly as long as its client.
    connection: JoinHandle<()>,
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Pg {
    pub async fn connect(url: &str) -> Result<Pg, String> {
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
        config
            .application_name("baton-test")
            .connect_timeout(Duration::from_secs(10));
        let (client, connection) =
            tokio::time::timeout(TIMEOUT, config.connect(tokio_postgres::NoTls))
                .await
                .map_err(|_| format!("connecting to {url} timed out"))?
                .map_err(|e| format!("connecting to {url}: {e}"))?;
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Pg { client, connection })
    }

    pub async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, String> {
        tokio::time::timeout(TIMEOUT, self.client.query(sql, params))
            .await
            .map_err(|_| format!("query timed out: {sql}"))?
            .map_err(|e| format!("{sql}: {e}"))
    }

    /// A session's stored event log (envelopes, in seq order).
    pub async fn stored_events(&self, session: &str) -> Vec<Value> {
        let key = super::session_key(session);
        self.rows(
            "SELECT envelope FROM events WHERE session = $1 ORDER BY seq",
            &[&key],
        )
        .await
        .unwrap_or_else(|e| panic!("reading the events of {session}: {e}"))
        .iter()
        .map(|row| {
            let text: String = row.get(0);
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("stored envelope is not JSON ({e}): {text}"))
        })
        .collect()
    }

    /// `(id, status, node)` of a session's interactions.
    pub async fn interaction_rows(&self, session: &str) -> Vec<(String, String, Option<String>)> {
        let key = super::session_key(session);
        self.rows(
            "SELECT id, status, node FROM interactions WHERE session = $1",
            &[&key],
        )
        .await
        .unwrap_or_else(|e| panic!("reading the interactions of {session}: {e}"))
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
    }

    /// The ids in `nodes`.
    pub async fn node_ids(&self) -> Result<Vec<String>, String> {
        Ok(self
            .rows("SELECT id FROM nodes ORDER BY id", &[])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect())
    }

    /// The nodes whose lease has not expired (by this machine's clock).
    pub async fn live_nodes(&self) -> Vec<String> {
        let now = now_ms();
        self.rows("SELECT id FROM nodes WHERE lease_until > $1", &[&now])
            .await
            .unwrap_or_else(|e| panic!("reading nodes: {e}"))
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    /// `(backend pid, client port)` of the LISTEN connections to `database`.
    pub async fn listeners(&self, database: &str) -> Vec<(i32, Option<i32>)> {
        self.rows(
            "SELECT pid, client_port FROM pg_stat_activity \
             WHERE application_name = 'baton-listener' AND datname = $1",
            &[&database],
        )
        .await
        .unwrap_or_else(|e| panic!("reading pg_stat_activity: {e}"))
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
    }

    /// Terminates the LISTEN backends of `node` (found by the node's TCP ports); returns how many.
    pub async fn terminate_listeners_of(&self, database: &str, node: &Node) -> usize {
        let ports = local_tcp_ports(node.child.id());
        let mut terminated = 0;
        for (pid, port) in self.listeners(database).await {
            let Some(port) = port else { continue };
            if !u16::try_from(port).is_ok_and(|p| ports.contains(&p)) {
                continue;
            }
            let rows = self
                .rows("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .unwrap_or_else(|e| panic!("pg_terminate_backend({pid}): {e}"));
            if rows.first().is_some_and(|row| row.get::<_, bool>(0)) {
                terminated += 1;
            }
        }
        terminated
    }

    /// Waits until `node` has a LISTEN connection again.
    pub async fn wait_listening(&self, database: &str, node: &Node) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let ports = local_tcp_ports(node.child.id());
            let listeners = self.listeners(database).await;
            if listeners
                .iter()
                .any(|(_, port)| port.is_some_and(|p| ports.contains(&(p as u16))))
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {} has no LISTEN connection again after {TIMEOUT:?} (listeners: {listeners:?})",
                node.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `nodes` holds an id not in `known` (a node that just started); returns it.
    pub async fn wait_new_node(&self, known: &[String], name: &str) -> String {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let ids = self.node_ids().await;
            if let Ok(ids) = &ids
                && let Some(new) = ids.iter().find(|id| !known.contains(id))
            {
                return new.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {name} has no row in `nodes` after {TIMEOUT:?} (last read: {ids:?})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Milliseconds since the Unix epoch, by this machine's clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

// ---------------------------------------------------------------------------------------------
// Nodes

/// One `baton serve` child process; killed (SIGKILL) when dropped, stopped or not.
pub struct Node {
    /// `n0`, `n1`, … (the test's name for it).
    pub name: String,
    /// Its row in `nodes` (learned by [`Cluster::start`]).
    pub id: String,
    pub url: String,
    pub api: Api,
    child: Child,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

/// Lines of a node's stderr kept for a failure message.
const STDERR_TAIL: usize = 40;

impl Node {
    /// Starts `baton serve` on `database_url` with the config file `config`, on an ephemeral
    /// loopback port; returns once it prints its address. Its stderr is forwarded, prefixed by
    /// `name`.
    pub fn spawn(name: &str, database_url: &str, config: &Path, http: reqwest::Client) -> Node {
        let mut child = super::child::baton()
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--database")
            .arg(database_url)
            .arg("--config")
            .arg(config)
            .env("BATON_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn baton serve");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail = stderr_tail.clone();
        let prefix = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{prefix}] {line}");
                let mut tail = tail.lock().expect("stderr tail");
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        // A child that exits closes its stdout: the wait then ends at once, not after TIMEOUT.
        let url = match super::child::listening_url(stdout) {
            Some(url) => url,
            None => {
                std::thread::sleep(Duration::from_millis(200));
                let status = child.try_wait();
                let _ = child.kill();
                let _ = child.wait();
                let tail: Vec<String> = stderr_tail
                    .lock()
                    .expect("stderr tail")
                    .iter()
                    .cloned()
                    .collect();
                panic!(
                    "node {name} did not start listening (exit status {status:?}); its stderr:\n{}",
                    tail.join("\n")
                );
            }
        };
        Node {
            name: name.to_string(),
            id: String::new(),
            api: Api {
                http,
                base: url.clone(),
                name: name.to_string(),
            },
            url,
            child,
            stderr_tail,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// `kill -9`: no shutdown code runs.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    /// SIGSTOP: the process stalls (a GC pause, a frozen VM) with its connections open.
    pub fn pause(&self) {
        kill(self.pid(), Signal::SIGSTOP).expect("SIGSTOP");
    }

    /// SIGCONT after [`Node::pause`].
    pub fn resume(&self) {
        kill(self.pid(), Signal::SIGCONT).expect("SIGCONT");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // SIGKILL also ends a stopped process.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The local TCP ports of the sockets process `pid` holds (Linux `/proc`).
pub fn local_tcp_ports(pid: u32) -> HashSet<u16> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter_map(|fd| {
                    let target = std::fs::read_link(fd.path()).ok()?;
                    let target = target.to_str()?;
                    Some(
                        target
                            .strip_prefix("socket:[")?
                            .strip_suffix(']')?
                            .to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let mut ports = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(inode)) = (fields.get(1), fields.get(9)) else {
                continue;
            };
            if inodes.contains(*inode)
                && let Some(port) = local.rsplit(':').next()
                && let Ok(port) = u16::from_str_radix(port, 16)
            {
                ports.insert(port);
            }
        }
    }
    ports
}

/// Nodes on one fresh database. Fields drop in order: the nodes stop before their database goes.
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// The test's own connection to the database.
    pub pg: Pg,
    pub db: TestDatabase,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Creates a database and starts `count` nodes on it, one after the other, each with
    /// `config_toml` as its config file; learns each node's id from `nodes`.
    pub async fn start(admin_url: &str, count: usize, config_toml: &str) -> Cluster {
        let db = TestDatabase::create(admin_url).await;
        let pg = Pg::connect(&db.url)
            .await
            .unwrap_or_else(|e| panic!("the test database: {e}"));
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("baton.toml");
        std::fs::write(&config, config_toml).expect("write config");
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .pool_max_idle_per_host(512)
            .build()
            .expect("client");
        let mut nodes: Vec<Node> = Vec::new();
        for i in 0..count {
            let name = format!("n{i}");
            let mut node = Node::spawn(&name, &db.url, &config, http.clone());
            let known: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
            node.id = pg.wait_new_node(&known, &name).await;
            nodes.push(node);
        }
        Cluster {
            nodes,
            pg,
            db,
            _dir: dir,
        }
    }

    /// The API of node `i`.
    pub fn api(&self, i: usize) -> Api {
        self.nodes[i].api.clone()
    }

    pub fn apis(&self) -> Vec<Api> {
        self.nodes.iter().map(|n| n.api.clone()).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Their stderr is above, prefixed by name; this maps names to ids.
            for node in &self.nodes {
                eprintln!("node {}: id {}, {}", node.name, node.id, node.url);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The HTTP API of one node

/// A JSON client of one node.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The node's name, for failure messages.
    pub name: String,
}

impl Api {
    /// Sends `method path` with an optional JSON body, within `timeout`.
    pub async fn try_request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Answer, String> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(|e| e.to_string())?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    pub async fn request(&self, method: Method, path: &str, body: Option<&Value>) -> Answer {
        self.try_request(method.clone(), path, body, TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{method} {path} on node {}: {e}", self.name))
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.request(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Answer {
        self.request(Method::POST, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Answer {
        self.request(Method::PUT, path, Some(body)).await
    }

    /// `POST /v1/sessions/{session}/messages` with `{"content", "policy"}`.
    pub async fn send(&self, session: &str, content: &str, policy: &str) -> Answer {
        let body = serde_json::json!({"content": content, "policy": policy});
        self.post(&format!("/v1/sessions/{session}/messages"), &body)
            .await
    }

    /// Creates (or updates) a session with `agent`.
    pub async fn put_session(&self, session: &str, agent: &str) -> Answer {
        self.put(
            &format!("/v1/sessions/{session}"),
            &serde_json::json!({"agent": agent}),
        )
        .await
    }

    pub async fn interaction(&self, session: &str, id: &str) -> Value {
        let answer = self
            .get(&format!("/v1/sessions/{session}/interactions/{id}"))
            .await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "GET interaction {id} on {}: {:?}",
            self.name,
            answer.body
        );
        answer.body
    }

    /// Polls the interaction until `done` holds for it; panics after `timeout`.
    pub async fn wait_interaction(
        &self,
        session: &str,
        id: &str,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let interaction = self.interaction(session, id).await;
            if done(&interaction) {
                return interaction;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "interaction {id} (via {}): not {what} after {timeout:?}: {interaction}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls the interaction until it is final; panics after `timeout`.
    pub async fn wait_final(&self, session: &str, id: &str, timeout: Duration) -> Value {
        self.wait_interaction(session, id, timeout, "final", is_final_interaction)
            .await
    }

    /// Waits until nothing runs or waits in the session; returns the session.
    pub async fn wait_idle(&self, session: &str) -> Value {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let s = self.get(&format!("/v1/sessions/{session}")).await;
            if s.status == StatusCode::OK && s.body["running"].is_null() && s.body["queued"] == 0 {
                return s.body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "session {session} (via {}) not idle after {TIMEOUT:?}: {:?}",
                self.name,
                s.body
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls `/readyz` (each try bounded by a second) until it answers 200.
    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let answer = self
                .try_request(Method::GET, "/readyz", None, Duration::from_secs(1))
                .await;
            if answer.as_ref().is_ok_and(|a| a.status == StatusCode::OK) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {} not ready after {timeout:?}: {answer:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `ws://…/v1/sessions/{session}/ws[?query]`.
    pub fn ws_url(&self, session: &str, query: &str) -> String {
        let host = self
            .base
            .strip_prefix("http://")
            .expect("a node URL is http://");
        if query.is_empty() {
            format!("ws://{host}/v1/sessions/{session}/ws")
        } else {
            format!("ws://{host}/v1/sessions/{session}/ws?{query}")
        }
    }

    /// A live subscriber of `session` on this node.
    pub async fn subscribe(&self, session: &str) -> Subscriber {
        Subscriber::open(self, session).await
    }
}

pub fn is_final_interaction(interaction: &Value) -> bool {
    matches!(
        interaction["status"].as_str(),
        Some("completed" | "failed" | "cancelled")
    )
}

// ---------------------------------------------------------------------------------------------
// Subscribers

/// A WebSocket subscriber (live events only) whose events a reader task collects, so that it
/// never lags while the test does other things.
pub struct Subscriber {
    /// `session@node`, for failure messages.
    pub what: String,
    pub hello_last_seq: i64,
    received: Arc<Mutex<Vec<Value>>>,
    // Why the reader stopped: a close frame, the end of the stream, a frame that is not an event.
    ended: Arc<Mutex<Option<String>>>,
    reader: JoinHandle<()>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Subscriber {
    pub async fn open(api: &Api, session: &str) -> Subscriber {
        let what = format!("{session}@{}", api.name);
        let url = api.ws_url(session, "");
        let socket = ws_open(&url).await.unwrap_or_else(|refused| {
            panic!(
                "WebSocket {what} refused: {} {}",
                refused.status, refused.body
            )
        });
        let mut ws = Ws::from_socket(socket).await;
        let hello_last_seq = ws.hello_last_seq();
        let received = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(Mutex::new(None));
        let reader = tokio::spawn({
            let received = received.clone();
            let ended = ended.clone();
            async move {
                loop {
                    let Some(frame) = ws.next_frame_within(Duration::from_secs(3600)).await else {
                        continue;
                    };
                    match frame {
                        WsFrame::Json(frame) if frame["kind"] == "event" => {
                            received.lock().expect("received").push(envelope_of(&frame))
                        }
                        other => {
                            *ended.lock().expect("ended") = Some(format!("{other:?}"));
                            return;
                        }
                    }
                }
            }
        });
        Subscriber {
            what,
            hello_last_seq,
            received,
            ended,
            reader,
        }
    }

    /// What it received so far.
    pub fn received(&self) -> Vec<Value> {
        self.received.lock().expect("received").clone()
    }

    /// Waits until it received an event with `seq >= seq` (at once when `seq` is not after
    /// hello); returns everything it received. Panics after [`TIMEOUT`] or if it ended before.
    pub async fn wait_through(&self, seq: i64) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let received = self.received();
            if seq <= self.hello_last_seq || received.last().is_some_and(|e| seq_of(e) >= seq) {
                return received;
            }
            let last = received.last().map(seq_of);
            if let Some(end) = self.ended.lock().expect("ended").clone() {
                panic!(
                    "subscriber {} stopped ({end}) before seq {seq}; it received up to {last:?}",
                    self.what
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "subscriber {} did not receive seq {seq} in {TIMEOUT:?}; it received up to {last:?} \
                 (hello last_seq {})",
                self.what,
                self.hello_last_seq
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checks

fn reason_of(event: &Value) -> Option<&str> {
    event["data"]["interaction"]["cancel_reason"].as_str()
}

fn is_cancelled_by(event: &Value, reason: &str) -> bool {
    event["type"] == "task.cancelled" && reason_of(event) == Some(reason)
}

/// Checks a session's whole stored log (from `session.created` on) by replaying it:
/// - everything [`check_log_invariants`] checks (increasing seqs, one running, …);
/// - a message is queued only behind work, and starts at once only when nothing waits; queued
///   ones start in FIFO order and end, if before starting, only by cancellation;
/// - exactly one final event per interaction, whose `status` matches its type;
/// - nothing about an interaction of an earlier epoch after a `session.cleared`;
/// - the `task.cancelled` events a clear caused come right before its `session.cleared`, which
///   leaves nothing running or queued and bumps the epoch by one;
/// - when `interrupters` (the ids accepted with policy `interrupt`) is given: the cancellations of
///   an interrupt come right before the start of an interaction accepted with `interrupt`.
pub fn check_stored_log(what: &str, events: &[Value], interrupters: Option<&HashSet<String>>) {
    let mut running: Option<String> = None;
    let mut queued: VecDeque<String> = VecDeque::new();
    let mut finals: HashMap<String, usize> = HashMap::new();
    let mut known: Vec<String> = Vec::new();
    let mut this_epoch: HashSet<String> = HashSet::new();
    let mut before_clear: HashSet<String> = HashSet::new();
    let mut clear_cancels: Vec<i64> = Vec::new();
    let mut interrupt_cancels: Vec<i64> = Vec::new();
    let mut epoch: Option<i64> = None;
    for event in events {
        let seq = seq_of(event);
        let kind = event["type"].as_str().unwrap_or_default();
        let id = interaction_of(event);
        if let Some(id) = &id {
            assert!(
                !before_clear.contains(id),
                "{what}: an event about {id}, of an earlier epoch, after its session.cleared: {event}"
            );
            assert!(
                !finals.contains_key(id),
                "{what}: an event about {id} after its final event: {event}"
            );
            if this_epoch.insert(id.clone()) {
                known.push(id.clone());
            }
        }
        if !clear_cancels.is_empty() && !is_cancelled_by(event, "clear") {
            assert_eq!(
                kind, "session.cleared",
                "{what}: the clear cancellations at seqs {clear_cancels:?} are not followed by \
                 their session.cleared: {event} comes first"
            );
        }
        if !interrupt_cancels.is_empty() && !is_cancelled_by(event, "interrupt") {
            assert_eq!(
                kind, "task.started",
                "{what}: the interrupt cancellations at seqs {interrupt_cancels:?} are not followed \
                 by the start of the interrupting message: {event} comes first"
            );
        }
        match kind {
            "session.created" => epoch = event["data"]["session"]["epoch"].as_i64(),
            "interaction.queued" => {
                let id = id.unwrap_or_else(|| panic!("{what}: queued names no interaction"));
                assert!(
                    running.is_some() || !queued.is_empty(),
                    "{what}: {id} was queued while the session was idle: {event}"
                );
                assert_eq!(
                    event["data"]["interaction"]["status"], "queued",
                    "{what}: {event}"
                );
                queued.push_back(id);
            }
            "task.started" => {
                let id = id.unwrap_or_else(|| panic!("{what}: a start names no interaction"));
                assert!(
                    running.is_none(),
                    "{what}: two running at once ({running:?} and {id}): {event}"
                );
                if queued.front() == Some(&id) {
                    queued.pop_front();
                } else {
                    assert!(
                        !queued.contains(&id),
                        "{what}: {id} started ahead of those queued before it ({queued:?}), not \
                         FIFO: {event}"
                    );
                    assert!(
                        queued.is_empty(),
                        "{what}: {id} started at once while {queued:?} waited: {event}"
                    );
                }
                if !interrupt_cancels.is_empty()
                    && let Some(interrupters) = interrupters
                {
                    assert!(
                        interrupters.contains(&id),
                        "{what}: the interrupt cancellations at seqs {interrupt_cancels:?} are \
                         followed by the start of {id}, which was not sent with policy interrupt"
                    );
                }
                interrupt_cancels.clear();
                assert_eq!(
                    event["data"]["interaction"]["status"], "running",
                    "{what}: {event}"
                );
                running = Some(id);
            }
            t if is_final_type(t) => {
                let id = id.unwrap_or_else(|| panic!("{what}: a final event names no interaction"));
                let status = t.trim_start_matches("task.");
                assert_eq!(
                    event["data"]["interaction"]["status"], status,
                    "{what}: the final event's interaction has another status: {event}"
                );
                if running.as_ref() == Some(&id) {
                    running = None;
                } else if let Some(at) = queued.iter().position(|q| *q == id) {
                    queued.remove(at);
                    assert_eq!(
                        t, "task.cancelled",
                        "{what}: a queued interaction ended without running: {event}"
                    );
                } else {
                    panic!("{what}: a final event of {id}, neither running nor queued: {event}");
                }
                if is_cancelled_by(event, "clear") {
                    clear_cancels.push(seq);
                }
                if is_cancelled_by(event, "interrupt") {
                    interrupt_cancels.push(seq);
                }
                finals.insert(id, 1);
            }
            "session.cleared" => {
                assert!(
                    running.is_none() && queued.is_empty(),
                    "{what}: the clear left {running:?} running and {queued:?} queued: {event}"
                );
                let new_epoch = event["data"]["epoch"]
                    .as_i64()
                    .unwrap_or_else(|| panic!("{what}: session.cleared without epoch: {event}"));
                if let Some(epoch) = epoch {
                    assert_eq!(
                        new_epoch,
                        epoch + 1,
                        "{what}: a clear bumps the epoch by one: {event}"
                    );
                }
                epoch = Some(new_epoch);
                clear_cancels.clear();
                before_clear.extend(this_epoch.drain());
            }
            _ => {}
        }
    }
    assert!(
        clear_cancels.is_empty(),
        "{what}: clear cancellations at seqs {clear_cancels:?} without a session.cleared after them"
    );
    assert!(
        interrupt_cancels.is_empty(),
        "{what}: interrupt cancellations at seqs {interrupt_cancels:?} without a start after them"
    );
    for id in &known {
        assert!(
            finals.contains_key(id),
            "{what}: {id} has no final event (running {running:?}, queued {queued:?})"
        );
    }
    // A second opinion, written independently.
    check_log_invariants(events);
}

/// The event that ended `id` and its index in `events`.
pub fn final_event_of<'a>(events: &'a [Value], id: &str) -> Option<(usize, &'a Value)> {
    events.iter().enumerate().find(|(_, e)| {
        e["type"].as_str().is_some_and(is_final_type) && interaction_of(e).as_deref() == Some(id)
    })
}

/// What the API acknowledged about one session, to hold the stored log to it.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// Messages answered `202`: id → (policy, `status` in the answer).
    pub accepted: HashMap<String, (String, String)>,
    /// Clears answered `200`: `(epoch, cancelled ids)`.
    pub clears: Vec<(i64, Vec<String>)>,
    /// The ids cancels answered as cancelled.
    pub cancelled: Vec<String>,
}

impl Ledger {
    pub fn merge(&mut self, other: Ledger) {
        self.accepted.extend(other.accepted);
        self.clears.extend(other.clears);
        self.cancelled.extend(other.cancelled);
    }

    /// The ids accepted with policy `interrupt`.
    pub fn interrupters(&self) -> HashSet<String> {
        self.accepted
            .iter()
            .filter(|(_, (policy, _))| policy == "interrupt")
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Holds the stored log to the answers: every acknowledged message is stored (and nothing
    /// else), queued in the log exactly when its answer said `queued`; every acknowledged clear
    /// is one `session.cleared` with its epoch, after the `task.cancelled` (`clear`) of every id
    /// it named and after the clear before it; every id a cancel named ended `cancelled`
    /// (`cancel`).
    pub fn check_against(&self, what: &str, events: &[Value]) {
        let mut first_event: HashMap<String, &Value> = HashMap::new();
        for event in events {
            if let Some(id) = interaction_of(event) {
                first_event.entry(id).or_insert(event);
            }
        }
        for (id, (policy, status)) in &self.accepted {
            let first = first_event.get(id).unwrap_or_else(|| {
                panic!("{what}: {id} was acknowledged (202, {policy}) but is not in the log")
            });
            let want = if status == "queued" {
                "interaction.queued"
            } else {
                "task.started"
            };
            assert_eq!(
                first["type"], want,
                "{what}: {id} was answered {status:?} ({policy}), its first event is {first}"
            );
        }
        for id in first_event.keys() {
            assert!(
                self.accepted.contains_key(id),
                "{what}: {id} is in the log but no message was acknowledged with that id"
            );
        }
        let cleared: Vec<(usize, i64)> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| e["type"] == "session.cleared")
            .map(|(i, e)| (i, e["data"]["epoch"].as_i64().unwrap_or(-1)))
            .collect();
        assert_eq!(
            cleared.len(),
            self.clears.len(),
            "{what}: {} clears acknowledged, {} session.cleared stored",
            self.clears.len(),
            cleared.len()
        );
        for (epoch, ids) in &self.clears {
            let at = cleared
                .iter()
                .position(|(_, e)| e == epoch)
                .unwrap_or_else(|| {
                    panic!("{what}: the clear answered with epoch {epoch} has no session.cleared")
                });
            let (index, _) = cleared[at];
            let previous = at.checked_sub(1).map(|p| cleared[p].0);
            for id in ids {
                let (final_at, event) = final_event_of(events, id)
                    .unwrap_or_else(|| panic!("{what}: {id}, cancelled by a clear, has no final"));
                assert!(
                    is_cancelled_by(event, "clear"),
                    "{what}: the clear to epoch {epoch} named {id}, which ended with {event}"
                );
                assert!(
                    final_at < index && previous.is_none_or(|p| final_at > p),
                    "{what}: {id}'s task.cancelled is not between the session.cleared of epoch \
                     {epoch} and the one before: {event}"
                );
            }
        }
        for id in &self.cancelled {
            let (_, event) = final_event_of(events, id)
                .unwrap_or_else(|| panic!("{what}: {id}, answered as cancelled, has no final"));
            assert!(
                is_cancelled_by(event, "cancel"),
                "{what}: a cancel answered {id} as cancelled; it ended with {event}"
            );
        }
    }
}

/// Of answers to concurrent `reject` messages on one idle session: exactly one `202` (running),
/// every other `409 session_busy` naming it as running. Returns the winner's id.
pub fn check_one_winner(what: &str, answers: &[Answer]) -> String {
    let winners: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status == StatusCode::ACCEPTED)
        .collect();
    assert_eq!(
        winners.len(),
        1,
        "{what}: {} of {} concurrent reject messages were accepted: {:?}",
        winners.len(),
        answers.len(),
        winners.iter().map(|a| &a.body).collect::<Vec<_>>()
    );
    let winner = winners[0].body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: the 202 has no id: {}", winners[0].body))
        .to_string();
    assert_eq!(winners[0].body["status"], "running", "{what}");
    for answer in answers.iter().filter(|a| a.status != StatusCode::ACCEPTED) {
        assert_eq!(
            answer.status,
            StatusCode::CONFLICT,
            "{what}: {:?}",
            answer.body
        );
        assert_eq!(
            answer.code(),
            Some("session_busy"),
            "{what}: {:?}",
            answer.body
        );
        assert_eq!(
            answer.body["error"]["running"], winner,
            "{what}: a 409 names another running interaction than the winner: {:?}",
            answer.body
        );
    }
    winner
}

/// What subscribers received, each `(name, hello last_seq, events)`, against the stored log:
/// each got exactly the stored events after its hello (no gap, no duplicate, same envelopes), so
/// all of them got the same sequence where they overlap.
pub fn check_subscribers(what: &str, stored: &[Value], received: &[(String, i64, Vec<Value>)]) {
    for (name, after, events) in received {
        assert_exactly(
            &format!("{what}: subscriber {name}"),
            events,
            stored,
            *after,
        );
    }
    for (i, (name_a, after_a, a)) in received.iter().enumerate() {
        for (name_b, after_b, b) in &received[i + 1..] {
            let after = (*after_a).max(*after_b);
            assert_eq!(
                stored_after(a, after),
                stored_after(b, after),
                "{what}: subscribers {name_a} and {name_b} received different events after {after}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Randomness

/// A small deterministic generator (SplitMix64): a test prints its seed, and
/// `BATON_TEST_SEED=<seed>` replays the same choices.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// `BATON_TEST_SEED`, or a fresh seed.
pub fn seed() -> u64 {
    std::env::var("BATON_TEST_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos ^ u64::from(std::process::id()).rotate_left(32)
        })
}
