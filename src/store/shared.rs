//! Pieces both backends use: the `data` of events, and small pure helpers.

use serde::Serialize;
use serde_json::Value;

use super::{Page, StoreError, StoreResult, TaskOutput};
use crate::model::{Interaction, InteractionId, JsonObject, Session, SessionId, merge_patch};

#[derive(Serialize)]
pub(super) struct Empty {}

#[derive(Serialize)]
pub(super) struct DeltaData<'a> {
    pub(super) interaction_id: &'a InteractionId,
    pub(super) text: &'a str,
}

#[derive(Serialize)]
pub(super) struct ProgressData<'a> {
    pub(super) interaction_id: &'a InteractionId,
    pub(super) data: &'a Value,
}

#[derive(Serialize)]
pub(super) struct ClearedData {
    pub(super) epoch: i64,
}

#[derive(Serialize)]
pub(super) struct InteractionData<'a> {
    pub(super) interaction: &'a Interaction,
}

#[derive(Serialize)]
pub(super) struct ContextData<'a> {
    pub(super) context: &'a JsonObject,
}

#[derive(Serialize)]
pub(super) struct SessionData<'a> {
    pub(super) session: &'a Session,
}

pub(super) fn patched(context: &JsonObject, patch: JsonObject) -> StoreResult<JsonObject> {
    let mut value = Value::Object(context.clone());
    merge_patch(&mut value, &Value::Object(patch));
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(StoreError::Internal(
            "a merge patch of objects gave a non-object".into(),
        )),
    }
}

pub(super) fn page<T>(mut items: Vec<T>, limit: usize, cursor: impl Fn(&T) -> String) -> Page<T> {
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(cursor)
    } else {
        None
    };
    Page { items, next }
}

/// A session's row as a write job works on it; `last_seq` advances in memory and is saved
/// once per operation by the backend's `save_seq`.
pub(super) struct SessionRow {
    pub(super) id: SessionId,
    pub(super) agent: String,
    /// Parsed only when a job needs it (most jobs never look at the context).
    pub(super) context: Result<JsonObject, String>,
    pub(super) epoch: i64,
    pub(super) last_seq: i64,
    pub(super) saved_seq: i64,
}

impl SessionRow {
    pub(super) fn context(&mut self) -> StoreResult<&JsonObject> {
        if let Err(text) = &self.context {
            self.context = Ok(serde_json::from_str(text)?);
        }
        match &self.context {
            Ok(context) => Ok(context),
            Err(_) => Err(StoreError::Internal("context not parsed".into())),
        }
    }
}

/// The text of a task's deltas among its `outputs`, concatenated.
pub(super) fn delta_text(outputs: &[TaskOutput]) -> String {
    outputs
        .iter()
        .filter_map(|o| match o {
            TaskOutput::Delta(t) => Some(t.as_str()),
            _ => None,
        })
        .collect()
}
