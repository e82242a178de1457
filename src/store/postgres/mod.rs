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
//!
//! Every write is one operation of the session rules ([`crate::session`]): the transaction locks
//! the session's row and loads its snapshot, the rules decide, the plan is applied ([`tx`]).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;

use super::backend::Committed;
use super::shared::{interaction_page, session_page, sessions_after};
use super::{Limits, Page, StoreError, StoreResult, StoreStats};
use crate::bus::Bus;
use crate::model::{
    Event, IdGenerator, Interaction, InteractionId, JsonObject, Millis, Session, SessionId, Tenant,
};
use crate::session::{Effects, Op};
use delivery::{Note, Sequencer, run_filler, run_listener, run_notifier, run_watchdog};
use rows::{
    SESSION_SELECT, read_event, read_interaction, read_session, require_session,
    select_interaction, select_session,
};
use tls::PgUrl;
use tx::PgTx;

/// Attempts of a transaction that lost a deadlock or a serialization race.
const TX_ATTEMPTS: u32 = 4;
/// Tasks whose session this node remembers at most.
const TASK_SESSIONS: usize = 65_536;

/// The database's clock in milliseconds: leases are compared in one clock, whatever the nodes'.
const DB_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

macro_rules! interaction_columns {
    () => {
        "id, session, content, metadata, status, response, error_code, error_message, \
         cancel_reason, created_at, started_at, finished_at, request, answers, input_deadline"
    };
}

/// Settings of the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PgOptions {
    pub url: String,
    /// Connections in the pool at most (the listener has one more of its own).
    pub pool_size: usize,
    /// How long a node's heartbeat keeps it alive.
    pub lease: Duration,
    /// The bounds of the session rules.
    pub limits: Limits,
}

pub(super) struct PgStore {
    pool: Pool,
    bus: Arc<Bus>,
    /// This node's id; a new one after a lost lease, so that the old one's interactions are
    /// taken over like any lost node's.
    node: Mutex<Arc<str>>,
    ids: Mutex<IdGenerator>,
    /// The session of each task started here and not yet seen final: a task's writes name
    /// only its interaction, and this spares them a query to find the session.
    tasks: Mutex<HashMap<InteractionId, SessionId>>,
    stats: Arc<StoreStats>,
    sequencer: Arc<Sequencer>,
    /// What this node's commits tell the other nodes, sent in batches by [`run_notifier`].
    notes: mpsc::UnboundedSender<Note>,
    cancels: Mutex<Option<mpsc::UnboundedReceiver<InteractionId>>>,
    lease: Duration,
    /// The bounds of the session rules.
    limits: Limits,
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
            let (events, cancelled) = $w.into_parts();
            match outcome {
                Ok(value) => match store.commit(tx, events, cancelled).await {
                    Ok(()) => break Ok(value),
                    Err(TxError::Db(e)) if retryable(&e) && attempt < TX_ATTEMPTS => continue,
                    Err(e) => break Err(StoreError::from(e)),
                },
                Err(TxError::Db(e)) if retryable(&e) && attempt < TX_ATTEMPTS => continue,
                Err(TxError::Retry) if attempt < TX_ATTEMPTS => continue,
                Err(e) => break Err(StoreError::from(e)),
            }
        }
    }};
}

mod cluster;
mod delivery;
mod rows;
mod schema;
pub(crate) mod tls;
mod tx;

/// A transaction body's error: a refusal (state unchanged) or a database failure.
enum TxError {
    Store(StoreError),
    Db(tokio_postgres::Error),
    /// The snapshot was outdated by a concurrent commit: run the transaction again.
    Retry,
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
            TxError::Retry => StoreError::Unavailable("too much contention on a session".into()),
        }
    }
}

type TxResult<T> = Result<T, TxError>;

