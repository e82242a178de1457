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
//! - **streams**: N sessions (`--streams`, 1,000 by default), one WebSocket subscriber each,
//!   all streaming at once from an echo agent paced like an LLM (`[agents.paced]`, a word every
//!   `--stream-delay-ms`, 20 ms = 50 words/s); each session gets `--stream-messages` messages
//!   (3) of `--stream-words` words (50), the next posted when the previous one's final event
//!   reaches the subscriber. Figures: the pace each subscriber received between a reply's
//!   first and last word, as a share of the agent's (p50, and p5 = the slowest 5 % of the
//!   streams), delivery latency (`at` → receipt) and first-delta latency (POST → first
//!   `task.delta`), p50 and p99. `baton bench --only streams`; against `--server URL`, that
//!   server needs the `paced` agent.
//! - **ask**: the waiting-for-input round trip with a `command` agent: answer → `task.resumed`
//!   → the first delta of the resumed run (the program's start-up reported separately).
//! - **auth** (`--only auth`): the throughput load against an open server and one where every
//!   request carries an API key, in alternating rounds; and the in-process cost of checking a
//!   key and a session token.
//! - **fanout-burst** (`--only fanout-burst`, issue 17): the per-delta cost of fan-out. One
//!   session, `--burst-subscribers` (50) WebSocket subscribers reading everything (resuming
//!   after a `1013`), the instant echo of a message of `--burst-words` (50,000) words: POST →
//!   final event at every subscriber, against the same message with nobody listening; frames/s,
//!   resumes and seq faults.
//! - **noisy** (`--only noisy`, issue 17, I9): a noisy neighbour. Access control on, two tenant
//!   keys; tenant A's session gets the fan-out burst above, storm after storm, while tenant B
//!   makes small requests (GET session, PATCH context, a short message with `?wait`) at 20/s:
//!   tenant B's latency p50/p99 without the storm and during it.
//! - **cluster** (with `--postgres ADMIN_URL`): the throughput load spread over N `baton serve`
//!   nodes sharing one fresh PostgreSQL database (and, for comparison, over one node on
//!   SQLite), with WebSocket subscribers on every node measuring cross-node delivery.
//!
//! # Layout
//!
//! One module per scenario, each with its figures, its load and its rows of the report:
//! `throughput`, `accept`, `memory`, `fanout`, `idle`, `cancel` (with the mock LLM),
//! `streams` (a folder: the scenario, and `stream`, one session's messages and what its
//! subscriber saw), `burst` (fanout-burst, and the subscribers it shares with `noisy`),
//! `noisy`, `cluster`. Beside them: `spawn` starts the servers and reads their
//! memory, `ws` holds the WebSocket subscriber's frame parsing (and the whole subscriber of
//! the fan-out and cluster scenarios), `report` writes the table. This module says what runs,
//! in which order.

mod accept;
mod ask;
mod auth;
mod burst;
mod cancel;
mod cluster;
mod fanout;
mod http;
mod idle;
mod memory;
mod noisy;
mod report;
mod spawn;
mod streams;
mod throughput;
mod ws;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use accept::accept_latency;
use cancel::{cancel_latency, real_agents_config, spawn_mock_llm, stop_buckets, stop_quantiles};
use cluster::cluster;
use fanout::fanout;
use idle::{Idle, idle};
use memory::{Memory, memory};
use report::Table;
use spawn::{spawn_baton, spawn_peer, wait_healthy};
use streams::{Streams, StreamsPlan, paced_agent_config, streams};
use throughput::{Throughput, throughput};
use ws::Delivery;

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
    /// Ask/answer round trips of the ask scenario (0 skips it).
    pub ask_rounds: usize,
    /// Sessions of the streams scenario, one WebSocket subscriber each (0 skips it).
    pub streams: usize,
    /// Messages sent to each of them, one after another, and words per message.
    pub stream_messages: usize,
    pub stream_words: usize,
    /// The paced echo agent's pause before each word, in ms (20: 50 words/s).
    pub stream_delay_ms: u64,
    /// Subscribers and words of the fan-out burst and noisy-neighbour scenarios.
    pub burst_subscribers: usize,
    pub burst_words: usize,
    /// PostgreSQL URL of a role that may create databases: enables the cluster scenario, which
    /// creates a fresh database on it per configuration and drops it afterwards.
    pub postgres: Option<String>,
    /// Node counts of the cluster scenario.
    pub nodes: Vec<usize>,
    /// Which scenarios to run (`throughput`, `accept`, `memory`, `fanout`, `idle`, `cancel`,
    /// `streams`, `ask`, `auth`, `fanout-burst`, `noisy`, `cluster`); empty means all but
    /// `auth`, `fanout-burst` and `noisy` (`cluster` only when `postgres` is given).
    pub only: Vec<String>,
}

