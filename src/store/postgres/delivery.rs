//! Cross-node delivery: this node's notes (events appended, interactions cancelled) sent in
//! batches, the listener that hears the other nodes' notes, the filler that reads their
//! events back, and the sequencer that publishes every session's events in seq order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

use super::tls::MakeRustls;

use super::rows::read_event;
use crate::bus::Bus;
use crate::model::{Event, InteractionId, SessionId};
use crate::store::{StoreError, StoreResult};

/// The notification channel of appended events: payload `SESSION FIRST_SEQ LAST_SEQ`.
const EVENTS_CHANNEL: &str = "baton_events";
/// The notification channel of cancelled interactions: payload the interaction id.
const CANCEL_CHANNEL: &str = "baton_cancel";
/// Event rows read by one catch-up query at most.
const FILL_BATCH: i64 = 2000;

/// Publishes events on the local bus in seq order per session, without gap or duplicate,
/// whether they come from this node's commits or from other nodes (read back after a notify).
pub(super) struct Sequencer {
    bus: Arc<Bus>,
    /// Last seq published per session that somebody here listens to.
    cursors: Mutex<HashMap<SessionId, i64>>,
    fills: mpsc::UnboundedSender<Fill>,
}

/// A request to read a session's events after `after` from the database and publish them.
pub(super) struct Fill {
    session: SessionId,
    after: i64,
}

impl Sequencer {
    pub(super) fn new(bus: Arc<Bus>, fills: mpsc::UnboundedSender<Fill>) -> Self {
        Self {
            bus,
            cursors: Mutex::new(HashMap::new()),
            fills,
        }
    }

    /// Publishes `events` (ascending per session). A commit's own events must follow the
    /// cursor exactly, else the missing ones are read back first; events read back from the
    /// database (`from_storage`) may skip seqs that no longer exist.
    pub(super) fn deliver(&self, events: Vec<Event>, from_storage: bool) {
        if events.is_empty() {
            return;
        }
        let mut cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        let mut batch: Vec<Event> = Vec::new();
        let mut rest = events.into_iter().peekable();
        while let Some(first) = rest.next() {
            let session = first.session.clone();
            let mut group = vec![first];
            while let Some(next) = rest.next_if(|e| e.session == session) {
                group.push(next);
            }
            if !self.bus.wants(&session) {
                cursors.remove(&session);
                // Nobody subscribes here; waiters are registered with their session.
                batch.extend(group);
                continue;
            }
            let cursor = cursors.get(&session).copied();
            if cursor.is_none() && self.bus.has_subscribers(&session) {
                // A subscriber whose start is not known yet: its anchor reads these back.
                continue;
            }
            group.retain(|e| cursor.is_none_or(|c| e.seq > c));
            let Some(first_seq) = group.first().map(|e| e.seq) else {
                continue;
            };
            if let Some(c) = cursor
                && first_seq != c + 1
                && !from_storage
            {
                // Someone else's commit came in between: read it back, then ours again.
                let _ = self.fills.send(Fill { session, after: c });
                continue;
            }
            let last = group.last().map_or(first_seq, |e| e.seq);
            cursors.insert(session, last);
            batch.extend(group);
        }
        self.bus.publish(batch);
    }

    /// A notification of `first..=last` appended to `session` by some node.
    fn notified(&self, session: SessionId, first: i64, last: i64) {
        if !self.bus.wants(&session) {
            return;
        }
        let cursor = self
            .cursors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&session)
            .copied();
        let after = match cursor {
            Some(c) if c >= last => return,
            Some(c) => c,
            // A subscriber still to be anchored reads everything from its anchor.
            None if self.bus.has_subscribers(&session) => return,
            // Only final-state waiters: they wait for later events than these.
            None => first - 1,
        };
        let _ = self.fills.send(Fill { session, after });
    }

    /// A subscriber knows everything up to `last_seq`: start ordering the session there
    /// (unless it is ordered already: then it published everything later since).
    pub(super) fn anchor(&self, session: &SessionId, last_seq: i64) {
        let mut cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        if cursors.contains_key(session) {
            return;
        }
        cursors.insert(session.clone(), last_seq);
        let _ = self.fills.send(Fill {
            session: session.clone(),
            after: last_seq,
        });
    }

    /// After the listener reconnected: read back every watched session from its cursor.
    fn refill_all(&self) {
        let cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        for (session, &after) in cursors.iter() {
            let _ = self.fills.send(Fill {
                session: session.clone(),
                after,
            });
        }
    }

    fn cursor(&self, session: &SessionId) -> Option<i64> {
        self.cursors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(session)
            .copied()
    }

    /// The watched sessions and their cursors.
    fn watched(&self) -> Vec<(SessionId, i64)> {
        let cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        cursors.iter().map(|(s, &c)| (s.clone(), c)).collect()
    }

    /// The database holds events of `session` after `cursor` (the watchdog's finding): read
    /// them back unless they were published meanwhile. A commit still on its way to being
    /// published here only repeats a read; the sequencer drops what it already has.
    fn behind(&self, session: SessionId, cursor: i64) {
        if self.cursor(&session) == Some(cursor) {
            let _ = self.fills.send(Fill {
                session,
                after: cursor,
            });
        }
    }

    /// Forgets cursors of sessions nobody listens to any more.
    fn prune(&self) {
        let mut cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        cursors.retain(|session, _| self.bus.wants(session));
    }
}

