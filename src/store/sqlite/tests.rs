//! The writer's failure path: a job that fails after writing undoes its whole batch, and the
//! writer's memory of sessions goes with it.

use std::sync::Arc;

use super::SqliteStore;
use crate::bus::Bus;
use crate::model::{JsonObject, Policy, SessionId};
use crate::session::op;
use crate::store::{NewMessage, SqliteOptions, StoreError};

fn message(session: &SessionId) -> NewMessage {
    NewMessage {
        session: session.clone(),
        content: "hi".into(),
        metadata: JsonObject::new(),
        policy: Policy::Reject,
        idempotency_key: None,
        queue_limit: 4,
        default_agent: "default".into(),
        watch_final: false,
        invalid: None,
    }
}

fn open() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let bus = Arc::new(Bus::new(64));
    let store = SqliteStore::open(&dir.path().join("b.db"), SqliteOptions::default(), bus).unwrap();
    (dir, store)
}

#[tokio::test]
async fn a_job_failing_after_its_writes_undoes_them_and_the_remembered_state() {
    let (_dir, store) = open();
    let s = SessionId::new(&crate::model::Tenant::default_tenant(), "s").unwrap();
    // Remembered by the writer: the session, nothing running.
    store
        .run(
            Some(s.clone()),
            op::Clear {
                default_agent: "default".into(),
            },
        )
        .await
        .unwrap();
    let session = s.clone();
    let failed = store
        .write(move |tx| {
            tx.run(Some(&session), op::Accept(message(&session)))?;
            Err::<(), _>(StoreError::Internal("failing after the write".into()))
        })
        .await;
    assert!(
        matches!(failed, Err(StoreError::Unavailable(_))),
        "{failed:?}"
    );
    let after = store.get_session(s.clone()).await.unwrap();
    assert!(after.running.is_none(), "the accept was undone");
    // Were the undone accept still remembered, this would be refused as busy.
    let accepted = store
        .run(Some(s.clone()), op::Accept(message(&s)))
        .await
        .unwrap();
    assert_eq!(accepted.effects.start.len(), 1, "it started");
    let events = store.events_after(s, 0, 100).await.unwrap();
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "no seq of the undone job"
    );
}

#[tokio::test]
async fn a_refusal_leaves_the_batch_alone() {
    let (_dir, store) = open();
    let s = SessionId::new(&crate::model::Tenant::default_tenant(), "s").unwrap();
    store
        .run(Some(s.clone()), op::Accept(message(&s)))
        .await
        .unwrap();
    let busy = store.run(Some(s.clone()), op::Accept(message(&s))).await;
    assert!(matches!(busy, Err(StoreError::Busy { .. })));
    let session = store.get_session(s).await.unwrap();
    assert!(session.running.is_some());
    assert_eq!(session.last_seq, 2);
}
