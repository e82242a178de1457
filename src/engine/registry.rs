//! The tasks running on this node, keyed by interaction id so that cleanup is exact (I6): a
//! finished task removes its own entry and never a newer task's of the same session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::model::{InteractionId, SessionId};

/// A registered task: its session, its cancel signal, and which run of its interaction it
/// is (an interaction that waited for input runs again after the answer).
#[derive(Debug)]
struct Registered {
    session: SessionId,
    token: CancellationToken,
    run: u64,
}

#[derive(Debug)]
pub struct TaskRegistry {
    // A std mutex: held for a map operation, never across an await.
    tasks: Mutex<HashMap<InteractionId, Registered>>,
    runs: AtomicU64,
    /// How many tasks are registered, for whoever waits for that to change (shutdown).
    count: watch::Sender<usize>,
}

impl Default for TaskRegistry {
    fn default() -> Self {
        Self {
            tasks: Mutex::default(),
            runs: AtomicU64::default(),
            count: watch::Sender::new(0),
        }
    }
}

impl TaskRegistry {
    /// Follows the number of registered tasks.
    pub fn watch_count(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }

    fn tasks(&self) -> MutexGuard<'_, HashMap<InteractionId, Registered>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a task; the returned guard removes exactly this entry when dropped.
    pub fn register(
        self: &Arc<Self>,
        id: InteractionId,
        session: SessionId,
    ) -> (TaskEntry, CancellationToken) {
        let token = CancellationToken::new();
        let run = self.runs.fetch_add(1, Ordering::Relaxed);
        let registered = Registered {
            session,
            token: token.clone(),
            run,
        };
        let mut tasks = self.tasks();
        if let Some(earlier) = tasks.insert(id.clone(), registered) {
            // The run that asked is over: make sure it stops.
            earlier.token.cancel();
        }
        self.count.send_replace(tasks.len());
        drop(tasks);
        let entry = TaskEntry {
            registry: Arc::clone(self),
            id,
            run,
        };
        (entry, token)
    }

    /// Signals the tasks of these interactions, if they run here.
    pub fn cancel(&self, ids: &[InteractionId]) {
        let tasks = self.tasks();
        for id in ids {
            if let Some(task) = tasks.get(id) {
                task.token.cancel();
            }
        }
    }

    /// Interactions running here now, with their sessions.
    pub fn running(&self) -> Vec<(InteractionId, SessionId)> {
        self.tasks()
            .iter()
            .map(|(id, task)| (id.clone(), task.session.clone()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.tasks().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes its task's registry entry on drop, whatever way the task ended.
#[derive(Debug)]
pub struct TaskEntry {
    registry: Arc<TaskRegistry>,
    id: InteractionId,
    run: u64,
}

impl Drop for TaskEntry {
    fn drop(&mut self) {
        let mut tasks = self.registry.tasks();
        // Only this run's entry: a later run of the same interaction keeps its own.
        if tasks.get(&self.id).is_some_and(|task| task.run == self.run) {
            tasks.remove(&self.id);
            self.registry.count.send_replace(tasks.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{IdGenerator, SessionId};

    #[test]
    fn an_old_entry_never_removes_a_newer_one() {
        let registry = Arc::new(TaskRegistry::default());
        let mut ids = IdGenerator::default();
        let session = SessionId::new(&crate::model::Tenant::default_tenant(), "s").expect("valid");
        let (old, old_token) = registry.register(ids.next_id(), session.clone());
        let newer_id = ids.next_id();
        let (_newer, newer_token) = registry.register(newer_id.clone(), session.clone());
        drop(old);
        assert_eq!(registry.running(), vec![(newer_id.clone(), session)]);
        registry.cancel(&[newer_id]);
        assert!(newer_token.is_cancelled());
        assert!(!old_token.is_cancelled());
    }

    #[test]
    fn an_earlier_run_of_the_same_interaction_never_removes_the_later_one() {
        let registry = Arc::new(TaskRegistry::default());
        let session = SessionId::new(&crate::model::Tenant::default_tenant(), "s").expect("valid");
        let id = IdGenerator::default().next_id();
        let (asked, asked_token) = registry.register(id.clone(), session.clone());
        let (_resumed, resumed_token) = registry.register(id.clone(), session.clone());
        assert!(
            asked_token.is_cancelled(),
            "the earlier run is told to stop"
        );
        drop(asked);
        assert_eq!(registry.running(), vec![(id.clone(), session)]);
        registry.cancel(&[id]);
        assert!(resumed_token.is_cancelled());
    }
}
