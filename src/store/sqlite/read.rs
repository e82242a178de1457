//! Reading: row decoding shared by the writer and the readers, and the pool of read-only
//! connections that serve every read in parallel with the writer.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row};
use tokio::sync::Semaphore;

use crate::model::{Interaction, InteractionId, Session, SessionId};
use crate::store::columns::{self, Columns};
use crate::store::{StoreError, StoreResult};

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
         (SELECT count(*) FROM interactions q WHERE q.session = s.id AND q.status IN {queued}), \
         {running_columns} \
         FROM sessions s LEFT JOIN interactions r ON r.session = s.id \
         AND r.status IN {active}",
        queued = status_sql!(queued),
        active = status_sql!(active),
    )
});

pub(super) static SESSION_LIST: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} WHERE s.tenant = ?1 AND s.id > ?2 ORDER BY s.id LIMIT ?3",
        *SESSION_SELECT
    )
});
static SESSION_ONE: LazyLock<String> =
    LazyLock::new(|| format!("{} WHERE s.id = ?1", *SESSION_SELECT));

pub(super) fn require_session(conn: &Connection, id: &SessionId) -> StoreResult<()> {
    let exists = conn
        .prepare_cached("SELECT 1 FROM sessions WHERE id = ?1")?
        .exists([id.key()])?;
    if exists {
        Ok(())
    } else {
        Err(StoreError::SessionNotFound)
    }
}

pub(super) fn select_session(conn: &Connection, id: &SessionId) -> StoreResult<Option<Session>> {
    let sql = SESSION_ONE.as_str();
    conn.prepare_cached(sql)?
        .query_row([id.key()], read_session)
        .optional()?
        .transpose()
}

pub(super) fn select_interaction(
    conn: &Connection,
    id: &InteractionId,
) -> StoreResult<Option<Interaction>> {
    let sql = concat!(
        "SELECT ",
        interaction_columns!(),
        " FROM interactions WHERE id = ?1"
    );
    conn.prepare_cached(sql)?
        .query_row([id.as_str()], |r| read_interaction(r, 0))
        .optional()?
        .transpose()
}

impl Columns for Row<'_> {
    fn string(&self, at: usize) -> StoreResult<String> {
        Ok(self.get(at)?)
    }

    fn optional_string(&self, at: usize) -> StoreResult<Option<String>> {
        Ok(self.get(at)?)
    }

    fn int(&self, at: usize) -> StoreResult<i64> {
        Ok(self.get(at)?)
    }

    fn optional_int(&self, at: usize) -> StoreResult<Option<i64>> {
        Ok(self.get(at)?)
    }

    fn with_text<T>(
        &self,
        at: usize,
        f: impl FnOnce(Option<&str>) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let value = self.get_ref(at)?;
        let text = value.as_str_or_null().map_err(rusqlite::Error::from)?;
        f(text)
    }
}

/// Decodes each row of `rows` (a `query_map` whose closure hands the row's decoding over).
pub(super) fn decoded<T>(
    rows: impl Iterator<Item = rusqlite::Result<StoreResult<T>>>,
) -> StoreResult<Vec<T>> {
    rows.map(|row| row?).collect()
}

pub(super) fn read_session(r: &Row<'_>) -> rusqlite::Result<StoreResult<Session>> {
    Ok(columns::session(r))
}

/// Reads the [`INTERACTION_COLUMNS`] starting at column `at`.
pub(super) fn read_interaction(
    r: &Row<'_>,
    at: usize,
) -> rusqlite::Result<StoreResult<Interaction>> {
    Ok(columns::interaction(r, at))
}

/// Read-only connections used in parallel on the blocking pool.
pub(super) struct ReadPool {
    connections: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl ReadPool {
    pub(super) fn open(path: &Path, size: usize) -> StoreResult<Self> {
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

    pub(super) async fn read<R: Send + 'static>(
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
