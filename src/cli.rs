//! The command-line clients: `send`, `chat`, `watch` and `history`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::client::Client;
use crate::client::stream::{Frame, SessionSocket};

fn print_flush(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// The error text of a failed reply.
fn reply_error(reply: &Value) -> String {
    format!(
        "{}: {}",
        reply["error"]["code"].as_str().unwrap_or("error"),
        reply["error"]["message"].as_str().unwrap_or("")
    )
}

/// `baton send`: posts over the session's WebSocket, streams the reply's deltas to stdout as
/// they arrive, and exits non-zero unless the interaction completed.
pub async fn send(
    server: &str,
    session: &str,
    text: &str,
    policy: &str,
) -> anyhow::Result<ExitCode> {
    let mut socket = SessionSocket::open(server, session, None).await?;
    socket.send_message(text, policy, 1).await?;
    let mut id: Option<String> = None;
    // Events may arrive before the reply names the interaction: keep them until then.
    let mut early: Vec<Value> = Vec::new();
    loop {
        let event = match socket.next().await? {
            Frame::Reply(reply) => {
                if reply["ok"] != true {
                    eprintln!("error: {}", reply_error(&reply));
                    return Ok(ExitCode::FAILURE);
                }
                let data = &reply["data"];
                if data.get("epoch").is_some() {
                    println!("cleared (epoch {})", data["epoch"]);
                    return Ok(ExitCode::SUCCESS);
                }
                if matches!(
                    data["status"].as_str(),
                    Some("completed" | "failed" | "cancelled")
                ) {
                    // An idempotent replay of a finished interaction: nothing more will come.
                    return Ok(finish_send(data));
                }
                id = data["id"].as_str().map(str::to_string);
                let mut done = None;
                for event in early.drain(..) {
                    if let Some(code) = show_send_event(&event, id.as_deref()) {
                        done = Some(code);
                    }
                }
                if let Some(code) = done {
                    return Ok(code);
                }
                continue;
            }
            Frame::Event(event) => event,
            Frame::Pong(_) => continue,
            Frame::Deleted => bail!("the session was deleted"),
        };
        if id.is_none() {
            early.push(event);
        } else if let Some(code) = show_send_event(&event, id.as_deref()) {
            return Ok(code);
        }
    }
}

/// Prints a delta of the interaction; on its final event, returns the exit code.
fn show_send_event(event: &Value, id: Option<&str>) -> Option<ExitCode> {
    let data = &event["data"];
    let about = data["interaction_id"]
        .as_str()
        .or(data["interaction"]["id"].as_str());
    if about != id {
        return None;
    }
    match event["type"].as_str() {
        Some("task.delta") => {
            print_flush(data["text"].as_str().unwrap_or(""));
            None
        }
        Some("task.completed" | "task.failed" | "task.cancelled") => {
            println!();
            Some(finish_send(&data["interaction"]))
        }
        _ => None,
    }
}

fn finish_send(interaction: &Value) -> ExitCode {
    match interaction["status"].as_str() {
        Some("completed") => ExitCode::SUCCESS,
        status => {
            let why = interaction["error"]["message"]
                .as_str()
                .or(interaction["cancel_reason"].as_str())
                .unwrap_or("");
            eprintln!(
                "error: interaction {} {}: {why}",
                interaction["id"].as_str().unwrap_or(""),
                status.unwrap_or("unknown")
            );
            ExitCode::FAILURE
        }
    }
}

/// `baton chat`: an interactive client. Lines typed are sent (queued behind a running reply);
/// `/clear`, `/cancel` and `/quit` do what they say; replies stream as they are produced.
pub async fn chat(server: &str, session: &str, agent: Option<&str>) -> anyhow::Result<ExitCode> {
    if let Some(agent) = agent {
        Client::new(server)?
            .put_session_agent(session, agent)
            .await?;
    }
    let mut socket = SessionSocket::open(server, session, None).await?;
    println!(
        "baton chat: session {session} (agent {}). /clear, /cancel, /quit.",
        socket.hello["session"]["agent"].as_str().unwrap_or("?")
    );
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut reference = 0i64;
    let mut streaming = false;
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line.context("reading stdin")? else { break };
                let line = line.trim();
                reference += 1;
                match line {
                    "" => {}
                    "/quit" | "/exit" => break,
                    "/cancel" => socket.send(json!({"op": "cancel", "ref": reference})).await?,
                    "/clear" => socket.send(json!({"op": "clear", "ref": reference})).await?,
                    text => socket.send_message(text, "enqueue", reference).await?,
                }
            }
            frame = socket.next() => match frame? {
                Frame::Event(event) => show_chat_event(&event, &mut streaming),
                Frame::Reply(reply) if reply["ok"] != true => {
                    println!("[error] {}", reply_error(&reply));
                }
                Frame::Reply(_) | Frame::Pong(_) => {}
                Frame::Deleted => {
                    println!("[the session was deleted]");
                    break;
                }
            }
        }
    }
    socket.close().await;
    Ok(ExitCode::SUCCESS)
}

