//! Scenario (e), idle connections: WebSockets opened on 100 sessions and left idle; the
//! server's resident memory growth per connection.

use std::time::Duration;

use anyhow::Context;

use super::report::Table;
use super::spawn::rss_kib;
use super::ws::session_ws_url;

#[derive(Debug, Clone)]
pub(super) struct Idle {
    pub(super) connections: usize,
    pub(super) rss_before_kib: u64,
    pub(super) rss_after_kib: u64,
}

/// Opens `connections` WebSockets (spread over 100 sessions) and leaves them idle.
pub(super) async fn idle(url: &str, pid: u32, connections: usize) -> anyhow::Result<Idle> {
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

/// The report's rows of the idle scenario, (e).
pub(super) fn rows(table: &mut Table) {
    table.row(
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
    table.row(
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
}
