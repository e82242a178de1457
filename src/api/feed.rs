//! A session's event feed for one streaming client: the stored events after a position
//! (the replay), then live ones, with no gap and no duplicate at the seam.
//!
//! The subscription to the bus is taken *before* the store is read, so every event committed
//! after that moment arrives live, and every event committed before it is in the replay;
//! events that are in both are dropped by seq.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::error::ApiError;
use super::extract::QueryParams;
use crate::bus::Subscription;
use crate::engine::{Engine, EngineError};
use crate::model::{Event, Session, SessionId};

/// Stored events read per page while replaying.
const REPLAY_PAGE: u32 = 1000;

/// What a feed yields next.
#[derive(Debug)]
pub enum FeedItem {
    Event(Arc<Event>),
    /// The client fell more than the bus buffer behind; it resumes with `after` = this seq.
    Lagged {
        last_sent: i64,
    },
    /// The bus is gone (the server is stopping).
    Closed,
}

/// Where a stream starts, as its client asked: `after=N` (or `Last-Event-ID: N`) replays
/// `seq > N`; `replay=true` replays everything retained; neither means only new events.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartAt {
    after: Option<i64>,
    replay: bool,
}

impl StartAt {
    /// Reads and validates `after`, `replay` and the `Last-Event-ID` header (SSE only; `after`
    /// wins over it). Called before anything is opened, so a refusal leaves nothing behind.
    pub fn from_request(
        query: &QueryParams,
        last_event_id: Option<&str>,
    ) -> Result<Self, ApiError> {
        // A malformed header is refused even where `after` wins over it.
        let last_event_id = match last_event_id {
            Some(raw) => Some(parse_seq(raw.trim(), "Last-Event-ID")?),
            None => None,
        };
        let after = match query.get("after")? {
            Some(raw) => Some(parse_seq(raw, "after")?),
            None => last_event_id,
        };
        let replay = match query.get("replay")? {
            None | Some("false") => false,
            Some("true") => true,
            Some(_) => {
                return Err(ApiError::invalid_request("replay must be true or false"));
            }
        };
        Ok(Self { after, replay })
    }
}

fn parse_seq(raw: &str, name: &str) -> Result<i64, ApiError> {
    match raw.parse::<i64>() {
        Ok(n) if n >= 0 => Ok(n),
        _ => Err(ApiError::invalid_request(format!(
            "{name} must be a non-negative integer (an event seq)"
        ))),
    }
}

/// What a stream on a session that does not exist does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfMissing {
    /// Creates it with the default agent (a WebSocket: opening it creates the session).
    Create,
    /// Answers `404` (SSE: reads are 404 on a missing session).
    NotFound,
}

/// The monotonic instant of a wall-clock time (now, when it is past): when a session token's
/// stream ends.
pub fn deadline(at: std::time::SystemTime) -> tokio::time::Instant {
    let left = at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::Instant::now() + left
}

pub struct EventFeed {
    engine: Engine,
    session: SessionId,
    subscription: Subscription,
    replay: VecDeque<Event>,
    replaying: bool,
    last_sent: i64,
}

impl EventFeed {
    /// Opens `session`'s stream at `start`, the one start of both WebSocket and SSE: subscribes,
    /// then reads (or creates) the session, so every event after the session as returned
    /// arrives live and every one before it is in the replay.
    pub async fn open(
        engine: &Engine,
        session: &SessionId,
        start: StartAt,
        missing: IfMissing,
    ) -> Result<(Self, Session), ApiError> {
        let mut feed = Self::subscribe(engine, session);
        let current = match missing {
            IfMissing::Create => engine.put_session(session.clone(), None, None).await?.0,
            IfMissing::NotFound => engine.get_session(session.clone()).await?,
        };
        let last_seq = current.last_seq;
        match start {
            StartAt {
                after: Some(after), ..
            } => feed.start_after(after, true, last_seq),
            StartAt {
                after: None,
                replay: true,
            } => feed.start_after(0, true, last_seq),
            StartAt {
                after: None,
                replay: false,
            } => feed.start_after(last_seq, false, last_seq),
        }
        Ok((feed, current))
    }

    /// Subscribes to `session`'s live events. Call [`EventFeed::start_after`] next, once the
    /// position is known (for a WebSocket, after the `hello` was read).
    pub fn subscribe(engine: &Engine, session: &SessionId) -> Self {
        Self {
            engine: engine.clone(),
            session: session.clone(),
            subscription: engine.bus().subscribe(session),
            replay: VecDeque::new(),
            replaying: false,
            last_sent: 0,
        }
    }

    /// Delivers stored events with `seq > after` (when `replay`), then live ones; without
    /// `replay`, only live events with `seq > after`. `last_seq` is the session's last seq as
    /// read after subscribing: every later event must arrive live.
    pub fn start_after(&mut self, after: i64, replay: bool, last_seq: i64) {
        self.last_sent = after;
        self.replaying = replay;
        self.engine.anchor(&self.session, last_seq);
    }

    /// The seq of the last event handed out.
    pub fn last_sent(&self) -> i64 {
        self.last_sent
    }

    /// The next event if it is at hand without waiting — a replayed one already read from
    /// the store, or a live one already published — to batch socket writes (a replay too is
    /// written a burst per flush, not an event per flush).
    pub fn try_next(&mut self) -> Option<FeedItem> {
        while let Some(event) = self.replay.pop_front() {
            if event.seq > self.last_sent {
                self.last_sent = event.seq;
                return Some(FeedItem::Event(Arc::new(event)));
            }
        }
        if self.replaying {
            // The next page needs a store read: `next` does it.
            return None;
        }
        loop {
            match self.subscription.try_recv() {
                Ok(event) if event.seq > self.last_sent => {
                    self.last_sent = event.seq;
                    return Some(FeedItem::Event(event));
                }
                Ok(_) => {}
                Err(TryRecvError::Lagged(_)) => {
                    return Some(FeedItem::Lagged {
                        last_sent: self.last_sent,
                    });
                }
                Err(TryRecvError::Empty | TryRecvError::Closed) => return None,
            }
        }
    }

    pub async fn next(&mut self) -> Result<FeedItem, EngineError> {
        loop {
            if let Some(event) = self.replay.pop_front() {
                if event.seq > self.last_sent {
                    self.last_sent = event.seq;
                    return Ok(FeedItem::Event(Arc::new(event)));
                }
                continue;
            }
            if !self.replaying {
                break;
            }
            // Boxed: a feed waiting for live events then holds no room for a store read.
            let read = self
                .engine
                .events_after(self.session.clone(), self.last_sent, REPLAY_PAGE);
            let page = Box::pin(read).await?;
            if (page.len() as u32) < REPLAY_PAGE {
                self.replaying = false;
            }
            self.replay.extend(page);
        }
        loop {
            match self.subscription.recv().await {
                Ok(event) if event.seq > self.last_sent => {
                    self.last_sent = event.seq;
                    return Ok(FeedItem::Event(event));
                }
                // Already replayed (committed before the read, published after the subscribe).
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => {
                    return Ok(FeedItem::Lagged {
                        last_sent: self.last_sent,
                    });
                }
                Err(RecvError::Closed) => return Ok(FeedItem::Closed),
            }
        }
    }
}
