//! The session engine: turns requests into store transactions, starts a task on this node
//! for every interaction that one of them made `running`, and signals local tasks that a
//! transaction cancelled. It keeps only live handles; the truth is in the store.

mod registry;
mod runner;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use registry::{TaskEntry, TaskRegistry};

use crate::agent::AgentRegistry;
use crate::bus::{Bus, FinalWatch};
use crate::model::{
    CancelReason, Interaction, InteractionId, JsonObject, Policy, Session, SessionId, Tenant,
};
use crate::session::{Accepted, CancelTarget, Cleared, Effects, NewMessage, Received, StartedTask};
use crate::store::{Committed, Page, Store, StoreError};

/// Longest shutdown waits for agents to stop what their cancelled tasks left running.
const AGENT_DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Errors of engine operations, matched by the transports.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("agent {0:?} is not configured")]
    UnknownAgent(String),
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Engine settings taken from the configuration.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub queue_limit: u32,
    pub history_limit: u32,
    pub default_agent: String,
    /// Events older than this are deleted (stores shared by several nodes).
    pub retention: Duration,
    /// Deltas of interactions final for longer than this are deleted.
    pub compact_deltas_after: Duration,
}

/// How often the retention job runs.
const COMPACTION_INTERVAL: Duration = Duration::from_secs(30);
/// How often unanswered requests past their deadline are looked for (the deadline is stored:
/// whichever node is alive ends them, after any restart).
const WAIT_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Waits ended per look at most.
const WAIT_EXPIRY_BATCH: u32 = 256;

/// A message as a transport received it: its content validated; what a `/clear` ignores
/// (the key, `wait`) validated too, with what is wrong in `invalid` for the rules to decide.
#[derive(Debug, Clone)]
pub struct MessageRequest {
    pub session: SessionId,
    pub content: String,
    pub policy: Policy,
    pub metadata: JsonObject,
    pub idempotency_key: Option<String>,
    /// The caller will wait for the final state (registers a watch).
    pub wait: bool,
    /// Refuses the message with this unless it is a `/clear`.
    pub invalid: Option<String>,
}

/// A message accepted (or replayed) as an interaction.
#[derive(Debug)]
pub struct Sent {
    pub accepted: Accepted,
    /// The final-state watch the caller asked for (`wait`), registered before any later
    /// commit could finish the interaction.
    pub final_watch: Option<FinalWatch>,
}

/// What sending a message did.
#[derive(Debug)]
pub enum MessageOutcome {
    /// Accepted (or replayed) as an interaction.
    Accepted(Box<Sent>),
    /// The content was `/clear`: the session was cleared instead.
    Cleared(Cleared),
}

/// Counters exposed on `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub messages_accepted: AtomicU64,
    pub interactions_completed: AtomicU64,
    pub interactions_failed: AtomicU64,
    pub tasks_started: AtomicU64,
}

/// The session engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    bus: Arc<Bus>,
    agents: AgentRegistry,
    tasks: Arc<TaskRegistry>,
    /// Owns every task runner, so shutdown can wait for them.
    runners: TaskTracker,
    /// Owns the periodic duties ([`Engine::start_background_duties`]), awaited at shutdown.
    duties: TaskTracker,
    settings: EngineSettings,
    /// Fires when shutdown begins: new writes are refused, waiters and duties return.
    stopping: CancellationToken,
    counters: Counters,
}

