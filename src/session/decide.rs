//! The rules: what each operation does to the session in a snapshot, or why it is refused.

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use super::plan::{Effects, Plan, SessionRow, SessionState, Snapshot, Write};
use super::value::{
    Accepted, CancelTarget, Cleared, IDEMPOTENCY_TTL_MS, NewMessage, StartedTask, TaskEnd,
    TaskOutput,
};
use super::{StoreError, StoreResult};
use crate::model::{
    CancelReason, ErrorInfo, Event, EventType, Exchange, Interaction, InteractionId, JsonObject,
    Millis, PendingRequest, Policy, Session, Status, merge_patch,
};

/// Whether a message's content is the `/clear` command: sending it clears the session
/// instead of accepting a message (and its `wait` and idempotency key are ignored).
pub fn is_clear(content: &str) -> bool {
    content.trim() == "/clear"
}

/// Works on a snapshot, recording what changes (each [`Op`](super::Op) calls its rule here).
#[doc(hidden)]
pub struct Decider {
    s: Snapshot,
    /// The stored `last_seq`, to know whether it must be saved.
    saved_seq: i64,
    writes: Vec<Write>,
    events: Vec<Event>,
    effects: Effects,
}

impl Decider {
    pub(super) fn new(s: Snapshot) -> Self {
        let saved_seq = s.session.as_ref().map_or(s.retired_seq, |r| r.last_seq);
        Self {
            s,
            saved_seq,
            writes: Vec::new(),
            events: Vec::new(),
            effects: Effects::default(),
        }
    }

    pub(super) fn done<T>(mut self, outcome: T) -> Plan<T> {
        // The started task's session as this plan leaves it: its agent's request reads it
        // from here instead of from the store.
        if !self.effects.start.is_empty() {
            let view = self.view().ok();
            // At most one start per plan (asserted below): the view moves, no copy.
            if let Some(task) = self.effects.start.last_mut() {
                task.session = view;
            }
        }
        let last_seq = self.s.session.as_ref().map(|r| r.last_seq);
        let mut save_seq = last_seq.filter(|seq| *seq != self.saved_seq);
        if let Some(Write::CreateSession { last_seq, .. }) = self.writes.first_mut()
            && let Some(seq) = save_seq.take()
        {
            // Inserted with its final seq: no second write of the row.
            *last_seq = seq;
        }
        let after = self.s.session.map(|row| SessionState {
            row,
            running: self.s.running,
            queued: self.s.queued,
        });
        // `Committed::started` reads the one start of a plan: I1 leaves room for no other.
        debug_assert!(
            self.effects.start.len() <= 1,
            "a plan starts at most one task (I1)"
        );
        Plan {
            session: self.s.id,
            now: self.s.now,
            writes: self.writes,
            events: self.events,
            save_seq,
            effects: self.effects,
            outcome,
            after,
        }
    }

    fn row(&mut self) -> StoreResult<&mut SessionRow> {
        self.s.session.as_mut().ok_or(StoreError::SessionNotFound)
    }

    /// Creates the session if absent (with `session.created`); returns whether it did.
    fn session_or_create(&mut self, agent: String, context: JsonObject) -> StoreResult<bool> {
        if self.s.session.is_some() {
            return Ok(false);
        }
        if let Some(limit) = self.s.limits.max_sessions_per_tenant
            && self.s.tenant_sessions.unwrap_or(0) >= limit
        {
            return Err(StoreError::TenantLimit { limit });
        }
        self.check_context_size(&context, None)?;
        let last_seq = self.s.retired_seq;
        let now = self.s.now;
        self.writes.push(Write::CreateSession {
            agent: agent.clone(),
            context: context.clone(),
            last_seq,
        });
        let session = Session {
            id: self.s.id.clone(),
            agent: agent.clone(),
            context: context.clone(),
            epoch: 0,
            last_seq: last_seq + 1,
            created_at: now,
            running: None,
            queued: 0,
        };
        self.s.session = Some(SessionRow {
            agent,
            context: Ok(context),
            epoch: 0,
            last_seq,
            created_at: now,
        });
        self.emit(
            EventType::SessionCreated,
            None,
            &SessionData { session: &session },
            None,
        )?;
        Ok(true)
    }

    /// Allocates the session's next seq and records the event.
    fn emit<D: Serialize>(
        &mut self,
        kind: EventType,
        interaction_id: Option<&InteractionId>,
        data: &D,
        interaction: Option<Arc<Interaction>>,
    ) -> StoreResult<()> {
        let now = self.s.now;
        let row = self.row()?;
        row.last_seq += 1;
        let seq = row.last_seq;
        let mut event = Event::new(&self.s.id, seq, kind, now, interaction_id.cloned(), data)?;
        event.interaction = interaction;
        self.events.push(event);
        Ok(())
    }

