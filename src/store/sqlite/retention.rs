//! Retention on SQLite: deltas of final interactions, then events past their age, in short
//! writer jobs; then the freed pages go back to the file system.

use std::sync::atomic::Ordering;

use rusqlite::{Connection, OptionalExtension, params};

use super::SqliteStore;
use crate::model::Millis;
use crate::store::StoreResult;

impl SqliteStore {
    pub(in crate::store) async fn compact(
        &self,
        deltas_before: Millis,
        events_before: Millis,
        batch: i64,
    ) -> StoreResult<u64> {
        let mut total = 0;
        loop {
            let from = self.delta_cursor.load(Ordering::Relaxed);
            let walk = self
                .write(move |tx| compact_deltas(tx.raw(), from, deltas_before, batch))
                .await?;
            self.delta_cursor.fetch_max(walk.reached, Ordering::Relaxed);
            total += walk.deleted;
            if walk.done {
                break;
            }
            tokio::task::yield_now().await;
        }
        loop {
            // (rows, events): a row may hold a run of deltas.
            let (rows, events) = self
                .write(move |tx| {
                    let mut delete = tx.raw().prepare_cached(
                        "DELETE FROM events WHERE id IN \
                         (SELECT id FROM events ORDER BY id LIMIT ?2) AND at < ?1 \
                         RETURNING coalesce(last_seq, seq) - seq + 1",
                    )?;
                    let counts = delete
                        .query_map(params![events_before.0, batch], |r| r.get::<_, i64>(0))?
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok((counts.len() as u64, counts.iter().sum::<i64>() as u64))
                })
                .await?;
            total += events;
            if rows < batch.max(1) as u64 {
                break;
            }
            tokio::task::yield_now().await;
        }
        // Free pages (from this, from deleted sessions, from clears) go back in steps.
        let mut before = i64::MAX;
        loop {
            let left = self
                .write(move |tx| {
                    let conn = tx.raw();
                    conn.execute_batch(&format!("PRAGMA incremental_vacuum({batch})"))?;
                    Ok(conn.query_row("PRAGMA freelist_count", [], |r| r.get::<_, i64>(0))?)
                })
                .await?;
            if left == 0 || left >= before {
                break;
            }
            before = left;
            tokio::task::yield_now().await;
        }
        Ok(total)
    }
}

/// One step of the delta walk of [`SqliteStore::compact`].
struct DeltaWalk {
    deleted: u64,
    /// The last event id looked at.
    reached: i64,
    /// The walk met an event too recent, or the end of the log.
    done: bool,
}

/// Looks at up to `batch` events after id `from`, in order, deleting the deltas of
/// interactions no longer active, and stops at the first event at or after `before`.
fn compact_deltas(
    conn: &Connection,
    from: i64,
    before: Millis,
    batch: i64,
) -> StoreResult<DeltaWalk> {
    let mut walk = DeltaWalk {
        deleted: 0,
        reached: from,
        done: false,
    };
    let rows: Vec<(i64, i64, bool, Option<String>)> = conn
        .prepare_cached(
            "SELECT id, at, type = 'task.delta', interaction_id FROM events \
             WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?
        .query_map(params![from, batch], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<Result<_, _>>()?;
    walk.done = rows.len() < usize::try_from(batch).unwrap_or(usize::MAX);
    let mut active = conn.prepare_cached(concat!(
        "SELECT 1 FROM interactions WHERE id = ?1 AND status IN ",
        status_sql!(open)
    ))?;
    let mut delete = conn.prepare_cached(
        "DELETE FROM events WHERE id = ?1 RETURNING coalesce(last_seq, seq) - seq + 1",
    )?;
    for (id, at, is_delta, interaction) in rows {
        if at >= before.0 {
            walk.done = true;
            break;
        }
        walk.reached = id;
        let Some(interaction) = interaction.filter(|_| is_delta) else {
            continue;
        };
        if !active.exists([&interaction])? {
            let events: Option<i64> = delete.query_row([id], |r| r.get(0)).optional()?;
            walk.deleted += events.unwrap_or(0) as u64;
        }
    }
    Ok(walk)
}
