//! Local fan-out of committed events: one bounded broadcast channel per session that has
//! subscribers. The store publishes after each commit, in seq order; a subscriber that falls
//! more than the buffer behind learns it (`Lagged`) and must resume from the store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{broadcast, oneshot};

use crate::model::{Event, Interaction, InteractionId, SessionId};

/// Events buffered per session for its slowest subscriber.
pub const DEFAULT_BUFFER: usize = 4096;

/// The registry of live subscribers per session.
pub struct Bus {
    // A std mutex: it guards a map lookup and non-blocking sends, never an await.
    sessions: Mutex<HashMap<SessionId, broadcast::Sender<Arc<Event>>>>,
    buffer: usize,
    published: AtomicU64,
    /// One-shot waiters for an interaction's final state (`?wait=`): far cheaper than a
    /// broadcast subscription per request.
    finals: Mutex<Finals>,
}

/// Final-state waiters by interaction, and how many wait in each session.
#[derive(Debug, Default)]
struct Finals {
    by_id: HashMap<InteractionId, Waiters>,
    sessions: HashMap<SessionId, usize>,
}

#[derive(Debug)]
struct Waiters {
    session: SessionId,
    senders: Vec<oneshot::Sender<Arc<Interaction>>>,
}

impl Finals {
    /// Removes the waiters of `id`, keeping the per-session count exact.
    fn take(&mut self, id: &InteractionId) -> Option<Vec<oneshot::Sender<Arc<Interaction>>>> {
        let waiters = self.by_id.remove(id)?;
        self.forget(&waiters.session, waiters.senders.len());
        Some(waiters.senders)
    }

    /// Takes `removed` waiters off `session`'s count.
    fn forget(&mut self, session: &SessionId, removed: usize) {
        if let Some(count) = self.sessions.get_mut(session) {
            *count = count.saturating_sub(removed);
            if *count == 0 {
                self.sessions.remove(session);
            }
        }
    }
}

impl Default for Bus {
    fn default() -> Self {
        Self::new(DEFAULT_BUFFER)
    }
}

impl Bus {
    pub fn new(buffer: usize) -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            buffer: buffer.max(1),
            published: AtomicU64::new(0),
            finals: Mutex::new(Finals::default()),
        }
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<SessionId, broadcast::Sender<Arc<Event>>>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts
        // and removes), so a poisoned lock is still usable.
        self.sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands committed events (in seq order) to the subscribers of their sessions.
    pub fn publish(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        self.published
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        let mut finals = self.finals();
        if !finals.by_id.is_empty() {
            for event in &events {
                if event.kind.is_final()
                    && let Some(id) = &event.interaction_id
                    && let Some(waiters) = finals.take(id)
                {
                    // An event read back from storage carries no interaction: the waiters are
                    // then released empty-handed and read the final state themselves.
                    if let Some(interaction) = &event.interaction {
                        for waiter in waiters {
                            let _ = waiter.send(Arc::clone(interaction));
                        }
                    }
                }
            }
        }
        drop(finals);
        let sessions = self.sessions();
        for event in events {
            if let Some(sender) = sessions.get(&event.session) {
                // An error only means every receiver is gone; the guard removes the entry.
                let _ = sender.send(Arc::new(event));
            }
        }
    }

    fn finals(&self) -> MutexGuard<'_, Finals> {
        self.finals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a waiter for the final event of `id` in `session`. The store calls this in
    /// the transaction that accepted the interaction, before publishing it, so no later final
    /// event can be missed.
    pub fn watch_final(self: &Arc<Self>, session: &SessionId, id: &InteractionId) -> FinalWatch {
        let (sender, receiver) = oneshot::channel();
        let mut finals = self.finals();
        finals
            .by_id
            .entry(id.clone())
            .or_insert_with(|| Waiters {
                session: session.clone(),
                senders: Vec::new(),
            })
            .senders
            .push(sender);
        *finals.sessions.entry(session.clone()).or_default() += 1;
        FinalWatch {
            receiver,
            bus: Arc::clone(self),
            id: id.clone(),
        }
    }

    /// Registered final-state waiters.
    pub fn final_watch_count(&self) -> usize {
        self.finals().by_id.values().map(|w| w.senders.len()).sum()
    }

    /// Whether `session` has live subscribers here.
    pub fn has_subscribers(&self, session: &SessionId) -> bool {
        self.sessions().contains_key(session)
    }

    /// Whether anyone here listens to `session`: a subscriber, or a final-state waiter.
    pub fn wants(&self, session: &SessionId) -> bool {
        self.sessions().contains_key(session) || self.finals().sessions.contains_key(session)
    }

    /// Subscribes to the live events of `session` from now on. With several nodes, a few
    /// events committed just before may come too (read back after a notification):
    /// consumers drop seqs they already have.
    pub fn subscribe(self: &Arc<Self>, session: &SessionId) -> Subscription {
        let receiver = self
            .sessions()
            .entry(session.clone())
            .or_insert_with(|| broadcast::channel(self.buffer).0)
            .subscribe();
        Subscription {
            receiver: Some(receiver),
            bus: Arc::clone(self),
            session: session.clone(),
        }
    }

    /// Sessions with at least one subscriber.
    pub fn session_count(&self) -> usize {
        self.sessions().len()
    }

    /// Live subscriptions over all sessions.
    pub fn subscriber_count(&self) -> usize {
        self.sessions()
            .values()
            .map(broadcast::Sender::receiver_count)
            .sum()
    }

    /// Events published since start.
    pub fn published_total(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("sessions", &self.session_count())
            .field("published", &self.published_total())
            .finish_non_exhaustive()
    }
}