impl PgStore {
    pub(super) async fn open(options: PgOptions, bus: Arc<Bus>) -> StoreResult<Self> {
        let url = PgUrl::parse(&options.url)
            .map_err(|e| StoreError::Internal(format!("database URL: {e}")))?;
        let tls = url
            .connector()
            .map_err(|e| StoreError::Internal(format!("database TLS: {e}")))?;
        let mut config = tokio_postgres::Config::from_str(&url.url)
            .map_err(|e| StoreError::Internal(format!("database URL: {e}")))?;
        config.ssl_mode(url.ssl_mode());
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
            tls.clone(),
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
        schema::migrate(&pool).await?;
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
        let sequencer = Arc::new(Sequencer::new(bus.clone(), fill_tx));
        let filler = tokio::spawn(run_filler(pool.clone(), sequencer.clone(), fill_rx));
        let notifier = tokio::spawn(run_notifier(pool.clone(), notes_rx));
        let watchdog = tokio::spawn(run_watchdog(pool.clone(), sequencer.clone()));
        let listener = tokio::spawn(run_listener(config, tls, sequencer.clone(), cancel_tx));
        tracing::info!(node = %node, "joined the cluster");
        Ok(Self {
            pool,
            bus,
            node: Mutex::new(node),
            ids: Mutex::new(IdGenerator::default()),
            tasks: Mutex::new(HashMap::new()),
            stats: Arc::new(StoreStats::default()),
            sequencer,
            cancels: Mutex::new(Some(cancel_rx)),
            lease: options.lease,
            limits: options.limits,
            notes,
            background: vec![
                filler.abort_handle(),
                listener.abort_handle(),
                notifier.abort_handle(),
                watchdog.abort_handle(),
            ],
        })
    }

    /// A local subscriber of `session` has read that its last seq is `last_seq`: this
    /// node orders that session's events from there on.
    pub(super) fn anchor(&self, session: &SessionId, last_seq: i64) {
        self.sequencer.anchor(session, last_seq);
    }

    pub(super) fn lease(&self) -> Duration {
        self.lease
    }

    /// The session of a task started here, if known. An entry of a transaction that did not
    /// commit is harmless: the interaction's session never changes, and a task that is not
    /// running is fenced by the rules (and then forgotten).
    fn task_session(&self, id: &InteractionId) -> Option<SessionId> {
        self.tasks.lock().ok()?.get(id).cloned()
    }

    fn task_started(&self, id: &InteractionId, session: &SessionId) {
        if let Ok(mut tasks) = self.tasks.lock() {
            // Tasks ended elsewhere (cancelled through another node) leave entries behind;
            // it is only a shortcut, so past a bound it starts over.
            if tasks.len() >= TASK_SESSIONS {
                tasks.clear();
            }
            tasks.insert(id.clone(), session.clone());
        }
    }

