//! The operations on a session, each with the type of its outcome ([`Op::Outcome`]), and
//! `decide`, which runs one on a snapshot.

use std::fmt::Debug;

use serde_json::Value;

use super::decide::{Decider, is_clear};
use super::plan::{Needs, Plan, Snapshot};
use super::value::{CancelTarget, Cleared, NewMessage, Received, TaskEnd, TaskOutput};
use super::{StoreError, StoreResult};
use crate::model::{CancelReason, ErrorInfo, Interaction, InteractionId, JsonObject, Session};

/// An operation on one session: what a store must load for it ([`Op::needs`]) and what it
/// answers ([`Op::Outcome`]), typed at compile time.
pub trait Op: Clone + Debug + Send + Sync + 'static {
    type Outcome: Send + 'static;

    /// What the store loads besides the session's row, running interaction and queue.
    fn needs(&self) -> Needs<'_> {
        Needs::default()
    }

    /// The interaction whose session this operation is about, for operations addressed by
    /// interaction (a task's writes): the store finds the session first.
    fn task(&self) -> Option<&InteractionId> {
        None
    }

    /// What a task's operation answers when its interaction (or its session) is gone.
    fn when_gone(&self) -> StoreResult<Self::Outcome> {
        Err(StoreError::Fenced)
    }

    /// The rules of this operation, on the decider's snapshot.
    #[doc(hidden)]
    fn decide(self, d: &mut Decider) -> StoreResult<Self::Outcome>;
}

/// The rules: what `op` does to the session in `snapshot`, or why it is refused.
pub(crate) fn decide<O: Op>(snapshot: Snapshot, op: O) -> StoreResult<Plan<O::Outcome>> {
    let mut d = Decider::new(snapshot);
    let outcome = op.decide(&mut d)?;
    Ok(d.done(outcome))
}

/// Create the session if absent; set its agent and/or replace its context if given.
/// Answers the session and whether it was created.
#[derive(Debug, Clone)]
pub struct PutSession {
    pub agent: Option<String>,
    pub context: Option<JsonObject>,
    pub default_agent: String,
}

/// Cancel its interactions (`delete`), emit `session.deleted`, remove everything. Answers
/// the interactions cancelled.
#[derive(Debug, Clone)]
pub struct DeleteSession;

/// Accept a message under its policy (idempotency first, then the busy check).
#[derive(Debug, Clone)]
pub struct Accept(pub NewMessage);

/// A running task's outputs; fenced unless the interaction is still `running`.
#[derive(Debug, Clone)]
pub struct Append {
    pub id: InteractionId,
    pub outputs: Vec<TaskOutput>,
}

/// A task's last outputs and its end; then, when `start_next`, the next queued one starts.
#[derive(Debug, Clone)]
pub struct Finish {
    pub id: InteractionId,
    pub outputs: Vec<TaskOutput>,
    pub end: TaskEnd,
    pub start_next: bool,
}

/// Cancel the target; when it was the running one and `start_next`, start the next queued
/// one. Answers the interactions cancelled.
#[derive(Debug, Clone)]
pub struct Cancel {
    pub target: CancelTarget,
    pub reason: CancelReason,
    pub start_next: bool,
}

/// Cancel everything, remove the interactions and the context, start a new epoch (I2).
/// Creates the session if absent.
#[derive(Debug, Clone)]
pub struct Clear {
    pub default_agent: String,
}

/// Replace the context with `set` (if given), then merge-patch it with `patch` (if given),
/// in one write. Creates the session if absent. Answers the new context.
#[derive(Debug, Clone)]
pub struct UpdateContext {
    pub set: Option<JsonObject>,
    pub patch: Option<JsonObject>,
    pub default_agent: String,
}

/// The task of `id` is gone (the server stopped, its node was lost): if `id` still runs it
/// fails with `error`; then, if nothing runs, the oldest queued interaction starts.
#[derive(Debug, Clone)]
pub struct Interrupt {
    pub id: InteractionId,
    pub error: ErrorInfo,
}

/// If nothing runs, the oldest queued interaction starts.
#[derive(Debug, Clone)]
pub struct StartQueued;

/// A running task's agent asks the client; `timeout_ms` from now it times out. Answers the
/// interaction, now `waiting`.
#[derive(Debug, Clone)]
pub struct Ask {
    pub id: InteractionId,
    pub outputs: Vec<TaskOutput>,
    pub data: Value,
    pub request_id: String,
    pub timeout_ms: i64,
}

/// The client answers the pending request of a waiting interaction: it runs again here.
/// Answers the interaction, `running` again.
#[derive(Debug, Clone)]
pub struct Answer {
    pub id: InteractionId,
    pub request_id: String,
    pub answer: Value,
}

