//! The store contract, tested on the store API directly so every backend runs the same
//! suite: each operation is one transaction that checks state, writes it and appends its
//! events; task writes are fenced by interaction id.

mod common;

use std::sync::Arc;
use std::time::Duration;

use baton::bus::Bus;
use baton::config::DatabaseLocation;
use baton::model::{CancelReason, ErrorInfo, EventType, JsonObject, Policy, SessionId, Status};
use baton::store::{
    Accepted, CancelTarget, Committed, NewMessage, PgOptions, Received, SqliteOptions, Store,
    StoreError, TaskEnd, TaskOutput,
};
use serde_json::json;

/// Which backend a contract test runs on.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Sqlite,
    Postgres,
}

struct Fixture {
    store: Store,
    bus: Arc<Bus>,
    location: DatabaseLocation,
    _scratch: Scratch,
}

/// What a fixture removes when dropped: a temporary directory or a test database.
#[allow(dead_code)] // held for their Drop
enum Scratch {
    Dir(tempfile::TempDir),
    Database(common::pg::TestDatabase),
}

/// A PostgreSQL node's lease in these tests: short, so the recovery test need not wait long.
const LEASE: Duration = Duration::from_millis(800);

async fn connect(location: &DatabaseLocation) -> (Store, Arc<Bus>) {
    let bus = Arc::new(Bus::default());
    let store = Store::connect(
        location,
        SqliteOptions::default(),
        PgOptions {
            url: String::new(),
            pool_size: 8,
            lease: LEASE,
            limits: Default::default(),
        },
        bus.clone(),
    )
    .await
    .expect("open store");
    (store, bus)
}

async fn open(kind: Kind) -> Fixture {
    let (location, scratch) = match kind {
        Kind::Sqlite => {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("store.db");
            (DatabaseLocation::SqliteFile(path), Scratch::Dir(dir))
        }
        Kind::Postgres => {
            let admin = common::pg::postgres_admin_url();
            let db = common::pg::TestDatabase::create(&admin).await;
            (
                DatabaseLocation::Postgres(db.url.clone()),
                Scratch::Database(db),
            )
        }
    };
    let (store, bus) = connect(&location).await;
    Fixture {
        store,
        bus,
        location,
        _scratch: scratch,
    }
}

fn sid(s: &str) -> SessionId {
    SessionId::new(&baton::model::Tenant::default_tenant(), s).expect("valid session id")
}

/// A message's commit, which must be an accepted one (not a `/clear`).
fn accepted(committed: Committed<Received>) -> Committed<Accepted> {
    committed.map(|received| match received {
        Received::Accepted(accepted) => accepted,
        Received::Cleared(_) => panic!("a message, not /clear"),
    })
}

fn message(session: &str, content: &str, policy: Policy) -> NewMessage {
    NewMessage {
        session: sid(session),
        content: content.into(),
        metadata: JsonObject::new(),
        policy,
        idempotency_key: None,
        queue_limit: 3,
        default_agent: "default".into(),
        watch_final: false,
        invalid: None,
    }
}

/// The subscription's next event, within a bounded wait.
async fn next_event(sub: &mut baton::bus::Subscription) -> Arc<baton::model::Event> {
    tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .expect("an event in time")
        .expect("event")
}

async fn kinds(store: &Store, session: &str) -> Vec<EventType> {
    store
        .events_after(sid(session), 0, 10_000)
        .await
        .expect("events")
        .iter()
        .map(|e| e.kind)
        .collect()
}

