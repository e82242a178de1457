//! `baton bench`: a load generator that starts servers from nothing but their binaries (this
//! Baton build and, optionally, the seed-style Python peer), drives the same scenarios
//! against each in one run, and reports figures side by side with Baton's ratio to the peer.
//!
//! Scenarios:
//! - **throughput**: workers, one per session, each posting a message with `?wait=` and
//!   posting the next when it is final; completed messages per second and latency.
//! - **accept**: one session, policy `enqueue`, one request at a time; accept latency.
//! - **memory**: the server's RSS after N sessions each holding M interactions.
//! - **fanout** / **idle**: WebSocket deliveries to many subscribers; memory per idle socket.
//! - **cancel**: cancel request → the `task.cancelled` event, for a running task of an echo,
//!   a `command` (a shell that honours SIGTERM) and an `openai` agent (streaming from a mock
//!   endpoint that this process serves).
//! - **cluster** (with `--postgres ADMIN_URL`): the throughput load spread over N `baton serve`
//!   nodes sharing one fresh PostgreSQL database (and, for comparison, over one node on
//!   SQLite), with WebSocket subscribers on every node measuring cross-node delivery.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Measure an already running server instead of starting one (no RSS figure then).
    pub server: Option<String>,
    /// The seed peer's folder (with `server.py`); when given, the peer is measured too.
    pub peer_dir: Option<PathBuf>,
    /// Python interpreter with the peer's requirements installed.
    pub peer_python: PathBuf,
    /// Seconds of measurement for the throughput scenario.
    pub duration_s: f64,
    /// Sessions (= concurrent workers) of the throughput scenario.
    pub sessions: usize,
    /// Requests of the accept-latency scenario.
    pub accept_requests: usize,
    /// Sessions and interactions per session of the memory scenario (0 sessions: skipped).
    pub memory_sessions: usize,
    pub memory_interactions: usize,
    /// WebSocket subscribers of the fan-out scenario (0 skips it).
    pub fanout_subscribers: usize,
    /// Idle WebSocket connections of the idle-memory scenario (0 skips it).
    pub idle_connections: usize,
    /// Cancels measured per agent in the cancel scenario (0 skips it).
    pub cancel_rounds: usize,
    /// PostgreSQL URL of a role that may create databases: enables the cluster scenario, which
    /// creates a fresh database on it per configuration and drops it afterwards.
    pub postgres: Option<String>,
    /// Node counts of the cluster scenario.
    pub nodes: Vec<usize>,
    /// Which scenarios to run (`throughput`, `accept`, `memory`, `fanout`, `idle`, `cancel`,
    /// `cluster`); empty means all (`cluster` only when `postgres` is given).
    pub only: Vec<String>,
}

impl BenchOptions {
    fn wants(&self, scenario: &str) -> bool {
        self.only.iter().any(|o| o == scenario)
            || (self.only.is_empty() && (scenario != CLUSTER || self.postgres.is_some()))
    }

    /// Whether any scenario of a single server (all but `cluster`) is to run.
    fn wants_single_server(&self) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o != CLUSTER)
    }
}

const CLUSTER: &str = "cluster";

