//! The agent contract: an agent turns an interaction (plus history and context) into a stream
//! of outputs and an end. Agents are called only by the engine's runner.

mod command;
pub mod config;
mod echo;
mod http;
mod lines;
mod openai;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use command::{CommandAgent, PROCESS_STOPS, STOP_BUCKETS_MS};
pub use config::AgentConfig;
pub use echo::EchoAgent;
pub use http::HttpAgent;
pub use openai::OpenaiAgent;

use crate::model::{ErrorInfo, Interaction, JsonObject, Session};
use crate::store::TaskOutput;

/// What an agent is given for one task.
#[derive(Debug, Clone)]
pub struct AgentRequest {
    pub interaction: Interaction,
    /// The session as it was when the task started (only when the agent asks for history).
    pub session: Option<Session>,
    /// Completed interactions of the current epoch, oldest first (empty unless the agent
    /// asks for history).
    pub history: Vec<Interaction>,
    /// The session's context (empty unless the agent asks for history).
    pub context: JsonObject,
}

/// Where an agent sends its outputs. Sending fails once the task was cancelled.
pub type OutputSink = mpsc::Sender<TaskOutput>;

/// How an agent ended on its own: `Ok(Some(text))` replaces the response with `text`,
/// `Ok(None)` keeps the concatenated deltas, `Err` fails the interaction.
pub type AgentResult = Result<Option<String>, ErrorInfo>;

/// An executor of tasks.
pub trait Agent: Send + Sync + 'static {
    /// Whether the runner should load history and context for requests (a store read).
    fn wants_history(&self) -> bool {
        false
    }

    /// Runs one task. `cancel` fires when the task is cancelled; the future may also simply
    /// be dropped, so an agent must release what it holds on drop.
    fn run(
        &self,
        request: AgentRequest,
        outputs: OutputSink,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, AgentResult>;

    /// Resolves once whatever the agent still does after its tasks ended (stopping
    /// processes, say) is done; awaited at shutdown.
    fn drain(&self) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }

    /// Names environment variables holding secrets of the server (token secrets, other
    /// agents' API keys): an agent that starts a process keeps them, and every `BATON_*`
    /// variable, out of its environment. Called by the server before it serves; repeated
    /// calls add to the set.
    fn withhold_env(&self, _names: &BTreeSet<String>) {}
}

/// A configured agent: its kind, its timeout and the executor.
#[derive(Clone)]
pub struct ConfiguredAgent {
    pub kind: &'static str,
    pub timeout: Option<std::time::Duration>,
    /// How long an interaction of this agent may wait for the client's answer.
    pub input_timeout: std::time::Duration,
    /// Overrides the server's `history_limit` for this agent.
    pub max_history: Option<u32>,
    pub executor: Arc<dyn Agent>,
}

/// The configured agents by name.
#[derive(Clone, Default)]
pub struct AgentRegistry {
    agents: BTreeMap<String, ConfiguredAgent>,
}

impl AgentRegistry {
    pub fn from_config(agents: &BTreeMap<String, AgentConfig>) -> anyhow::Result<Self> {
        let mut registry = Self::default();
        for (name, config) in agents {
            let executor: Arc<dyn Agent> = match config {
                AgentConfig::Echo(echo) => Arc::new(EchoAgent::new(echo.delay_ms)),
                AgentConfig::Command(command) => Arc::new(CommandAgent::new(name, command)?),
                AgentConfig::Openai(openai) => Arc::new(OpenaiAgent::new(name, openai)?),
                AgentConfig::Http(http) => Arc::new(HttpAgent::new(name, http)?),
            };
            let configured = ConfiguredAgent {
                kind: config.kind(),
                timeout: config.timeout_s().map(std::time::Duration::from_secs_f64),
                input_timeout: std::time::Duration::from_secs_f64(config.input_timeout_s()),
                max_history: config.max_history(),
                executor,
            };
            registry.insert(name.clone(), configured);
        }
        Ok(registry)
    }

    /// [`Agent::withhold_env`] for every agent.
    pub fn withhold_env(&self, names: &BTreeSet<String>) {
        for agent in self.agents.values() {
            agent.executor.withhold_env(names);
        }
    }

    /// Waits until every agent finished its after-task work (see [`Agent::drain`]).
    pub async fn drain(&self) {
        let drains: Vec<_> = self.agents.values().map(|a| a.executor.drain()).collect();
        futures_util::future::join_all(drains).await;
    }

    /// Adds (or replaces) an agent: how agents written in Rust are plugged in.
    pub fn insert(&mut self, name: impl Into<String>, agent: ConfiguredAgent) {
        self.agents.insert(name.into(), agent);
    }

    pub fn get(&self, name: &str) -> Option<&ConfiguredAgent> {
        self.agents.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.agents.contains_key(name)
    }

    /// Names and kinds, for listing (never any settings that could hold secrets).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ConfiguredAgent)> {
        self.agents.iter().map(|(n, a)| (n.as_str(), a))
    }
}
