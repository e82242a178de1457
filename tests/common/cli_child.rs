//! `baton`'s command-line clients as child processes, for the `tests/cli_*.rs` suites: a short
//! command run to its end, and a long one (`chat`) whose stdin the test writes and whose
//! stdout it reads as it comes. Included with `#[path]`, so it stands alone.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

pub const TIMEOUT: Duration = Duration::from_secs(30);

/// `baton` with none of the caller's environment that would change its behaviour.
pub fn command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_baton"));
    command
        .args(args)
        .env("BATON_LOG", "warn")
        .env_remove("BATON_KEY")
        .env_remove("BATON_TENANT")
        .env_remove("BATON_SERVER")
        .env_remove("SSL_CERT_FILE");
    command
}

/// Runs `baton ARGS` with `env` to its end (on a blocking thread).
pub async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = command(args);
    for (name, value) in env {
        command.env(name, value);
    }
    command.stdin(Stdio::null());
    tokio::task::spawn_blocking(move || command.output().expect("run baton"))
        .await
        .expect("join")
}

/// Runs `baton ARGS` with `input` on its stdin (a pipe, then closed).
pub async fn run_with_input(args: &[&str], env: &[(&str, &str)], input: &str) -> Output {
    let mut command = command(args);
    for (name, value) in env {
        command.env(name, value);
    }
    let input = input.to_string();
    tokio::task::spawn_blocking(move || {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start baton");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input.as_bytes()).expect("write stdin");
        drop(stdin);
        let child = Running::wrap(child);
        child.wait_output()
    })
    .await
    .expect("join")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A running `baton` with piped stdin and stdout (stdout read by a thread as it comes),
/// killed when dropped.
pub struct Running {
    child: Option<Child>,
    pub stdin: Option<ChildStdin>,
    output: Option<Receiver<String>>,
    pub seen: String,
}

impl Running {
    /// Starts `baton ARGS` with stdin and stdout piped.
    pub fn start(args: &[&str]) -> Self {
        let mut child = command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start baton");
        let stdin = child.stdin.take();
        let mut running = Self::wrap(child);
        running.stdin = stdin;
        running
    }

    fn wrap(mut child: Child) -> Self {
        let mut stdout = child.stdout.take().expect("stdout");
        let (tx, output) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 1024];
            while let Ok(n) = stdout.read(&mut buffer) {
                if n == 0
                    || tx
                        .send(String::from_utf8_lossy(&buffer[..n]).into_owned())
                        .is_err()
                {
                    break;
                }
            }
        });
        Self {
            child: Some(child),
            stdin: None,
            output: Some(output),
            seen: String::new(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("child").id() as i32
    }

    pub fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("write stdin");
    }

    /// Reads stdout until `needle` has appeared; panics after [`TIMEOUT`].
    pub fn read_until(&mut self, needle: &str) {
        let deadline = Instant::now() + TIMEOUT;
        let output = self.output.as_ref().expect("output");
        while !self.seen.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match output.recv_timeout(left) {
                Ok(chunk) => self.seen.push_str(&chunk),
                Err(RecvTimeoutError::Timeout) => panic!("no {needle:?} in {:?}", self.seen),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("stdout ended without {needle:?}: {:?}", self.seen)
                }
            }
        }
    }

    /// Whether the child has exited.
    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .expect("child")
            .try_wait()
            .expect("wait")
            .is_some()
    }

    /// Waits for the child to exit (panics after [`TIMEOUT`]): its status, all of its stdout
    /// (what was read before included) and its stderr.
    pub fn wait_output(mut self) -> Output {
        let mut child = self.child.take().expect("child");
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("baton did not exit; stdout so far: {:?}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stdout = std::mem::take(&mut self.seen);
        if let Some(output) = self.output.take() {
            // The reader thread ends with the child's stdout.
            while let Ok(chunk) = output.recv_timeout(Duration::from_secs(5)) {
                stdout.push_str(&chunk);
            }
        }
        let mut stderr = Vec::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_end(&mut stderr);
        }
        Output {
            status,
            stdout: stdout.into_bytes(),
            stderr,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
