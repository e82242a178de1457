//! Why an operation did not happen.

use crate::model::InteractionId;

/// Errors of session operations. Each refusal leaves the stored state unchanged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("session not found")]
    SessionNotFound,
    /// A request the transport found malformed, refused by the rules (`400`).
    #[error("{0}")]
    Invalid(String),
    #[error("interaction not found")]
    InteractionNotFound,
    #[error("session is busy")]
    Busy { running: InteractionId },
    #[error("queue is full ({limit} queued)")]
    QueueFull { limit: u32 },
    #[error("idempotency key was used with a different content or metadata")]
    IdempotencyMismatch,
    /// An answer to an interaction that is not `waiting` for that request.
    #[error("the interaction is not waiting for this request")]
    NotWaiting,
    /// A context write (or an agent's patch, the `at`th of its outputs) would make the
    /// context serialize to `size` bytes, past `limit`; nothing was changed.
    #[error("the context would be {size} bytes, past the limit of {limit} (max_context_bytes)")]
    ContextTooLarge {
        limit: usize,
        size: usize,
        at: Option<usize>,
    },
    /// Creating the session would give its tenant more than `limit` sessions.
    #[error("the tenant has {limit} sessions, its limit (max_sessions_per_tenant)")]
    TenantLimit { limit: u64 },
    /// The task's interaction is no longer `running` (cancelled, cleared, deleted, finished):
    /// its write is refused.
    #[error("interaction is no longer running")]
    Fenced,
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("storage error: {0}")]
    Internal(String),
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Internal(format!("json: {e}"))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;
