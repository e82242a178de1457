//! The SQLite backend. Writes are serialised anyway in SQLite, so that is made explicit: one
//! writer thread owns the write connection and group-commits whatever jobs are waiting (a
//! refused job wrote nothing, so it never undoes another; a job failing after its writes
//! undoes its batch), then publishes the committed events and answers the callers. Reads run
//! in parallel on a small pool of read-only connections (WAL lets them see every committed
//! write, never a partial one).
//!
//! Every write is one operation of the session rules ([`crate::session`]): the job loads the
//! session's snapshot, the rules decide, the job applies the plan ([`tx`]).

/// The columns [`read::read_interaction`] reads, as a literal for `concat!`.
macro_rules! interaction_columns {
    () => {
        "id, session, content, metadata, status, response, error_code, error_message, \
         cancel_reason, created_at, started_at, finished_at, request, answers, input_deadline"
    };
}

mod cache;
mod read;
mod retention;
mod schema;
mod tx;
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::mpsc;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use super::backend::Committed;
use super::shared::{interaction_page, session_page, sessions_after};
use super::{Page, SqliteOptions, StoreError, StoreResult, StoreStats};
use crate::bus::Bus;
use crate::model::{
    ErrorInfo, Event, EventType, Interaction, InteractionId, JsonObject, Millis, Session,
    SessionId, Tenant,
};
use crate::session::{Effects, Op, op};
use read::{
    ReadPool, SESSION_LIST, decoded, read_interaction, read_session, require_session,
    select_interaction, select_session,
};
use schema::{configure, incremental_vacuum_mode, migrate};
use tx::Tx;
use writer::{Delivery, Job, Writer, start_checkpointer};

pub(super) struct SqliteStore {
    // Unbounded, yet bounded in practice: every job has a caller awaiting its answer.
    jobs: mpsc::Sender<Job>,
    readers: Arc<ReadPool>,
    stats: Arc<StoreStats>,
    /// Dropping it stops the checkpointer thread.
    _checkpointer: mpsc::Sender<()>,
    /// Retention: every event up to this id has been looked at for delta compaction (rows are
    /// appended in commit order, so a walk by id is a walk in time). Starts over after a
    /// restart, which only re-reads what is left.
    delta_cursor: AtomicI64,
}

/// Makes the database readable by its owner only, whatever the umask: the file is created
/// with mode 0600 before SQLite opens it (SQLite gives its WAL, shared-memory and journal
/// files the database's mode), and files of an earlier run are set to 0600.
fn owner_only(path: &Path) -> StoreResult<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let failed = |e: std::io::Error| {
        StoreError::Internal(format!(
            "securing the database file {}: {e}",
            path.display()
        ))
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(failed)?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(failed(e)),
        }
    }
    Ok(())
}

impl SqliteStore {
    pub(super) fn open(path: &Path, options: SqliteOptions, bus: Arc<Bus>) -> StoreResult<Self> {
        owner_only(path)?;
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
            bus,
            stats: stats.clone(),
            checkpoint_requested,
            limits: options.limits,
        };
        std::thread::Builder::new()
            .name("baton-sqlite-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Internal(format!("spawning the writer: {e}")))?;
        Ok(Self {
            jobs,
            readers: Arc::new(readers),
            stats,
            _checkpointer: checkpointer,
            delta_cursor: AtomicI64::new(0),
        })
    }

    /// Runs `f` as one job of the writer, committed with its batch. A job that writes with its
    /// own SQL goes through [`Tx::raw`].
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

    /// Runs one operation of the session rules as a write job.
    pub(super) async fn run<O: Op>(
        &self,
        session: Option<SessionId>,
        op: O,
    ) -> StoreResult<Committed<O::Outcome>> {
        self.write(move |tx| tx.run(session.as_ref(), op)).await
    }

    /// After a crash: interactions left `running` fail (`interrupted`), then each session
    /// with queued work and nothing running starts its oldest.
    pub(super) async fn recover(&self) -> StoreResult<Effects> {
        self.write(|tx| {
            let running: Vec<(String, String)> = tx
                .conn
                .prepare_cached(concat!(
                    "SELECT id, session FROM interactions WHERE status IN ",
                    status_sql!(running),
                    " ORDER BY id"
                ))?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let mut effects = Effects::default();
            for (id, session) in running {
                let op = op::Interrupt {
                    id: InteractionId::from_stored(id),
                    error: ErrorInfo {
                        code: "interrupted".into(),
                        message: "the server stopped while this interaction was running".into(),
                    },
                };
                effects.extend(tx.run(Some(&stored_session(&session)?), op)?.effects);
            }
            let waiting: Vec<String> = tx
                .conn
                .prepare_cached(concat!(
                    "SELECT DISTINCT session FROM interactions WHERE status IN ",
                    status_sql!(queued),
                    " ORDER BY session"
                ))?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for session in waiting {
                let op = op::StartQueued;
                effects.extend(tx.run(Some(&stored_session(&session)?), op)?.effects);
            }
            Ok(effects)
        })
        .await
    }

