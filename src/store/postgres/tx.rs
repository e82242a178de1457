//! One transaction's view: locks a session's row and loads its snapshot, lets the rules
//! decide, applies the plan. Events are inserted at commit, in one statement.

use deadpool_postgres::Transaction;

use super::rows::{read_interaction, select_interaction};
use super::{PgStore, TxError, TxResult};
use crate::model::{Event, InteractionId, Millis, SessionId, Status};
use crate::store::StoreError;
use crate::store::rules::{self, Operation, Outcome, Plan, SessionRow, Snapshot, Write};

/// An event of a transaction, its time, and whether to store it (events of a deleted
/// session are only published).
pub(super) type PendingEvent = (Event, Millis, bool);

/// The write side of one transaction.
pub(super) struct PgTx<'t, 'c, 's> {
    pub(super) tx: &'t Transaction<'c>,
    store: &'s PgStore,
    now: Millis,
    /// Events with their time and whether to store them, inserted in one statement at commit.
    events: Vec<PendingEvent>,
    /// Interactions whose tasks must stop (to tell the nodes running them).
    stopped: Vec<InteractionId>,
}

impl<'t, 'c, 's> PgTx<'t, 'c, 's> {
    pub(super) fn new(tx: &'t Transaction<'c>, store: &'s PgStore) -> Self {
        Self {
            tx,
            store,
            now: Millis::now(),
            events: Vec::new(),
            stopped: Vec::new(),
        }
    }

    pub(super) fn into_parts(self) -> (Vec<PendingEvent>, Vec<InteractionId>) {
        (self.events, self.stopped)
    }

    /// Runs `op` on `session` (or, for a task's operation, on its interaction's session).
    pub(super) async fn run(
        &mut self,
        session: Option<&SessionId>,
        op: Operation,
    ) -> TxResult<Outcome> {
        let session = match (session, op.task()) {
            (Some(session), _) => session.clone(),
            (None, Some(task)) => match self.session_of(task).await? {
                Some(session) => session,
                None => return Ok(op.when_gone()?),
            },
            (None, None) => {
                return Err(StoreError::Internal("operation without session".into()).into());
            }
        };
        let mut snapshot = self.load(&session, &op).await?;
        if op.inserts() {
            let (id, now) = self.fresh_id(&session).await?;
            snapshot.fresh_id = Some(id);
            snapshot.now = now;
        }
        let plan = rules::decide(snapshot, op)?;
        self.apply(plan).await
    }

    /// Locks the session's row for this transaction; `false` if there is none.
    pub(super) async fn lock(&mut self, id: &SessionId) -> TxResult<bool> {
        let stmt = self
            .tx
            .prepare_cached("SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE")
            .await?;
        Ok(self.tx.query_opt(&stmt, &[&id.as_str()]).await?.is_some())
    }

    async fn session_of(&mut self, id: &InteractionId) -> TxResult<Option<SessionId>> {
        let stmt = self
            .tx
            .prepare_cached("SELECT session FROM interactions WHERE id = $1")
            .await?;
        match self.tx.query_opt(&stmt, &[&id.as_str()]).await? {
            Some(row) => Ok(Some(
                SessionId::parse(row.try_get::<_, &str>(0)?)
                    .map_err(|e| StoreError::Internal(e.to_string()))?,
            )),
            None => Ok(None),
        }
    }

    /// Locks the session's row and reads what the rules look at.
    async fn load(&mut self, id: &SessionId, op: &Operation) -> TxResult<Snapshot> {
        let mut snapshot = Snapshot::absent(id.clone(), self.now);
        let sid = id.as_str();
        let stmt = self
            .tx
            .prepare_cached(
                "SELECT agent, context, epoch, last_seq, created_at FROM sessions \
                 WHERE id = $1 FOR UPDATE",
            )
            .await?;
        if let Some(row) = self.tx.query_opt(&stmt, &[&sid]).await? {
            snapshot.session = Some(SessionRow {
                agent: row.try_get(0)?,
                context: Err(row.try_get(1)?),
                epoch: row.try_get(2)?,
                last_seq: row.try_get(3)?,
                created_at: Millis(row.try_get(4)?),
            });
        } else {
            if op.creates() {
                let stmt = self
                    .tx
                    .prepare_cached("SELECT last_seq FROM retired_sessions WHERE id = $1")
                    .await?;
                if let Some(row) = self.tx.query_opt(&stmt, &[&sid]).await? {
                    snapshot.retired_seq = row.try_get(0)?;
                }
            }
            return Ok(snapshot);
        }
        let stmt = self
            .tx
            .prepare_cached(concat!(
                "SELECT ",
                interaction_columns!(),
                " FROM interactions WHERE session = $1 AND status IN ('running', 'queued') \
                 ORDER BY id"
            ))
            .await?;
        for row in self.tx.query(&stmt, &[&sid]).await? {
            let interaction = read_interaction(&row, 0)?;
            if interaction.status == Status::Running {
                snapshot.running = Some(interaction);
            } else {
                snapshot.queued.push(interaction);
            }
        }
        if let Some(key) = op.idempotency_key() {
            let stmt = self
                .tx
                .prepare_cached(concat!(
                    "SELECT ",
                    interaction_columns!(),
                    " FROM interactions WHERE session = $1 AND idempotency_key = $2"
                ))
                .await?;
            if let Some(row) = self.tx.query_opt(&stmt, &[&sid, &key]).await? {
                snapshot.keyed = Some(read_interaction(&row, 0)?);
            }
        }
        if let Some(named) = op.named() {
            snapshot.named = select_interaction(self.tx, named).await?;
        }
        Ok(snapshot)
    }