fn show_chat_event(event: &Value, streaming: &mut bool) {
    let data = &event["data"];
    let end_line = |streaming: &mut bool| {
        if std::mem::take(streaming) {
            println!();
        }
    };
    match event["type"].as_str().unwrap_or_default() {
        "task.started" => {
            end_line(streaming);
            print_flush("agent> ");
            *streaming = true;
        }
        "task.delta" => print_flush(data["text"].as_str().unwrap_or("")),
        "task.completed" => end_line(streaming),
        "task.failed" => {
            end_line(streaming);
            println!(
                "[failed: {}]",
                data["interaction"]["error"]["message"]
                    .as_str()
                    .unwrap_or("")
            );
        }
        "task.cancelled" => {
            end_line(streaming);
            println!(
                "[cancelled: {}]",
                data["interaction"]["cancel_reason"].as_str().unwrap_or("")
            );
        }
        "interaction.queued" => {
            end_line(streaming);
            println!(
                "[queued: {}]",
                data["interaction"]["content"].as_str().unwrap_or("")
            );
        }
        "session.cleared" => {
            end_line(streaming);
            println!("[cleared: epoch {}]", data["epoch"]);
        }
        _ => {}
    }
}

/// `baton watch`: prints the session's events as JSON lines (over SSE, which creates
/// nothing), resuming with `Last-Event-ID` when the stream drops.
pub async fn watch(
    server: &str,
    session: &str,
    after: Option<i64>,
    replay: bool,
) -> anyhow::Result<ExitCode> {
    let client = Client::new(server)?;
    let mut last: Option<i64> = after;
    if after.is_none() && !replay {
        // Only new events: start after the session's last seq, so a resume never replays.
        let url = client.url(&format!("/v1/sessions/{session}"));
        let response = client
            .http()
            .get(url)
            .send()
            .await
            .context("connecting to the server")?;
        if !response.status().is_success() {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            bail!("the server answered {status}: {body}");
        }
        let current: Value = response.json().await.context("reading the session")?;
        last = current["last_seq"].as_i64();
    }
    let mut attempts = 0u32;
    loop {
        let mut url = client.url(&format!("/v1/sessions/{session}/events"));
        if last.is_none() && replay {
            url.push_str("?replay=true");
        }
        let mut request = client.http().get(url);
        if let Some(seq) = last {
            request = request.header("last-event-id", seq.to_string());
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) if attempts < 20 => {
                attempts += 1;
                tracing::debug!(error = %e, "reconnecting");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e).context("connecting to the server"),
        };
        if !response.status().is_success() {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            bail!("the server answered {status}: {body}");
        }
        attempts = 0;
        let mut body = response.bytes_stream();
        let mut buffer = String::new();
        let mut deleted = false;
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                for line in block.lines() {
                    if let Some(data) = line.strip_prefix("data: ") {
                        println!("{data}");
                        let event: Value = serde_json::from_str(data).unwrap_or(Value::Null);
                        if let Some(seq) = event["seq"].as_i64() {
                            last = Some(seq);
                        }
                        deleted = event["type"] == "session.deleted";
                    }
                }
            }
        }
        if deleted {
            return Ok(ExitCode::SUCCESS);
        }
        // Dropped (or closed for being too slow): resume after the last event printed.
        last = last.or(Some(0));
    }
}

/// `baton history`: the interactions of the current epoch, oldest first.
pub async fn history(server: &str, session: &str, json: bool) -> anyhow::Result<ExitCode> {
    let client = Client::new(server)?;
    for interaction in client.history(session).await? {
        if json {
            println!("{interaction}");
        } else {
            println!(
                "[{}] {} > {}\n{}\n",
                interaction["created_at"].as_str().unwrap_or(""),
                interaction["status"].as_str().unwrap_or(""),
                interaction["content"].as_str().unwrap_or(""),
                interaction["response"].as_str().unwrap_or(""),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
