//! Scenario (g), cluster (with `--postgres ADMIN_URL`): the throughput load spread over N
//! `baton serve` nodes sharing one fresh PostgreSQL database (and, for comparison, over one
//! node on SQLite), with WebSocket subscribers on every node measuring delivery, across nodes
//! too, and the continuity of seqs.

use std::time::Duration;

use anyhow::{Context, bail};

use super::report::{Table, ms};
use super::spawn::{Spawned, spawn_baton, wait_healthy};
use super::throughput::{throughput, throughput_session};
use super::ws::{Delivery, receive_events, session_ws_url};
use super::{BENCH_CONFIG, BenchOptions, Figures, Latencies, Window};

/// Sessions of the throughput load that the cluster scenario watches, each from every node.
pub(super) const WATCHED_SESSIONS: usize = 8;

/// A database of one cluster configuration, created through the admin URL;
/// [`BenchDatabase::remove`] drops it `WITH (FORCE)`.
pub(super) struct BenchDatabase {
    pub(super) admin: tokio_postgres::Client,
    /// Drives the admin connection; aborted on drop.
    pub(super) connection: tokio::task::JoinHandle<()>,
    pub(super) name: String,
    /// What the nodes connect to.
    pub(super) url: String,
}

impl BenchDatabase {
    async fn create(admin_url: &str) -> anyhow::Result<Self> {
        let name = format!("baton_bench_{}", uuid::Uuid::now_v7().simple());
        let url = database_url(admin_url, &name)?;
        let (admin, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {admin_url}"))?;
        let connection = tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("the admin connection to PostgreSQL failed: {e}");
            }
        });
        let database = Self {
            admin,
            connection,
            name,
            url,
        };
        database
            .admin
            .batch_execute(&format!("CREATE DATABASE {}", database.name))
            .await
            .with_context(|| format!("creating database {}", database.name))?;
        Ok(database)
    }

    /// Drops the database, disconnecting whoever is still connected.
    async fn remove(self) -> anyhow::Result<()> {
        self.admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .with_context(|| format!("dropping database {}", self.name))
    }
}

impl Drop for BenchDatabase {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// `admin_url` with its database replaced by `name` (the query, if any, is kept).
pub(super) fn database_url(admin_url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = match admin_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (admin_url, None),
    };
    let authority = base
        .find("://")
        .filter(|_| base.starts_with("postgres"))
        .context("--postgres takes a postgres://USER@HOST:PORT/DATABASE URL")?
        + 3;
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    let mut url = format!("{}/{name}", &base[..path]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    Ok(url)
}

/// The cluster scenario: one node on SQLite, then for each count N of `options.nodes`, N nodes
/// on a fresh PostgreSQL database.
pub(super) async fn cluster(options: &BenchOptions) -> anyhow::Result<Vec<Figures>> {
    let admin_url = options
        .postgres
        .as_deref()
        .context("the cluster scenario needs --postgres ADMIN_URL")?;
    if options.nodes.is_empty() || options.nodes.contains(&0) {
        bail!("--nodes takes node counts of at least 1");
    }
    let sqlite = spawn_baton(BENCH_CONFIG, None).await?;
    let mut results = vec![measure_cluster("sqlite, 1 node", &[sqlite], options).await?];
    for &count in &options.nodes {
        let name = format!(
            "postgres, {count} node{}",
            if count == 1 { "" } else { "s" }
        );
        let database = BenchDatabase::create(admin_url).await?;
        let measured = async {
            let mut nodes = Vec::with_capacity(count);
            for _ in 0..count {
                nodes.push(spawn_baton(BENCH_CONFIG, Some(&database.url)).await?);
            }
            measure_cluster(&name, &nodes, options).await
            // The nodes are killed here, before their database goes.
        }
        .await;
        let removed = database.remove().await;
        results.push(measured?);
        removed?;
    }
    Ok(results)
}

/// The throughput load over `nodes` (worker i posts to node i % N) while each node has a
/// WebSocket subscriber on each of the first [`WATCHED_SESSIONS`] sessions.
pub(super) async fn measure_cluster(
    name: &str,
    nodes: &[Spawned],
    options: &BenchOptions,
) -> anyhow::Result<Figures> {
    let urls: Vec<&str> = nodes.iter().map(|n| n.url.as_str()).collect();
    for url in &urls {
        wait_healthy(url).await?;
    }
    let watched = WATCHED_SESSIONS.min(options.sessions);
    eprintln!(
        "[{name}] cluster: {} sessions over {} node(s), {} s; {watched} sessions watched from every node",
        options.sessions,
        urls.len(),
        options.duration_s
    );
    // Subscribed before the load starts, so every event of theirs is live.
    let mut sockets = Vec::with_capacity(watched * urls.len());
    for session in 0..watched {
        for (node, url) in urls.iter().enumerate() {
            let (socket, _) =
                tokio_tungstenite::connect_async(session_ws_url(url, &throughput_session(session)))
                    .await
                    .with_context(|| format!("subscribing on {url}"))?;
            // The session's tasks run on the node its worker posts to.
            sockets.push((node != session % urls.len(), socket));
        }
    }
    let window = Window::after_warmup(Duration::from_secs_f64(options.duration_s));
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|(remote, socket)| (remote, tokio::spawn(receive_events(socket, window))))
        .collect();
    let throughput = throughput(&urls, options.sessions, None, window).await?;
    let (mut received, mut remote) = (Vec::new(), Vec::new());
    for (is_remote, reader) in readers {
        let r = reader.await?;
        if is_remote {
            remote.push(r);
        } else {
            received.push(r);
        }
    }
    let remote_latency =
        Latencies::from_ms(remote.iter().flat_map(|r| r.latencies.iter().copied()));
    received.extend(remote);
    let mut delivery =
        Delivery::from(&received, window).context("no event reached the subscribers")?;
    delivery.remote_latency = remote_latency;
    Ok(Figures {
        name: name.to_string(),
        throughput: Some(throughput),
        delivery: Some(delivery),
        ..Figures::default()
    })
}

