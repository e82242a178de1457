//! `baton chat`: an interactive client of one session, and a scripted one when stdin is not a
//! terminal.

use std::collections::HashSet;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::out;
use super::send::answer_value;
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

/// `baton chat`: an interactive client. Lines typed are sent (queued behind a running reply);
/// `/clear`, `/cancel`, `/help` and `/quit` do what they say; replies stream as they are
/// produced.
pub async fn chat(remote: &Remote, session: &str, agent: Option<&str>) -> anyhow::Result<ExitCode> {
    if let Some(agent) = agent {
        Client::new(remote)?
            .put_session_agent(session, agent)
            .await?;
    }
    let mut socket = SessionSocket::open(remote, session, None).await?;
    out(&format!(
        "baton chat: session {session} (agent {}). /help lists the commands.\n",
        socket.hello["session"]["agent"].as_str().unwrap_or("?")
    ))?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut screen = ChatScreen::default();
    let mut reference = 0i64;
    // The refs of `/cancel`s not answered yet: an empty answer says there was nothing to cancel.
    let mut cancels: HashSet<i64> = HashSet::new();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line.context("reading stdin")? else { break };
                reference += 1;
                match ChatInput::parse(&line) {
                    ChatInput::Nothing => {}
                    ChatInput::Quit => break,
                    ChatInput::Help => screen.notice(CHAT_HELP)?,
                    ChatInput::Unknown(word) => {
                        screen.notice(&format!("[unknown command {word}: /help lists them]"))?;
                    }
                    ChatInput::Cancel => {
                        cancels.insert(reference);
                        socket.send(json!({"op": "cancel", "ref": reference})).await?;
                    }
                    ChatInput::Clear => {
                        socket.send(json!({"op": "clear", "ref": reference})).await?;
                    }
                    ChatInput::Message(text) => match screen.pending.take() {
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
                    },
                }
            }
            frame = socket.next() => match frame? {
                Frame::Event(event) => screen.show(&event)?,
                Frame::Reply(reply) => {
                    let was_cancel = reply["ref"].as_i64().is_some_and(|r| cancels.remove(&r));
                    if reply["ok"] != true {
                        screen.notice(&format!("[error: {}]", ServerError::from_reply(&reply)))?;
                    } else if was_cancel
                        && reply["data"]["cancelled"].as_array().is_some_and(Vec::is_empty)
                    {
                        screen.notice("[nothing to cancel]")?;
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
    Ok(ExitCode::SUCCESS)
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

    fn start_reply(&mut self, id: Option<String>) -> anyhow::Result<()> {
        self.end_reply()?;
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
