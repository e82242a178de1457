//! Reading: row decoding shared by the writer and the readers, and the pool of read-only
//! connections that serve every read in parallel with the writer.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row};
use tokio::sync::Semaphore;

use crate::model::{ErrorInfo, Interaction, InteractionId, JsonObject, Millis, Session, SessionId};
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
    Ok(conn
        .prepare_cached(sql)?
        .query_row([id.key()], read_session)
        .optional()?)
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
    Ok(conn
        .prepare_cached(sql)?
        .query_row([id.as_str()], |r| read_interaction(r, 0))
        .optional()?)
}

pub(super) fn conversion_error(
    column: usize,
    e: impl std::error::Error + Send + Sync + 'static,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
}

pub(super) fn parse_json_object(column: usize, text: &str) -> rusqlite::Result<JsonObject> {
    serde_json::from_str(text).map_err(|e| conversion_error(column, e))
}

pub(super) fn read_session(r: &Row<'_>) -> rusqlite::Result<Session> {
    let id: String = r.get(0)?;
    let running_id: Option<String> = r.get(7)?;
    Ok(Session {
        id: SessionId::from_key(&id).map_err(|e| conversion_error(0, e))?,
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
pub(super) fn read_interaction(r: &Row<'_>, at: usize) -> rusqlite::Result<Interaction> {
    let session: String = r.get(at + 1)?;
    let status: String = r.get(at + 4)?;
    let error_code: Option<String> = r.get(at + 6)?;
    let reason: Option<String> = r.get(at + 8)?;
    Ok(Interaction {
        id: InteractionId::from_stored(r.get(at)?),
        session: SessionId::from_key(&session).map_err(|e| conversion_error(at + 1, e))?,
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
        request: match r.get::<_, Option<String>>(at + 12)? {
            Some(text) => {
                Some(serde_json::from_str(&text).map_err(|e| conversion_error(at + 12, e))?)
            }
            None => None,
        },
        answers: match r.get::<_, Option<String>>(at + 13)? {
            Some(text) => serde_json::from_str(&text).map_err(|e| conversion_error(at + 13, e))?,
            None => Vec::new(),
        },
        input_deadline: r.get::<_, Option<i64>>(at + 14)?.map(Millis),
    })
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
