//! Placeholder until the openai agent lands (replaced before this work is submitted).

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::{Agent, AgentRequest, AgentResult, OutputSink};
use crate::config::OpenaiConfig;

/// The openai agent.
pub struct OpenaiAgent;

impl OpenaiAgent {
    pub fn new(name: &str, _config: &OpenaiConfig) -> anyhow::Result<Self> {
        anyhow::bail!("agents.{name}: kind openai is not built yet")
    }
}

impl Agent for OpenaiAgent {
    fn run(
        &self,
        _r: AgentRequest,
        _o: OutputSink,
        _c: CancellationToken,
    ) -> BoxFuture<'static, AgentResult> {
        unimplemented!()
    }
}
