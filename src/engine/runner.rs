//! The task runner: drives one agent for one running interaction, writes its outputs through
//! the store (fenced by the interaction id), and ends the interaction exactly once (I3): with
//! the agent's end, `failed` when the agent panics, or `cancelled` on timeout. A cancel that
//! arrives from elsewhere was already made final by its transaction; the runner just stops.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Inner, TaskEntry};
use crate::agent::{AgentRequest, AgentResult};
use crate::model::{CancelReason, ErrorInfo, JsonObject};
use crate::session::{CancelTarget, StartedTask, StoreError, TaskEnd, TaskOutput};

/// Outputs an agent may produce ahead of the store before it has to wait.
const OUTPUT_BUFFER: usize = 256;
/// Outputs written in one store job at most.
const OUTPUT_BATCH: usize = 256;
/// Attempts to record a task's end while storage fails.
const FINISH_ATTEMPTS: u32 = 5;

/// Aborts the agent's task when the runner leaves early (cancel, timeout, fencing).
struct AbortOnDrop(JoinHandle<AgentResult>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum Stop {
    /// Cancelled by a transaction elsewhere: already final, nothing to write.
    Cancelled,
    TimedOut,
    /// A write was refused: the interaction is no longer running.
    Fenced,
    /// The agent ended; its last outputs are written together with the end.
    Ended(Vec<TaskOutput>, TaskEnd),
    /// The agent asked the client (`data`): the outputs before the ask are written with it,
    /// the agent is stopped, and the interaction waits for the answer.
    Asked(Vec<TaskOutput>, serde_json::Value, Duration),
}

pub(super) async fn run_task(
    inner: Arc<Inner>,
    task: StartedTask,
    entry: TaskEntry,
    cancel: CancellationToken,
) {
    let _entry = entry;
    let id = task.interaction.id.clone();
    let session = task.interaction.session.clone();
    let stop = drive_agent(&inner, task, &cancel).await;
    let (outputs, end) = match stop {
        Stop::Cancelled | Stop::Fenced => return,
        Stop::TimedOut => {
            let start_next = inner.starts_next();
            let target = CancelTarget::Named(id.clone());
            match inner
                .store
                .cancel(session, target, CancelReason::Timeout, start_next)
                .await
            {
                Ok(cancelled) => {
                    inner.done(cancelled);
                }
                Err(e) => tracing::error!(interaction = %id, error = %e, "recording a timeout"),
            }
            return;
        }
        Stop::Ended(outputs, end) => (outputs, end),
        Stop::Asked(mut outputs, data, timeout) => 'ask: {
            for attempt in 1..=FINISH_ATTEMPTS {
                match inner
                    .store
                    .ask(id.clone(), outputs.clone(), data.clone(), timeout)
                    .await
                {
                    Ok(waiting) => {
                        inner.done(waiting);
                        return;
                    }
                    Err(StoreError::Fenced) => return,
                    Err(e @ StoreError::ContextTooLarge { at: Some(at), .. }) => {
                        outputs.truncate(at);
                        break 'ask (outputs, context_too_large(&e));
                    }
                    Err(e) => {
                        tracing::error!(interaction = %id, attempt, error = %e, "recording an ask");
                        tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                    }
                }
            }
            // Left `running`: recovery at the next start finishes it as `interrupted`.
            return;
        }
    };
    let (mut outputs, mut end) = (outputs, end);
    for attempt in 1..=FINISH_ATTEMPTS {
        let start_next = inner.starts_next();
        match inner
            .store
            .finish(id.clone(), outputs.clone(), end.clone(), start_next)
            .await
        {
            Ok(finished) => {
                match &end {
                    TaskEnd::Completed { .. } => &inner.counters.interactions_completed,
                    TaskEnd::Failed(_) => &inner.counters.interactions_failed,
                }
                .fetch_add(1, Ordering::Relaxed);
                inner.done(finished);
                return;
            }
            Err(StoreError::Fenced) => return,
            Err(e @ StoreError::ContextTooLarge { at: Some(at), .. }) => {
                // The outputs before the refused patch stand; the task fails at it.
                outputs.truncate(at);
                end = context_too_large(&e);
            }
            Err(e) => {
                tracing::error!(interaction = %id, attempt, error = %e, "recording a task's end");
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
        }
    }
    // Left `running`: recovery at the next start finishes it as `interrupted`.
}

async fn drive_agent(inner: &Arc<Inner>, task: StartedTask, cancel: &CancellationToken) -> Stop {
    let id = task.interaction.id.clone();
    let Some(agent) = inner.agents.get(&task.agent).cloned() else {
        return Stop::Ended(
            Vec::new(),
            TaskEnd::Failed(ErrorInfo {
                code: "unknown_agent".into(),
                message: format!("agent {:?} is not configured", task.agent),
            }),
        );
    };
    let deadline = agent.timeout.map(|t| Instant::now() + t);
    let input_timeout = agent.input_timeout;
    let history_limit = agent
        .executor
        .wants_history()
        .then(|| agent.max_history.unwrap_or(inner.settings.history_limit));
    let request = match build_request(inner, &task, history_limit).await {
        Ok(request) => request,
        Err(e) => {
            return Stop::Ended(
                Vec::new(),
                TaskEnd::Failed(ErrorInfo {
                    code: "internal".into(),
                    message: format!("loading the agent's request: {e}"),
                }),
            );
        }
    };
    let (outputs, mut received) = mpsc::channel(OUTPUT_BUFFER);
    let agent_cancel = cancel.child_token();
    let run = agent.executor.run(request, outputs, agent_cancel);
    let mut agent_task = AbortOnDrop(tokio::spawn(run));
    let timeout = async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timeout);
    let mut batch = Vec::with_capacity(OUTPUT_BATCH);
    let mut outputs_open = true;
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Stop::Cancelled,
            _ = &mut timeout => return Stop::TimedOut,
            n = received.recv_many(&mut batch, OUTPUT_BATCH), if outputs_open => {
                if n == 0 {
                    outputs_open = false;
                    continue;
                }
                let mut outputs = std::mem::replace(&mut batch, Vec::with_capacity(OUTPUT_BATCH));
                let finished = agent_task.0.is_finished();
                if finished {
                    // The agent is done: its last outputs go with the end, in one write.
                    while let Ok(output) = received.try_recv() {
                        outputs.push(output);
                    }
                }
                if let Some(at) = outputs.iter().position(|o| matches!(o, TaskOutput::Ask(_))) {
                    // What the agent sent after its ask is dropped with the agent.
                    let TaskOutput::Ask(data) = outputs.swap_remove(at) else {
                        unreachable!("position found an ask")
                    };
                    outputs.truncate(at);
                    return Stop::Asked(outputs, data, input_timeout);
                }
                if finished {
                    return Stop::Ended(outputs, agent_end((&mut agent_task.0).await));
                }
                // A context patch may be refused (max_context_bytes): what came before it is
                // then written with the failure. Only batches with a patch are copied.
                let kept = outputs
                    .iter()
                    .any(|o| matches!(o, TaskOutput::ContextPatch(_)))
                    .then(|| outputs.clone());
                match inner.store.append_outputs(id.clone(), outputs).await {
                    Ok(appended) => inner.done(appended),
                    Err(StoreError::Fenced) => return Stop::Fenced,
                    Err(e @ StoreError::ContextTooLarge { at: Some(at), .. }) => {
                        let mut before = kept.unwrap_or_default();
                        before.truncate(at);
                        return Stop::Ended(before, context_too_large(&e));
                    }
                    Err(e) => {
                        return Stop::Ended(Vec::new(), TaskEnd::Failed(ErrorInfo {
                            code: "internal".into(),
                            message: format!("storing the agent's output: {e}"),
                        }));
                    }
                }
            }
            joined = &mut agent_task.0, if !outputs_open => {
                return Stop::Ended(Vec::new(), agent_end(joined));
            }
        }
    }
}

