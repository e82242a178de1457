//! Scenario **noisy** (issue 17, I9): a noisy neighbour. A server with access control on and
//! two tenant keys; tenant A has one session with `--burst-subscribers` WebSocket subscribers
//! receiving the instant echo of `--burst-words` words, storm after storm; tenant B makes
//! small requests at a steady [`RATE`] — a GET of its session, a PATCH of its context, a
//! short message with `?wait` in turn. Figures: tenant B's latency p50/p99 without the storm
//! (A's subscribers connected, idle) and while storms run, each for `--duration` seconds (the
//! storm phase lasts at least one whole storm).

use std::time::{Duration, Instant};

use anyhow::Context;

use super::burst::{Audience, storm, storm_client, storm_content};
use super::report::ms;
use super::spawn::spawn_baton;
use super::{BENCH_CONFIG, BenchOptions, Latencies, http_client};
use baton::api::auth::new_key;

/// Tenant B's requests per second.
const RATE: f64 = 20.0;
/// Tenant B's requests at most (a bound: the load stops when told).
const MAX_REQUESTS: u64 = 1_000_000;
/// Tenant A's session and tenant B's.
const STORM_SESSION: &str = "storm";
const CALM_SESSION: &str = "calm";

/// Tenant B's requests: (sent at, latency, answered with success, which of [`KINDS`]).
type Samples = Vec<(Instant, Duration, bool, usize)>;

/// Tenant B's requests, in turn.
const KINDS: [&str; 3] = ["GET session", "PATCH context", "message ?wait"];

/// Tenant B's load until `stop`: one request every `1 / RATE` s, sequentially.
async fn tenant_b(
    http: reqwest::Client,
    url: String,
    key: String,
    stop: tokio_util::sync::CancellationToken,
) -> Samples {
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let session = format!("{url}/v1/sessions/{CALM_SESSION}");
    for i in 0..MAX_REQUESTS {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let kind = usize::try_from(i % 3).unwrap_or(0);
        let request = match kind {
            0 => http.get(&session),
            1 => http
                .patch(format!("{session}/context"))
                .json(&serde_json::json!({"n": i})),
            _ => http
                .post(format!("{session}/messages?wait=30"))
                .json(&serde_json::json!({"content": "hello from tenant b"})),
        };
        let sent = Instant::now();
        let ok = match request.bearer_auth(&key).send().await {
            Ok(answer) => {
                let success = answer.status().is_success();
                answer.bytes().await.is_ok() && success
            }
            Err(_) => false,
        };
        samples.push((sent, sent.elapsed(), ok, kind));
    }
    samples
}

/// Tenant B's latencies of the requests (of `kind`, or all) sent in `[from, to]`, and how
/// many failed.
fn phase(
    samples: &Samples,
    from: Instant,
    to: Instant,
    kind: Option<usize>,
) -> (Option<Latencies>, usize) {
    let inside: Vec<_> = samples
        .iter()
        .filter(|(sent, _, _, k)| {
            from <= *sent && *sent <= to && kind.is_none_or(|kind| kind == *k)
        })
        .collect();
    let errors = inside.iter().filter(|(_, _, ok, _)| !ok).count();
    let latencies = inside
        .iter()
        .filter(|(_, _, ok, _)| *ok)
        .map(|(_, d, _, _)| *d)
        .collect();
    (Latencies::from(latencies), errors)
}