async fn accept_applies_each_policy(kind: Kind) {
    let f = open(kind).await;
    let first = f
        .store
        .accept_message(message("s", "one", Policy::Reject))
        .await
        .map(accepted)
        .expect("accepted");
    assert_eq!(first.interaction.status, Status::Running);
    assert!(first.started().is_some());
    match f
        .store
        .accept_message(message("s", "two", Policy::Reject))
        .await
        .map(accepted)
    {
        Err(StoreError::Busy { running }) => assert_eq!(running, first.interaction.id),
        other => panic!("expected Busy, got {other:?}"),
    }
    for i in 0..3 {
        let q = f
            .store
            .accept_message(message("s", &format!("q{i}"), Policy::Enqueue))
            .await
            .map(accepted)
            .expect("queued");
        assert_eq!(q.interaction.status, Status::Queued);
        assert!(q.started().is_none());
    }
    assert!(matches!(
        f.store
            .accept_message(message("s", "full", Policy::Enqueue))
            .await
            .map(accepted),
        Err(StoreError::QueueFull { limit: 3 })
    ));
    let new = f
        .store
        .accept_message(message("s", "now", Policy::Interrupt))
        .await
        .map(accepted)
        .expect("interrupt");
    assert_eq!(new.cancelled().len(), 4);
    assert_eq!(new.cancelled()[0], first.interaction.id);
    assert_eq!(new.interaction.status, Status::Running);
    let session = f.store.get_session(sid("s")).await.expect("session");
    assert_eq!(session.queued, 0);
    assert_eq!(
        session.running.map(|i| i.id),
        Some(new.interaction.id.clone())
    );
    let log = kinds(&f.store, "s").await;
    assert_eq!(log[0], EventType::SessionCreated);
    assert_eq!(log[1], EventType::TaskStarted);
    assert_eq!(&log[2..5], &[EventType::InteractionQueued; 3]);
    assert_eq!(&log[5..9], &[EventType::TaskCancelled; 4]);
    assert_eq!(log[9], EventType::TaskStarted);
}