    fn emit_interaction(&mut self, kind: EventType, interaction: &Interaction) -> StoreResult<()> {
        let shared = Arc::new(interaction.clone());
        self.emit(
            kind,
            Some(&interaction.id),
            &InteractionData { interaction },
            Some(shared),
        )
    }

    /// Refuses a context that serializes past `max_context_bytes`; `at`: the agent output
    /// that would make it.
    fn check_context_size(&self, context: &JsonObject, at: Option<usize>) -> StoreResult<()> {
        let limit = self.s.limits.max_context_bytes;
        let size = serialized_size(context);
        if size > limit {
            return Err(StoreError::ContextTooLarge { limit, size, at });
        }
        Ok(())
    }

    /// Replaces the context, refused past `max_context_bytes` (`at`: the agent output that
    /// asks for it).
    fn set_context(&mut self, context: &JsonObject, at: Option<usize>) -> StoreResult<()> {
        self.check_context_size(context, at)?;
        self.writes.push(Write::SetContext(context.clone()));
        self.row()?.context = Ok(context.clone());
        self.emit(
            EventType::ContextUpdated,
            None,
            &ContextData { context },
            None,
        )
    }

    /// The session's view as the API shows it.
    fn view(&mut self) -> StoreResult<Session> {
        let running = self.s.running.clone();
        let queued = self.s.queued.len() as i64;
        let id = self.s.id.clone();
        let row = self.row()?;
        Ok(Session {
            id,
            agent: row.agent.clone(),
            context: row.context()?.clone(),
            epoch: row.epoch,
            last_seq: row.last_seq,
            created_at: row.created_at,
            running,
            queued,
        })
    }

    pub(super) fn put_session(
        &mut self,
        agent: Option<String>,
        context: Option<JsonObject>,
        default_agent: String,
    ) -> StoreResult<(Session, bool)> {
        let created = self.session_or_create(
            agent.clone().unwrap_or(default_agent),
            context.clone().unwrap_or_default(),
        )?;
        if !created {
            if let Some(agent) = agent {
                self.row()?.agent = agent.clone();
                self.writes.push(Write::SetAgent(agent));
            }
            if let Some(context) = context {
                self.set_context(&context, None)?;
            }
        }
        Ok((self.view()?, created))
    }

    pub(super) fn delete_session(&mut self) -> StoreResult<Vec<InteractionId>> {
        self.row()?;
        let cancelled = self.cancel_all(CancelReason::Delete)?;
        self.emit(EventType::SessionDeleted, None, &Empty {}, None)?;
        let last_seq = self.row()?.last_seq;
        self.writes.push(Write::Delete { last_seq });
        // Gone: no seq to save, no state after.
        self.s.session = None;
        Ok(cancelled)
    }

