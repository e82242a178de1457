//! The store contract: every state change of a session is one transaction that checks the
//! current state, writes the new state and appends the events it causes (allocating their
//! per-session `seq`). Events are handed to the [`Bus`] only after their
//! transaction commits, in `seq` order.
//!
//! [`Store`] is the one API; the backend behind it is chosen by the database URL.

mod backend;
mod columns;
pub mod location;
mod postgres;
mod shared;
mod sqlite;

use std::sync::Arc;

use serde_json::Value;

pub use location::{DatabaseLocation, Synchronous, postgres_url};

use crate::bus::Bus;
use crate::model::{
    CancelReason, Event, Interaction, InteractionId, JsonObject, Session, SessionId, Tenant,
};
use crate::session::op;
pub use crate::session::{
    Accepted, CancelTarget, Cleared, DEFAULT_MAX_CONTEXT_BYTES, Effects, IDEMPOTENCY_TTL_MS,
    Limits, NewMessage, Received, StartedTask, StoreError, StoreResult, TaskEnd, TaskOutput,
};
pub use backend::Committed;
pub use postgres::PgOptions;

/// A page of results with the cursor of the next one.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

/// Options of the SQLite backend.
#[derive(Debug, Clone, Copy)]
pub struct SqliteOptions {
    pub synchronous: Synchronous,
    /// Read connections used in parallel with the single writer.
    pub readers: usize,
    pub limits: Limits,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::Normal,
            readers: 4,
            limits: Limits::default(),
        }
    }
}

/// Counters of the store's write path, for `/metrics`.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Write transactions committed (each holds a batch of jobs).
    pub commits: std::sync::atomic::AtomicU64,
    /// Jobs (logical operations) run by the writer.
    pub jobs: std::sync::atomic::AtomicU64,
    /// WAL checkpoints completed by the writer.
    pub checkpoints: std::sync::atomic::AtomicU64,
}

/// The store: the single arbiter of every session's state. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Arc<Backend>,
}

enum Backend {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

/// Calls the same operation on whichever backend this store has.
macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match &*$self.backend {
            Backend::Sqlite(b) => b.$method($($arg),*).await,
            Backend::Postgres(b) => b.$method($($arg),*).await,
        }
    };
}

impl Store {
    /// Runs one operation of the session rules: one transaction on the backend.
    async fn run<O: op::Op>(
        &self,
        session: Option<SessionId>,
        op: O,
    ) -> StoreResult<Committed<O::Outcome>> {
        dispatch!(self.run(session, op))
    }

    /// Opens (creating and migrating as needed) the SQLite database at `location`.
    /// Committed events are published to `bus`.
    pub fn open(
        location: &DatabaseLocation,
        options: SqliteOptions,
        bus: Arc<Bus>,
    ) -> StoreResult<Self> {
        let backend = match location {
            DatabaseLocation::SqliteFile(path) => {
                Backend::Sqlite(sqlite::SqliteStore::open(path, options, bus)?)
            }
            DatabaseLocation::Postgres(_) => {
                return Err(StoreError::Internal(
                    "a PostgreSQL store is opened with Store::connect".into(),
                ));
            }
        };
        Ok(Self {
            backend: Arc::new(backend),
        })
    }

    /// Opens the store at `location`, whichever backend it names: SQLite (on a blocking
    /// thread) or PostgreSQL (joining the cluster of nodes sharing that database).
    pub async fn connect(
        location: &DatabaseLocation,
        sqlite: SqliteOptions,
        postgres: PgOptions,
        bus: Arc<Bus>,
    ) -> StoreResult<Self> {
        match location {
            DatabaseLocation::SqliteFile(_) => {
                let location = location.clone();
                tokio::task::spawn_blocking(move || Self::open(&location, sqlite, bus))
                    .await
                    .map_err(|e| StoreError::Internal(format!("opening the database: {e}")))?
            }
            DatabaseLocation::Postgres(url) => {
                let options = PgOptions {
                    url: url.clone(),
                    ..postgres
                };
                let backend = postgres::PgStore::open(options, bus).await?;
                Ok(Self {
                    backend: Arc::new(Backend::Postgres(backend)),
                })
            }
        }
    }