impl BenchOptions {
    fn wants(&self, scenario: &str) -> bool {
        self.only.iter().any(|o| o == scenario)
            || (self.only.is_empty()
                && !ON_REQUEST.contains(&scenario)
                && (scenario != CLUSTER || self.postgres.is_some()))
    }

    /// Whether any scenario of the shared single server is to run (all but `cluster`,
    /// `ask` and those on request, which start servers of their own).
    fn wants_single_server(&self) -> bool {
        self.only.is_empty()
            || self
                .only
                .iter()
                .any(|o| o != CLUSTER && o != "ask" && !ON_REQUEST.contains(&o.as_str()))
    }
}

const CLUSTER: &str = "cluster";
/// Access control's cost: only on request (`--only auth`), as it starts servers of its own.
const AUTH: &str = "auth";
const FANOUT_BURST: &str = "fanout-burst";
const NOISY: &str = "noisy";
/// The `http` agent kind's cost beside `echo` and `command`.
const HTTP: &str = "http";
/// Scenarios that start servers of their own and run only when named in `--only`.
const ON_REQUEST: [&str; 4] = [AUTH, FANOUT_BURST, NOISY, HTTP];

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
    /// The streams scenario, or why it could not run on this target.
    streams: Option<Result<Streams, String>>,
}

#[derive(Debug, Clone)]
struct Latencies {
    count: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

/// `default` answers at once; `stream` streams a word per millisecond (the fan-out scenario).
const BENCH_CONFIG: &str = "queue_limit = 100000\n\n\
    [agents.default]\nkind = \"echo\"\ndelay_ms = 0\n\n\
    [agents.stream]\nkind = \"echo\"\ndelay_ms = 1\n\n\
    [agents.slow]\nkind = \"echo\"\ndelay_ms = 20\n";

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
                None,
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
    if wants("streams") && options.streams > 0 {
        eprintln!(
            "[{name}] streams: {} sessions x {} messages of {} words, a word every {} ms",
            options.streams, options.stream_messages, options.stream_words, options.stream_delay_ms
        );
        let plan = StreamsPlan {
            streams: options.streams,
            messages: options.stream_messages,
            words: options.stream_words,
            delay: Duration::from_millis(options.stream_delay_ms),
        };
        // A target that cannot run it (say, a server without the paced agent) says why in
        // the table; the other figures stand.
        figures.streams = Some(streams(url, plan).await.map_err(|e| {
            eprintln!("[{name}] streams not measured: {e:#}");
            format!("{e:#}")
        }));
    }
    Ok(figures)
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
                let config = BENCH_CONFIG.to_string()
                    + &real_agents_config(&llm)
                    + &paced_agent_config(options.stream_delay_ms);
                let baton = spawn_baton(&config, None).await?;
                results.push(measure("baton", &baton.url, baton.pid(), &options, true).await?);
                drop(baton);
            }
        }
        if let Some(peer_dir) = &options.peer_dir {
            let config = BENCH_CONFIG.to_string() + &paced_agent_config(options.stream_delay_ms);
            let peer = spawn_peer(peer_dir, &options.peer_python, &config).await?;
            results.push(measure("seed-py peer", &peer.url, peer.pid(), &options, false).await?);
            drop(peer);
        }
        baton::cli::out(&format!("{}\n", report(&results, Some("baton / peer"))))?;
    }
    if options.wants("ask") && options.server.is_none() && options.ask_rounds > 0 {
        eprintln!(
            "[baton] ask/answer round trip: {} rounds",
            options.ask_rounds
        );
        let table = ask::ask(options.ask_rounds).await?;
        baton::cli::out(&format!("{table}\n"))?;
    }
    if options.wants(AUTH) && options.server.is_none() {
        let table = auth::auth(&options).await?;
        baton::cli::out(&format!("{table}\n"))?;
    }
    if options.wants(FANOUT_BURST) && options.server.is_none() {
        let table = burst::fanout_burst(&options).await?;
        baton::cli::out(&format!("{table}\n"))?;
    }
    if options.wants(NOISY) && options.server.is_none() {
        let table = noisy::noisy(&options).await?;
        baton::cli::out(&format!("{table}\n"))?;
    }
    if options.wants(HTTP) && options.server.is_none() {
        let table = http::http(&options).await?;
        baton::cli::out(&format!("{table}\n"))?;
    }
    if options.wants(CLUSTER) {
        let results = cluster(&options).await?;
        baton::cli::out(&format!("{}\n", report(&results, None)))?;
    }
    Ok(())
}

/// The figures as a Markdown table (see [`Table::new`]), each scenario's rows in this order.
fn report(results: &[Figures], ratio_header: Option<&str>) -> String {
    let mut table = Table::new(results, ratio_header);
    throughput::rows(&mut table);
    accept::rows(&mut table);
    memory::rows(&mut table);
    fanout::rows(&mut table);
    idle::rows(&mut table);
    cluster::rows(&mut table);
    cancel::rows(&mut table);
    streams::rows(&mut table);
    table.finish()
}