async fn concurrent_accepts_start_exactly_one(kind: Kind) {
    let f = open(kind).await;
    let mut handles = Vec::new();
    for i in 0..50 {
        let store = f.store.clone();
        handles.push(tokio::spawn(async move {
            store
                .accept_message(message("race", &format!("m{i}"), Policy::Reject))
                .await
                .map(accepted)
        }));
    }
    let mut accepted = 0;
    for h in handles {
        match h.await.expect("join") {
            Ok(_) => accepted += 1,
            Err(StoreError::Busy { .. }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(accepted, 1);
}

async fn task_writes_are_fenced_once_the_interaction_is_not_running(kind: Kind) {
    let f = open(kind).await;
    let a = f
        .store
        .accept_message(message("s", "a b", Policy::Reject))
        .await
        .map(accepted)
        .expect("a");
    let id = a.interaction.id.clone();
    f.store
        .append_outputs(
            id.clone(),
            vec![
                TaskOutput::Delta("a ".into()),
                TaskOutput::Progress(json!({"step": 1})),
                TaskOutput::ContextPatch(json!({"x": 1}).as_object().cloned().unwrap_or_default()),
            ],
        )
        .await
        .expect("append while running");
    let b = f
        .store
        .accept_message(message("s", "b", Policy::Enqueue))
        .await
        .map(accepted)
        .expect("b");
    let cancelled = f
        .store
        .cancel(sid("s"), CancelTarget::Running, CancelReason::Cancel, true)
        .await
        .expect("cancel");
    assert_eq!(cancelled.value, vec![id.clone()]);
    assert_eq!(
        cancelled.started().map(|t| t.interaction.id.clone()),
        Some(b.interaction.id.clone())
    );
    assert!(matches!(
        f.store
            .append_outputs(id.clone(), vec![TaskOutput::Delta("late".into())])
            .await,
        Err(StoreError::Fenced)
    ));
    assert!(matches!(
        f.store
            .finish(
                id.clone(),
                Vec::new(),
                TaskEnd::Completed { response: None },
                true,
            )
            .await,
        Err(StoreError::Fenced)
    ));
    let stored = f.store.get_interaction(sid("s"), id).await.expect("stored");
    assert_eq!(stored.status, Status::Cancelled);
    assert_eq!(stored.response, "a ");
    assert_eq!(stored.cancel_reason, Some(CancelReason::Cancel));
    let context = f.store.get_context(sid("s")).await.expect("context");
    assert_eq!(serde_json::Value::Object(context), json!({"x": 1}));
}

async fn finish_records_the_end_and_starts_the_next(kind: Kind) {
    let f = open(kind).await;
    let a = f
        .store
        .accept_message(message("s", "a", Policy::Reject))
        .await
        .map(accepted)
        .expect("a");
    let b = f
        .store
        .accept_message(message("s", "b", Policy::Enqueue))
        .await
        .map(accepted)
        .expect("b");
    let next = f
        .store
        .finish(
            a.interaction.id.clone(),
            vec![TaskOutput::Delta("a".into())],
            TaskEnd::Completed {
                response: Some("A".into()),
            },
            true,
        )
        .await
        .expect("finish");
    assert_eq!(
        next.started().map(|t| t.interaction.id.clone()),
        Some(b.interaction.id.clone())
    );
    let none = f
        .store
        .finish(
            b.interaction.id.clone(),
            Vec::new(),
            TaskEnd::Failed(ErrorInfo {
                code: "agent_error".into(),
                message: "boom".into(),
            }),
            true,
        )
        .await
        .expect("finish b");
    assert!(none.started().is_none());
    let (session, history) = f.store.task_inputs(sid("s"), 10).await.expect("history");
    assert_eq!(session.id.name(), "s");
    assert_eq!(history.len(), 1, "failed interactions are not history");
    assert_eq!(history[0].response, "A");
    let b = f
        .store
        .get_interaction(sid("s"), b.interaction.id.clone())
        .await
        .expect("b");
    assert_eq!(b.status, Status::Failed);
    assert_eq!(b.error.map(|e| e.code), Some("agent_error".into()));
}

async fn clear_is_one_atomic_step(kind: Kind) {
    let f = open(kind).await;
    f.store
        .update_context(
            sid("s"),
            json!({"k": 1}).as_object().cloned(),
            None,
            "default".into(),
        )
        .await
        .expect("context");
    let a = f
        .store
        .accept_message(message("s", "a", Policy::Reject))
        .await
        .map(accepted)
        .expect("a");
    let b = f
        .store
        .accept_message(message("s", "b", Policy::Enqueue))
        .await
        .map(accepted)
        .expect("b");
    let mut sub = f.bus.subscribe(&sid("s"));
    // A subscription may also see events committed just before it (read back from storage
    // after another node's notification); consumers drop seqs they already have.
    let known = f.store.get_session(sid("s")).await.expect("s").last_seq;
    // The position a subscriber read after subscribing: everything later arrives live.
    f.store.anchor(&sid("s"), known);
    let cleared = f
        .store
        .clear(sid("s"), "default".into())
        .await
        .expect("clear");
    assert_eq!(cleared.epoch, 1);
    assert_eq!(
        cleared.cancelled,
        vec![a.interaction.id.clone(), b.interaction.id.clone()]
    );
    // Published in order, after the commit: the two cancellations, then the clear.
    for expected in [
        EventType::TaskCancelled,
        EventType::TaskCancelled,
        EventType::SessionCleared,
    ] {
        let mut event = next_event(&mut sub).await;
        while event.seq <= known {
            event = next_event(&mut sub).await;
        }
        assert_eq!(event.kind, expected);
    }
    assert!(matches!(
        f.store
            .append_outputs(
                a.interaction.id.clone(),
                vec![TaskOutput::Delta("x".into())]
            )
            .await,
        Err(StoreError::Fenced)
    ));
    let page = f
        .store
        .list_interactions(sid("s"), None, 10)
        .await
        .expect("list");
    assert!(page.items.is_empty());
    assert!(f.store.get_context(sid("s")).await.expect("ctx").is_empty());
    let session = f.store.get_session(sid("s")).await.expect("session");
    assert_eq!(session.epoch, 1);
    assert!(matches!(
        f.store
            .get_interaction(sid("s"), a.interaction.id.clone())
            .await,
        Err(StoreError::InteractionNotFound)
    ));
}

async fn idempotency_keys_replay_or_mismatch(kind: Kind) {
    let f = open(kind).await;
    let mut m = message("s", "hello", Policy::Reject);
    m.idempotency_key = Some("k1".into());
    let first = f
        .store
        .accept_message(m.clone())
        .await
        .map(accepted)
        .expect("first");
    assert!(!first.replayed);
    let again = f
        .store
        .accept_message(m.clone())
        .await
        .map(accepted)
        .expect("replay");
    assert!(again.replayed);
    assert!(again.started().is_none());
    assert_eq!(again.interaction.id, first.interaction.id);
    let mut different = m.clone();
    different.content = "other".into();
    assert!(matches!(
        f.store.accept_message(different).await.map(accepted),
        Err(StoreError::IdempotencyMismatch)
    ));
    let mut other_meta = m.clone();
    other_meta.metadata.insert("a".into(), json!(1));
    assert!(matches!(
        f.store.accept_message(other_meta).await.map(accepted),
        Err(StoreError::IdempotencyMismatch)
    ));
    f.store
        .clear(sid("s"), "default".into())
        .await
        .expect("clear");
    let after_clear = f
        .store
        .accept_message(m)
        .await
        .map(accepted)
        .expect("new after clear");
    assert!(!after_clear.replayed);
    assert_ne!(after_clear.interaction.id, first.interaction.id);
}

async fn recovery_fails_running_and_starts_queued(kind: Kind) {
    let f = open(kind).await;
    let a = f
        .store
        .accept_message(message("s", "a", Policy::Reject))
        .await
        .map(accepted)
        .expect("a");
    let b = f
        .store
        .accept_message(message("s", "b", Policy::Enqueue))
        .await
        .map(accepted)
        .expect("b");
    // A second store on the same database, as a restart after a crash would open (or, on
    // PostgreSQL, another node once the first one's lease ran out without a heartbeat).
    if kind == Kind::Postgres {
        tokio::time::sleep(LEASE + Duration::from_millis(300)).await;
    }
    let (reopened, _bus) = connect(&f.location).await;
    let started = reopened.recover().await.expect("recover");
    assert_eq!(started.start.len(), 1);
    assert_eq!(started.start[0].interaction.id, b.interaction.id);
    let a_now = reopened
        .get_interaction(sid("s"), a.interaction.id.clone())
        .await
        .expect("a");
    assert_eq!(a_now.status, Status::Failed);
    assert_eq!(a_now.error.map(|e| e.code), Some("interrupted".into()));
    let log = kinds(&reopened, "s").await;
    let finals = log.iter().filter(|k| k.is_final()).count();
    assert_eq!(finals, 1, "{log:?}");
}

async fn a_deleted_session_never_reuses_a_seq(kind: Kind) {
    let f = open(kind).await;
    f.store
        .accept_message(message("s", "a", Policy::Reject))
        .await
        .map(accepted)
        .expect("a");
    let before = f.store.get_session(sid("s")).await.expect("s").last_seq;
    let cancelled = f.store.delete_session(sid("s")).await.expect("delete");
    assert_eq!(cancelled.len(), 1);
    assert!(matches!(
        f.store.get_session(sid("s")).await,
        Err(StoreError::SessionNotFound)
    ));
    let (session, created) = f
        .store
        .put_session(sid("s"), None, None, "default".into())
        .await
        .expect("recreate")
        .into_value();
    assert!(created);
    assert!(
        session.last_seq > before + 1,
        "{} vs {before}",
        session.last_seq
    );
    let events = f
        .store
        .events_after(sid("s"), 0, 100)
        .await
        .expect("events");
    assert_eq!(events.len(), 1);
    assert!(events[0].seq > before);
}

async fn events_after_pages_in_order(kind: Kind) {
    let f = open(kind).await;
    let a = f
        .store
        .accept_message(message("s", "a", Policy::Reject))
        .await
        .map(accepted)
        .expect("a");
    let outputs = (0..20)
        .map(|i| TaskOutput::Delta(format!("{i} ")))
        .collect();
    f.store
        .append_outputs(a.interaction.id.clone(), outputs)
        .await
        .expect("append");
    // Runs of deltas broken by a progress event, then the end with more deltas.
    let id = a.interaction.id.clone();
    let more = vec![
        TaskOutput::Delta("x".into()),
        TaskOutput::Progress(serde_json::json!({"step": 1})),
        TaskOutput::Delta("y".into()),
        TaskOutput::Delta("z".into()),
    ];
    f.store
        .append_outputs(id.clone(), more)
        .await
        .expect("more");
    let end = vec![TaskOutput::Delta("last".into())];
    f.store
        .finish(id, end, TaskEnd::Completed { response: None }, true)
        .await
        .expect("finish");
    let all = f.store.events_after(sid("s"), 0, 1000).await.expect("all");
    assert_eq!(all.len(), 28);
    let tail = f.store.events_after(sid("s"), 10, 5).await.expect("tail");
    let seqs: Vec<i64> = tail.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![11, 12, 13, 14, 15]);
    // From every position, any page size: exactly the next seqs, each with its own envelope.
    for after in 0..=28 {
        for limit in [1, 2, 3, 7, 1000] {
            let page = f
                .store
                .events_after(sid("s"), after, limit)
                .await
                .expect("page");
            let seqs: Vec<i64> = page.iter().map(|e| e.seq).collect();
            let expected: Vec<i64> = ((after + 1)..=28).take(limit as usize).collect();
            assert_eq!(seqs, expected, "after {after}, limit {limit}");
            for e in &page {
                let envelope: serde_json::Value = serde_json::from_str(&e.envelope).expect("json");
                assert_eq!(envelope["seq"], e.seq);
                assert_eq!(envelope["session"], "s");
                assert_eq!(envelope["type"], e.kind.as_str());
            }
        }
    }
    let texts: String = all
        .iter()
        .filter(|e| e.kind == EventType::TaskDelta)
        .map(|e| {
            let envelope: serde_json::Value = serde_json::from_str(&e.envelope).expect("json");
            envelope["data"]["text"].as_str().expect("text").to_string()
        })
        .collect();
    let numbers: String = (0..20).map(|i| format!("{i} ")).collect();
    assert_eq!(texts, format!("{numbers}xyzlast"));
}

async fn retention_compacts_final_deltas_then_old_events(kind: Kind) {
    let f = open(kind).await;
    let done = f
        .store
        .accept_message(message("s", "a", Policy::Reject))
        .await
        .map(accepted)
        .expect("a");
    f.store
        .append_outputs(
            done.interaction.id.clone(),
            vec![TaskOutput::Delta("x".into()), TaskOutput::Delta("y".into())],
        )
        .await
        .expect("deltas");
    f.store
        .finish(
            done.interaction.id.clone(),
            Vec::new(),
            TaskEnd::Completed { response: None },
            true,
        )
        .await
        .expect("finish");
    let running = f
        .store
        .accept_message(message("s", "b", Policy::Reject))
        .await
        .map(accepted)
        .expect("b");
    f.store
        .append_outputs(
            running.interaction.id.clone(),
            vec![TaskOutput::Delta("z".into())],
        )
        .await
        .expect("delta");
    let future = baton::model::Millis(baton::model::Millis::now().0 + 60_000);
    let long_ago = baton::model::Millis(0);
    let deleted = f.store.compact(future, long_ago).await.expect("compact");
    assert_eq!(deleted, 2, "only the final interaction's deltas");
    let log = kinds(&f.store, "s").await;
    assert_eq!(
        log,
        [
            EventType::SessionCreated,
            EventType::TaskStarted,
            EventType::TaskCompleted,
            EventType::TaskStarted,
            EventType::TaskDelta,
        ]
    );
    let completed = f
        .store
        .get_interaction(sid("s"), done.interaction.id.clone())
        .await
        .expect("a");
    assert_eq!(
        completed.response, "xy",
        "the final state keeps the response"
    );
    // Past the retention window every event goes; seqs are still never reused.
    let last = f.store.get_session(sid("s")).await.expect("s").last_seq;
    let deleted = f.store.compact(future, future).await.expect("retention");
    assert_eq!(deleted, 5);
    assert!(kinds(&f.store, "s").await.is_empty());
    f.store
        .cancel(sid("s"), CancelTarget::Running, CancelReason::Cancel, true)
        .await
        .expect("cancel");
    let events = f.store.events_after(sid("s"), 0, 10).await.expect("events");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].seq, last + 1);
}

