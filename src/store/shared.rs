//! Small pure helpers of both backends' reads.

use super::Page;
use crate::model::{Interaction, Session, Tenant};

/// A page of `limit` items from `items` (read with one more than `limit`, to know whether
/// there is a next page), with the cursor of the next page.
pub(super) fn page<T>(mut items: Vec<T>, limit: usize, cursor: impl Fn(&T) -> String) -> Page<T> {
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(cursor)
    } else {
        None
    };
    Page { items, next }
}

/// Where a page of `tenant`'s sessions starts: session keys are `tenant/name`, in order.
pub(super) fn sessions_after(tenant: &Tenant, after: Option<String>) -> String {
    format!("{tenant}/{}", after.unwrap_or_default())
}

/// A page of sessions, read with one more than `limit`; the cursor is the last one's name.
pub(super) fn session_page(items: Vec<Session>, limit: u32) -> Page<Session> {
    page(items, limit as usize, |s| s.id.name().to_string())
}

/// A page of interactions, read with one more than `limit`; the cursor is the last one's id.
pub(super) fn interaction_page(items: Vec<Interaction>, limit: u32) -> Page<Interaction> {
    page(items, limit as usize, |i| i.id.to_string())
}