    pub(super) fn accept(&mut self, message: NewMessage) -> StoreResult<Accepted> {
        self.session_or_create(message.default_agent.clone(), JsonObject::new())?;
        let now = self.s.now;
        if let Some(key) = &message.idempotency_key
            && let Some(earlier) = self.s.keyed.take()
        {
            debug_assert_eq!(earlier.session, self.s.id);
            if earlier.created_at.0 < now.0 - IDEMPOTENCY_TTL_MS {
                debug_assert!(!key.is_empty());
                self.writes.push(Write::ForgetKey(earlier.id));
            } else if earlier.content != message.content || earlier.metadata != message.metadata {
                return Err(StoreError::IdempotencyMismatch);
            } else {
                if message.watch_final && !earlier.status.is_final() {
                    self.effects.watch_final = Some(earlier.id.clone());
                }
                return Ok(Accepted {
                    interaction: earlier,
                    replayed: true,
                });
            }
        }
        let busy_with = self
            .s
            .running
            .as_ref()
            .or(self.s.queued.first())
            .map(|i| i.id.clone());
        if let Some(busy_with) = &busy_with {
            match message.policy {
                Policy::Reject => {
                    return Err(StoreError::Busy {
                        running: busy_with.clone(),
                    });
                }
                Policy::Enqueue if self.s.queued.len() >= message.queue_limit as usize => {
                    return Err(StoreError::QueueFull {
                        limit: message.queue_limit,
                    });
                }
                Policy::Enqueue => {}
                Policy::Interrupt => {
                    self.cancel_all(CancelReason::Interrupt)?;
                }
            }
        }
        let start_now = busy_with.is_none() || message.policy == Policy::Interrupt;
        let id = self.s.fresh_id.take();
        let interaction = Interaction {
            id: id.ok_or_else(|| StoreError::Internal("no id for a new interaction".into()))?,
            session: self.s.id.clone(),
            content: message.content,
            metadata: message.metadata,
            status: if start_now {
                Status::Running
            } else {
                Status::Queued
            },
            response: String::new(),
            error: None,
            request: None,
            answers: Vec::new(),
            cancel_reason: None,
            created_at: now,
            started_at: start_now.then_some(now),
            finished_at: None,
            input_deadline: None,
        };
        let row = self.row()?;
        let (epoch, agent) = (row.epoch, row.agent.clone());
        self.writes.push(Write::Insert {
            interaction: interaction.clone(),
            epoch,
            idempotency_key: message.idempotency_key,
        });
        if start_now {
            self.emit_interaction(EventType::TaskStarted, &interaction)?;
            self.s.running = Some(interaction.clone());
            self.effects.start.push(StartedTask {
                interaction: interaction.clone(),
                agent,
                session: None,
            });
        } else {
            self.emit_interaction(EventType::InteractionQueued, &interaction)?;
            self.s.queued.push(interaction.clone());
        }
        if message.watch_final {
            self.effects.watch_final = Some(interaction.id.clone());
        }
        Ok(Accepted {
            interaction,
            replayed: false,
        })
    }

    pub(super) fn append(
        &mut self,
        id: InteractionId,
        outputs: Vec<TaskOutput>,
    ) -> StoreResult<()> {
        self.running_task(&id)?;
        let text = self.write_outputs(&id, outputs)?;
        if !text.is_empty() {
            if let Some(running) = &mut self.s.running {
                running.response.push_str(&text);
            }
            self.writes.push(Write::AppendResponse { id, text });
        }
        Ok(())
    }

    /// `set` replaces the context, then `patch` merges into it: one write, one event.
    pub(super) fn update_context(
        &mut self,
        set: Option<JsonObject>,
        patch: Option<JsonObject>,
        default_agent: String,
    ) -> StoreResult<JsonObject> {
        self.session_or_create(default_agent, JsonObject::new())?;
        let mut context = match set {
            Some(set) => set,
            None => self.row()?.context()?.clone(),
        };
        if let Some(patch) = patch {
            context = patched(context, patch)?;
        }
        self.set_context(&context, None)?;
        Ok(context)
    }

    pub(super) fn interrupt(&mut self, id: InteractionId, error: ErrorInfo) -> StoreResult<()> {
        if self.s.session.is_none() {
            return Ok(());
        }
        // A waiting interaction has no task to lose: it stays waiting.
        if let Some(mut running) = self
            .s
            .running
            .take_if(|r| r.id == id && r.status == Status::Running)
        {
            self.make_final(&mut running, Status::Failed, Some(error), None)?;
            self.effects.stop.push(running.id);
        }
        self.start_next()
    }

    pub(super) fn start_queued(&mut self) -> StoreResult<()> {
        if self.s.session.is_none() {
            return Ok(());
        }
        self.start_next()
    }

    /// A task may write only while its interaction is the session's running one (not
    /// waiting: a task that asked has ended).
    fn running_task(&mut self, id: &InteractionId) -> StoreResult<()> {
        match (&self.s.session, &self.s.running) {
            (Some(_), Some(running)) if &running.id == id && running.status == Status::Running => {
                Ok(())
            }
            _ => Err(StoreError::Fenced),
        }
    }

    pub(super) fn ask(
        &mut self,
        id: InteractionId,
        outputs: Vec<TaskOutput>,
        data: Value,
        request_id: String,
        timeout_ms: i64,
    ) -> StoreResult<Interaction> {
        self.running_task(&id)?;
        let text = self.write_outputs(&id, outputs)?;
        let mut waiting = self.s.running.take().ok_or(StoreError::Fenced)?;
        waiting.response.push_str(&text);
        waiting.status = Status::Waiting;
        waiting.request = Some(PendingRequest {
            id: request_id,
            data,
        });
        waiting.input_deadline = Some(Millis(self.s.now.0.saturating_add(timeout_ms)));
        self.writes.push(Write::Wait(waiting.clone()));
        self.emit_interaction(EventType::TaskWaiting, &waiting)?;
        self.s.running = Some(waiting.clone());
        Ok(waiting)
    }