/// A `waiting` interaction is not final: retention keeps its deltas (its stream replay and
/// transcript need them), however old they are.
async fn retention_keeps_the_deltas_of_waiting_interactions(kind: Kind) {
    let f = open(kind).await;
    let asking = f
        .store
        .accept_message(message("w", "a", Policy::Reject))
        .await
        .map(accepted)
        .expect("a");
    let id = asking.interaction.id.clone();
    f.store
        .append_outputs(
            id.clone(),
            vec![TaskOutput::Delta("x".into()), TaskOutput::Delta("y".into())],
        )
        .await
        .expect("deltas");
    f.store
        .ask(
            id.clone(),
            vec![TaskOutput::Delta("z".into())],
            serde_json::json!({"question": "ok?"}),
            std::time::Duration::from_secs(3600),
        )
        .await
        .expect("ask");
    let future = baton::model::Millis(baton::model::Millis::now().0 + 60_000);
    let deleted = f
        .store
        .compact(future, baton::model::Millis(0))
        .await
        .expect("compact");
    assert_eq!(deleted, 0, "nothing of a waiting interaction is final");
    let deltas = kinds(&f.store, "w")
        .await
        .into_iter()
        .filter(|k| *k == EventType::TaskDelta)
        .count();
    assert_eq!(deltas, 3, "the waiting interaction keeps every delta");
}