/// The report's rows of the cluster scenario, (g).
pub(super) fn rows(table: &mut Table) {
    table.row(
        "(g) events received/s, 8 sessions watched from every node",
        &|f| {
            f.delivery.as_ref().map(|x| {
                (
                    format!("{:.0} ({} subscribers)", x.per_second, x.subscribers),
                    x.per_second,
                )
            })
        },
        true,
    );
    for (which, remote) in [("", false), (", subscriber on another node", true)] {
        let of = |f: &Figures| {
            let x = f.delivery.as_ref()?;
            let l = if remote {
                x.remote_latency.as_ref()?
            } else {
                &x.latency
            };
            Some((l.p50, l.p99))
        };
        table.row(
            &format!("(g) delivery latency (`at` → receipt){which}, p50"),
            &|f| of(f).map(|(p50, _)| (ms(p50), p50.as_secs_f64())),
            false,
        );
        table.row(
            &format!("(g) delivery latency (`at` → receipt){which}, p99"),
            &|f| of(f).map(|(_, p99)| (ms(p99), p99.as_secs_f64())),
            false,
        );
    }
    table.row(
        "(g) seq gaps / duplicates, all subscribers",
        &|f| {
            f.delivery.as_ref().map(|x| {
                (
                    format!("{} / {}", x.gaps, x.duplicates),
                    (x.gaps + x.duplicates) as f64,
                )
            })
        },
        false,
    );
    table.row(
        "(g) subscribers closed early by the server",
        &|f| {
            f.delivery
                .as_ref()
                .map(|x| (x.closed_early.to_string(), x.closed_early as f64))
        },
        false,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_replaces_only_the_database() {
        let url = |admin| database_url(admin, "b").ok();
        assert_eq!(
            url("postgres://postgres@127.0.0.1:5432/postgres").as_deref(),
            Some("postgres://postgres@127.0.0.1:5432/b")
        );
        assert_eq!(
            url("postgresql://u:p@h/db?sslmode=disable").as_deref(),
            Some("postgresql://u:p@h/b?sslmode=disable")
        );
        assert_eq!(
            url("postgres://h:5432").as_deref(),
            Some("postgres://h:5432/b")
        );
        assert_eq!(url("host=h user=u"), None);
    }
}
