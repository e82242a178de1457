//! Placeholder until the command agent lands (replaced before this work is submitted).

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::{Agent, AgentRequest, AgentResult, OutputSink};
use crate::config::CommandConfig;

/// The command agent.
pub struct CommandAgent;

impl CommandAgent {
    pub fn new(name: &str, _config: &CommandConfig) -> anyhow::Result<Self> {
        anyhow::bail!("agents.{name}: kind command is not built yet")
    }
}

impl Agent for CommandAgent {
    fn run(
        &self,
        _r: AgentRequest,
        _o: OutputSink,
        _c: CancellationToken,
    ) -> BoxFuture<'static, AgentResult> {
        unimplemented!()
    }
}
