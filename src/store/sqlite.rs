//! The SQLite backend. Writes are serialised anyway in SQLite, so that is made explicit: one
//! writer thread owns the write connection and group-commits whatever jobs are waiting (each
//! job in its own savepoint, so one refused job never undoes another), then publishes the
//! committed events and answers the callers. Reads run in parallel on a small pool of
//! read-only connections (WAL lets them see every committed write, never a partial one).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use serde::Serialize;
use std::sync::mpsc::{self, RecvTimeoutError};

use tokio::sync::{Semaphore, oneshot};

use super::shared::{
    ClearedData, ContextData, DeltaData, Empty, InteractionData, ProgressData, SessionData,
    SessionRow, delta_text, page, patched,
};
use super::{
    Accepted, CancelTarget, Cancelled, Cleared, IDEMPOTENCY_TTL_MS, NewMessage, Page,
    SqliteOptions, StartedTask, StoreError, StoreResult, StoreStats, TaskEnd, TaskOutput,
};
use crate::bus::Bus;
use crate::config::Synchronous;
use crate::model::{
    CancelReason, ErrorInfo, Event, EventType, IdGenerator, Interaction, InteractionId, JsonObject,
    Millis, Policy, Session, SessionId, Status,
};

/// Most jobs committed together in one transaction.
const MAX_BATCH: usize = 512;
/// Pause between two checkpoints off the writer thread: short, so the WAL's backlog stays
/// small whenever the writer has to finish a checkpoint itself.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(50);
/// Past this size the WAL is not restarting (under constant load a checkpoint running beside
/// the writer never catches up): the writer then finishes the checkpoint itself, between two
/// batches, so the WAL restarts. The heavy copying was already done off the writer.
const WAL_RESTART_BYTES: u64 = 32 * 1024 * 1024;
/// A restarted WAL file larger than this is truncated to it.
const WAL_KEEP_BYTES: u64 = 16 * 1024 * 1024;

/// Schema versions, applied in order at start-up (`PRAGMA user_version` counts them).
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE sessions (
    id          TEXT PRIMARY KEY,
    agent       TEXT NOT NULL,
    context     TEXT NOT NULL DEFAULT '{}',
    epoch       INTEGER NOT NULL DEFAULT 0,
    last_seq    INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);
CREATE TABLE interactions (
    id              TEXT PRIMARY KEY,
    session         TEXT NOT NULL,
    epoch           INTEGER NOT NULL,
    content         TEXT NOT NULL,
    metadata        TEXT NOT NULL,
    status          TEXT NOT NULL
                    CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled')),
    response        TEXT NOT NULL DEFAULT '',
    error_code      TEXT,
    error_message   TEXT,
    cancel_reason   TEXT,
    idempotency_key TEXT,
    created_at      INTEGER NOT NULL,
    started_at      INTEGER,
    finished_at     INTEGER
);
-- I1 in the schema: at most one running interaction per session.
CREATE UNIQUE INDEX interactions_one_running ON interactions (session) WHERE status = 'running';
CREATE INDEX interactions_by_session ON interactions (session, id);
CREATE INDEX interactions_queued ON interactions (session, id) WHERE status = 'queued';
CREATE UNIQUE INDEX interactions_idempotency
    ON interactions (session, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- Rows in commit order (appends touch only the last pages, whatever the sessions); the
-- small (session, seq) index serves replays.
CREATE TABLE events (
    id             INTEGER PRIMARY KEY,
    session        TEXT NOT NULL,
    seq            INTEGER NOT NULL,
    type           TEXT NOT NULL,
    interaction_id TEXT,
    envelope       TEXT NOT NULL
);
CREATE UNIQUE INDEX events_by_session ON events (session, seq);
-- A deleted session's last seq, so a re-created one never reuses a seq.
CREATE TABLE retired_sessions (
    id       TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL
);
"#,
    r#"
-- When each event was appended (ms since the epoch), for retention; earlier rows take it from
-- their envelope's RFC 3339 `at`.
ALTER TABLE events ADD COLUMN at INTEGER NOT NULL DEFAULT 0;
UPDATE events SET at =
    CAST(round((julianday(json_extract(envelope, '$.at')) - 2440587.5) * 86400000.0) AS INTEGER);
"#,
];

/// The columns [`read_interaction`] reads, as a literal for `concat!`.
macro_rules! interaction_columns {
    () => {
        "id, session, content, metadata, status, response, error_code, error_message, \
         cancel_reason, created_at, started_at, finished_at"
    };
}
const INTERACTION_COLUMNS: &str = interaction_columns!();

