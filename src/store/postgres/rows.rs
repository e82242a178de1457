//! Row decoding and the reads shared by the store's operations.

use std::sync::Arc;

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use crate::model::{
    CancelReason, ErrorInfo, Event, EventType, Interaction, InteractionId, Millis, Session,
    SessionId, Status,
};
use crate::store::{StoreError, StoreResult};

/// One session with its running interaction and queue length, in a single statement.
pub(super) const SESSION_SELECT: &str = concat!(
    "SELECT s.id, s.agent, s.context, s.epoch, s.last_seq, s.created_at, \
     (SELECT count(*) FROM interactions q WHERE q.session = s.id AND q.status IN ",
    status_sql!(queued),
    "), r.id, r.session, r.content, r.metadata, r.status, r.response, r.error_code, \
     r.error_message, r.cancel_reason, r.created_at, r.started_at, r.finished_at, \
     r.request, r.answers, r.input_deadline \
     FROM sessions s LEFT JOIN interactions r ON r.session = s.id AND r.status IN ",
    status_sql!(active)
);

pub(super) async fn require_session(
    client: &impl GenericClient,
    id: &SessionId,
) -> StoreResult<()> {
    let stmt = client
        .prepare_cached("SELECT 1 FROM sessions WHERE id = $1")
        .await?;
    match client.query_opt(&stmt, &[&id.key()]).await? {
        Some(_) => Ok(()),
        None => Err(StoreError::SessionNotFound),
    }
}

pub(super) async fn select_session(
    client: &impl GenericClient,
    id: &SessionId,
) -> StoreResult<Option<Session>> {
    let stmt = client
        .prepare_cached(&format!("{SESSION_SELECT} WHERE s.id = $1"))
        .await?;
    match client.query_opt(&stmt, &[&id.key()]).await? {
        Some(row) => Ok(Some(read_session(&row)?)),
        None => Ok(None),
    }
}

pub(super) async fn select_interaction(
    client: &impl GenericClient,
    id: &InteractionId,
) -> StoreResult<Option<Interaction>> {
    let stmt = client
        .prepare_cached(concat!(
            "SELECT ",
            interaction_columns!(),
            " FROM interactions WHERE id = $1"
        ))
        .await?;
    match client.query_opt(&stmt, &[&id.as_str()]).await? {
        Some(row) => Ok(Some(read_interaction(&row, 0)?)),
        None => Ok(None),
    }
}

pub(super) fn stored<T>(what: &str, r: Result<T, impl std::fmt::Display>) -> StoreResult<T> {
    r.map_err(|e| StoreError::Internal(format!("stored {what}: {e}")))
}

pub(super) fn read_event(r: &Row) -> StoreResult<Event> {
    let session: &str = r.try_get(0)?;
    let kind: &str = r.try_get(2)?;
    let envelope: &str = r.try_get(4)?;
    Ok(Event {
        session: stored("session id", SessionId::from_key(session))?,
        seq: r.try_get(1)?,
        kind: stored("event type", kind.parse::<EventType>())?,
        interaction_id: r
            .try_get::<_, Option<String>>(3)?
            .map(InteractionId::from_stored),
        envelope: Arc::from(envelope),
        interaction: None,
    })
}

pub(super) fn read_session(r: &Row) -> StoreResult<Session> {
    let id: &str = r.try_get(0)?;
    let context: &str = r.try_get(2)?;
    let running_id: Option<&str> = r.try_get(7)?;
    Ok(Session {
        id: stored("session id", SessionId::from_key(id))?,
        agent: r.try_get(1)?,
        context: serde_json::from_str(context)?,
        epoch: r.try_get(3)?,
        last_seq: r.try_get(4)?,
        created_at: Millis(r.try_get(5)?),
        queued: r.try_get(6)?,
        running: match running_id {
            Some(_) => Some(read_interaction(r, 7)?),
            None => None,
        },
    })
}

pub(super) fn read_interaction(r: &Row, at: usize) -> StoreResult<Interaction> {
    let session: &str = r.try_get(at + 1)?;
    let metadata: &str = r.try_get(at + 3)?;
    let status: &str = r.try_get(at + 4)?;
    let error_code: Option<String> = r.try_get(at + 6)?;
    let reason: Option<&str> = r.try_get(at + 8)?;
    Ok(Interaction {
        id: InteractionId::from_stored(r.try_get(at)?),
        session: stored("session id", SessionId::from_key(session))?,
        content: r.try_get(at + 2)?,
        metadata: serde_json::from_str(metadata)?,
        status: stored("status", status.parse::<Status>())?,
        response: r.try_get(at + 5)?,
        error: match error_code {
            Some(code) => Some(ErrorInfo {
                code,
                message: r.try_get::<_, Option<String>>(at + 7)?.unwrap_or_default(),
            }),
            None => None,
        },
        cancel_reason: match reason {
            Some(reason) => Some(stored("cancel reason", reason.parse::<CancelReason>())?),
            None => None,
        },
        created_at: Millis(r.try_get(at + 9)?),
        started_at: r.try_get::<_, Option<i64>>(at + 10)?.map(Millis),
        finished_at: r.try_get::<_, Option<i64>>(at + 11)?.map(Millis),
        request: match r.try_get::<_, Option<&str>>(at + 12)? {
            Some(text) => Some(serde_json::from_str(text)?),
            None => None,
        },
        answers: match r.try_get::<_, Option<&str>>(at + 13)? {
            Some(text) => serde_json::from_str(text)?,
            None => Vec::new(),
        },
        input_deadline: r.try_get::<_, Option<i64>>(at + 14)?.map(Millis),
    })
}
