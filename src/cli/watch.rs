//! `baton watch` and `baton history`: a session's events as they come, and its interactions.

use std::process::ExitCode;

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::Value;

use super::out;
use crate::client::{Client, Remote, session_path};

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
