//! Settings: defaults, overridden by a TOML file (`--config`), overridden by `BATON_*`
//! environment variables, overridden by command-line flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use toml::Spanned;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";
/// Default database URL: an SQLite file in the working directory.
pub const DEFAULT_DATABASE: &str = "sqlite://baton.db";
/// The agent a session gets when it names none.
pub const DEFAULT_AGENT: &str = "default";
/// How long an interaction waits for the client's answer by default: a day.
pub const DEFAULT_INPUT_TIMEOUT_S: f64 = 86_400.0;

/// Everything `baton serve` needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `HOST:PORT` to listen on.
    pub listen: String,
    /// `sqlite://PATH`, or `postgres://…` for several nodes sharing one database.
    pub database: String,
    /// PostgreSQL: events older than this many hours are deleted.
    pub retention_hours: f64,
    /// PostgreSQL: `task.delta` events of interactions final for longer than this are deleted
    /// (the final event carries the whole response).
    pub compact_deltas_after_s: f64,
    /// PostgreSQL: connections in each node's pool at most.
    pub pg_pool_size: usize,
    /// PostgreSQL: seconds a node's heartbeat keeps it alive; a node silent for longer is
    /// considered lost and its running interactions fail as `interrupted`.
    pub node_lease_s: f64,
    /// Most `queued` interactions a session holds under policy `enqueue`.
    pub queue_limit: u32,
    /// Largest accepted request body (and WebSocket frame), in bytes.
    pub max_body_bytes: usize,
    /// SQLite durability: `normal` survives a process crash, `full` also a power loss.
    pub sqlite_synchronous: Synchronous,
    /// Completed interactions of the current epoch handed to an agent as history.
    pub history_limit: u32,
    /// How long shutdown waits for running tasks to record their cancellation, in ms.
    pub shutdown_grace_ms: u64,
    /// Open WebSocket and SSE connections, in total.
    pub max_connections: usize,
    /// Open WebSocket and SSE connections per session.
    pub max_connections_per_session: usize,
    /// Open WebSocket and SSE connections per tenant; absent: half of `max_connections` with
    /// access control on (all of them without: there is one tenant then).
    pub max_connections_per_tenant: Option<usize>,
    /// Sessions one tenant may hold; absent: unlimited.
    pub max_sessions_per_tenant: Option<u64>,
    /// Largest context (serialized JSON, in bytes) a write or patch may leave.
    pub max_context_bytes: usize,
    /// Seconds between the server's WebSocket pings; a peer silent for two is dropped.
    pub ws_ping_interval_s: f64,
    /// Sustained operations per second on one WebSocket (bursts up to twice that).
    pub ws_ops_per_second: f64,
    /// Seconds a connection has to send the complete head of its next request, counted from
    /// when it is ready for one: slow heads and idle keep-alive connections are closed.
    pub http_header_timeout_s: f64,
    /// Seconds a request's whole body has to arrive.
    pub http_body_timeout_s: f64,
    /// Plain HTTP connections served at once; past it, new ones wait to be accepted.
    pub max_http_connections: usize,
    /// Access control (`[auth]`); absent: open, and only on a loopback `listen`.
    pub auth: Option<AuthConfig>,
    /// PEM certificate chain: with `tls_key`, Baton serves HTTPS and WSS itself.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Configured agents by name.
    #[serde(skip)]
    pub agents: BTreeMap<String, AgentConfig>,
    /// The `[agents.*]` tables as written, turned into `agents` by [`Config::from_toml`]: read
    /// key by key (not through serde's buffering of tagged enums), so an error points at the
    /// key that caused it.
    #[serde(rename = "agents")]
    agent_tables: BTreeMap<String, Spanned<AgentTable>>,
}

impl Default for Config {
    fn default() -> Self {
        let mut agents = BTreeMap::new();
        agents.insert(
            DEFAULT_AGENT.to_string(),
            AgentConfig::Echo(EchoConfig::default()),
        );
        Self {
            listen: DEFAULT_LISTEN.into(),
            database: DEFAULT_DATABASE.into(),
            pg_pool_size: 16,
            retention_hours: 24.0,
            compact_deltas_after_s: 300.0,
            node_lease_s: 10.0,
            queue_limit: 16,
            max_body_bytes: 1024 * 1024,
            sqlite_synchronous: Synchronous::Normal,
            history_limit: 50,
            shutdown_grace_ms: 5_000,
            max_connections: 20_000,
            max_connections_per_session: 5_000,
            max_connections_per_tenant: None,
            max_sessions_per_tenant: None,
            max_context_bytes: crate::store::DEFAULT_MAX_CONTEXT_BYTES,
            ws_ping_interval_s: 30.0,
            ws_ops_per_second: 100.0,
            http_header_timeout_s: 30.0,
            http_body_timeout_s: 60.0,
            max_http_connections: 10_000,
            auth: None,
            tls_cert: None,
            tls_key: None,
            agents,
            agent_tables: BTreeMap::new(),
        }
    }
}