/// Every contract test, once per backend. The PostgreSQL ones run when
/// `BATON_TEST_POSTGRES` names an admin URL, and are listed as ignored otherwise.
/// Random operations on a few sessions, concurrently, through the store; then the stored log
/// of each session must be whole: contiguous seqs from any position, one final event per
/// interaction, no final event while active, at most one running, and the session's view
/// agreeing with its log. (On SQLite this also holds the writer's remembered state to what is
/// stored: a stale memory would start a second runner or reuse a seq.)
async fn random_operations_leave_a_whole_log(kind: Kind) {
    let f = open(kind).await;
    let sessions = ["r0", "r1", "r2"];
    let mut workers = Vec::new();
    for worker in 0..4u64 {
        let store = f.store.clone();
        workers.push(tokio::spawn(async move {
            // xorshift: the same sequence every run.
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (worker + 1);
            let mut next = move |n: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % n
            };
            for step in 0..120 {
                let session = sessions[next(3) as usize];
                let running = store
                    .get_session(sid(session))
                    .await
                    .ok()
                    .and_then(|s| s.running.map(|r| r.id));
                let outcome = match next(10) {
                    0..=2 => {
                        let policy =
                            [Policy::Reject, Policy::Enqueue, Policy::Interrupt][next(3) as usize];
                        let content = format!("w{worker} s{step}");
                        store
                            .accept_message(message(session, &content, policy))
                            .await
                            .map(accepted)
                            .map(drop)
                    }
                    3 | 4 => match running {
                        Some(id) => {
                            let words = (0..next(4)).map(|i| TaskOutput::Delta(format!("{i} ")));
                            store.append_outputs(id, words.collect()).await.map(drop)
                        }
                        None => Ok(()),
                    },
                    5 | 6 => match running {
                        Some(id) => {
                            let end = TaskEnd::Completed { response: None };
                            let last = vec![TaskOutput::Delta("end".into())];
                            store.finish(id, last, end, next(2) == 0).await.map(drop)
                        }
                        None => Ok(()),
                    },
                    7 => store
                        .cancel(
                            sid(session),
                            CancelTarget::Running,
                            CancelReason::Cancel,
                            true,
                        )
                        .await
                        .map(drop),
                    8 => store.clear(sid(session), "default".into()).await.map(drop),
                    _ => store.delete_session(sid(session)).await.map(drop),
                };
                match outcome {
                    Ok(())
                    | Err(StoreError::Busy { .. })
                    | Err(StoreError::QueueFull { .. })
                    | Err(StoreError::Fenced)
                    | Err(StoreError::SessionNotFound) => {}
                    Err(e) => panic!("worker {worker}, step {step}: {e}"),
                }
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    for session in sessions {
        let log = f
            .store
            .events_after(sid(session), 0, 100_000)
            .await
            .expect("log");
        let Ok(view) = f.store.get_session(sid(session)).await else {
            assert!(
                log.is_empty(),
                "{session}: deleted, yet {} events",
                log.len()
            );
            continue;
        };
        assert_eq!(
            log.first().map(|e| e.kind),
            Some(EventType::SessionCreated),
            "{session}: its log begins with its creation"
        );
        let seqs: Vec<i64> = log.iter().map(|e| e.seq).collect();
        let first = seqs.first().copied().unwrap_or(1);
        let expected: Vec<i64> = (first..first + seqs.len() as i64).collect();
        assert_eq!(seqs, expected, "{session}: contiguous");
        assert_eq!(
            view.last_seq,
            seqs.last().copied().unwrap_or(0),
            "{session}: last seq"
        );
        for after in (first - 1..=view.last_seq).step_by(3) {
            let page = f
                .store
                .events_after(sid(session), after, 5)
                .await
                .expect("page");
            let got: Vec<i64> = page.iter().map(|e| e.seq).collect();
            let want: Vec<i64> = ((after + 1)..=view.last_seq).take(5).collect();
            assert_eq!(got, want, "{session}: after {after}");
        }
        // Since the last clear: every interaction started at most once, ended at most once,
        // and the one started and not ended is the session's running one.
        let since = log
            .iter()
            .rposition(|e| e.kind == EventType::SessionCleared)
            .map_or(0, |at| at + 1);
        let mut started = std::collections::HashMap::new();
        let mut ended = std::collections::HashMap::new();
        for event in &log[since..] {
            let id = event.interaction_id.clone();
            match event.kind {
                EventType::TaskStarted => *started.entry(id).or_insert(0) += 1,
                kind if kind.is_final() => *ended.entry(id).or_insert(0) += 1,
                _ => {}
            }
        }
        assert!(
            started.values().all(|n| *n == 1),
            "{session}: started twice"
        );
        assert!(ended.values().all(|n| *n == 1), "{session}: ended twice");
        let open: Vec<_> = started
            .keys()
            .filter(|id| !ended.contains_key(*id))
            .cloned()
            .collect();
        assert!(open.len() <= 1, "{session}: {} running", open.len());
        assert_eq!(
            open.first().cloned().flatten(),
            view.running.map(|r| r.id),
            "{session}: the running one"
        );
    }
}

macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[cfg_attr(
                    not(baton_postgres_tests),
                    ignore = "needs PostgreSQL: set BATON_TEST_POSTGRES to an admin URL"
                )]
                async fn $name() {
                    super::$name(super::Kind::Postgres).await;
                }
            )*
        }
    };
}

