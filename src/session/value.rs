//! The values operations carry and answer: a new message, what was accepted, a task's
//! outputs and end, a cancel's target.

use serde_json::Value;

use crate::model::{ErrorInfo, Interaction, InteractionId, JsonObject, Policy, Session, SessionId};

/// How long an idempotency key is remembered, in milliseconds.
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;

/// A message to accept under a policy.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub session: SessionId,
    pub content: String,
    pub metadata: JsonObject,
    pub policy: Policy,
    pub idempotency_key: Option<String>,
    /// Bound on `queued` interactions for `enqueue`.
    pub queue_limit: u32,
    /// Agent of the session if this message creates it.
    pub default_agent: String,
    /// Register a final-state watch for the interaction (for `?wait=`), before the commit
    /// publishes ([`Effects::watch_final`](super::Effects)).
    pub watch_final: bool,
    /// What the transport found wrong with the fields a `/clear` ignores (the idempotency
    /// key, `wait`): the message is refused with it, unless it is a `/clear`.
    pub invalid: Option<String>,
}

/// An interaction that became `running` in a committed transaction: the node that committed
/// it runs its task.
#[derive(Debug, Clone)]
pub struct StartedTask {
    pub interaction: Interaction,
    /// The session's agent at the moment it started.
    pub agent: String,
    /// The session as the plan that started the task left it (its context included), so that
    /// the agent's request needs no read of it.
    pub session: Option<Session>,
}

/// What accepting a message did (what it started and cancelled is in the plan's
/// [`Effects`](super::Effects)).
#[derive(Debug, Clone)]
pub struct Accepted {
    pub interaction: Interaction,
    /// The idempotency key matched an earlier message: nothing new was stored or started.
    pub replayed: bool,
}

/// What a message did: accepted (or replayed) as an interaction or, its content being the
/// `/clear` command, the session cleared.
#[derive(Debug, Clone)]
// Moved once, from the plan to the caller: boxing the common variant would cost an
// allocation per message for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Received {
    Accepted(Accepted),
    Cleared(Cleared),
}

impl Received {
    /// The interaction accepted; `None` for a clear.
    pub fn accepted(&self) -> Option<&Accepted> {
        match self {
            Received::Accepted(accepted) => Some(accepted),
            Received::Cleared(_) => None,
        }
    }
}

/// What a clear did.
#[derive(Debug, Clone)]
pub struct Cleared {
    pub epoch: i64,
    pub cancelled: Vec<InteractionId>,
}

/// One output of a running task, written fenced by its interaction id.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskOutput {
    Delta(String),
    Progress(Value),
    /// An RFC 7396 merge patch for the session's context.
    ContextPatch(JsonObject),
    /// The agent asks the client (`data`) and stops: the interaction becomes `waiting`. The
    /// runner takes it out of the outputs ([`Ask`](super::op::Ask)); it is never written as one.
    Ask(Value),
}

/// How a task ended on its own (cancellation is a [`Cancel`](super::op::Cancel)).
#[derive(Debug, Clone, PartialEq)]
pub enum TaskEnd {
    /// `response`: the final text, or `None` to keep the concatenated deltas.
    Completed {
        response: Option<String>,
    },
    Failed(ErrorInfo),
}

/// Which interaction a cancel targets.
#[derive(Debug, Clone)]
pub enum CancelTarget {
    /// The session's running interaction, if any.
    Running,
    /// A named interaction of the session (running or queued).
    Named(InteractionId),
}
