//! Scenario **ask**: the round trip of waiting for input. A `command` agent (a shell script)
//! asks on its first run and answers at once on its second; `rounds` times, one after another
//! on one session: a message, its `task.waiting` on a WebSocket, then the answer, timed to the
//! `task.resumed` event (Baton's part: the answer's transaction, its event, the task started
//! here) and to the first `task.delta` after it (that plus the program's start-up and first
//! line, reported separately).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use super::spawn::spawn_baton;
use super::ws::session_ws_url;
use super::{BENCH_CONFIG, Latencies, http_client};

/// The agent: asks when its stdin holds no answers yet, else says one word and ends.
fn ask_agent_config() -> String {
    let script = r#"input=$(cat); case "$input" in *'"answers":[]'*) printf '%s\n' '{"type":"ask","data":{"q":"go?"}}';; *) printf '%s\n' '{"type":"delta","text":"go"}' '{"type":"result"}';; esac"#;
    format!(
        "\n[agents.asker]\nkind = \"command\"\nprogram = \"/bin/sh\"\nargs = [\"-c\", {script:?}]\n"
    )
}

pub(super) struct AskFigures {
    /// Answer sent → `task.resumed` received.
    pub(super) resumed: Latencies,
    /// `task.resumed` → the first delta of the resumed run (the program's start-up).
    pub(super) program: Latencies,
    /// Answer sent → that first delta.
    pub(super) first_delta: Latencies,
}

pub(super) async fn ask(rounds: usize) -> anyhow::Result<String> {
    let config = format!("{BENCH_CONFIG}{}", ask_agent_config());
    let baton = spawn_baton(&config, None).await?;
    let figures = measure(&baton.url, rounds).await?;
    drop(baton);
    let row = |what: &str, l: &Latencies| {
        format!(
            "| {what} | {:.2} ms | {:.2} ms | {:.2} ms |\n",
            l.p50.as_secs_f64() * 1e3,
            l.p99.as_secs_f64() * 1e3,
            l.max.as_secs_f64() * 1e3
        )
    };
    Ok(format!(
        "| ask/answer round trip ({rounds} rounds, command agent) | p50 | p99 | max |\n\
         |---|---|---|---|\n{}{}{}",
        row("answer → task.resumed (Baton)", &figures.resumed),
        row(
            "task.resumed → first delta (the program's start-up)",
            &figures.program
        ),
        row(
            "answer → first delta after the resume",
            &figures.first_delta
        ),
    ))
}

async fn measure(url: &str, rounds: usize) -> anyhow::Result<AskFigures> {
    let session = "bench-ask";
    let http = http_client(1)?;
    let created = http
        .put(format!("{url}/v1/sessions/{session}"))
        .json(&serde_json::json!({"agent": "asker"}))
        .send()
        .await?;
    if !created.status().is_success() {
        bail!("creating the session answered {}", created.status());
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(session_ws_url(url, session).as_str())
        .await
        .context("connecting the ask scenario's WebSocket")?;
    let mut next_event = async move |kind: &str| -> anyhow::Result<(serde_json::Value, Instant)> {
        let wait = async {
            while let Some(message) = socket.next().await {
                let Message::Text(text) = message? else {
                    continue;
                };
                let frame: serde_json::Value = serde_json::from_str(&text)?;
                if frame["type"] == kind {
                    return Ok((frame, Instant::now()));
                }
            }
            bail!("the WebSocket closed")
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .with_context(|| format!("no {kind} in 30 s"))?
    };
    let (mut resumed, mut program, mut first_delta) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let sent = http
            .post(format!("{url}/v1/sessions/{session}/messages"))
            .json(&serde_json::json!({"content": "go", "policy": "reject"}))
            .send()
            .await?;
        if sent.status() != reqwest::StatusCode::ACCEPTED {
            bail!("the message answered {}", sent.status());
        }
        let (waiting, _) = next_event("task.waiting").await?;
        let interaction = &waiting["data"]["interaction"];
        let id = interaction["id"].as_str().context("interaction id")?;
        let answered_at = Instant::now();
        let answered = http
            .post(format!(
                "{url}/v1/sessions/{session}/interactions/{id}/answer"
            ))
            .json(&serde_json::json!({
                "request_id": interaction["request"]["id"], "answer": true
            }))
            .send()
            .await?;
        if !answered.status().is_success() {
            bail!("the answer answered {}", answered.status());
        }
        let (_, resumed_at) = next_event("task.resumed").await?;
        let (_, delta_at) = next_event("task.delta").await?;
        next_event("task.completed").await?;
        resumed.push(resumed_at - answered_at);
        program.push(delta_at - resumed_at);
        first_delta.push(delta_at - answered_at);
    }
    Ok(AskFigures {
        resumed: Latencies::from(resumed).context("no round")?,
        program: Latencies::from(program).context("no round")?,
        first_delta: Latencies::from(first_delta).context("no round")?,
    })
}
