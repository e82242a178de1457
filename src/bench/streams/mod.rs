//! Scenario (h), LLM-paced streams: N sessions, each with one WebSocket subscriber and an echo
//! agent paced like an LLM (a pause of `delay_ms` before each word: 20 ms is 50 words/s). Each
//! session is sent R messages of W words, one after another: the next is posted when the
//! previous one's final event has reached the subscriber. Figures: the pace each subscriber
//! received while its replies streamed, as a share of the agent's (p50, and p5: the slowest
//! 5 % of the streams), the delivery latency of every event (its `at` → receipt), and the
//! first-delta latency (the message's POST → its first `task.delta` on the socket).

mod stream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use stream::{Socket, StreamRun, run_stream};

use super::report::{Table, ms};
use super::ws::session_ws_url;
use super::{Figures, Latencies, http_client};

/// The agent of the stream sessions, configured by [`paced_agent_config`].
const PACED_AGENT: &str = "paced";

/// The `[agents.paced]` section: an echo that pauses `delay_ms` before each word.
pub(super) fn paced_agent_config(delay_ms: u64) -> String {
    format!("\n[agents.{PACED_AGENT}]\nkind = \"echo\"\ndelay_ms = {delay_ms}\n")
}

/// Sessions created, and sockets opened, at a time: the client does not stampede the server.
const CONNECT_BATCH: usize = 100;

/// Bound on opening one socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The streams' first messages are spread evenly over one reply's nominal length, at most this
/// long, so the agents' words do not all fall due at the same instants.
const RAMP: Duration = Duration::from_secs(1);

/// What the scenario runs.
#[derive(Debug, Clone, Copy)]
pub(super) struct StreamsPlan {
    pub(super) streams: usize,
    /// Messages per stream, one after another.
    pub(super) messages: usize,
    /// Words per message: the echo agent streams one `task.delta` per word.
    pub(super) words: usize,
    /// The agent's pause before each word.
    pub(super) delay: Duration,
}

impl StreamsPlan {
    /// The agent's words per second.
    fn nominal_pace(&self) -> f64 {
        1.0 / self.delay.as_secs_f64()
    }

    /// How long one reply takes at the agent's pace.
    fn reply_length(&self) -> Duration {
        self.delay.mul_f64(self.words as f64)
    }

    /// How long a reply may take before its stream is given up.
    fn reply_timeout(&self) -> Duration {
        Duration::from_secs(30) + self.reply_length() * 4
    }
}

/// Figures of the scenario.
#[derive(Debug, Clone)]
pub(super) struct Streams {
    pub(super) streams: usize,
    /// The agent's words per second.
    pub(super) nominal_pace: f64,
    /// The pace each stream received, in % of the agent's: the median and the 5th percentile
    /// over the streams.
    pub(super) pace_p50: f64,
    pub(super) pace_p5: f64,
    /// Every event, its `at` (millisecond precision) → its receipt.
    pub(super) delivery: Latencies,
    /// Each message's POST → its first `task.delta` on the socket.
    pub(super) first_delta: Latencies,
    pub(super) replies_expected: usize,
    /// Replies that completed with all their words.
    pub(super) replies_completed: usize,
    /// Streams given up before their last reply (socket closed, message refused, a reply
    /// not final in time, failed, or short of words).
    pub(super) given_up: usize,
    pub(super) gaps: u64,
    pub(super) duplicates: u64,
}

/// The value at quantile `q` of ascending `sorted` (nearest rank, as [`Latencies`] does).
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    Some(sorted[(last as f64 * q).round() as usize])
}