/// The `[auth]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `keys` (the default once `[auth]` is written) or `none` (open, on purpose).
    #[serde(default)]
    pub mode: AuthMode,
    /// Environment variables holding the HMAC secrets of session tokens: the first signs,
    /// all verify (rotation).
    #[serde(default)]
    pub token_secret_env: Vec<String>,
    /// Secrets handed over directly by a program that embeds Baton (tests, Rust embedders),
    /// before those of `token_secret_env`; a configuration file names variables instead.
    #[serde(skip)]
    pub token_secrets: Vec<String>,
    /// Browser origins allowed to call the API (CORS); `"*"` for any.
    #[serde(default)]
    pub cors_origins: Vec<String>,
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
}

/// `[auth] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Every request acts as tenant `default`, with no credentials.
    None,
    /// Everything under `/v1` needs an API key or a session token.
    #[default]
    Keys,
}

/// A key's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyRole {
    /// Acts on its own tenant's sessions.
    #[default]
    Tenant,
    /// Acts on its tenant, or on the one named by `Baton-Tenant`; reads `/metrics`.
    Admin,
}

/// One `[[auth.keys]]` entry. The key itself is never in the configuration, only its hash.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// A name for logs and metrics; not secret.
    pub id: String,
    pub tenant: String,
    #[serde(default)]
    pub role: KeyRole,
    /// Hex SHA-256 of the key.
    pub sha256: String,
    /// Requests per second for this key (bursts up to twice that); absent: unlimited.
    pub rate_per_s: Option<f64>,
}

impl AuthConfig {
    fn validate(&self) -> anyhow::Result<()> {
        let mut ids = std::collections::BTreeSet::new();
        let mut hashes = std::collections::BTreeSet::new();
        for (i, key) in self.keys.iter().enumerate() {
            let at = format!("auth.keys[{i}]");
            if key.id.trim().is_empty() {
                bail!("{at}.id must not be empty");
            }
            if !ids.insert(key.id.as_str()) {
                bail!("{at}.id {:?} is given to two keys", key.id);
            }
            if let Err(e) = crate::model::Tenant::parse(&key.tenant) {
                bail!("{at}.tenant {:?}: {e}", key.tenant);
            }
            let hash = key.sha256.trim().to_ascii_lowercase();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!(
                    "{at}.sha256 must be the 64 hex digits of the key's SHA-256 \
                     (`baton key new` prints it)"
                );
            }
            if !hashes.insert(hash) {
                bail!("{at}.sha256: two keys have the same hash");
            }
            if let Some(rate) = key.rate_per_s
                && !(rate.is_finite() && rate > 0.0)
            {
                bail!("{at}.rate_per_s must be a positive number");
            }
        }
        if self.mode == AuthMode::Keys && self.keys.is_empty() {
            bail!(
                "[auth] mode = \"keys\" needs at least one [[auth.keys]] entry: \
                 `baton key new --tenant NAME` makes one"
            );
        }
        for name in &self.token_secret_env {
            if name.trim().is_empty() {
                bail!("auth.token_secret_env holds an empty variable name");
            }
        }
        for origin in &self.cors_origins {
            let ok = origin == "*"
                || ((origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.ends_with('/'));
            if !ok {
                bail!(
                    "auth.cors_origins: {origin:?} is not an origin \
                     (scheme://host[:port], no path) or \"*\""
                );
            }
        }
        Ok(())
    }
}

