//! The `command` agent: one process per task, spawned without a shell in a process group of
//! its own. Its stdin gets the request as one JSON object, then is closed; its stdout is the
//! lines of the protocol in [`lines`](super::lines).
//!
//! The task fails with `agent_error` when the program cannot start, reports an error, or exits
//! non-zero without a result (with the tail of its stderr). Exiting with status 0
//! without a result completes the task with the concatenated deltas.
//!
//! However the task ends, the process group is stopped: SIGTERM, then SIGKILL after
//! `kill_grace_ms`, and the process is always reaped. After a `result` the program first gets
//! the grace period to exit on its own.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::CommandConfig;
use super::lines::{Framing, Limits, LineReader, Step, agent_error, request_json};
use super::{Agent, AgentRequest, AgentResult, OutputSink};
use crate::model::ErrorInfo;
use crate::store::TaskOutput;

/// The last bytes of stderr kept for the error message of a failed task.
const STDERR_TAIL_BYTES: usize = 2048;
/// Stderr lines logged per task (the rest are counted, not logged).
const STDERR_LOG_LINES: usize = 100;
/// Longest stderr line logged, in bytes.
const STDERR_LOG_LINE_BYTES: usize = 1024;
/// After the process exited, how long its stdout may stay open (held by a child of its own).
const STDOUT_DRAIN: Duration = Duration::from_millis(500);

/// Upper bounds (ms) of the buckets of [`PROCESS_STOPS`].
pub const STOP_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];

/// How long stopping a task's process group took, from the decision to stop (cancel, timeout,
/// failure, or the end of the grace period after a result) until no member was left; a
/// process-wide histogram exported on `/metrics`.
pub static PROCESS_STOPS: StopHistogram = StopHistogram::new();

/// A fixed-bucket histogram of stop durations (cumulative counts are computed when read).
pub struct StopHistogram {
    buckets: [AtomicU64; STOP_BUCKETS_MS.len() + 1],
    sum_us: AtomicU64,
}

impl StopHistogram {
    const fn new() -> Self {
        Self {
            buckets: [const { AtomicU64::new(0) }; STOP_BUCKETS_MS.len() + 1],
            sum_us: AtomicU64::new(0),
        }
    }

    fn record(&self, took: Duration) {
        let ms = took.as_secs_f64() * 1000.0;
        let index = STOP_BUCKETS_MS
            .iter()
            .position(|&bound| ms <= bound as f64)
            .unwrap_or(STOP_BUCKETS_MS.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket bound (the last is `+Inf`, the total), and the sum in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        let mut total = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                total += b.load(Ordering::Relaxed);
                total
            })
            .collect();
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        (cumulative, sum)
    }
}

/// Runs a program per task, speaking the JSON-lines protocol.
pub struct CommandAgent {
    name: Arc<str>,
    program: OsString,
    args: Vec<OsString>,
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
    limits: Limits,
    kill_grace: Duration,
    /// Stopping processes outlive their tasks; shutdown waits for them.
    stoppers: TaskTracker,
    /// Variables of the server's environment the program must not inherit (besides every
    /// `BATON_*`): set once before serving, read at each spawn (a std lock: no await).
    withheld: RwLock<BTreeSet<String>>,
}

/// Variables with this prefix configure Baton itself: a program never inherits them.
const SERVER_ENV_PREFIX: &str = "BATON_";

impl CommandAgent {
    pub fn new(name: &str, config: &CommandConfig) -> anyhow::Result<Self> {
        Ok(Self {
            name: name.into(),
            program: config.program.clone().into(),
            args: config.args.iter().map(OsString::from).collect(),
            env: config.env.clone(),
            cwd: config.cwd.clone(),
            limits: Limits {
                line: config.max_line_bytes,
                output: config.max_output_bytes,
            },
            kill_grace: Duration::from_millis(config.kill_grace_ms),
            stoppers: TaskTracker::new(),
            withheld: RwLock::new(BTreeSet::new()),
        })
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command.args(&self.args);
        {
            let withheld = self.withheld.read().unwrap_or_else(|e| e.into_inner());
            for (name, _) in std::env::vars_os() {
                let Some(text) = name.to_str() else { continue };
                if text.starts_with(SERVER_ENV_PREFIX) || withheld.contains(text) {
                    command.env_remove(&name);
                }
            }
        }
        command
            .envs(&self.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so a signal reaches whatever the program started too.
            .process_group(0);
        if let Some(cwd) = &self.cwd {
            command.current_dir(cwd);
        }
        command
    }
}

impl Agent for CommandAgent {
    fn withhold_env(&self, names: &BTreeSet<String>) {
        let mut withheld = self.withheld.write().unwrap_or_else(|e| e.into_inner());
        withheld.extend(names.iter().cloned());
    }

    fn wants_history(&self) -> bool {
        true
    }

