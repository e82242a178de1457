//! The SQLite schema, its migrations, and the connection settings of the writer.

use std::time::Duration;

use rusqlite::Connection;

use super::writer::WAL_KEEP_BYTES;
use crate::store::location::Synchronous;
use crate::store::{StoreError, StoreResult};

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
    r#"
-- A run of `task.delta` events of one interaction appended together is stored as one row:
-- seqs `seq..=last_seq`, their envelopes joined by newlines (compact JSON holds none).
-- NULL: the row holds the one event `seq`.
ALTER TABLE events ADD COLUMN last_seq INTEGER;
"#,
    r#"
-- Tenants: a session's key is `tenant/name`; what was stored before belongs to `default`.
ALTER TABLE sessions ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
UPDATE sessions SET id = 'default/' || id;
UPDATE interactions SET session = 'default/' || session;
UPDATE events SET session = 'default/' || session;
UPDATE retired_sessions SET id = 'default/' || id;
CREATE INDEX sessions_by_tenant ON sessions (tenant, id);
"#,
    r#"
-- Waiting for input: the status `waiting`, active like `running` (I1 counts both, here in the
-- schema too), its pending request, the answered ones, and when an unanswered one times out.
-- SQLite cannot change a CHECK: the table is rebuilt.
CREATE TABLE interactions_v5 (
    id              TEXT PRIMARY KEY,
    session         TEXT NOT NULL,
    epoch           INTEGER NOT NULL,
    content         TEXT NOT NULL,
    metadata        TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN
                    ('queued', 'running', 'waiting', 'completed', 'failed', 'cancelled')),
    response        TEXT NOT NULL DEFAULT '',
    error_code      TEXT,
    error_message   TEXT,
    cancel_reason   TEXT,
    idempotency_key TEXT,
    created_at      INTEGER NOT NULL,
    started_at      INTEGER,
    finished_at     INTEGER,
    request         TEXT,
    answers         TEXT,
    input_deadline  INTEGER
);
INSERT INTO interactions_v5 (id, session, epoch, content, metadata, status, response,
    error_code, error_message, cancel_reason, idempotency_key, created_at, started_at,
    finished_at)
    SELECT id, session, epoch, content, metadata, status, response, error_code,
    error_message, cancel_reason, idempotency_key, created_at, started_at, finished_at
    FROM interactions;
DROP TABLE interactions;
ALTER TABLE interactions_v5 RENAME TO interactions;
CREATE UNIQUE INDEX interactions_one_active ON interactions (session)
    WHERE status IN ('running', 'waiting');
CREATE INDEX interactions_by_session ON interactions (session, id);
CREATE INDEX interactions_queued ON interactions (session, id) WHERE status = 'queued';
CREATE UNIQUE INDEX interactions_idempotency
    ON interactions (session, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX interactions_waiting_deadline ON interactions (input_deadline)
    WHERE status = 'waiting';
"#,
];

pub(super) fn configure(conn: &Connection, synchronous: Synchronous) -> StoreResult<()> {
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
pub(super) fn incremental_vacuum_mode(conn: &Connection) -> StoreResult<()> {
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

pub(super) fn migrate(conn: &mut Connection) -> StoreResult<()> {
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
