//! The PostgreSQL schema and its migrations.

use deadpool_postgres::Pool;

use crate::store::{StoreError, StoreResult};

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
ALTER TABLE interactions DROP CONSTRAINT interactions_status_check;
ALTER TABLE interactions ADD CONSTRAINT interactions_status_check CHECK (status IN
    ('queued', 'running', 'waiting', 'completed', 'failed', 'cancelled'));
ALTER TABLE interactions ADD COLUMN request TEXT, ADD COLUMN answers TEXT,
    ADD COLUMN input_deadline BIGINT;
DROP INDEX interactions_one_running;
CREATE UNIQUE INDEX interactions_one_active ON interactions (session)
    WHERE status IN ('running', 'waiting');
CREATE INDEX interactions_waiting_deadline ON interactions (input_deadline)
    WHERE status = 'waiting';
"#,
];

pub(super) async fn migrate(pool: &Pool) -> StoreResult<()> {
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
