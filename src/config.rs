//! Settings: defaults, overridden by a TOML file (`--config`), overridden by `BATON_*`
//! environment variables, overridden by command-line flags. The agent tables are
//! [`crate::agent::config`]'s and the database location [`crate::store::location`]'s, re-exported
//! here for the settings that hold them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use toml::Spanned;

use crate::agent::config::AgentTable;
pub use crate::agent::config::{
    AgentConfig, CommandConfig, DEFAULT_INPUT_TIMEOUT_S, EchoConfig, OpenaiConfig,
};
pub use crate::store::location::{DatabaseLocation, Synchronous};

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";
/// Default database URL: an SQLite file in the working directory.
pub const DEFAULT_DATABASE: &str = "sqlite://baton.db";
/// The agent a session gets when it names none.
pub const DEFAULT_AGENT: &str = "default";
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
            let secret = match agent {
                AgentConfig::Openai(openai) => &openai.api_key_env,
                AgentConfig::Http(http) => &http.secret_env,
                _ => &None,
            };
            if let Some(name) = secret {
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
    fn http_agents_parse_with_defaults_and_refuse_what_is_not_theirs() {
        let c = Config::from_toml(
            r#"
[agents.default]
kind = "echo"

[agents.mine]
kind = "http"
url = "http://127.0.0.1:8000/agent?team=a"
secret_env = "AGENT_SECRET"
headers = { authorization = "Bearer t" }
retries = 0
"#,
        )
        .expect("parses");
        c.validate().expect("valid");
        let AgentConfig::Http(mine) = &c.agents["mine"] else {
            panic!("mine is an http agent");
        };
        assert_eq!(mine.headers["authorization"], "Bearer t");
        assert_eq!((mine.retries, mine.connect_timeout_ms), (0, 5_000));
        assert_eq!(mine.idle_timeout_s, 60.0);
        assert!(c.secret_env_names().contains("AGENT_SECRET"));
        let refused = |text: &str| {
            Config::from_toml(text)
                .and_then(|c| c.validate().map(|()| c))
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default()
        };
        let foreign =
            refused("[agents.default]\nkind = \"http\"\nurl = \"http://a/\"\nprogram = \"p\"\n");
        assert!(
            foreign.contains("`program` is not a key of an http agent"),
            "{foreign}"
        );
        let missing = refused("[agents.default]\nkind = \"http\"\n");
        assert!(missing.contains("needs `url`"), "{missing}");
        let scheme = refused("[agents.default]\nkind = \"http\"\nurl = \"ftp://a/\"\n");
        assert!(
            scheme.contains("expected an http:// or https:// URL"),
            "{scheme}"
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