    /// `waiting` interactions whose deadline is at or before `now`, oldest deadline first.
    pub(super) async fn expired_waits(
        &self,
        now: Millis,
        limit: u32,
    ) -> StoreResult<Vec<(SessionId, InteractionId)>> {
        self.read(move |conn| {
            let rows: Vec<(String, String)> = conn
                .prepare_cached(concat!(
                    "SELECT session, id FROM interactions WHERE status IN ",
                    status_sql!(waiting),
                    " AND input_deadline <= ?1 ORDER BY input_deadline LIMIT ?2"
                ))?
                .query_map(params![now.0, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            rows.into_iter()
                .map(|(session, id)| {
                    Ok((stored_session(&session)?, InteractionId::from_stored(id)))
                })
                .collect()
        })
        .await
    }

    pub(super) async fn get_session(&self, id: SessionId) -> StoreResult<Session> {
        self.read(move |conn| select_session(conn, &id)?.ok_or(StoreError::SessionNotFound))
            .await
    }

    pub(super) async fn list_sessions(
        &self,
        tenant: Tenant,
        after: Option<String>,
        limit: u32,
    ) -> StoreResult<Page<Session>> {
        self.read(move |conn| {
            let sql = SESSION_LIST.as_str();
            let mut stmt = conn.prepare_cached(sql)?;
            let rows = stmt.query_map(
                params![
                    tenant.as_str(),
                    sessions_after(&tenant, after),
                    i64::from(limit) + 1
                ],
                read_session,
            )?;
            Ok(session_page(decoded(rows)?, limit))
        })
        .await
    }

    pub(super) async fn get_context(&self, session: SessionId) -> StoreResult<JsonObject> {
        self.read(move |conn| {
            let text: Option<String> = conn
                .prepare_cached("SELECT context FROM sessions WHERE id = ?1")?
                .query_row([session.key()], |r| r.get(0))
                .optional()?;
            Ok(serde_json::from_str(
                &text.ok_or(StoreError::SessionNotFound)?,
            )?)
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
            let rows = stmt
                .query_map(params![session.key(), before, i64::from(limit) + 1], |r| {
                    read_interaction(r, 0)
                })?;
            Ok(interaction_page(decoded(rows)?, limit))
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
            Ok((found, select_history(conn, &session, limit)?))
        })
        .await
    }

    pub(super) async fn history(
        &self,
        session: SessionId,
        limit: u32,
    ) -> StoreResult<Vec<Interaction>> {
        self.read(move |conn| select_history(conn, &session, limit))
            .await
    }

    pub(super) async fn events_after(
        &self,
        session: SessionId,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<Event>> {
        self.read(move |conn| {
            let limit = limit as usize;
            let mut events = Vec::with_capacity(limit.min(1024));
            // A stored run of deltas that began at or before `after` may go on past it.
            let spanning = conn
                .prepare_cached(
                    "SELECT seq, type, interaction_id, envelope, last_seq FROM events \
                     WHERE session = ?1 AND seq <= ?2 ORDER BY seq DESC LIMIT 1",
                )?
                .query_row(params![session.key(), after], read_stored_row)
                .optional()?;
            if let Some(row) = spanning {
                row.push_events(&session, after, limit, &mut events)?;
            }
            let mut stmt = conn.prepare_cached(
                "SELECT seq, type, interaction_id, envelope, last_seq FROM events \
                 WHERE session = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows =
                stmt.query_map(params![session.key(), after, limit as i64], read_stored_row)?;
            for row in rows {
                if events.len() >= limit {
                    break;
                }
                row?.push_events(&session, after, limit, &mut events)?;
            }
            Ok(events)
        })
        .await
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
fn stored_session(id: &str) -> StoreResult<SessionId> {
    SessionId::from_key(id).map_err(|e| StoreError::Internal(format!("stored session id: {e}")))
}

/// A stored row of the events table: one event, or a run of deltas (`seq..=last_seq`, one
/// envelope per line).
struct StoredRow {
    seq: i64,
    kind: EventType,
    interaction_id: Option<InteractionId>,
    envelope: String,
    last_seq: Option<i64>,
}

/// The latest `limit` completed interactions, oldest first (a clear removed the earlier
/// epochs' rows).
fn select_history(
    conn: &rusqlite::Connection,
    session: &SessionId,
    limit: u32,
) -> StoreResult<Vec<Interaction>> {
    let sql = concat!(
        "SELECT ",
        interaction_columns!(),
        " FROM interactions WHERE session = ?1 AND status IN ",
        status_sql!(completed),
        " ORDER BY id DESC LIMIT ?2"
    );
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params![session.key(), i64::from(limit)], |r| {
        read_interaction(r, 0)
    })?;
    let mut items = decoded(rows)?;
    items.reverse();
    Ok(items)
}

fn conversion_error(
    column: usize,
    e: impl std::error::Error + Send + Sync + 'static,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
}

fn read_stored_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredRow> {
    let kind: String = r.get(1)?;
    Ok(StoredRow {
        seq: r.get(0)?,
        kind: kind.parse().map_err(|e| conversion_error(1, e))?,
        interaction_id: r
            .get::<_, Option<String>>(2)?
            .map(InteractionId::from_stored),
        envelope: r.get(3)?,
        last_seq: r.get(4)?,
    })
}

impl StoredRow {
    /// Appends the row's events with `seq > after` to `out`, up to `limit` in all.
    fn push_events(
        self,
        session: &SessionId,
        after: i64,
        limit: usize,
        out: &mut Vec<Event>,
    ) -> StoreResult<()> {
        let event = |seq: i64, envelope: &str| Event {
            session: session.clone(),
            seq,
            kind: self.kind,
            interaction_id: self.interaction_id.clone(),
            envelope: Arc::from(envelope),
            interaction: None,
        };
        let Some(last_seq) = self.last_seq else {
            if self.seq > after && out.len() < limit {
                out.push(event(self.seq, &self.envelope));
            }
            return Ok(());
        };
        let lines = self.envelope.split('\n');
        let mut count = 0;
        for (seq, line) in (self.seq..).zip(lines) {
            count += 1;
            if seq > after && out.len() < limit {
                out.push(event(seq, line));
            }
        }
        if self.seq + count - 1 != last_seq {
            return Err(StoreError::Internal(format!(
                "stored events {}..={last_seq} hold {count} envelopes",
                self.seq
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Internal(e.to_string())
    }
}
