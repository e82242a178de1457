//! One stream of the streams scenario: its messages posted one after another on its session,
//! and what its WebSocket subscriber saw of each reply — every event's delivery latency, the
//! first word's latency, the pace of the words, the continuity of seqs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use super::StreamsPlan;
use crate::bench::ws::{SeqCheck, delivery_ms, string_after};

/// Bound on closing a socket at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What one stream's subscriber saw.
#[derive(Debug, Default)]
pub(super) struct StreamRun {
    /// Every event: `at` → receipt, in ms.
    pub(super) delivery_ms: Vec<u32>,
    /// Each reply: the POST → its first `task.delta`.
    pub(super) first_deltas: Vec<Duration>,
    /// Words received after each reply's first one, and the time from its first word to its
    /// last, summed over the replies.
    pub(super) paced_words: u64,
    pub(super) paced_time: Duration,
    pub(super) completed: usize,
    pub(super) seqs: SeqCheck,
    /// Why the stream was given up.
    pub(super) failure: Option<String>,
}

impl StreamRun {
    /// Words per second received while the replies streamed (`None` before a whole reply).
    pub(super) fn pace(&self) -> Option<f64> {
        (self.paced_words > 0 && !self.paced_time.is_zero())
            .then(|| self.paced_words as f64 / self.paced_time.as_secs_f64())
    }
}

/// One stream: from `first_at`, its messages one after another, each read on `socket` until
/// its final event; then the socket is closed.
pub(super) async fn run_stream(
    http: reqwest::Client,
    target: String,
    body: Arc<str>,
    mut socket: Socket,
    plan: StreamsPlan,
    first_at: Instant,
) -> StreamRun {
    let mut run = StreamRun::default();
    tokio::time::sleep_until(first_at.into()).await;
    for reply in 1..=plan.messages {
        if let Err(e) = one_reply(&http, &target, &body, &mut socket, plan, &mut run).await {
            run.failure = Some(format!("reply {reply}: {e:#}"));
            break;
        }
        run.completed += 1;
    }
    // Bounded: a server that does not answer the close handshake is not waited for.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.close(None)).await;
    run
}

/// Posts one message and reads the socket until both the POST was answered and the reply's
/// final event arrived, recording what the subscriber saw in `run`.
async fn one_reply(
    http: &reqwest::Client,
    target: &str,
    body: &str,
    socket: &mut Socket,
    plan: StreamsPlan,
    run: &mut StreamRun,
) -> anyhow::Result<()> {
    let sent = Instant::now();
    let post = async {
        let answer = http
            .post(target)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        let status = answer.status();
        let text = answer.text().await?;
        if !status.is_success() {
            bail!("the message was answered {status} {text}");
        }
        anyhow::Ok(())
    };
    tokio::pin!(post);
    let deadline = tokio::time::sleep(plan.reply_timeout());
    tokio::pin!(deadline);
    let (mut posted, mut finished) = (false, false);
    let mut deltas = 0usize;
    // Receipt of the reply's first and last words.
    let mut words: Option<(Instant, Instant)> = None;
    while !(posted && finished) {
        let message = tokio::select! {
            _ = &mut deadline => bail!("not final within {:?}", plan.reply_timeout()),
            answer = &mut post, if !posted => {
                answer?;
                posted = true;
                continue;
            }
            message = socket.next(), if !finished => message,
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => bail!("the server closed the socket: {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => bail!("the socket failed: {e}"),
            None => bail!("the socket closed"),
        };
        let receipt = baton::model::Millis::now();
        let now = Instant::now();
        if text.starts_with("{\"kind\":\"hello\"") {
            run.seqs.hello(&text);
            continue;
        }
        if !text.starts_with("{\"kind\":\"event\"") {
            continue;
        }
        run.seqs.event(&text);
        if let Some(ms) = delivery_ms(&text, receipt) {
            run.delivery_ms.push(ms);
        }
        match string_after(&text, "\"type\":\"") {
            Some("task.delta") => {
                deltas += 1;
                match &mut words {
                    None => {
                        run.first_deltas.push(now - sent);
                        words = Some((now, now));
                    }
                    Some((_, last)) => *last = now,
                }
            }
            Some(kind @ ("task.completed" | "task.failed" | "task.cancelled")) => {
                if kind != "task.completed" {
                    bail!("the reply ended with {kind}");
                }
                if deltas != plan.words {
                    bail!("{deltas} of {} words arrived", plan.words);
                }
                if let Some((first, last)) = words {
                    run.paced_words += (deltas - 1) as u64;
                    run.paced_time += last - first;
                }
                finished = true;
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_counts_the_words_after_each_first_over_their_time() {
        let run = StreamRun {
            paced_words: 2 * 49,
            paced_time: Duration::from_millis(2 * 980),
            ..StreamRun::default()
        };
        let pace = run.pace().map(|p| (p * 1000.0).round() / 1000.0);
        assert_eq!(pace, Some(50.0));
        assert_eq!(StreamRun::default().pace(), None);
    }
}