/// A waiter for one interaction's final state; dropping it removes its registration (I6).
#[derive(Debug)]
pub struct FinalWatch {
    receiver: oneshot::Receiver<Arc<Interaction>>,
    bus: Arc<Bus>,
    id: InteractionId,
}

impl FinalWatch {
    /// The interaction once final; `None` if the bus went away.
    pub async fn wait(&mut self) -> Option<Arc<Interaction>> {
        (&mut self.receiver).await.ok()
    }
}

impl Drop for FinalWatch {
    fn drop(&mut self) {
        self.receiver.close();
        let mut finals = self.bus.finals();
        let finals = &mut *finals;
        if let Some(waiters) = finals.by_id.get_mut(&self.id) {
            let before = waiters.senders.len();
            waiters.senders.retain(|w| !w.is_closed());
            let removed = before - waiters.senders.len();
            let session = waiters.session.clone();
            if waiters.senders.is_empty() {
                finals.by_id.remove(&self.id);
            }
            finals.forget(&session, removed);
        }
    }
}

/// A live subscription; dropping it removes the session's channel once nobody listens (I6).
#[derive(Debug)]
pub struct Subscription {
    receiver: Option<broadcast::Receiver<Arc<Event>>>,
    bus: Arc<Bus>,
    session: SessionId,
}

impl Subscription {
    /// The next event; `Err(Lagged(n))` when `n` events were missed, `Err(Closed)` never
    /// while the bus lives.
    pub async fn recv(&mut self) -> Result<Arc<Event>, broadcast::error::RecvError> {
        match self.receiver.as_mut() {
            Some(receiver) => receiver.recv().await,
            None => Err(broadcast::error::RecvError::Closed),
        }
    }
}

impl Subscription {
    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Result<Arc<Event>, broadcast::error::TryRecvError> {
        match self.receiver.as_mut() {
            Some(receiver) => receiver.try_recv(),
            None => Err(broadcast::error::TryRecvError::Closed),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.receiver.take());
        let mut sessions = self.bus.sessions();
        // Under the lock no one can subscribe concurrently, so a zero count is exact.
        if sessions
            .get(&self.session)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            sessions.remove(&self.session);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EventType, Millis};

    fn event(session: &SessionId, seq: i64) -> Event {
        Event::new(
            session,
            seq,
            EventType::SessionCleared,
            Millis(0),
            None,
            &serde_json::json!({"epoch": seq}),
        )
        .expect("serialises")
    }

    #[tokio::test]
    async fn subscribers_get_events_in_order_and_cleanup_is_exact() {
        let bus = Arc::new(Bus::new(16));
        let s = SessionId::new(&crate::model::Tenant::default_tenant(), "s").expect("valid");
        let mut a = bus.subscribe(&s);
        let mut b = bus.subscribe(&s);
        bus.publish(vec![event(&s, 1), event(&s, 2)]);
        for sub in [&mut a, &mut b] {
            assert_eq!(sub.recv().await.expect("event").seq, 1);
            assert_eq!(sub.recv().await.expect("event").seq, 2);
        }
        assert_eq!(bus.subscriber_count(), 2);
        drop(a);
        assert_eq!(bus.session_count(), 1);
        drop(b);
        assert_eq!(bus.session_count(), 0);
    }
}
