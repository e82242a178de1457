//! `baton chat`: an interactive client of one session, and a scripted one when stdin is not a
//! terminal.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::send::{EXIT_WAITING, answer_value, finish_send};
use super::{out, read_only_refusal};
use crate::client::stream::{Frame, SessionSocket};
use crate::client::{Client, Remote, ServerError};

/// What `/help` prints in `baton chat`.
const CHAT_HELP: &str = "\
/clear   forget the conversation: cancel what runs or waits, start a new epoch
/cancel  stop the reply that is running (the queued messages then run)
/help    list these commands
/quit    leave (so does Ctrl-D); the session and a running reply go on
A line is sent to the agent; while a reply runs it waits its turn. To send a line that
starts with /, type // (one / is removed).";

/// A line typed in `baton chat`.
#[derive(Debug, PartialEq, Eq)]
enum ChatInput<'a> {
    Nothing,
    Message(&'a str),
    Clear,
    Cancel,
    Help,
    Quit,
    /// `/word` that is not a command: never sent to the agent by mistake.
    Unknown(&'a str),
}

impl<'a> ChatInput<'a> {
    fn parse(line: &'a str) -> Self {
        let line = line.trim();
        if line.starts_with("//") {
            return Self::Message(&line[1..]);
        }
        let first = line.split_whitespace().next().unwrap_or_default();
        let Some(word) = first.strip_prefix('/') else {
            return if line.is_empty() {
                Self::Nothing
            } else {
                Self::Message(line)
            };
        };
        // A path such as `/etc/hosts is…` is a message, not a command.
        if word.is_empty()
            || !word
                .chars()
                .all(|c| c.is_alphanumeric() || c == '-' || c == '_')
        {
            return Self::Message(line);
        }
        match word {
            "clear" => Self::Clear,
            "cancel" => Self::Cancel,
            "help" => Self::Help,
            "quit" | "exit" => Self::Quit,
            _ => Self::Unknown(first),
        }
    }
}

/// What a scripted chat (stdin not a terminal) waits for before it reads the next line.
#[derive(Debug, PartialEq, Eq)]
enum Awaiting {
    /// Nothing: the next line may be read.
    Nothing,
    /// The server's reply to the operation with this `ref`.
    Reply(i64),
    /// The end of this interaction (or its question).
    End(String),
}

/// `baton chat`: an interactive client. Lines typed are sent (queued behind a running reply);
/// `/clear`, `/cancel`, `/help` and `/quit` do what they say; replies stream as they are
/// produced. Ctrl-C cancels the running reply; a second Ctrl-C (or one while nothing runs)
/// quits with 130. When stdin is not a terminal, each line waits for the one before it to be
/// answered and its reply to end, and an error or a failed reply ends the chat with it.
pub async fn chat(remote: &Remote, session: &str, agent: Option<&str>) -> anyhow::Result<ExitCode> {
    let client = Client::new(remote)?;
    if let Some(agent) = agent {
        client.put_session_agent(session, agent).await?;
    }
    let mut socket = SessionSocket::open(remote, session, None).await?;
    out(&format!(
        "baton chat: session {session} (agent {}). /help lists the commands.\n",
        socket.hello["session"]["agent"].as_str().unwrap_or("?")
    ))?;
    let scripted = !std::io::stdin().is_terminal();
    let mut interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("listening for Ctrl-C")?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut screen = ChatScreen::default();
    let mut reference = 0i64;
    // The refs of `/cancel`s not answered yet: an empty answer says there was nothing to cancel.
    let mut cancels: HashSet<i64> = HashSet::new();
    let mut awaiting = Awaiting::Nothing;
    // Interactions seen ending, for a scripted chat whose reply comes after the end.
    let mut ended: HashSet<String> = HashSet::new();
    loop {
        if scripted && !stdin_open && awaiting == Awaiting::Nothing {
            break;
        }
        let read_line = stdin_open && (!scripted || awaiting == Awaiting::Nothing);
        tokio::select! {
            _ = interrupts.recv() => {
                if !screen.reply_active() || screen.interrupted {
                    screen.end_reply()?;
                    socket.close().await;
                    return Ok(ExitCode::from(EXIT_INTERRUPTED));
                }
                screen.interrupted = true;
                match client.cancel(session, None).await {
                    Ok(_) => screen.notice("[Ctrl-C: cancelling the reply; Ctrl-C again quits]")?,
                    Err(e) => screen.notice(&format!("[Ctrl-C: could not cancel: {e:#}]"))?,
                }
            }
            line = lines.next_line(), if read_line => {
                let Some(line) = line.context("reading stdin")? else {
                    if !scripted {
                        break;
                    }
                    // The script's end: what its last line started still ends first.
                    stdin_open = false;
                    continue;
                };
                reference += 1;
                let sent = match ChatInput::parse(&line) {
                    ChatInput::Nothing => false,
                    ChatInput::Quit => break,
                    ChatInput::Help => {
                        screen.notice(CHAT_HELP)?;
                        false
                    }
                    ChatInput::Unknown(word) => {
                        screen.notice(&format!("[unknown command {word}: /help lists them]"))?;
                        false
                    }
                    ChatInput::Cancel => {
                        cancels.insert(reference);
                        socket.send(json!({"op": "cancel", "ref": reference})).await?;
                        true
                    }
                    ChatInput::Clear => {
                        socket.send(json!({"op": "clear", "ref": reference})).await?;
                        true
                    }
                    ChatInput::Message(text) => {
                        match screen.pending.take() {
                            // The agent asked: this line is the answer.
                            Some((interaction, request)) => {
                                socket
                                    .send(json!({
                                        "op": "answer", "ref": reference,
                                        "interaction_id": interaction, "request_id": request,
                                        "answer": answer_value(text),
                                    }))
                                    .await?;
                            }
                            None => socket.send_message(text, "enqueue", reference).await?,
                        }
                        true
                    }
                };
                if sent && scripted {
                    awaiting = Awaiting::Reply(reference);
                }
            }
            frame = socket.next() => match frame? {
                Frame::Event(event) => {
                    screen.show(&event)?;
                    if scripted {
                        follow_script(&event, &mut awaiting, &mut ended)?;
                    }
                }
                Frame::Reply(reply) => {
                    let was_cancel = reply["ref"].as_i64().is_some_and(|r| cancels.remove(&r));
                    let answered = awaiting == Awaiting::Reply(reply["ref"].as_i64().unwrap_or(-1));
                    if reply["ok"] != true {
                        let error = read_only_refusal(ServerError::from_reply(&reply));
                        if scripted {
                            screen.end_reply()?;
                            return Err(error.into());
                        }
                        screen.notice(&format!("[error: {error}]"))?;
                    } else if was_cancel
                        && reply["data"]["cancelled"].as_array().is_some_and(Vec::is_empty)
                    {
                        screen.notice("[nothing to cancel]")?;
                    }
                    if answered {
                        // A message's or an answer's reply is the interaction: wait for its end.
                        awaiting = match reply["data"]["id"].as_str() {
                            Some(id) if !ended.contains(id)
                                && !is_final(&reply["data"]["status"]) =>
                            {
                                Awaiting::End(id.to_string())
                            }
                            _ => Awaiting::Nothing,
                        };
                    }
                }
                Frame::Pong(_) => {}
                Frame::Deleted => {
                    screen.end_reply()?;
                    out("[the session was deleted]\n")?;
                    break;
                }
            }
        }
    }
    screen.end_reply()?;
    socket.close().await;
    if scripted && screen.pending.is_some() {
        // The script ended while the agent waits for an answer, as `send` does.
        return Ok(ExitCode::from(EXIT_WAITING));
    }
    Ok(ExitCode::SUCCESS)
}

/// `baton chat`'s exit status when quit with Ctrl-C, as a shell reports a command that
/// SIGINT ended (128 + 2).
pub const EXIT_INTERRUPTED: u8 = 130;

fn is_final(status: &Value) -> bool {
    matches!(status.as_str(), Some("completed" | "failed" | "cancelled"))
}

/// A scripted chat's progress on an event: the awaited interaction's end (a failure ends the
/// chat with its error) or its question (the next line answers it).
fn follow_script(
    event: &Value,
    awaiting: &mut Awaiting,
    ended: &mut HashSet<String>,
) -> anyhow::Result<()> {
    let interaction = &event["data"]["interaction"];
    let Some(id) = interaction["id"].as_str() else {
        return Ok(());
    };
    let waited = *awaiting == Awaiting::End(id.to_string());
    match event["type"].as_str() {
        Some("task.completed" | "task.failed" | "task.cancelled") => {
            ended.insert(id.to_string());
            if waited {
                *awaiting = Awaiting::Nothing;
                if interaction["status"] == "failed" {
                    finish_send(interaction)?;
                }
            }
        }
        Some("task.waiting") if waited => *awaiting = Awaiting::Nothing,
        _ => {}
    }
    Ok(())
}

/// What `baton chat` has on the terminal. A reply streams on one line, `agent> …`; a notice
/// that comes meanwhile (a queued message, an answer to a command) waits until that line
/// ends, so a reply is never split and a prompt never lands in the middle of a line.
#[derive(Default)]
struct ChatScreen {
    /// The interaction whose reply is streaming, its line not ended yet.
    streaming: Option<String>,
    /// The agent's pending question: (interaction id, request id). The next line answers it.
    pending: Option<(String, String)>,
    /// Notices held until the reply's line ends.
    held: Vec<String>,
    /// Ctrl-C asked the running reply to stop: the next Ctrl-C quits.
    interrupted: bool,
}

impl ChatScreen {
    fn show(&mut self, event: &Value) -> anyhow::Result<()> {
        let data = &event["data"];
        let interaction = &data["interaction"];
        let id = interaction["id"]
            .as_str()
            .or(data["interaction_id"].as_str())
            .map(str::to_string);
        let kind = event["type"].as_str().unwrap_or_default();
        if kind.starts_with("task.")
            && interaction["status"]
                .as_str()
                .is_some_and(|s| matches!(s, "completed" | "failed" | "cancelled"))
            && self
                .pending
                .as_ref()
                .is_some_and(|(p, _)| Some(p) == id.as_ref())
        {
            // The question is gone with its interaction.
            self.pending = None;
        }
        match kind {
            "task.started" => self.start_reply(id),
            "task.delta" => {
                // Joined while a reply was already streaming: it starts a line too.
                if self.streaming.is_none() {
                    self.start_reply(id)?;
                }
                out(data["text"].as_str().unwrap_or(""))
            }
            "task.waiting" => {
                self.end_reply()?;
                let request = &interaction["request"];
                let question = request["data"]["question"]
                    .as_str()
                    .map_or_else(|| request["data"].to_string(), str::to_string);
                self.pending = Some((
                    id.unwrap_or_default(),
                    request["id"].as_str().unwrap_or_default().to_string(),
                ));
                out(&format!(
                    "agent asks> {question}\n[type your answer: JSON, or plain text]\n"
                ))
            }
            "task.resumed" => {
                if self
                    .pending
                    .as_ref()
                    .is_some_and(|(p, _)| Some(p) == id.as_ref())
                {
                    self.pending = None;
                }
                self.start_reply(id)
            }
            "task.completed" if self.is_streaming(&id) => self.end_reply(),
            "task.failed" if self.is_streaming(&id) => {
                self.end_reply()?;
                out(&format!(
                    "[failed: {}]\n",
                    interaction["error"]["message"].as_str().unwrap_or("")
                ))
            }
            "task.failed" => self.notice(&format!(
                "[failed: {}]",
                interaction["error"]["message"].as_str().unwrap_or("")
            )),
            "task.cancelled" if self.is_streaming(&id) => {
                self.end_reply()?;
                out(&format!(
                    "[cancelled: {}]\n",
                    interaction["cancel_reason"].as_str().unwrap_or("")
                ))
            }
            // A queued message dropped (by a clear, say) before it ran.
            "task.cancelled" => self.notice(&format!(
                "[cancelled before it ran ({}): {}]",
                interaction["cancel_reason"].as_str().unwrap_or(""),
                interaction["content"].as_str().unwrap_or("")
            )),
            "interaction.queued" => self.notice(&format!(
                "[queued: {}]",
                interaction["content"].as_str().unwrap_or("")
            )),
            "session.cleared" => {
                self.end_reply()?;
                out(&format!("[cleared: epoch {}]\n", data["epoch"]))
            }
            _ => Ok(()),
        }
    }

    fn is_streaming(&self, id: &Option<String>) -> bool {
        self.streaming.is_some() && self.streaming == *id
    }

    /// Whether a reply is running or waiting for an answer (what Ctrl-C would cancel).
    fn reply_active(&self) -> bool {
        self.streaming.is_some() || self.pending.is_some()
    }

    fn start_reply(&mut self, id: Option<String>) -> anyhow::Result<()> {
        self.end_reply()?;
        self.interrupted = false;
        out("agent> ")?;
        // An event without an id still opens the line (and the next start closes it).
        self.streaming = Some(id.unwrap_or_default());
        Ok(())
    }

    /// Ends the reply's line, if one is open, then prints what was held meanwhile.
    fn end_reply(&mut self) -> anyhow::Result<()> {
        if self.streaming.take().is_some() {
            out("\n")?;
        }
        for notice in std::mem::take(&mut self.held) {
            out(&format!("{notice}\n"))?;
        }
        Ok(())
    }

    /// Prints a notice on its own line: now, or once the streaming reply's line has ended.
    fn notice(&mut self, text: &str) -> anyhow::Result<()> {
        if self.streaming.is_some() {
            self.held.push(text.to_string());
            Ok(())
        } else {
            out(&format!("{text}\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ChatInput;

    #[test]
    fn chat_input_commands_messages_and_unknown_words() {
        assert_eq!(ChatInput::parse("  "), ChatInput::Nothing);
        assert_eq!(
            ChatInput::parse(" hello /clear "),
            ChatInput::Message("hello /clear")
        );
        assert_eq!(ChatInput::parse("/clear"), ChatInput::Clear);
        assert_eq!(ChatInput::parse(" /cancel "), ChatInput::Cancel);
        assert_eq!(ChatInput::parse("/help"), ChatInput::Help);
        assert_eq!(ChatInput::parse("/quit"), ChatInput::Quit);
        assert_eq!(ChatInput::parse("/exit"), ChatInput::Quit);
        assert_eq!(ChatInput::parse("/x"), ChatInput::Unknown("/x"));
        assert_eq!(
            ChatInput::parse("/summarize this"),
            ChatInput::Unknown("/summarize")
        );
        // Not a word after the slash: a message.
        assert_eq!(
            ChatInput::parse("/etc/hosts is a file"),
            ChatInput::Message("/etc/hosts is a file")
        );
        assert_eq!(ChatInput::parse("/ spaced"), ChatInput::Message("/ spaced"));
        assert_eq!(ChatInput::parse("/"), ChatInput::Message("/"));
        // `//` sends a line that starts with `/`.
        assert_eq!(
            ChatInput::parse("//help me"),
            ChatInput::Message("/help me")
        );
    }
}