/// Whether `listen` (`HOST:PORT`) only accepts connections from this machine.
pub fn is_loopback(listen: &str) -> bool {
    let host = match listen.rsplit_once(':') {
        Some((host, _)) => host,
        None => listen,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// SQLite's `synchronous` pragma in WAL mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// No fsync per commit: a process crash loses nothing, a power loss may lose the last commits.
    #[default]
    Normal,
    /// fsync per (group) commit: durable across power loss.
    Full,
}

/// One configured agent, selected by `kind`.
#[derive(Debug, Clone)]
pub enum AgentConfig {
    Echo(EchoConfig),
    Command(CommandConfig),
    Openai(OpenaiConfig),
}

impl AgentConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            AgentConfig::Echo(_) => "echo",
            AgentConfig::Command(_) => "command",
            AgentConfig::Openai(_) => "openai",
        }
    }

    /// How long an interaction of this agent may wait for the client's answer before it is
    /// cancelled with reason `timeout` (default: a day).
    pub fn input_timeout_s(&self) -> f64 {
        match self {
            AgentConfig::Echo(c) => c.input_timeout_s,
            AgentConfig::Command(c) => c.input_timeout_s,
            AgentConfig::Openai(c) => c.input_timeout_s,
        }
        .unwrap_or(DEFAULT_INPUT_TIMEOUT_S)
    }

    /// Longest a task of this agent may run before it is cancelled with reason `timeout`.
    pub fn timeout_s(&self) -> Option<f64> {
        match self {
            AgentConfig::Echo(c) => c.timeout_s,
            AgentConfig::Command(c) => c.timeout_s,
            AgentConfig::Openai(c) => c.timeout_s,
        }
    }

    /// Completed interactions handed to the agent as history, when it overrides `history_limit`.
    pub fn max_history(&self) -> Option<u32> {
        match self {
            AgentConfig::Echo(_) => None,
            AgentConfig::Command(c) => c.max_history,
            AgentConfig::Openai(c) => c.max_history,
        }
    }

    fn validate(&self, name: &str) -> anyhow::Result<()> {
        if let Some(t) = self.timeout_s()
            && !(t.is_finite() && t > 0.0)
        {
            bail!("agents.{name}.timeout_s must be a positive number of seconds");
        }
        let wait = self.input_timeout_s();
        if !(wait.is_finite() && wait > 0.0) {
            bail!("agents.{name}.input_timeout_s must be a positive number of seconds");
        }
        match self {
            AgentConfig::Echo(_) => {}
            AgentConfig::Command(c) => {
                if c.program.trim().is_empty() {
                    bail!("agents.{name}.program must name a program");
                }
                if c.max_line_bytes < 64 {
                    bail!("agents.{name}.max_line_bytes must be at least 64");
                }
                if c.max_output_bytes < c.max_line_bytes {
                    bail!("agents.{name}.max_output_bytes must be at least max_line_bytes");
                }
                if let Some(cwd) = &c.cwd
                    && !cwd.is_dir()
                {
                    bail!("agents.{name}.cwd {}: not a directory", cwd.display());
                }
            }
            AgentConfig::Openai(c) => {
                let url = c.base_url.trim();
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    bail!("agents.{name}.base_url {url:?}: expected an http:// or https:// URL");
                }
                if c.model.trim().is_empty() {
                    bail!("agents.{name}.model must name a model");
                }
                if let Some(t) = c.temperature
                    && !(t.is_finite() && (0.0..=2.0).contains(&t))
                {
                    bail!("agents.{name}.temperature must be between 0 and 2");
                }
                for (key, value) in [
                    ("connect_timeout_s", c.connect_timeout_s),
                    ("idle_timeout_s", c.idle_timeout_s),
                ] {
                    if !(value.is_finite() && value > 0.0) {
                        bail!("agents.{name}.{key} must be a positive number of seconds");
                    }
                }
            }
        }
        Ok(())
    }
}

/// An `[agents.NAME]` table as written: every key of every kind, each with its place.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentTable {
    kind: Spanned<String>,
    delay_ms: Option<Spanned<u64>>,
    timeout_s: Option<Spanned<f64>>,
    input_timeout_s: Option<Spanned<f64>>,
    program: Option<Spanned<String>>,
    args: Option<Spanned<Vec<String>>>,
    env: Option<Spanned<BTreeMap<String, String>>>,
    cwd: Option<Spanned<PathBuf>>,
    kill_grace_ms: Option<Spanned<u64>>,
    max_line_bytes: Option<Spanned<usize>>,
    max_output_bytes: Option<Spanned<usize>>,
    max_history: Option<Spanned<u32>>,
    base_url: Option<Spanned<String>>,
    model: Option<Spanned<String>>,
    api_key_env: Option<Spanned<String>>,
    system: Option<Spanned<String>>,
    temperature: Option<Spanned<f64>>,
    max_tokens: Option<Spanned<u32>>,
    tools: Option<Spanned<Vec<toml::Value>>>,
    retries: Option<Spanned<u32>>,
    retry_backoff_ms: Option<Spanned<u64>>,
    connect_timeout_s: Option<Spanned<f64>>,
    idle_timeout_s: Option<Spanned<f64>>,
}

