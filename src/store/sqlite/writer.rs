//! The single writer thread, which group-commits the jobs waiting for it, and the
//! checkpointer thread, which keeps the WAL short without stalling the writer.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use rusqlite::Connection;

use super::cache::SessionCache;
use super::tx::Tx;
use crate::bus::Bus;
use crate::model::{IdGenerator, Millis};
use crate::store::{Limits, StoreError, StoreResult, StoreStats};

/// Most jobs committed together in one transaction.
const MAX_BATCH: usize = 512;
/// Pause between two checkpoints off the writer thread: short, so the WAL's backlog stays
/// small whenever the writer has to finish a checkpoint itself.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(50);
/// Past this size the WAL is not restarting (under constant load a checkpoint running beside
/// the writer never catches up): the writer then finishes the checkpoint itself, between two
/// batches, so the WAL restarts. The heavy copying was already done off the writer.
const WAL_RESTART_BYTES: u64 = 32 * 1024 * 1024;
/// A restarted WAL file larger than this is truncated to it.
pub(super) const WAL_KEEP_BYTES: u64 = 16 * 1024 * 1024;

/// Called after the batch's commit (or its failure) with the commit error, if any.
pub(super) type Delivery = Box<dyn FnOnce(Option<StoreError>) + Send>;
/// A unit of write work; returns whether it succeeded (one that failed after writing undoes
/// its batch).
pub(super) type Job = Box<dyn FnOnce(&mut Tx<'_>) -> (bool, Delivery) + Send>;

/// The single writer: owns the write connection. Its thread takes every waiting job, runs
/// them in one transaction, commits once, then publishes the committed events and answers the
/// callers.
pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) bus: Arc<Bus>,
    pub(super) stats: Arc<StoreStats>,
    /// Set by the checkpointer when the WAL is not restarting.
    pub(super) checkpoint_requested: Arc<AtomicBool>,
    /// The bounds of the session rules.
    pub(super) limits: Limits,
}

impl Writer {
    pub(super) fn run(self, jobs: mpsc::Receiver<Job>) {
        let Writer {
            conn,
            bus,
            stats,
            checkpoint_requested,
            limits,
        } = self;
        let mut ids = IdGenerator::default();
        let mut cache = SessionCache::default();
        let mut batch = Vec::with_capacity(MAX_BATCH);
        // Jobs of an undone batch that had not run yet: they go first in the next one.
        let mut carried: Vec<Job> = Vec::new();
        loop {
            if carried.is_empty() {
                match jobs.recv() {
                    Ok(first) => batch.push(first),
                    Err(_) => break,
                }
            } else {
                batch.append(&mut carried);
            }
            batch.extend(jobs.try_iter().take(MAX_BATCH.saturating_sub(batch.len())));
            let mut deliveries = Vec::with_capacity(batch.len());
            let mut events = Vec::new();
            let began = run_cached(&conn, "BEGIN IMMEDIATE");
            if let Err(e) = began {
                let error = StoreError::Unavailable(format!("begin: {e}"));
                for job in batch.drain(..) {
                    // The job must not run outside a transaction; answer it with the error.
                    drop(job);
                    tracing::error!(%error, "write batch refused");
                }
                continue;
            }
            stats.commits.fetch_add(1, Ordering::Relaxed);
            stats.jobs.fetch_add(batch.len() as u64, Ordering::Relaxed);
            // No savepoint per job: a refusal is decided before anything is written, so only
            // a failing write (a storage error, a bug) or a panic leaves a job half-done, and
            // then the whole batch is undone and its callers told so.
            let mut undone = None;
            let mut pending = batch.drain(..);
            for job in pending.by_ref() {
                let mut tx = Tx {
                    conn: &conn,
                    ids: &mut ids,
                    cache: &mut cache,
                    now: Millis::now(),
                    events: Vec::new(),
                    wrote: false,
                    limits,
                    bus: &bus,
                };
                let outcome = catch_unwind(AssertUnwindSafe(|| job(&mut tx)));
                let wrote = tx.wrote;
                match outcome {
                    Ok((true, delivery)) => {
                        events.append(&mut tx.events);
                        deliveries.push(delivery);
                    }
                    Ok((false, delivery)) => {
                        deliveries.push(delivery);
                        if wrote {
                            undone = Some("a write failed half-way");
                            break;
                        }
                    }
                    Err(_) => {
                        undone = Some("a store job panicked");
                        break;
                    }
                }
            }
            carried.extend(pending);
            let commit_error = match undone {
                Some(why) => {
                    tracing::error!(why, "write batch undone");
                    let _ = conn.execute_batch("ROLLBACK");
                    cache.clear();
                    Some(StoreError::Unavailable(format!(
                        "write batch undone: {why}"
                    )))
                }
                None => run_cached(&conn, "COMMIT").err().map(|e| {
                    let _ = conn.execute_batch("ROLLBACK");
                    cache.clear();
                    StoreError::Unavailable(format!("commit: {e}"))
                }),
            };
            if commit_error.is_none() {
                bus.publish(events);
            }
            for delivery in deliveries {
                delivery(commit_error.clone());
            }
            if checkpoint_requested.load(Ordering::Acquire) {
                // No write transaction is open here and the checkpointer waits for us, so this
                // checkpoint can complete and the next transaction restarts the WAL.
                match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0)) {
                    Ok(0) => {
                        stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => tracing::debug!("WAL checkpoint on the writer was busy"),
                    Err(e) => tracing::warn!(error = %e, "WAL checkpoint on the writer failed"),
                }
                checkpoint_requested.store(false, Ordering::Release);
            }
        }
    }
}

fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Checkpoints the WAL from its own thread and connection, so the writer never stalls on
/// the checkpoint's fsync. PASSIVE checkpoints never block the writer or the readers.
pub(super) fn start_checkpointer(
    path: &Path,
    finish_requested: Arc<AtomicBool>,
) -> StoreResult<mpsc::Sender<()>> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let (stop, stopped) = mpsc::channel::<()>();
    let mut wal_path = path.as_os_str().to_owned();
    wal_path.push("-wal");
    std::thread::Builder::new()
        .name("baton-sqlite-checkpoint".into())
        .spawn(move || {
            loop {
                let done = matches!(
                    stopped.recv_timeout(CHECKPOINT_INTERVAL),
                    Err(RecvTimeoutError::Disconnected)
                );
                if finish_requested.load(Ordering::Acquire) {
                    // The writer has not finished the last one yet: never compete with it.
                    if done {
                        break;
                    }
                    continue;
                }
                // (busy, frames in the log, frames checkpointed)
                match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                }) {
                    Ok((log, backfilled)) => {
                        let wal_bytes = std::fs::metadata(&wal_path).map_or(0, |m| m.len());
                        tracing::trace!(log, backfilled, wal_bytes, "WAL checkpoint pass");
                        // Backfilled up to where this pass began, yet the writer has been
                        // appending since: only the writer can close that gap.
                        if wal_bytes > WAL_RESTART_BYTES {
                            finish_requested.store(true, Ordering::Release);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
                }
                if done {
                    break;
                }
            }
        })
        .map_err(|e| StoreError::Internal(format!("spawning the checkpointer: {e}")))?;
    Ok(stop)
}