on_every_backend!(
    accept_applies_each_policy,
    concurrent_accepts_start_exactly_one,
    task_writes_are_fenced_once_the_interaction_is_not_running,
    finish_records_the_end_and_starts_the_next,
    clear_is_one_atomic_step,
    idempotency_keys_replay_or_mismatch,
    recovery_fails_running_and_starts_queued,
    a_deleted_session_never_reuses_a_seq,
    events_after_pages_in_order,
    retention_compacts_final_deltas_then_old_events,
    retention_keeps_the_deltas_of_waiting_interactions,
    random_operations_leave_a_whole_log,
);

/// Deleted sessions and compacted events give their pages back: the file shrinks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_gives_freed_pages_back() {
    let f = open(Kind::Sqlite).await;
    let DatabaseLocation::SqliteFile(path) = &f.location else {
        unreachable!("an SQLite fixture");
    };
    let pages = || -> i64 {
        let conn = rusqlite::Connection::open(path).expect("open");
        conn.query_row("PRAGMA page_count", [], |r| r.get(0))
            .expect("page_count")
    };
    let empty = pages();
    let padding = "p".repeat(2000);
    for i in 0..100 {
        let session = format!("s{i}");
        let accepted = f
            .store
            .accept_message(message(&session, &padding, Policy::Reject))
            .await
            .map(accepted)
            .expect("accept");
        let deltas = (0..10)
            .map(|_| TaskOutput::Delta(padding.clone()))
            .collect();
        f.store
            .append_outputs(accepted.interaction.id.clone(), deltas)
            .await
            .expect("deltas");
        f.store
            .finish(
                accepted.interaction.id.clone(),
                Vec::new(),
                TaskEnd::Completed { response: None },
                true,
            )
            .await
            .expect("finish");
    }
    let full = pages();
    assert!(full > empty + 100, "{empty} → {full} pages");
    for i in 0..100 {
        f.store
            .delete_session(sid(&format!("s{i}")))
            .await
            .expect("delete");
    }
    let past = baton::model::Millis(0);
    f.store.compact(past, past).await.expect("compact");
    let after = pages();
    assert!(
        after < empty + (full - empty) / 10,
        "the freed pages went back: {empty} empty, {full} full, {after} after"
    );
}