impl Engine {
    pub fn new(
        store: Store,
        bus: Arc<Bus>,
        agents: AgentRegistry,
        settings: EngineSettings,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                bus,
                agents,
                tasks: Arc::new(TaskRegistry::default()),
                runners: TaskTracker::new(),
                duties: TaskTracker::new(),
                settings,
                stopping: CancellationToken::new(),
                counters: Counters::default(),
            }),
        }
    }

    pub fn bus(&self) -> &Arc<Bus> {
        &self.inner.bus
    }

    pub fn agents(&self) -> &AgentRegistry {
        &self.inner.agents
    }

    /// The agent of sessions that name none.
    pub fn default_agent(&self) -> &str {
        &self.inner.settings.default_agent
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Counters of the store's write path.
    pub fn store_stats(&self) -> &crate::store::StoreStats {
        self.inner.store.stats()
    }

    /// Tasks running on this node.
    pub fn running_tasks(&self) -> usize {
        self.inner.tasks.len()
    }

    /// A token that fires when shutdown begins (for long-lived connections).
    pub fn stopping(&self) -> CancellationToken {
        self.inner.stopping.clone()
    }

    /// Finishes what a crash left running and starts the queued work that waits.
    pub async fn recover(&self) -> Result<usize, EngineError> {
        let effects = self.inner.store.recover().await?;
        let count = effects.start.len();
        self.inner.execute(effects);
        Ok(count)
    }

    /// The store's background duties, until shutdown begins: retention (every store),
    /// ending waits past their deadline, and with a store shared by several nodes, the
    /// heartbeat of this node's lease, taking over the work of lost nodes, and stopping local
    /// tasks that other nodes cancelled. Each runs on the engine's duty tracker, which
    /// shutdown awaits.
    pub fn start_background_duties(&self) {
        let inner = &self.inner;
        inner.every(COMPACTION_INTERVAL, |inner| async move {
            let now = crate::model::Millis::now().0;
            let ago = |d: Duration| {
                crate::model::Millis(now - i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            };
            let settings = &inner.settings;
            match inner
                .store
                .compact(ago(settings.compact_deltas_after), ago(settings.retention))
                .await
            {
                Ok(0) => {}
                Ok(deleted) => tracing::debug!(deleted, "retention: events deleted"),
                Err(e) => tracing::warn!(error = %e, "retention"),
            }
        });
        inner.every(WAIT_CHECK_INTERVAL, |inner| async move {
            inner.expire_waits().await
        });
        let Some(lease) = inner.store.lease() else {
            return;
        };
        if let Some(mut cancels) = inner.store.take_remote_cancels() {
            let owned = Arc::clone(inner);
            inner.duties.spawn(async move {
                loop {
                    tokio::select! {
                        _ = owned.stopping.cancelled() => return,
                        id = cancels.recv() => match id {
                            Some(id) => owned.tasks.cancel(&[id]),
                            None => return,
                        },
                    }
                }
            });
        }
        inner.every(lease / 4, |inner| async move {
            match inner.store.heartbeat().await {
                Ok(true) => {
                    // Our lease lapsed (a pause, a partition): other nodes finished our
                    // tasks; their runners here only meet fenced writes. Stop them.
                    let lost: Vec<_> = inner
                        .tasks
                        .running()
                        .into_iter()
                        .map(|(id, _)| id)
                        .collect();
                    inner.tasks.cancel(&lost);
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "heartbeat"),
            }
        });
        // Taking over may wait on a lost node's row locks: never in the heartbeat's way.
        inner.every(lease / 4, |inner| async move {
            match inner.store.take_over().await {
                Ok(effects) => inner.execute(effects),
                Err(e) => tracing::warn!(error = %e, "taking over the work of lost nodes"),
            }
        });
    }

    /// Whether storage answers.
    pub async fn ready(&self) -> Result<(), EngineError> {
        self.refuse_when_stopping()?;
        Ok(self.inner.store.check().await?)
    }

    fn refuse_when_stopping(&self) -> Result<(), EngineError> {
        if self.inner.stopping.is_cancelled() {
            Err(EngineError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// Refuses to create a session with the default agent when that agent is not configured.
    async fn check_default_agent(&self, session: &SessionId) -> Result<(), EngineError> {
        let default = &self.inner.settings.default_agent;
        if self.inner.agents.contains(default) {
            return Ok(());
        }
        match self.inner.store.get_session(session.clone()).await {
            Ok(_) => Ok(()),
            Err(StoreError::SessionNotFound) => Err(EngineError::UnknownAgent(default.clone())),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn put_session(
        &self,
        id: SessionId,
        agent: Option<String>,
        context: Option<JsonObject>,
    ) -> Result<(Session, bool), EngineError> {
        self.refuse_when_stopping()?;
        match &agent {
            Some(name) if !self.inner.agents.contains(name) => {
                return Err(EngineError::UnknownAgent(name.clone()));
            }
            Some(_) => {}
            None => self.check_default_agent(&id).await?,
        }
        let default = self.inner.settings.default_agent.clone();
        let put = self.inner.store.put_session(id, agent, context, default);
        Ok(self.inner.done(put.await?))
    }

    pub async fn get_session(&self, id: SessionId) -> Result<Session, EngineError> {
        Ok(self.inner.store.get_session(id).await?)
    }

    /// `tenant`'s sessions by name, after the name `after`.
    pub async fn list_sessions(
        &self,
        tenant: Tenant,
        after: Option<String>,
        limit: u32,
    ) -> Result<Page<Session>, EngineError> {
        Ok(self.inner.store.list_sessions(tenant, after, limit).await?)
    }

    pub async fn delete_session(&self, id: SessionId) -> Result<(), EngineError> {
        self.refuse_when_stopping()?;
        let deleted = self.inner.store.delete_session(id).await?;
        self.inner.done(deleted);
        Ok(())
    }

    /// Accepts a message under its policy, or (the rules decide) clears the session for
    /// `/clear`.
    pub async fn send_message(
        &self,
        request: MessageRequest,
    ) -> Result<MessageOutcome, EngineError> {
        self.refuse_when_stopping()?;
        self.check_default_agent(&request.session).await?;
        let committed = self
            .inner
            .store
            .accept_message(NewMessage {
                session: request.session,
                content: request.content,
                metadata: request.metadata,
                policy: request.policy,
                idempotency_key: request.idempotency_key,
                queue_limit: self.inner.settings.queue_limit,
                default_agent: self.inner.settings.default_agent.clone(),
                watch_final: request.wait,
                invalid: request.invalid,
            })
            .await?;
        let final_watch = committed.final_watch;
        self.inner.execute(committed.effects);
        Ok(match committed.value {
            Received::Cleared(cleared) => MessageOutcome::Cleared(cleared),
            Received::Accepted(accepted) => {
                if !accepted.replayed {
                    self.inner
                        .counters
                        .messages_accepted
                        .fetch_add(1, Ordering::Relaxed);
                }
                MessageOutcome::Accepted(Box::new(Sent {
                    accepted,
                    final_watch,
                }))
            }
        })
    }

    /// Waits up to `within` for the interaction to become final (through the watch the
    /// store registered when accepting it); returns its state then.
    pub async fn wait_final(
        &self,
        mut watch: FinalWatch,
        last: Interaction,
        within: Duration,
    ) -> Result<Interaction, EngineError> {
        if last.status.is_final() {
            return Ok(last);
        }
        tokio::select! {
            _ = self.inner.stopping.cancelled() => {}
            _ = tokio::time::sleep(within) => {}
            done = watch.wait() => {
                if let Some(interaction) = done {
                    return Ok(Interaction::clone(&interaction));
                }
            }
        }
        let session = last.session.clone();
        let id = last.id.clone();
        self.reread(&session, &id, last).await
    }

    /// The stored state, or `last` if a clear or delete removed the interaction since.
    async fn reread(
        &self,
        session: &SessionId,
        id: &InteractionId,
        last: Interaction,
    ) -> Result<Interaction, EngineError> {
        match self
            .inner
            .store
            .get_interaction(session.clone(), id.clone())
            .await
        {
            Ok(current) => Ok(current),
            Err(StoreError::InteractionNotFound | StoreError::SessionNotFound) => Ok(last),
            Err(e) => Err(e.into()),
        }
    }

    /// Cancels the running interaction, or the named queued/running one.
    pub async fn cancel(
        &self,
        session: SessionId,
        id: Option<InteractionId>,
    ) -> Result<Vec<InteractionId>, EngineError> {
        let target = match id {
            Some(id) => CancelTarget::Named(id),
            None => CancelTarget::Running,
        };
        let start_next = self.inner.starts_next();
        let cancel = self
            .inner
            .store
            .cancel(session, target, CancelReason::Cancel, start_next);
        Ok(self.inner.done(cancel.await?))
    }

    /// Clears the session atomically (I2).
    pub async fn clear(&self, session: SessionId) -> Result<Cleared, EngineError> {
        self.refuse_when_stopping()?;
        self.check_default_agent(&session).await?;
        let default = self.inner.settings.default_agent.clone();
        let cleared = self.inner.store.clear(session, default).await?;
        Ok(self.inner.done(cleared))
    }

    /// Stored events of the session with `seq > after`, in order, at most `limit`.
    pub async fn events_after(
        &self,
        session: SessionId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<crate::model::Event>, EngineError> {
        Ok(self.inner.store.events_after(session, after, limit).await?)
    }

    pub async fn get_context(&self, session: SessionId) -> Result<JsonObject, EngineError> {
        Ok(self.inner.store.get_context(session).await?)
    }

    /// Replaces (`patch == false`) or merge-patches (RFC 7396) the context.
    pub async fn update_context(
        &self,
        session: SessionId,
        set: Option<JsonObject>,
        patch: Option<JsonObject>,
    ) -> Result<JsonObject, EngineError> {
        self.refuse_when_stopping()?;
        self.check_default_agent(&session).await?;
        let default = self.inner.settings.default_agent.clone();
        let update = self
            .inner
            .store
            .update_context(session, set, patch, default);
        Ok(self.inner.done(update.await?))
    }

    /// A subscriber of `session` has read that its last seq is `last_seq` (after
    /// subscribing): it needs every event after it live.
    pub fn anchor(&self, session: &SessionId, last_seq: i64) {
        self.inner.store.anchor(session, last_seq);
    }

    pub async fn list_interactions(
        &self,
        session: SessionId,
        before: Option<String>,
        limit: u32,
    ) -> Result<Page<Interaction>, EngineError> {
        Ok(self
            .inner
            .store
            .list_interactions(session, before, limit)
            .await?)
    }

    pub async fn get_interaction(
        &self,
        session: SessionId,
        id: InteractionId,
    ) -> Result<Interaction, EngineError> {
        Ok(self.inner.store.get_interaction(session, id).await?)
    }

    /// Answers the pending request of a `waiting` interaction: one answer wins; the
    /// interaction is `running` again and its agent runs on this node.
    pub async fn answer(
        &self,
        session: SessionId,
        id: InteractionId,
        request_id: String,
        answer: serde_json::Value,
    ) -> Result<Interaction, EngineError> {
        self.refuse_when_stopping()?;
        let answered = self.inner.store.answer(session, id, request_id, answer);
        Ok(self.inner.done(answered.await?))
    }

    /// Begins shutdown: new writes are refused, waiters and duties return.
    pub fn begin_shutdown(&self) {
        self.inner.stopping.cancel();
    }

    /// Cancels every task running here (`shutdown`; their queued successors stay queued for
    /// the next start), waits up to `grace` for the runners and the duties to end.
    pub async fn shutdown(&self, grace: Duration) {
        self.begin_shutdown();
        let deadline = Instant::now() + grace;
        let mut count = self.inner.tasks.watch_count();
        // A task finishing right now may still start its successor: until none is left.
        while !self.inner.tasks.is_empty() {
            for (id, session) in self.inner.tasks.running() {
                let target = CancelTarget::Named(id.clone());
                match self
                    .inner
                    .store
                    .cancel(session, target, CancelReason::Shutdown, false)
                    .await
                {
                    Ok(_) | Err(StoreError::SessionNotFound | StoreError::InteractionNotFound) => {}
                    Err(e) => tracing::warn!(interaction = %id, error = %e, "cancel at shutdown"),
                }
                self.inner.tasks.cancel(&[id]);
            }
            tokio::select! {
                changed = count.changed() => if changed.is_err() { break },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        self.inner.runners.close();
        self.inner.duties.close();
        let drained = async {
            self.inner.runners.wait().await;
            self.inner.duties.wait().await;
        };
        if tokio::time::timeout_at(deadline, drained).await.is_err() {
            tracing::warn!("task runners or duties still busy at the end of the shutdown grace");
        }
        // Agents may still be stopping processes of the tasks just cancelled; each stop is
        // bounded by its agent's kill grace period.
        if tokio::time::timeout(AGENT_DRAIN_LIMIT, self.inner.agents.drain())
            .await
            .is_err()
        {
            tracing::warn!("agents still stopping processes after {AGENT_DRAIN_LIMIT:?}");
        }
        if let Err(e) = self.inner.store.leave().await {
            tracing::warn!(error = %e, "leaving the cluster");
        }
    }
}

impl Inner {
    /// Cancels (`timeout`) the waiting interactions whose deadline passed; starts what queued
    /// behind them.
    async fn expire_waits(self: &Arc<Self>) {
        let expired = match self.store.expired_waits(WAIT_EXPIRY_BATCH).await {
            Ok(expired) => expired,
            Err(e) => {
                tracing::warn!(error = %e, "looking for expired waits");
                return;
            }
        };
        for (session, id) in expired {
            let start_next = self.starts_next();
            match self
                .store
                .expire_wait(session, id.clone(), start_next)
                .await
            {
                Ok(done) => self.done(done),
                Err(StoreError::SessionNotFound) => {}
                Err(e) => tracing::warn!(interaction = %id, error = %e, "ending an expired wait"),
            }
        }
    }

    /// Whether an ending task's successor starts: not once shutdown began (it stays queued
    /// for the next start).
    fn starts_next(&self) -> bool {
        !self.stopping.is_cancelled()
    }

    /// Executes what a committed plan asks for, and answers its outcome.
    fn done<T>(self: &Arc<Self>, committed: Committed<T>) -> T {
        self.execute(committed.effects);
        committed.value
    }

    /// The one place a plan's effects happen: stop what it cancelled, start what it started.
    fn execute(self: &Arc<Self>, effects: Effects) {
        self.tasks.cancel(&effects.stop);
        for task in effects.start {
            self.launch(task);
        }
    }

    /// Every `period` (the first at once), `duty` runs, until shutdown begins; owned by the
    /// duty tracker.
    fn every<F, Fut>(self: &Arc<Self>, period: Duration, duty: F)
    where
        F: Fn(Arc<Inner>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let inner = Arc::clone(self);
        self.duties.spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = inner.stopping.cancelled() => return,
                    _ = tick.tick() => {}
                }
                // Shutdown does not wait for a duty's step to end: it stops at the next await.
                tokio::select! {
                    _ = inner.stopping.cancelled() => return,
                    _ = duty(Arc::clone(&inner)) => {}
                }
            }
        });
    }

    /// Runs the task of an interaction that a committed transaction made `running`.
    fn launch(self: &Arc<Self>, task: StartedTask) {
        self.counters.tasks_started.fetch_add(1, Ordering::Relaxed);
        let (entry, cancel) = self.tasks.register(
            task.interaction.id.clone(),
            task.interaction.session.clone(),
        );
        let inner = Arc::clone(self);
        self.runners
            .spawn(runner::run_task(inner, task, entry, cancel));
    }
}
