//! The session core: what may happen to a session, written once for every store.
//!
//! A session changes only through an [`Op`]eration. Each operation names the type of its
//! outcome, so a caller gets exactly what it asked for (an accepted message, a cleared epoch)
//! and never has to match an answer. A store loads a `Snapshot` of the session inside its
//! transaction, calls `decide`, applies the returned `Plan` — its `Write`s in order, its
//! events, the session's `last_seq` — and commits. A refusal is an `Err`: nothing is written.
//!
//! What must happen once the plan is committed is data too: [`Effects`] (tasks to start
//! here, tasks to stop, a final-state watch to register), executed in one place by the engine.
//!
//! Nothing here does I/O, awaits or reads a clock: `now` and a fresh interaction id come in
//! with the snapshot, so the same inputs always give the same plan. The statuses a store
//! selects by (which interactions are active, which final) come from [`status_sql!`](crate::status_sql), so the
//! stores' SQL and these rules cannot disagree.
//!
//! - [`op`]: the operations, their outcomes, and `decide` (one operation on a snapshot).
//! - `value`: the values operations carry and answer.
//! - `plan`: what a store loads ([`Needs`], `Snapshot`) and applies.
//! - `decide`: the rules, one method of the decider an operation calls.
//! - [`status`]: the status sets as SQL, checked against [`Status`](crate::model::Status).

mod decide;
mod error;
pub mod op;
pub(crate) mod plan;
#[macro_use]
pub mod status;
mod value;

pub use error::{StoreError, StoreResult};
pub use op::Op;
pub(crate) use op::decide;
pub use plan::Needs;
pub use plan::{DEFAULT_MAX_CONTEXT_BYTES, Effects, Limits};
pub(crate) use plan::{Plan, SessionRow, SessionState, Snapshot, Write};
pub use value::{
    Accepted, CancelTarget, Cleared, IDEMPOTENCY_TTL_MS, NewMessage, Received, StartedTask,
    TaskEnd, TaskOutput,
};

#[cfg(test)]
mod tests;