/// A waiting interaction past its deadline is cancelled (`timeout`).
#[derive(Debug, Clone)]
pub struct ExpireWait {
    pub id: InteractionId,
    pub start_next: bool,
}

impl Op for PutSession {
    type Outcome = (Session, bool);
    fn needs(&self) -> Needs<'_> {
        Needs {
            creates: true,
            ..Needs::default()
        }
    }
    fn decide(self, d: &mut Decider) -> StoreResult<Self::Outcome> {
        d.put_session(self.agent, self.context, self.default_agent)
    }
}

impl Op for DeleteSession {
    type Outcome = Vec<InteractionId>;
    fn decide(self, d: &mut Decider) -> StoreResult<Self::Outcome> {
        d.delete_session()
    }
}

impl Op for Accept {
    type Outcome = Received;
    fn needs(&self) -> Needs<'_> {
        Needs {
            key: self.0.idempotency_key.as_deref(),
            inserts: true,
            creates: true,
            ..Needs::default()
        }
    }
    /// The one place a message becomes a clear: `/clear` whatever its policy, key or `wait`.
    fn decide(self, d: &mut Decider) -> StoreResult<Self::Outcome> {
        let message = self.0;
        if is_clear(&message.content) {
            return d.clear(message.default_agent).map(Received::Cleared);
        }
        if let Some(why) = message.invalid {
            return Err(StoreError::Invalid(why));
        }
        d.accept(message).map(Received::Accepted)
    }
}

impl Op for Append {
    type Outcome = ();
    fn task(&self) -> Option<&InteractionId> {
        Some(&self.id)
    }
    fn decide(self, d: &mut Decider) -> StoreResult<()> {
        d.append(self.id, self.outputs)
    }
}

impl Op for Finish {
    type Outcome = ();
    fn task(&self) -> Option<&InteractionId> {
        Some(&self.id)
    }
    fn decide(self, d: &mut Decider) -> StoreResult<()> {
        d.finish(self.id, self.outputs, self.end, self.start_next)
    }
}

impl Op for Cancel {
    type Outcome = Vec<InteractionId>;
    fn needs(&self) -> Needs<'_> {
        Needs {
            named: match &self.target {
                CancelTarget::Named(id) => Some(id),
                CancelTarget::Running => None,
            },
            ..Needs::default()
        }
    }
    fn decide(self, d: &mut Decider) -> StoreResult<Self::Outcome> {
        d.cancel(self.target, self.reason, self.start_next)
    }
}

impl Op for Clear {
    type Outcome = Cleared;
    fn needs(&self) -> Needs<'_> {
        Needs {
            creates: true,
            ..Needs::default()
        }
    }
    fn decide(self, d: &mut Decider) -> StoreResult<Cleared> {
        d.clear(self.default_agent)
    }
}

impl Op for UpdateContext {
    type Outcome = JsonObject;
    fn needs(&self) -> Needs<'_> {
        Needs {
            creates: true,
            ..Needs::default()
        }
    }
    fn decide(self, d: &mut Decider) -> StoreResult<JsonObject> {
        d.update_context(self.set, self.patch, self.default_agent)
    }
}

impl Op for Interrupt {
    type Outcome = ();
    fn task(&self) -> Option<&InteractionId> {
        Some(&self.id)
    }
    fn when_gone(&self) -> StoreResult<()> {
        Ok(())
    }
    fn decide(self, d: &mut Decider) -> StoreResult<()> {
        d.interrupt(self.id, self.error)
    }
}

impl Op for StartQueued {
    type Outcome = ();
    fn decide(self, d: &mut Decider) -> StoreResult<()> {
        d.start_queued()
    }
}

impl Op for Ask {
    type Outcome = Interaction;
    fn task(&self) -> Option<&InteractionId> {
        Some(&self.id)
    }
    fn decide(self, d: &mut Decider) -> StoreResult<Interaction> {
        d.ask(
            self.id,
            self.outputs,
            self.data,
            self.request_id,
            self.timeout_ms,
        )
    }
}

impl Op for Answer {
    type Outcome = Interaction;
    fn needs(&self) -> Needs<'_> {
        Needs {
            named: Some(&self.id),
            ..Needs::default()
        }
    }
    fn decide(self, d: &mut Decider) -> StoreResult<Interaction> {
        d.answer(self.id, self.request_id, self.answer)
    }
}

impl Op for ExpireWait {
    type Outcome = ();
    fn decide(self, d: &mut Decider) -> StoreResult<()> {
        d.expire_wait(self.id, self.start_next)
    }
}
