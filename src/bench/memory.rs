//! Scenario (c), memory: the server's resident memory after N sessions each completed M
//! interactions (loaded by 64 workers with `?wait`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::report::Table;
use super::spawn::rss_kib;
use super::{http_client, message_body};

#[derive(Debug, Clone)]
pub(super) struct Memory {
    pub(super) sessions: usize,
    pub(super) interactions: usize,
    pub(super) rss_before_kib: u64,
    pub(super) rss_after_kib: u64,
    pub(super) load_seconds: f64,
}

/// Loads `sessions × interactions` completed interactions, then reads the server's RSS.
pub(super) async fn memory(
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

/// The report's rows of the memory scenario, (c).
pub(super) fn rows(table: &mut Table) {
    table.row(
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
    table.row(
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
    table.row(
        "(c) load time",
        &|f| {
            f.memory
                .as_ref()
                .map(|m| (format!("{:.1} s", m.load_seconds), m.load_seconds))
        },
        false,
    );
}
