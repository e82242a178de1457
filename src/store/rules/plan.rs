//! The types of the session rules: what a backend loads ([`Snapshot`]), what it asks
//! ([`Operation`]), and what it applies ([`Plan`]: [`Write`]s, events, the [`Outcome`]).

use crate::model::{
    CancelReason, ErrorInfo, Event, Interaction, InteractionId, JsonObject, Millis, Session,
    SessionId,
};
use crate::store::{
    Accepted, CancelTarget, Cancelled, Cleared, Limits, NewMessage, StartedTask, StoreError,
    StoreResult, TaskEnd, TaskOutput,
};

/// A session's row as loaded by a backend.
#[derive(Debug, Clone)]
pub(in crate::store) struct SessionRow {
    pub(in crate::store) agent: String,
    /// The stored JSON text, parsed only when a rule needs it (most never look at it).
    pub(in crate::store) context: Result<JsonObject, String>,
    pub(in crate::store) epoch: i64,
    pub(in crate::store) last_seq: i64,
    pub(in crate::store) created_at: Millis,
}

impl SessionRow {
    pub(in crate::store) fn context(&mut self) -> StoreResult<&JsonObject> {
        if let Err(text) = &self.context {
            self.context = Ok(serde_json::from_str(text)?);
        }
        match &self.context {
            Ok(context) => Ok(context),
            Err(_) => Err(StoreError::Internal("context not parsed".into())),
        }
    }
}

/// One session's state, read in the transaction that will apply the plan.
#[derive(Debug, Clone)]
pub(in crate::store) struct Snapshot {
    pub(in crate::store) id: SessionId,
    /// The time of this transaction: every row and event it writes carries it.
    pub(in crate::store) now: Millis,
    /// `None`: the session does not exist.
    pub(in crate::store) session: Option<SessionRow>,
    /// The last seq of a deleted session of this id (0 if none): a session created again
    /// continues after it, so no seq is ever reused.
    pub(in crate::store) retired_seq: i64,
    pub(in crate::store) running: Option<Interaction>,
    /// Oldest first.
    pub(in crate::store) queued: Vec<Interaction>,
    /// The interaction holding the operation's idempotency key, if any.
    pub(in crate::store) keyed: Option<Interaction>,
    /// The interaction a cancel names, if it exists (in any session: the rules check).
    pub(in crate::store) named: Option<Interaction>,
    /// The id a message gets if it is stored (not a replay): allocated by the backend, after
    /// every id of the session.
    pub(in crate::store) fresh_id: Option<InteractionId>,
    /// The bounds the rules enforce (the backend's configured ones).
    pub(in crate::store) limits: Limits,
    /// How many sessions the tenant holds, loaded when the operation would create this one
    /// and the tenant's sessions are bounded (in a transaction that serialises the tenant's
    /// creations).
    pub(in crate::store) tenant_sessions: Option<u64>,
}

impl Snapshot {
    /// A snapshot of a session as it stands (the operation's `keyed` and `named` are left
    /// for the caller to fill).
    pub(in crate::store) fn of(id: SessionId, now: Millis, state: SessionState) -> Self {
        Self {
            session: Some(state.row),
            running: state.running,
            queued: state.queued,
            ..Self::absent(id, now)
        }
    }

    /// A snapshot of a session that does not exist.
    pub(in crate::store) fn absent(id: SessionId, now: Millis) -> Self {
        Self {
            id,
            now,
            session: None,
            retired_seq: 0,
            running: None,
            queued: Vec::new(),
            keyed: None,
            named: None,
            fresh_id: None,
            limits: Limits::default(),
            tenant_sessions: None,
        }
    }

    /// Whether the backend must load [`Snapshot::tenant_sessions`] for `op` on this
    /// (absent) session.
    pub(in crate::store) fn counts_tenant(&self, op: &Operation) -> bool {
        self.session.is_none() && op.creates() && self.limits.max_sessions_per_tenant.is_some()
    }
}

