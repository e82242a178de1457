//! The command-line clients, one file per command or family; and how every command ends:
//! what it writes to stdout, its exit code, its error line on stderr.

mod chat;
mod send;
mod sessions;
mod watch;

use std::io::Write;
use std::process::ExitCode;

use crate::client::ServerError;

pub use chat::{EXIT_INTERRUPTED, chat};
pub use send::{EXIT_WAITING, send};
pub use sessions::{answer, cancel, delete, sessions};
pub use watch::{history, watch};

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

/// Writes a line to stderr: hints and notes that are not the command's output.
fn say(line: &str) {
    // Nothing more can be done when stderr is closed.
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// The address to print for a browser on this machine: a server listening on every
/// interface (`0.0.0.0`, `::`) is reached at the loopback address, which a browser can open.
pub fn reachable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// A refused WebSocket operation said in a user's words. The server answers a read token's
/// write with `forbidden` in its own terms (which ops it allows); every other credential may
/// use every op of its session, so a `forbidden` op means the credential can only read.
pub fn read_only_refusal(error: ServerError) -> ServerError {
    if error.code != "forbidden" {
        return error;
    }
    ServerError {
        message: "these credentials can only read this session (a read token): sending, \
                  cancelling, clearing and answering need a write token or an API key"
            .into(),
        ..error
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