    /// With several nodes sharing the store: how long a node's heartbeat keeps it alive.
    /// `None` for a single-node store.
    pub fn lease(&self) -> Option<std::time::Duration> {
        match &*self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(b) => Some(b.lease()),
        }
    }

    /// Interactions cancelled by other nodes (to stop their tasks here); taken once.
    pub fn take_remote_cancels(
        &self,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<InteractionId>> {
        match &*self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(b) => b.take_remote_cancels(),
        }
    }

    /// Renews this node's lease; `true` if it had expired (its tasks were taken over).
    pub async fn heartbeat(&self) -> StoreResult<bool> {
        match &*self.backend {
            Backend::Sqlite(_) => Ok(false),
            Backend::Postgres(b) => b.heartbeat().await,
        }
    }

    /// Takes over the work of nodes whose lease expired; returns the tasks to start here.
    pub async fn take_over(&self) -> StoreResult<Effects> {
        match &*self.backend {
            Backend::Sqlite(_) => Ok(Effects::default()),
            Backend::Postgres(b) => b.take_over().await,
        }
    }

    /// Retention: deletes the deltas of final interactions older than `deltas_before`, then
    /// all events older than `events_before`, in bounded batches. Returns the events deleted.
    pub async fn compact(
        &self,
        deltas_before: crate::model::Millis,
        events_before: crate::model::Millis,
    ) -> StoreResult<u64> {
        match &*self.backend {
            Backend::Sqlite(b) => b.compact(deltas_before, events_before, 1000).await,
            Backend::Postgres(b) => b.compact(deltas_before, events_before, 1000).await,
        }
    }

    /// Leaves the cluster at shutdown (no-op for a single-node store).
    pub async fn leave(&self) -> StoreResult<()> {
        match &*self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Postgres(b) => b.leave().await,
        }
    }

    /// Creates the session if absent; sets its agent and/or replaces its context if given.
    /// Returns the session and whether it was created.
    pub async fn put_session(
        &self,
        id: SessionId,
        agent: Option<String>,
        context: Option<JsonObject>,
        default_agent: String,
    ) -> StoreResult<Committed<(Session, bool)>> {
        let op = op::PutSession {
            agent,
            context,
            default_agent,
        };
        self.run(Some(id), op).await
    }

    pub async fn get_session(&self, id: SessionId) -> StoreResult<Session> {
        dispatch!(self.get_session(id))
    }

    /// `tenant`'s sessions, by name, after the name `after`.
    pub async fn list_sessions(
        &self,
        tenant: Tenant,
        after: Option<String>,
        limit: u32,
    ) -> StoreResult<Page<Session>> {
        dispatch!(self.list_sessions(tenant, after, limit))
    }

    /// Cancels its interactions (`delete`), emits `session.deleted` and removes everything.
    pub async fn delete_session(
        &self,
        id: SessionId,
    ) -> StoreResult<Committed<Vec<InteractionId>>> {
        self.run(Some(id), op::DeleteSession).await
    }

    /// Accepts a message under its policy (idempotency first, then the busy check).
    /// A `/clear` message clears the session instead ([`Received::Cleared`]).
    pub async fn accept_message(&self, message: NewMessage) -> StoreResult<Committed<Received>> {
        let session = message.session.clone();
        self.run(Some(session), op::Accept(message)).await
    }

    /// Appends a running task's outputs; refused with [`StoreError::Fenced`] unless `id` is
    /// still `running`.
    pub async fn append_outputs(
        &self,
        id: InteractionId,
        outputs: Vec<TaskOutput>,
    ) -> StoreResult<Committed<()>> {
        self.run(None, op::Append { id, outputs }).await
    }

    /// Appends the task's last `outputs`, makes the running interaction final and, when
    /// `start_next`, starts the session's next queued one — one transaction.
    pub async fn finish(
        &self,
        id: InteractionId,
        outputs: Vec<TaskOutput>,
        end: TaskEnd,
        start_next: bool,
    ) -> StoreResult<Committed<()>> {
        let op = op::Finish {
            id,
            outputs,
            end,
            start_next,
        };
        self.run(None, op).await
    }

    /// A running task's agent asks: `outputs` before the ask are written, then the
    /// interaction becomes `waiting` with the request `data` (`task.waiting`), to time out after
    /// `timeout`. Refused with [`StoreError::Fenced`] unless `id` is still `running`.
    pub async fn ask(
        &self,
        id: InteractionId,
        outputs: Vec<TaskOutput>,
        data: Value,
        timeout: std::time::Duration,
    ) -> StoreResult<Committed<Interaction>> {
        let request_id = uuid::Uuid::now_v7().simple().to_string();
        let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX / 4);
        let op = op::Ask {
            id,
            outputs,
            data,
            request_id,
            timeout_ms,
        };
        self.run(None, op).await
    }

    /// The client's answer to the pending request `request_id` of `id`: the interaction is
    /// `running` again (`task.resumed`) and its task starts on this node. Not waiting for
    /// that request: [`StoreError::NotWaiting`].
    pub async fn answer(
        &self,
        session: SessionId,
        id: InteractionId,
        request_id: String,
        answer: Value,
    ) -> StoreResult<Committed<Interaction>> {
        let op = op::Answer {
            id,
            request_id,
            answer,
        };
        self.run(Some(session), op).await
    }

    /// Cancels `id` with reason `timeout` if it is still `waiting` past its deadline.
    pub async fn expire_wait(
        &self,
        session: SessionId,
        id: InteractionId,
        start_next: bool,
    ) -> StoreResult<Committed<()>> {
        self.run(Some(session), op::ExpireWait { id, start_next })
            .await
    }

    /// `waiting` interactions whose deadline passed, at most `limit`.
    pub async fn expired_waits(&self, limit: u32) -> StoreResult<Vec<(SessionId, InteractionId)>> {
        let now = crate::model::Millis::now();
        dispatch!(self.expired_waits(now, limit))
    }

    /// Cancels the target; when it was the running one and `start_next`, starts the next
    /// queued one. Returns the interactions cancelled.
    pub async fn cancel(
        &self,
        session: SessionId,
        target: CancelTarget,
        reason: CancelReason,
        start_next: bool,
    ) -> StoreResult<Committed<Vec<InteractionId>>> {
        let op = op::Cancel {
            target,
            reason,
            start_next,
        };
        self.run(Some(session), op).await
    }

    /// Cancels every running and queued interaction (`clear`), removes interactions and
    /// context, bumps the epoch and emits `session.cleared`. Creates the session if absent.
    pub async fn clear(
        &self,
        session: SessionId,
        default_agent: String,
    ) -> StoreResult<Committed<Cleared>> {
        self.run(Some(session), op::Clear { default_agent }).await
    }

    pub async fn get_context(&self, session: SessionId) -> StoreResult<JsonObject> {
        dispatch!(self.get_context(session))
    }

    /// Replaces the context with `set` (if given), then merge-patches it (RFC 7396) with
    /// `patch` (if given), in one write; creates the session if absent.
    pub async fn update_context(
        &self,
        session: SessionId,
        set: Option<JsonObject>,
        patch: Option<JsonObject>,
        default_agent: String,
    ) -> StoreResult<Committed<JsonObject>> {
        let op = op::UpdateContext {
            set,
            patch,
            default_agent,
        };
        self.run(Some(session), op).await
    }

    /// Interactions of the current epoch, newest first, before the cursor `before`.
    pub async fn list_interactions(
        &self,
        session: SessionId,
        before: Option<String>,
        limit: u32,
    ) -> StoreResult<Page<Interaction>> {
        dispatch!(self.list_interactions(session, before, limit))
    }

    pub async fn get_interaction(
        &self,
        session: SessionId,
        id: InteractionId,
    ) -> StoreResult<Interaction> {
        dispatch!(self.get_interaction(session, id))
    }

    /// What a task's agent is given, read in one snapshot: the session (with its context)
    /// and the last `limit` completed interactions of the current epoch, oldest first.
    pub async fn task_inputs(
        &self,
        session: SessionId,
        limit: u32,
    ) -> StoreResult<(Session, Vec<Interaction>)> {
        dispatch!(self.task_inputs(session, limit))
    }

    /// The session's latest `limit` completed interactions of its epoch, oldest first: an
    /// agent's history.
    pub async fn history(&self, session: SessionId, limit: u32) -> StoreResult<Vec<Interaction>> {
        dispatch!(self.history(session, limit))
    }

    /// Stored events with `seq > after`, in order, at most `limit`.
    pub async fn events_after(
        &self,
        session: SessionId,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<Event>> {
        dispatch!(self.events_after(session, after, limit))
    }

    /// A subscriber of `session` has read that its last seq is `last_seq`: it needs every
    /// event after it live (with several nodes, the store orders that session's events
    /// from there on).
    pub fn anchor(&self, session: &SessionId, last_seq: i64) {
        if let Backend::Postgres(b) = &*self.backend {
            b.anchor(session, last_seq);
        }
    }

    /// After a crash: interactions left `running` become `failed` (`interrupted`), then each
    /// session with queued work and nothing running starts its oldest. Returns the tasks
    /// to start.
    pub async fn recover(&self) -> StoreResult<Effects> {
        dispatch!(self.recover())
    }

    pub fn stats(&self) -> &StoreStats {
        match &*self.backend {
            Backend::Sqlite(b) => b.stats(),
            Backend::Postgres(b) => b.stats(),
        }
    }

    /// A cheap round trip through the writer and a reader: is storage usable?
    pub async fn check(&self) -> StoreResult<()> {
        dispatch!(self.check())
    }
}
