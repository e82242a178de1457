//! `baton sessions`, `baton delete`, `baton cancel` and `baton answer`: one HTTP request each
//! (a few for a list of many pages), their outcome printed in a line.

use std::process::ExitCode;

use serde_json::Value;

use super::out;
use super::send::answer_value;
use crate::client::{Client, Remote, ServerError};

/// `baton sessions`: every session, following the pages; with `limit`, one page, the next
/// page's cursor named on stderr.
pub async fn sessions(
    remote: &Remote,
    limit: Option<u32>,
    after: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let client = Client::new(remote)?;
    let mut cursor = after;
    loop {
        let page = client.list_sessions(limit, cursor.as_deref()).await?;
        let Some(sessions) = page["sessions"].as_array() else {
            anyhow::bail!("the server's answer has no sessions list");
        };
        for session in sessions {
            out(&session_line(session, json))?;
        }
        cursor = page["next"].as_str().map(str::to_string);
        match (&cursor, limit) {
            (None, _) => return Ok(ExitCode::SUCCESS),
            (Some(next), Some(_)) => {
                super::say(&format!(
                    "more: baton sessions --limit {} --after {next}",
                    limit.unwrap_or_default()
                ));
                return Ok(ExitCode::SUCCESS);
            }
            (Some(_), None) => {}
        }
    }
}

/// A session as a line: `id  agent  state  last_seq`, or its JSON.
fn session_line(session: &Value, json: bool) -> String {
    if json {
        return format!("{session}\n");
    }
    let state = match session["running"]["status"].as_str() {
        Some(status) => status.to_string(),
        None => "idle".to_string(),
    };
    format!(
        "{}\t{}\t{state}\tlast_seq {}\n",
        session["id"].as_str().unwrap_or(""),
        session["agent"].as_str().unwrap_or(""),
        session["last_seq"]
    )
}

/// `baton delete`.
pub async fn delete(remote: &Remote, session: &str) -> anyhow::Result<ExitCode> {
    Client::new(remote)?.delete_session(session).await?;
    out(&format!("deleted {session}\n"))?;
    Ok(ExitCode::SUCCESS)
}

/// `baton cancel`: what was cancelled, or that nothing was.
pub async fn cancel(
    remote: &Remote,
    session: &str,
    interaction: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let cancelled = Client::new(remote)?.cancel(session, interaction).await?;
    if cancelled.is_empty() {
        out("nothing to cancel\n")?;
    } else {
        out(&format!("cancelled {}\n", cancelled.join(" ")))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `baton answer`: answers the interaction's pending request (its id read from the
/// interaction, so the user gives only what they know).
pub async fn answer(
    remote: &Remote,
    session: &str,
    interaction: &str,
    answer: &str,
) -> anyhow::Result<ExitCode> {
    let client = Client::new(remote)?;
    let current = client.get_interaction(session, interaction).await?;
    let Some(request_id) = current["request"]["id"].as_str() else {
        return Err(ServerError {
            status: None,
            code: "not_waiting".into(),
            message: format!(
                "interaction {interaction} is {}, not waiting for an answer",
                current["status"].as_str().unwrap_or("not waiting")
            ),
        }
        .into());
    };
    let resumed = client
        .answer(session, interaction, request_id, &answer_value(answer))
        .await?;
    out(&format!(
        "answered: interaction {interaction} is {} again (baton watch {session} follows it)\n",
        resumed["status"].as_str().unwrap_or("running")
    ))?;
    Ok(ExitCode::SUCCESS)
}
