//! The store contract: every state change of a session is one transaction that checks the
//! current state, writes the new state and appends the events it causes (allocating their
//! per-session `seq`). Events are handed to the [`Bus`] only after their
//! transaction commits, in `seq` order.
//!
//! [`Store`] is the one API; the backend behind it is chosen by the database URL.

mod postgres;
mod rules;
mod shared;
mod sqlite;

use std::sync::Arc;

use serde_json::Value;

use crate::bus::{Bus, FinalWatch};
use crate::config::{DatabaseLocation, Synchronous};
use crate::model::{
    CancelReason, ErrorInfo, Event, Interaction, InteractionId, JsonObject, Policy, Session,
    SessionId, Tenant,
};
pub use postgres::PgOptions;
use rules::{Operation, Outcome};

/// Errors of store operations. Each refusal leaves the stored state unchanged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("session not found")]
    SessionNotFound,
    #[error("interaction not found")]
    InteractionNotFound,
    #[error("session is busy")]
    Busy { running: InteractionId },
    #[error("queue is full ({limit} queued)")]
    QueueFull { limit: u32 },
    #[error("idempotency key was used with a different content or metadata")]
    IdempotencyMismatch,
    /// An answer to an interaction that is not `waiting` for that request.
    #[error("the interaction is not waiting for this request")]
    NotWaiting,
    /// A context write (or an agent's patch, the `at`th of its outputs) would make the
    /// context serialize to `size` bytes, past `limit`; nothing was changed.
    #[error("the context would be {size} bytes, past the limit of {limit} (max_context_bytes)")]
    ContextTooLarge {
        limit: usize,
        size: usize,
        at: Option<usize>,
    },
    /// Creating the session would give its tenant more than `limit` sessions.
    #[error("the tenant has {limit} sessions, its limit (max_sessions_per_tenant)")]
    TenantLimit { limit: u64 },
    /// The task's interaction is no longer `running` (cancelled, cleared, deleted, finished):
    /// its write is refused.
    #[error("interaction is no longer running")]
    Fenced,
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("storage error: {0}")]
    Internal(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Internal(e.to_string())
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Internal(format!("json: {e}"))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

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
    /// Register a [`FinalWatch`] for the interaction (for `?wait=`).
    pub watch_final: bool,
}

/// An interaction that became `running` in a committed transaction: the node that committed
/// it runs its task.
#[derive(Debug, Clone)]
pub struct StartedTask {
    pub interaction: Interaction,
    /// The session's agent at the moment it started.
    pub agent: String,
}

/// What accepting a message did.
#[derive(Debug)]
pub struct Accepted {
    pub interaction: Interaction,
    /// The idempotency key matched an earlier message: nothing new was stored or started.
    pub replayed: bool,
    pub started: Option<StartedTask>,
    /// Interactions cancelled by `interrupt`.
    pub cancelled: Vec<InteractionId>,
    /// Registered before any later commit could finish the interaction, when asked for.
    pub final_watch: Option<FinalWatch>,
}

/// What a cancel did.
#[derive(Debug, Clone, Default)]
pub struct Cancelled {
    pub cancelled: Vec<InteractionId>,
    pub started: Option<StartedTask>,
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
    /// runner takes it out of the outputs ([`Store::ask`]); it is never written as one.
    Ask(Value),
}

/// How a task ended on its own (cancellation goes through [`Store::cancel`]).
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

/// A page of results with the cursor of the next one.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
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

/// How long an idempotency key is remembered, in milliseconds.
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;

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

/// Registers the [`FinalWatch`] an accepted message asked for; called in the transaction,
/// before its commit publishes, so no final event of the interaction can be missed.
fn register_final_watch(bus: &Arc<Bus>, outcome: &mut Outcome) {
    if let Outcome::Accepted(accepted) = outcome {
        let i = &accepted.interaction;
        if !i.status.is_final() {
            accepted.final_watch = Some(bus.watch_final(&i.session, &i.id));
        }
    }
}