/// One session with its running interaction and queue length, in a single statement.
static SESSION_SELECT: LazyLock<String> = LazyLock::new(|| {
    let running_columns = INTERACTION_COLUMNS
        .split(", ")
        .map(|c| format!("r.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT s.id, s.agent, s.context, s.epoch, s.last_seq, s.created_at, \
         (SELECT count(*) FROM interactions q WHERE q.session = s.id AND q.status = 'queued'), \
         {running_columns} \
         FROM sessions s LEFT JOIN interactions r ON r.session = s.id AND r.status = 'running'"
    )
});

static SESSION_LIST: LazyLock<String> =
    LazyLock::new(|| format!("{} WHERE s.id > ?1 ORDER BY s.id LIMIT ?2", *SESSION_SELECT));
static SESSION_ONE: LazyLock<String> =
    LazyLock::new(|| format!("{} WHERE s.id = ?1", *SESSION_SELECT));

pub(super) struct SqliteStore {
    // Unbounded, yet bounded in practice: every job has a caller awaiting its answer.
    jobs: mpsc::Sender<Job>,
    readers: Arc<ReadPool>,
    bus: Arc<Bus>,
    stats: Arc<StoreStats>,
    /// Dropping it stops the checkpointer thread.
    _checkpointer: mpsc::Sender<()>,
    /// Retention: every event up to this id has been looked at for delta compaction (rows are
    /// appended in commit order, so a walk by id is a walk in time). Starts over after a
    /// restart, which only re-reads what is left.
    delta_cursor: AtomicI64,
}

/// Called after the batch's commit (or its failure) with the commit error, if any.
type Delivery = Box<dyn FnOnce(Option<StoreError>) + Send>;
/// A unit of write work; returns whether it succeeded (else its savepoint is rolled back).
type Job = Box<dyn FnOnce(&mut Tx<'_>) -> (bool, Delivery) + Send>;

impl SqliteStore {
    pub(super) fn open(path: &Path, options: SqliteOptions, bus: Arc<Bus>) -> StoreResult<Self> {
        let mut conn = Connection::open(path)?;
        configure(&conn, options.synchronous)?;
        incremental_vacuum_mode(&conn)?;
        migrate(&mut conn)?;
        let readers = ReadPool::open(path, options.readers.max(1))?;
        let stats = Arc::new(StoreStats::default());
        let checkpoint_requested = Arc::new(AtomicBool::new(false));
        let checkpointer = start_checkpointer(path, checkpoint_requested.clone())?;
        let (jobs, rx) = mpsc::channel();
        let writer = Writer {
            conn,
            bus: bus.clone(),
            stats: stats.clone(),
            checkpoint_requested,
        };
        std::thread::Builder::new()
            .name("baton-sqlite-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Internal(format!("spawning the writer: {e}")))?;
        Ok(Self {
            jobs,
            readers: Arc::new(readers),
            bus,
            stats,
            _checkpointer: checkpointer,
            delta_cursor: AtomicI64::new(0),
        })
    }

    /// Runs `f` as one job of the writer: in its own savepoint, committed with its batch.
    async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> StoreResult<R> + Send + 'static,
    ) -> StoreResult<R> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |tx| {
            let result = f(tx);
            let ok = result.is_ok();
            let delivery: Delivery = Box::new(move |commit_error| {
                let _ = reply.send(match commit_error {
                    Some(e) => Err(e),
                    None => result,
                });
            });
            (ok, delivery)
        });
        self.jobs
            .send(job)
            .map_err(|_| StoreError::Unavailable("the writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Internal("the write was abandoned by the writer".into()))?
    }

    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> StoreResult<R> + Send + 'static,
    ) -> StoreResult<R> {
        self.readers.clone().read(f).await
    }

    pub(super) async fn put_session(
        &self,
        id: SessionId,
        agent: Option<String>,
        context: Option<JsonObject>,
        default_agent: String,
    ) -> StoreResult<(Session, bool)> {
        self.write(move |tx| {
            let (mut row, created) = match tx.session(&id)? {
                Some(row) => (row, false),
                None => {
                    let agent = agent.clone().unwrap_or(default_agent);
                    let context = context.clone().unwrap_or_default();
                    (tx.create_session(&id, &agent, &context)?, true)
                }
            };
            if !created {
                if let Some(agent) = agent {
                    tx.conn
                        .prepare_cached("UPDATE sessions SET agent = ?2 WHERE id = ?1")?
                        .execute(params![id.as_str(), agent])?;
                }
                if let Some(context) = context {
                    tx.set_context(&mut row, &context)?;
                }
            }
            tx.save_seq(&row)?;
            let session = select_session(tx.conn, &id)?.ok_or(StoreError::SessionNotFound)?;
            Ok((session, created))
        })
        .await
    }

    pub(super) async fn get_session(&self, id: SessionId) -> StoreResult<Session> {
        self.read(move |conn| select_session(conn, &id)?.ok_or(StoreError::SessionNotFound))
            .await
    }

    pub(super) async fn list_sessions(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> StoreResult<Page<Session>> {
        self.read(move |conn| {
            let sql = SESSION_LIST.as_str();
            let mut stmt = conn.prepare_cached(sql)?;
            let rows = stmt.query_map(
                params![after.unwrap_or_default(), i64::from(limit) + 1],
                read_session,
            )?;
            let items = rows.collect::<Result<Vec<_>, _>>()?;
            Ok(page(items, limit as usize, |s| s.id.to_string()))
        })
        .await
    }

    pub(super) async fn delete_session(&self, id: SessionId) -> StoreResult<Vec<InteractionId>> {
        self.write(move |tx| {
            let mut row = tx.session(&id)?.ok_or(StoreError::SessionNotFound)?;
            let cancelled = tx.cancel_all(&mut row, CancelReason::Delete)?;
            tx.emit(&mut row, EventType::SessionDeleted, None, &Empty {}, None)?;
            let sid = id.as_str();
            tx.conn
                .prepare_cached("DELETE FROM events WHERE session = ?1")?
                .execute([sid])?;
            tx.conn
                .prepare_cached("DELETE FROM interactions WHERE session = ?1")?
                .execute([sid])?;
            tx.conn
                .prepare_cached("DELETE FROM sessions WHERE id = ?1")?
                .execute([sid])?;
            tx.conn
                .prepare_cached(
                    "INSERT OR REPLACE INTO retired_sessions (id, last_seq) VALUES (?1, ?2)",
                )?
                .execute(params![sid, row.last_seq])?;
            Ok(cancelled)
        })
        .await
    }

    pub(super) async fn accept_message(&self, msg: NewMessage) -> StoreResult<Accepted> {
        let bus = self.bus.clone();
        self.write(move |tx| {
            // Registered on the writer, before this batch is published: no later final event
            // of this interaction can be missed.
            let watch = |i: &Interaction| {
                (msg.watch_final && !i.status.is_final())
                    .then(|| bus.watch_final(&i.session, &i.id))
            };
            let mut row = match tx.session(&msg.session)? {
                Some(row) => row,
                None => tx.create_session(&msg.session, &msg.default_agent, &JsonObject::new())?,
            };
            if let Some(key) = &msg.idempotency_key
                && let Some(earlier) = tx.by_idempotency_key(&row, key, &msg)?
            {
                tx.save_seq(&row)?;
                return Ok(Accepted {
                    final_watch: watch(&earlier),
                    interaction: earlier,
                    replayed: true,
                    started: None,
                    cancelled: Vec::new(),
                });
            }
            let running = tx.running_id(&row.id)?;
            let queued = tx.queued_ids(&row.id)?;
            let busy = running.is_some() || !queued.is_empty();
            let mut cancelled = Vec::new();
            if busy {
                match msg.policy {
                    Policy::Reject => {
                        let id = running.or_else(|| queued.into_iter().next());
                        return Err(StoreError::Busy {
                            running: id.ok_or(StoreError::Internal("busy without work".into()))?,
                        });
                    }
                    Policy::Enqueue if queued.len() >= msg.queue_limit as usize => {
                        return Err(StoreError::QueueFull {
                            limit: msg.queue_limit,
                        });
                    }
                    Policy::Enqueue => {}
                    Policy::Interrupt => {
                        cancelled = tx.cancel_all(&mut row, CancelReason::Interrupt)?;
                    }
                }
            }
            let start_now = !busy || msg.policy == Policy::Interrupt;
            let interaction = Interaction {
                id: tx.ids.next_id(),
                session: row.id.clone(),
                content: msg.content,
                metadata: msg.metadata,
                status: if start_now {
                    Status::Running
                } else {
                    Status::Queued
                },
                response: String::new(),
                error: None,
                cancel_reason: None,
                created_at: tx.now,
                started_at: start_now.then_some(tx.now),
                finished_at: None,
            };
            tx.conn
                .prepare_cached(
                    "INSERT INTO interactions (id, session, epoch, content, metadata, status, \
                     idempotency_key, created_at, started_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(params![
                    interaction.id.as_str(),
                    row.id.as_str(),
                    row.epoch,
                    interaction.content,
                    serde_json::to_string(&interaction.metadata)?,
                    interaction.status.as_str(),
                    msg.idempotency_key,
                    interaction.created_at.0,
                    interaction.started_at.map(|m| m.0),
                ])?;
            let kind = if start_now {
                EventType::TaskStarted
            } else {
                EventType::InteractionQueued
            };
            tx.emit_interaction(&mut row, kind, &interaction)?;
            tx.save_seq(&row)?;
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
        .await
    }

    pub(super) async fn append_outputs(
        &self,
        id: InteractionId,
        outputs: Vec<TaskOutput>,
    ) -> StoreResult<()> {
        self.write(move |tx| {
            let session = tx.running_session_of(&id)?;
            let mut row = tx.session(&session)?.ok_or(StoreError::Fenced)?;
            let text = tx.write_outputs(&mut row, &id, outputs)?;
            if !text.is_empty() {
                tx.conn
                    .prepare_cached(
                        "UPDATE interactions SET response = response || ?2 WHERE id = ?1",
                    )?
                    .execute(params![id.as_str(), text])?;
            }
            tx.save_seq(&row)
        })
        .await
    }

    pub(super) async fn finish(
        &self,
        id: InteractionId,
        outputs: Vec<TaskOutput>,
        end: TaskEnd,
        start_next: bool,
    ) -> StoreResult<Option<StartedTask>> {
        self.write(move |tx| {
            let mut interaction = tx
                .interaction(&id)?
                .filter(|i| i.status == Status::Running)
                .ok_or(StoreError::Fenced)?;
            let mut row = tx
                .session(&interaction.session)?
                .ok_or(StoreError::Fenced)?;
            // make_final stores the response, deltas included: no separate append.
            let text = tx.write_outputs(&mut row, &id, outputs)?;
            interaction.response.push_str(&text);
            let (status, error) = match end {
                TaskEnd::Completed { response } => {
                    if let Some(response) = response {
                        interaction.response = response;
                    }
                    (Status::Completed, None)
                }
                TaskEnd::Failed(error) => (Status::Failed, Some(error)),
            };
            tx.make_final(&mut row, &mut interaction, status, error, None)?;
            let next = if start_next {
                tx.start_next(&mut row)?
            } else {
                None
            };
            tx.save_seq(&row)?;
            Ok(next)
        })
        .await
    }

    pub(super) async fn cancel(
        &self,
        session: SessionId,
        target: CancelTarget,
        reason: CancelReason,
        start_next: bool,
    ) -> StoreResult<Cancelled> {
        self.write(move |tx| {
            let mut row = tx.session(&session)?.ok_or(StoreError::SessionNotFound)?;
            let target = match target {
                CancelTarget::Running => tx.running(&session)?,
                CancelTarget::Named(id) => {
                    let found = tx.interaction(&id)?.filter(|i| i.session == session);
                    Some(found.ok_or(StoreError::InteractionNotFound)?)
                }
            };
            let Some(mut target) = target.filter(|i| !i.status.is_final()) else {
                return Ok(Cancelled::default());
            };
            let was_running = target.status == Status::Running;
            tx.make_final(&mut row, &mut target, Status::Cancelled, None, Some(reason))?;
            let started = if was_running && start_next {
                tx.start_next(&mut row)?
            } else {
                None
            };
            tx.save_seq(&row)?;
            Ok(Cancelled {
                cancelled: vec![target.id],
                started,
            })
        })
        .await
    }

    pub(super) async fn clear(
        &self,
        session: SessionId,
        default_agent: String,
    ) -> StoreResult<Cleared> {
        self.write(move |tx| {
            let mut row = match tx.session(&session)? {
                Some(row) => row,
                None => tx.create_session(&session, &default_agent, &JsonObject::new())?,
            };
            let cancelled = tx.cancel_all(&mut row, CancelReason::Clear)?;
            tx.conn
                .prepare_cached("DELETE FROM interactions WHERE session = ?1")?
                .execute([session.as_str()])?;
            row.epoch += 1;
            row.context = Ok(JsonObject::new());
            tx.conn
                .prepare_cached("UPDATE sessions SET context = '{}', epoch = ?2 WHERE id = ?1")?
                .execute(params![session.as_str(), row.epoch])?;
            let epoch = row.epoch;
            tx.emit(
                &mut row,
                EventType::SessionCleared,
                None,
                &ClearedData { epoch },
                None,
            )?;
            tx.save_seq(&row)?;
            Ok(Cleared { epoch, cancelled })
        })
        .await
    }

    pub(super) async fn get_context(&self, session: SessionId) -> StoreResult<JsonObject> {
        self.read(move |conn| {
            let text: Option<String> = conn
                .prepare_cached("SELECT context FROM sessions WHERE id = ?1")?
                .query_row([session.as_str()], |r| r.get(0))
                .optional()?;
            Ok(serde_json::from_str(
                &text.ok_or(StoreError::SessionNotFound)?,
            )?)
        })
        .await
    }

    pub(super) async fn update_context(
        &self,
        session: SessionId,
        value: JsonObject,
        patch: bool,
        default_agent: String,
    ) -> StoreResult<JsonObject> {
        self.write(move |tx| {
            let mut row = match tx.session(&session)? {
                Some(row) => row,
                None => tx.create_session(&session, &default_agent, &JsonObject::new())?,
            };
            let context = if patch {
                patched(row.context()?, value)?
            } else {
                value
            };
            tx.set_context(&mut row, &context)?;
            tx.save_seq(&row)?;
            Ok(context)
        })
        .await
    }

    pub(super) async fn list_interactions(
        &self,
        session: SessionId,
        before: Option<String>,
        limit: u32,
    ) -> StoreResult<Page<Interaction>> {
        self.read(move |conn| {
            require_session(conn, &session)?;
            let sql = concat!(
                "SELECT ",
                interaction_columns!(),
                " FROM interactions \
                 WHERE session = ?1 AND (?2 IS NULL OR id < ?2) ORDER BY id DESC LIMIT ?3"
            );
            let mut stmt = conn.prepare_cached(sql)?;
            let rows = stmt.query_map(
                params![session.as_str(), before, i64::from(limit) + 1],
                |r| read_interaction(r, 0),
            )?;
            let items = rows.collect::<Result<Vec<_>, _>>()?;
            Ok(page(items, limit as usize, |i| i.id.to_string()))
        })
        .await
    }

    pub(super) async fn get_interaction(
        &self,
        session: SessionId,
        id: InteractionId,
    ) -> StoreResult<Interaction> {
        self.read(move |conn| {
            let found = select_interaction(conn, &id)?.filter(|i| i.session == session);
            match found {
                Some(i) => Ok(i),
                None => {
                    require_session(conn, &session)?;
                    Err(StoreError::InteractionNotFound)
                }
            }
        })
        .await
    }

    pub(super) async fn task_inputs(
        &self,
        session: SessionId,
        limit: u32,
    ) -> StoreResult<(Session, Vec<Interaction>)> {
        self.read(move |conn| {
            let found = select_session(conn, &session)?.ok_or(StoreError::SessionNotFound)?;
            let sql = concat!(
                "SELECT ",
                interaction_columns!(),
                " FROM interactions \
                 WHERE session = ?1 AND status = 'completed' ORDER BY id DESC LIMIT ?2"
            );
            let mut stmt = conn.prepare_cached(sql)?;
            let rows = stmt.query_map(params![session.as_str(), i64::from(limit)], |r| {
                read_interaction(r, 0)
            })?;
            let mut items = rows.collect::<Result<Vec<_>, _>>()?;
            items.reverse();
            Ok((found, items))
        })
        .await
    }

    pub(super) async fn events_after(
        &self,
        session: SessionId,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<Event>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, type, interaction_id, envelope FROM events \
                 WHERE session = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![session.as_str(), after, i64::from(limit)], |r| {
                let kind: String = r.get(1)?;
                let envelope: String = r.get(3)?;
                Ok(Event {
                    session: session.clone(),
                    seq: r.get(0)?,
                    kind: kind.parse().map_err(|e| conversion_error(1, e))?,
                    interaction_id: r
                        .get::<_, Option<String>>(2)?
                        .map(InteractionId::from_stored),
                    envelope: Arc::from(envelope),
                    interaction: None,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    pub(super) async fn recover(&self) -> StoreResult<Vec<StartedTask>> {
        self.write(|tx| {
            let sql = concat!("SELECT ", interaction_columns!(), " FROM interactions WHERE status = 'running' ORDER BY id");
            let running = tx
                .conn
                .prepare_cached(sql)?
                .query_map([], |r| read_interaction(r, 0))?
                .collect::<Result<Vec<_>, _>>()?;
            for mut interaction in running {
                let Some(mut row) = tx.session(&interaction.session)? else {
                    continue;
                };
                let error = ErrorInfo {
                    code: "interrupted".into(),
                    message: "the server stopped while this interaction was running".into(),
                };
                tx.make_final(&mut row, &mut interaction, Status::Failed, Some(error), None)?;
                tx.save_seq(&row)?;
            }
            let waiting: Vec<String> = tx
                .conn
                .prepare_cached(
                    "SELECT DISTINCT session FROM interactions WHERE status = 'queued' ORDER BY session",
                )?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut started = Vec::new();
            for session in waiting {
                let id = SessionId::parse(&session)
                    .map_err(|e| StoreError::Internal(format!("stored session id: {e}")))?;
                let Some(mut row) = tx.session(&id)? else {
                    continue;
                };
                started.extend(tx.start_next(&mut row)?);
                tx.save_seq(&row)?;
            }
            Ok(started)
        })
        .await
    }

    /// Retention, in jobs of at most `batch` rows each (short writer turns, so live traffic
    /// goes on between them): the `task.delta` events of interactions that are final (or
    /// gone, removed by a clear or a delete) and older than `deltas_before`, then every event
    /// older than `events_before`; then the freed pages go back to the file system. A delta
    /// of an interaction still active when the walk passed it is left for `events_before`.
    /// Returns the events deleted.
    pub(super) async fn compact(
        &self,
        deltas_before: Millis,
        events_before: Millis,
        batch: i64,
    ) -> StoreResult<u64> {
        let mut total = 0;
        loop {
            let from = self.delta_cursor.load(Ordering::Relaxed);
            let walk = self
                .write(move |tx| compact_deltas(tx.conn, from, deltas_before, batch))
                .await?;
            self.delta_cursor.fetch_max(walk.reached, Ordering::Relaxed);
            total += walk.deleted;
            if walk.done {
                break;
            }
            tokio::task::yield_now().await;
        }
        loop {
            let deleted = self
                .write(move |tx| {
                    Ok(tx
                        .conn
                        .prepare_cached(
                            "DELETE FROM events WHERE id IN \
                             (SELECT id FROM events ORDER BY id LIMIT ?2) AND at < ?1",
                        )?
                        .execute(params![events_before.0, batch])? as u64)
                })
                .await?;
            total += deleted;
            if deleted < batch.max(1) as u64 {
                break;
            }
            tokio::task::yield_now().await;
        }
        // Free pages (from this, from deleted sessions, from clears) go back in steps.
        let mut before = i64::MAX;
        loop {
            let left = self
                .write(move |tx| {
                    tx.conn
                        .execute_batch(&format!("PRAGMA incremental_vacuum({batch})"))?;
                    Ok(tx
                        .conn
                        .query_row("PRAGMA freelist_count", [], |r| r.get::<_, i64>(0))?)
                })
                .await?;
            if left == 0 || left >= before {
                break;
            }
            before = left;
            tokio::task::yield_now().await;
        }
        Ok(total)
    }

    pub(super) fn stats(&self) -> &StoreStats {
        &self.stats
    }

    pub(super) async fn check(&self) -> StoreResult<()> {
        self.write(|tx| Ok(tx.conn.query_row("SELECT 1", [], |_| Ok(()))?))
            .await?;
        self.read(|conn| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
    }
}

fn configure(conn: &Connection, synchronous: Synchronous) -> StoreResult<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Internal(format!(
            "the database refused WAL mode (got {mode})"
        )));
    }
    let sync = match synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {sync}; PRAGMA temp_store = MEMORY; PRAGMA cache_size = -8000; \
         PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = {WAL_KEEP_BYTES};"
    ))?;
    Ok(())
}

/// Deleted rows' pages go back to the file system: the database is in incremental vacuum mode
/// (set before the first table on a new file; an older file is converted once, by a VACUUM),
/// and retention hands free pages back in bounded steps ([`SqliteStore::compact`]).
fn incremental_vacuum_mode(conn: &Connection) -> StoreResult<()> {
    const INCREMENTAL: i64 = 2;
    let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
    if mode == INCREMENTAL {
        return Ok(());
    }
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    if pages > 1 {
        tracing::info!(
            pages,
            "converting the database to incremental vacuum (once)"
        );
    }
    conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let version = usize::try_from(version).unwrap_or(0);
    if version > MIGRATIONS.len() {
        return Err(StoreError::Internal(format!(
            "the database schema (version {version}) is newer than this build knows ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
    }
    Ok(())
}

/// The writer thread: takes every waiting job, runs each in a savepoint of one transaction,
/// commits once, then publishes the committed events and answers the callers.
/// The single writer: owns the write connection.
struct Writer {
    conn: Connection,
    bus: Arc<Bus>,
    stats: Arc<StoreStats>,
    /// Set by the checkpointer when the WAL is not restarting.
    checkpoint_requested: Arc<AtomicBool>,
}

impl Writer {
    fn run(self, jobs: mpsc::Receiver<Job>) {
        let Writer {
            conn,
            bus,
            stats,
            checkpoint_requested,
        } = self;
        let mut ids = IdGenerator::default();
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Ok(first) = jobs.recv() {
            batch.push(first);
            batch.extend(jobs.try_iter().take(MAX_BATCH - 1));
            let mut deliveries = Vec::with_capacity(batch.len());
            let mut events = Vec::new();
            let began = run_cached(&conn, "BEGIN IMMEDIATE");
            if let Err(e) = began {
                let error = StoreError::Unavailable(format!("begin: {e}"));
                for job in batch.drain(..) {
                    // The job must not run outside a transaction; answer it with the error.
                    drop(job);
                    tracing::error!(%error, "write batch refused");
                }
                continue;
            }
            stats.commits.fetch_add(1, Ordering::Relaxed);
            stats.jobs.fetch_add(batch.len() as u64, Ordering::Relaxed);
            for job in batch.drain(..) {
                if let Err(e) = run_cached(&conn, "SAVEPOINT job") {
                    tracing::error!(error = %e, "savepoint failed");
                    continue;
                }
                let mut tx = Tx {
                    conn: &conn,
                    ids: &mut ids,
                    now: Millis::now(),
                    events: Vec::new(),
                };
                let outcome = catch_unwind(AssertUnwindSafe(|| job(&mut tx)));
                let ok = matches!(outcome, Ok((true, _)));
                let kept = if ok {
                    run_cached(&conn, "RELEASE job").is_ok()
                } else {
                    if let Err(e) = conn.execute_batch("ROLLBACK TO job; RELEASE job") {
                        tracing::error!(error = %e, "rolling back a refused job failed");
                    }
                    false
                };
                if kept {
                    events.append(&mut tx.events);
                }
                match outcome {
                    Ok((_, delivery)) => deliveries.push(delivery),
                    Err(_) => {
                        tracing::error!("a store job panicked; its savepoint was rolled back")
                    }
                }
            }
            let commit_error = run_cached(&conn, "COMMIT").err().map(|e| {
                let _ = conn.execute_batch("ROLLBACK");
                StoreError::Unavailable(format!("commit: {e}"))
            });
            if commit_error.is_none() {
                bus.publish(events);
            }
            for delivery in deliveries {
                delivery(commit_error.clone());
            }
            if checkpoint_requested.load(Ordering::Acquire) {
                // No write transaction is open here and the checkpointer waits for us, so this
                // checkpoint can complete and the next transaction restarts the WAL.
                match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0)) {
                    Ok(0) => {
                        stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => tracing::debug!("WAL checkpoint on the writer was busy"),
                    Err(e) => tracing::warn!(error = %e, "WAL checkpoint on the writer failed"),
                }
                checkpoint_requested.store(false, Ordering::Release);
            }
        }
    }
}

fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Checkpoints the WAL from its own thread and connection, so the writer never stalls on
/// the checkpoint's fsync. PASSIVE checkpoints never block the writer or the readers.
fn start_checkpointer(
    path: &Path,
    finish_requested: Arc<AtomicBool>,
) -> StoreResult<mpsc::Sender<()>> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let (stop, stopped) = mpsc::channel::<()>();
    let mut wal_path = path.as_os_str().to_owned();
    wal_path.push("-wal");
    std::thread::Builder::new()
        .name("baton-sqlite-checkpoint".into())
        .spawn(move || {
            loop {
                let done = matches!(
                    stopped.recv_timeout(CHECKPOINT_INTERVAL),
                    Err(RecvTimeoutError::Disconnected)
                );
                if finish_requested.load(Ordering::Acquire) {
                    // The writer has not finished the last one yet: never compete with it.
                    if done {
                        break;
                    }
                    continue;
                }
                // (busy, frames in the log, frames checkpointed)
                match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                }) {
                    Ok((log, backfilled)) => {
                        let wal_bytes = std::fs::metadata(&wal_path).map_or(0, |m| m.len());
                        tracing::trace!(log, backfilled, wal_bytes, "WAL checkpoint pass");
                        // Backfilled up to where this pass began, yet the writer has been
                        // appending since: only the writer can close that gap.
                        if wal_bytes > WAL_RESTART_BYTES {
                            finish_requested.store(true, Ordering::Release);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
                }
                if done {
                    break;
                }
            }
        })
        .map_err(|e| StoreError::Internal(format!("spawning the checkpointer: {e}")))?;
    Ok(stop)
}

/// The write side of one job: the connection inside the batch's transaction, the id
/// generator and the events the job caused.
struct Tx<'c> {
    conn: &'c Connection,
    ids: &'c mut IdGenerator,
    now: Millis,
    events: Vec<Event>,
}

impl Tx<'_> {
    fn session(&self, id: &SessionId) -> StoreResult<Option<SessionRow>> {
        let row = self
            .conn
            .prepare_cached("SELECT agent, context, epoch, last_seq FROM sessions WHERE id = ?1")?
            .query_row([id.as_str()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .optional()?;
        let Some((agent, context, epoch, last_seq)) = row else {
            return Ok(None);
        };
        Ok(Some(SessionRow {
            id: id.clone(),
            agent,
            context: Err(context),
            epoch,
            last_seq,
            saved_seq: last_seq,
        }))
    }

    /// Inserts a new session and emits `session.created`.
    fn create_session(
        &mut self,
        id: &SessionId,
        agent: &str,
        context: &JsonObject,
    ) -> StoreResult<SessionRow> {
        let retired: Option<i64> = self
            .conn
            .prepare_cached("DELETE FROM retired_sessions WHERE id = ?1 RETURNING last_seq")?
            .query_row([id.as_str()], |r| r.get(0))
            .optional()?;
        let last_seq = retired.unwrap_or(0);
        self.conn
            .prepare_cached(
                "INSERT INTO sessions (id, agent, context, epoch, last_seq, created_at) \
                 VALUES (?1, ?2, ?3, 0, ?4, ?5)",
            )?
            .execute(params![
                id.as_str(),
                agent,
                serde_json::to_string(context)?,
                last_seq,
                self.now.0
            ])?;
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
        Ok(row)
    }

    /// Allocates the next seq of the session, stores the event and keeps it for publishing.
    fn emit<D: Serialize>(
        &mut self,
        row: &mut SessionRow,
        kind: EventType,
        interaction_id: Option<&InteractionId>,
        data: &D,
        interaction: Option<Arc<Interaction>>,
    ) -> StoreResult<()> {
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
        self.conn
            .prepare_cached(
                "INSERT INTO events (session, seq, type, interaction_id, envelope, at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                row.id.as_str(),
                event.seq,
                kind.as_str(),
                interaction_id.map(InteractionId::as_str),
                &*event.envelope,
                self.now.0,
            ])?;
        self.events.push(event);
        Ok(())
    }

    fn emit_interaction(
        &mut self,
        row: &mut SessionRow,
        kind: EventType,
        interaction: &Interaction,
    ) -> StoreResult<()> {
        let shared = Arc::new(interaction.clone());
        self.emit(
            row,
            kind,
            Some(&interaction.id),
            &InteractionData { interaction },
            Some(shared),
        )
    }

    fn save_seq(&self, row: &SessionRow) -> StoreResult<()> {
        if row.last_seq != row.saved_seq {
            self.conn
                .prepare_cached("UPDATE sessions SET last_seq = ?2 WHERE id = ?1")?
                .execute(params![row.id.as_str(), row.last_seq])?;
        }
        Ok(())
    }

    /// Emits a running task's outputs, one event each, and applies its context patches.
    /// Returns the text of its deltas, for the caller to add to the stored response.
    fn write_outputs(
        &mut self,
        row: &mut SessionRow,
        id: &InteractionId,
        outputs: Vec<TaskOutput>,
    ) -> StoreResult<String> {
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
                    self.set_context(row, &context)?;
                }
            }
        }
        Ok(text)
    }

    fn set_context(&mut self, row: &mut SessionRow, context: &JsonObject) -> StoreResult<()> {
        self.conn
            .prepare_cached("UPDATE sessions SET context = ?2 WHERE id = ?1")?
            .execute(params![row.id.as_str(), serde_json::to_string(context)?])?;
        row.context = Ok(context.clone());
        self.emit(
            row,
            EventType::ContextUpdated,
            None,
            &ContextData { context },
            None,
        )
    }

    fn interaction(&self, id: &InteractionId) -> StoreResult<Option<Interaction>> {
        select_interaction(self.conn, id)
    }

    /// The session of `id` if it is running; otherwise the write is fenced.
    fn running_session_of(&self, id: &InteractionId) -> StoreResult<SessionId> {
        let found: Option<(String, String)> = self
            .conn
            .prepare_cached("SELECT session, status FROM interactions WHERE id = ?1")?
            .query_row([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        match found {
            Some((session, status)) if status == Status::Running.as_str() => {
                SessionId::parse(&session).map_err(|e| StoreError::Internal(e.to_string()))
            }
            _ => Err(StoreError::Fenced),
        }
    }

    fn running(&self, session: &SessionId) -> StoreResult<Option<Interaction>> {
        let sql = concat!(
            "SELECT ",
            interaction_columns!(),
            " FROM interactions WHERE session = ?1 AND status = 'running'"
        );
        Ok(self
            .conn
            .prepare_cached(sql)?
            .query_row([session.as_str()], |r| read_interaction(r, 0))
            .optional()?)
    }

    fn running_id(&self, session: &SessionId) -> StoreResult<Option<InteractionId>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT id FROM interactions WHERE session = ?1 AND status = 'running'",
            )?
            .query_row([session.as_str()], |r| r.get(0))
            .optional()?
            .map(InteractionId::from_stored))
    }

    fn queued_ids(&self, session: &SessionId) -> StoreResult<Vec<InteractionId>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id FROM interactions WHERE session = ?1 AND status = 'queued' ORDER BY id",
        )?;
        let rows = stmt.query_map([session.as_str()], |r| r.get(0))?;
        Ok(rows
            .map(|r| r.map(InteractionId::from_stored))
            .collect::<Result<Vec<_>, _>>()?)
    }

    fn queued(&self, session: &SessionId) -> StoreResult<Vec<Interaction>> {
        let sql = concat!(
            "SELECT ",
            interaction_columns!(),
            " FROM interactions \
             WHERE session = ?1 AND status = 'queued' ORDER BY id"
        );
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt.query_map([session.as_str()], |r| read_interaction(r, 0))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn by_idempotency_key(
        &self,
        row: &SessionRow,
        key: &str,
        msg: &NewMessage,
    ) -> StoreResult<Option<Interaction>> {
        let sql = concat!(
            "SELECT ",
            interaction_columns!(),
            " FROM interactions WHERE session = ?1 AND idempotency_key = ?2"
        );
        let earlier = self
            .conn
            .prepare_cached(sql)?
            .query_row(params![row.id.as_str(), key], |r| read_interaction(r, 0))
            .optional()?;
        let Some(earlier) = earlier else {
            return Ok(None);
        };
        if earlier.created_at.0 < self.now.0 - IDEMPOTENCY_TTL_MS {
            // Expired: the key is free again.
            self.conn
                .prepare_cached("UPDATE interactions SET idempotency_key = NULL WHERE id = ?1")?
                .execute([earlier.id.as_str()])?;
            return Ok(None);
        }
        if earlier.content != msg.content || earlier.metadata != msg.metadata {
            return Err(StoreError::IdempotencyMismatch);
        }
        Ok(Some(earlier))
    }

    /// Makes `interaction` final and emits its one final event.
    fn make_final(
        &mut self,
        row: &mut SessionRow,
        interaction: &mut Interaction,
        status: Status,
        error: Option<ErrorInfo>,
        reason: Option<CancelReason>,
    ) -> StoreResult<()> {
        let kind = EventType::final_for(status)
            .ok_or_else(|| StoreError::Internal(format!("{status} is not final")))?;
        interaction.status = status;
        interaction.error = error;
        interaction.cancel_reason = reason;
        interaction.finished_at = Some(self.now);
        // `interaction` was read in this transaction, so its response is the stored one
        // (deltas included) unless the task replaced it.
        self.conn
            .prepare_cached(
                "UPDATE interactions SET status = ?2, response = ?3, error_code = ?4, \
                 error_message = ?5, cancel_reason = ?6, finished_at = ?7 WHERE id = ?1",
            )?
            .execute(params![
                interaction.id.as_str(),
                status.as_str(),
                interaction.response,
                interaction.error.as_ref().map(|e| &e.code),
                interaction.error.as_ref().map(|e| &e.message),
                reason.map(CancelReason::as_str),
                self.now.0,
            ])?;
        self.emit_interaction(row, kind, interaction)
    }

    /// Starts the oldest queued interaction. Callers have just ended (or found no) running
    /// one; the partial unique index refuses a second runner regardless.
    fn start_next(&mut self, row: &mut SessionRow) -> StoreResult<Option<StartedTask>> {
        let sql = concat!(
            "SELECT ",
            interaction_columns!(),
            " FROM interactions \
             WHERE session = ?1 AND status = 'queued' ORDER BY id LIMIT 1"
        );
        let next = self
            .conn
            .prepare_cached(sql)?
            .query_row([row.id.as_str()], |r| read_interaction(r, 0))
            .optional()?;
        let Some(mut next) = next else {
            return Ok(None);
        };
        next.status = Status::Running;
        next.started_at = Some(self.now);
        self.conn
            .prepare_cached(
                "UPDATE interactions SET status = 'running', started_at = ?2 WHERE id = ?1",
            )?
            .execute(params![next.id.as_str(), self.now.0])?;
        self.emit_interaction(row, EventType::TaskStarted, &next)?;
        Ok(Some(StartedTask {
            interaction: next,
            agent: row.agent.clone(),
        }))
    }

    /// Cancels the running interaction, then every queued one in FIFO order.
    fn cancel_all(
        &mut self,
        row: &mut SessionRow,
        reason: CancelReason,
    ) -> StoreResult<Vec<InteractionId>> {
        let mut victims: Vec<Interaction> = self.running(&row.id)?.into_iter().collect();
        victims.extend(self.queued(&row.id)?);
        let mut cancelled = Vec::with_capacity(victims.len());
        for mut victim in victims {
            self.make_final(row, &mut victim, Status::Cancelled, None, Some(reason))?;
            cancelled.push(victim.id);
        }
        Ok(cancelled)
    }
}