const ECHO_KEYS: &[&str] = &["kind", "delay_ms", "timeout_s", "input_timeout_s"];
const COMMAND_KEYS: &[&str] = &[
    "kind",
    "program",
    "args",
    "env",
    "cwd",
    "timeout_s",
    "input_timeout_s",
    "kill_grace_ms",
    "max_line_bytes",
    "max_output_bytes",
    "max_history",
];
const OPENAI_KEYS: &[&str] = &[
    "kind",
    "base_url",
    "model",
    "api_key_env",
    "system",
    "temperature",
    "max_tokens",
    "tools",
    "timeout_s",
    "input_timeout_s",
    "max_history",
    "retries",
    "retry_backoff_ms",
    "connect_timeout_s",
    "idle_timeout_s",
];

/// An error in an agent table, at a byte range of the file.
struct TableError {
    span: std::ops::Range<usize>,
    message: String,
}

impl TableError {
    /// The message with the line, column and text it is about, like the TOML parser's own.
    fn located(&self, text: &str, agent: &str) -> String {
        let start = self.span.start.min(text.len());
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let line_number = text[..start].matches('\n').count() + 1;
        let column = text[line_start..start].chars().count() + 1;
        let width = self.span.end.min(line_end).saturating_sub(start).max(1);
        let gutter = " ".repeat(line_number.to_string().len());
        format!(
            "TOML parse error at line {line_number}, column {column}\n{gutter} |\n{line_number} | {}\n{gutter} | {}{}\nagents.{agent}: {}",
            &text[line_start..line_end],
            " ".repeat(column - 1),
            "^".repeat(width),
            self.message
        )
    }
}

fn value<T>(key: Option<Spanned<T>>) -> Option<T> {
    key.map(Spanned::into_inner)
}

