//! Small pure helpers of both backends' reads.

use super::Page;

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
