//! The cluster: each node's lease, and the take-over of the work of nodes that lost theirs.

use std::sync::Arc;

use super::{DB_NOW_MS, PgStore, PgTx, TX_ATTEMPTS, TxError, retryable};
use crate::model::{ErrorInfo, InteractionId, SessionId};
use crate::session::{Effects, op};
use crate::store::{StoreError, StoreResult};

impl PgStore {
    /// Renews this node's lease; `true` when the lease had been lost (another node took over
    /// this node's tasks) and the node joined again.
    pub(in crate::store) async fn heartbeat(&self) -> StoreResult<bool> {
        let client = self.pool.get().await?;
        let lease_ms = i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX);
        let me = self.node();
        let renewed = client
            .execute(
                &format!(
                    "UPDATE nodes SET lease_until = {DB_NOW_MS} + $2 \
                     WHERE id = $1 AND lease_until >= {DB_NOW_MS}"
                ),
                &[&&*me, &lease_ms],
            )
            .await?;
        if renewed == 1 {
            return Ok(false);
        }
        // Expired (maybe already taken over): whatever ran here under the old id is no longer
        // ours; it is taken over like any lost node's work. Join again under a new id.
        let fresh: Arc<str> = Arc::from(
            self.ids
                .lock()
                .map_err(|_| StoreError::Internal("id generator poisoned".into()))?
                .next_id()
                .as_str(),
        );
        client
            .execute(
                &format!(
                    "INSERT INTO nodes (id, lease_until, started_at) \
                     VALUES ($1, {DB_NOW_MS} + $2, {DB_NOW_MS})"
                ),
                &[&&*fresh, &lease_ms],
            )
            .await?;
        *self.node.lock().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&fresh);
        tracing::warn!(old = %me, node = %fresh, "this node's lease had expired; joined again");
        Ok(true)
    }

    /// Finishes the running interactions of nodes whose lease expired (`failed`,
    /// `interrupted`), removes those nodes, and starts queued work of sessions where nothing
    /// runs. Returns the tasks started here.
    pub(in crate::store) async fn take_over(&self) -> StoreResult<Effects> {
        let client = self.pool.get().await?;
        let stale: Vec<(String, String)> = client
            .query(
                &format!(
                    "SELECT i.id, i.session FROM interactions i \
                     WHERE i.status IN {running} AND NOT EXISTS \
                     (SELECT 1 FROM nodes n WHERE n.id = i.node AND n.lease_until >= {DB_NOW_MS})",
                    running = status_sql!(running),
                ),
                &[],
            )
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, tokio_postgres::Error>>()?;
        let orphans: Vec<String> = client
            .query(
                concat!(
                    "SELECT DISTINCT q.session FROM interactions q WHERE q.status IN ",
                    status_sql!(queued),
                    " AND NOT EXISTS (SELECT 1 FROM interactions r \
                     WHERE r.session = q.session AND r.status IN ",
                    status_sql!(active),
                    ")"
                ),
                &[],
            )
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        drop(client);
        let mut effects = Effects::default();
        for (id, session) in stale {
            let id = InteractionId::from_stored(id);
            let Ok(session) = SessionId::from_key(&session) else {
                continue;
            };
            let taken = transaction!(self, |w| {
                if !w.lock(&session).await? {
                    return Ok(None);
                }
                // Re-checked under the lock: its node may have renewed, or it may have ended.
                let dead =
                    w.tx.query_opt(
                        &format!(
                            "SELECT 1 FROM interactions i WHERE i.id = $1 \
                             AND i.status IN {running} \
                             AND NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = i.node \
                             AND n.lease_until >= {DB_NOW_MS})",
                            running = status_sql!(running),
                        ),
                        &[&id.as_str()],
                    )
                    .await?
                    .is_some();
                if !dead {
                    return Ok(None);
                }
                let error = ErrorInfo {
                    code: "interrupted".into(),
                    message: "the node running this interaction stopped or lost its lease".into(),
                };
                let op = op::Interrupt {
                    id: id.clone(),
                    error,
                };
                Ok(Some(w.run(Some(&session), op).await?.effects))
            })?;
            if let Some(taken) = taken {
                tracing::warn!(interaction = %id, "took over the work of a lost node");
                effects.extend(taken);
            }
        }
        for session in orphans {
            let Ok(session) = SessionId::from_key(&session) else {
                continue;
            };
            let next = transaction!(self, |w| {
                Ok(w.run(Some(&session), op::StartQueued).await?.effects)
            })?;
            effects.extend(next);
        }
        self.pool
            .get()
            .await?
            .execute(
                &format!(
                    "DELETE FROM nodes n WHERE n.lease_until < {DB_NOW_MS} AND NOT EXISTS \
                     (SELECT 1 FROM interactions i WHERE i.node = n.id AND i.status IN {running})",
                    running = status_sql!(running),
                ),
                &[],
            )
            .await?;
        Ok(effects)
    }
}
