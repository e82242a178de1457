//! The agent tables: `[agents.NAME]` as written (every key with its place, so an error points
//! at the key that caused it), turned into one typed config per kind, and their validation.
//! The settings file (`config`) holds them; the agents read them from here.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::bail;
use serde::Deserialize;
use toml::Spanned;

/// How long an interaction waits for the client's answer by default: a day.
pub const DEFAULT_INPUT_TIMEOUT_S: f64 = 86_400.0;

/// One configured agent, selected by `kind`.
#[derive(Debug, Clone)]
pub enum AgentConfig {
    Echo(EchoConfig),
    Command(CommandConfig),
    Openai(OpenaiConfig),
    Http(HttpConfig),
}

impl AgentConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            AgentConfig::Echo(_) => "echo",
            AgentConfig::Command(_) => "command",
            AgentConfig::Openai(_) => "openai",
            AgentConfig::Http(_) => "http",
        }
    }

    /// How long an interaction of this agent may wait for the client's answer before it is
    /// cancelled with reason `timeout` (default: a day).
    pub fn input_timeout_s(&self) -> f64 {
        match self {
            AgentConfig::Echo(c) => c.input_timeout_s,
            AgentConfig::Command(c) => c.input_timeout_s,
            AgentConfig::Openai(c) => c.input_timeout_s,
            AgentConfig::Http(c) => c.input_timeout_s,
        }
        .unwrap_or(DEFAULT_INPUT_TIMEOUT_S)
    }

    /// Longest a task of this agent may run before it is cancelled with reason `timeout`.
    pub fn timeout_s(&self) -> Option<f64> {
        match self {
            AgentConfig::Echo(c) => c.timeout_s,
            AgentConfig::Command(c) => c.timeout_s,
            AgentConfig::Openai(c) => c.timeout_s,
            AgentConfig::Http(c) => c.timeout_s,
        }
    }

    /// Completed interactions handed to the agent as history, when it overrides `history_limit`.
    pub fn max_history(&self) -> Option<u32> {
        match self {
            AgentConfig::Echo(_) => None,
            AgentConfig::Command(c) => c.max_history,
            AgentConfig::Openai(c) => c.max_history,
            AgentConfig::Http(c) => c.max_history,
        }
    }

    pub(crate) fn validate(&self, name: &str) -> anyhow::Result<()> {
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
            AgentConfig::Http(c) => {
                let url = c.url.trim();
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    bail!("agents.{name}.url {url:?}: expected an http:// or https:// URL");
                }
                if !(c.idle_timeout_s.is_finite() && c.idle_timeout_s > 0.0) {
                    bail!("agents.{name}.idle_timeout_s must be a positive number of seconds");
                }
                if c.connect_timeout_ms == 0 {
                    bail!("agents.{name}.connect_timeout_ms must be positive");
                }
                if c.max_line_bytes < 64 {
                    bail!("agents.{name}.max_line_bytes must be at least 64");
                }
                if c.max_output_bytes < c.max_line_bytes {
                    bail!("agents.{name}.max_output_bytes must be at least max_line_bytes");
                }
                if let Some(file) = &c.ca_file
                    && !file.is_file()
                {
                    bail!("agents.{name}.ca_file {}: no such file", file.display());
                }
            }
        }
        Ok(())
    }
}

/// An `[agents.NAME]` table as written: every key of every kind, each with its place.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentTable {
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
    url: Option<Spanned<String>>,
    secret_env: Option<Spanned<String>>,
    headers: Option<Spanned<BTreeMap<String, String>>>,
    connect_timeout_ms: Option<Spanned<u64>>,
    ca_file: Option<Spanned<PathBuf>>,
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

const HTTP_KEYS: &[&str] = &[
    "kind",
    "url",
    "secret_env",
    "headers",
    "timeout_s",
    "input_timeout_s",
    "connect_timeout_ms",
    "idle_timeout_s",
    "retries",
    "max_line_bytes",
    "max_output_bytes",
    "max_history",
    "ca_file",
];

/// An error in an agent table, at a byte range of the file.
pub(crate) struct TableError {
    span: std::ops::Range<usize>,
    message: String,
}