pub(super) async fn noisy(options: &BenchOptions) -> anyhow::Result<String> {
    let (key_a, hash_a) = new_key()?;
    let (key_b, hash_b) = new_key()?;
    let config = format!(
        "{BENCH_CONFIG}\n[auth]\nmode = \"keys\"\n\n\
         [[auth.keys]]\nid = \"a\"\ntenant = \"a\"\nsha256 = \"{hash_a}\"\n\n\
         [[auth.keys]]\nid = \"b\"\ntenant = \"b\"\nsha256 = \"{hash_b}\"\n"
    );
    let baton = spawn_baton(&config, None).await?;
    let url = baton.url.clone();
    let http = storm_client()?;
    let duration = Duration::from_secs_f64(options.duration_s);
    let content = storm_content(options.burst_words);
    let created = http
        .put(format!("{url}/v1/sessions/{CALM_SESSION}"))
        .bearer_auth(&key_b)
        .json(&serde_json::json!({}))
        .send()
        .await?;
    anyhow::ensure!(
        created.status().is_success(),
        "tenant B's session: {}",
        created.status()
    );
    let mut audience =
        Audience::open(&url, STORM_SESSION, options.burst_subscribers, Some(&key_a)).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    // Tenant B on a thread and runtime of its own: its figures are the server's latency, not
    // the wait for a turn among this process's 50 busy subscribers.
    let load = {
        let (url, key, stop) = (url.clone(), key_b.clone(), stop.clone());
        std::thread::Builder::new()
            .name("bench-tenant-b".into())
            .spawn(move || -> anyhow::Result<Samples> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async {
                    let http = http_client(1)?;
                    Ok(tenant_b(http, url, key, stop).await)
                })
            })?
    };
    eprintln!(
        "[noisy] tenant B alone (A's {} subscribers idle), {} s",
        options.burst_subscribers, options.duration_s
    );
    // A second of warm-up, then the quiet phase.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let quiet_from = Instant::now();
    tokio::time::sleep(duration).await;
    let quiet_to = Instant::now();
    eprintln!(
        "[noisy] tenant A's storms of {} words, at least {} s",
        options.burst_words, options.duration_s
    );
    let storm_from = Instant::now();
    let mut storms = Vec::new();
    while storms.is_empty() || storm_from.elapsed() < duration {
        storms.push(
            storm(
                &http,
                &url,
                STORM_SESSION,
                &content,
                Some(&key_a),
                &mut audience,
            )
            .await?,
        );
    }
    let storm_to = Instant::now();
    stop.cancel();
    let samples = tokio::task::spawn_blocking(move || load.join())
        .await?
        .map_err(|_| anyhow::anyhow!("tenant B's load panicked"))?
        .context("tenant B's load")?;
    let counters = audience.counters.clone();
    audience.close().await;
    drop(baton);

    let mut out = format!(
        "| noisy: tenant B, {RATE:.0} requests/s (GET session, PATCH context, message ?wait) | \
         requests | p50 | p99 | max | errors |\n|---|---|---|---|---|---|\n"
    );
    let rows = [None, Some(0), Some(1), Some(2)]
        .into_iter()
        .flat_map(|kind| {
            [
                ("without the storm", quiet_from, quiet_to, kind),
                ("while tenant A's storms run", storm_from, storm_to, kind),
            ]
        });
    for (phase_label, from, to, kind) in rows {
        let label = match kind {
            Some(kind) => format!("{phase_label}: {}", KINDS[kind]),
            None => format!("**{phase_label}: all**"),
        };
        let (latencies, errors) = phase(&samples, from, to, kind);
        match latencies {
            Some(l) => out.push_str(&format!(
                "| {label} | {} | {} | {} | {} | {errors} |\n",
                l.count,
                ms(l.p50),
                ms(l.p99),
                ms(l.max)
            )),
            None => out.push_str(&format!("| {label} | 0 | - | - | - | {errors} |\n")),
        }
    }
    let total: Duration = storms.iter().sum();
    out.push_str(&format!(
        "\n| tenant A | figure |\n|---|---|\n\
         | storms of {} words to {} subscribers | {} in {}, {} each on average |\n\
         | 1013 closes (resumed) / seq faults / sockets lost | {} / {} / {} |\n",
        options.burst_words,
        options.burst_subscribers,
        storms.len(),
        ms(total),
        ms(total / u32::try_from(storms.len()).unwrap_or(1)),
        counters.resumes.load(std::sync::atomic::Ordering::Relaxed),
        counters.faults.load(std::sync::atomic::Ordering::Relaxed),
        counters.lost.load(std::sync::atomic::Ordering::Relaxed),
    ));
    Ok(out)
}