/// Figures of one target.
#[derive(Debug, Default, Clone)]
struct Figures {
    name: String,
    throughput: Option<Throughput>,
    accept: Option<Latencies>,
    memory: Option<Memory>,
    fanout: Option<Delivery>,
    /// Cluster scenario: the throughput load's events as subscribers on every node saw them.
    delivery: Option<Delivery>,
    idle: Option<Idle>,
    /// Cancel latency by agent kind.
    cancel: Vec<(&'static str, Latencies)>,
    /// Server-side time to stop the command agent's processes: (stops, p50 and p99 bucket
    /// bounds in ms).
    process_stops: Option<(u64, f64, f64)>,
}

/// The cumulative buckets `(le, count)` of `baton_agent_process_stop_seconds` on `/metrics`.
async fn stop_buckets(url: &str) -> anyhow::Result<Vec<(f64, u64)>> {
    let text = http_client(1)?
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("baton_agent_process_stop_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, count) = l.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect())
}

/// Stops counted between two readings of the buckets, and the p50 and p99 bucket bounds (ms).
fn stop_quantiles(before: &[(f64, u64)], after: &[(f64, u64)]) -> Option<(u64, f64, f64)> {
    let counts: Vec<(f64, u64)> = after
        .iter()
        .map(|&(le, n)| {
            let earlier = before.iter().find(|b| b.0 == le).map_or(0, |b| b.1);
            (le, n.saturating_sub(earlier))
        })
        .collect();
    let total = counts.last()?.1;
    if total == 0 {
        return None;
    }
    let at = |q: f64| {
        let rank = (total as f64 * q).ceil() as u64;
        counts
            .iter()
            .find(|&&(_, n)| n >= rank)
            .map_or(f64::INFINITY, |&(le, _)| le * 1000.0)
    };
    Some((total, at(0.50), at(0.99)))
}

/// Events received by a set of WebSocket subscribers in a measured window.
#[derive(Debug, Clone)]
struct Delivery {
    subscribers: usize,
    /// Events received per second, summed over the subscribers.
    per_second: f64,
    /// Event creation (`at`, millisecond precision) to receipt.
    latency: Latencies,
    /// The same, only for subscribers on another node than the one that ran the event's task
    /// (cluster scenario).
    remote_latency: Option<Latencies>,
    /// Seqs missing from, and seqs repeated in, each subscriber's stream (summed).
    gaps: u64,
    duplicates: u64,
    /// Subscribers whose socket the server closed before the window ended.
    closed_early: usize,
}

#[derive(Debug, Clone)]
struct Idle {
    connections: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
}

#[derive(Debug, Clone)]
struct Throughput {
    completed: u64,
    errors: u64,
    per_second: f64,
    latency: Latencies,
}

#[derive(Debug, Clone)]
struct Latencies {
    count: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

#[derive(Debug, Clone)]
struct Memory {
    sessions: usize,
    interactions: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
    load_seconds: f64,
}

/// `default` answers at once; `stream` streams a word per millisecond (the fan-out scenario).
const BENCH_CONFIG: &str = "queue_limit = 100000\n\n\
    [agents.default]\nkind = \"echo\"\ndelay_ms = 0\n\n\
    [agents.stream]\nkind = \"echo\"\ndelay_ms = 1\n\n\
    [agents.slow]\nkind = \"echo\"\ndelay_ms = 20\n";

/// Baton's extra agents for the cancel scenario: a shell that streams a delta and then
/// waits (it honours SIGTERM), and an LLM streaming from the mock at `llm_url`.
fn real_agents_config(llm_url: &str) -> String {
    let script = r#"printf '%s\n' '{"type":"delta","text":"go"}'; exec sleep 60"#;
    format!(
        "\n[agents.cmd]\nkind = \"command\"\nprogram = \"/bin/sh\"\nargs = [\"-c\", {script:?}]\n\
         \n[agents.llm]\nkind = \"openai\"\nbase_url = \"{llm_url}/v1\"\nmodel = \"bench\"\n"
    )
}
const CONTENT: &str = "hello from the baton benchmark";

/// The measured part of a scenario: it starts after a warm-up of [`WARMUP`].
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

const WARMUP: Duration = Duration::from_secs(1);

impl Window {
    fn after_warmup(duration: Duration) -> Self {
        let start = Instant::now() + WARMUP;
        Self {
            start,
            end: start + duration,
        }
    }

    fn contains(&self, t: Instant) -> bool {
        self.start <= t && t <= self.end
    }

    fn seconds(&self) -> f64 {
        (self.end - self.start).as_secs_f64()
    }
}

impl Latencies {
    /// From whole milliseconds (figures derived from the events' `at`).
    fn from_ms(samples: impl IntoIterator<Item = u32>) -> Option<Self> {
        Self::from(
            samples
                .into_iter()
                .map(|ms| Duration::from_millis(u64::from(ms)))
                .collect(),
        )
    }

    fn from(mut samples: Vec<Duration>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Some(Self {
            count: samples.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: at(1.0),
        })
    }
}

/// A server process started by the benchmark; killed when dropped.
struct Spawned {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Spawned {
    fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// Starts `baton serve` with `config` on `database`, or on a fresh SQLite file when `None`.
async fn spawn_baton(config: &str, database: Option<&str>) -> anyhow::Result<Spawned> {
    let dir = tempfile::tempdir()?;
    let config_file = dir.path().join("bench.toml");
    std::fs::write(&config_file, config)?;
    let database = database.map_or_else(
        || format!("sqlite://{}", dir.path().join("bench.db").display()),
        str::to_string,
    );
    let exe = std::env::current_exe().context("locating the baton binary")?;
    let mut child = Command::new(exe)
        .arg("serve")
        .arg("--config")
        .arg(&config_file)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--database")
        .arg(&database)
        .env("BATON_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting baton serve")?;
    let stdout = child.stdout.take().context("baton's stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(url) = line.strip_prefix("baton listening on ") {
                return Ok(url.trim().to_string());
            }
        }
        bail!("baton exited before listening")
    })
    .await
    .context("baton did not start in 30 s")??;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Spawned {
        child,
        url,
        _dir: dir,
    })
}

async fn spawn_peer(peer_dir: &Path, python: &Path) -> anyhow::Result<Spawned> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("bench.toml");
    std::fs::write(&config, BENCH_CONFIG)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(python)
        .arg(peer_dir.join("server.py"))
        .arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data")
        .arg(dir.path().join("data"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting the peer with {}", python.display()))?;
    let url = format!("http://127.0.0.1:{port}");
    wait_healthy(&url).await?;
    Ok(Spawned {
        child,
        url,
        _dir: dir,
    })
}

async fn wait_healthy(url: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} did not become healthy in 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resident memory of a process, in KiB (Linux).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn http_client(connections: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .timeout(Duration::from_secs(60))
        .build()?)
}

fn message_body() -> Vec<u8> {
    serde_json::json!({"content": CONTENT})
        .to_string()
        .into_bytes()
}

/// The session of throughput worker `i`.
fn throughput_session(i: usize) -> String {
    format!("bench-tp-{i}")
}

/// Sessions post-with-wait in a loop, worker `i` to server `urls[i % urls.len()]`; counts
/// completed messages in the measured window.
async fn throughput(urls: &[&str], sessions: usize, window: Window) -> anyhow::Result<Throughput> {
    let http = http_client(sessions)?;
    let body = Arc::new(message_body());
    let mut workers = Vec::with_capacity(sessions);
    for i in 0..sessions {
        let http = http.clone();
        let body = body.clone();
        let target = format!(
            "{}/v1/sessions/{}/messages?wait=30",
            urls[i % urls.len()],
            throughput_session(i)
        );
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            loop {
                let sent = Instant::now();
                if sent >= window.end {
                    break;
                }
                let response = http
                    .post(&target)
                    .header("content-type", "application/json")
                    .body(body.as_ref().clone())
                    .send()
                    .await;
                let ok = match response {
                    Ok(r) => {
                        let status = r.status();
                        let bytes = r.bytes().await.unwrap_or_default();
                        status == reqwest::StatusCode::OK
                            && memfind(&bytes, b"\"status\":\"completed\"")
                    }
                    Err(_) => false,
                };
                let done = Instant::now();
                if window.contains(sent) && window.contains(done) {
                    if ok {
                        latencies.push(done - sent);
                    } else {
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (latencies, e) = worker.await?;
        all.extend(latencies);
        errors += e;
    }
    let completed = all.len() as u64;
    Ok(Throughput {
        completed,
        errors,
        per_second: completed as f64 / window.seconds(),
        latency: Latencies::from(all).context("no message completed")?,
    })
}

fn memfind(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// One session, `enqueue`, one request at a time: the latency of being accepted.
async fn accept_latency(url: &str, requests: usize) -> anyhow::Result<Latencies> {
    let http = http_client(1)?;
    let target = format!("{url}/v1/sessions/bench-accept/messages");
    let body = serde_json::json!({"content": CONTENT, "policy": "enqueue"}).to_string();
    let mut samples = Vec::with_capacity(requests);
    for i in 0..requests + 100 {
        let sent = Instant::now();
        let r = http
            .post(&target)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await?;
        let status = r.status();
        r.bytes().await?;
        if status != reqwest::StatusCode::ACCEPTED {
            bail!("accept answered {status}");
        }
        // The first 100 warm the connection and caches.
        if i >= 100 {
            samples.push(sent.elapsed());
        }
    }
    Latencies::from(samples).context("no samples")
}

/// Loads `sessions × interactions` completed interactions, then reads the server's RSS.
async fn memory(
    url: &str,
    pid: u32,
    sessions: usize,
    interactions: usize,
) -> anyhow::Result<Memory> {
    let rss_before_kib = rss_kib(pid).context("reading the server's RSS")?;
    let workers = 64.min(sessions.max(1));
    let http = http_client(workers)?;
    let body = Arc::new(message_body());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let http = http.clone();
        let body = body.clone();
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            for s in (w..sessions).step_by(workers) {
                let target = format!("{url}/v1/sessions/bench-mem-{s}/messages?wait=30");
                for _ in 0..interactions {
                    let r = http
                        .post(&target)
                        .header("content-type", "application/json")
                        .body(body.as_ref().clone())
                        .send()
                        .await?;
                    let status = r.status();
                    r.bytes().await?;
                    if status != reqwest::StatusCode::OK {
                        bail!("loading answered {status}");
                    }
                }
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let load_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(Memory {
        sessions,
        interactions,
        rss_before_kib,
        rss_after_kib: rss_kib(pid).context("reading the server's RSS")?,
        load_seconds,
    })
}

/// The WebSocket endpoint of `session` on the server at `url`.
fn session_ws_url(url: &str, session: &str) -> String {
    format!(
        "{}/v1/sessions/{session}/ws",
        url.replacen("http://", "ws://", 1)
    )
}

/// What one WebSocket subscriber saw.
#[derive(Debug, Default)]
struct Received {
    /// Latency (`at` → receipt, ms) of each event received in the window.
    latencies: Vec<u32>,
    /// Seqs missing from the stream, and events whose seq was not above the last one, over
    /// the whole subscription.
    gaps: u64,
    duplicates: u64,
    /// The server closed the socket before the window ended.
    closed_early: bool,
}

/// The number right after `"key":` in a frame, e.g. `"seq":42`.
fn number_after(text: &str, key: &str) -> Option<i64> {
    let rest = &text[text.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit() && c != '-')
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Reads a subscriber's frames until half a second after the window: the latency of each
/// event in the window, and the continuity of its seqs (from the hello's `last_seq` on).
async fn receive_events(
    mut socket: impl futures_util::Stream<Item = WsMessage> + Unpin,
    window: Window,
) -> Received {
    use futures_util::StreamExt;
    let mut received = Received::default();
    let mut last_seq: Option<i64> = None;
    let stop = tokio::time::sleep_until((window.end + Duration::from_millis(500)).into());
    tokio::pin!(stop);
    loop {
        let message = tokio::select! {
            _ = &mut stop => break,
            m = socket.next() => m,
        };
        let text = match message {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => {
                received.closed_early = Instant::now() < window.end;
                break;
            }
        };
        let at_receipt = crate::model::Millis::now();
        let now = Instant::now();
        if text.starts_with("{\"kind\":\"hello\"") {
            last_seq = number_after(&text, "\"last_seq\":");
            continue;
        }
        if !text.starts_with("{\"kind\":\"event\"") {
            continue;
        }
        if let Some(seq) = number_after(&text, "\"seq\":") {
            match last_seq {
                Some(last) if seq <= last => received.duplicates += 1,
                Some(last) => received.gaps += u64::try_from(seq - last - 1).unwrap_or(0),
                None => {}
            }
            last_seq = Some(last_seq.map_or(seq, |last| last.max(seq)));
        }
        if !window.contains(now) {
            continue;
        }
        // `"at":"…"` sits right after the type in every envelope.
        if let Some(at) = text
            .find("\"at\":\"")
            .and_then(|i| text.get(i + 6..i + 30))
            .and_then(crate::model::Millis::parse_rfc3339)
        {
            let ms = (at_receipt.0 - at.0).max(0);
            received
                .latencies
                .push(u32::try_from(ms).unwrap_or(u32::MAX));
        }
    }
    received
}

impl Delivery {
    /// Sums what the subscribers received in `window`; `None` if no event arrived.
    fn from(received: &[Received], window: Window) -> Option<Self> {
        let count: usize = received.iter().map(|r| r.latencies.len()).sum();
        Some(Self {
            subscribers: received.len(),
            per_second: count as f64 / window.seconds(),
            latency: Latencies::from_ms(received.iter().flat_map(|r| r.latencies.iter().copied()))?,
            remote_latency: None,
            gaps: received.iter().map(|r| r.gaps).sum(),
            duplicates: received.iter().map(|r| r.duplicates).sum(),
            closed_early: received.iter().filter(|r| r.closed_early).count(),
        })
    }
}

/// One session, `subscribers` WebSockets on it, producers streaming echo deltas into it.
async fn fanout(url: &str, subscribers: usize, duration: Duration) -> anyhow::Result<Delivery> {
    let ws_url = session_ws_url(url, "bench-fanout");
    // The agent streams a word every millisecond: a live stream, not a backlog.
    let created = http_client(1)?
        .put(format!("{url}/v1/sessions/bench-fanout"))
        .json(&serde_json::json!({"agent": "stream"}))
        .send()
        .await?;
    if !created.status().is_success() {
        bail!("creating the fan-out session answered {}", created.status());
    }
    let window = Window::after_warmup(duration);
    let mut sockets = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let (socket, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .context("connecting a subscriber")?;
        sockets.push(socket);
    }
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|socket| tokio::spawn(receive_events(socket, window)))
        .collect();
    // Producers: enqueue messages of 20 words, as fast as the session takes them.
    let http = http_client(4)?;
    let content = (0..20)
        .map(|i| format!("word{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let body = serde_json::json!({"content": content, "policy": "enqueue"}).to_string();
    let target = format!("{url}/v1/sessions/bench-fanout/messages?wait=30");
    let mut producers = Vec::new();
    for _ in 0..4 {
        let http = http.clone();
        let body = body.clone();
        let target = target.clone();
        producers.push(tokio::spawn(async move {
            while Instant::now() < window.end {
                let sent = http
                    .post(&target)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                if let Ok(r) = sent {
                    let _ = r.bytes().await;
                }
            }
        }));
    }
    for producer in producers {
        producer.await?;
    }
    let mut received = Vec::with_capacity(subscribers);
    for reader in readers {
        received.push(reader.await?);
    }
    Delivery::from(&received, window).context("no event was delivered")
}

/// Opens `connections` WebSockets (spread over 100 sessions) and leaves them idle.
async fn idle(url: &str, pid: u32, connections: usize) -> anyhow::Result<Idle> {
    // Create the sessions first, so the figure is about connections only.
    for s in 0..100 {
        let (socket, _) =
            tokio_tungstenite::connect_async(session_ws_url(url, &format!("bench-idle-{s}")))
                .await
                .context("creating a session")?;
        drop(socket);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before_kib = rss_kib(pid).context("reading the server's RSS")?;
    let mut sockets = Vec::with_capacity(connections);
    for i in 0..connections {
        let (socket, _) = tokio_tungstenite::connect_async(session_ws_url(
            url,
            &format!("bench-idle-{}", i % 100),
        ))
        .await
        .with_context(|| format!("opening idle connection {i}"))?;
        sockets.push(socket);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after_kib = rss_kib(pid).context("reading the server's RSS")?;
    drop(sockets);
    Ok(Idle {
        connections,
        rss_before_kib,
        rss_after_kib,
    })
}

/// Serves a mock OpenAI-compatible endpoint whose completions stream a chunk every 5 ms for
/// a minute; returns its base URL (without `/v1`).
async fn spawn_mock_llm() -> anyhow::Result<String> {
    use axum::routing::post;
    async fn completions() -> axum::response::Response {
        let chunks = futures_util::stream::unfold(0u32, |i| async move {
            if i >= 12_000 {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let chunk = format!(
                "data: {{\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"w{i} \"}},\"finish_reason\":null}}]}}\n\n"
            );
            Some((Ok::<_, std::convert::Infallible>(chunk), i + 1))
        });
        axum::response::Response::builder()
            .header("content-type", "text/event-stream")
            .body(axum::body::Body::from_stream(chunks))
            .unwrap_or_default()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().route("/v1/chat/completions", post(completions));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}"))
}

type WsMessage =
    Result<tokio_tungstenite::tungstenite::Message, tokio_tungstenite::tungstenite::Error>;

/// Waits (at most 30 s) for an event of type `kind` about interaction `id`.
async fn wait_for_event(
    socket: &mut (impl futures_util::Stream<Item = WsMessage> + Unpin),
    kind: &str,
    id: &str,
) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    let wait = async {
        while let Some(message) = socket.next().await {
            let tokio_tungstenite::tungstenite::Message::Text(text) = message? else {
                continue;
            };
            let frame: serde_json::Value = serde_json::from_str(&text)?;
            if frame["type"] != kind {
                continue;
            }
            let data = &frame["data"];
            let about = data["interaction_id"]
                .as_str()
                .or_else(|| data["interaction"]["id"].as_str());
            if about == Some(id) {
                return Ok(());
            }
        }
        bail!("the WebSocket closed")
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .with_context(|| format!("no {kind} in 30 s"))?
}

/// `rounds` times: a message to a session of `agent`, wait for its first delta (the agent
/// is producing), then time a cancel until the `task.cancelled` event arrives on a WebSocket.
async fn cancel_latency(url: &str, agent: &str, rounds: usize) -> anyhow::Result<Latencies> {
    let session = format!("bench-cancel-{agent}");
    let http = http_client(1)?;
    let created = http
        .put(format!("{url}/v1/sessions/{session}"))
        .json(&serde_json::json!({"agent": agent}))
        .send()
        .await?;
    if !created.status().is_success() {
        bail!(
            "creating the session for agent {agent} answered {}",
            created.status()
        );
    }
    let ws_url = session_ws_url(url, &session);
    let (mut socket, _) = tokio_tungstenite::connect_async(ws_url.as_str())
        .await
        .context("connecting the cancel scenario's WebSocket")?;
    let content = (0..500)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let sent: serde_json::Value = http
            .post(format!("{url}/v1/sessions/{session}/messages"))
            .json(&serde_json::json!({"content": content, "policy": "reject"}))
            .send()
            .await?
            .json()
            .await?;
        let id = sent["id"]
            .as_str()
            .with_context(|| format!("message refused: {sent}"))?
            .to_string();
        wait_for_event(&mut socket, "task.delta", &id).await?;
        let started = Instant::now();
        let cancelled = http
            .post(format!("{url}/v1/sessions/{session}/cancel"))
            .json(&serde_json::json!({}))
            .send()
            .await?;
        if !cancelled.status().is_success() {
            bail!("cancel answered {}", cancelled.status());
        }
        wait_for_event(&mut socket, "task.cancelled", &id).await?;
        samples.push(started.elapsed());
    }
    Latencies::from(samples).context("no cancel measured")
}

async fn measure(
    name: &str,
    url: &str,
    pid: Option<u32>,
    options: &BenchOptions,
    real_agents: bool,
) -> anyhow::Result<Figures> {
    let wants = |s: &str| options.wants(s);
    let mut figures = Figures {
        name: name.to_string(),
        ..Figures::default()
    };
    if wants("throughput") {
        eprintln!(
            "[{name}] throughput: {} sessions, {} s",
            options.sessions, options.duration_s
        );
        figures.throughput = Some(
            throughput(
                &[url],
                options.sessions,
                Window::after_warmup(Duration::from_secs_f64(options.duration_s)),
            )
            .await?,
        );
    }
    if wants("accept") {
        eprintln!(
            "[{name}] accept latency: {} requests",
            options.accept_requests
        );
        figures.accept = Some(accept_latency(url, options.accept_requests).await?);
    }
    if wants("memory")
        && options.memory_sessions > 0
        && let Some(pid) = pid
    {
        eprintln!(
            "[{name}] memory: {} sessions x {} interactions",
            options.memory_sessions, options.memory_interactions
        );
        figures.memory = Some(
            memory(
                url,
                pid,
                options.memory_sessions,
                options.memory_interactions,
            )
            .await?,
        );
    }
    if wants("fanout") && options.fanout_subscribers > 0 {
        eprintln!(
            "[{name}] fan-out: {} WebSocket subscribers on one session, {} s",
            options.fanout_subscribers, options.duration_s
        );
        figures.fanout = Some(
            fanout(
                url,
                options.fanout_subscribers,
                Duration::from_secs_f64(options.duration_s),
            )
            .await?,
        );
    }
    if wants("idle")
        && options.idle_connections > 0
        && let Some(pid) = pid
    {
        eprintln!(
            "[{name}] idle: {} WebSocket connections",
            options.idle_connections
        );
        figures.idle = Some(idle(url, pid, options.idle_connections).await?);
    }
    if wants("cancel") && options.cancel_rounds > 0 {
        let agents: &[(&str, &'static str)] = if real_agents {
            &[("slow", "echo"), ("cmd", "command"), ("llm", "openai")]
        } else {
            &[("slow", "echo")]
        };
        for &(agent, kind) in agents {
            eprintln!(
                "[{name}] cancel latency: {} cancels of a running {kind} agent",
                options.cancel_rounds
            );
            let before = stop_buckets(url).await.unwrap_or_default();
            let latencies = cancel_latency(url, agent, options.cancel_rounds).await?;
            figures.cancel.push((kind, latencies));
            if kind == "command" {
                // Stops end in the background: give the last one a moment to be counted.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let after = stop_buckets(url).await.unwrap_or_default();
                figures.process_stops = stop_quantiles(&before, &after);
            }
        }
    }
    Ok(figures)
}

/// Sessions of the throughput load that the cluster scenario watches, each from every node.
const WATCHED_SESSIONS: usize = 8;

/// A database of one cluster configuration, created through the admin URL;
/// [`BenchDatabase::remove`] drops it `WITH (FORCE)`.
struct BenchDatabase {
    admin: tokio_postgres::Client,
    /// Drives the admin connection; aborted on drop.
    connection: tokio::task::JoinHandle<()>,
    name: String,
    /// What the nodes connect to.
    url: String,
}

impl BenchDatabase {
    async fn create(admin_url: &str) -> anyhow::Result<Self> {
        let name = format!("baton_bench_{}", uuid::Uuid::now_v7().simple());
        let url = database_url(admin_url, &name)?;
        let (admin, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {admin_url}"))?;
        let connection = tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("the admin connection to PostgreSQL failed: {e}");
            }
        });
        let database = Self {
            admin,
            connection,
            name,
            url,
        };
        database
            .admin
            .batch_execute(&format!("CREATE DATABASE {}", database.name))
            .await
            .with_context(|| format!("creating database {}", database.name))?;
        Ok(database)
    }

    /// Drops the database, disconnecting whoever is still connected.
    async fn remove(self) -> anyhow::Result<()> {
        self.admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .with_context(|| format!("dropping database {}", self.name))
    }
}

impl Drop for BenchDatabase {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// `admin_url` with its database replaced by `name` (the query, if any, is kept).
fn database_url(admin_url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = match admin_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (admin_url, None),
    };
    let authority = base
        .find("://")
        .filter(|_| base.starts_with("postgres"))
        .context("--postgres takes a postgres://USER@HOST:PORT/DATABASE URL")?
        + 3;
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    let mut url = format!("{}/{name}", &base[..path]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    Ok(url)
}

/// The cluster scenario: one node on SQLite, then for each count N of `options.nodes`, N nodes
/// on a fresh PostgreSQL database.
async fn cluster(options: &BenchOptions) -> anyhow::Result<Vec<Figures>> {
    let admin_url = options
        .postgres
        .as_deref()
        .context("the cluster scenario needs --postgres ADMIN_URL")?;
    if options.nodes.is_empty() || options.nodes.contains(&0) {
        bail!("--nodes takes node counts of at least 1");
    }
    let sqlite = spawn_baton(BENCH_CONFIG, None).await?;
    let mut results = vec![measure_cluster("sqlite, 1 node", &[sqlite], options).await?];
    for &count in &options.nodes {
        let name = format!(
            "postgres, {count} node{}",
            if count == 1 { "" } else { "s" }
        );
        let database = BenchDatabase::create(admin_url).await?;
        let measured = async {
            let mut nodes = Vec::with_capacity(count);
            for _ in 0..count {
                nodes.push(spawn_baton(BENCH_CONFIG, Some(&database.url)).await?);
            }
            measure_cluster(&name, &nodes, options).await
            // The nodes are killed here, before their database goes.
        }
        .await;
        let removed = database.remove().await;
        results.push(measured?);
        removed?;
    }
    Ok(results)
}

/// The throughput load over `nodes` (worker i posts to node i % N) while each node has a
/// WebSocket subscriber on each of the first [`WATCHED_SESSIONS`] sessions.
async fn measure_cluster(
    name: &str,
    nodes: &[Spawned],
    options: &BenchOptions,
) -> anyhow::Result<Figures> {
    let urls: Vec<&str> = nodes.iter().map(|n| n.url.as_str()).collect();
    for url in &urls {
        wait_healthy(url).await?;
    }
    let watched = WATCHED_SESSIONS.min(options.sessions);
    eprintln!(
        "[{name}] cluster: {} sessions over {} node(s), {} s; {watched} sessions watched from every node",
        options.sessions,
        urls.len(),
        options.duration_s
    );
    // Subscribed before the load starts, so every event of theirs is live.
    let mut sockets = Vec::with_capacity(watched * urls.len());
    for session in 0..watched {
        for (node, url) in urls.iter().enumerate() {
            let (socket, _) =
                tokio_tungstenite::connect_async(session_ws_url(url, &throughput_session(session)))
                    .await
                    .with_context(|| format!("subscribing on {url}"))?;
            // The session's tasks run on the node its worker posts to.
            sockets.push((node != session % urls.len(), socket));
        }
    }
    let window = Window::after_warmup(Duration::from_secs_f64(options.duration_s));
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|(remote, socket)| (remote, tokio::spawn(receive_events(socket, window))))
        .collect();
    let throughput = throughput(&urls, options.sessions, window).await?;
    let (mut received, mut remote) = (Vec::new(), Vec::new());
    for (is_remote, reader) in readers {
        let r = reader.await?;
        if is_remote {
            remote.push(r);
        } else {
            received.push(r);
        }
    }
    let remote_latency =
        Latencies::from_ms(remote.iter().flat_map(|r| r.latencies.iter().copied()));
    received.extend(remote);
    let mut delivery =
        Delivery::from(&received, window).context("no event reached the subscribers")?;
    delivery.remote_latency = remote_latency;
    Ok(Figures {
        name: name.to_string(),
        throughput: Some(throughput),
        delivery: Some(delivery),
        ..Figures::default()
    })
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn ratio(baton: f64, peer: f64) -> String {
    if peer > 0.0 {
        format!("{:.1}x", baton / peer)
    } else {
        "-".into()
    }
}

/// The figures as a Markdown table, one column per target; with exactly two targets and a
/// `ratio` header, a column of the first's ratio to the second.
fn report(results: &[Figures], ratio_header: Option<&str>) -> String {
    let mut out = String::new();
    let header = results
        .iter()
        .map(|f| f.name.as_str())
        .collect::<Vec<_>>()
        .join(" | ");
    let ratio_header = ratio_header.filter(|_| results.len() == 2);
    let with_ratio = ratio_header.is_some();
    out.push_str(&format!(
        "| figure | {header} |{}\n|---|{}{}\n",
        ratio_header.map_or(String::new(), |h| format!(" {h} |")),
        "---|".repeat(results.len()),
        if with_ratio { "---|" } else { "" }
    ));
    let mut row =
        |label: &str, cell: &dyn Fn(&Figures) -> Option<(String, f64)>, higher_is_better: bool| {
            let cells: Vec<Option<(String, f64)>> = results.iter().map(cell).collect();
            if cells.iter().all(Option::is_none) {
                return;
            }
            let text = cells
                .iter()
                .map(|c| c.as_ref().map_or("-".to_string(), |c| c.0.clone()))
                .collect::<Vec<_>>()
                .join(" | ");
            let ratio_cell = match (with_ratio, &cells[..]) {
                (true, [Some(b), Some(p)]) => {
                    let r = if higher_is_better {
                        ratio(b.1, p.1)
                    } else {
                        ratio(p.1, b.1)
                    };
                    format!(" {r} |")
                }
                (true, _) => " - |".to_string(),
                (false, _) => String::new(),
            };
            out.push_str(&format!("| {label} | {text} |{ratio_cell}\n"));
        };
    row(
        "(a) completed messages/s, 64 sessions, ?wait",
        &|f| {
            f.throughput
                .as_ref()
                .map(|t| (format!("{:.0}", t.per_second), t.per_second))
        },
        true,
    );
    row(
        "(a) latency p50",
        &|f| {
            f.throughput
                .as_ref()
                .map(|t| (ms(t.latency.p50), t.latency.p50.as_secs_f64()))
        },
        false,
    );
    row(
        "(a) latency p99",
        &|f| {
            f.throughput
                .as_ref()
                .map(|t| (ms(t.latency.p99), t.latency.p99.as_secs_f64()))
        },
        false,
    );
    row(
        "(a) messages completed in the window",
        &|f| {
            f.throughput
                .as_ref()
                .map(|t| (t.completed.to_string(), t.completed as f64))
        },
        true,
    );
    row(
        "(a) errors",
        &|f| {
            f.throughput
                .as_ref()
                .map(|t| (t.errors.to_string(), t.errors as f64))
        },
        false,
    );
    row(
        "(b) accept latency p50 (enqueue, 1 session)",
        &|f| f.accept.as_ref().map(|a| (ms(a.p50), a.p50.as_secs_f64())),
        false,
    );
    row(
        "(b) accept requests measured",
        &|f| {
            f.accept
                .as_ref()
                .map(|a| (a.count.to_string(), a.count as f64))
        },
        true,
    );
    row(
        "(b) accept latency p99",
        &|f| f.accept.as_ref().map(|a| (ms(a.p99), a.p99.as_secs_f64())),
        false,
    );
    row(
        "(b) accept latency max",
        &|f| f.accept.as_ref().map(|a| (ms(a.max), a.max.as_secs_f64())),
        false,
    );
    row(
        "(c) RSS after load",
        &|f| {
            f.memory.as_ref().map(|m| {
                (
                    format!(
                        "{:.1} MiB ({} x {})",
                        m.rss_after_kib as f64 / 1024.0,
                        m.sessions,
                        m.interactions
                    ),
                    m.rss_after_kib as f64,
                )
            })
        },
        false,
    );
    row(
        "(c) RSS at start",
        &|f| {
            f.memory.as_ref().map(|m| {
                (
                    format!("{:.1} MiB", m.rss_before_kib as f64 / 1024.0),
                    m.rss_before_kib as f64,
                )
            })
        },
        false,
    );
    row(
        "(c) load time",
        &|f| {
            f.memory
                .as_ref()
                .map(|m| (format!("{:.1} s", m.load_seconds), m.load_seconds))
        },
        false,
    );
    row(
        "(d) fan-out deliveries/s (1 session)",
        &|f| {
            f.fanout.as_ref().map(|x| {
                (
                    format!("{:.0} ({} subscribers)", x.per_second, x.subscribers),
                    x.per_second,
                )
            })
        },
        true,
    );
    row(
        "(d) delivery latency p50",
        &|f| {
            f.fanout
                .as_ref()
                .map(|x| (ms(x.latency.p50), x.latency.p50.as_secs_f64()))
        },
        false,
    );
    row(
        "(d) delivery latency p99",
        &|f| {
            f.fanout
                .as_ref()
                .map(|x| (ms(x.latency.p99), x.latency.p99.as_secs_f64()))
        },
        false,
    );
    row(
        "(e) server memory per idle WebSocket",
        &|f| {
            f.idle.as_ref().map(|x| {
                let per = x.rss_after_kib.saturating_sub(x.rss_before_kib) as f64
                    / x.connections.max(1) as f64;
                (format!("{per:.1} KiB ({} connections)", x.connections), per)
            })
        },
        false,
    );
    row(
        "(e) RSS with the idle connections",
        &|f| {
            f.idle.as_ref().map(|x| {
                (
                    format!("{:.1} MiB", x.rss_after_kib as f64 / 1024.0),
                    x.rss_after_kib as f64,
                )
            })
        },
        false,
    );
    row(
        "(g) events received/s, 8 sessions watched from every node",
        &|f| {
            f.delivery.as_ref().map(|x| {
                (
                    format!("{:.0} ({} subscribers)", x.per_second, x.subscribers),
                    x.per_second,
                )
            })
        },
        true,
    );
    for (which, remote) in [("", false), (", subscriber on another node", true)] {
        let of = |f: &Figures| {
            let x = f.delivery.as_ref()?;
            let l = if remote {
                x.remote_latency.as_ref()?
            } else {
                &x.latency
            };
            Some((l.p50, l.p99))
        };
        row(
            &format!("(g) delivery latency (`at` → receipt){which}, p50"),
            &|f| of(f).map(|(p50, _)| (ms(p50), p50.as_secs_f64())),
            false,
        );
        row(
            &format!("(g) delivery latency (`at` → receipt){which}, p99"),
            &|f| of(f).map(|(_, p99)| (ms(p99), p99.as_secs_f64())),
            false,
        );
    }
    row(
        "(g) seq gaps / duplicates, all subscribers",
        &|f| {
            f.delivery.as_ref().map(|x| {
                (
                    format!("{} / {}", x.gaps, x.duplicates),
                    (x.gaps + x.duplicates) as f64,
                )
            })
        },
        false,
    );
    row(
        "(g) subscribers closed early by the server",
        &|f| {
            f.delivery
                .as_ref()
                .map(|x| (x.closed_early.to_string(), x.closed_early as f64))
        },
        false,
    );
    for kind in ["echo", "command", "openai"] {
        let of = |f: &Figures| {
            f.cancel
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, l)| (l.p50, l.p99))
        };
        row(
            &format!("(f) cancel → task.cancelled, {kind} agent, p50"),
            &|f| of(f).map(|(p50, _)| (ms(p50), p50.as_secs_f64())),
            false,
        );
        row(
            &format!("(f) cancel → task.cancelled, {kind} agent, p99"),
            &|f| of(f).map(|(_, p99)| (ms(p99), p99.as_secs_f64())),
            false,
        );
    }
    row(
        "(f) command agent: signal → process group gone (server), p50 bucket",
        &|f| {
            f.process_stops
                .map(|(n, p50, _)| (format!("≤ {p50} ms ({n} stops)"), p50))
        },
        false,
    );
    row(
        "(f) command agent: signal → process group gone (server), p99 bucket",
        &|f| {
            f.process_stops
                .map(|(_, _, p99)| (format!("≤ {p99} ms"), p99))
        },
        false,
    );
    out
}

/// Runs the benchmark and prints a Markdown table to stdout.
/// The single-server scenarios, then the cluster scenario: a table each.
pub async fn run(options: BenchOptions) -> anyhow::Result<()> {
    if options.wants_single_server() {
        let mut results = Vec::new();
        match &options.server {
            Some(url) => {
                wait_healthy(url).await?;
                results.push(measure("server", url, None, &options, false).await?);
            }
            None => {
                let llm = spawn_mock_llm().await?;
                let config = BENCH_CONFIG.to_string() + &real_agents_config(&llm);
                let baton = spawn_baton(&config, None).await?;
                results.push(measure("baton", &baton.url, baton.pid(), &options, true).await?);
                drop(baton);
            }
        }
        if let Some(peer_dir) = &options.peer_dir {
            let peer = spawn_peer(peer_dir, &options.peer_python).await?;
            results.push(measure("seed-py peer", &peer.url, peer.pid(), &options, false).await?);
            drop(peer);
        }
        crate::cli::out(&format!("{}\n", report(&results, Some("baton / peer"))))?;
    }
    if options.wants(CLUSTER) {
        let results = cluster(&options).await?;
        crate::cli::out(&format!("{}\n", report(&results, None)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_replaces_only_the_database() {
        let url = |admin| database_url(admin, "b").ok();
        assert_eq!(
            url("postgres://postgres@127.0.0.1:5432/postgres").as_deref(),
            Some("postgres://postgres@127.0.0.1:5432/b")
        );
        assert_eq!(
            url("postgresql://u:p@h/db?sslmode=disable").as_deref(),
            Some("postgresql://u:p@h/b?sslmode=disable")
        );
        assert_eq!(
            url("postgres://h:5432").as_deref(),
            Some("postgres://h:5432/b")
        );
        assert_eq!(url("host=h user=u"), None);
    }

    #[test]
    fn number_after_reads_the_field() {
        let frame = r#"{"kind":"event","seq":42,"session":"s","type":"task.delta"}"#;
        assert_eq!(number_after(frame, "\"seq\":"), Some(42));
        assert_eq!(number_after(frame, "\"last_seq\":"), None);
    }
}
