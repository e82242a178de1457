//! Scenario **fanout-burst** (issue 17): what fan-out costs per delta. One session whose
//! agent is the instant echo, `--burst-subscribers` WebSocket subscribers on it reading
//! everything (a subscriber closed with `1013` resumes with `after=`, as a client must), and a
//! message of `--burst-words` words: the time from its POST to its final event at *every*
//! subscriber, against the same message echoed with nobody listening; the event frames
//! delivered per second over the storm; resumes and seq faults (both should be 0).
//!
//! The [`Audience`] (the subscribers) and [`storm`] are shared with the noisy-neighbour
//! scenario, which repeats the storm while another tenant makes small requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

use super::report::ms;
use super::spawn::spawn_baton;
use super::ws::{number_after, session_ws_url, string_after};
use super::{BENCH_CONFIG, BenchOptions};

/// Storms measured with the subscribers (after one with nobody listening).
const STORMS: usize = 2;
/// The longest one storm may take before the scenario gives up.
const STORM_TIMEOUT: Duration = Duration::from_secs(300);
/// Resumes one subscriber may make in a run (a bound, far above any sane figure).
const MAX_RESUMES: u64 = 10_000;

/// The content of a storm: `words` words (`w0 w1 …`), one delta each.
pub(super) fn storm_content(words: usize) -> String {
    let mut content = String::with_capacity(words * 7);
    for i in 0..words {
        if i > 0 {
            content.push(' ');
        }
        content.push_str(&format!("w{i}"));
    }
    content
}

/// Where a subscriber connects, and with which key.
#[derive(Clone)]
struct Target {
    ws_url: String,
    key: Option<String>,
}

/// What every subscriber of an audience counted.
#[derive(Default)]
pub(super) struct Counters {
    /// Event frames received.
    pub(super) frames: AtomicU64,
    /// `1013` closes followed by a resume.
    pub(super) resumes: AtomicU64,
    /// Seqs that did not follow the previous one by exactly 1 (a gap or a duplicate), and a
    /// `1013` whose `after` was not the last seq received.
    pub(super) faults: AtomicU64,
    /// Sockets the server closed otherwise (not `1013`) while the audience listened.
    pub(super) lost: AtomicU64,
}

