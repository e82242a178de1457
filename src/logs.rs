//! What may reach the logs: ids, sizes and codes, never message content, responses, contexts
//! or frame payloads — at any level, from Baton or from a library it uses.
//!
//! Baton's own log lines name interactions, sessions and sizes only. Some libraries log
//! payloads at their `debug` or `trace` levels (tungstenite whole WebSocket frames,
//! tokio-postgres the parameters of every statement, axum the text of rejections); those
//! targets are capped at `info` whatever `BATON_LOG` asks for.

use tracing_subscriber::filter::{LevelFilter, Targets};

/// Libraries whose `debug` and `trace` lines may hold user data.
const PAYLOAD_TARGETS: &[&str] = &[
    "tungstenite",
    "tokio_tungstenite",
    "tokio_postgres",
    "postgres_protocol",
    "hyper",
    "hyper_util",
    "reqwest",
    "axum",
    "tower_http",
];

/// A filter layered over the configured one: everything it allows, except `debug` and
/// `trace` of `PAYLOAD_TARGETS`.
pub fn payload_caps() -> Targets {
    PAYLOAD_TARGETS.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |targets, target| targets.with_target(*target, LevelFilter::INFO),
    )
}

/// The target of a `command` program's stderr lines: what the program writes is its own,
/// and may hold what it was given; `BATON_LOG=info,agent_stderr=off` keeps it out.
pub const AGENT_STDERR: &str = "agent_stderr";