/// An operation on one session.
#[derive(Debug, Clone)]
pub(in crate::store) enum Operation {
    /// Create the session if absent; set its agent and/or replace its context if given.
    PutSession {
        agent: Option<String>,
        context: Option<JsonObject>,
        default_agent: String,
    },
    DeleteSession,
    /// The snapshot's `fresh_id` is its id if the message is stored (not a replay).
    Accept(NewMessage),
    Append {
        id: InteractionId,
        outputs: Vec<TaskOutput>,
    },
    Finish {
        id: InteractionId,
        outputs: Vec<TaskOutput>,
        end: TaskEnd,
        start_next: bool,
    },
    Cancel {
        target: CancelTarget,
        reason: CancelReason,
        start_next: bool,
    },
    Clear {
        default_agent: String,
    },
    UpdateContext {
        value: JsonObject,
        patch: bool,
        default_agent: String,
    },
    /// The task of `id` is gone (the server stopped, its node was lost): if `id` still runs
    /// it fails with `error`; then, if nothing runs, the oldest queued interaction starts.
    Interrupt {
        id: InteractionId,
        error: ErrorInfo,
    },
    /// If nothing runs, the oldest queued interaction starts.
    StartQueued,
    /// A running task's agent asks the client; `timeout_ms` from now it times out.
    Ask {
        id: InteractionId,
        outputs: Vec<TaskOutput>,
        data: serde_json::Value,
        request_id: String,
        timeout_ms: i64,
    },
    /// The client answers the pending request of a waiting interaction.
    Answer {
        id: InteractionId,
        request_id: String,
        answer: serde_json::Value,
    },
    /// A waiting interaction past its deadline is cancelled (`timeout`).
    ExpireWait {
        id: InteractionId,
        start_next: bool,
    },
}

impl Operation {
    /// The idempotency key whose holder the snapshot must carry in `keyed`.
    pub(in crate::store) fn idempotency_key(&self) -> Option<&str> {
        match self {
            Operation::Accept(message) => message.idempotency_key.as_deref(),
            _ => None,
        }
    }

    /// The interaction the snapshot must carry in `named`.
    pub(in crate::store) fn named(&self) -> Option<&InteractionId> {
        match self {
            Operation::Cancel {
                target: CancelTarget::Named(id),
                ..
            }
            | Operation::Answer { id, .. } => Some(id),
            _ => None,
        }
    }

    /// The interaction whose session this operation is about, for operations addressed by
    /// interaction (a task's writes). Its backend finds the session first; if the
    /// interaction is gone, [`Operation::when_gone`] says what the operation answers.
    pub(in crate::store) fn task(&self) -> Option<&InteractionId> {
        match self {
            Operation::Append { id, .. }
            | Operation::Finish { id, .. }
            | Operation::Interrupt { id, .. }
            | Operation::Ask { id, .. } => Some(id),
            _ => None,
        }
    }

    /// What a task's operation answers when its interaction (or its session) is gone.
    pub(in crate::store) fn when_gone(&self) -> StoreResult<Outcome> {
        match self {
            Operation::Interrupt { .. } => Ok(Outcome::Started(None)),
            _ => Err(StoreError::Fenced),
        }
    }

    /// Whether the caller wants a [`FinalWatch`](crate::bus::FinalWatch) of the accepted
    /// interaction, registered before the commit publishes.
    pub(in crate::store) fn watches_final(&self) -> bool {
        matches!(self, Operation::Accept(message) if message.watch_final)
    }

    /// Whether the operation may store a new interaction (its snapshot needs a `fresh_id`).
    pub(in crate::store) fn inserts(&self) -> bool {
        matches!(self, Operation::Accept(_))
    }

    /// Whether the session's retired seq matters (the operation creates an absent session).
    pub(in crate::store) fn creates(&self) -> bool {
        matches!(
            self,
            Operation::PutSession { .. }
                | Operation::Accept { .. }
                | Operation::Clear { .. }
                | Operation::UpdateContext { .. }
        )
    }
}

