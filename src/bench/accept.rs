//! Scenario (b), accept latency: one session, policy `enqueue`, one request at a time, 100
//! warm-up requests then the measured ones (the agent runs the queue meanwhile).

use std::time::Instant;

use anyhow::{Context, bail};

use super::report::{Table, ms};
use super::{CONTENT, Latencies, http_client};

/// One session, `enqueue`, one request at a time: the latency of being accepted.
pub(super) async fn accept_latency(url: &str, requests: usize) -> anyhow::Result<Latencies> {
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

/// The report's rows of the accept scenario, (b).
pub(super) fn rows(table: &mut Table) {
    table.row(
        "(b) accept latency p50 (enqueue, 1 session)",
        &|f| f.accept.as_ref().map(|a| (ms(a.p50), a.p50.as_secs_f64())),
        false,
    );
    table.row(
        "(b) accept requests measured",
        &|f| {
            f.accept
                .as_ref()
                .map(|a| (a.count.to_string(), a.count as f64))
        },
        true,
    );
    table.row(
        "(b) accept latency p99",
        &|f| f.accept.as_ref().map(|a| (ms(a.p99), a.p99.as_secs_f64())),
        false,
    );
    table.row(
        "(b) accept latency max",
        &|f| f.accept.as_ref().map(|a| (ms(a.max), a.max.as_secs_f64())),
        false,
    );
}
