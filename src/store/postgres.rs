//! The PostgreSQL backend, for several Baton nodes sharing one database. Every operation is
//! one transaction that locks the session's row (`SELECT … FOR UPDATE`), so writes to one
//! session are serialised by the database — across nodes — while different sessions never
//! wait for each other. The partial unique index on `running` backs I1 up in the schema.
//!
//! Cross-node delivery: after each commit the node notifies `baton_events` with the session and
//! the seqs appended (a few bytes, far below the 8,000-byte payload limit) and `baton_cancel`
//! with the interactions cancelled — batched, outside the write transactions, which would
//! otherwise all queue on PostgreSQL's one notification lock at commit. A watchdog compares
//! watched sessions with the database every second, so a lost notification (a node dying
//! between commit and notify) delays an event, never loses it. Each node keeps one listening
//! connection; on a notification
//! about a session somebody here listens to, it reads the new event rows (one query for every
//! pending session) and publishes them on the local bus. A node publishes its own commits at
//! once; a per-session cursor makes every publication contiguous, so local and remote events
//! interleave without gap or duplicate. A dropped listener reconnects and re-reads every
//! watched session from its cursor.
//!
//! Nodes heartbeat a row in `nodes` (lease in database time). A node whose lease expired is
//! taken over by a surviving one: its `running` interactions fail with `interrupted` and their
//! sessions' queued work starts there. The interrupted tasks' late writes are fenced like any
//! other write for an interaction that is no longer running.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, NoTls, Row};

use super::shared::{
    ClearedData, ContextData, DeltaData, Empty, InteractionData, ProgressData, SessionData,
    SessionRow, delta_text, page, patched,
};
use super::{
    Accepted, CancelTarget, Cancelled, Cleared, IDEMPOTENCY_TTL_MS, NewMessage, Page, StartedTask,
    StoreError, StoreResult, StoreStats, TaskEnd, TaskOutput,
};
use crate::bus::Bus;
use crate::model::{
    CancelReason, ErrorInfo, Event, EventType, IdGenerator, Interaction, InteractionId, JsonObject,
    Millis, Policy, Session, SessionId, Status,
};

/// The notification channel of appended events: payload `SESSION FIRST_SEQ LAST_SEQ`.
const EVENTS_CHANNEL: &str = "baton_events";
/// The notification channel of cancelled interactions: payload the interaction id.
const CANCEL_CHANNEL: &str = "baton_cancel";
/// Event rows read by one catch-up query at most.
const FILL_BATCH: i64 = 2000;
/// Attempts of a transaction that lost a deadlock or a serialization race.
const TX_ATTEMPTS: u32 = 4;
/// Identifies the schema lock among advisory locks.
const MIGRATION_LOCK: i64 = 0x0062_6174_6f6e;

/// Schema versions, applied in order at start-up under an advisory lock (several nodes may
/// start at once).
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE sessions (
    id          TEXT PRIMARY KEY,
    agent       TEXT NOT NULL,
    context     TEXT NOT NULL DEFAULT '{}',
    epoch       BIGINT NOT NULL DEFAULT 0,
    last_seq    BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL
);
CREATE TABLE interactions (
    id              TEXT PRIMARY KEY,
    session         TEXT NOT NULL,
    epoch           BIGINT NOT NULL,
    content         TEXT NOT NULL,
    metadata        TEXT NOT NULL,
    status          TEXT NOT NULL
                    CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled')),
    response        TEXT NOT NULL DEFAULT '',
    error_code      TEXT,
    error_message   TEXT,
    cancel_reason   TEXT,
    idempotency_key TEXT,
    created_at      BIGINT NOT NULL,
    started_at      BIGINT,
    finished_at     BIGINT,
    node            TEXT
);
CREATE UNIQUE INDEX interactions_one_running ON interactions (session) WHERE status = 'running';
CREATE INDEX interactions_by_session ON interactions (session, id);
CREATE INDEX interactions_queued ON interactions (session, id) WHERE status = 'queued';
CREATE INDEX interactions_running_node ON interactions (node) WHERE status = 'running';
CREATE UNIQUE INDEX interactions_idempotency
    ON interactions (session, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE TABLE events (
    session        TEXT NOT NULL,
    seq            BIGINT NOT NULL,
    type           TEXT NOT NULL,
    interaction_id TEXT,
    envelope       TEXT NOT NULL,
    at             BIGINT NOT NULL,
    PRIMARY KEY (session, seq)
);
CREATE TABLE retired_sessions (
    id       TEXT PRIMARY KEY,
    last_seq BIGINT NOT NULL
);
CREATE TABLE nodes (
    id          TEXT PRIMARY KEY,
    lease_until BIGINT NOT NULL,
    started_at  BIGINT NOT NULL
);
"#,
    r#"
-- Retention: deltas of final interactions, then every event, by age.
CREATE INDEX events_deltas_by_at ON events (at) WHERE type = 'task.delta';
CREATE INDEX events_by_at ON events (at);
"#,
];

/// The database's clock in milliseconds: leases are compared in one clock, whatever the nodes'.
const DB_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

macro_rules! interaction_columns {
    () => {
        "id, session, content, metadata, status, response, error_code, error_message, \
         cancel_reason, created_at, started_at, finished_at"
    };
}

const SESSION_SELECT: &str = "SELECT s.id, s.agent, s.context, s.epoch, s.last_seq, s.created_at, \
     (SELECT count(*) FROM interactions q WHERE q.session = s.id AND q.status = 'queued'), \
     r.id, r.session, r.content, r.metadata, r.status, r.response, r.error_code, \
     r.error_message, r.cancel_reason, r.created_at, r.started_at, r.finished_at \
     FROM sessions s LEFT JOIN interactions r ON r.session = s.id AND r.status = 'running'";

/// Settings of the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PgOptions {
    pub url: String,
    /// Connections in the pool at most (the listener has one more of its own).
    pub pool_size: usize,
    /// How long a node's heartbeat keeps it alive.
    pub lease: Duration,
}

pub(super) struct PgStore {
    pool: Pool,
    bus: Arc<Bus>,
    /// This node's id; a new one after a lost lease, so that the old one's interactions are
    /// taken over like any lost node's.
    node: Mutex<Arc<str>>,
    ids: Mutex<IdGenerator>,
    stats: Arc<StoreStats>,
    sequencer: Arc<Sequencer>,
    /// What this node's commits tell the other nodes, sent in batches by [`run_notifier`].
    notes: mpsc::UnboundedSender<Note>,
    cancels: Mutex<Option<mpsc::UnboundedReceiver<InteractionId>>>,
    lease: Duration,
    background: Vec<tokio::task::AbortHandle>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        for task in &self.background {
            task.abort();
        }
    }
}

fn pg_error(e: tokio_postgres::Error) -> StoreError {
    if e.is_closed() {
        return StoreError::Unavailable(format!("database connection: {e}"));
    }
    match e.as_db_error() {
        Some(db) => {
            StoreError::Internal(format!("database: {}: {}", db.code().code(), db.message()))
        }
        None => StoreError::Unavailable(format!("database: {e}")),
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        pg_error(e)
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        StoreError::Unavailable(format!("database pool: {e}"))
    }
}

/// Whether a failed transaction may simply be tried again.
fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

/// Runs a transaction body, retrying on deadlocks and serialization failures.
macro_rules! transaction {
    ($store:expr, |$w:ident| $body:block) => {{
        let store: &PgStore = $store;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut client = store.pool.get().await?;
            let tx = client.transaction().await?;
            let mut $w = PgTx::new(&tx, store);
            let outcome: Result<_, TxError> = async { $body }.await;
            let (mut events, cancelled, deleted) = $w.into_parts();
            if let Some(deleted) = &deleted {
                // Published, never stored: the session and its log are gone.
                for (event, _, store) in events.iter_mut() {
                    if &event.session == deleted {
                        *store = false;
                    }
                }
            }
            match outcome {
                Ok(value) => match store.commit(tx, events, cancelled).await {
                    Ok(()) => break Ok(value),
                    Err(TxError::Db(e)) if retryable(&e) && attempt < TX_ATTEMPTS => continue,
                    Err(e) => break Err(StoreError::from(e)),
                },
                Err(TxError::Db(e)) if retryable(&e) && attempt < TX_ATTEMPTS => continue,
                Err(e) => break Err(StoreError::from(e)),
            }
        }
    }};
}

