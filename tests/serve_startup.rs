//! `baton serve` as a script sees it: the "listening" line means requests are served, a
//! configuration that cannot work refuses to start with a precise message, and logs written
//! to a pipe carry no colour codes.

mod common;

use std::io::{BufRead, BufReader, Read};

use common::TIMEOUT;
use common::child::{Baton, baton, finish};

fn serve(args: &[&str], log: Option<&str>) -> Baton {
    let mut command = baton();
    command.arg("serve").args(args);
    match log {
        Some(filter) => command.env("BATON_LOG", filter),
        None => command.env_remove("BATON_LOG"),
    };
    Baton(command.spawn().expect("start baton serve"))
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("baton.toml");
    std::fs::write(&path, text).expect("write config");
    path.to_string_lossy().into_owned()
}

#[test]
fn the_listening_line_is_not_printed_when_the_database_cannot_open() {
    let child = serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--database",
            "sqlite:///nonexistent-dir/for-sure/baton.db",
        ],
        Some("warn"),
    );
    let (code, stdout, stderr) = finish(child);
    assert_ne!(code, 0, "{stderr}");
    assert!(
        !stdout.contains("listening"),
        "nothing may claim a server is up: {stdout:?}"
    );
    assert!(stderr.contains("opening the database"), "{stderr}");
}

#[test]
fn once_the_listening_line_is_printed_requests_are_served_and_logs_have_no_colour() {
    let dir = tempfile::tempdir().expect("tempdir");
    let database = format!("sqlite://{}/baton.db", dir.path().display());
    let mut child = serve(&["--listen", "127.0.0.1:0", "--database", &database], None);
    let mut stdout = BufReader::new(child.0.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("the listening line");
    let addr = line
        .trim()
        .strip_prefix("baton listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    // Straight after the line, a request is answered (no retry loop).
    let mut socket = std::net::TcpStream::connect(&addr).expect("connect");
    socket
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    std::io::Write::write_all(
        &mut socket,
        b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .expect("request");
    let mut answer = String::new();
    socket.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // SIGTERM: a graceful stop, whose log lines went to a pipe.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal");
    let (code, _, stderr) = finish(child);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("baton serving"),
        "info logs by default: {stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "no ANSI codes in a pipe: {stderr:?}"
    );
}

#[test]
fn a_configuration_without_the_default_agent_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(&dir, "[agents.slow]\nkind = \"echo\"\ndelay_ms = 100\n");
    let child = serve(
        &["--config", &config, "--listen", "127.0.0.1:0"],
        Some("warn"),
    );
    let (code, stdout, stderr) = finish(child);
    assert_ne!(code, 0);
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(
        stderr.contains("\"default\"") && stderr.contains("slow"),
        "names what is missing and what there is: {stderr}"
    );
}

#[test]
fn an_invalid_log_filter_is_an_error() {
    let child = serve(&["--listen", "127.0.0.1:0"], Some("baton=loud"));
    let (code, stdout, stderr) = finish(child);
    assert_ne!(code, 0);
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(
        stderr.contains("BATON_LOG") && stderr.contains("baton=loud"),
        "{stderr}"
    );
}

#[test]
fn a_bad_key_in_an_agent_table_is_pointed_at() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (text, line, what) in [
        (
            "[agents.default]\nkind = \"echo\"\n\n[agents.slow]\nkind = \"echo\"\ndelay_ms = \"fast\"\n",
            6,
            "delay_ms",
        ),
        (
            "[agents.default]\nkind = \"echo\"\ndealy_ms = 3\n",
            3,
            "dealy_ms",
        ),
        (
            "[agents.default]\nkind = \"echo\"\nprogram = \"python3\"\n",
            3,
            "program",
        ),
        (
            "[agents.default]\nkind = \"command\"\nargs = [\"x\"]\n",
            1,
            "program",
        ),
    ] {
        let config = write_config(&dir, text);
        let child = serve(
            &["--config", &config, "--listen", "127.0.0.1:0"],
            Some("warn"),
        );
        let (code, _, stderr) = finish(child);
        assert_ne!(code, 0, "{text}");
        assert!(
            stderr.contains(&format!("line {line}")) && stderr.contains(what),
            "{text:?} → {stderr}"
        );
    }
}