impl AgentTable {
    /// Every key present, with its place.
    fn present(&self) -> Vec<(&'static str, std::ops::Range<usize>)> {
        fn at<T>(
            name: &'static str,
            key: &Option<Spanned<T>>,
        ) -> Option<(&'static str, std::ops::Range<usize>)> {
            key.as_ref().map(|k| (name, k.span()))
        }
        [
            at("delay_ms", &self.delay_ms),
            at("timeout_s", &self.timeout_s),
            at("input_timeout_s", &self.input_timeout_s),
            at("program", &self.program),
            at("args", &self.args),
            at("env", &self.env),
            at("cwd", &self.cwd),
            at("kill_grace_ms", &self.kill_grace_ms),
            at("max_line_bytes", &self.max_line_bytes),
            at("max_output_bytes", &self.max_output_bytes),
            at("max_history", &self.max_history),
            at("base_url", &self.base_url),
            at("model", &self.model),
            at("api_key_env", &self.api_key_env),
            at("system", &self.system),
            at("temperature", &self.temperature),
            at("max_tokens", &self.max_tokens),
            at("tools", &self.tools),
            at("retries", &self.retries),
            at("retry_backoff_ms", &self.retry_backoff_ms),
            at("connect_timeout_s", &self.connect_timeout_s),
            at("idle_timeout_s", &self.idle_timeout_s),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// The typed agent, or the first key that does not belong to its kind (or is missing).
    fn into_agent(self, table: std::ops::Range<usize>) -> Result<AgentConfig, TableError> {
        let kind = self.kind.get_ref().as_str();
        let keys = match kind {
            "echo" => ECHO_KEYS,
            "command" => COMMAND_KEYS,
            "openai" => OPENAI_KEYS,
            other => {
                return Err(TableError {
                    span: self.kind.span(),
                    message: format!(
                        "unknown agent kind {other:?}, expected \"echo\", \"command\" or \"openai\""
                    ),
                });
            }
        };
        if let Some((key, span)) = self
            .present()
            .into_iter()
            .find(|(key, _)| !keys.contains(key))
        {
            return Err(TableError {
                span,
                message: format!(
                    "`{key}` is not a key of a {kind} agent (its keys: {})",
                    keys.join(", ")
                ),
            });
        }
        let required = |key: Option<Spanned<String>>, name: &str| {
            value(key).ok_or_else(|| TableError {
                span: table.clone(),
                message: format!("a {kind} agent needs `{name}`"),
            })
        };
        Ok(match kind {
            "echo" => AgentConfig::Echo(EchoConfig {
                delay_ms: value(self.delay_ms).unwrap_or_default(),
                timeout_s: value(self.timeout_s),
                input_timeout_s: value(self.input_timeout_s),
            }),
            "command" => {
                let defaults = CommandConfig::new(String::new(), Vec::new());
                AgentConfig::Command(CommandConfig {
                    program: required(self.program, "program")?,
                    args: value(self.args).unwrap_or_default(),
                    env: value(self.env).unwrap_or_default(),
                    cwd: value(self.cwd),
                    timeout_s: value(self.timeout_s),
                    input_timeout_s: value(self.input_timeout_s),
                    kill_grace_ms: value(self.kill_grace_ms).unwrap_or(defaults.kill_grace_ms),
                    max_line_bytes: value(self.max_line_bytes).unwrap_or(defaults.max_line_bytes),
                    max_output_bytes: value(self.max_output_bytes)
                        .unwrap_or(defaults.max_output_bytes),
                    max_history: value(self.max_history),
                })
            }
            _ => {
                let base_url = required(self.base_url, "base_url")?;
                let model = required(self.model, "model")?;
                let defaults = OpenaiConfig::new(String::new(), String::new());
                AgentConfig::Openai(OpenaiConfig {
                    base_url,
                    model,
                    api_key_env: value(self.api_key_env),
                    system: value(self.system),
                    temperature: value(self.temperature),
                    max_tokens: value(self.max_tokens),
                    tools: match self.tools {
                        Some(tools) => Some(tool_definitions(tools)?),
                        None => None,
                    },
                    timeout_s: value(self.timeout_s),
                    input_timeout_s: value(self.input_timeout_s),
                    max_history: value(self.max_history),
                    retries: value(self.retries).unwrap_or(defaults.retries),
                    retry_backoff_ms: value(self.retry_backoff_ms)
                        .unwrap_or(defaults.retry_backoff_ms),
                    connect_timeout_s: value(self.connect_timeout_s)
                        .unwrap_or(defaults.connect_timeout_s),
                    idle_timeout_s: value(self.idle_timeout_s).unwrap_or(defaults.idle_timeout_s),
                })
            }
        })
    }
}

/// `tools` as JSON: each an OpenAI tool (`{type = "function", function = {name, …}}`), or a
/// bare function definition (`{name, description?, parameters?}`), which gets wrapped.
fn tool_definitions(
    tools: Spanned<Vec<toml::Value>>,
) -> Result<Vec<serde_json::Value>, TableError> {
    let span = tools.span();
    let refuse = |message: String| TableError {
        span: span.clone(),
        message,
    };
    tools
        .into_inner()
        .into_iter()
        .enumerate()
        .map(|(i, tool)| {
            let tool =
                serde_json::to_value(tool).map_err(|e| refuse(format!("tools[{i}]: {e}")))?;
            let tool = if tool.get("function").is_some() {
                tool
            } else {
                serde_json::json!({"type": "function", "function": tool})
            };
            if !tool["function"]["name"].is_string() {
                return Err(refuse(format!("tools[{i}] needs a function name")));
            }
            Ok(tool)
        })
        .collect()
}

/// The built-in echo agent.
#[derive(Debug, Clone, Default)]
pub struct EchoConfig {
    /// Pause before each word, in milliseconds.
    pub delay_ms: u64,
    pub timeout_s: Option<f64>,
    pub input_timeout_s: Option<f64>,
}

/// A program run once per task, speaking the JSON-lines protocol on stdin/stdout.
#[derive(Debug, Clone)]
pub struct CommandConfig {
    /// The program, run without a shell (looked up in `PATH` when it has no `/`).
    pub program: String,
    pub args: Vec<String>,
    /// Variables set for the program on top of the server's environment.
    pub env: BTreeMap<String, String>,
    /// Working directory of the program (default: the server's).
    pub cwd: Option<PathBuf>,
    pub timeout_s: Option<f64>,
    /// How long an interaction may wait for the client's answer (default a day).
    pub input_timeout_s: Option<f64>,
    /// Between SIGTERM to the process group and SIGKILL, in milliseconds.
    pub kill_grace_ms: u64,
    /// Longest stdout line accepted, in bytes.
    pub max_line_bytes: usize,
    /// Most stdout bytes one task may produce.
    pub max_output_bytes: usize,
    /// Overrides the server's `history_limit` for this agent.
    pub max_history: Option<u32>,
}

impl CommandConfig {
    fn default_kill_grace_ms() -> u64 {
        2_000
    }
    fn default_max_line_bytes() -> usize {
        1024 * 1024
    }
    fn default_max_output_bytes() -> usize {
        16 * 1024 * 1024
    }

    /// A config with every optional key at its default.
    pub fn new(program: impl Into<String>, args: Vec<String>) -> Self {
        Self {
            program: program.into(),
            args,
            env: BTreeMap::new(),
            cwd: None,
            timeout_s: None,
            input_timeout_s: None,
            kill_grace_ms: Self::default_kill_grace_ms(),
            max_line_bytes: Self::default_max_line_bytes(),
            max_output_bytes: Self::default_max_output_bytes(),
            max_history: None,
        }
    }
}

/// An OpenAI-compatible chat completions endpoint, streamed.
#[derive(Debug, Clone)]
pub struct OpenaiConfig {
    /// E.g. `https://api.openai.com/v1` or `http://127.0.0.1:11434/v1`.
    pub base_url: String,
    pub model: String,
    /// The environment variable holding the API key (the key itself never goes in the config).
    pub api_key_env: Option<String>,
    /// System prompt; `{{context}}` becomes the session's context as JSON and
    /// `{{context.KEY}}` one of its values.
    pub system: Option<String>,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
    /// OpenAI function definitions (`[[agents.NAME.tools]]` tables), passed as `tools`: a
    /// streamed `tool_calls` reply makes the interaction wait for the client's outputs.
    pub tools: Option<Vec<serde_json::Value>>,
    pub timeout_s: Option<f64>,
    /// How long an interaction may wait for the client's tool outputs (default a day).
    pub input_timeout_s: Option<f64>,
    /// Completed interactions sent as history (overrides the server's `history_limit`).
    pub max_history: Option<u32>,
    /// Retries, with backoff, of a request that failed before its first token.
    pub retries: u32,
    /// First retry delay in milliseconds; doubled at each retry.
    pub retry_backoff_ms: u64,
    /// Longest wait to connect to the endpoint.
    pub connect_timeout_s: f64,
    /// Longest silence of a reply's stream (before or between chunks) before it is given up.
    pub idle_timeout_s: f64,
}

impl OpenaiConfig {
    fn default_retries() -> u32 {
        2
    }
    fn default_retry_backoff_ms() -> u64 {
        250
    }
    fn default_connect_timeout_s() -> f64 {
        10.0
    }
    fn default_idle_timeout_s() -> f64 {
        60.0
    }

    /// A config with every optional key at its default.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            model: model.into(),
            api_key_env: None,
            system: None,
            temperature: None,
            max_tokens: None,
            tools: None,
            timeout_s: None,
            input_timeout_s: None,
            max_history: None,
            retries: Self::default_retries(),
            retry_backoff_ms: Self::default_retry_backoff_ms(),
            connect_timeout_s: Self::default_connect_timeout_s(),
            idle_timeout_s: Self::default_idle_timeout_s(),
        }
    }
}