    /// One answer wins: the interaction must be this session's, `waiting`, for this request.
    pub(super) fn answer(
        &mut self,
        id: InteractionId,
        request_id: String,
        answer: Value,
    ) -> StoreResult<Interaction> {
        self.row()?;
        self.s
            .named
            .as_ref()
            .filter(|i| i.session == self.s.id && i.id == id)
            .ok_or(StoreError::InteractionNotFound)?;
        let pending = |r: &mut Interaction| {
            r.id == id
                && r.status == Status::Waiting
                && r.request.as_ref().is_some_and(|q| q.id == request_id)
        };
        let mut resumed = self
            .s
            .running
            .take_if(pending)
            .ok_or(StoreError::NotWaiting)?;
        let request = resumed.request.take().ok_or(StoreError::NotWaiting)?;
        resumed.answers.push(Exchange { request, answer });
        resumed.status = Status::Running;
        resumed.input_deadline = None;
        self.writes.push(Write::Resume(resumed.clone()));
        self.emit_interaction(EventType::TaskResumed, &resumed)?;
        self.s.running = Some(resumed.clone());
        let agent = self.row()?.agent.clone();
        self.effects.start.push(StartedTask {
            interaction: resumed.clone(),
            agent,
            session: None,
        });
        Ok(resumed)
    }

    /// A wait past its deadline ends `cancelled` (`timeout`); an answered or ended one is left.
    pub(super) fn expire_wait(&mut self, id: InteractionId, start_next: bool) -> StoreResult<()> {
        if self.s.session.is_none() {
            return Ok(());
        }
        let now = self.s.now;
        let expired = |r: &mut Interaction| {
            r.id == id
                && r.status == Status::Waiting
                && r.input_deadline.is_some_and(|at| at.0 <= now.0)
        };
        let Some(mut expired) = self.s.running.take_if(expired) else {
            return Ok(());
        };
        self.make_final(
            &mut expired,
            Status::Cancelled,
            None,
            Some(CancelReason::Timeout),
        )?;
        self.effects.stop.push(expired.id);
        if start_next {
            self.start_next()?;
        }
        Ok(())
    }

    /// Records a running task's outputs, one event each, and applies its context patches.
    /// Returns the text of its deltas.
    fn write_outputs(
        &mut self,
        id: &InteractionId,
        outputs: Vec<TaskOutput>,
    ) -> StoreResult<String> {
        let mut text = String::new();
        for (at, output) in outputs.into_iter().enumerate() {
            match output {
                TaskOutput::Delta(delta) => {
                    let data = DeltaData {
                        interaction_id: id,
                        text: &delta,
                    };
                    self.emit(EventType::TaskDelta, Some(id), &data, None)?;
                    text.push_str(&delta);
                }
                TaskOutput::Progress(data) => {
                    let data = ProgressData {
                        interaction_id: id,
                        data: &data,
                    };
                    self.emit(EventType::TaskProgress, Some(id), &data, None)?;
                }
                TaskOutput::ContextPatch(patch) => {
                    let context = patched(self.row()?.context()?.clone(), patch)?;
                    self.set_context(&context, Some(at))?;
                }
                TaskOutput::Ask(_) => {
                    return Err(StoreError::Internal(
                        "an ask is not an output to write".into(),
                    ));
                }
            }
        }
        Ok(text)
    }

    pub(super) fn finish(
        &mut self,
        id: InteractionId,
        outputs: Vec<TaskOutput>,
        end: TaskEnd,
        start_next: bool,
    ) -> StoreResult<()> {
        self.running_task(&id)?;
        let text = self.write_outputs(&id, outputs)?;
        let mut interaction = self.s.running.take().ok_or(StoreError::Fenced)?;
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
        self.make_final(&mut interaction, status, error, None)?;
        if start_next {
            self.start_next()?;
        }
        Ok(())
    }

