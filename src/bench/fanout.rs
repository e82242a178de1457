//! Scenario (d), fan-out: one session, many WebSocket subscribers connected first, four
//! producers enqueueing 20-word messages to an echo agent streaming a word per millisecond;
//! deliveries per second summed over the subscribers, and delivery latency.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::report::{Table, ms};
use super::ws::{Delivery, receive_events, session_ws_url};
use super::{Window, http_client};

/// One session, `subscribers` WebSockets on it, producers streaming echo deltas into it.
pub(super) async fn fanout(
    url: &str,
    subscribers: usize,
    duration: Duration,
) -> anyhow::Result<Delivery> {
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

/// The report's rows of the fan-out scenario, (d).
pub(super) fn rows(table: &mut Table) {
    table.row(
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
    table.row(
        "(d) delivery latency p50",
        &|f| {
            f.fanout
                .as_ref()
                .map(|x| (ms(x.latency.p50), x.latency.p50.as_secs_f64()))
        },
        false,
    );
    table.row(
        "(d) delivery latency p99",
        &|f| {
            f.fanout
                .as_ref()
                .map(|x| (ms(x.latency.p99), x.latency.p99.as_secs_f64()))
        },
        false,
    );
}