/// One step of the delta walk of [`SqliteStore::compact`].
struct DeltaWalk {
    deleted: u64,
    /// The last event id looked at.
    reached: i64,
    /// The walk met an event too recent, or the end of the log.
    done: bool,
}

/// Looks at up to `batch` events after id `from`, in order, deleting the deltas of
/// interactions no longer active, and stops at the first event at or after `before`.
fn compact_deltas(
    conn: &Connection,
    from: i64,
    before: Millis,
    batch: i64,
) -> StoreResult<DeltaWalk> {
    let mut walk = DeltaWalk {
        deleted: 0,
        reached: from,
        done: false,
    };
    let rows: Vec<(i64, i64, bool, Option<String>)> = conn
        .prepare_cached(
            "SELECT id, at, type = 'task.delta', interaction_id FROM events \
             WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?
        .query_map(params![from, batch], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<Result<_, _>>()?;
    walk.done = rows.len() < usize::try_from(batch).unwrap_or(usize::MAX);
    let mut active = conn.prepare_cached(
        "SELECT 1 FROM interactions WHERE id = ?1 AND status IN ('queued', 'running')",
    )?;
    let mut delete = conn.prepare_cached("DELETE FROM events WHERE id = ?1")?;
    for (id, at, is_delta, interaction) in rows {
        if at >= before.0 {
            walk.done = true;
            break;
        }
        walk.reached = id;
        let Some(interaction) = interaction.filter(|_| is_delta) else {
            continue;
        };
        if !active.exists([&interaction])? {
            walk.deleted += delete.execute([id])? as u64;
        }
    }
    Ok(walk)
}

fn require_session(conn: &Connection, id: &SessionId) -> StoreResult<()> {
    let exists = conn
        .prepare_cached("SELECT 1 FROM sessions WHERE id = ?1")?
        .exists([id.as_str()])?;
    if exists {
        Ok(())
    } else {
        Err(StoreError::SessionNotFound)
    }
}

fn select_session(conn: &Connection, id: &SessionId) -> StoreResult<Option<Session>> {
    let sql = SESSION_ONE.as_str();
    Ok(conn
        .prepare_cached(sql)?
        .query_row([id.as_str()], read_session)
        .optional()?)
}

fn select_interaction(conn: &Connection, id: &InteractionId) -> StoreResult<Option<Interaction>> {
    let sql = concat!(
        "SELECT ",
        interaction_columns!(),
        " FROM interactions WHERE id = ?1"
    );
    Ok(conn
        .prepare_cached(sql)?
        .query_row([id.as_str()], |r| read_interaction(r, 0))
        .optional()?)
}

fn conversion_error(
    column: usize,
    e: impl std::error::Error + Send + Sync + 'static,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
}

fn parse_json_object(column: usize, text: &str) -> rusqlite::Result<JsonObject> {
    serde_json::from_str(text).map_err(|e| conversion_error(column, e))
}

fn read_session(r: &Row<'_>) -> rusqlite::Result<Session> {
    let id: String = r.get(0)?;
    let running_id: Option<String> = r.get(7)?;
    Ok(Session {
        id: SessionId::parse(&id).map_err(|e| conversion_error(0, e))?,
        agent: r.get(1)?,
        context: parse_json_object(2, &r.get::<_, String>(2)?)?,
        epoch: r.get(3)?,
        last_seq: r.get(4)?,
        created_at: Millis(r.get(5)?),
        queued: r.get(6)?,
        running: match running_id {
            Some(_) => Some(read_interaction(r, 7)?),
            None => None,
        },
    })
}

/// Reads the [`INTERACTION_COLUMNS`] starting at column `at`.
fn read_interaction(r: &Row<'_>, at: usize) -> rusqlite::Result<Interaction> {
    let session: String = r.get(at + 1)?;
    let status: String = r.get(at + 4)?;
    let error_code: Option<String> = r.get(at + 6)?;
    let reason: Option<String> = r.get(at + 8)?;
    Ok(Interaction {
        id: InteractionId::from_stored(r.get(at)?),
        session: SessionId::parse(&session).map_err(|e| conversion_error(at + 1, e))?,
        content: r.get(at + 2)?,
        metadata: parse_json_object(at + 3, &r.get::<_, String>(at + 3)?)?,
        status: status.parse().map_err(|e| conversion_error(at + 4, e))?,
        response: r.get(at + 5)?,
        error: match error_code {
            Some(code) => Some(ErrorInfo {
                code,
                message: r.get::<_, Option<String>>(at + 7)?.unwrap_or_default(),
            }),
            None => None,
        },
        cancel_reason: match reason {
            Some(reason) => Some(reason.parse().map_err(|e| conversion_error(at + 8, e))?),
            None => None,
        },
        created_at: Millis(r.get(at + 9)?),
        started_at: r.get::<_, Option<i64>>(at + 10)?.map(Millis),
        finished_at: r.get::<_, Option<i64>>(at + 11)?.map(Millis),
    })
}

/// Read-only connections used in parallel on the blocking pool.
struct ReadPool {
    connections: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl ReadPool {
    fn open(path: &Path, size: usize) -> StoreResult<Self> {
        let mut connections = Vec::with_capacity(size);
        for _ in 0..size {
            let conn = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            conn.busy_timeout(Duration::from_secs(5))?;
            conn.execute_batch("PRAGMA cache_size = -4000;")?;
            connections.push(conn);
        }
        Ok(Self {
            connections: Mutex::new(connections),
            permits: Arc::new(Semaphore::new(size)),
        })
    }

    async fn read<R: Send + 'static>(
        self: Arc<Self>,
        f: impl FnOnce(&Connection) -> StoreResult<R> + Send + 'static,
    ) -> StoreResult<R> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("reader pool closed".into()))?;
        tokio::task::spawn_blocking(move || {
            let conn = self
                .connections
                .lock()
                .map_err(|_| StoreError::Internal("reader pool poisoned".into()))?
                .pop()
                .ok_or_else(|| StoreError::Internal("reader pool empty".into()))?;
            let result = catch_unwind(AssertUnwindSafe(|| f(&conn)));
            if let Ok(mut pool) = self.connections.lock() {
                pool.push(conn);
            }
            drop(permit);
            result.unwrap_or_else(|_| Err(StoreError::Internal("a read panicked".into())))
        })
        .await
        .map_err(|e| StoreError::Internal(format!("read task: {e}")))?
    }
}