/// A transaction body's error: a refusal (state unchanged) or a database failure.
enum TxError {
    Store(StoreError),
    Db(tokio_postgres::Error),
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError::Store(e)
    }
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        TxError::Db(e)
    }
}

impl From<serde_json::Error> for TxError {
    fn from(e: serde_json::Error) -> Self {
        TxError::Store(e.into())
    }
}

impl From<TxError> for StoreError {
    fn from(e: TxError) -> Self {
        match e {
            TxError::Store(e) => e,
            TxError::Db(e) => pg_error(e),
        }
    }
}

type TxResult<T> = Result<T, TxError>;

impl PgStore {
    pub(super) async fn open(options: PgOptions, bus: Arc<Bus>) -> StoreResult<Self> {
        let mut config = tokio_postgres::Config::from_str(&options.url)
            .map_err(|e| StoreError::Internal(format!("database URL: {e}")))?;
        // A node paused or cut off in the middle of a transaction would hold its session's
        // row lock indefinitely; the server ends such a transaction well within a lease, so
        // the other nodes can take the session over.
        let idle_ms = (options.lease.as_millis() / 2).max(500);
        let mut server_options = config.get_options().unwrap_or_default().to_string();
        server_options.push_str(&format!(
            " -c idle_in_transaction_session_timeout={idle_ms}"
        ));
        config.options(server_options.trim());
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(2))
            .wait_timeout(Some(Duration::from_secs(10)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Internal(format!("database pool: {e}")))?;
        migrate(&pool).await?;
        let node: Arc<str> = Arc::from(IdGenerator::default().next_id().as_str());
        let lease_ms = i64::try_from(options.lease.as_millis()).unwrap_or(i64::MAX);
        pool.get()
            .await?
            .execute(
                &format!(
                    "INSERT INTO nodes (id, lease_until, started_at) \
                     VALUES ($1, {DB_NOW_MS} + $2, {DB_NOW_MS})"
                ),
                &[&&*node, &lease_ms],
            )
            .await?;
        let (fill_tx, fill_rx) = mpsc::unbounded_channel();
        let (notes, notes_rx) = mpsc::unbounded_channel();
        let (cancel_tx, cancel_rx) = mpsc::unbounded_channel();
        let sequencer = Arc::new(Sequencer {
            bus: bus.clone(),
            cursors: Mutex::new(HashMap::new()),
            fills: fill_tx,
        });
        let anchoring = Arc::downgrade(&sequencer);
        bus.set_anchor_hook(Box::new(move |session, last_seq| {
            if let Some(sequencer) = anchoring.upgrade() {
                sequencer.anchor(session, last_seq);
            }
        }));
        let filler = tokio::spawn(run_filler(pool.clone(), sequencer.clone(), fill_rx));
        let notifier = tokio::spawn(run_notifier(pool.clone(), notes_rx));
        let watchdog = tokio::spawn(run_watchdog(pool.clone(), sequencer.clone()));
        let listener = tokio::spawn(run_listener(config, sequencer.clone(), cancel_tx));
        tracing::info!(node = %node, "joined the cluster");
        Ok(Self {
            pool,
            bus,
            node: Mutex::new(node),
            ids: Mutex::new(IdGenerator::default()),
            stats: Arc::new(StoreStats::default()),
            sequencer,
            cancels: Mutex::new(Some(cancel_rx)),
            lease: options.lease,
            notes,
            background: vec![
                filler.abort_handle(),
                listener.abort_handle(),
                notifier.abort_handle(),
                watchdog.abort_handle(),
            ],
        })
    }

    pub(super) fn lease(&self) -> Duration {
        self.lease
    }