/// A row change, applied by the backend in order.
#[derive(Debug, Clone, PartialEq)]
pub(in crate::store) enum Write {
    /// Insert the session (created at the plan's `now`, epoch 0) and drop its retired row.
    CreateSession {
        agent: String,
        context: JsonObject,
        last_seq: i64,
    },
    SetAgent(String),
    SetContext(JsonObject),
    /// Remove every interaction of the session, empty its context, set its epoch.
    Clear {
        epoch: i64,
    },
    /// Remove the session, its interactions and its events; retire its last seq.
    Delete {
        last_seq: i64,
    },
    /// An expired idempotency key is free again.
    ForgetKey(InteractionId),
    /// A new interaction (queued, or running on this node).
    Insert {
        interaction: Interaction,
        epoch: i64,
        idempotency_key: Option<String>,
    },
    /// Deltas appended to a running interaction's stored response.
    AppendResponse {
        id: InteractionId,
        text: String,
    },
    /// The interaction became final: status, response, error, cancel reason, finished_at.
    Finalize(Interaction),
    /// A queued interaction starts running (on this node): status and started_at.
    Start(Interaction),
    /// The interaction became `waiting`: status, response so far, request, deadline.
    Wait(Interaction),
    /// Answered: `running` again (on this node), the request moved into its answers.
    Resume(Interaction),
}

/// What an operation answers, by operation.
#[derive(Debug)]
pub(in crate::store) enum Outcome {
    Session {
        session: Session,
        created: bool,
    },
    Deleted(Vec<InteractionId>),
    Accepted(Box<Accepted>),
    Appended,
    /// Finish, Interrupt, StartQueued: the task started next, if any.
    Started(Option<StartedTask>),
    Cancelled(Cancelled),
    Cleared(Cleared),
    Context(JsonObject),
    Waiting(Box<Interaction>),
    Resumed(Box<StartedTask>),
}

/// `Outcome::into_x()`: the answer of the operation that gives an `x`.
macro_rules! outcome_as {
    ($($name:ident: $pat:pat => $value:expr, $ty:ty;)+) => {
        impl Outcome {
            $(
                pub(in crate::store) fn $name(self) -> StoreResult<$ty> {
                    match self {
                        $pat => Ok($value),
                        other => Err(StoreError::Internal(format!(
                            "{}: unexpected outcome {other:?}",
                            stringify!($name)
                        ))),
                    }
                }
            )+
        }
    };
}

outcome_as! {
    into_session: Outcome::Session { session, created } => (session, created), (Session, bool);
    into_deleted: Outcome::Deleted(ids) => ids, Vec<InteractionId>;
    into_accepted: Outcome::Accepted(accepted) => *accepted, Accepted;
    into_appended: Outcome::Appended => (), ();
    into_started: Outcome::Started(next) => next, Option<StartedTask>;
    into_cancelled: Outcome::Cancelled(cancelled) => cancelled, Cancelled;
    into_cleared: Outcome::Cleared(cleared) => cleared, Cleared;
    into_context: Outcome::Context(context) => context, JsonObject;
    into_waiting: Outcome::Waiting(interaction) => *interaction, Interaction;
    into_resumed: Outcome::Resumed(task) => *task, StartedTask;
}

/// What one operation changes: apply `writes` in order, then store `events` (unless
/// `deletes_session`: they are then only published), then save `save_seq`, then commit.
#[derive(Debug)]
pub(in crate::store) struct Plan {
    pub(in crate::store) session: SessionId,
    pub(in crate::store) now: Millis,
    pub(in crate::store) writes: Vec<Write>,
    /// With their seqs, contiguous after the session's `last_seq`.
    pub(in crate::store) events: Vec<Event>,
    /// The session's new `last_seq`, when it must be saved.
    pub(in crate::store) save_seq: Option<i64>,
    /// Interactions whose tasks must stop (cancelled, or failed because their task is gone).
    pub(in crate::store) stopped: Vec<InteractionId>,
    pub(in crate::store) outcome: Outcome,
    /// The session's state once the plan is applied (`None`: it does not exist), for a
    /// backend that keeps it between operations.
    pub(in crate::store) after: Option<SessionState>,
}

/// What the rules look at of a session, as it stands between operations.
#[derive(Debug, Clone)]
pub(in crate::store) struct SessionState {
    pub(in crate::store) row: SessionRow,
    pub(in crate::store) running: Option<Interaction>,
    /// Oldest first.
    pub(in crate::store) queued: Vec<Interaction>,
}

impl Plan {
    /// Whether the plan removes the session: its events are published, never stored.
    pub(in crate::store) fn deletes_session(&self) -> bool {
        self.writes
            .iter()
            .any(|w| matches!(w, Write::Delete { .. }))
    }
}
