//! What both backends implement — load a session's snapshot, apply a plan — and the one
//! preamble every operation runs through on either: which session, what to load, the rules,
//! fencing, the final-state watch. The transaction around it (and its commit, and publishing
//! what it committed) is each backend's own.

use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;

use crate::bus::{Bus, FinalWatch};
use crate::model::{InteractionId, SessionId};
use crate::session::Needs;
use crate::session::{Effects, Op, Plan, Snapshot, StartedTask, StoreError, decide};

/// An operation's outcome once committed, with what must happen next.
#[derive(Debug)]
pub struct Committed<T> {
    pub value: T,
    /// For the engine to execute ([`Effects::start`], [`Effects::stop`]).
    pub effects: Effects,
    /// Registered before the commit published, when the operation asked for it.
    pub final_watch: Option<FinalWatch>,
}

impl<T> Committed<T> {
    /// An outcome with nothing to do after it.
    pub fn alone(value: T) -> Self {
        Self {
            value,
            effects: Effects::default(),
            final_watch: None,
        }
    }

    pub fn into_value(self) -> T {
        self.value
    }

    /// The same commit with its outcome changed by `f`.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Committed<U> {
        Committed {
            value: f(self.value),
            effects: self.effects,
            final_watch: self.final_watch,
        }
    }

    /// The task the operation started here, if any (a plan starts at most one per session).
    pub fn started(&self) -> Option<&StartedTask> {
        self.effects.start.first()
    }

    /// The interactions whose tasks the operation stopped.
    pub fn cancelled(&self) -> &[InteractionId] {
        &self.effects.stop
    }
}

impl<T> Deref for Committed<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

/// One transaction of a backend, as the session rules see it.
pub(super) trait Backend {
    /// The backend's error, which a refusal of the rules converts into.
    type Error: From<StoreError>;

    fn bus(&self) -> &Arc<Bus>;

    /// The session of a task's interaction; `None` if the interaction is gone.
    fn session_of(
        &mut self,
        task: &InteractionId,
    ) -> impl Future<Output = Result<Option<SessionId>, Self::Error>>;

    /// The session's snapshot, locked for this transaction where the backend locks.
    fn load(
        &mut self,
        session: &SessionId,
        needs: Needs<'_>,
    ) -> impl Future<Output = Result<Snapshot, Self::Error>>;

    /// Applies the plan in this transaction; returns its outcome and effects.
    fn apply<T>(
        &mut self,
        plan: Plan<T>,
    ) -> impl Future<Output = Result<(T, Effects), Self::Error>>;

    /// A task's write was fenced: the task ended (maybe on another node).
    fn fenced(&mut self, _task: &InteractionId) {}
}

/// Runs `op` on `session` (or, for a task's operation, on its interaction's session) in the
/// backend's transaction.
pub(super) async fn run<B: Backend, O: Op>(
    b: &mut B,
    session: Option<&SessionId>,
    op: O,
) -> Result<Committed<O::Outcome>, B::Error> {
    let session = match (session, op.task()) {
        (Some(session), _) => session.clone(),
        (None, Some(task)) => match b.session_of(task).await? {
            Some(session) => session,
            None => return Ok(Committed::alone(op.when_gone()?)),
        },
        (None, None) => return Err(StoreError::Internal("operation without session".into()).into()),
    };
    let snapshot = b.load(&session, op.needs()).await?;
    let task = op.task().cloned();
    let plan = match decide(snapshot, op) {
        Ok(plan) => plan,
        Err(StoreError::Fenced) => {
            if let Some(task) = task {
                b.fenced(&task);
            }
            return Err(StoreError::Fenced.into());
        }
        Err(refusal) => return Err(refusal.into()),
    };
    let (value, mut effects) = b.apply(plan).await?;
    // Before the commit publishes, so no final event of the interaction can be missed.
    let final_watch = effects
        .watch_final
        .take()
        .map(|id| b.bus().watch_final(&session, &id));
    Ok(Committed {
        value,
        effects,
        final_watch,
    })
}

/// Runs a future that never waits (a synchronous backend's), on the calling thread.
pub(super) fn ready<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => unreachable!("a synchronous backend's future waited"),
    }
}
