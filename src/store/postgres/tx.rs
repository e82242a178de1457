//! One transaction's view: locks a session's row and loads its snapshot, lets the rules
//! decide, applies the plan. Events are inserted at commit, in one statement.

use deadpool_postgres::Transaction;
use tokio_postgres::types::ToSql;

use super::rows::read_interaction;
use super::{PgStore, TxError, TxResult};
use crate::bus::Bus;
use crate::model::{Event, InteractionId, Millis, SessionId, Status};
use crate::session::Needs;
use crate::session::{Effects, Op, Plan, SessionRow, Snapshot, Write};
use crate::store::StoreError;
use crate::store::backend::{self, Backend, Committed};

/// The write side of one transaction.
pub(super) struct PgTx<'t, 'c, 's> {
    pub(super) tx: &'t Transaction<'c>,
    store: &'s PgStore,
    now: Millis,
    /// The events stored by this transaction, published once it commits.
    events: Vec<Event>,
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

    pub(super) fn into_parts(self) -> (Vec<Event>, Vec<InteractionId>) {
        (self.events, self.stopped)
    }

    /// Runs `op` on `session` (or, for a task's operation, on its interaction's session).
    pub(super) async fn run<O: Op>(
        &mut self,
        session: Option<&SessionId>,
        op: O,
    ) -> TxResult<Committed<O::Outcome>> {
        backend::run(self, session, op).await
    }

    /// Locks the session's row for this transaction; `false` if there is none.
    pub(super) async fn lock(&mut self, id: &SessionId) -> TxResult<bool> {
        let stmt = self
            .tx
            .prepare_cached("SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE")
            .await?;
        Ok(self.tx.query_opt(&stmt, &[&id.key()]).await?.is_some())
    }

    async fn stored_session_of(&mut self, id: &InteractionId) -> TxResult<Option<SessionId>> {
        let stmt = self
            .tx
            .prepare_cached("SELECT session FROM interactions WHERE id = $1")
            .await?;
        match self.tx.query_opt(&stmt, &[&id.as_str()]).await? {
            Some(row) => Ok(Some(
                SessionId::from_key(row.try_get::<_, &str>(0)?)
                    .map_err(|e| StoreError::Internal(e.to_string()))?,
            )),
            None => Ok(None),
        }
    }

    /// Locks the session's row and reads what the rules look at.
    async fn load_locked(&mut self, id: &SessionId, needs: Needs<'_>) -> TxResult<Snapshot> {
        let mut snapshot = Snapshot::absent(id.clone(), self.now);
        snapshot.limits = self.store.limits;
        let sid = id.key();
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
            if needs.creates {
                let stmt = self
                    .tx
                    .prepare_cached("SELECT last_seq FROM retired_sessions WHERE id = $1")
                    .await?;
                if let Some(row) = self.tx.query_opt(&stmt, &[&sid]).await? {
                    snapshot.retired_seq = row.try_get(0)?;
                }
            }
            if snapshot.counts_tenant(&needs) {
                // Creations of one tenant queue behind this lock until commit, so the count
                // (read once it is held) sees each one before it: the bound is exact across
                // nodes.
                let lock = self
                    .tx
                    .prepare_cached("SELECT pg_advisory_xact_lock(hashtextextended($1, 7420))")
                    .await?;
                self.tx.execute(&lock, &[&id.tenant()]).await?;
                let count = self
                    .tx
                    .prepare_cached("SELECT count(*) FROM sessions WHERE tenant = $1")
                    .await?;
                let count: i64 = self
                    .tx
                    .query_one(&count, &[&id.tenant()])
                    .await?
                    .try_get(0)?;
                snapshot.tenant_sessions = Some(count.max(0) as u64);
            }
            if needs.inserts {
                snapshot.fresh_id = Some(self.fresh_id(None)?.0);
            }
            return Ok(snapshot);
        }
        // Every read below is sent at once (pipelined): one round trip. Each takes its own
        // snapshot after the lock above was granted, so it sees every commit before ours.
        let active = self
            .tx
            .prepare_cached(concat!(
                "SELECT ",
                interaction_columns!(),
                " FROM interactions WHERE session = $1 AND status IN ",
                status_sql!(open),
                " ORDER BY id"
            ))
            .await?;
        let keyed = self
            .tx
            .prepare_cached(concat!(
                "SELECT ",
                interaction_columns!(),
                " FROM interactions WHERE session = $1 AND idempotency_key = $2"
            ))
            .await?;
        let named = self
            .tx
            .prepare_cached(concat!(
                "SELECT ",
                interaction_columns!(),
                " FROM interactions WHERE id = $1"
            ))
            .await?;
        let newest = self
            .tx
            .prepare_cached(
                "SELECT id, created_at FROM interactions WHERE session = $1 \
                 ORDER BY id DESC LIMIT 1",
            )
            .await?;
        let key = needs.key;
        let named_id = needs.named.map(InteractionId::as_str);
        let tx = self.tx;
        let active_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&sid];
        let (active, keyed, named, newest) = tokio::try_join!(
            tx.query(&active, &active_params),
            async {
                match key {
                    Some(key) => tx.query_opt(&keyed, &[&sid, &key]).await,
                    None => Ok(None),
                }
            },
            async {
                match named_id {
                    Some(id) => tx.query_opt(&named, &[&id]).await,
                    None => Ok(None),
                }
            },
            async {
                match needs.inserts {
                    true => tx.query_opt(&newest, &[&sid]).await,
                    false => Ok(None),
                }
            },
        )?;
        for row in active {
            let interaction = read_interaction(&row, 0)?;
            if interaction.status.is_active() {
                snapshot.running = Some(interaction);
            } else {
                snapshot.queued.push(interaction);
            }
        }
        snapshot.keyed = keyed.map(|row| read_interaction(&row, 0)).transpose()?;
        snapshot.named = named.map(|row| read_interaction(&row, 0)).transpose()?;
        if needs.inserts {
            let newest = match newest {
                Some(row) => Some((
                    InteractionId::from_stored(row.try_get(0)?),
                    Millis(row.try_get(1)?),
                )),
                None => None,
            };
            let (id, now) = self.fresh_id(newest)?;
            snapshot.fresh_id = Some(id);
            snapshot.now = now;
        }
        Ok(snapshot)
    }

    /// A fresh id greater than the session's newest, and a time not before its creation:
    /// ids and times follow the order of acceptance within the session, whichever node
    /// accepts (the row lock orders the acceptances).
    fn fresh_id(
        &self,
        newest: Option<(InteractionId, Millis)>,
    ) -> TxResult<(InteractionId, Millis)> {
        let mut ids = self
            .store
            .ids
            .lock()
            .map_err(|_| StoreError::Internal("id generator poisoned".into()))?;
        match newest {
            Some((last_id, last_at)) => Ok((ids.next_after(&last_id), self.now.max(last_at))),
            None => Ok((ids.next_id(), self.now)),
        }
    }

    /// Applies the plan: every statement is sent at once (pipelined; PostgreSQL runs them in
    /// order), the events included.
    async fn apply_plan<T>(&mut self, plan: Plan<T>) -> TxResult<(T, Effects)> {
        let sid = || Box::new(plan.session.key().to_string()) as Param;
        let now = plan.now.0;
        let me = self.store.node().to_string();
        let mut batch: Vec<(&'static str, Vec<Param>)> = Vec::with_capacity(plan.writes.len() + 2);
        // The statement whose count says whether the session was created here.
        let mut creation = None;
        for write in &plan.writes {
            match write {
                Write::CreateSession {
                    agent,
                    context,
                    last_seq,
                } => {
                    batch.push(("DELETE FROM retired_sessions WHERE id = $1", vec![sid()]));
                    creation = Some(batch.len());
                    batch.push((
                        "INSERT INTO sessions \
                         (id, tenant, agent, context, epoch, last_seq, created_at) \
                         VALUES ($1, $2, $3, $4, 0, $5, $6) ON CONFLICT (id) DO NOTHING",
                        vec![
                            sid(),
                            param(plan.session.tenant().to_string()),
                            param(agent.clone()),
                            param(serde_json::to_string(context)?),
                            param(*last_seq),
                            param(now),
                        ],
                    ));
                }
                Write::SetAgent(agent) => batch.push((
                    "UPDATE sessions SET agent = $2 WHERE id = $1",
                    vec![sid(), param(agent.clone())],
                )),
                Write::SetContext(context) => batch.push((
                    "UPDATE sessions SET context = $2 WHERE id = $1",
                    vec![sid(), param(serde_json::to_string(context)?)],
                )),
                Write::Clear { epoch } => {
                    batch.push(("DELETE FROM interactions WHERE session = $1", vec![sid()]));
                    batch.push((
                        "UPDATE sessions SET context = '{}', epoch = $2 WHERE id = $1",
                        vec![sid(), param(*epoch)],
                    ));
                }
                Write::Delete { last_seq } => {
                    for sql in [
                        "DELETE FROM events WHERE session = $1",
                        "DELETE FROM interactions WHERE session = $1",
                        "DELETE FROM sessions WHERE id = $1",
                    ] {
                        batch.push((sql, vec![sid()]));
                    }
                    batch.push((
                        "INSERT INTO retired_sessions (id, last_seq) VALUES ($1, $2) \
                         ON CONFLICT (id) DO UPDATE SET last_seq = EXCLUDED.last_seq",
                        vec![sid(), param(*last_seq)],
                    ));
                }
                Write::ForgetKey(id) => batch.push((
                    "UPDATE interactions SET idempotency_key = NULL WHERE id = $1",
                    vec![param(id.to_string())],
                )),
                Write::Insert {
                    interaction: i,
                    epoch,
                    idempotency_key,
                } => {
                    let node = (i.status == Status::Running).then(|| me.clone());
                    batch.push((
                        "INSERT INTO interactions (id, session, epoch, content, metadata, \
                         status, idempotency_key, created_at, started_at, node) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                        vec![
                            param(i.id.to_string()),
                            sid(),
                            param(*epoch),
                            param(i.content.clone()),
                            param(serde_json::to_string(&i.metadata)?),
                            param(i.status.as_str()),
                            param(idempotency_key.clone()),
                            param(i.created_at.0),
                            param(i.started_at.map(|m| m.0)),
                            param(node),
                        ],
                    ));
                }
                Write::AppendResponse { id, text } => batch.push((
                    "UPDATE interactions SET response = response || $2 WHERE id = $1",
                    vec![param(id.to_string()), param(text.clone())],
                )),
                Write::Finalize(i) => batch.push((
                    "UPDATE interactions SET status = $2, response = $3, error_code = $4, \
                     error_message = $5, cancel_reason = $6, finished_at = $7, \
                     request = NULL, input_deadline = NULL WHERE id = $1",
                    vec![
                        param(i.id.to_string()),
                        param(i.status.as_str()),
                        param(i.response.clone()),
                        param(i.error.as_ref().map(|e| e.code.clone())),
                        param(i.error.as_ref().map(|e| e.message.clone())),
                        param(i.cancel_reason.map(|r| r.as_str())),
                        param(i.finished_at.map(|m| m.0)),
                    ],
                )),
                Write::Start(i) => batch.push((
                    "UPDATE interactions SET status = 'running', started_at = $2, node = $3 \
                     WHERE id = $1",
                    vec![
                        param(i.id.to_string()),
                        param(i.started_at.map(|m| m.0)),
                        param(me.clone()),
                    ],
                )),
                // Waiting runs nowhere: no node holds it, so no node's loss touches it.
                Write::Wait(i) => batch.push((
                    "UPDATE interactions SET status = 'waiting', response = $2, request = $3, \
                     input_deadline = $4, node = NULL WHERE id = $1",
                    vec![
                        param(i.id.to_string()),
                        param(i.response.clone()),
                        param(serde_json::to_string(&i.request)?),
                        param(i.input_deadline.map(|m| m.0)),
                    ],
                )),
                Write::Resume(i) => batch.push((
                    "UPDATE interactions SET status = 'running', request = NULL, answers = $2, \
                     input_deadline = NULL, node = $3 WHERE id = $1",
                    vec![
                        param(i.id.to_string()),
                        param(serde_json::to_string(&i.answers)?),
                        param(me.clone()),
                    ],
                )),
            }
        }
        if let Some(seq) = plan.save_seq {
            batch.push((
                "UPDATE sessions SET last_seq = $2 WHERE id = $1",
                vec![sid(), param(seq)],
            ));
        }
        let store = !plan.deletes_session();
        if store && !plan.events.is_empty() {
            let events = &plan.events;
            batch.push((
                "INSERT INTO events (session, seq, type, interaction_id, envelope, at) \
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], \
                 $5::text[], $6::bigint[])",
                vec![
                    param(vec![plan.session.key().to_string(); events.len()]),
                    param(events.iter().map(|e| e.seq).collect::<Vec<i64>>()),
                    param(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>()),
                    param(
                        events
                            .iter()
                            .map(|e| e.interaction_id.as_ref().map(|i| i.to_string()))
                            .collect::<Vec<_>>(),
                    ),
                    param(
                        events
                            .iter()
                            .map(|e| e.envelope.to_string())
                            .collect::<Vec<_>>(),
                    ),
                    param(vec![now; events.len()]),
                ],
            ));
        }
        let mut statements = Vec::with_capacity(batch.len());
        for (sql, _) in &batch {
            statements.push(self.tx.prepare_cached(sql).await?);
        }
        let params: Vec<Vec<&(dyn ToSql + Sync)>> = batch
            .iter()
            .map(|(_, ps)| ps.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect())
            .collect();
        let tx = self.tx;
        let send = |range: std::ops::Range<usize>| {
            futures_util::future::try_join_all(
                statements[range.clone()]
                    .iter()
                    .zip(&params[range])
                    .map(|(statement, params)| tx.execute(statement, params)),
            )
        };
        // A session created here is created first, alone: if another transaction created it
        // meanwhile (we waited for its commit), this one decided on a snapshot without it, and
        // nothing else of its plan may run.
        let rest = match creation {
            Some(at) => {
                let counts = send(0..at + 1).await?;
                if counts[at] == 0 {
                    return Err(TxError::Retry);
                }
                at + 1
            }
            None => 0,
        };
        send(rest..batch.len()).await?;
        for write in &plan.writes {
            match write {
                Write::Insert { interaction, .. } if interaction.status == Status::Running => {
                    self.store.task_started(&interaction.id, &plan.session);
                }
                Write::Start(i) | Write::Resume(i) => self.store.task_started(&i.id, &plan.session),
                Write::Finalize(i) => self.store.task_ended(&i.id),
                _ => {}
            }
        }
        self.events.extend(plan.events);
        self.stopped.extend(plan.effects.stop.iter().cloned());
        Ok((plan.outcome, plan.effects))
    }
}

impl Backend for PgTx<'_, '_, '_> {
    type Error = TxError;

    fn bus(&self) -> &std::sync::Arc<Bus> {
        &self.store.bus
    }

    async fn session_of(&mut self, task: &InteractionId) -> TxResult<Option<SessionId>> {
        match self.store.task_session(task) {
            Some(session) => Ok(Some(session)),
            None => self.stored_session_of(task).await,
        }
    }

    async fn load(&mut self, session: &SessionId, needs: Needs<'_>) -> TxResult<Snapshot> {
        self.load_locked(session, needs).await
    }

    async fn apply<T>(&mut self, plan: Plan<T>) -> TxResult<(T, Effects)> {
        self.apply_plan(plan).await
    }

    fn fenced(&mut self, task: &InteractionId) {
        // Ended (maybe by another node): its writes stop here.
        self.store.task_ended(task);
    }
}

/// An owned statement parameter, so a whole plan can be sent at once.
type Param = Box<dyn ToSql + Sync + Send>;

fn param(value: impl ToSql + Sync + Send + 'static) -> Param {
    Box::new(value)
}
