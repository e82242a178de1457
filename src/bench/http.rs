//! Scenario **http**: what the `http` agent kind costs. The throughput load (each session
//! posting with `?wait` in a loop) against three servers of this build, each with a different
//! `default` agent — the built-in `echo`, an `http` agent whose service is a minimal Rust one
//! started here (it streams the content back word by word, as echo does: the difference is
//! Baton's cost of the transport), and a `command` agent running the same echo as a shell
//! program — in alternating rounds, so that drift of the machine hits all alike.

use std::time::Duration;

use super::spawn::spawn_baton;
use super::throughput::throughput;
use super::{BenchOptions, Window};

/// Alternating rounds of each configuration.
const ROUNDS: usize = 3;

/// The service: the request's content back, a delta per word, then the result.
async fn serve_echo() -> anyhow::Result<String> {
    async fn agent(body: axum::body::Bytes) -> axum::response::Response {
        let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let content = request["interaction"]["content"]
            .as_str()
            .unwrap_or_default();
        let mut lines = String::with_capacity(content.len() * 3 + 32);
        for word in content.split_inclusive(' ') {
            lines.push_str(&serde_json::json!({"type": "delta", "text": word}).to_string());
            lines.push('\n');
        }
        lines.push_str("{\"type\":\"result\"}\n");
        axum::response::Response::builder()
            .header("content-type", "application/x-ndjson")
            .body(axum::body::Body::from(lines))
            .unwrap_or_default()
    }
    use axum::serve::ListenerExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // As a real service's server (uvicorn, hyper) does: no Nagle delay on small answers.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = axum::Router::new().route("/agent", axum::routing::post(agent));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}/agent"))
}

fn config(default_agent: &str) -> String {
    format!("queue_limit = 100000\n\n[agents.default]\n{default_agent}")
}

pub(super) async fn http(options: &BenchOptions) -> anyhow::Result<String> {
    let service = serve_echo().await?;
    // The same echo as a program: one delta per word, then the result.
    let script = r#"read -r _; printf '%s\n' '{"type":"delta","text":"hello "}' '{"type":"delta","text":"from "}' '{"type":"delta","text":"the "}' '{"type":"delta","text":"baton "}' '{"type":"result","response":"hello from the baton benchmark"}'"#;
    let targets = [
        ("echo", config("kind = \"echo\"\n")),
        (
            "http (Rust service)",
            config(&format!(
                "kind = \"http\"\nurl = \"{service}\"\nmax_history = 0\n"
            )),
        ),
        (
            "command (/bin/sh)",
            config(&format!(
                "kind = \"command\"\nprogram = \"/bin/sh\"\nargs = [\"-c\", {script:?}]\n"
            )),
        ),
    ];
    let mut servers = Vec::new();
    for (name, config) in &targets {
        servers.push((*name, spawn_baton(config, None).await?));
    }
    let duration = Duration::from_secs_f64(options.duration_s);
    let mut sums = vec![(0.0, Duration::ZERO); servers.len()];
    for round in 1..=ROUNDS {
        for (i, (name, server)) in servers.iter().enumerate() {
            eprintln!("[http] round {round}: {name} ({} s)", options.duration_s);
            let figures = throughput(
                &[server.url.as_str()],
                options.sessions,
                None,
                Window::after_warmup(duration),
            )
            .await?;
            anyhow::ensure!(
                figures.errors == 0,
                "{name}: {} requests failed",
                figures.errors
            );
            sums[i].0 += figures.per_second;
            sums[i].1 += figures.latency.p50;
        }
    }
    let echo = sums[0].0 / ROUNDS as f64;
    let mut out = format!(
        "| agent ({} sessions, {ROUNDS} rounds) | completed messages/s | / echo | latency p50 |\n\
         |---|---|---|---|\n",
        options.sessions
    );
    for ((name, _), (per_second, p50)) in servers.iter().zip(&sums) {
        let per_second = per_second / ROUNDS as f64;
        out.push_str(&format!(
            "| {name} | {per_second:.0} | {:.2} | {} |\n",
            per_second / echo,
            super::report::ms(*p50 / ROUNDS as u32)
        ));
    }
    Ok(out)
}
