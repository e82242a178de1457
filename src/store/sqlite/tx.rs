//! One write job's view of the batch transaction: loads a session's snapshot, lets the rules
//! decide, applies the plan.

use rusqlite::{Connection, OptionalExtension, params};

use super::cache::SessionCache;
use super::read::{decoded, read_interaction, select_interaction};
use crate::bus::Bus;
use crate::model::{Event, EventType, IdGenerator, InteractionId, Millis, SessionId};
use crate::session::Needs;
use crate::session::{Effects, Limits, Op, Plan, SessionRow, Snapshot, Write};
use crate::store::backend::{self, Backend, Committed};
use crate::store::{StoreError, StoreResult};

/// The write side of one job: the connection inside the batch's transaction, the id
/// generator and the events the job caused.
pub(super) struct Tx<'c> {
    pub(super) conn: &'c Connection,
    pub(super) ids: &'c mut IdGenerator,
    pub(super) cache: &'c mut SessionCache,
    pub(super) now: Millis,
    pub(super) events: Vec<Event>,
    /// Whether this job has written anything: if it then fails, its batch is undone.
    pub(super) wrote: bool,
    /// The bounds of the session rules.
    pub(super) limits: Limits,
    pub(super) bus: &'c std::sync::Arc<Bus>,
}

// Nothing here waits: each future is ready when first polled ([`backend::ready`]).
impl Backend for Tx<'_> {
    type Error = StoreError;

    fn bus(&self) -> &std::sync::Arc<Bus> {
        self.bus
    }

    async fn session_of(&mut self, task: &InteractionId) -> StoreResult<Option<SessionId>> {
        match self.cache.session_running(task) {
            Some(session) => Ok(Some(session.clone())),
            None => self.stored_session_of(task),
        }
    }

    async fn load(&mut self, session: &SessionId, needs: Needs<'_>) -> StoreResult<Snapshot> {
        let mut snapshot = match self.cache.get(session) {
            Some(state) => Snapshot::of(session.clone(), self.now, state.clone()),
            None => self.load_row(session, &needs)?,
        };
        snapshot.limits = self.limits;
        if snapshot.counts_tenant(&needs) {
            // The single writer serialises every creation: the count is exact.
            let count: i64 = self
                .conn
                .prepare_cached("SELECT count(*) FROM sessions WHERE tenant = ?1")?
                .query_row([session.tenant()], |r| r.get(0))?;
            snapshot.tenant_sessions = Some(count.max(0) as u64);
        }
        self.load_named(&mut snapshot, &needs)?;
        if needs.inserts {
            snapshot.fresh_id = Some(self.ids.next_id());
        }
        Ok(snapshot)
    }

    async fn apply<T>(&mut self, mut plan: Plan<T>) -> StoreResult<(T, Effects)> {
        let after = plan.after.take();
        self.wrote = true;
        self.write_plan(&plan)?;
        self.cache.put(&plan.session, after);
        self.events.extend(plan.events);
        Ok((plan.outcome, plan.effects))
    }
}