    fn task_ended(&self, id: &InteractionId) {
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.remove(id);
        }
    }

    fn node(&self) -> Arc<str> {
        Arc::clone(&self.node.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(super) fn take_remote_cancels(&self) -> Option<mpsc::UnboundedReceiver<InteractionId>> {
        self.cancels.lock().ok()?.take()
    }

    /// Commits, notifies the other nodes, then publishes the transaction's events locally.
    async fn commit(
        &self,
        tx: deadpool_postgres::Transaction<'_>,
        events: Vec<Event>,
        cancelled: Vec<InteractionId>,
    ) -> TxResult<()> {
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
        self.sequencer.deliver(events, false);
        Ok(())
    }

    /// Runs one operation of the session rules as a transaction.
    pub(super) async fn run<O: Op>(
        &self,
        session: Option<SessionId>,
        op: O,
    ) -> StoreResult<Committed<O::Outcome>> {
        transaction!(self, |w| { w.run(session.as_ref(), op.clone()).await })
    }

    pub(super) async fn get_session(&self, id: SessionId) -> StoreResult<Session> {
        let client = self.pool.get().await?;
        select_session(&client, &id)
            .await?
            .ok_or(StoreError::SessionNotFound)
    }

    pub(super) async fn list_sessions(
        &self,
        tenant: Tenant,
        after: Option<String>,
        limit: u32,
    ) -> StoreResult<Page<Session>> {
        let after = sessions_after(&tenant, after);
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(&format!(
                "{SESSION_SELECT} WHERE s.tenant = $1 AND s.id > $2 ORDER BY s.id LIMIT $3"
            ))
            .await?;
        let rows = client
            .query(&stmt, &[&tenant.as_str(), &after, &(i64::from(limit) + 1)])
            .await?;
        let items = rows
            .iter()
            .map(read_session)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(session_page(items, limit))
    }

    pub(super) async fn get_context(&self, session: SessionId) -> StoreResult<JsonObject> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached("SELECT context FROM sessions WHERE id = $1")
            .await?;
        let row = client
            .query_opt(&stmt, &[&session.key()])
            .await?
            .ok_or(StoreError::SessionNotFound)?;
        Ok(serde_json::from_str(row.try_get::<_, &str>(0)?)?)
    }

    /// `waiting` interactions whose deadline is at or before `now`, oldest deadline first.
    pub(super) async fn expired_waits(
        &self,
        now: Millis,
        limit: u32,
    ) -> StoreResult<Vec<(SessionId, InteractionId)>> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(concat!(
                "SELECT session, id FROM interactions WHERE status IN ",
                status_sql!(waiting),
                " AND input_deadline <= $1 ORDER BY input_deadline LIMIT $2"
            ))
            .await?;
        let rows = client.query(&stmt, &[&now.0, &i64::from(limit)]).await?;
        rows.iter()
            .map(|row| {
                let session = SessionId::from_key(row.try_get::<_, &str>(0)?)
                    .map_err(|e| StoreError::Internal(format!("stored session id: {e}")))?;
                Ok((session, InteractionId::from_stored(row.try_get(1)?)))
            })
            .collect()
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
            .query(&stmt, &[&session.key(), &before, &(i64::from(limit) + 1)])
            .await?;
        let items = rows
            .iter()
            .map(|r| read_interaction(r, 0))
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(interaction_page(items, limit))
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
        let items = select_history(&tx, &session, limit).await?;
        tx.commit().await?;
        Ok((found, items))
    }

    pub(super) async fn history(
        &self,
        session: SessionId,
        limit: u32,
    ) -> StoreResult<Vec<Interaction>> {
        let client = self.pool.get().await?;
        select_history(&client, &session, limit).await
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
            .query(&stmt, &[&session.key(), &after, &i64::from(limit)])
            .await?;
        rows.iter().map(read_event).collect()
    }

    /// Deletes, in batches of `batch` rows (each its own short transaction), the
    /// `task.delta` events older than `deltas_before` whose interaction is final (its final
    /// event carries the whole response), then every event older than `events_before`.
    /// Returns the events deleted (one per row here).
    pub(super) async fn compact(
        &self,
        deltas_before: Millis,
        events_before: Millis,
        batch: i64,
    ) -> StoreResult<u64> {
        let client = self.pool.get().await?;
        let deltas = client
            .prepare_cached(concat!(
                "DELETE FROM events WHERE ctid IN (SELECT e.ctid FROM events e \
                     WHERE e.type = 'task.delta' AND e.at < $1 AND NOT EXISTS \
                     (SELECT 1 FROM interactions i WHERE i.id = e.interaction_id \
                     AND i.status IN ",
                status_sql!(open),
                ") LIMIT $2)"
            ))
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
    pub(super) async fn recover(&self) -> StoreResult<Effects> {
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
fn ranges(events: &[Event]) -> Vec<(&SessionId, i64, i64)> {
    let mut out: Vec<(&SessionId, i64, i64)> = Vec::new();
    for event in events {
        match out.last_mut() {
            Some((session, _, last)) if *session == &event.session => *last = event.seq,
            _ => out.push((&event.session, event.seq, event.seq)),
        }
    }
    out
}

/// The latest `limit` completed interactions, oldest first (a clear removed the earlier
/// epochs' rows).
async fn select_history(
    client: &impl deadpool_postgres::GenericClient,
    session: &SessionId,
    limit: u32,
) -> StoreResult<Vec<Interaction>> {
    let stmt = client
        .prepare_cached(concat!(
            "SELECT ",
            interaction_columns!(),
            " FROM interactions WHERE session = $1 AND status IN ",
            status_sql!(completed),
            " ORDER BY id DESC LIMIT $2"
        ))
        .await?;
    let rows = client
        .query(&stmt, &[&session.key(), &i64::from(limit)])
        .await?;
    let mut items = rows
        .iter()
        .map(|r| read_interaction(r, 0))
        .collect::<StoreResult<Vec<_>>>()?;
    items.reverse();
    Ok(items)
}