/// Overrides given on the command line.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub listen: Option<String>,
    pub database: Option<String>,
}

impl Config {
    /// Loads the file (if any), then applies the process environment and the flags.
    pub fn load(overrides: &Overrides) -> anyhow::Result<Self> {
        let mut config = match &overrides.config_file {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        if let Some(listen) = &overrides.listen {
            config.listen = listen.clone();
        }
        if let Some(database) = &overrides.database {
            config.database = database.clone();
        }
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in config file {}", path.display()))
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let mut config: Config = toml::from_str(text)?;
        // Filled by serde from `Default`: the file's own tables replace it.
        config.agents.clear();
        for (name, table) in std::mem::take(&mut config.agent_tables) {
            let span = table.span();
            let agent = table
                .into_inner()
                .into_agent(span)
                .map_err(|e| anyhow::anyhow!(e.located(text, &name)))?;
            config.agents.insert(name, agent);
        }
        if config.agents.is_empty() {
            config.agents = Config::default().agents;
        }
        Ok(config)
    }

    /// Streams (WebSocket and SSE) one tenant may hold open at once: as set, or half of
    /// `max_connections` with access control on. Without it every request is tenant
    /// `default`, the only one, which then may use them all.
    pub fn connections_per_tenant(&self) -> usize {
        let tenants = self
            .auth
            .as_ref()
            .is_some_and(|auth| auth.mode == AuthMode::Keys);
        let default = if tenants {
            self.max_connections / 2
        } else {
            self.max_connections
        };
        self.max_connections_per_tenant.unwrap_or(default).max(1)
    }

    /// The bounds of the session rules.
    pub fn store_limits(&self) -> crate::store::Limits {
        crate::store::Limits {
            max_context_bytes: self.max_context_bytes,
            max_sessions_per_tenant: self.max_sessions_per_tenant,
        }
    }

    /// Every environment variable a `*_env` setting names (token secrets, agents' API keys):
    /// the server's secrets, which no program an agent runs inherits.
    pub fn secret_env_names(&self) -> std::collections::BTreeSet<String> {
        let mut names: std::collections::BTreeSet<String> = self
            .auth
            .iter()
            .flat_map(|auth| auth.token_secret_env.iter().cloned())
            .collect();
        for agent in self.agents.values() {
            if let AgentConfig::Openai(openai) = agent
                && let Some(name) = &openai.api_key_env
            {
                names.insert(name.clone());
            }
        }
        names
    }

    /// `BATON_LISTEN`, `BATON_DATABASE`, `BATON_QUEUE_LIMIT`, `BATON_MAX_BODY_BYTES`,
    /// `BATON_SQLITE_SYNCHRONOUS`, `BATON_HISTORY_LIMIT`.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        fn parsed<T: std::str::FromStr>(name: &str, value: String) -> anyhow::Result<T>
        where
            T::Err: std::fmt::Display,
        {
            value
                .trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("{name}={value:?}: {e}"))
        }
        if let Some(v) = var("BATON_LISTEN") {
            self.listen = v;
        }
        if let Some(v) = var("BATON_DATABASE") {
            self.database = v;
        }
        if let Some(v) = var("BATON_QUEUE_LIMIT") {
            self.queue_limit = parsed("BATON_QUEUE_LIMIT", v)?;
        }
        if let Some(v) = var("BATON_MAX_BODY_BYTES") {
            self.max_body_bytes = parsed("BATON_MAX_BODY_BYTES", v)?;
        }
        if let Some(v) = var("BATON_HISTORY_LIMIT") {
            self.history_limit = parsed("BATON_HISTORY_LIMIT", v)?;
        }
        if let Some(v) = var("BATON_SQLITE_SYNCHRONOUS") {
            self.sqlite_synchronous = match v.trim().to_ascii_lowercase().as_str() {
                "normal" => Synchronous::Normal,
                "full" => Synchronous::Full,
                other => bail!("BATON_SQLITE_SYNCHRONOUS={other:?}: expected normal or full"),
            };
        }
        Ok(())
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.max_body_bytes < 64 {
            bail!("max_body_bytes must be at least 64");
        }
        if !(self.ws_ping_interval_s.is_finite() && self.ws_ping_interval_s >= 0.1) {
            bail!("ws_ping_interval_s must be at least 0.1");
        }
        if !(self.node_lease_s.is_finite() && self.node_lease_s >= 0.5) {
            bail!("node_lease_s must be at least 0.5");
        }
        if !(self.retention_hours.is_finite() && self.retention_hours > 0.0) {
            bail!("retention_hours must be a positive number");
        }
        if !(self.compact_deltas_after_s.is_finite() && self.compact_deltas_after_s >= 0.0) {
            bail!("compact_deltas_after_s must be zero or more");
        }
        if self.pg_pool_size < 2 {
            bail!("pg_pool_size must be at least 2");
        }
        if !(self.ws_ops_per_second.is_finite() && self.ws_ops_per_second > 0.0) {
            bail!("ws_ops_per_second must be a positive number");
        }
        for (key, value) in [
            ("http_header_timeout_s", self.http_header_timeout_s),
            ("http_body_timeout_s", self.http_body_timeout_s),
        ] {
            if !(value.is_finite() && value >= 0.01) {
                bail!("{key} must be a number of seconds, at least 0.01");
            }
        }
        if self.max_http_connections == 0 {
            bail!("max_http_connections must be at least 1");
        }
        if self.max_connections_per_tenant == Some(0) {
            bail!("max_connections_per_tenant must be at least 1");
        }
        if self.max_sessions_per_tenant == Some(0) {
            bail!("max_sessions_per_tenant must be at least 1");
        }
        if self.max_context_bytes < 2 {
            bail!("max_context_bytes must be at least 2 (the empty context, {{}})");
        }
        match &self.auth {
            Some(auth) => auth.validate()?,
            None if !is_loopback(&self.listen) => bail!(
                "listen = {:?} is reachable from other machines, and access control is off. \
                 Add to the configuration file:\n\n\
                 [auth]\n\
                 mode = \"keys\"\n\n\
                 with the [[auth.keys]] block that `baton key new --tenant NAME` prints; \
                 or, to run open on purpose (behind a proxy that checks access), \
                 [auth] with mode = \"none\"",
                self.listen
            ),
            None => {}
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => bail!("tls_cert is set without tls_key"),
            (None, Some(_)) => bail!("tls_key is set without tls_cert"),
            _ => {}
        }
        check_default_agent(self.agents.keys().map(String::as_str))?;
        for (name, agent) in &self.agents {
            if name.is_empty() {
                bail!("an agent name must not be empty");
            }
            agent.validate(name)?;
        }
        self.database_location()?;
        Ok(())
    }

    /// Where the database lives, parsed from the `database` URL.
    pub fn database_location(&self) -> anyhow::Result<DatabaseLocation> {
        DatabaseLocation::parse(&self.database)
    }
}

