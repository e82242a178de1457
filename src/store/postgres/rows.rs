//! Row decoding and the reads shared by the store's operations.

use std::sync::Arc;

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use crate::model::{Event, EventType, Interaction, InteractionId, Session, SessionId};
use crate::store::columns::{self, Columns, stored};
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

impl Columns for Row {
    fn string(&self, at: usize) -> StoreResult<String> {
        Ok(self.try_get(at)?)
    }

    fn optional_string(&self, at: usize) -> StoreResult<Option<String>> {
        Ok(self.try_get(at)?)
    }

    fn int(&self, at: usize) -> StoreResult<i64> {
        Ok(self.try_get(at)?)
    }

    fn optional_int(&self, at: usize) -> StoreResult<Option<i64>> {
        Ok(self.try_get(at)?)
    }

    fn with_text<T>(
        &self,
        at: usize,
        f: impl FnOnce(Option<&str>) -> StoreResult<T>,
    ) -> StoreResult<T> {
        f(self.try_get::<_, Option<&str>>(at)?)
    }
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
    columns::session(r)
}

pub(super) fn read_interaction(r: &Row, at: usize) -> StoreResult<Interaction> {
    columns::interaction(r, at)
}
