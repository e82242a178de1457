//! A real `baton` binary as a child process: short commands, and `baton serve` on a config
//! file in a test's directory (its stderr, the log, kept for the test to read).

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(30);

/// A `baton` child, killed when dropped.
pub struct Baton(pub Child);

impl Drop for Baton {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `baton` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_baton");

/// `baton`, with no stdin, its output piped, and none of the caller's `BATON_KEY`,
/// `BATON_TENANT` and `BATON_LISTEN` (a test sets what it means to).
pub fn baton() -> Command {
    let mut command = Command::new(BIN);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("BATON_KEY")
        .env_remove("BATON_TENANT")
        .env_remove("BATON_LISTEN");
    command
}

/// The URL of `baton serve`'s `baton listening on URL` line, read from its stdout by a thread
/// that goes on draining it so the child never blocks on it; `None` when the child closed its
/// stdout (it exited) or printed no such line within the timeout.
pub fn listening_url(stdout: ChildStdout) -> Option<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("baton listening on ") {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    rx.recv_timeout(TIMEOUT).ok()
}

/// Runs a short-lived `baton` command: exit code, stdout, stderr.
pub fn run(command: &mut Command) -> (i32, String, String) {
    let child = Baton(command.spawn().expect("start baton"));
    finish(child)
}

pub fn finish(mut child: Baton) -> (i32, String, String) {
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "baton did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.0.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    if let Some(mut err) = child.0.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    (status.code().unwrap_or(-1), stdout, stderr)
}

/// A started `baton serve` and the URL of its listening line.
pub fn serve(dir: &tempfile::TempDir, config: &str, env: &[(&str, &str)]) -> (Baton, String) {
    let database = format!("sqlite://{}/baton.db", dir.path().display());
    serve_on(dir, config, &database, env)
}

/// [`serve`] on the database `database`.
pub fn serve_on(
    dir: &tempfile::TempDir,
    config: &str,
    database: &str,
    env: &[(&str, &str)],
) -> (Baton, String) {
    let path = dir.path().join("baton.toml");
    std::fs::write(&path, config).expect("write config");
    let mut command = baton();
    command
        .args(["serve", "--config"])
        .arg(&path)
        .args(["--database", database, "--listen", "127.0.0.1:0"])
        .env("BATON_LOG", "trace");
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = Baton(command.spawn().expect("start baton serve"));
    let mut stdout = BufReader::new(child.0.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("the listening line");
    let url = line
        .trim()
        .strip_prefix("baton listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    // Keep reading stdout so the child never blocks on it.
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = stdout.read_to_string(&mut rest);
    });
    (child, url)
}

/// Stops a `baton serve` child with SIGTERM, as an operator would; it must exit cleanly.
/// Its log (stderr).
pub fn terminate(child: Baton) -> String {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal");
    let (code, _, log) = finish(child);
    assert_eq!(code, 0, "{log}");
    log
}