/// What a commit tells the other nodes.
pub(super) enum Note {
    /// Events `first..=last` were appended to the session.
    Events(SessionId, i64, i64),
    /// The interaction was cancelled (its node stops its task).
    Cancel(InteractionId),
}

/// Notes sent in one batch at most.
const NOTE_BATCH: usize = 2000;
/// How often every watched session is compared with the database, in case a notification
/// was lost (a node that died between its commit and its notify, a dropped listener).
const WATCHDOG_INTERVAL: Duration = Duration::from_secs(1);

/// Sends this node's notes in batches: one short autocommit statement per batch, so the
/// notification queue's lock is taken once per batch, never inside a write transaction.
pub(super) async fn run_notifier(pool: Pool, mut notes: mpsc::UnboundedReceiver<Note>) {
    let mut batch = Vec::with_capacity(NOTE_BATCH);
    while notes.recv_many(&mut batch, NOTE_BATCH).await > 0 {
        // One notification per session per batch: the highest seq covers the rest.
        let mut ranges: HashMap<SessionId, (i64, i64)> = HashMap::new();
        let mut channels: Vec<&str> = Vec::with_capacity(batch.len());
        let mut payloads: Vec<String> = Vec::with_capacity(batch.len());
        for note in batch.drain(..) {
            match note {
                Note::Events(session, first, last) => {
                    let range = ranges.entry(session).or_insert((first, last));
                    range.0 = range.0.min(first);
                    range.1 = range.1.max(last);
                }
                Note::Cancel(id) => {
                    channels.push(CANCEL_CHANNEL);
                    payloads.push(id.to_string());
                }
            }
        }
        for (session, (first, last)) in ranges {
            channels.push(EVENTS_CHANNEL);
            payloads.push(format!("{} {first} {last}", session.key()));
        }
        for attempt in 1..=5u32 {
            let sent = async {
                let client = pool.get().await?;
                let stmt = client
                    .prepare_cached(
                        "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS t(c, p)",
                    )
                    .await?;
                client.execute(&stmt, &[&channels, &payloads]).await?;
                Ok::<_, StoreError>(())
            };
            match sent.await {
                Ok(()) => break,
                Err(e) => {
                    // Other nodes' watchdogs catch up on what they were not told.
                    tracing::warn!(error = %e, attempt, "notifying other nodes");
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
            }
        }
    }
}

/// Compares every watched session's last seq in the database with what was published here,
/// and reads back what a lost notification would have announced.
pub(super) async fn run_watchdog(pool: Pool, sequencer: Arc<Sequencer>) {
    loop {
        tokio::time::sleep(WATCHDOG_INTERVAL).await;
        let watched = sequencer.watched();
        if watched.is_empty() {
            continue;
        }
        let (sessions, cursors): (Vec<String>, Vec<i64>) = watched
            .into_iter()
            .map(|(s, c)| (s.key().to_string(), c))
            .unzip();
        let behind = async {
            let client = pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT s.id, c.cursor FROM unnest($1::text[], $2::bigint[]) AS c(id, cursor) \
                     JOIN sessions s ON s.id = c.id WHERE s.last_seq > c.cursor",
                )
                .await?;
            let rows = client.query(&stmt, &[&sessions, &cursors]).await?;
            rows.iter()
                .map(|r| Ok((r.try_get::<_, String>(0)?, r.try_get::<_, i64>(1)?)))
                .collect::<Result<Vec<_>, StoreError>>()
        };
        match behind.await {
            Ok(rows) => {
                for (session, after) in rows {
                    if let Ok(session) = SessionId::from_key(&session) {
                        sequencer.behind(session, after);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "checking watched sessions"),
        }
    }
}

/// Reads back and publishes the events that notifications announced: every pending session
/// in one query.
pub(super) async fn run_filler(
    pool: Pool,
    sequencer: Arc<Sequencer>,
    mut fills: mpsc::UnboundedReceiver<Fill>,
) {
    let mut pending: HashMap<SessionId, i64> = HashMap::new();
    loop {
        if pending.is_empty() {
            let Some(fill) = fills.recv().await else {
                return;
            };
            pending.insert(fill.session, fill.after);
        }
        while let Ok(fill) = fills.try_recv() {
            let after = pending.entry(fill.session).or_insert(fill.after);
            *after = (*after).min(fill.after);
        }
        // Start where the cursor is now (it may have moved since the request).
        let mut sessions = Vec::with_capacity(pending.len());
        let mut afters = Vec::with_capacity(pending.len());
        for (session, after) in &pending {
            let from = sequencer.cursor(session).map_or(*after, |c| c.max(*after));
            sessions.push(session.key().to_string());
            afters.push(from);
        }
        let read = async {
            let client = pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT e.session, e.seq, e.type, e.interaction_id, e.envelope \
                     FROM unnest($1::text[], $2::bigint[]) AS c(session, after) \
                     JOIN events e ON e.session = c.session AND e.seq > c.after \
                     ORDER BY e.session, e.seq LIMIT $3",
                )
                .await?;
            let rows = client
                .query(&stmt, &[&sessions, &afters, &FILL_BATCH])
                .await?;
            rows.iter().map(read_event).collect::<StoreResult<Vec<_>>>()
        };
        match read.await {
            Ok(events) => {
                let full = events.len() as i64 >= FILL_BATCH;
                let mut reached: HashMap<SessionId, i64> = HashMap::new();
                for e in &events {
                    reached.insert(e.session.clone(), e.seq);
                }
                sequencer.deliver(events, true);
                if full {
                    // More to read: continue from where each session got to.
                    for (session, seq) in reached {
                        pending.insert(session, seq);
                    }
                } else {
                    pending.clear();
                }
                sequencer.prune();
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading events announced by other nodes");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Keeps one connection listening to the notification channels; reconnects when it drops
/// and then re-reads every watched session from its cursor.
pub(super) async fn run_listener(
    mut config: tokio_postgres::Config,
    tls: MakeRustls,
    sequencer: Arc<Sequencer>,
    cancels: mpsc::UnboundedSender<InteractionId>,
) {
    config.application_name("baton-listener");
    let mut first = true;
    loop {
        match listen_once(&config, &tls, &sequencer, &cancels, &mut first).await {
            Ok(()) => tracing::warn!("the database's notification connection ended; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %e, "the database's notification connection failed; reconnecting")
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn listen_once(
    config: &tokio_postgres::Config,
    tls: &MakeRustls,
    sequencer: &Arc<Sequencer>,
    cancels: &mpsc::UnboundedSender<InteractionId>,
    first: &mut bool,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(tls.clone()).await?;
    let (messages_tx, mut messages) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = stream.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if messages_tx.send(n).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "notification connection");
                    break;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {EVENTS_CHANNEL}; LISTEN {CANCEL_CHANNEL}"))
        .await?;
    if !*first {
        // Whatever was notified while nobody listened is in the tables: read it back.
        sequencer.refill_all();
    }
    *first = false;
    while let Some(n) = messages.recv().await {
        match n.channel() {
            EVENTS_CHANNEL => {
                let mut parts = n.payload().split(' ');
                let (Some(session), Some(first), Some(last)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                let (Ok(session), Ok(first), Ok(last)) =
                    (SessionId::from_key(session), first.parse(), last.parse())
                else {
                    continue;
                };
                sequencer.notified(session, first, last);
            }
            CANCEL_CHANNEL => {
                let _ = cancels.send(InteractionId::from_stored(n.payload().to_string()));
            }
            _ => {}
        }
    }
    driver.abort();
    Ok(())
}
