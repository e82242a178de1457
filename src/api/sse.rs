//! `GET /v1/sessions/{id}/events`: the session's events as Server-Sent Events.

use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use tokio_util::sync::CancellationToken;

use super::AppState;
use super::auth::ReadSession;
use super::connections::ConnectionGuard;
use super::error::ApiError;
use super::extract::QueryParams;
use super::feed::{EventFeed, FeedItem, IfMissing, StartAt, deadline};
use super::listener::HttpSlot;
use crate::model::EventType;

/// Keep-alive comment interval (API.md: every 15 s).
const KEEPALIVE: Duration = Duration::from_secs(15);

struct StreamState {
    feed: EventFeed,
    stopping: CancellationToken,
    /// A session token's expiry: the stream ends then (reconnect with a new token and
    /// `Last-Event-ID`).
    expires: Option<tokio::time::Instant>,
    finished: bool,
    _guard: ConnectionGuard,
}

pub async fn events(
    State(state): State<AppState>,
    ReadSession(session, principal): ReadSession,
    query: QueryParams,
    headers: HeaderMap,
    slot: Option<Extension<HttpSlot>>,
) -> Result<Response, ApiError> {
    let last_event_id = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::invalid_request("Last-Event-ID must be ASCII"))
        })
        .transpose()?;
    let start = StartAt::from_request(&query, last_event_id)?;
    let guard = state.connections.open(&session)?;
    let (feed, _) = EventFeed::open(&state.engine, &session, start, IfMissing::NotFound).await?;
    let initial = StreamState {
        feed,
        stopping: state.engine.stopping(),
        expires: principal.expires_at().map(deadline),
        finished: false,
        _guard: guard,
    };
    let events = stream::unfold(initial, |mut s| async move {
        if s.finished {
            return None;
        }
        let expiry = async {
            match s.expires {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let item = tokio::select! {
            _ = s.stopping.cancelled() => return None,
            _ = expiry => {
                s.finished = true;
                let comment = SseEvent::default().comment("token expired");
                return Some((Ok(comment), s));
            }
            item = s.feed.next() => item,
        };
        let sse = match item {
            Ok(FeedItem::Event(event)) => {
                // The session is gone: nothing can follow its last event.
                s.finished = event.kind == EventType::SessionDeleted;
                SseEvent::default()
                    .id(event.seq.to_string())
                    .event(event.kind.as_str())
                    .data(&*event.envelope)
            }
            Ok(FeedItem::Lagged { last_sent }) => {
                s.finished = true;
                SseEvent::default().comment(format!(
                    "too slow: reconnect with Last-Event-ID: {last_sent} (after={last_sent})"
                ))
            }
            Ok(FeedItem::Closed) => return None,
            Err(e) => {
                tracing::warn!(error = %e, "SSE replay failed");
                return None;
            }
        };
        Some((Ok::<_, Infallible>(sse), s))
    });
    // Counted among the streams now: its connection leaves the slots of short requests, and
    // closes when the stream ends (it holds no slot to serve another request with).
    if let Some(Extension(slot)) = slot {
        slot.release();
    }
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEPALIVE).text("keepalive"))
        .into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    Ok(response)
}
