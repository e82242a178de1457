//! `baton send`: one message over the session's WebSocket, its reply streamed to stdout.

use std::io::Write;
use std::process::ExitCode;

use anyhow::anyhow;
use serde_json::Value;

use super::{out, read_only_refusal};
use crate::client::stream::{Frame, SessionSocket};
use crate::client::{Remote, ServerError};

/// `baton send`: posts over the session's WebSocket, streams the reply's deltas to stdout as
/// they arrive, and exits non-zero unless the interaction completed.
pub async fn send(
    remote: &Remote,
    session: &str,
    text: &str,
    policy: &str,
) -> anyhow::Result<ExitCode> {
    let mut socket = SessionSocket::open(remote, session, None).await?;
    socket.send_message(text, policy, 1).await?;
    let mut id: Option<String> = None;
    // Events may arrive before the reply names the interaction: keep them until then.
    let mut early: Vec<Value> = Vec::new();
    loop {
        let event = match socket.next().await? {
            Frame::Reply(reply) => {
                if reply["ok"] != true {
                    return Err(read_only_refusal(ServerError::from_reply(&reply)).into());
                }
                let data = &reply["data"];
                if data.get("epoch").is_some() {
                    out(&format!("cleared (epoch {})\n", data["epoch"]))?;
                    return Ok(ExitCode::SUCCESS);
                }
                if matches!(
                    data["status"].as_str(),
                    Some("completed" | "failed" | "cancelled")
                ) {
                    // An idempotent replay of a finished interaction: nothing more will come.
                    return finish_send(data);
                }
                id = data["id"].as_str().map(str::to_string);
                for event in std::mem::take(&mut early) {
                    if let Some(code) = show_send_event(&event, session, id.as_deref())? {
                        return Ok(code);
                    }
                }
                continue;
            }
            Frame::Event(event) => event,
            Frame::Pong(_) => continue,
            Frame::Deleted => return Err(anyhow!("the session was deleted")),
        };
        if id.is_none() {
            early.push(event);
        } else if let Some(code) = show_send_event(&event, session, id.as_deref())? {
            return Ok(code);
        }
    }
}

/// Prints a delta of the interaction; on its final event, returns the exit code.
fn show_send_event(
    event: &Value,
    session: &str,
    id: Option<&str>,
) -> anyhow::Result<Option<ExitCode>> {
    let data = &event["data"];
    let about = data["interaction_id"]
        .as_str()
        .or(data["interaction"]["id"].as_str());
    if about != id {
        return Ok(None);
    }
    match event["type"].as_str() {
        Some("task.delta") => {
            out(data["text"].as_str().unwrap_or(""))?;
            Ok(None)
        }
        Some("task.completed" | "task.failed" | "task.cancelled") => {
            out("\n")?;
            finish_send(&data["interaction"]).map(Some)
        }
        // The agent asks: `send` cannot answer; it says how, and exits with its own code.
        Some("task.waiting") => {
            out("\n")?;
            let interaction = &data["interaction"];
            let request = &interaction["request"];
            let interaction_id = interaction["id"].as_str().unwrap_or("");
            let line = format!(
                "waiting for input: {}\nanswer with `baton answer {session} {interaction_id} \
                 ANSWER` (JSON or text), or in `baton chat {session}`, or POST {}/answer \
                 {{\"request_id\": \"{}\", \"answer\": …}}\n",
                request["data"],
                crate::client::session_path(session, &format!("/interactions/{interaction_id}")),
                request["id"].as_str().unwrap_or("")
            );
            let _ = std::io::stderr().write_all(line.as_bytes());
            Ok(Some(ExitCode::from(EXIT_WAITING)))
        }
        _ => Ok(None),
    }
}

/// `baton send`'s exit status when the interaction was left waiting for the client's input.
pub const EXIT_WAITING: u8 = 3;

/// What a line typed as an answer means: JSON when it parses as JSON, else the text itself.
pub(super) fn answer_value(line: &str) -> Value {
    serde_json::from_str(line.trim()).unwrap_or_else(|_| Value::String(line.trim().to_string()))
}

/// Success if the interaction completed; otherwise its failure as `code: message`.
pub(super) fn finish_send(interaction: &Value) -> anyhow::Result<ExitCode> {
    let id = interaction["id"].as_str().unwrap_or("");
    match interaction["status"].as_str() {
        Some("completed") => Ok(ExitCode::SUCCESS),
        Some("cancelled") => Err(anyhow!(
            "cancelled: interaction {id} was cancelled (reason: {})",
            interaction["cancel_reason"].as_str().unwrap_or("unknown")
        )),
        status => Err(anyhow!(
            "{}: interaction {id} {}: {}",
            interaction["error"]["code"].as_str().unwrap_or("failed"),
            status.unwrap_or("ended"),
            interaction["error"]["message"].as_str().unwrap_or("")
        )),
    }
}