impl Tx<'_> {
    /// The connection, for a job that writes with its own SQL rather than the rules.
    pub(super) fn raw(&mut self) -> &Connection {
        self.wrote = true;
        self.conn
    }

    /// Runs `op` on `session` (or, for a task's operation, on its interaction's session).
    pub(super) fn run<O: Op>(
        &mut self,
        session: Option<&SessionId>,
        op: O,
    ) -> StoreResult<Committed<O::Outcome>> {
        backend::ready(backend::run(self, session, op))
    }

    fn stored_session_of(&self, id: &InteractionId) -> StoreResult<Option<SessionId>> {
        let session: Option<String> = self
            .conn
            .prepare_cached("SELECT session FROM interactions WHERE id = ?1")?
            .query_row([id.as_str()], |r| r.get(0))
            .optional()?;
        session
            .map(|s| SessionId::from_key(&s).map_err(|e| StoreError::Internal(e.to_string())))
            .transpose()
    }

    fn load_row(&self, id: &SessionId, needs: &Needs<'_>) -> StoreResult<Snapshot> {
        let mut snapshot = Snapshot::absent(id.clone(), self.now);
        let sid = id.key();
        snapshot.session = self
            .conn
            .prepare_cached(
                "SELECT agent, context, epoch, last_seq, created_at FROM sessions WHERE id = ?1",
            )?
            .query_row([sid], |r| {
                Ok(SessionRow {
                    agent: r.get(0)?,
                    context: Err(r.get(1)?),
                    epoch: r.get(2)?,
                    last_seq: r.get(3)?,
                    created_at: Millis(r.get(4)?),
                })
            })
            .optional()?;
        if snapshot.session.is_none() {
            if needs.creates {
                snapshot.retired_seq = self
                    .conn
                    .prepare_cached("SELECT last_seq FROM retired_sessions WHERE id = ?1")?
                    .query_row([sid], |r| r.get(0))
                    .optional()?
                    .unwrap_or(0);
            }
            return Ok(snapshot);
        }
        snapshot.running = self
            .conn
            .prepare_cached(concat!(
                "SELECT ",
                interaction_columns!(),
                " FROM interactions WHERE session = ?1 AND status IN ",
                status_sql!(active)
            ))?
            .query_row([sid], |r| read_interaction(r, 0))
            .optional()?
            .transpose()?;
        let mut statement = self.conn.prepare_cached(concat!(
            "SELECT ",
            interaction_columns!(),
            " FROM interactions WHERE session = ?1 AND status IN ",
            status_sql!(queued),
            " ORDER BY id"
        ))?;
        let queued = statement.query_map([sid], |r| read_interaction(r, 0))?;
        snapshot.queued = decoded(queued)?;
        Ok(snapshot)
    }

    /// What the operation names besides the session: the holder of its idempotency key, a
    /// cancel's target.
    fn load_named(&self, snapshot: &mut Snapshot, needs: &Needs<'_>) -> StoreResult<()> {
        if snapshot.session.is_none() {
            return Ok(());
        }
        let sid = snapshot.id.key();
        if let Some(key) = needs.key {
            snapshot.keyed = self
                .conn
                .prepare_cached(concat!(
                    "SELECT ",
                    interaction_columns!(),
                    " FROM interactions WHERE session = ?1 AND idempotency_key = ?2"
                ))?
                .query_row(params![sid, key], |r| read_interaction(r, 0))
                .optional()?
                .transpose()?;
        }
        if let Some(named) = needs.named {
            snapshot.named = select_interaction(self.conn, named)?;
        }
        Ok(())
    }

    fn write_plan<T>(&mut self, plan: &Plan<T>) -> StoreResult<()> {
        let sid = plan.session.key();
        let now = plan.now.0;
        for write in &plan.writes {
            match write {
                Write::CreateSession {
                    agent,
                    context,
                    last_seq,
                } => {
                    self.execute("DELETE FROM retired_sessions WHERE id = ?1", params![sid])?;
                    self.execute(
                        "INSERT INTO sessions \
                         (id, tenant, agent, context, epoch, last_seq, created_at) \
                         VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6)",
                        params![
                            sid,
                            plan.session.tenant(),
                            agent,
                            serde_json::to_string(context)?,
                            last_seq,
                            now
                        ],
                    )?;
                }
                Write::SetAgent(agent) => {
                    self.execute(
                        "UPDATE sessions SET agent = ?2 WHERE id = ?1",
                        params![sid, agent],
                    )?;
                }
                Write::SetContext(context) => {
                    self.execute(
                        "UPDATE sessions SET context = ?2 WHERE id = ?1",
                        params![sid, serde_json::to_string(context)?],
                    )?;
                }
                Write::Clear { epoch } => {
                    self.execute("DELETE FROM interactions WHERE session = ?1", params![sid])?;
                    self.execute(
                        "UPDATE sessions SET context = '{}', epoch = ?2 WHERE id = ?1",
                        params![sid, epoch],
                    )?;
                }
                Write::Delete { last_seq } => {
                    self.execute("DELETE FROM events WHERE session = ?1", params![sid])?;
                    self.execute("DELETE FROM interactions WHERE session = ?1", params![sid])?;
                    self.execute("DELETE FROM sessions WHERE id = ?1", params![sid])?;
                    self.execute(
                        "INSERT OR REPLACE INTO retired_sessions (id, last_seq) VALUES (?1, ?2)",
                        params![sid, last_seq],
                    )?;
                }
                Write::ForgetKey(id) => {
                    self.execute(
                        "UPDATE interactions SET idempotency_key = NULL WHERE id = ?1",
                        params![id.as_str()],
                    )?;
                }
                Write::Insert {
                    interaction: i,
                    epoch,
                    idempotency_key,
                } => {
                    self.execute(
                        "INSERT INTO interactions (id, session, epoch, content, metadata, \
                         status, idempotency_key, created_at, started_at) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                        params![
                            i.id.as_str(),
                            sid,
                            epoch,
                            i.content,
                            serde_json::to_string(&i.metadata)?,
                            i.status.as_str(),
                            idempotency_key,
                            i.created_at.0,
                            i.started_at.map(|m| m.0),
                        ],
                    )?;
                }
                Write::AppendResponse { id, text } => {
                    self.execute(
                        "UPDATE interactions SET response = response || ?2 WHERE id = ?1",
                        params![id.as_str(), text],
                    )?;
                }
                Write::Finalize(i) => {
                    self.execute(
                        "UPDATE interactions SET status = ?2, response = ?3, error_code = ?4, \
                         error_message = ?5, cancel_reason = ?6, finished_at = ?7, \
                         request = NULL, input_deadline = NULL WHERE id = ?1",
                        params![
                            i.id.as_str(),
                            i.status.as_str(),
                            i.response,
                            i.error.as_ref().map(|e| &e.code),
                            i.error.as_ref().map(|e| &e.message),
                            i.cancel_reason.map(|r| r.as_str()),
                            i.finished_at.map(|m| m.0),
                        ],
                    )?;
                }
                Write::Start(i) => {
                    self.execute(
                        "UPDATE interactions SET status = 'running', started_at = ?2 \
                         WHERE id = ?1",
                        params![i.id.as_str(), i.started_at.map(|m| m.0)],
                    )?;
                }
                Write::Wait(i) => {
                    self.execute(
                        "UPDATE interactions SET status = 'waiting', response = ?2, \
                         request = ?3, input_deadline = ?4 WHERE id = ?1",
                        params![
                            i.id.as_str(),
                            i.response,
                            serde_json::to_string(&i.request)?,
                            i.input_deadline.map(|m| m.0),
                        ],
                    )?;
                }
                Write::Resume(i) => {
                    self.execute(
                        "UPDATE interactions SET status = 'running', request = NULL, \
                         answers = ?2, input_deadline = NULL WHERE id = ?1",
                        params![i.id.as_str(), serde_json::to_string(&i.answers)?],
                    )?;
                }
            }
        }
        if !plan.deletes_session() {
            let mut insert = self.conn.prepare_cached(
                "INSERT INTO events (session, seq, last_seq, type, interaction_id, envelope, at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for run in delta_runs(&plan.events) {
                let first = &run[0];
                let (last_seq, envelope) = match run {
                    [_] => (None, std::borrow::Cow::Borrowed(&*first.envelope)),
                    _ => {
                        let joined = run.iter().map(|e| &*e.envelope).collect::<Vec<_>>();
                        (run.last().map(|e| e.seq), joined.join("\n").into())
                    }
                };
                insert.execute(params![
                    sid,
                    first.seq,
                    last_seq,
                    first.kind.as_str(),
                    first.interaction_id.as_ref().map(InteractionId::as_str),
                    &*envelope,
                    now,
                ])?;
            }
        }
        if let Some(seq) = plan.save_seq {
            self.execute(
                "UPDATE sessions SET last_seq = ?2 WHERE id = ?1",
                params![sid, seq],
            )?;
        }
        Ok(())
    }

    fn execute(&self, sql: &str, params: impl rusqlite::Params) -> StoreResult<usize> {
        Ok(self.conn.prepare_cached(sql)?.execute(params)?)
    }
}

/// The plan's events as stored rows: each run of consecutive `task.delta`s of one interaction
/// is one row; every other event is a row of its own.
fn delta_runs(events: &[Event]) -> impl Iterator<Item = &[Event]> {
    events.chunk_by(|a, b| {
        a.kind == EventType::TaskDelta
            && b.kind == EventType::TaskDelta
            && a.interaction_id == b.interaction_id
    })
}