    /// A fresh id greater than the session's newest, and a time not before its creation:
    /// ids and times follow the order of acceptance within the session, whichever node
    /// accepts (the row lock orders the acceptances).
    async fn fresh_id(&mut self, session: &SessionId) -> TxResult<(InteractionId, Millis)> {
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
                Ok((ids.next_after(&last_id), self.now.max(last_at)))
            }
            None => Ok((ids.next_id(), self.now)),
        }
    }

    async fn apply(&mut self, plan: Plan) -> TxResult<Outcome> {
        let sid = plan.session.as_str();
        let now = plan.now.0;
        let me = self.store.node();
        for write in &plan.writes {
            match write {
                Write::CreateSession {
                    agent,
                    context,
                    last_seq,
                } => {
                    self.execute("DELETE FROM retired_sessions WHERE id = $1", &[&sid])
                        .await?;
                    let inserted = self
                        .execute(
                            "INSERT INTO sessions (id, agent, context, epoch, last_seq, \
                             created_at) VALUES ($1, $2, $3, 0, $4, $5) \
                             ON CONFLICT (id) DO NOTHING",
                            &[
                                &sid,
                                agent,
                                &serde_json::to_string(context)?,
                                last_seq,
                                &now,
                            ],
                        )
                        .await?;
                    if inserted == 0 {
                        // Another transaction created it first (we waited for its commit):
                        // this one decided on a snapshot without it.
                        return Err(TxError::Retry);
                    }
                }
                Write::SetAgent(agent) => {
                    self.execute(
                        "UPDATE sessions SET agent = $2 WHERE id = $1",
                        &[&sid, agent],
                    )
                    .await?;
                }
                Write::SetContext(context) => {
                    let text = serde_json::to_string(context)?;
                    self.execute(
                        "UPDATE sessions SET context = $2 WHERE id = $1",
                        &[&sid, &text],
                    )
                    .await?;
                }
                Write::Clear { epoch } => {
                    self.execute("DELETE FROM interactions WHERE session = $1", &[&sid])
                        .await?;
                    self.execute(
                        "UPDATE sessions SET context = '{}', epoch = $2 WHERE id = $1",
                        &[&sid, epoch],
                    )
                    .await?;
                }
                Write::Delete { last_seq } => {
                    for sql in [
                        "DELETE FROM events WHERE session = $1",
                        "DELETE FROM interactions WHERE session = $1",
                        "DELETE FROM sessions WHERE id = $1",
                    ] {
                        self.execute(sql, &[&sid]).await?;
                    }
                    self.execute(
                        "INSERT INTO retired_sessions (id, last_seq) VALUES ($1, $2) \
                         ON CONFLICT (id) DO UPDATE SET last_seq = EXCLUDED.last_seq",
                        &[&sid, last_seq],
                    )
                    .await?;
                }
                Write::ForgetKey(id) => {
                    self.execute(
                        "UPDATE interactions SET idempotency_key = NULL WHERE id = $1",
                        &[&id.as_str()],
                    )
                    .await?;
                }
                Write::Insert {
                    interaction: i,
                    epoch,
                    idempotency_key,
                } => {
                    let node: Option<&str> = (i.status == Status::Running).then_some(&*me);
                    self.execute(
                        "INSERT INTO interactions (id, session, epoch, content, metadata, \
                         status, idempotency_key, created_at, started_at, node) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                        &[
                            &i.id.as_str(),
                            &sid,
                            epoch,
                            &i.content,
                            &serde_json::to_string(&i.metadata)?,
                            &i.status.as_str(),
                            idempotency_key,
                            &i.created_at.0,
                            &i.started_at.map(|m| m.0),
                            &node,
                        ],
                    )
                    .await?;
                }
                Write::AppendResponse { id, text } => {
                    self.execute(
                        "UPDATE interactions SET response = response || $2 WHERE id = $1",
                        &[&id.as_str(), text],
                    )
                    .await?;
                }
                Write::Finalize(i) => {
                    self.execute(
                        "UPDATE interactions SET status = $2, response = $3, error_code = $4, \
                         error_message = $5, cancel_reason = $6, finished_at = $7 WHERE id = $1",
                        &[
                            &i.id.as_str(),
                            &i.status.as_str(),
                            &i.response,
                            &i.error.as_ref().map(|e| e.code.as_str()),
                            &i.error.as_ref().map(|e| e.message.as_str()),
                            &i.cancel_reason.map(|r| r.as_str()),
                            &i.finished_at.map(|m| m.0),
                        ],
                    )
                    .await?;
                }
                Write::Start(i) => {
                    self.execute(
                        "UPDATE interactions SET status = 'running', started_at = $2, node = $3 \
                         WHERE id = $1",
                        &[&i.id.as_str(), &i.started_at.map(|m| m.0), &&*me],
                    )
                    .await?;
                }
            }
        }
        if let Some(seq) = plan.save_seq {
            self.execute(
                "UPDATE sessions SET last_seq = $2 WHERE id = $1",
                &[&sid, &seq],
            )
            .await?;
        }
        let store = !plan.deletes_session();
        self.events
            .extend(plan.events.into_iter().map(|e| (e, plan.now, store)));
        self.stopped.extend(plan.stopped);
        Ok(plan.outcome)
    }

    async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> TxResult<u64> {
        let stmt = self.tx.prepare_cached(sql).await?;
        Ok(self.tx.execute(&stmt, params).await?)
    }
}
