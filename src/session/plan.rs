//! What a store loads for the rules ([`Snapshot`]) and what it applies ([`Plan`]: [`Write`]s,
//! events, the outcome, the [`Effects`] to execute after commit).

use super::value::StartedTask;
use super::{StoreError, StoreResult};
use crate::model::{Event, Interaction, InteractionId, JsonObject, Millis, SessionId};

/// What a store loads for an operation besides the session itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct Needs<'a> {
    /// The interaction holding this idempotency key (`Snapshot::keyed`).
    pub key: Option<&'a str>,
    /// This interaction, in whatever session (`Snapshot::named`).
    pub named: Option<&'a InteractionId>,
    /// A fresh interaction id (`Snapshot::fresh_id`).
    pub inserts: bool,
    /// The operation creates an absent session: its retired seq (and, when the tenant's
    /// sessions are bounded, their count) matters.
    pub creates: bool,
}

/// A session's row as loaded by a backend.
#[derive(Debug, Clone)]
pub(crate) struct SessionRow {
    pub(crate) agent: String,
    /// The stored JSON text, parsed only when a rule needs it (most never look at it).
    pub(crate) context: Result<JsonObject, String>,
    pub(crate) epoch: i64,
    pub(crate) last_seq: i64,
    pub(crate) created_at: Millis,
}

impl SessionRow {
    pub(crate) fn context(&mut self) -> StoreResult<&JsonObject> {
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
pub(crate) struct Snapshot {
    pub(crate) id: SessionId,
    /// The time of this transaction: every row and event it writes carries it.
    pub(crate) now: Millis,
    /// `None`: the session does not exist.
    pub(crate) session: Option<SessionRow>,
    /// The last seq of a deleted session of this id (0 if none): a session created again
    /// continues after it, so no seq is ever reused.
    pub(crate) retired_seq: i64,
    pub(crate) running: Option<Interaction>,
    /// Oldest first.
    pub(crate) queued: Vec<Interaction>,
    /// The interaction holding the operation's idempotency key, if any.
    pub(crate) keyed: Option<Interaction>,
    /// The interaction a cancel names, if it exists (in any session: the rules check).
    pub(crate) named: Option<Interaction>,
    /// The id a message gets if it is stored (not a replay): allocated by the backend, after
    /// every id of the session.
    pub(crate) fresh_id: Option<InteractionId>,
    /// The bounds the rules enforce (the backend's configured ones).
    pub(crate) limits: Limits,
    /// How many sessions the tenant holds, loaded when the operation would create this one
    /// and the tenant's sessions are bounded (in a transaction that serialises the tenant's
    /// creations).
    pub(crate) tenant_sessions: Option<u64>,
}

impl Snapshot {
    /// A snapshot of a session as it stands (the operation's `keyed` and `named` are left
    /// for the caller to fill).
    pub(crate) fn of(id: SessionId, now: Millis, state: SessionState) -> Self {
        Self {
            session: Some(state.row),
            running: state.running,
            queued: state.queued,
            ..Self::absent(id, now)
        }
    }

    /// A snapshot of a session that does not exist.
    pub(crate) fn absent(id: SessionId, now: Millis) -> Self {
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

    /// Whether the backend must load [`Snapshot::tenant_sessions`] for an operation that
    /// needs `needs` on this (absent) session.
    pub(crate) fn counts_tenant(&self, needs: &Needs<'_>) -> bool {
        self.session.is_none() && needs.creates && self.limits.max_sessions_per_tenant.is_some()
    }
}

/// A row change, applied by the backend in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Write {
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

/// What one operation changes: apply `writes` in order, then store `events` (unless
/// `deletes_session`: they are then only published), then save `save_seq`, then commit;
/// then publish the events and hand `effects` to the engine.
#[derive(Debug)]
pub(crate) struct Plan<T> {
    pub(crate) session: SessionId,
    pub(crate) now: Millis,
    pub(crate) writes: Vec<Write>,
    /// With their seqs, contiguous after the session's `last_seq`.
    pub(crate) events: Vec<Event>,
    /// The session's new `last_seq`, when it must be saved.
    pub(crate) save_seq: Option<i64>,
    /// What must happen once the plan is committed.
    pub(crate) effects: Effects,
    /// What the operation answers.
    pub(crate) outcome: T,
    /// The session's state once the plan is applied (`None`: it does not exist), for a
    /// backend that keeps it between operations.
    pub(crate) after: Option<SessionState>,
}

/// What the rules look at of a session, as it stands between operations.
#[derive(Debug, Clone)]
pub(crate) struct SessionState {
    pub(crate) row: SessionRow,
    pub(crate) running: Option<Interaction>,
    /// Oldest first.
    pub(crate) queued: Vec<Interaction>,
}

impl<T> Plan<T> {
    /// The same plan with its outcome mapped.
    #[cfg(test)]
    pub(crate) fn map<U>(self, f: impl FnOnce(T) -> U) -> Plan<U> {
        Plan {
            session: self.session,
            now: self.now,
            writes: self.writes,
            events: self.events,
            save_seq: self.save_seq,
            effects: self.effects,
            outcome: f(self.outcome),
            after: self.after,
        }
    }

    /// Whether the plan removes the session: its events are published, never stored.
    pub(crate) fn deletes_session(&self) -> bool {
        self.writes
            .iter()
            .any(|w| matches!(w, Write::Delete { .. }))
    }
}

/// What must happen once a plan is committed, executed in one place (the engine), except
/// `watch_final`, which the store registers before its commit publishes.
#[derive(Debug, Default, Clone)]
pub struct Effects {
    /// Interactions the plan made `running` on this node: their tasks start here.
    pub start: Vec<StartedTask>,
    /// Interactions whose tasks must stop wherever they run (cancelled, or failed because
    /// their task is gone).
    pub stop: Vec<InteractionId>,
    /// An interaction whose final state a caller waits for.
    pub watch_final: Option<InteractionId>,
}

impl Effects {
    /// Adds `other`'s effects after these.
    pub fn extend(&mut self, other: Effects) {
        self.start.extend(other.start);
        self.stop.extend(other.stop);
        if other.watch_final.is_some() {
            self.watch_final = other.watch_final;
        }
    }
}

/// Bounds the session rules enforce, the same on every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest context, serialized, after any write or patch.
    pub max_context_bytes: usize,
    /// Most sessions one tenant may hold; `None`: unlimited.
    pub max_sessions_per_tenant: Option<u64>,
}

/// `max_context_bytes` by default: 256 KiB.
pub const DEFAULT_MAX_CONTEXT_BYTES: usize = 256 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_context_bytes: DEFAULT_MAX_CONTEXT_BYTES,
            max_sessions_per_tenant: None,
        }
    }
}
