//! The command-line clients: `send`, `chat`, `watch` and `history`; and how every command
//! ends: what it writes to stdout, its exit code, its error line on stderr.

use std::collections::HashSet;
use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::client::stream::{Frame, SessionSocket};
use crate::client::{Client, Remote, ServerError, session_path};

/// Stdout's reader has gone (`baton watch s | head -3`): the command ends quietly.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
pub struct StdoutClosed;

/// Writes `text` to stdout and flushes it, so streamed text shows as it comes. Every command
/// prints through this: a reader that has gone away is [`StdoutClosed`], which
/// [`exit_code`] turns into a quiet exit instead of the panic of `println!`.
pub fn out(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => anyhow::Error::new(StdoutClosed),
            _ => anyhow::Error::new(e).context("writing to stdout"),
        })
}

/// Notices stdout's reader going away, so a command that follows a stream ends with its
/// reader, not at its next write, which may be long in coming (as `tail -f` does). A thread
/// waits in poll(2) for stdout's error condition (a pipe without a reader; nothing for a file
/// or a terminal); dropping the watch wakes and joins it.
struct StdoutWatch {
    closed: tokio::sync::oneshot::Receiver<()>,
    /// Dropping this wakes the thread: its end of the pipe sees the hang-up.
    stop: Option<std::io::PipeWriter>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StdoutWatch {
    fn start() -> anyhow::Result<Self> {
        let (wake, stop) = std::io::pipe().context("creating a pipe")?;
        let (tell, closed) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("stdout-watch".into())
            .spawn(move || {
                if wait_for_stdout_error(&wake) {
                    let _ = tell.send(());
                }
            })
            .context("starting the stdout watch")?;
        Ok(Self {
            closed,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Resolves once stdout's reader has gone; never, where that cannot be known.
    async fn closed(&mut self) {
        if (&mut self.closed).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for StdoutWatch {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Blocks until stdout reports an error or a hang-up (true), or `wake` is woken (false).
fn wait_for_stdout_error(wake: &std::io::PipeReader) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let stdout = std::io::stdout();
    let mut fds = [
        // No events asked: poll(2) reports errors and hang-ups whatever is asked.
        PollFd::new(stdout.as_fd(), PollFlags::empty()),
        PollFd::new(wake.as_fd(), PollFlags::POLLIN),
    ];
    loop {
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
        if fds[1].any().unwrap_or(true) {
            return false;
        }
        let gone = PollFlags::POLLERR | PollFlags::POLLHUP;
        if fds[0].revents().is_some_and(|r| r.intersects(gone)) {
            return true;
        }
        if fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLNVAL))
        {
            return false;
        }
    }
}

/// The exit code of a command's outcome; an error is printed on stderr as one line, `error: …`,
/// and an error answer of the server always as `error: code: message`, whatever context the
/// command added to it.
pub fn exit_code(outcome: anyhow::Result<ExitCode>) -> ExitCode {
    let error = match outcome {
        Ok(code) => return code,
        Err(error) => error,
    };
    if error.downcast_ref::<StdoutClosed>().is_some() {
        return ExitCode::SUCCESS;
    }
    let line = match error.downcast_ref::<ServerError>() {
        Some(server) => format!("error: {server}\n"),
        None => format!("error: {error:#}\n"),
    };
    // Nothing more can be done when stderr is closed too.
    let _ = std::io::stderr().write_all(line.as_bytes());
    ExitCode::FAILURE
}

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
                    return Err(ServerError::from_reply(&reply).into());
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
                    if let Some(code) = show_send_event(&event, id.as_deref())? {
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
        } else if let Some(code) = show_send_event(&event, id.as_deref())? {
            return Ok(code);
        }
    }
}

/// Prints a delta of the interaction; on its final event, returns the exit code.
fn show_send_event(event: &Value, id: Option<&str>) -> anyhow::Result<Option<ExitCode>> {
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
            let line = format!(
                "waiting for input: {}\nanswer with `baton chat SESSION`, or POST \
                 /v1/sessions/SESSION/interactions/{}/answer \
                 {{\"request_id\": \"{}\", \"answer\": …}}\n",
                request["data"],
                interaction["id"].as_str().unwrap_or(""),
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
fn answer_value(line: &str) -> Value {
    serde_json::from_str(line.trim()).unwrap_or_else(|_| Value::String(line.trim().to_string()))
}

/// Success if the interaction completed; otherwise its failure as `code: message`.
fn finish_send(interaction: &Value) -> anyhow::Result<ExitCode> {
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

/// `baton watch`: prints the session's events as JSON lines (over SSE, which creates
/// nothing), resuming with `Last-Event-ID` when the stream drops; it ends when the session is
/// deleted or when stdout's reader goes away.
pub async fn watch(
    remote: &Remote,
    session: &str,
    after: Option<i64>,
    replay: bool,
) -> anyhow::Result<ExitCode> {
    let mut stdout = StdoutWatch::start()?;
    tokio::select! {
        () = stdout.closed() => Ok(ExitCode::SUCCESS),
        outcome = follow_events(remote, session, after, replay) => outcome,
    }
}

async fn follow_events(
    remote: &Remote,
    session: &str,
    after: Option<i64>,
    replay: bool,
) -> anyhow::Result<ExitCode> {
    let client = Client::new(remote)?;
    let mut last: Option<i64> = after;
    if after.is_none() && !replay {
        // Only new events: start after the session's last seq, so a resume never replays.
        last = client.get_session(session).await?["last_seq"].as_i64();
    }
    // Reconnects in a row after the stream dropped; the first connection is never retried, so
    // a wrong URL or session fails at once.
    let mut reconnects: Option<u32> = None;
    loop {
        let mut url = client.url(&session_path(session, "/events"));
        if last.is_none() && replay {
            url.push_str("?replay=true");
        }
        let mut request = client.http().get(url);
        if let Some(seq) = last {
            request = request.header("last-event-id", seq.to_string());
        }
        let response = match client.send(request).await {
            Ok(response) => Client::check(response).await?,
            Err(e) => match reconnects {
                Some(n) if n < 20 => {
                    reconnects = Some(n + 1);
                    tracing::debug!(error = %e, "reconnecting");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    continue;
                }
                Some(_) => {
                    return Err(e.context("the event stream dropped and could not be resumed"));
                }
                None => return Err(e),
            },
        };
        reconnects = Some(0);
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
                        out(&format!("{data}\n"))?;
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
pub async fn history(remote: &Remote, session: &str, json: bool) -> anyhow::Result<ExitCode> {
    let client = Client::new(remote)?;
    for interaction in client.history(session).await? {
        if json {
            out(&format!("{interaction}\n"))?;
        } else {
            out(&format!(
                "[{}] {} > {}\n{}\n\n",
                interaction["created_at"].as_str().unwrap_or(""),
                interaction["status"].as_str().unwrap_or(""),
                interaction["content"].as_str().unwrap_or(""),
                interaction["response"].as_str().unwrap_or(""),
            ))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `baton key new` prints: the new key, once, and the `[[auth.keys]]` block (with its
/// hash, never the key) to paste into the configuration.
pub fn new_key_block(tenant: &str, role: &str, id: Option<&str>) -> anyhow::Result<String> {
    crate::model::Tenant::parse(tenant).map_err(|e| anyhow::anyhow!("--tenant {tenant:?}: {e}"))?;
    if !matches!(role, "tenant" | "admin") {
        anyhow::bail!("--role must be tenant or admin (got {role:?})");
    }
    let (key, sha256) = crate::api::auth::new_key()?;
    let id = match id {
        Some(id) if !id.trim().is_empty() => id.to_string(),
        Some(_) => anyhow::bail!("--id must not be empty"),
        None => format!("{tenant}-{}", &crate::api::auth::new_key()?.1[..8]),
    };
    let id = toml::Value::String(id);
    Ok(format!(
        "# The key, shown once (Baton keeps only its hash): give it to the client, e.g. as\n\
         # BATON_KEY or Authorization: Bearer <key>.\n\
         {key}\n\n\
         # Paste into the server's configuration file:\n\
         [[auth.keys]]\n\
         id = {id}\n\
         tenant = \"{tenant}\"\n\
         role = \"{role}\"\n\
         sha256 = \"{sha256}\"\n"
    ))
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
