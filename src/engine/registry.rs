//! The tasks running on this node, keyed by interaction id so that cleanup is exact (I6): a
//! finished task removes its own entry and never a newer task's of the same session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;

use crate::model::{InteractionId, SessionId};

#[derive(Debug, Default)]
pub struct TaskRegistry {
    // A std mutex: held for a map operation, never across an await.
    tasks: Mutex<HashMap<InteractionId, (SessionId, CancellationToken)>>,
}

impl TaskRegistry {
    fn tasks(&self) -> MutexGuard<'_, HashMap<InteractionId, (SessionId, CancellationToken)>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a task; the returned guard removes exactly this entry when dropped.
    pub fn register(
        self: &Arc<Self>,
        id: InteractionId,
        session: SessionId,
    ) -> (TaskEntry, CancellationToken) {
        let token = CancellationToken::new();
        self.tasks().insert(id.clone(), (session, token.clone()));
        let entry = TaskEntry {
            registry: Arc::clone(self),
            id,
        };
        (entry, token)
    }

    /// Signals the tasks of these interactions, if they run here.
    pub fn cancel(&self, ids: &[InteractionId]) {
        let tasks = self.tasks();
        for id in ids {
            if let Some((_, token)) = tasks.get(id) {
                token.cancel();
            }
        }
    }

    /// Interactions running here now, with their sessions.
    pub fn running(&self) -> Vec<(InteractionId, SessionId)> {
        self.tasks()
            .iter()
            .map(|(id, (session, _))| (id.clone(), session.clone()))
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
}

impl Drop for TaskEntry {
    fn drop(&mut self) {
        self.registry.tasks().remove(&self.id);
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
}