    fn run(
        &self,
        request: AgentRequest,
        outputs: OutputSink,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, AgentResult> {
        let mut command = self.command();
        let program = self.program.to_string_lossy().into_owned();
        let name = Arc::clone(&self.name);
        let limits = self.limits;
        let grace = self.kill_grace;
        let stoppers = self.stoppers.clone();
        async move {
            // Cancelled between the start's commit and now: the program never runs.
            if cancel.is_cancelled() {
                return Ok(None);
            }
            let mut payload = request_json(&request)?;
            payload.push(b'\n');
            let child = command
                .spawn()
                .map_err(|e| agent_error(format!("cannot start {program:?}: {e}")))?;
            let mut process = Process::new(child, grace, stoppers);
            let child = process.child.as_mut().expect("just spawned");
            let (stdin, stdout, stderr) =
                (child.stdin.take(), child.stdout.take(), child.stderr.take());
            let (Some(stdin), Some(stdout), Some(stderr)) = (stdin, stdout, stderr) else {
                return Err(agent_error("the program's pipes are missing".into()));
            };
            // Neither write nor read may block the other: a program is free to write before
            // it reads, or never to read at all.
            tokio::spawn(write_stdin(stdin, payload));
            let stderr_tail = Arc::new(Mutex::new(Vec::new()));
            let log = StderrLog {
                agent: name,
                interaction: request.interaction.id.to_string(),
            };
            let mut stderr_done = tokio::spawn(read_stderr(stderr, Arc::clone(&stderr_tail), log));
            let mut lines = LineReader::new(stdout, "stdout", Framing::Lines, limits);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => Ok(None),
                end = converse(&mut process, &mut lines, &outputs) => match end {
                    Conversation::Result(response) => {
                        process.graceful = true;
                        Ok(response)
                    }
                    Conversation::Failed(error) => Err(error),
                    Conversation::RunnerGone => Ok(None),
                    Conversation::Exited(status) => {
                        if !status.success() {
                            // The tail goes into the error: let the reader reach the end of
                            // stderr (it closes with the process, unless a child holds it).
                            let _ = tokio::time::timeout(STDOUT_DRAIN, &mut stderr_done).await;
                        }
                        exit_result(status, &stderr_tail)
                    }
                },
            }
        }
        .boxed()
    }

    fn drain(&self) -> BoxFuture<'static, ()> {
        let stoppers = self.stoppers.clone();
        async move {
            stoppers.close();
            stoppers.wait().await;
        }
        .boxed()
    }
}

/// How the exchange with the program ended.
enum Conversation {
    Result(Option<String>),
    Failed(ErrorInfo),
    /// The output sink is closed: the task was cancelled.
    RunnerGone,
    /// The program exited and its stdout is done, without a result.
    Exited(ExitStatus),
}

/// Reads the program's output lines until a result, an error, or its exit.
async fn converse(
    process: &mut Process,
    lines: &mut LineReader<tokio::process::ChildStdout>,
    outputs: &OutputSink,
) -> Conversation {
    let mut exited: Option<ExitStatus> = None;
    let drain_deadline = tokio::time::sleep(Duration::MAX);
    tokio::pin!(drain_deadline);
    loop {
        let child = process
            .child
            .as_mut()
            .expect("the child is kept until the end");
        tokio::select! {
            line = lines.next() => {
                let output = match line {
                    Ok(Some(line)) => line,
                    Ok(None) => break,
                    Err(error) => return Conversation::Failed(error),
                };
                let output = match output {
                    Step::Output(output) => output,
                    Step::End(Ok(response)) => return Conversation::Result(response),
                    Step::End(Err(error)) => return Conversation::Failed(error),
                    // The runner records the ask and stops the task; the process is stopped
                    // with it, as for a cancel.
                    Step::Ask(data) => {
                        let _ = outputs.send(TaskOutput::Ask(data)).await;
                        return Conversation::RunnerGone;
                    }
                };
                if outputs.send(output).await.is_err() {
                    return Conversation::RunnerGone;
                }
            }
            status = child.wait(), if exited.is_none() => {
                match status {
                    Ok(status) => {
                        process.reaped = true;
                        exited = Some(status);
                        drain_deadline.as_mut().reset(tokio::time::Instant::now() + STDOUT_DRAIN);
                    }
                    Err(e) => return Conversation::Failed(agent_error(format!("waiting for the program: {e}"))),
                }
            }
            _ = &mut drain_deadline, if exited.is_some() => break,
        }
    }
    // Stdout is closed (or held open only by a leftover child): wait for the exit status.
    let status = match exited {
        Some(status) => status,
        None => {
            let child = process
                .child
                .as_mut()
                .expect("the child is kept until the end");
            match child.wait().await {
                Ok(status) => {
                    process.reaped = true;
                    status
                }
                Err(e) => {
                    return Conversation::Failed(agent_error(format!(
                        "waiting for the program: {e}"
                    )));
                }
            }
        }
    };
    Conversation::Exited(status)
}