/// The end of a task whose agent's context patch was refused.
fn context_too_large(e: &StoreError) -> TaskEnd {
    TaskEnd::Failed(ErrorInfo {
        code: "context_too_large".into(),
        message: format!("the agent's context patch was refused: {e}"),
    })
}

fn agent_end(joined: Result<AgentResult, tokio::task::JoinError>) -> TaskEnd {
    match joined {
        Ok(Ok(response)) => TaskEnd::Completed { response },
        Ok(Err(error)) => TaskEnd::Failed(error),
        Err(e) => TaskEnd::Failed(ErrorInfo {
            code: "agent_error".into(),
            message: if e.is_panic() {
                "the agent panicked".into()
            } else {
                "the agent's task was aborted".into()
            },
        }),
    }
}

async fn build_request(
    inner: &Arc<Inner>,
    task: &StartedTask,
    history_limit: Option<u32>,
) -> Result<AgentRequest, StoreError> {
    let Some(limit) = history_limit else {
        return Ok(AgentRequest {
            interaction: task.interaction.clone(),
            session: None,
            history: Vec::new(),
            context: JsonObject::new(),
        });
    };
    // The session comes with the task, as its plan left it; the store is read for the
    // history only, and not at all without one.
    let (session, history) = match &task.session {
        Some(session) if limit == 0 => (session.clone(), Vec::new()),
        Some(session) => {
            let history = inner.store.history(session.id.clone(), limit).await?;
            (session.clone(), history)
        }
        None => {
            inner
                .store
                .task_inputs(task.interaction.session.clone(), limit)
                .await?
        }
    };
    Ok(AgentRequest {
        interaction: task.interaction.clone(),
        context: session.context.clone(),
        session: Some(session),
        history,
    })
}