/// Runs the scenario against the server at `url`, which must have the `paced` agent.
pub(super) async fn streams(url: &str, plan: StreamsPlan) -> anyhow::Result<Streams> {
    if plan.delay.is_zero() {
        bail!("--stream-delay-ms must be at least 1: the pace is measured against the agent's");
    }
    if plan.words < 2 || plan.messages == 0 {
        bail!("--stream-words must be at least 2 and --stream-messages at least 1");
    }
    let http = http_client(CONNECT_BATCH)?;
    let sessions: Vec<String> = (0..plan.streams)
        .map(|i| format!("bench-stream-{i}"))
        .collect();
    for batch in sessions.chunks(CONNECT_BATCH) {
        let created =
            futures_util::future::join_all(batch.iter().map(|s| create_session(&http, url, s)))
                .await;
        created.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    }
    let mut sockets = Vec::with_capacity(plan.streams);
    for batch in sessions.chunks(CONNECT_BATCH) {
        let opened = futures_util::future::join_all(batch.iter().map(|s| subscribe(url, s))).await;
        for socket in opened {
            sockets.push(socket?);
        }
    }
    let content = (0..plan.words)
        .map(|i| format!("word{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let body: Arc<str> = serde_json::json!({ "content": content }).to_string().into();
    let spread = plan.reply_length().min(RAMP);
    let started = Instant::now();
    // Dropped on an early return: the streams still running are aborted with it.
    let mut running = tokio::task::JoinSet::new();
    for (i, (session, socket)) in sessions.iter().zip(sockets).enumerate() {
        let first_at = started + spread.mul_f64(i as f64 / plan.streams as f64);
        running.spawn(run_stream(
            http.clone(),
            format!("{url}/v1/sessions/{session}/messages"),
            body.clone(),
            socket,
            plan,
            first_at,
        ));
    }
    let mut runs = Vec::with_capacity(plan.streams);
    while let Some(run) = running.join_next().await {
        runs.push(run?);
    }
    summarize(&runs, plan)
}

/// The figures of the streams' runs.
fn summarize(runs: &[StreamRun], plan: StreamsPlan) -> anyhow::Result<Streams> {
    let failures: Vec<&str> = runs.iter().filter_map(|r| r.failure.as_deref()).collect();
    if let Some(first) = failures.first() {
        eprintln!(
            "streams: {} of {} streams given up; the first: {first}",
            failures.len(),
            runs.len()
        );
    }
    let mut paces: Vec<f64> = runs
        .iter()
        .filter_map(StreamRun::pace)
        .map(|pace| 100.0 * pace / plan.nominal_pace())
        .collect();
    paces.sort_by(f64::total_cmp);
    let no_reply = || match failures.first() {
        Some(first) => format!("no stream received a whole reply (the first failure: {first})"),
        None => "no stream received a whole reply".to_string(),
    };
    Ok(Streams {
        streams: runs.len(),
        nominal_pace: plan.nominal_pace(),
        pace_p50: quantile(&paces, 0.50).with_context(no_reply)?,
        pace_p5: quantile(&paces, 0.05).with_context(no_reply)?,
        delivery: Latencies::from_ms(runs.iter().flat_map(|r| r.delivery_ms.iter().copied()))
            .with_context(no_reply)?,
        first_delta: Latencies::from(runs.iter().flat_map(|r| r.first_deltas.clone()).collect())
            .with_context(no_reply)?,
        replies_expected: runs.len() * plan.messages,
        replies_completed: runs.iter().map(|r| r.completed).sum(),
        given_up: failures.len(),
        gaps: runs.iter().map(|r| r.seqs.gaps).sum(),
        duplicates: runs.iter().map(|r| r.seqs.duplicates).sum(),
    })
}

async fn create_session(http: &reqwest::Client, url: &str, session: &str) -> anyhow::Result<()> {
    let created = http
        .put(format!("{url}/v1/sessions/{session}"))
        .json(&serde_json::json!({ "agent": PACED_AGENT }))
        .send()
        .await
        .context("creating a stream session")?;
    let status = created.status();
    if !status.is_success() {
        let answer = created.text().await.unwrap_or_default();
        bail!(
            "creating a session of agent `{PACED_AGENT}` answered {status} {answer} \
             (the server needs an [agents.{PACED_AGENT}] echo agent)"
        );
    }
    Ok(())
}

async fn subscribe(url: &str, session: &str) -> anyhow::Result<Socket> {
    let (socket, _) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::connect_async(session_ws_url(url, session)),
    )
    .await
    .context("a subscriber did not connect in 30 s")?
    .context("connecting a subscriber")?;
    Ok(socket)
}

/// The report's rows of the streams scenario, (h).
pub(super) fn rows(table: &mut Table) {
    fn of(f: &Figures) -> Option<&Streams> {
        f.streams.as_ref()?.as_ref().ok()
    }
    table.row(
        "(h) streams not measured",
        &|f| match f.streams.as_ref()? {
            Err(why) => Some((why.clone(), 0.0)),
            Ok(_) => None,
        },
        false,
    );
    table.row(
        "(h) streams: pace received, p50 (% of the agent's)",
        &|f| {
            of(f).map(|s| {
                (
                    format!(
                        "{:.1} % of {:.0} words/s ({} streams)",
                        s.pace_p50, s.nominal_pace, s.streams
                    ),
                    s.pace_p50,
                )
            })
        },
        true,
    );
    table.row(
        "(h) streams: pace received, slowest 5 % of streams (p5)",
        &|f| of(f).map(|s| (format!("{:.1} %", s.pace_p5), s.pace_p5)),
        true,
    );
    table.row(
        "(h) streams: delivery latency (`at` → receipt), p50",
        &|f| of(f).map(|s| (ms(s.delivery.p50), s.delivery.p50.as_secs_f64())),
        false,
    );
    table.row(
        "(h) streams: delivery latency (`at` → receipt), p99",
        &|f| of(f).map(|s| (ms(s.delivery.p99), s.delivery.p99.as_secs_f64())),
        false,
    );
    table.row(
        "(h) streams: first delta (POST → first `task.delta`), p50",
        &|f| of(f).map(|s| (ms(s.first_delta.p50), s.first_delta.p50.as_secs_f64())),
        false,
    );
    table.row(
        "(h) streams: first delta (POST → first `task.delta`), p99",
        &|f| of(f).map(|s| (ms(s.first_delta.p99), s.first_delta.p99.as_secs_f64())),
        false,
    );
    table.row(
        "(h) streams: replies completed with every word / expected",
        &|f| {
            of(f).map(|s| {
                (
                    format!("{} / {}", s.replies_completed, s.replies_expected),
                    s.replies_completed as f64,
                )
            })
        },
        true,
    );
    table.row(
        "(h) streams given up / seq gaps / duplicates",
        &|f| {
            of(f).map(|s| {
                (
                    format!("{} / {} / {}", s.given_up, s.gaps, s.duplicates),
                    (s.given_up as u64 + s.gaps + s.duplicates) as f64,
                )
            })
        },
        false,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_takes_the_nearest_rank() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&sorted, 0.05), Some(6.0));
        assert_eq!(quantile(&sorted, 0.50), Some(51.0));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn summarize_reports_the_pace_as_a_share_of_the_agents() {
        let plan = StreamsPlan {
            streams: 2,
            messages: 1,
            words: 50,
            delay: Duration::from_millis(20),
        };
        let run = |time_ms: u64| StreamRun {
            delivery_ms: vec![1, 2],
            first_deltas: vec![Duration::from_millis(25)],
            paced_words: 49,
            paced_time: Duration::from_millis(time_ms),
            completed: 1,
            ..StreamRun::default()
        };
        let figures = summarize(&[run(980), run(1960)], plan).ok();
        let paces = figures.map(|s| (s.pace_p50.round(), s.pace_p5.round(), s.replies_completed));
        assert_eq!(paces, Some((100.0, 50.0, 2)));
    }
}
