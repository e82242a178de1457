//! Scenario (f), cancellation: for a running task of an echo, a `command` (a shell that
//! honours SIGTERM) and an `openai` agent (streaming from a mock endpoint served here), the
//! time from the cancel request to the `task.cancelled` event on a WebSocket; and, from
//! `/metrics`, the server's time to stop the command agent's process group.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::report::{Table, ms};
use super::ws::{WsMessage, session_ws_url};
use super::{Figures, Latencies, http_client};

/// Baton's extra agents for the cancel scenario: a shell that streams a delta and then
/// waits (it honours SIGTERM), and an LLM streaming from the mock at `llm_url`.
pub(super) fn real_agents_config(llm_url: &str) -> String {
    let script = r#"printf '%s\n' '{"type":"delta","text":"go"}'; exec sleep 60"#;
    format!(
        "\n[agents.cmd]\nkind = \"command\"\nprogram = \"/bin/sh\"\nargs = [\"-c\", {script:?}]\n\
         \n[agents.llm]\nkind = \"openai\"\nbase_url = \"{llm_url}/v1\"\nmodel = \"bench\"\n"
    )
}

/// The cumulative buckets `(le, count)` of `baton_agent_process_stop_seconds` on `/metrics`.
pub(super) async fn stop_buckets(url: &str) -> anyhow::Result<Vec<(f64, u64)>> {
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
pub(super) fn stop_quantiles(
    before: &[(f64, u64)],
    after: &[(f64, u64)],
) -> Option<(u64, f64, f64)> {
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

/// Serves a mock OpenAI-compatible endpoint whose completions stream a chunk every 5 ms for
/// a minute; returns its base URL (without `/v1`).
pub(super) async fn spawn_mock_llm() -> anyhow::Result<String> {
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

/// Waits (at most 30 s) for an event of type `kind` about interaction `id`.
pub(super) async fn wait_for_event(
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
pub(super) async fn cancel_latency(
    url: &str,
    agent: &str,
    rounds: usize,
) -> anyhow::Result<Latencies> {
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

/// The report's rows of the cancel scenario, (f).
pub(super) fn rows(table: &mut Table) {
    for kind in ["echo", "command", "openai"] {
        let of = |f: &Figures| {
            f.cancel
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, l)| (l.p50, l.p99))
        };
        table.row(
            &format!("(f) cancel → task.cancelled, {kind} agent, p50"),
            &|f| of(f).map(|(p50, _)| (ms(p50), p50.as_secs_f64())),
            false,
        );
        table.row(
            &format!("(f) cancel → task.cancelled, {kind} agent, p99"),
            &|f| of(f).map(|(_, p99)| (ms(p99), p99.as_secs_f64())),
            false,
        );
    }
    table.row(
        "(f) command agent: signal → process group gone (server), p50 bucket",
        &|f| {
            f.process_stops
                .map(|(n, p50, _)| (format!("≤ {p50} ms ({n} stops)"), p50))
        },
        false,
    );
    table.row(
        "(f) command agent: signal → process group gone (server), p99 bucket",
        &|f| {
            f.process_stops
                .map(|(_, _, p99)| (format!("≤ {p99} ms"), p99))
        },
        false,
    );
}