/// A session that names no agent runs [`DEFAULT_AGENT`]: a configuration without it would
/// start, then fail every new session's first message, so it does not start.
pub fn check_default_agent<'a>(names: impl Iterator<Item = &'a str>) -> anyhow::Result<()> {
    let configured: Vec<&str> = names.collect();
    if configured.contains(&DEFAULT_AGENT) {
        return Ok(());
    }
    bail!(
        "no agent is named {DEFAULT_AGENT:?}, and sessions that name no agent run it: add \
         [agents.{DEFAULT_AGENT}] to the configuration (configured agents: {})",
        configured.join(", ")
    )
}

/// A parsed `database` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseLocation {
    SqliteFile(PathBuf),
    /// A `postgres://` (or `postgresql://`) connection URL.
    Postgres(String),
}

impl DatabaseLocation {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            if path.is_empty() {
                bail!("database {url:?}: the SQLite URL names no file");
            }
            return Ok(Self::SqliteFile(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let parsed = crate::store::postgres_url(url).map_err(|e| anyhow::anyhow!(e))?;
            if let Err(e) = parsed.parse::<tokio_postgres::Config>() {
                bail!("database URL: {e}");
            }
            return Ok(Self::Postgres(url.to_string()));
        }
        bail!("database {url:?}: expected sqlite://PATH or postgres://USER@HOST/DB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn design_example_keys_parse() {
        let c = Config::from_toml(
            r#"
listen = "127.0.0.1:7420"
database = "sqlite://baton.db"
queue_limit = 16

[agents.default]
kind = "echo"
delay_ms = 0

[agents.slow]
kind = "echo"
delay_ms = 100
"#,
        )
        .expect("parses");
        assert_eq!(c.queue_limit, 16);
        assert_eq!(c.agents.len(), 2);
        assert_eq!(
            c.database_location().expect("sqlite"),
            DatabaseLocation::SqliteFile("baton.db".into())
        );
    }

    #[test]
    fn design_example_agents_parse() {
        let c = Config::from_toml(
            r#"
[agents.default]
kind = "echo"

[agents.py]
kind = "command"
program = "python3"
args = ["agents/my_agent.py"]
timeout_s = 600

[agents.llm]
kind = "openai"
base_url = "http://127.0.0.1:11434/v1"
model = "llama3.2"
api_key_env = "OPENAI_API_KEY"
"#,
        )
        .expect("parses");
        c.validate().expect("valid");
        let AgentConfig::Command(py) = &c.agents["py"] else {
            panic!("py is a command agent");
        };
        assert_eq!(py.args, ["agents/my_agent.py"]);
        assert_eq!(py.kill_grace_ms, 2_000);
        let AgentConfig::Openai(llm) = &c.agents["llm"] else {
            panic!("llm is an openai agent");
        };
        assert_eq!(llm.model, "llama3.2");
        assert_eq!(llm.retries, 2);
        assert!(
            Config::from_toml(
                "[agents.x]\nkind = \"openai\"\nbase_url = \"ftp://x\"\nmodel = \"m\""
            )
            .expect("parses")
            .validate()
            .is_err()
        );
        assert!(
            Config::from_toml("[agents.x]\nkind = \"command\"\nprogram = \"\"")
                .expect("parses")
                .validate()
                .is_err()
        );
    }

    #[test]
    fn unknown_keys_and_kinds_are_errors() {
        assert!(Config::from_toml("lisen = \"x\"").is_err());
        assert!(Config::from_toml("[agents.a]\nkind = \"nope\"").is_err());
        assert!(Config::from_toml("[agents.a]\nkind = \"echo\"\ndelay = 3").is_err());
    }

    #[test]
    fn env_overrides_file() {
        let mut c = Config::default();
        c.apply_env(|n| (n == "BATON_QUEUE_LIMIT").then(|| "3".to_string()))
            .expect("env");
        assert_eq!(c.queue_limit, 3);
        assert!(
            c.apply_env(|n| (n == "BATON_QUEUE_LIMIT").then(|| "x".to_string()))
                .is_err()
        );
    }
}
