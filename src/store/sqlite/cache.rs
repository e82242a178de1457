//! The writer's memory of active sessions: the state the rules look at, kept from one
//! operation to the next, so the hot path (accept, a task's writes, finish) skips its reads.
//!
//! Only the writer thread changes the database, and it updates an entry only after the
//! operation's plan was applied; whenever a write might not stand (a rolled back job, a failed
//! commit, a panic) the writer forgets everything, and the next operation reads again.

use std::collections::HashMap;

use crate::model::{InteractionId, SessionId};
use crate::session::SessionState;

/// Sessions remembered at most; past it, an arbitrary one is forgotten.
const SESSIONS: usize = 4096;
/// A session whose active interactions hold more text than this is not remembered.
const CONTENT_BYTES: usize = 64 * 1024;

#[derive(Default)]
pub(super) struct SessionCache {
    sessions: HashMap<SessionId, SessionState>,
    /// The session of each remembered running interaction (a task's writes name only it).
    running: HashMap<InteractionId, SessionId>,
}

impl SessionCache {
    pub(super) fn get(&self, id: &SessionId) -> Option<&SessionState> {
        self.sessions.get(id)
    }

    pub(super) fn session_running(&self, id: &InteractionId) -> Option<&SessionId> {
        self.running.get(id)
    }

    /// Remembers `state` as the session's current one (`None`: it no longer exists).
    pub(super) fn put(&mut self, id: &SessionId, state: Option<SessionState>) {
        self.forget(id);
        let Some(state) = state else {
            return;
        };
        let content: usize = state
            .running
            .iter()
            .chain(&state.queued)
            .map(|i| i.content.len() + i.response.len())
            .sum();
        if content > CONTENT_BYTES {
            return;
        }
        if self.sessions.len() >= SESSIONS
            && let Some(victim) = self.sessions.keys().next().cloned()
        {
            self.forget(&victim);
        }
        if let Some(running) = &state.running {
            self.running.insert(running.id.clone(), id.clone());
        }
        self.sessions.insert(id.clone(), state);
    }

    pub(super) fn forget(&mut self, id: &SessionId) {
        if let Some(old) = self.sessions.remove(id)
            && let Some(running) = old.running
        {
            self.running.remove(&running.id);
        }
    }

    pub(super) fn clear(&mut self) {
        self.sessions.clear();
        self.running.clear();
    }
}