    fn node(&self) -> Arc<str> {
        Arc::clone(&self.node.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(super) fn take_remote_cancels(&self) -> Option<mpsc::UnboundedReceiver<InteractionId>> {
        self.cancels.lock().ok()?.take()
    }

    /// Notifies, commits, then publishes the transaction's events locally.
    async fn commit(
        &self,
        tx: deadpool_postgres::Transaction<'_>,
        events: Vec<PendingEvent>,
        cancelled: Vec<InteractionId>,
    ) -> TxResult<()> {
        if events.iter().any(|(_, _, stored)| *stored) {
            let mut sessions = Vec::with_capacity(events.len());
            let mut seqs = Vec::with_capacity(events.len());
            let mut kinds = Vec::with_capacity(events.len());
            let mut about = Vec::with_capacity(events.len());
            let mut envelopes = Vec::with_capacity(events.len());
            let mut ats = Vec::with_capacity(events.len());
            for (event, at, _) in events.iter().filter(|(_, _, stored)| *stored) {
                sessions.push(event.session.as_str());
                seqs.push(event.seq);
                kinds.push(event.kind.as_str());
                about.push(event.interaction_id.as_ref().map(InteractionId::as_str));
                envelopes.push(&*event.envelope);
                ats.push(at.0);
            }
            let insert = tx
                .prepare_cached(
                    "INSERT INTO events (session, seq, type, interaction_id, envelope, at) \
                     SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], \
                     $5::text[], $6::bigint[])",
                )
                .await?;
            tx.execute(
                &insert,
                &[&sessions, &seqs, &kinds, &about, &envelopes, &ats],
            )
            .await?;
        }
        tx.commit().await?;
        // Notified after the commit, batched with other commits by the notifier: a NOTIFY
        // inside each write transaction would serialise every commit of the database on
        // PostgreSQL's notification queue lock.
        for (session, first, last) in ranges(&events) {
            let _ = self.notes.send(Note::Events(session.clone(), first, last));
        }
        for id in cancelled {
            let _ = self.notes.send(Note::Cancel(id));
        }
        self.stats
            .commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.stats
            .jobs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.sequencer
            .deliver(events.into_iter().map(|(e, _, _)| e).collect(), false);
        Ok(())
    }

    pub(super) async fn put_session(
        &self,
        id: SessionId,
        agent: Option<String>,
        context: Option<JsonObject>,
        default_agent: String,
    ) -> StoreResult<(Session, bool)> {
        let created = transaction!(self, |w| {
            let new_agent = agent.clone().unwrap_or_else(|| default_agent.clone());
            let new_context = context.clone().unwrap_or_default();
            let (mut row, created) = w.session_or_create(&id, &new_agent, &new_context).await?;
            if !created {
                if let Some(agent) = &agent {
                    let stmt =
                        w.tx.prepare_cached("UPDATE sessions SET agent = $2 WHERE id = $1")
                            .await?;
                    w.tx.execute(&stmt, &[&id.as_str(), agent]).await?;
                }
                if let Some(context) = &context {
                    w.set_context(&mut row, context).await?;
                }
            }
            w.save_seq(&row).await?;
            Ok(created)
        })?;
        Ok((self.get_session(id).await?, created))
    }

    pub(super) async fn get_session(&self, id: SessionId) -> StoreResult<Session> {
        let client = self.pool.get().await?;
        select_session(&client, &id)
            .await?
            .ok_or(StoreError::SessionNotFound)
    }

    pub(super) async fn list_sessions(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> StoreResult<Page<Session>> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(&format!(
                "{SESSION_SELECT} WHERE s.id > $1 ORDER BY s.id LIMIT $2"
            ))
            .await?;
        let rows = client
            .query(
                &stmt,
                &[&after.unwrap_or_default(), &(i64::from(limit) + 1)],
            )
            .await?;
        let items = rows
            .iter()
            .map(read_session)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(page(items, limit as usize, |s| s.id.to_string()))
    }

    pub(super) async fn delete_session(&self, id: SessionId) -> StoreResult<Vec<InteractionId>> {
        transaction!(self, |w| {
            let mut row = w.session(&id).await?.ok_or(StoreError::SessionNotFound)?;
            let cancelled = w.cancel_all(&mut row, CancelReason::Delete).await?;
            w.emit(&mut row, EventType::SessionDeleted, None, &Empty {}, None)?;
            w.deleted = Some(id.clone());
            let sid = id.as_str();
            for sql in [
                "DELETE FROM events WHERE session = $1",
                "DELETE FROM interactions WHERE session = $1",
                "DELETE FROM sessions WHERE id = $1",
            ] {
                let stmt = w.tx.prepare_cached(sql).await?;
                w.tx.execute(&stmt, &[&sid]).await?;
            }
            let stmt =
                w.tx.prepare_cached(
                    "INSERT INTO retired_sessions (id, last_seq) VALUES ($1, $2) \
                     ON CONFLICT (id) DO UPDATE SET last_seq = EXCLUDED.last_seq",
                )
                .await?;
            w.tx.execute(&stmt, &[&sid, &row.last_seq]).await?;
            Ok(cancelled)
        })
    }

    pub(super) async fn accept_message(&self, msg: NewMessage) -> StoreResult<Accepted> {
        let bus = self.bus.clone();
        transaction!(self, |w| {
            let watch = |i: &Interaction| {
                (msg.watch_final && !i.status.is_final())
                    .then(|| bus.watch_final(&i.session, &i.id))
            };
            let (mut row, _) = w
                .session_or_create(&msg.session, &msg.default_agent, &JsonObject::new())
                .await?;
            if let Some(key) = &msg.idempotency_key
                && let Some(earlier) = w.by_idempotency_key(&row, key, &msg).await?
            {
                w.save_seq(&row).await?;
                return Ok(Accepted {
                    final_watch: watch(&earlier),
                    interaction: earlier,
                    replayed: true,
                    started: None,
                    cancelled: Vec::new(),
                });
            }
            let (running, queued) = w.work_of(&row.id).await?;
            let busy = running.is_some() || !queued.is_empty();
            let mut cancelled = Vec::new();
            if busy {
                match msg.policy {
                    Policy::Reject => {
                        let id = running.or_else(|| queued.into_iter().next());
                        return Err(StoreError::Busy {
                            running: id.ok_or(StoreError::Internal("busy without work".into()))?,
                        }
                        .into());
                    }
                    Policy::Enqueue if queued.len() >= msg.queue_limit as usize => {
                        return Err(StoreError::QueueFull {
                            limit: msg.queue_limit,
                        }
                        .into());
                    }
                    Policy::Enqueue => {}
                    Policy::Interrupt => {
                        cancelled = w.cancel_all(&mut row, CancelReason::Interrupt).await?;
                    }
                }
            }
            let start_now = !busy || msg.policy == Policy::Interrupt;
            // Ids and times follow the order of acceptance within the session, whichever
            // node accepts (the row lock orders the acceptances).
            let (id, now) = w.next_id_after_last(&row.id).await?;
            let interaction = Interaction {
                id,
                session: row.id.clone(),
                content: msg.content.clone(),
                metadata: msg.metadata.clone(),
                status: if start_now {
                    Status::Running
                } else {
                    Status::Queued
                },
                response: String::new(),
                error: None,
                cancel_reason: None,
                created_at: now,
                started_at: start_now.then_some(now),
                finished_at: None,
            };
            let stmt =
                w.tx.prepare_cached(
                    "INSERT INTO interactions (id, session, epoch, content, metadata, status, \
                     idempotency_key, created_at, started_at, node) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                )
                .await?;
            let me = self.node();
            let node: Option<&str> = start_now.then_some(&*me);
            w.tx.execute(
                &stmt,
                &[
                    &interaction.id.as_str(),
                    &row.id.as_str(),
                    &row.epoch,
                    &interaction.content,
                    &serde_json::to_string(&interaction.metadata)?,
                    &interaction.status.as_str(),
                    &msg.idempotency_key,
                    &interaction.created_at.0,
                    &interaction.started_at.map(|m| m.0),
                    &node,
                ],
            )
            .await?;
            let kind = if start_now {
                EventType::TaskStarted
            } else {
                EventType::InteractionQueued
            };
            w.emit_interaction(&mut row, kind, &interaction)?;
            w.save_seq(&row).await?;
            let started = start_now.then(|| StartedTask {
                interaction: interaction.clone(),
                agent: row.agent.clone(),
            });
            Ok(Accepted {
                final_watch: watch(&interaction),
                interaction,
                replayed: false,
                started,
                cancelled,
            })
        })
    }

    pub(super) async fn append_outputs(
        &self,
        id: InteractionId,
        outputs: Vec<TaskOutput>,
    ) -> StoreResult<()> {
        transaction!(self, |w| {
            let session = w.running_session_of(&id).await?;
            let mut row = w.session(&session).await?.ok_or(StoreError::Fenced)?;
            // Checked again under the session's lock: a cancel may have committed meanwhile.
            w.running_session_of(&id).await?;
            let text = w.write_outputs(&mut row, &id, outputs.clone()).await?;
            if !text.is_empty() {
                let stmt =
                    w.tx.prepare_cached(
                        "UPDATE interactions SET response = response || $2 WHERE id = $1",
                    )
                    .await?;
                w.tx.execute(&stmt, &[&id.as_str(), &text]).await?;
            }
            w.save_seq(&row).await?;
            Ok(())
        })
    }

    pub(super) async fn finish(
        &self,
        id: InteractionId,
        outputs: Vec<TaskOutput>,
        end: TaskEnd,
        start_next: bool,
    ) -> StoreResult<Option<StartedTask>> {
        transaction!(self, |w| {
            let session = w.running_session_of(&id).await?;
            let mut row = w.session(&session).await?.ok_or(StoreError::Fenced)?;
            let mut interaction = w
                .interaction(&id)
                .await?
                .filter(|i| i.status == Status::Running)
                .ok_or(StoreError::Fenced)?;
            let text = w.write_outputs(&mut row, &id, outputs.clone()).await?;
            interaction.response.push_str(&text);
            let (status, error) = match end.clone() {
                TaskEnd::Completed { response } => {
                    if let Some(response) = response {
                        interaction.response = response;
                    }
                    (Status::Completed, None)
                }
                TaskEnd::Failed(error) => (Status::Failed, Some(error)),
            };
            w.make_final(&mut row, &mut interaction, status, error, None)
                .await?;
            let next = if start_next {
                w.start_next(&mut row).await?
            } else {
                None
            };
            w.save_seq(&row).await?;
            Ok(next)
        })
    }

    pub(super) async fn cancel(
        &self,
        session: SessionId,
        target: CancelTarget,
        reason: CancelReason,
        start_next: bool,
    ) -> StoreResult<Cancelled> {
        transaction!(self, |w| {
            let mut row = w
                .session(&session)
                .await?
                .ok_or(StoreError::SessionNotFound)?;
            let target = match &target {
                CancelTarget::Running => w.running(&session).await?,
                CancelTarget::Named(id) => {
                    let found = w.interaction(id).await?.filter(|i| i.session == session);
                    Some(found.ok_or(StoreError::InteractionNotFound)?)
                }
            };
            let Some(mut target) = target.filter(|i| !i.status.is_final()) else {
                return Ok(Cancelled::default());
            };
            let was_running = target.status == Status::Running;
            w.make_final(&mut row, &mut target, Status::Cancelled, None, Some(reason))
                .await?;
            w.cancelled.push(target.id.clone());
            let started = if was_running && start_next {
                w.start_next(&mut row).await?
            } else {
                None
            };
            w.save_seq(&row).await?;
            Ok(Cancelled {
                cancelled: vec![target.id],
                started,
            })
        })
    }

    pub(super) async fn clear(
        &self,
        session: SessionId,
        default_agent: String,
    ) -> StoreResult<Cleared> {
        transaction!(self, |w| {
            let (mut row, _) = w
                .session_or_create(&session, &default_agent, &JsonObject::new())
                .await?;
            let cancelled = w.cancel_all(&mut row, CancelReason::Clear).await?;
            let stmt =
                w.tx.prepare_cached("DELETE FROM interactions WHERE session = $1")
                    .await?;
            w.tx.execute(&stmt, &[&session.as_str()]).await?;
            row.epoch += 1;
            row.context = Ok(JsonObject::new());
            let stmt =
                w.tx.prepare_cached("UPDATE sessions SET context = '{}', epoch = $2 WHERE id = $1")
                    .await?;
            w.tx.execute(&stmt, &[&session.as_str(), &row.epoch])
                .await?;
            let epoch = row.epoch;
            w.emit(
                &mut row,
                EventType::SessionCleared,
                None,
                &ClearedData { epoch },
                None,
            )?;
            w.save_seq(&row).await?;
            Ok(Cleared { epoch, cancelled })
        })
    }

    pub(super) async fn get_context(&self, session: SessionId) -> StoreResult<JsonObject> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached("SELECT context FROM sessions WHERE id = $1")
            .await?;
        let row = client
            .query_opt(&stmt, &[&session.as_str()])
            .await?
            .ok_or(StoreError::SessionNotFound)?;
        Ok(serde_json::from_str(row.try_get::<_, &str>(0)?)?)
    }

    pub(super) async fn update_context(
        &self,
        session: SessionId,
        value: JsonObject,
        patch: bool,
        default_agent: String,
    ) -> StoreResult<JsonObject> {
        transaction!(self, |w| {
            let (mut row, _) = w
                .session_or_create(&session, &default_agent, &JsonObject::new())
                .await?;
            let context = if patch {
                patched(row.context()?, value.clone())?
            } else {
                value.clone()
            };
            w.set_context(&mut row, &context).await?;
            w.save_seq(&row).await?;
            Ok(context)
        })
    }

    pub(super) async fn list_interactions(
        &self,
        session: SessionId,
        before: Option<String>,
        limit: u32,
    ) -> StoreResult<Page<Interaction>> {
        let client = self.pool.get().await?;
        require_session(&client, &session).await?;
        let stmt = client
            .prepare_cached(concat!(
                "SELECT ",
                interaction_columns!(),
                " FROM interactions WHERE session = $1 AND ($2::text IS NULL OR id < $2) \
                 ORDER BY id DESC LIMIT $3"
            ))
            .await?;
        let rows = client
            .query(
                &stmt,
                &[&session.as_str(), &before, &(i64::from(limit) + 1)],
            )
            .await?;
        let items = rows
            .iter()
            .map(|r| read_interaction(r, 0))
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(page(items, limit as usize, |i| i.id.to_string()))
    }

    pub(super) async fn get_interaction(
        &self,
        session: SessionId,
        id: InteractionId,
    ) -> StoreResult<Interaction> {
        let client = self.pool.get().await?;
        let found = select_interaction(&client, &id)
            .await?
            .filter(|i| i.session == session);
        match found {
            Some(i) => Ok(i),
            None => {
                require_session(&client, &session).await?;
                Err(StoreError::InteractionNotFound)
            }
        }
    }

    pub(super) async fn task_inputs(
        &self,
        session: SessionId,
        limit: u32,
    ) -> StoreResult<(Session, Vec<Interaction>)> {
        let mut client = self.pool.get().await?;
        // One snapshot for both reads.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let found = select_session(&tx, &session)
            .await?
            .ok_or(StoreError::SessionNotFound)?;
        let stmt = tx
            .prepare_cached(concat!(
                "SELECT ",
                interaction_columns!(),
                " FROM interactions WHERE session = $1 AND status = 'completed' \
                 ORDER BY id DESC LIMIT $2"
            ))
            .await?;
        let rows = tx
            .query(&stmt, &[&session.as_str(), &i64::from(limit)])
            .await?;
        tx.commit().await?;
        let mut items = rows
            .iter()
            .map(|r| read_interaction(r, 0))
            .collect::<StoreResult<Vec<_>>>()?;
        items.reverse();
        Ok((found, items))
    }

    pub(super) async fn events_after(
        &self,
        session: SessionId,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<Event>> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT session, seq, type, interaction_id, envelope FROM events \
                 WHERE session = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            )
            .await?;
        let rows = client
            .query(&stmt, &[&session.as_str(), &after, &i64::from(limit)])
            .await?;
        rows.iter().map(read_event).collect()
    }

    /// Renews this node's lease; `true` when the lease had been lost (another node took over
    /// this node's tasks) and the node joined again.
    pub(super) async fn heartbeat(&self) -> StoreResult<bool> {
        let client = self.pool.get().await?;
        let lease_ms = i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX);
        let me = self.node();
        let renewed = client
            .execute(
                &format!(
                    "UPDATE nodes SET lease_until = {DB_NOW_MS} + $2 \
                     WHERE id = $1 AND lease_until >= {DB_NOW_MS}"
                ),
                &[&&*me, &lease_ms],
            )
            .await?;
        if renewed == 1 {
            return Ok(false);
        }
        // Expired (maybe already taken over): whatever ran here under the old id is no longer
        // ours; it is taken over like any lost node's work. Join again under a new id.
        let fresh: Arc<str> = Arc::from(
            self.ids
                .lock()
                .map_err(|_| StoreError::Internal("id generator poisoned".into()))?
                .next_id()
                .as_str(),
        );
        client
            .execute(
                &format!(
                    "INSERT INTO nodes (id, lease_until, started_at) \
                     VALUES ($1, {DB_NOW_MS} + $2, {DB_NOW_MS})"
                ),
                &[&&*fresh, &lease_ms],
            )
            .await?;
        *self.node.lock().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&fresh);
        tracing::warn!(old = %me, node = %fresh, "this node's lease had expired; joined again");
        Ok(true)
    }

    /// Finishes the running interactions of nodes whose lease expired (`failed`,
    /// `interrupted`), removes those nodes, and starts queued work of sessions where nothing
    /// runs. Returns the tasks started here.
    pub(super) async fn take_over(&self) -> StoreResult<Vec<StartedTask>> {
        let client = self.pool.get().await?;
        let stale: Vec<(String, String)> = client
            .query(
                &format!(
                    "SELECT i.id, i.session FROM interactions i \
                     WHERE i.status = 'running' AND NOT EXISTS \
                     (SELECT 1 FROM nodes n WHERE n.id = i.node AND n.lease_until >= {DB_NOW_MS})"
                ),
                &[],
            )
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, tokio_postgres::Error>>()?;
        let orphans: Vec<String> = client
            .query(
                "SELECT DISTINCT q.session FROM interactions q WHERE q.status = 'queued' \
                 AND NOT EXISTS (SELECT 1 FROM interactions r \
                 WHERE r.session = q.session AND r.status = 'running')",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        drop(client);
        let mut started = Vec::new();
        for (id, session) in stale {
            let id = InteractionId::from_stored(id);
            let Ok(session) = SessionId::parse(&session) else {
                continue;
            };
            let taken = transaction!(self, |w| {
                let Some(mut row) = w.session(&session).await? else {
                    return Ok(None);
                };
                // Re-checked under the lock: its node may have renewed, or it may have ended.
                let dead =
                    w.tx.query_opt(
                        &format!(
                            "SELECT 1 FROM interactions i WHERE i.id = $1 AND i.status = 'running' \
                             AND NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = i.node \
                             AND n.lease_until >= {DB_NOW_MS})"
                        ),
                        &[&id.as_str()],
                    )
                    .await?
                    .is_some();
                if !dead {
                    return Ok(None);
                }
                let Some(mut interaction) = w.interaction(&id).await? else {
                    return Ok(None);
                };
                let error = ErrorInfo {
                    code: "interrupted".into(),
                    message: "the node running this interaction stopped or lost its lease".into(),
                };
                w.make_final(
                    &mut row,
                    &mut interaction,
                    Status::Failed,
                    Some(error),
                    None,
                )
                .await?;
                w.cancelled.push(id.clone());
                let next = w.start_next(&mut row).await?;
                w.save_seq(&row).await?;
                Ok(next)
            })?;
            if let Some(next) = taken {
                tracing::warn!(interaction = %id, "took over the work of a lost node");
                started.push(next);
            }
        }
        for session in orphans {
            let Ok(session) = SessionId::parse(&session) else {
                continue;
            };
            let next = transaction!(self, |w| {
                let Some(mut row) = w.session(&session).await? else {
                    return Ok(None);
                };
                let (running, _) = w.work_of(&session).await?;
                if running.is_some() {
                    return Ok(None);
                }
                let next = w.start_next(&mut row).await?;
                w.save_seq(&row).await?;
                Ok(next)
            })?;
            started.extend(next);
        }
        self.pool
            .get()
            .await?
            .execute(
                &format!(
                    "DELETE FROM nodes n WHERE n.lease_until < {DB_NOW_MS} AND NOT EXISTS \
                     (SELECT 1 FROM interactions i WHERE i.node = n.id AND i.status = 'running')"
                ),
                &[],
            )
            .await?;
        Ok(started)
    }

    /// Deletes, in batches of `batch` rows (each its own short transaction), the
    /// `task.delta` events older than `deltas_before` whose interaction is final (its final
    /// event carries the whole response), then every event older than `events_before`.
    /// Returns the rows deleted.
    pub(super) async fn compact(
        &self,
        deltas_before: Millis,
        events_before: Millis,
        batch: i64,
    ) -> StoreResult<u64> {
        let client = self.pool.get().await?;
        let deltas = client
            .prepare_cached(
                "DELETE FROM events WHERE ctid IN (SELECT e.ctid FROM events e \
                 WHERE e.type = 'task.delta' AND e.at < $1 AND NOT EXISTS \
                 (SELECT 1 FROM interactions i WHERE i.id = e.interaction_id \
                  AND i.status IN ('queued', 'running')) LIMIT $2)",
            )
            .await?;
        let old = client
            .prepare_cached(
                "DELETE FROM events WHERE ctid IN \
                 (SELECT ctid FROM events WHERE at < $1 LIMIT $2)",
            )
            .await?;
        let mut total = 0;
        for (stmt, before) in [(&deltas, deltas_before), (&old, events_before)] {
            loop {
                let deleted = client.execute(stmt, &[&before.0, &batch]).await?;
                total += deleted;
                if deleted < batch.max(1) as u64 {
                    break;
                }
                // Let other work through between batches.
                tokio::task::yield_now().await;
            }
        }
        Ok(total)
    }

    /// At start-up: the work of lost nodes (a previous run of this one included, once its
    /// lease expired) is taken over by the periodic maintenance; queued work waiting with
    /// nothing running starts now.
    pub(super) async fn recover(&self) -> StoreResult<Vec<StartedTask>> {
        self.take_over().await
    }

    /// Leaves the cluster at shutdown: the lease ends now, so nothing waits for it.
    pub(super) async fn leave(&self) -> StoreResult<()> {
        self.pool
            .get()
            .await?
            .execute("DELETE FROM nodes WHERE id = $1", &[&&*self.node()])
            .await?;
        Ok(())
    }

    pub(super) fn stats(&self) -> &StoreStats {
        &self.stats
    }

    pub(super) async fn check(&self) -> StoreResult<()> {
        self.pool.get().await?.execute("SELECT 1", &[]).await?;
        Ok(())
    }
}

