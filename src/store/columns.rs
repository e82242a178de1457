//! Decoding stored sessions and interactions, once for both backends: a backend hands over
//! its row's columns by index ([`Columns`]); this module turns them into the model's types.
//! The column order is [`interaction_columns!`]'s, and a session's select puts the running
//! interaction's columns after its own seven.

use crate::model::{ErrorInfo, Interaction, InteractionId, Millis, Session, SessionId};
use crate::store::{StoreError, StoreResult};

/// A stored row, column by column.
pub(super) trait Columns {
    fn string(&self, at: usize) -> StoreResult<String>;
    fn optional_string(&self, at: usize) -> StoreResult<Option<String>>;
    fn int(&self, at: usize) -> StoreResult<i64>;
    fn optional_int(&self, at: usize) -> StoreResult<Option<i64>>;
    /// A text column, read in place (no copy) for what is parsed from it; `None` for NULL.
    fn with_text<T>(
        &self,
        at: usize,
        f: impl FnOnce(Option<&str>) -> StoreResult<T>,
    ) -> StoreResult<T>;
}

/// Stored data that does not parse: the database holds what this version cannot read.
pub(super) fn stored<T>(what: &str, r: Result<T, impl std::fmt::Display>) -> StoreResult<T> {
    r.map_err(|e| StoreError::Internal(format!("stored {what}: {e}")))
}

fn required<'a>(what: &str, text: Option<&'a str>) -> StoreResult<&'a str> {
    text.ok_or_else(|| StoreError::Internal(format!("stored {what}: NULL")))
}

/// A text column parsed with `FromStr`.
fn parsed<T: std::str::FromStr>(row: &impl Columns, at: usize, what: &str) -> StoreResult<T>
where
    T::Err: std::fmt::Display,
{
    row.with_text(at, |text| stored(what, required(what, text)?.parse::<T>()))
}

/// A text column holding JSON.
fn json<T: serde::de::DeserializeOwned>(
    row: &impl Columns,
    at: usize,
    what: &str,
) -> StoreResult<T> {
    row.with_text(at, |text| {
        stored(what, serde_json::from_str(required(what, text)?))
    })
}

/// A nullable text column holding JSON; `None` for NULL.
fn optional_json<T: serde::de::DeserializeOwned>(
    row: &impl Columns,
    at: usize,
    what: &str,
) -> StoreResult<Option<T>> {
    row.with_text(at, |text| {
        text.map(|text| stored(what, serde_json::from_str(text)))
            .transpose()
    })
}

/// The session of a session select: its columns, then its running interaction's (all NULL
/// when none runs).
pub(super) fn session(row: &impl Columns) -> StoreResult<Session> {
    let has_running = row.with_text(7, |id| Ok(id.is_some()))?;
    Ok(Session {
        id: row.with_text(0, |id| {
            stored(
                "session id",
                SessionId::from_key(required("session id", id)?),
            )
        })?,
        agent: row.string(1)?,
        context: json(row, 2, "context")?,
        epoch: row.int(3)?,
        last_seq: row.int(4)?,
        created_at: Millis(row.int(5)?),
        queued: row.int(6)?,
        running: if has_running {
            Some(interaction(row, 7)?)
        } else {
            None
        },
    })
}

/// The interaction whose [`interaction_columns!`] start at column `at`.
pub(super) fn interaction(row: &impl Columns, at: usize) -> StoreResult<Interaction> {
    Ok(Interaction {
        id: InteractionId::from_stored(row.string(at)?),
        session: row.with_text(at + 1, |id| {
            stored(
                "session id",
                SessionId::from_key(required("session id", id)?),
            )
        })?,
        content: row.string(at + 2)?,
        metadata: json(row, at + 3, "metadata")?,
        status: parsed(row, at + 4, "status")?,
        response: row.string(at + 5)?,
        error: match row.optional_string(at + 6)? {
            Some(code) => Some(ErrorInfo {
                code,
                message: row.optional_string(at + 7)?.unwrap_or_default(),
            }),
            None => None,
        },
        cancel_reason: match row.with_text(at + 8, |reason| Ok(reason.is_some()))? {
            true => Some(parsed(row, at + 8, "cancel reason")?),
            false => None,
        },
        created_at: Millis(row.int(at + 9)?),
        started_at: row.optional_int(at + 10)?.map(Millis),
        finished_at: row.optional_int(at + 11)?.map(Millis),
        request: optional_json(row, at + 12, "request")?,
        answers: optional_json(row, at + 13, "answers")?.unwrap_or_default(),
        input_deadline: row.optional_int(at + 14)?.map(Millis),
    })
}