    pub(super) fn cancel(
        &mut self,
        target: CancelTarget,
        reason: CancelReason,
        start_next: bool,
    ) -> StoreResult<Vec<InteractionId>> {
        self.row()?;
        let target = match target {
            CancelTarget::Running => self.s.running.as_ref().map(|r| r.id.clone()),
            CancelTarget::Named(id) => {
                let named = self.s.named.as_ref().filter(|i| i.session == self.s.id);
                let named = named.ok_or(StoreError::InteractionNotFound)?;
                debug_assert_eq!(named.id, id);
                (!named.status.is_final()).then_some(id)
            }
        };
        let Some(target) = target else {
            return Ok(Vec::new());
        };
        // Shutdown stops what runs here; a waiting interaction runs nowhere and stays waiting.
        let waits = |r: &Interaction| r.id == target && r.status == Status::Waiting;
        if reason == CancelReason::Shutdown && self.s.running.as_ref().is_some_and(waits) {
            return Ok(Vec::new());
        }
        let (mut victim, was_running) = match self.s.running.take_if(|r| r.id == target) {
            Some(running) => (running, true),
            None => {
                let at = self.s.queued.iter().position(|q| q.id == target);
                // Named but in neither: it is final in a way the snapshot missed. Nothing to do.
                let Some(at) = at else {
                    return Ok(Vec::new());
                };
                (self.s.queued.remove(at), false)
            }
        };
        self.make_final(&mut victim, Status::Cancelled, None, Some(reason))?;
        self.effects.stop.push(victim.id.clone());
        if was_running && start_next {
            self.start_next()?;
        }
        Ok(vec![victim.id])
    }

    pub(super) fn clear(&mut self, default_agent: String) -> StoreResult<Cleared> {
        self.session_or_create(default_agent, JsonObject::new())?;
        let cancelled = self.cancel_all(CancelReason::Clear)?;
        let row = self.row()?;
        row.epoch += 1;
        row.context = Ok(JsonObject::new());
        let epoch = row.epoch;
        // The cancelled rows go with the others: only their events remain.
        self.writes.retain(|w| !matches!(w, Write::Finalize(_)));
        self.writes.push(Write::Clear { epoch });
        self.emit(
            EventType::SessionCleared,
            None,
            &ClearedData { epoch },
            None,
        )?;
        Ok(Cleared { epoch, cancelled })
    }

    /// Makes `interaction` final and emits its one final event. The caller has taken it out
    /// of the snapshot's running slot or queue.
    fn make_final(
        &mut self,
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
        interaction.finished_at = Some(self.s.now);
        interaction.request = None;
        interaction.input_deadline = None;
        self.writes.push(Write::Finalize(interaction.clone()));
        self.emit_interaction(kind, interaction)
    }

    /// Starts the oldest queued interaction, unless one runs (I1).
    fn start_next(&mut self) -> StoreResult<()> {
        if self.s.running.is_some() || self.s.queued.is_empty() {
            return Ok(());
        }
        let mut next = self.s.queued.remove(0);
        next.status = Status::Running;
        next.started_at = Some(self.s.now);
        self.writes.push(Write::Start(next.clone()));
        self.emit_interaction(EventType::TaskStarted, &next)?;
        self.s.running = Some(next.clone());
        let agent = self.row()?.agent.clone();
        self.effects.start.push(StartedTask {
            interaction: next,
            agent,
            session: None,
        });
        Ok(())
    }

    /// Cancels the running interaction, then every queued one in FIFO order.
    fn cancel_all(&mut self, reason: CancelReason) -> StoreResult<Vec<InteractionId>> {
        let mut victims: Vec<Interaction> = self.s.running.take().into_iter().collect();
        victims.append(&mut self.s.queued);
        let mut cancelled = Vec::with_capacity(victims.len());
        for mut victim in victims {
            self.make_final(&mut victim, Status::Cancelled, None, Some(reason))?;
            self.effects.stop.push(victim.id.clone());
            cancelled.push(victim.id);
        }
        Ok(cancelled)
    }
}

/// The length of `value`'s JSON text, counted without building it.
fn serialized_size(value: &JsonObject) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing to a counter cannot fail, and a map of JSON values always serializes.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

fn patched(context: JsonObject, patch: JsonObject) -> StoreResult<JsonObject> {
    let mut value = Value::Object(context);
    merge_patch(&mut value, &Value::Object(patch));
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(StoreError::Internal(
            "a merge patch of objects gave a non-object".into(),
        )),
    }
}

// The `data` of each event type (API.md, "Events").

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct DeltaData<'a> {
    interaction_id: &'a InteractionId,
    text: &'a str,
}

#[derive(Serialize)]
struct ProgressData<'a> {
    interaction_id: &'a InteractionId,
    data: &'a Value,
}

#[derive(Serialize)]
struct ClearedData {
    epoch: i64,
}

#[derive(Serialize)]
struct InteractionData<'a> {
    interaction: &'a Interaction,
}

#[derive(Serialize)]
struct ContextData<'a> {
    context: &'a JsonObject,
}

#[derive(Serialize)]
struct SessionData<'a> {
    session: &'a Session,
}