/// `(session, first seq, last seq)` of each session's run of events, in order.
fn ranges(events: &[PendingEvent]) -> Vec<(&SessionId, i64, i64)> {
    let mut out: Vec<(&SessionId, i64, i64)> = Vec::new();
    for (event, _, _) in events {
        match out.last_mut() {
            Some((session, _, last)) if *session == &event.session => *last = event.seq,
            _ => out.push((&event.session, event.seq, event.seq)),
        }
    }
    out
}

async fn migrate(pool: &Pool) -> StoreResult<()> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS baton_schema (version INTEGER NOT NULL)")
        .await?;
    let version: i32 = match tx
        .query_opt("SELECT version FROM baton_schema", &[])
        .await?
    {
        Some(row) => row.try_get(0)?,
        None => {
            tx.execute("INSERT INTO baton_schema (version) VALUES (0)", &[])
                .await?;
            0
        }
    };
    let version = usize::try_from(version).unwrap_or(0);
    if version > MIGRATIONS.len() {
        return Err(StoreError::Internal(format!(
            "the database schema (version {version}) is newer than this build knows ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.batch_execute(sql).await?;
        let next = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.execute("UPDATE baton_schema SET version = $1", &[&next])
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Publishes events on the local bus in seq order per session, without gap or duplicate,
/// whether they come from this node's commits or from other nodes (read back after a notify).
struct Sequencer {
    bus: Arc<Bus>,
    /// Last seq published per session that somebody here listens to.
    cursors: Mutex<HashMap<SessionId, i64>>,
    fills: mpsc::UnboundedSender<Fill>,
}

/// A request to read a session's events after `after` from the database and publish them.
struct Fill {
    session: SessionId,
    after: i64,
}

impl Sequencer {
    /// Publishes `events` (ascending per session). A commit's own events must follow the
    /// cursor exactly, else the missing ones are read back first; events read back from the
    /// database (`from_storage`) may skip seqs that no longer exist.
    fn deliver(&self, events: Vec<Event>, from_storage: bool) {
        if events.is_empty() {
            return;
        }
        let mut cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        let mut batch: Vec<Event> = Vec::new();
        let mut rest = events.into_iter().peekable();
        while let Some(first) = rest.next() {
            let session = first.session.clone();
            let mut group = vec![first];
            while let Some(next) = rest.next_if(|e| e.session == session) {
                group.push(next);
            }
            if !self.bus.wants(&session) {
                cursors.remove(&session);
                // Nobody subscribes here; waiters are registered with their session.
                batch.extend(group);
                continue;
            }
            let cursor = cursors.get(&session).copied();
            if cursor.is_none() && self.bus.has_subscribers(&session) {
                // A subscriber whose start is not known yet: its anchor reads these back.
                continue;
            }
            group.retain(|e| cursor.is_none_or(|c| e.seq > c));
            let Some(first_seq) = group.first().map(|e| e.seq) else {
                continue;
            };
            if let Some(c) = cursor
                && first_seq != c + 1
                && !from_storage
            {
                // Someone else's commit came in between: read it back, then ours again.
                let _ = self.fills.send(Fill { session, after: c });
                continue;
            }
            let last = group.last().map_or(first_seq, |e| e.seq);
            cursors.insert(session, last);
            batch.extend(group);
        }
        self.bus.publish(batch);
    }

    /// A notification of `first..=last` appended to `session` by some node.
    fn notified(&self, session: SessionId, first: i64, last: i64) {
        if !self.bus.wants(&session) {
            return;
        }
        let cursor = self
            .cursors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&session)
            .copied();
        let after = match cursor {
            Some(c) if c >= last => return,
            Some(c) => c,
            // A subscriber still to be anchored reads everything from its anchor.
            None if self.bus.has_subscribers(&session) => return,
            // Only final-state waiters: they wait for later events than these.
            None => first - 1,
        };
        let _ = self.fills.send(Fill { session, after });
    }

    /// A subscriber knows everything up to `last_seq`: start ordering the session there
    /// (unless it is ordered already: then it published everything later since).
    fn anchor(&self, session: &SessionId, last_seq: i64) {
        let mut cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        if cursors.contains_key(session) {
            return;
        }
        cursors.insert(session.clone(), last_seq);
        let _ = self.fills.send(Fill {
            session: session.clone(),
            after: last_seq,
        });
    }

    /// After the listener reconnected: read back every watched session from its cursor.
    fn refill_all(&self) {
        let cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        for (session, &after) in cursors.iter() {
            let _ = self.fills.send(Fill {
                session: session.clone(),
                after,
            });
        }
    }

    fn cursor(&self, session: &SessionId) -> Option<i64> {
        self.cursors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(session)
            .copied()
    }

    /// The watched sessions and their cursors.
    fn watched(&self) -> Vec<(SessionId, i64)> {
        let cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        cursors.iter().map(|(s, &c)| (s.clone(), c)).collect()
    }

    /// The database holds events of `session` after `cursor` (the watchdog's finding): read
    /// them back unless they were published meanwhile. A commit still on its way to being
    /// published here only repeats a read; the sequencer drops what it already has.
    fn behind(&self, session: SessionId, cursor: i64) {
        if self.cursor(&session) == Some(cursor) {
            let _ = self.fills.send(Fill {
                session,
                after: cursor,
            });
        }
    }

    /// Forgets cursors of sessions nobody listens to any more.
    fn prune(&self) {
        let mut cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        cursors.retain(|session, _| self.bus.wants(session));
    }
}

/// What a commit tells the other nodes.
enum Note {
    /// Events `first..=last` were appended to the session.
    Events(SessionId, i64, i64),
    /// The interaction was cancelled (its node stops its task).
    Cancel(InteractionId),
}

/// Notes sent in one batch at most.
const NOTE_BATCH: usize = 2000;
/// How often every watched session is compared with the database, in case a notification
/// was lost (a node that died between its commit and its notify, a dropped listener).
const WATCHDOG_INTERVAL: Duration = Duration::from_secs(1);

/// Sends this node's notes in batches: one short autocommit statement per batch, so the
/// notification queue's lock is taken once per batch, never inside a write transaction.
async fn run_notifier(pool: Pool, mut notes: mpsc::UnboundedReceiver<Note>) {
    let mut batch = Vec::with_capacity(NOTE_BATCH);
    while notes.recv_many(&mut batch, NOTE_BATCH).await > 0 {
        // One notification per session per batch: the highest seq covers the rest.
        let mut ranges: HashMap<SessionId, (i64, i64)> = HashMap::new();
        let mut channels: Vec<&str> = Vec::with_capacity(batch.len());
        let mut payloads: Vec<String> = Vec::with_capacity(batch.len());
        for note in batch.drain(..) {
            match note {
                Note::Events(session, first, last) => {
                    let range = ranges.entry(session).or_insert((first, last));
                    range.0 = range.0.min(first);
                    range.1 = range.1.max(last);
                }
                Note::Cancel(id) => {
                    channels.push(CANCEL_CHANNEL);
                    payloads.push(id.to_string());
                }
            }
        }
        for (session, (first, last)) in ranges {
            channels.push(EVENTS_CHANNEL);
            payloads.push(format!("{session} {first} {last}"));
        }
        for attempt in 1..=5u32 {
            let sent = async {
                let client = pool.get().await?;
                let stmt = client
                    .prepare_cached(
                        "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS t(c, p)",
                    )
                    .await?;
                client.execute(&stmt, &[&channels, &payloads]).await?;
                Ok::<_, StoreError>(())
            };
            match sent.await {
                Ok(()) => break,
                Err(e) => {
                    // Other nodes' watchdogs catch up on what they were not told.
                    tracing::warn!(error = %e, attempt, "notifying other nodes");
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
            }
        }
    }
}

/// Compares every watched session's last seq in the database with what was published here,
/// and reads back what a lost notification would have announced.
async fn run_watchdog(pool: Pool, sequencer: Arc<Sequencer>) {
    loop {
        tokio::time::sleep(WATCHDOG_INTERVAL).await;
        let watched = sequencer.watched();
        if watched.is_empty() {
            continue;
        }
        let (sessions, cursors): (Vec<String>, Vec<i64>) = watched
            .into_iter()
            .map(|(s, c)| (s.as_str().to_string(), c))
            .unzip();
        let behind = async {
            let client = pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT s.id, c.cursor FROM unnest($1::text[], $2::bigint[]) AS c(id, cursor) \
                     JOIN sessions s ON s.id = c.id WHERE s.last_seq > c.cursor",
                )
                .await?;
            let rows = client.query(&stmt, &[&sessions, &cursors]).await?;
            rows.iter()
                .map(|r| Ok((r.try_get::<_, String>(0)?, r.try_get::<_, i64>(1)?)))
                .collect::<Result<Vec<_>, StoreError>>()
        };
        match behind.await {
            Ok(rows) => {
                for (session, after) in rows {
                    if let Ok(session) = SessionId::parse(&session) {
                        sequencer.behind(session, after);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "checking watched sessions"),
        }
    }
}

/// Reads back and publishes the events that notifications announced: every pending session
/// in one query.
async fn run_filler(
    pool: Pool,
    sequencer: Arc<Sequencer>,
    mut fills: mpsc::UnboundedReceiver<Fill>,
) {
    let mut pending: HashMap<SessionId, i64> = HashMap::new();
    loop {
        if pending.is_empty() {
            let Some(fill) = fills.recv().await else {
                return;
            };
            pending.insert(fill.session, fill.after);
        }
        while let Ok(fill) = fills.try_recv() {
            let after = pending.entry(fill.session).or_insert(fill.after);
            *after = (*after).min(fill.after);
        }
        // Start where the cursor is now (it may have moved since the request).
        let mut sessions = Vec::with_capacity(pending.len());
        let mut afters = Vec::with_capacity(pending.len());
        for (session, after) in &pending {
            let from = sequencer.cursor(session).map_or(*after, |c| c.max(*after));
            sessions.push(session.as_str().to_string());
            afters.push(from);
        }
        let read = async {
            let client = pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT e.session, e.seq, e.type, e.interaction_id, e.envelope \
                     FROM unnest($1::text[], $2::bigint[]) AS c(session, after) \
                     JOIN events e ON e.session = c.session AND e.seq > c.after \
                     ORDER BY e.session, e.seq LIMIT $3",
                )
                .await?;
            let rows = client
                .query(&stmt, &[&sessions, &afters, &FILL_BATCH])
                .await?;
            rows.iter().map(read_event).collect::<StoreResult<Vec<_>>>()
        };
        match read.await {
            Ok(events) => {
                let full = events.len() as i64 >= FILL_BATCH;
                let mut reached: HashMap<SessionId, i64> = HashMap::new();
                for e in &events {
                    reached.insert(e.session.clone(), e.seq);
                }
                sequencer.deliver(events, true);
                if full {
                    // More to read: continue from where each session got to.
                    for (session, seq) in reached {
                        pending.insert(session, seq);
                    }
                } else {
                    pending.clear();
                }
                sequencer.prune();
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading events announced by other nodes");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Keeps one connection listening to the notification channels; reconnects when it drops
/// and then re-reads every watched session from its cursor.
async fn run_listener(
    mut config: tokio_postgres::Config,
    sequencer: Arc<Sequencer>,
    cancels: mpsc::UnboundedSender<InteractionId>,
) {
    config.application_name("baton-listener");
    let mut first = true;
    loop {
        match listen_once(&config, &sequencer, &cancels, &mut first).await {
            Ok(()) => tracing::warn!("the database's notification connection ended; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %e, "the database's notification connection failed; reconnecting")
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn listen_once(
    config: &tokio_postgres::Config,
    sequencer: &Arc<Sequencer>,
    cancels: &mpsc::UnboundedSender<InteractionId>,
    first: &mut bool,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (messages_tx, mut messages) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = stream.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if messages_tx.send(n).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "notification connection");
                    break;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {EVENTS_CHANNEL}; LISTEN {CANCEL_CHANNEL}"))
        .await?;
    if !*first {
        // Whatever was notified while nobody listened is in the tables: read it back.
        sequencer.refill_all();
    }
    *first = false;
    while let Some(n) = messages.recv().await {
        match n.channel() {
            EVENTS_CHANNEL => {
                let mut parts = n.payload().split(' ');
                let (Some(session), Some(first), Some(last)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                let (Ok(session), Ok(first), Ok(last)) =
                    (SessionId::parse(session), first.parse(), last.parse())
                else {
                    continue;
                };
                sequencer.notified(session, first, last);
            }
            CANCEL_CHANNEL => {
                let _ = cancels.send(InteractionId::from_stored(n.payload().to_string()));
            }
            _ => {}
        }
    }
    driver.abort();
    Ok(())
}

/// An event of a transaction, its time, and whether to store it (events of a deleted
/// session are only published).
type PendingEvent = (Event, Millis, bool);

/// The write side of one transaction.
struct PgTx<'t, 'c, 's> {
    tx: &'t deadpool_postgres::Transaction<'c>,
    store: &'s PgStore,
    now: Millis,
    /// Events with their time and whether to store them, inserted in one statement at commit.
    events: Vec<PendingEvent>,
    /// Interactions cancelled (to tell the nodes running them).
    cancelled: Vec<InteractionId>,
    /// A session this transaction deleted: its events are published, not stored.
    deleted: Option<SessionId>,
}

impl<'t, 'c, 's> PgTx<'t, 'c, 's> {
    fn new(tx: &'t deadpool_postgres::Transaction<'c>, store: &'s PgStore) -> Self {
        Self {
            tx,
            store,
            now: Millis::now(),
            events: Vec::new(),
            cancelled: Vec::new(),
            deleted: None,
        }
    }

    fn into_parts(self) -> (Vec<PendingEvent>, Vec<InteractionId>, Option<SessionId>) {
        (self.events, self.cancelled, self.deleted)
    }

    /// Locks the session's row for this transaction.
    async fn session(&mut self, id: &SessionId) -> TxResult<Option<SessionRow>> {
        let stmt = self
            .tx
            .prepare_cached(
                "SELECT agent, context, epoch, last_seq FROM sessions WHERE id = $1 FOR UPDATE",
            )
            .await?;
        let Some(row) = self.tx.query_opt(&stmt, &[&id.as_str()]).await? else {
            return Ok(None);
        };
        let last_seq: i64 = row.try_get(3)?;
        Ok(Some(SessionRow {
            id: id.clone(),
            agent: row.try_get(0)?,
            context: Err(row.try_get(1)?),
            epoch: row.try_get(2)?,
            last_seq,
            saved_seq: last_seq,
        }))
    }

    /// Locks the session's row, creating the session (with `session.created`) if absent.
    async fn session_or_create(
        &mut self,
        id: &SessionId,
        agent: &str,
        context: &JsonObject,
    ) -> TxResult<(SessionRow, bool)> {
        if let Some(row) = self.session(id).await? {
            return Ok((row, false));
        }
        let retired = self
            .tx
            .query_opt(
                "DELETE FROM retired_sessions WHERE id = $1 RETURNING last_seq",
                &[&id.as_str()],
            )
            .await?;
        let last_seq: i64 = match retired {
            Some(row) => row.try_get(0)?,
            None => 0,
        };
        let stmt = self
            .tx
            .prepare_cached(
                "INSERT INTO sessions (id, agent, context, epoch, last_seq, created_at) \
                 VALUES ($1, $2, $3, 0, $4, $5) ON CONFLICT (id) DO NOTHING",
            )
            .await?;
        let inserted = self
            .tx
            .execute(
                &stmt,
                &[
                    &id.as_str(),
                    &agent,
                    &serde_json::to_string(context)?,
                    &last_seq,
                    &self.now.0,
                ],
            )
            .await?;
        if inserted == 0 {
            // Another transaction created it first (we waited for its commit).
            let row = self.session(id).await?.ok_or(StoreError::SessionNotFound)?;
            return Ok((row, false));
        }
        let mut row = SessionRow {
            id: id.clone(),
            agent: agent.to_string(),
            context: Ok(context.clone()),
            epoch: 0,
            last_seq,
            saved_seq: last_seq,
        };
        let session = Session {
            id: id.clone(),
            agent: agent.to_string(),
            context: context.clone(),
            epoch: 0,
            last_seq: last_seq + 1,
            created_at: self.now,
            running: None,
            queued: 0,
        };
        self.emit(
            &mut row,
            EventType::SessionCreated,
            None,
            &SessionData { session: &session },
            None,
        )?;
        Ok((row, true))
    }

    fn emit<D: serde::Serialize>(
        &mut self,
        row: &mut SessionRow,
        kind: EventType,
        interaction_id: Option<&InteractionId>,
        data: &D,
        interaction: Option<Arc<Interaction>>,
    ) -> TxResult<()> {
        row.last_seq += 1;
        let mut event = Event::new(
            &row.id,
            row.last_seq,
            kind,
            self.now,
            interaction_id.cloned(),
            data,
        )?;
        event.interaction = interaction;
        self.events.push((event, self.now, true));
        Ok(())
    }

    fn emit_interaction(
        &mut self,
        row: &mut SessionRow,
        kind: EventType,
        interaction: &Interaction,
    ) -> TxResult<()> {
        let shared = Arc::new(interaction.clone());
        self.emit(
            row,
            kind,
            Some(&interaction.id),
            &InteractionData { interaction },
            Some(shared),
        )
    }

    async fn save_seq(&mut self, row: &SessionRow) -> TxResult<()> {
        if row.last_seq != row.saved_seq {
            let stmt = self
                .tx
                .prepare_cached("UPDATE sessions SET last_seq = $2 WHERE id = $1")
                .await?;
            self.tx
                .execute(&stmt, &[&row.id.as_str(), &row.last_seq])
                .await?;
        }
        Ok(())
    }

    async fn write_outputs(
        &mut self,
        row: &mut SessionRow,
        id: &InteractionId,
        outputs: Vec<TaskOutput>,
    ) -> TxResult<String> {
        let text = delta_text(&outputs);
        for output in outputs {
            match output {
                TaskOutput::Delta(text) => {
                    let data = DeltaData {
                        interaction_id: id,
                        text: &text,
                    };
                    self.emit(row, EventType::TaskDelta, Some(id), &data, None)?;
                }
                TaskOutput::Progress(data) => {
                    let data = ProgressData {
                        interaction_id: id,
                        data: &data,
                    };
                    self.emit(row, EventType::TaskProgress, Some(id), &data, None)?;
                }
                TaskOutput::ContextPatch(patch) => {
                    let context = patched(row.context()?, patch)?;
                    self.set_context(row, &context).await?;
                }
            }
        }
        Ok(text)
    }

    async fn set_context(&mut self, row: &mut SessionRow, context: &JsonObject) -> TxResult<()> {
        let stmt = self
            .tx
            .prepare_cached("UPDATE sessions SET context = $2 WHERE id = $1")
            .await?;
        self.tx
            .execute(&stmt, &[&row.id.as_str(), &serde_json::to_string(context)?])
            .await?;
        row.context = Ok(context.clone());
        self.emit(
            row,
            EventType::ContextUpdated,
            None,
            &ContextData { context },
            None,
        )
    }

    async fn interaction(&mut self, id: &InteractionId) -> TxResult<Option<Interaction>> {
        Ok(select_interaction(self.tx, id).await?)
    }

    /// The session of `id` if it is running; otherwise the write is fenced.
    async fn running_session_of(&mut self, id: &InteractionId) -> TxResult<SessionId> {
        let stmt = self
            .tx
            .prepare_cached("SELECT session, status FROM interactions WHERE id = $1")
            .await?;
        let found = self.tx.query_opt(&stmt, &[&id.as_str()]).await?;
        match found {
            Some(row) if row.try_get::<_, &str>(1)? == Status::Running.as_str() => {
                Ok(SessionId::parse(row.try_get::<_, &str>(0)?)
                    .map_err(|e| StoreError::Internal(e.to_string()))?)
            }
            _ => Err(StoreError::Fenced.into()),
        }
    }

    async fn running(&mut self, session: &SessionId) -> TxResult<Option<Interaction>> {
        let stmt = self
            .tx
            .prepare_cached(concat!(
                "SELECT ",
                interaction_columns!(),
                " FROM interactions WHERE session = $1 AND status = 'running'"
            ))
            .await?;
        match self.tx.query_opt(&stmt, &[&session.as_str()]).await? {
            Some(row) => Ok(Some(read_interaction(&row, 0)?)),
            None => Ok(None),
        }
    }

    /// The running interaction's id and the queued ones' ids (FIFO), in one query.
    async fn work_of(
        &mut self,
        session: &SessionId,
    ) -> TxResult<(Option<InteractionId>, Vec<InteractionId>)> {
        let stmt = self
            .tx
            .prepare_cached(
                "SELECT id, status FROM interactions \
                 WHERE session = $1 AND status IN ('running', 'queued') ORDER BY id",
            )
            .await?;
        let mut running = None;
        let mut queued = Vec::new();
        for row in self.tx.query(&stmt, &[&session.as_str()]).await? {
            let id = InteractionId::from_stored(row.try_get(0)?);
            if row.try_get::<_, &str>(1)? == "running" {
                running = Some(id);
            } else {
                queued.push(id);
            }
        }
        Ok((running, queued))
    }

    async fn queued(&mut self, session: &SessionId) -> TxResult<Vec<Interaction>> {
        let stmt = self
            .tx
            .prepare_cached(concat!(
                "SELECT ",
                interaction_columns!(),
                " FROM interactions WHERE session = $1 AND status = 'queued' ORDER BY id"
            ))
            .await?;
        let rows = self.tx.query(&stmt, &[&session.as_str()]).await?;
        Ok(rows
            .iter()
            .map(|r| read_interaction(r, 0))
            .collect::<StoreResult<Vec<_>>>()?)
    }

    /// A fresh id greater than the session's newest, and a time not before its creation.
    async fn next_id_after_last(
        &mut self,
        session: &SessionId,
    ) -> TxResult<(InteractionId, Millis)> {
        let stmt = self
            .tx
            .prepare_cached(
                "SELECT id, created_at FROM interactions WHERE session = $1 \
                 ORDER BY id DESC LIMIT 1",
            )
            .await?;
        let last = self.tx.query_opt(&stmt, &[&session.as_str()]).await?;
        let mut ids = self
            .store
            .ids
            .lock()
            .map_err(|_| StoreError::Internal("id generator poisoned".into()))?;
        match last {
            Some(row) => {
                let last_id = InteractionId::from_stored(row.try_get(0)?);
                let last_at = Millis(row.try_get(1)?);
                self.now = self.now.max(last_at);
                Ok((ids.next_after(&last_id), self.now))
            }
            None => Ok((ids.next_id(), self.now)),
        }
    }

    async fn by_idempotency_key(
        &mut self,
        row: &SessionRow,
        key: &str,
        msg: &NewMessage,
    ) -> TxResult<Option<Interaction>> {
        let stmt = self
            .tx
            .prepare_cached(concat!(
                "SELECT ",
                interaction_columns!(),
                " FROM interactions WHERE session = $1 AND idempotency_key = $2"
            ))
            .await?;
        let Some(found) = self.tx.query_opt(&stmt, &[&row.id.as_str(), &key]).await? else {
            return Ok(None);
        };
        let earlier = read_interaction(&found, 0)?;
        if earlier.created_at.0 < self.now.0 - IDEMPOTENCY_TTL_MS {
            let stmt = self
                .tx
                .prepare_cached("UPDATE interactions SET idempotency_key = NULL WHERE id = $1")
                .await?;
            self.tx.execute(&stmt, &[&earlier.id.as_str()]).await?;
            return Ok(None);
        }
        if earlier.content != msg.content || earlier.metadata != msg.metadata {
            return Err(StoreError::IdempotencyMismatch.into());
        }
        Ok(Some(earlier))
    }

    async fn make_final(
        &mut self,
        row: &mut SessionRow,
        interaction: &mut Interaction,
        status: Status,
        error: Option<ErrorInfo>,
        reason: Option<CancelReason>,
    ) -> TxResult<()> {
        let kind = EventType::final_for(status)
            .ok_or_else(|| StoreError::Internal(format!("{status} is not final")))?;
        interaction.status = status;
        interaction.error = error;
        interaction.cancel_reason = reason;
        interaction.finished_at = Some(self.now);
        let stmt = self
            .tx
            .prepare_cached(
                "UPDATE interactions SET status = $2, response = $3, error_code = $4, \
                 error_message = $5, cancel_reason = $6, finished_at = $7 WHERE id = $1",
            )
            .await?;
        self.tx
            .execute(
                &stmt,
                &[
                    &interaction.id.as_str(),
                    &status.as_str(),
                    &interaction.response,
                    &interaction.error.as_ref().map(|e| e.code.as_str()),
                    &interaction.error.as_ref().map(|e| e.message.as_str()),
                    &reason.map(CancelReason::as_str),
                    &self.now.0,
                ],
            )
            .await?;
        self.emit_interaction(row, kind, interaction)
    }

    async fn start_next(&mut self, row: &mut SessionRow) -> TxResult<Option<StartedTask>> {
        let stmt = self
            .tx
            .prepare_cached(concat!(
                "SELECT ",
                interaction_columns!(),
                " FROM interactions WHERE session = $1 AND status = 'queued' ORDER BY id LIMIT 1"
            ))
            .await?;
        let Some(found) = self.tx.query_opt(&stmt, &[&row.id.as_str()]).await? else {
            return Ok(None);
        };
        let mut next = read_interaction(&found, 0)?;
        next.status = Status::Running;
        next.started_at = Some(self.now);
        let stmt = self
            .tx
            .prepare_cached(
                "UPDATE interactions SET status = 'running', started_at = $2, node = $3 \
                 WHERE id = $1",
            )
            .await?;
        let me = self.store.node();
        self.tx
            .execute(&stmt, &[&next.id.as_str(), &self.now.0, &&*me])
            .await?;
        self.emit_interaction(row, EventType::TaskStarted, &next)?;
        Ok(Some(StartedTask {
            interaction: next,
            agent: row.agent.clone(),
        }))
    }

    async fn cancel_all(
        &mut self,
        row: &mut SessionRow,
        reason: CancelReason,
    ) -> TxResult<Vec<InteractionId>> {
        let mut victims: Vec<Interaction> = self.running(&row.id).await?.into_iter().collect();
        victims.extend(self.queued(&row.id).await?);
        let mut cancelled = Vec::with_capacity(victims.len());
        for mut victim in victims {
            self.make_final(row, &mut victim, Status::Cancelled, None, Some(reason))
                .await?;
            self.cancelled.push(victim.id.clone());
            cancelled.push(victim.id);
        }
        Ok(cancelled)
    }
}

async fn require_session(client: &impl GenericClient, id: &SessionId) -> StoreResult<()> {
    let stmt = client
        .prepare_cached("SELECT 1 FROM sessions WHERE id = $1")
        .await?;
    match client.query_opt(&stmt, &[&id.as_str()]).await? {
        Some(_) => Ok(()),
        None => Err(StoreError::SessionNotFound),
    }
}

async fn select_session(
    client: &impl GenericClient,
    id: &SessionId,
) -> StoreResult<Option<Session>> {
    let stmt = client
        .prepare_cached(&format!("{SESSION_SELECT} WHERE s.id = $1"))
        .await?;
    match client.query_opt(&stmt, &[&id.as_str()]).await? {
        Some(row) => Ok(Some(read_session(&row)?)),
        None => Ok(None),
    }
}

async fn select_interaction(
    client: &impl GenericClient,
    id: &InteractionId,
) -> StoreResult<Option<Interaction>> {
    let stmt = client
        .prepare_cached(concat!(
            "SELECT ",
            interaction_columns!(),
            " FROM interactions WHERE id = $1"
        ))
        .await?;
    match client.query_opt(&stmt, &[&id.as_str()]).await? {
        Some(row) => Ok(Some(read_interaction(&row, 0)?)),
        None => Ok(None),
    }
}

fn stored<T>(what: &str, r: Result<T, impl std::fmt::Display>) -> StoreResult<T> {
    r.map_err(|e| StoreError::Internal(format!("stored {what}: {e}")))
}

fn read_event(r: &Row) -> StoreResult<Event> {
    let session: &str = r.try_get(0)?;
    let kind: &str = r.try_get(2)?;
    let envelope: &str = r.try_get(4)?;
    Ok(Event {
        session: stored("session id", SessionId::parse(session))?,
        seq: r.try_get(1)?,
        kind: stored("event type", kind.parse::<EventType>())?,
        interaction_id: r
            .try_get::<_, Option<String>>(3)?
            .map(InteractionId::from_stored),
        envelope: Arc::from(envelope),
        interaction: None,
    })
}

fn read_session(r: &Row) -> StoreResult<Session> {
    let id: &str = r.try_get(0)?;
    let context: &str = r.try_get(2)?;
    let running_id: Option<&str> = r.try_get(7)?;
    Ok(Session {
        id: stored("session id", SessionId::parse(id))?,
        agent: r.try_get(1)?,
        context: serde_json::from_str(context)?,
        epoch: r.try_get(3)?,
        last_seq: r.try_get(4)?,
        created_at: Millis(r.try_get(5)?),
        queued: r.try_get(6)?,
        running: match running_id {
            Some(_) => Some(read_interaction(r, 7)?),
            None => None,
        },
    })
}

fn read_interaction(r: &Row, at: usize) -> StoreResult<Interaction> {
    let session: &str = r.try_get(at + 1)?;
    let metadata: &str = r.try_get(at + 3)?;
    let status: &str = r.try_get(at + 4)?;
    let error_code: Option<String> = r.try_get(at + 6)?;
    let reason: Option<&str> = r.try_get(at + 8)?;
    Ok(Interaction {
        id: InteractionId::from_stored(r.try_get(at)?),
        session: stored("session id", SessionId::parse(session))?,
        content: r.try_get(at + 2)?,
        metadata: serde_json::from_str(metadata)?,
        status: stored("status", status.parse::<Status>())?,
        response: r.try_get(at + 5)?,
        error: match error_code {
            Some(code) => Some(ErrorInfo {
                code,
                message: r.try_get::<_, Option<String>>(at + 7)?.unwrap_or_default(),
            }),
            None => None,
        },
        cancel_reason: match reason {
            Some(reason) => Some(stored("cancel reason", reason.parse::<CancelReason>())?),
            None => None,
        },
        created_at: Millis(r.try_get(at + 9)?),
        started_at: r.try_get::<_, Option<i64>>(at + 10)?.map(Millis),
        finished_at: r.try_get::<_, Option<i64>>(at + 11)?.map(Millis),
    })
}