impl Store {
    /// Runs one operation of the session rules: one transaction on the backend.
    async fn run(&self, session: Option<SessionId>, op: Operation) -> StoreResult<Outcome> {
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

    /// Takes over the work of nodes whose lease expired; returns the tasks started here.
    pub async fn take_over(&self) -> StoreResult<Vec<StartedTask>> {
        match &*self.backend {
            Backend::Sqlite(_) => Ok(Vec::new()),
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
    ) -> StoreResult<(Session, bool)> {
        let op = Operation::PutSession {
            agent,
            context,
            default_agent,
        };
        self.run(Some(id), op).await?.into_session()
    }

    pub async fn get_session(&self, id: SessionId) -> StoreResult<Session> {
        dispatch!(self.get_session(id))
    }

    /// Sessions ordered by id, after the cursor `after`.
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
    pub async fn delete_session(&self, id: SessionId) -> StoreResult<Vec<InteractionId>> {
        self.run(Some(id), Operation::DeleteSession)
            .await?
            .into_deleted()
    }

    /// Accepts a message under its policy (idempotency first, then the busy check).
    pub async fn accept_message(&self, message: NewMessage) -> StoreResult<Accepted> {
        let session = message.session.clone();
        self.run(Some(session), Operation::Accept(message))
            .await?
            .into_accepted()
    }

    /// Appends a running task's outputs; refused with [`StoreError::Fenced`] unless `id` is
    /// still `running`.
    pub async fn append_outputs(
        &self,
        id: InteractionId,
        outputs: Vec<TaskOutput>,
    ) -> StoreResult<()> {
        self.run(None, Operation::Append { id, outputs })
            .await?
            .into_appended()
    }

    /// Appends the task's last `outputs`, makes the running interaction final and, when
    /// `start_next`, starts the session's next queued one — one transaction.
    pub async fn finish(
        &self,
        id: InteractionId,
        outputs: Vec<TaskOutput>,
        end: TaskEnd,
        start_next: bool,
    ) -> StoreResult<Option<StartedTask>> {
        let op = Operation::Finish {
            id,
            outputs,
            end,
            start_next,
        };
        self.run(None, op).await?.into_started()
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
    ) -> StoreResult<Interaction> {
        let request_id = uuid::Uuid::now_v7().simple().to_string();
        let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX / 4);
        self.run(
            None,
            Operation::Ask {
                id,
                outputs,
                data,
                request_id,
                timeout_ms,
            },
        )
        .await?
        .into_waiting()
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
    ) -> StoreResult<StartedTask> {
        self.run(
            Some(session),
            Operation::Answer {
                id,
                request_id,
                answer,
            },
        )
        .await?
        .into_resumed()
    }

    /// Cancels `id` with reason `timeout` if it is still `waiting` past its deadline.
    pub async fn expire_wait(
        &self,
        session: SessionId,
        id: InteractionId,
        start_next: bool,
    ) -> StoreResult<Cancelled> {
        self.run(Some(session), Operation::ExpireWait { id, start_next })
            .await?
            .into_cancelled()
    }

    /// `waiting` interactions whose deadline passed, at most `limit`.
    pub async fn expired_waits(&self, limit: u32) -> StoreResult<Vec<(SessionId, InteractionId)>> {
        let now = crate::model::Millis::now();
        dispatch!(self.expired_waits(now, limit))
    }

    /// Cancels the target; when it was the running one and `start_next`, starts the next
    /// queued one.
    pub async fn cancel(
        &self,
        session: SessionId,
        target: CancelTarget,
        reason: CancelReason,
        start_next: bool,
    ) -> StoreResult<Cancelled> {
        let op = Operation::Cancel {
            target,
            reason,
            start_next,
        };
        self.run(Some(session), op).await?.into_cancelled()
    }

    /// Cancels every running and queued interaction (`clear`), removes interactions and
    /// context, bumps the epoch and emits `session.cleared`. Creates the session if absent.
    pub async fn clear(&self, session: SessionId, default_agent: String) -> StoreResult<Cleared> {
        self.run(Some(session), Operation::Clear { default_agent })
            .await?
            .into_cleared()
    }

    pub async fn get_context(&self, session: SessionId) -> StoreResult<JsonObject> {
        dispatch!(self.get_context(session))
    }

    /// Replaces (`patch == false`) or merge-patches the context; creates the session if absent.
    pub async fn update_context(
        &self,
        session: SessionId,
        value: JsonObject,
        patch: bool,
        default_agent: String,
    ) -> StoreResult<JsonObject> {
        let op = Operation::UpdateContext {
            value,
            patch,
            default_agent,
        };
        self.run(Some(session), op).await?.into_context()
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

    /// Stored events with `seq > after`, in order, at most `limit`.
    pub async fn events_after(
        &self,
        session: SessionId,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<Event>> {
        dispatch!(self.events_after(session, after, limit))
    }

    /// After a crash: interactions left `running` become `failed` (`interrupted`), then each
    /// session with queued work and nothing running starts its oldest. Returns those started.
    pub async fn recover(&self) -> StoreResult<Vec<StartedTask>> {
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

/// A PostgreSQL URL as tokio-postgres reads it (`sslmode` mapped, `sslrootcert` taken out),
/// or why it is not one.
pub fn postgres_url(url: &str) -> Result<String, String> {
    postgres::tls::PgUrl::parse(url).map(|u| u.url)
}