/// A database written before events had their own time (schema version 1, no incremental
/// vacuum) is upgraded at start-up: each event's time is read from its envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_sqlite_database_is_upgraded_for_retention() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("old.db");
    let location = DatabaseLocation::SqliteFile(path.clone());
    {
        let (store, _bus) = connect(&location).await;
        store
            .accept_message(message("s", "hello", Policy::Reject))
            .await
            .map(accepted)
            .expect("accept");
    }
    {
        // Back to what version 1 wrote: no retention columns, no tenants (bare session ids,
        // which the upgrade gives to tenant `default`).
        let conn = rusqlite::Connection::open(&path).expect("open");
        conn.execute_batch(
            "ALTER TABLE events DROP COLUMN at; ALTER TABLE events DROP COLUMN last_seq; \
             DROP INDEX sessions_by_tenant; ALTER TABLE sessions DROP COLUMN tenant; \
             UPDATE sessions SET id = substr(id, 9); \
             UPDATE interactions SET session = substr(session, 9); \
             UPDATE events SET session = substr(session, 9); \
             PRAGMA user_version = 1; PRAGMA auto_vacuum = NONE; VACUUM;",
        )
        .expect("downgrade");
        let mode: i64 = conn
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .expect("mode");
        assert_eq!(mode, 0);
    }
    let (store, _bus) = connect(&location).await;
    let events = store.events_after(sid("s"), 0, 10).await.expect("events");
    assert!(!events.is_empty());
    let conn = rusqlite::Connection::open(&path).expect("open");
    let mode: i64 = conn
        .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
        .expect("mode");
    assert_eq!(mode, 2, "incremental vacuum");
    let mut stmt = conn
        .prepare("SELECT at, json_extract(envelope, '$.at') FROM events ORDER BY id")
        .expect("select");
    let rows: Vec<(i64, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    for (at, text) in rows {
        let parsed = baton::model::Millis::parse_rfc3339(&text).expect("rfc 3339");
        assert_eq!(at, parsed.0, "{text}");
    }
    drop(store);
}