impl TableError {
    /// The message with the line, column and text it is about, like the TOML parser's own.
    pub(crate) fn located(&self, text: &str, agent: &str) -> String {
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

/// "a command", "an echo", "an http", "an openai": as the kind is read aloud.
fn with_article(kind: &str) -> String {
    match kind {
        "command" => format!("a {kind}"),
        _ => format!("an {kind}"),
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
            at("url", &self.url),
            at("secret_env", &self.secret_env),
            at("headers", &self.headers),
            at("connect_timeout_ms", &self.connect_timeout_ms),
            at("ca_file", &self.ca_file),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// The typed agent, or the first key that does not belong to its kind (or is missing).
    pub(crate) fn into_agent(
        self,
        table: std::ops::Range<usize>,
    ) -> Result<AgentConfig, TableError> {
        let kind = self.kind.get_ref().as_str();
        let keys = match kind {
            "echo" => ECHO_KEYS,
            "command" => COMMAND_KEYS,
            "openai" => OPENAI_KEYS,
            "http" => HTTP_KEYS,
            other => {
                return Err(TableError {
                    span: self.kind.span(),
                    message: format!(
                        "unknown agent kind {other:?}, expected \"echo\", \"command\", \"openai\" \
                         or \"http\""
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
                    "`{key}` is not a key of {} agent (its keys: {})",
                    with_article(kind),
                    keys.join(", ")
                ),
            });
        }
        let required = |key: Option<Spanned<String>>, name: &str| {
            value(key).ok_or_else(|| TableError {
                span: table.clone(),
                message: format!("{} agent needs `{name}`", with_article(kind)),
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
            "http" => {
                let defaults = HttpConfig::new(String::new());
                AgentConfig::Http(HttpConfig {
                    url: required(self.url, "url")?,
                    secret_env: value(self.secret_env),
                    headers: value(self.headers).unwrap_or_default(),
                    timeout_s: value(self.timeout_s),
                    input_timeout_s: value(self.input_timeout_s),
                    connect_timeout_ms: value(self.connect_timeout_ms)
                        .unwrap_or(defaults.connect_timeout_ms),
                    idle_timeout_s: value(self.idle_timeout_s).unwrap_or(defaults.idle_timeout_s),
                    retries: value(self.retries).unwrap_or(defaults.retries),
                    max_line_bytes: value(self.max_line_bytes).unwrap_or(defaults.max_line_bytes),
                    max_output_bytes: value(self.max_output_bytes)
                        .unwrap_or(defaults.max_output_bytes),
                    max_history: value(self.max_history),
                    ca_file: value(self.ca_file),
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

/// An agent service reached over HTTP: one `POST` per run of an interaction, with the request a
/// `command` program reads, answered with the lines such a program writes.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The service's endpoint (its query string is kept).
    pub url: String,
    /// The environment variable holding the signing secret (`whsec_<base64>`): each request
    /// then carries Standard Webhooks signature headers.
    pub secret_env: Option<String>,
    /// Headers sent with every request (an `Authorization` the service wants); never logged.
    pub headers: BTreeMap<String, String>,
    pub timeout_s: Option<f64>,
    /// How long an interaction may wait for the client's answer (default a day).
    pub input_timeout_s: Option<f64>,
    /// Longest wait to connect to the service, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Longest silence of the answer — before its headers or between two bytes of its
    /// body — before the task fails (blank lines keep it alive).
    pub idle_timeout_s: f64,
    /// Retries, with backoff from 100 ms, of a request that got no byte of an answer.
    pub retries: u32,
    /// Longest line of the answer accepted, in bytes.
    pub max_line_bytes: usize,
    /// Most bytes one answer may carry.
    pub max_output_bytes: usize,
    /// Overrides the server's `history_limit` for this agent.
    pub max_history: Option<u32>,
    /// A PEM file of the private certificate authority an `https://` service's certificate
    /// is issued by (besides the usual roots).
    pub ca_file: Option<PathBuf>,
}

impl HttpConfig {
    /// A config with every optional key at its default.
    pub fn new(url: impl Into<String>) -> Self {
        let command = CommandConfig::new(String::new(), Vec::new());
        Self {
            url: url.into(),
            secret_env: None,
            headers: BTreeMap::new(),
            timeout_s: None,
            input_timeout_s: None,
            connect_timeout_ms: 5_000,
            idle_timeout_s: 60.0,
            retries: 2,
            max_line_bytes: command.max_line_bytes,
            max_output_bytes: command.max_output_bytes,
            max_history: None,
            ca_file: None,
        }
    }
}