/// Subscribers of one session reading every event for as long as they live.
pub(super) struct Audience {
    size: usize,
    /// One message per subscriber per `task.completed` it received: when.
    completed: mpsc::UnboundedReceiver<Instant>,
    pub(super) counters: Arc<Counters>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects and reads the hello: the session's `last_seq` then.
async fn connect(target: &Target, after: Option<i64>) -> anyhow::Result<(Socket, i64)> {
    let url = match after {
        Some(after) => format!("{}?after={after}", target.ws_url),
        None => target.ws_url.clone(),
    };
    let mut request = url.as_str().into_client_request()?;
    if let Some(key) = &target.key {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {key}").parse()?);
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .context("connecting a subscriber")?;
    let hello = tokio::time::timeout(Duration::from_secs(30), socket.next())
        .await
        .context("no hello")?
        .context("closed before hello")??;
    let Message::Text(hello) = hello else {
        bail!("the first frame was not hello");
    };
    let last_seq = number_after(&hello, "\"last_seq\":").context("hello without last_seq")?;
    Ok((socket, last_seq))
}

impl Audience {
    /// `size` subscribers of `session`, each connected (hello read) before this returns.
    pub(super) async fn open(
        url: &str,
        session: &str,
        size: usize,
        key: Option<&str>,
    ) -> anyhow::Result<Self> {
        Self::open_after(url, session, size, key, None).await
    }

    /// The same, each replaying the stored events after `after` first when given.
    async fn open_after(
        url: &str,
        session: &str,
        size: usize,
        key: Option<&str>,
        after: Option<i64>,
    ) -> anyhow::Result<Self> {
        let target = Target {
            ws_url: session_ws_url(url, session),
            key: key.map(str::to_string),
        };
        let (done, completed) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        let mut tasks = Vec::with_capacity(size);
        for _ in 0..size {
            let (socket, last_seq) = connect(&target, after).await?;
            tasks.push(tokio::spawn(subscriber(
                target.clone(),
                socket,
                after.unwrap_or(last_seq),
                counters.clone(),
                done.clone(),
                stop.clone(),
            )));
        }
        Ok(Self {
            size,
            completed,
            counters,
            stop,
            tasks,
        })
    }

    /// Waits until every subscriber has received one more `task.completed`; when the last
    /// one did.
    async fn all_completed(&mut self) -> anyhow::Result<Instant> {
        let mut last = None;
        for _ in 0..self.size {
            let at = tokio::time::timeout(STORM_TIMEOUT, self.completed.recv())
                .await
                .context("a subscriber did not get the final event in time")?
                .context("the subscribers stopped")?;
            last = Some(last.map_or(at, |l: Instant| l.max(at)));
        }
        last.context("no subscriber")
    }

    /// Stops the subscribers and waits for them.
    pub(super) async fn close(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// One subscriber: counts frames, checks that each seq follows the last, reports each
/// `task.completed`, and resumes after a `1013` from the seq it names.
async fn subscriber(
    target: Target,
    mut socket: Socket,
    mut last_seq: i64,
    counters: Arc<Counters>,
    done: mpsc::UnboundedSender<Instant>,
    stop: CancellationToken,
) {
    let mut resumes = 0u64;
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return,
            message = socket.next() => message,
        };
        match message {
            Some(Ok(Message::Text(text))) => {
                // Scanned, not parsed, as the other scenarios' subscribers do: on a machine
                // shared with the server, a full JSON parse of 2.5 million frames would
                // measure the load generator more than the server.
                if !text.starts_with("{\"kind\":\"event\"") {
                    continue;
                }
                counters.frames.fetch_add(1, Ordering::Relaxed);
                if let Some(seq) = number_after(&text, "\"seq\":") {
                    if seq != last_seq + 1 {
                        counters.faults.fetch_add(1, Ordering::Relaxed);
                    }
                    last_seq = last_seq.max(seq);
                }
                if string_after(&text, "\"type\":\"") == Some("task.completed") {
                    let _ = done.send(Instant::now());
                }
            }
            Some(Ok(Message::Close(Some(frame)))) if u16::from(frame.code) == 1013 => {
                let after = frame
                    .reason
                    .strip_prefix("after=")
                    .and_then(|n| n.parse::<i64>().ok());
                if after != Some(last_seq) {
                    counters.faults.fetch_add(1, Ordering::Relaxed);
                }
                resumes += 1;
                counters.resumes.fetch_add(1, Ordering::Relaxed);
                if resumes > MAX_RESUMES {
                    counters.lost.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                match connect(&target, Some(after.unwrap_or(last_seq))).await {
                    Ok((resumed, _)) => socket = resumed,
                    Err(_) => {
                        counters.lost.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                if !stop.is_cancelled() {
                    counters.lost.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        }
    }
}

/// Posts `content` to `session` (policy `enqueue`, no wait) and waits for its final event at
/// every subscriber of `audience`: the time from the POST to the last of them.
pub(super) async fn storm(
    http: &reqwest::Client,
    url: &str,
    session: &str,
    content: &str,
    key: Option<&str>,
    audience: &mut Audience,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut request = http
        .post(format!("{url}/v1/sessions/{session}/messages"))
        .json(&serde_json::json!({"content": content, "policy": "enqueue"}));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let answer = request.send().await?;
    if !answer.status().is_success() {
        bail!("posting the storm answered {}", answer.status());
    }
    let last = audience.all_completed().await?;
    Ok(last - started)
}

/// Posts `content` with `?wait=` to a session nobody listens to: the time to its answer.
async fn alone(http: &reqwest::Client, url: &str, content: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let answer = http
        .post(format!(
            "{url}/v1/sessions/bench-burst-alone/messages?wait=300"
        ))
        .json(&serde_json::json!({"content": content}))
        .send()
        .await?;
    let body: serde_json::Value = answer.json().await?;
    if body["status"] != "completed" {
        bail!("the storm with nobody listening ended {}", body["status"]);
    }
    Ok(started.elapsed())
}

/// A client for the storms: a long timeout, as one storm may take minutes before the fix.
pub(super) fn storm_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().timeout(STORM_TIMEOUT).build()?)
}

/// Runs the scenario on a server of its own; its table.
pub(super) async fn fanout_burst(options: &BenchOptions) -> anyhow::Result<String> {
    let words = options.burst_words;
    let subscribers = options.burst_subscribers;
    let baton = spawn_baton(BENCH_CONFIG, None).await?;
    let url = baton.url.as_str();
    let http = storm_client()?;
    let content = storm_content(words);
    eprintln!("[fanout-burst] {words} words, nobody listening");
    let quiet = alone(&http, url, &content).await?;
    eprintln!("[fanout-burst] {subscribers} subscribers, {STORMS} storms of {words} words");
    let session = "bench-burst";
    let mut audience = Audience::open(url, session, subscribers, None).await?;
    let mut storms = Vec::with_capacity(STORMS);
    for round in 1..=STORMS {
        let before = audience.counters.frames.load(Ordering::Relaxed);
        let took = storm(&http, url, session, &content, None, &mut audience).await?;
        let frames = audience.counters.frames.load(Ordering::Relaxed) - before;
        eprintln!(
            "[fanout-burst] storm {round}: {} ({frames} frames)",
            ms(took)
        );
        storms.push((took, frames));
    }
    let counters = audience.counters.clone();
    audience.close().await;
    // The replay path: as many subscribers joining late, each replaying every stored event
    // of the storms (what a lagging subscriber does after its `1013`).
    eprintln!("[fanout-burst] {subscribers} subscribers replaying the {STORMS} storms");
    let started = Instant::now();
    let mut late = Audience::open_after(url, session, subscribers, None, Some(0)).await?;
    for _ in 0..STORMS {
        late.all_completed().await?;
    }
    let replayed = started.elapsed();
    let replay_frames = late.counters.frames.load(Ordering::Relaxed);
    let replay_faults = late.counters.faults.load(Ordering::Relaxed);
    late.close().await;
    drop(baton);
    let mut out = format!(
        "| fanout-burst: {words} words, instant echo | figure |\n|---|---|\n\
         | nobody listening: POST → completed (`?wait`) | {} |\n",
        ms(quiet)
    );
    for (round, (took, frames)) in storms.iter().enumerate() {
        out.push_str(&format!(
            "| storm {}: POST → final event at all {subscribers} subscribers | {} ({frames} \
             frames, {:.0} frames/s) |\n",
            round + 1,
            ms(*took),
            *frames as f64 / took.as_secs_f64()
        ));
    }
    out.push_str(&format!(
        "| replay: {subscribers} subscribers connecting with after=0, to the last final event \
         | {} ({replay_frames} frames, {:.0} frames/s, {replay_faults} seq faults) |\n",
        ms(replayed),
        replay_frames as f64 / replayed.as_secs_f64()
    ));
    out.push_str(&format!(
        "| 1013 closes, each resumed with after= | {} |\n\
         | seq faults (gaps, duplicates, a wrong after=) | {} |\n\
         | sockets lost otherwise | {} |\n",
        counters.resumes.load(Ordering::Relaxed),
        counters.faults.load(Ordering::Relaxed),
        counters.lost.load(Ordering::Relaxed),
    ));
    Ok(out)
}