fn exit_result(status: ExitStatus, stderr_tail: &Mutex<Vec<u8>>) -> AgentResult {
    if status.success() {
        return Ok(None);
    }
    let how = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => "ended abnormally".to_string(),
    };
    let tail = stderr_tail.lock().map(|t| t.clone()).unwrap_or_default();
    let tail = String::from_utf8_lossy(&tail);
    let tail = tail.trim();
    let message = if tail.is_empty() {
        format!("the program {how} without a result")
    } else {
        format!("the program {how} without a result; stderr: {tail}")
    };
    Err(agent_error(message))
}

/// Owns the child process; on drop, makes sure the whole group is stopped and reaped.
struct Process {
    child: Option<Child>,
    group: Pid,
    /// The process exited and was reaped: only leftovers of its group may remain.
    reaped: bool,
    /// Let the program exit on its own for a grace period before signalling it.
    graceful: bool,
    grace: Duration,
    stoppers: TaskTracker,
}

impl Process {
    fn new(child: Child, grace: Duration, stoppers: TaskTracker) -> Self {
        // A spawned child has a pid until it is reaped, and it leads its own group.
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .unwrap_or(0);
        Self {
            child: Some(child),
            group: Pid::from_raw(pid),
            reaped: false,
            graceful: false,
            grace,
            stoppers,
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let Some(child) = self.child.take() else {
            return;
        };
        if self.group.as_raw() <= 0 {
            return;
        }
        let child = (!self.reaped).then_some(child);
        let stop = stop_group(child, self.group, self.grace, self.graceful);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                self.stoppers.spawn_on(stop, &runtime);
            }
            // No runtime left to wait with: kill at once (init reaps the orphans).
            Err(_) => {
                let _ = killpg(self.group, Signal::SIGKILL);
            }
        }
    }
}

/// Stops a process group: (optionally a grace period to exit on its own,) SIGTERM, then
/// SIGKILL after `grace`; reaps the leader; then does the same to any member left behind.
async fn stop_group(child: Option<Child>, group: Pid, grace: Duration, graceful: bool) {
    let mut began = tokio::time::Instant::now();
    let mut stopped_any = false;
    if let Some(mut child) = child {
        let exited = matches!(child.try_wait(), Ok(Some(_)))
            || (graceful && tokio::time::timeout(grace, child.wait()).await.is_ok());
        if !exited {
            began = tokio::time::Instant::now();
            stopped_any = true;
            let _ = killpg(group, Signal::SIGTERM);
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                let _ = killpg(group, Signal::SIGKILL);
                let _ = child.wait().await;
            }
        }
    }
    // Members of the group the program started and left behind.
    if killpg(group, None).is_ok() {
        if !stopped_any {
            began = tokio::time::Instant::now();
            stopped_any = true;
        }
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + grace;
        while killpg(group, None).is_ok() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = killpg(group, Signal::SIGKILL);
    }
    if stopped_any {
        PROCESS_STOPS.record(began.elapsed());
    }
}

async fn write_stdin(mut stdin: tokio::process::ChildStdin, payload: Vec<u8>) {
    // A program that exits without reading its stdin is fine: the broken pipe is ignored.
    if stdin.write_all(&payload).await.is_ok() {
        let _ = stdin.shutdown().await;
    }
}

/// Where stderr lines are logged.
struct StderrLog {
    agent: Arc<str>,
    interaction: String,
}

/// Logs the first lines of stderr and keeps its last bytes for the error message.
async fn read_stderr(
    stderr: tokio::process::ChildStderr,
    tail: Arc<Mutex<Vec<u8>>>,
    log: StderrLog,
) {
    let mut stderr = BufReader::new(stderr);
    let mut line = Vec::new();
    let mut logged = 0usize;
    let mut dropped = 0usize;
    loop {
        line.clear();
        let read = (&mut stderr)
            .take(STDERR_LOG_LINE_BYTES as u64 * 4)
            .read_until(b'\n', &mut line)
            .await;
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if let Ok(mut tail) = tail.lock() {
            tail.extend_from_slice(&line);
            if tail.len() > STDERR_TAIL_BYTES {
                let cut = tail.len() - STDERR_TAIL_BYTES;
                tail.drain(..cut);
            }
        }
        if logged < STDERR_LOG_LINES {
            logged += 1;
            let shown = &line[..line.len().min(STDERR_LOG_LINE_BYTES)];
            let text = String::from_utf8_lossy(shown);
            tracing::info!(
                target: crate::logs::AGENT_STDERR,
                agent = %log.agent,
                interaction = %log.interaction,
                "agent stderr: {}",
                text.trim_end()
            );
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        tracing::info!(
            target: crate::logs::AGENT_STDERR,
            agent = %log.agent,
            interaction = %log.interaction,
            "agent stderr: {dropped} further lines not logged"
        );
    }
}
