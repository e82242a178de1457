//! Scenario (a), throughput: workers, one per session, each posting a message with `?wait=`
//! and the next as soon as the answer says `completed`; completed messages per second and
//! request latency in a measured window after a warm-up. The cluster scenario runs the same
//! load over several nodes.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use super::report::{Table, ms};
use super::{Latencies, Window, http_client, message_body};

#[derive(Debug, Clone)]
pub(super) struct Throughput {
    pub(super) completed: u64,
    pub(super) errors: u64,
    pub(super) per_second: f64,
    pub(super) latency: Latencies,
}

/// The session of throughput worker `i`.
pub(super) fn throughput_session(i: usize) -> String {
    format!("bench-tp-{i}")
}

/// Sessions post-with-wait in a loop, worker `i` to server `urls[i % urls.len()]`; counts
/// completed messages in the measured window.
pub(super) async fn throughput(
    urls: &[&str],
    sessions: usize,
    key: Option<&str>,
    window: Window,
) -> anyhow::Result<Throughput> {
    let http = http_client(sessions)?;
    let authorization = key.map(|k| format!("Bearer {k}"));
    let body = Arc::new(message_body());
    let mut workers = Vec::with_capacity(sessions);
    for i in 0..sessions {
        let http = http.clone();
        let body = body.clone();
        let authorization = authorization.clone();
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
                let mut request = http
                    .post(&target)
                    .header("content-type", "application/json");
                if let Some(authorization) = &authorization {
                    request = request.header("authorization", authorization);
                }
                let response = request.body(body.as_ref().clone()).send().await;
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

pub(super) fn memfind(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The report's rows of the throughput scenario, (a).
pub(super) fn rows(table: &mut Table) {
    table.row(
        "(a) completed messages/s, 64 sessions, ?wait",
        &|f| {
            f.throughput
                .as_ref()
                .map(|t| (format!("{:.0}", t.per_second), t.per_second))
        },
        true,
    );
    table.row(
        "(a) latency p50",
        &|f| {
            f.throughput
                .as_ref()
                .map(|t| (ms(t.latency.p50), t.latency.p50.as_secs_f64()))
        },
        false,
    );
    table.row(
        "(a) latency p99",
        &|f| {
            f.throughput
                .as_ref()
                .map(|t| (ms(t.latency.p99), t.latency.p99.as_secs_f64()))
        },
        false,
    );
    table.row(
        "(a) messages completed in the window",
        &|f| {
            f.throughput
                .as_ref()
                .map(|t| (t.completed.to_string(), t.completed as f64))
        },
        true,
    );
    table.row(
        "(a) errors",
        &|f| {
            f.throughput
                .as_ref()
                .map(|t| (t.errors.to_string(), t.errors as f64))
        },
        false,
    );
}
