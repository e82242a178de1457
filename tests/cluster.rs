//! The multi-node contract, black box: several real `baton serve` processes on one PostgreSQL
//! database. I1 across nodes (one runner; one winner of a `reject` race spread over nodes), I2
//! and I3 under random traffic to random nodes, I3 when a node is killed or stalls past its
//! lease (`failed`/`interrupted` by a survivor, fencing of the stalled one), and I4 across nodes
//! and across a lost LISTEN connection (every subscriber, whatever its node, sees the stored log
//! in order, without gap or duplicate).
//!
//! These tests need PostgreSQL: `BATON_TEST_POSTGRES` names an admin URL (e.g.
//! `postgres://postgres@127.0.0.1:5432/postgres`); each test creates a database of its own and
//! drops it at the end. Without the variable they say so and pass.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::cluster::{
    Api, Cluster, Ledger, Rng, Subscriber, check_one_winner, check_stored_log, check_subscribers,
    final_event_of, is_final_interaction, postgres_admin_url, seed,
};
use common::stream::{assert_exactly, seq_of};
use common::{TIMEOUT, interaction_of, is_final_type, words};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::time::Instant;

/// Two echo agents: `default` (instant) and `slow` (30 ms a word).
const CONFIG: &str = r#"
queue_limit = 16

[agents.default]
kind = "echo"
delay_ms = 0

[agents.slow]
kind = "echo"
delay_ms = 30
"#;

/// The slow agent's pause per word.
const SLOW_WORD: Duration = Duration::from_millis(30);

/// [`CONFIG`] with a node lease of 2 s (heartbeats every 0.5 s).
fn lease_config() -> String {
    format!("node_lease_s = 2\n{CONFIG}")
}

/// How long a survivor may take to fail the task of a node that is gone: the 2 s lease, plus
/// the time to notice and recover, with room for a loaded machine.
const TAKEOVER: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// 1. Random traffic on three nodes

const SESSIONS: usize = 6;
const WORKERS: usize = 8;
const TRAFFIC: Duration = Duration::from_secs(8);

/// What one worker's operations were answered, in total.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    accepted_running: usize,
    accepted_queued: usize,
    busy: usize,
    queue_full: usize,
    clears: usize,
    cancels: usize,
    cancelled: usize,
    reads: usize,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.accepted_running += other.accepted_running;
        self.accepted_queued += other.accepted_queued;
        self.busy += other.busy;
        self.queue_full += other.queue_full;
        self.clears += other.clears;
        self.cancels += other.cancels;
        self.cancelled += other.cancelled;
        self.reads += other.reads;
    }
}

/// One random operation on a random session through a random node; the answer is checked
/// against the contract and recorded in `ledgers`.
async fn random_operation(
    rng: &mut Rng,
    apis: &[Api],
    sessions: &[String],
    ledgers: &mut HashMap<String, Ledger>,
    tally: &mut Tally,
) {
    let session = rng.pick(sessions).clone();
    let api = rng.pick(apis).clone();
    let ledger = ledgers.entry(session.clone()).or_default();
    let roll = rng.below(100);
    if roll < 65 {
        let policy = *rng.pick(&["reject", "reject", "enqueue", "enqueue", "interrupt"]);
        let content = words(&format!("w{}", rng.below(1000)), 1 + rng.below(8));
        let answer = api.send(&session, &content, policy).await;
        let what = format!("message ({policy}) to {session} via {}", api.name);
        match answer.status {
            StatusCode::ACCEPTED => {
                let id = answer.body["id"].as_str().expect("id").to_string();
                let status = answer.body["status"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                match (policy, status.as_str()) {
                    ("enqueue", "queued") => tally.accepted_queued += 1,
                    (_, "running") => tally.accepted_running += 1,
                    _ => panic!("{what}: 202 with status {status:?}: {}", answer.body),
                }
                assert_eq!(answer.body["content"], content.as_str(), "{what}");
                ledger.accepted.insert(id, (policy.to_string(), status));
            }
            StatusCode::CONFLICT => {
                assert_eq!(policy, "reject", "{what}: {:?}", answer.body);
                assert_eq!(answer.code(), Some("session_busy"), "{what}");
                assert!(
                    answer.body["error"]["running"].is_string(),
                    "{what}: a 409 names the running interaction: {:?}",
                    answer.body
                );
                tally.busy += 1;
            }
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(policy, "enqueue", "{what}: {:?}", answer.body);
                assert_eq!(answer.code(), Some("queue_full"), "{what}");
                tally.queue_full += 1;
            }
            other => panic!("{what}: unexpected {other}: {:?}", answer.body),
        }
    } else if roll < 73 {
        let answer = if roll < 69 {
            let content = *rng.pick(&["/clear", " /clear\n"]);
            let policy = *rng.pick(&["reject", "enqueue", "interrupt"]);
            api.send(&session, content, policy).await
        } else {
            api.post(&format!("/v1/sessions/{session}/clear"), &json!({}))
                .await
        };
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "clear of {session} via {}: {:?}",
            api.name,
            answer.body
        );
        let epoch = answer.body["epoch"].as_i64().expect("epoch");
        let cancelled = ids_of(&answer.body["cancelled"]);
        tally.clears += 1;
        ledger.clears.push((epoch, cancelled));
    } else if roll < 88 {
        // Unnamed, or naming an interaction accepted earlier (perhaps removed by a clear since).
        let named = (rng.below(3) == 0 && !ledger.accepted.is_empty()).then(|| {
            // Sorted: the seed alone decides the choice.
            let mut ids: Vec<&String> = ledger.accepted.keys().collect();
            ids.sort();
            rng.pick(&ids).to_string()
        });
        let body = match &named {
            Some(id) => json!({"interaction_id": id}),
            None => json!({}),
        };
        let answer = api
            .post(&format!("/v1/sessions/{session}/cancel"), &body)
            .await;
        let what = format!("cancel {body} of {session} via {}", api.name);
        tally.cancels += 1;
        if answer.status == StatusCode::NOT_FOUND && named.is_some() {
            assert_eq!(answer.code(), Some("not_found"), "{what}");
            return;
        }
        assert_eq!(answer.status, StatusCode::OK, "{what}: {:?}", answer.body);
        let cancelled = ids_of(&answer.body["cancelled"]);
        assert!(cancelled.len() <= 1, "{what}: {:?}", answer.body);
        if let Some(id) = &named {
            assert!(
                cancelled.iter().all(|c| c == id),
                "{what}: {:?}",
                answer.body
            );
        }
        tally.cancelled += cancelled.len();
        ledger.cancelled.extend(cancelled);
    } else {
        let answer = api.get(&format!("/v1/sessions/{session}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        let running = &answer.body["running"];
        assert!(
            running.is_null()
                || (running["status"] == "running" && running["session"] == session.as_str()),
            "GET {session} via {}: {}",
            api.name,
            answer.body
        );
        assert!(answer.body["queued"].as_u64().is_some(), "{}", answer.body);
        tally.reads += 1;
    }
}

fn ids_of(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("a list of ids: {list}"))
        .iter()
        .map(|id| id.as_str().expect("an id").to_string())
        .collect()
}

/// 30 concurrent `reject` messages to one fresh idle session, spread over the nodes: exactly one
/// `202`, 29 `409` naming it. The winner is then cancelled through another node.
async fn reject_race(cluster: &Cluster, round: usize) {
    let apis = cluster.apis();
    let session = format!("race-{round}");
    let created = apis[round % apis.len()].put_session(&session, "slow").await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    // Long enough (200 words, 6 s) to still run when the last contender arrives.
    let content = Arc::new(words("race", 200));
    let barrier = Arc::new(tokio::sync::Barrier::new(30));
    let mut contenders = tokio::task::JoinSet::new();
    for i in 0..30 {
        let api = apis[i % apis.len()].clone();
        let (session, content, barrier) = (session.clone(), content.clone(), barrier.clone());
        contenders.spawn(async move {
            barrier.wait().await;
            api.send(&session, &content, "reject").await
        });
    }
    let answers = contenders.join_all().await;
    let winner = check_one_winner(&session, &answers);
    let canceller = &apis[(round + 1) % apis.len()];
    let cancelled = canceller
        .post(&format!("/v1/sessions/{session}/cancel"), &json!({}))
        .await;
    assert_eq!(cancelled.status, StatusCode::OK, "{:?}", cancelled.body);
    assert_eq!(cancelled.body["cancelled"], json!([winner]));
    canceller.wait_idle(&session).await;
    let stored = cluster.pg.stored_events(&session).await;
    check_stored_log(&session, &stored, None);
    let started: Vec<String> = stored
        .iter()
        .filter(|e| e["type"] == "task.started")
        .filter_map(interaction_of)
        .collect();
    assert_eq!(
        started,
        vec![winner.clone()],
        "{session}: one interaction ran"
    );
    let (_, end) = final_event_of(&stored, &winner).expect("the winner's final event");
    assert_eq!(end["type"], "task.cancelled", "{end}");
    assert_eq!(
        end["data"]["interaction"]["cancel_reason"], "cancel",
        "{end}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_postgres_tests),
    ignore = "needs PostgreSQL: set BATON_TEST_POSTGRES to an admin URL"
)]
async fn three_nodes_random_traffic_keeps_every_invariant() {
    let admin = postgres_admin_url();
    let seed = seed();
    eprintln!("seed {seed} (BATON_TEST_SEED={seed} replays the same choices)");
    let cluster = Cluster::start(&admin, 3, CONFIG).await;
    let apis = cluster.apis();

    for round in 0..3 {
        reject_race(&cluster, round).await;
    }

    // Sessions, half of them on the slow agent, each created through another node; one live
    // subscriber per (session, node).
    let sessions: Vec<String> = (0..SESSIONS).map(|i| format!("mix-{i}")).collect();
    for (i, session) in sessions.iter().enumerate() {
        let agent = if i % 2 == 0 { "slow" } else { "default" };
        let created = apis[i % apis.len()].put_session(session, agent).await;
        assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    }
    let mut subscribers: Vec<(String, Subscriber)> = Vec::new();
    for session in &sessions {
        for api in &apis {
            subscribers.push((session.clone(), api.subscribe(session).await));
        }
    }

    let deadline = Instant::now() + TRAFFIC;
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..WORKERS {
        let apis = apis.clone();
        let sessions = sessions.clone();
        let mut rng = Rng::new(seed ^ (worker as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        workers.spawn(async move {
            let mut ledgers = HashMap::new();
            let mut tally = Tally::default();
            while Instant::now() < deadline {
                random_operation(&mut rng, &apis, &sessions, &mut ledgers, &mut tally).await;
                tokio::time::sleep(Duration::from_millis(rng.below(25) as u64)).await;
            }
            (ledgers, tally)
        });
    }
    let mut ledgers: HashMap<String, Ledger> = HashMap::new();
    let mut tally = Tally::default();
    for (worker_ledgers, worker_tally) in workers.join_all().await {
        for (session, ledger) in worker_ledgers {
            ledgers.entry(session).or_default().merge(ledger);
        }
        tally.add(worker_tally);
    }
    eprintln!("traffic: {tally:?}");
    assert!(
        tally.accepted_running > 20
            && tally.accepted_queued > 5
            && tally.busy > 5
            && tally.clears > 5
            && tally.cancels > 5,
        "the traffic exercised too little: {tally:?}"
    );

    for (i, session) in sessions.iter().enumerate() {
        apis[(i + 1) % apis.len()].wait_idle(session).await;
    }
    for session in &sessions {
        let stored = cluster.pg.stored_events(session).await;
        let ledger = ledgers.get(session).cloned().unwrap_or_default();
        check_stored_log(session, &stored, Some(&ledger.interrupters()));
        ledger.check_against(session, &stored);

        // Every node tells the same state.
        let last = stored.last().map(seq_of).unwrap_or(0);
        for api in &apis {
            let state = api.wait_idle(session).await;
            assert_eq!(
                state["last_seq"], last,
                "{session} via {}: last_seq is the last stored seq: {state}",
                api.name
            );
            assert_eq!(
                state["epoch"],
                ledger.clears.len(),
                "{session} via {}: one epoch per acknowledged clear: {state}",
                api.name
            );
        }

        // Every subscriber, on whatever node, received the stored log after its hello.
        let mut received = Vec::new();
        for (_, subscriber) in subscribers.iter().filter(|(s, _)| s == session) {
            let events = subscriber.wait_through(last).await;
            received.push((subscriber.what.clone(), subscriber.hello_last_seq, events));
        }
        assert_eq!(received.len(), apis.len());
        check_subscribers(session, &stored, &received);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. A killed node

/// Polls the `interactions` rows of `session` until none of `ids` is queued or running; returns
/// the node each was seen running on.
async fn runners_until_done(
    cluster: &Cluster,
    session: &str,
    ids: &[String],
    timeout: Duration,
) -> HashMap<String, String> {
    let deadline = Instant::now() + timeout;
    let mut runners = HashMap::new();
    loop {
        let rows = cluster.pg.interaction_rows(session).await;
        let mut pending = 0;
        for id in ids {
            let (_, status, node) = rows
                .iter()
                .find(|(row_id, _, _)| row_id == id)
                .unwrap_or_else(|| panic!("{id} has no row in interactions: {rows:?}"));
            if status == "running"
                && let Some(node) = node
            {
                runners.insert(id.clone(), node.clone());
            }
            if matches!(status.as_str(), "queued" | "running") {
                pending += 1;
            }
        }
        if pending == 0 {
            return runners;
        }
        assert!(
            Instant::now() < deadline,
            "{session}: {ids:?} not all final after {timeout:?}: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

/// Waits until `id` runs on some node with some response; returns that node's id.
async fn wait_running_with_output(cluster: &Cluster, via: &Api, session: &str, id: &str) -> String {
    via.wait_interaction(session, id, TIMEOUT, "running with output", |i| {
        i["status"] == "running" && i["response"].as_str().is_some_and(|r| !r.is_empty())
    })
    .await;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let rows = cluster.pg.interaction_rows(session).await;
        if let Some((_, status, Some(node))) = rows.iter().find(|(row_id, _, _)| row_id == id) {
            assert_eq!(status, "running", "{rows:?}");
            return node.clone();
        }
        assert!(Instant::now() < deadline, "{id} names no node: {rows:?}");
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_postgres_tests),
    ignore = "needs PostgreSQL: set BATON_TEST_POSTGRES to an admin URL"
)]
async fn killing_the_node_running_a_task_hands_it_over() {
    let admin = postgres_admin_url();
    let mut cluster = Cluster::start(&admin, 2, &lease_config()).await;
    let (a, b) = (cluster.api(0), cluster.api(1));
    let (node_a, node_b) = (cluster.nodes[0].id.clone(), cluster.nodes[1].id.clone());
    let session = "handover";
    let created = a.put_session(session, "slow").await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);

    // 400 words: 12 s, longer than the lease and the takeover together.
    let running = a.send(session, &words("long", 400), "reject").await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{:?}", running.body);
    assert_eq!(running.body["status"], "running");
    let running_id = running.body["id"].as_str().expect("id").to_string();
    let mut queued = Vec::new();
    for i in 0..2 {
        // 20 words: 0.6 s each, long enough to be seen running.
        let content = words(&format!("queued-{i}"), 20);
        let answer = a.send(session, &content, "enqueue").await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
        assert_eq!(answer.body["status"], "queued", "{:?}", answer.body);
        queued.push((answer.body["id"].as_str().expect("id").to_string(), content));
    }
    let runner = wait_running_with_output(&cluster, &b, session, &running_id).await;
    assert_eq!(
        runner, node_a,
        "the node the message was posted to runs it (nodes: a={node_a}, b={node_b})"
    );

    let killed_at = Instant::now();
    cluster.nodes[0].kill9();
    let failed = b.wait_final(session, &running_id, TAKEOVER).await;
    eprintln!(
        "the survivor failed the task {:?} after the kill",
        killed_at.elapsed()
    );
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "interrupted", "{failed}");

    let ids: Vec<String> = queued.iter().map(|(id, _)| id.clone()).collect();
    let runners = runners_until_done(&cluster, session, &ids, TAKEOVER + TIMEOUT).await;
    for (id, content) in &queued {
        let done = b.wait_final(session, id, TIMEOUT).await;
        assert_eq!(done["status"], "completed", "{done}");
        assert_eq!(done["response"], content.as_str(), "{done}");
        assert_eq!(
            runners.get(id),
            Some(&node_b),
            "{id} ran on the survivor (nodes: a={node_a}, b={node_b}; seen {runners:?})"
        );
    }
    let state = b.wait_idle(session).await;
    assert!(state["running"].is_null(), "{state}");

    let stored = cluster.pg.stored_events(session).await;
    check_stored_log(session, &stored, None);
    let finals = stored
        .iter()
        .filter(|e| {
            e["type"].as_str().is_some_and(is_final_type)
                && interaction_of(e).as_deref() == Some(running_id.as_str())
        })
        .count();
    assert_eq!(
        finals, 1,
        "exactly one final event for the interrupted task"
    );
    let (_, end) = final_event_of(&stored, &running_id).expect("final");
    assert_eq!(end["type"], "task.failed", "{end}");
    assert_eq!(
        end["data"]["interaction"]["error"]["code"], "interrupted",
        "{end}"
    );
    let started: Vec<String> = stored
        .iter()
        .filter(|e| e["type"] == "task.started")
        .filter_map(interaction_of)
        .collect();
    let mut expected = vec![running_id];
    expected.extend(ids);
    assert_eq!(started, expected, "the queued ones ran after it, in order");
}

// ---------------------------------------------------------------------------------------------
// 3. A stalled node

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_postgres_tests),
    ignore = "needs PostgreSQL: set BATON_TEST_POSTGRES to an admin URL"
)]
async fn a_paused_node_writes_nothing_for_tasks_it_lost() {
    let admin = postgres_admin_url();
    let cluster = Cluster::start(&admin, 2, &lease_config()).await;
    let (a, b) = (cluster.api(0), cluster.api(1));
    let node_a = cluster.nodes[0].id.clone();
    let session = "stalled";
    let created = a.put_session(session, "slow").await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let answer = a.send(session, &words("stalled", 400), "reject").await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
    let id = answer.body["id"].as_str().expect("id").to_string();
    let runner = wait_running_with_output(&cluster, &b, session, &id).await;
    assert_eq!(runner, node_a, "the node the message was posted to runs it");

    cluster.nodes[0].pause();
    let paused_at = Instant::now();
    let failed = b.wait_final(session, &id, TAKEOVER).await;
    eprintln!(
        "the survivor failed the task {:?} after the pause",
        paused_at.elapsed()
    );
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "interrupted", "{failed}");

    // The stalled node wakes up still "running" the task: it must not write a thing about it.
    cluster.nodes[0].resume();
    tokio::time::sleep(Duration::from_secs(2) + 40 * SLOW_WORD).await;
    let stored = cluster.pg.stored_events(session).await;
    let (final_at, end) = final_event_of(&stored, &id).expect("the final event");
    assert_eq!(end["type"], "task.failed", "{end}");
    let after: Vec<&Value> = stored[final_at + 1..]
        .iter()
        .filter(|e| interaction_of(e).as_deref() == Some(id.as_str()))
        .collect();
    assert!(
        after.is_empty(),
        "the stalled node wrote about {id} after its final event (seq {}): {after:?}",
        seq_of(end)
    );
    check_stored_log(session, &stored, None);
    let unchanged = b.interaction(session, &id).await;
    assert_eq!(
        unchanged, failed,
        "nothing about {id} changed after it was final"
    );

    // It rejoins: ready, heartbeating, and running what is posted to it.
    a.wait_ready(TAKEOVER).await;
    let deadline = Instant::now() + TAKEOVER;
    loop {
        let live = cluster.pg.live_nodes().await;
        if live.len() >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the resumed node does not heartbeat again: live nodes {live:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for target in [session, "after-the-pause"] {
        let content = words("rejoined", 5);
        let answer = a.send(target, &content, "reject").await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
        let new_id = answer.body["id"].as_str().expect("id").to_string();
        let done = a.wait_final(target, &new_id, TIMEOUT).await;
        assert_eq!(done["status"], "completed", "{done}");
        assert_eq!(done["response"], content.as_str(), "{done}");
        check_stored_log(target, &cluster.pg.stored_events(target).await, None);
    }
}

// ---------------------------------------------------------------------------------------------
// 4. A lost LISTEN connection

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_postgres_tests),
    ignore = "needs PostgreSQL: set BATON_TEST_POSTGRES to an admin URL"
)]
async fn a_dropped_listen_connection_loses_no_event() {
    let admin = postgres_admin_url();
    let cluster = Cluster::start(&admin, 2, CONFIG).await;
    let (a, b) = (cluster.api(0), cluster.api(1));
    let session = "listen";
    let created = b.put_session(session, "slow").await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let subscriber = a.subscribe(session).await;

    // Messages posted on B for 3 s; A's LISTEN connection is terminated in the middle.
    let traffic = {
        let b = b.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut accepted = 0;
            let mut i = 0;
            while started.elapsed() < Duration::from_secs(3) {
                let answer = b
                    .send(session, &words(&format!("m{i}"), 1 + i % 4), "enqueue")
                    .await;
                match answer.status {
                    StatusCode::ACCEPTED => accepted += 1,
                    StatusCode::TOO_MANY_REQUESTS => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    other => panic!("message {i}: {other}: {:?}", answer.body),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            accepted
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let terminated = cluster
        .pg
        .terminate_listeners_of(&cluster.db.name, &cluster.nodes[0])
        .await;
    assert!(
        terminated >= 1,
        "node {} has no LISTEN connection (application_name 'baton-listener') to terminate",
        cluster.nodes[0].name
    );
    let accepted = traffic.await.expect("the traffic task");
    assert!(accepted > 10, "too little traffic: {accepted} messages");
    cluster
        .pg
        .wait_listening(&cluster.db.name, &cluster.nodes[0])
        .await;

    b.wait_idle(session).await;
    let stored = cluster.pg.stored_events(session).await;
    check_stored_log(session, &stored, None);
    let last = stored.last().map(seq_of).unwrap_or(0);
    let received = subscriber.wait_through(last).await;
    assert_exactly(
        &subscriber.what,
        &received,
        &stored,
        subscriber.hello_last_seq,
    );
}

// ---------------------------------------------------------------------------------------------
// Self-checks of the checkers, on synthetic logs (these run without PostgreSQL).

mod checkers {
    use super::*;
    use crate::common::Answer;
    use crate::common::cluster::{admin_url_from, database_url};
    use reqwest::header::HeaderMap;

    fn interaction(id: &str, status: &str, reason: Option<&str>) -> Value {
        json!({"id": id, "status": status, "cancel_reason": reason, "error": null})
    }

    fn created() -> Value {
        json!({"type": "session.created", "data": {"session": {"epoch": 0}}})
    }
    fn queued(id: &str) -> Value {
        json!({"type": "interaction.queued", "data": {"interaction": interaction(id, "queued", None)}})
    }
    fn started(id: &str) -> Value {
        json!({"type": "task.started", "data": {"interaction": interaction(id, "running", None)}})
    }
    fn delta(id: &str) -> Value {
        json!({"type": "task.delta", "data": {"interaction_id": id, "text": "w "}})
    }
    fn completed(id: &str) -> Value {
        json!({"type": "task.completed", "data": {"interaction": interaction(id, "completed", None)}})
    }
    fn cancelled(id: &str, reason: &str) -> Value {
        json!({"type": "task.cancelled", "data": {"interaction": interaction(id, "cancelled", Some(reason))}})
    }
    fn cleared(epoch: i64) -> Value {
        json!({"type": "session.cleared", "data": {"epoch": epoch}})
    }

    /// Numbers the events 1, 2, … (gaps are allowed: every third seq is skipped).
    fn log(events: Vec<Value>) -> Vec<Value> {
        events
            .into_iter()
            .enumerate()
            .map(|(i, mut e)| {
                e["seq"] = json!(i as i64 + 1 + (i as i64 / 2));
                e["session"] = json!("s");
                e["at"] = json!("2026-01-01T00:00:00.000Z");
                e
            })
            .collect()
    }

    /// A good log: a run, a queued one cancelled by a clear while `a` ran, an interrupt.
    fn good_log() -> Vec<Value> {
        log(vec![
            created(),
            started("a"),
            delta("a"),
            queued("b"),
            cancelled("a", "clear"),
            cancelled("b", "clear"),
            cleared(1),
            started("c"),
            delta("c"),
            queued("d"),
            cancelled("c", "interrupt"),
            cancelled("d", "interrupt"),
            started("e"),
            delta("e"),
            completed("e"),
        ])
    }

    fn good_ledger() -> Ledger {
        let mut ledger = Ledger::default();
        for (id, policy, status) in [
            ("a", "reject", "running"),
            ("b", "enqueue", "queued"),
            ("c", "enqueue", "running"),
            ("d", "enqueue", "queued"),
            ("e", "interrupt", "running"),
        ] {
            ledger
                .accepted
                .insert(id.into(), (policy.into(), status.into()));
        }
        ledger.clears.push((1, vec!["a".into(), "b".into()]));
        ledger
    }

    #[test]
    fn a_good_log_passes() {
        let events = good_log();
        let ledger = good_ledger();
        check_stored_log("good", &events, Some(&ledger.interrupters()));
        ledger.check_against("good", &events);
    }

    #[test]
    #[should_panic(expected = "two running at once")]
    fn two_running_fail() {
        check_stored_log(
            "bad",
            &log(vec![created(), started("a"), started("b")]),
            None,
        );
    }

    #[test]
    #[should_panic(expected = "has no final event")]
    fn a_missing_final_fails() {
        check_stored_log("bad", &log(vec![created(), started("a"), delta("a")]), None);
    }

    #[test]
    #[should_panic(expected = "after its final event")]
    fn a_second_final_fails() {
        check_stored_log(
            "bad",
            &log(vec![
                created(),
                started("a"),
                completed("a"),
                cancelled("a", "cancel"),
            ]),
            None,
        );
    }

    #[test]
    #[should_panic(expected = "of an earlier epoch")]
    fn an_old_interaction_after_a_clear_fails() {
        check_stored_log(
            "bad",
            &log(vec![
                created(),
                started("a"),
                cancelled("a", "clear"),
                cleared(1),
                delta("a"),
            ]),
            None,
        );
    }

    #[test]
    #[should_panic(expected = "not followed by their session.cleared")]
    fn a_clear_cancellation_apart_from_its_cleared_event_fails() {
        check_stored_log(
            "bad",
            &log(vec![
                created(),
                started("a"),
                cancelled("a", "clear"),
                started("b"),
                completed("b"),
                cleared(1),
            ]),
            None,
        );
    }

    #[test]
    #[should_panic(expected = "the clear left")]
    fn a_clear_cancellation_after_its_cleared_event_fails() {
        check_stored_log(
            "bad",
            &log(vec![
                created(),
                started("a"),
                cleared(1),
                cancelled("a", "clear"),
            ]),
            None,
        );
    }

    #[test]
    #[should_panic(expected = "bumps the epoch by one")]
    fn a_skipped_epoch_fails() {
        check_stored_log("bad", &log(vec![created(), cleared(2)]), None);
    }

    #[test]
    #[should_panic(expected = "not FIFO")]
    fn a_queue_jump_fails() {
        check_stored_log(
            "bad",
            &log(vec![
                created(),
                started("a"),
                queued("b"),
                queued("c"),
                completed("a"),
                started("c"),
                completed("c"),
                started("b"),
                completed("b"),
            ]),
            None,
        );
    }

    #[test]
    #[should_panic(expected = "queued while the session was idle")]
    fn queued_on_an_idle_session_fails() {
        check_stored_log(
            "bad",
            &log(vec![created(), queued("a"), started("a"), completed("a")]),
            None,
        );
    }

    #[test]
    #[should_panic(expected = "not sent with policy interrupt")]
    fn an_interrupt_followed_by_another_start_fails() {
        let events = good_log();
        let mut ledger = good_ledger();
        ledger.accepted.get_mut("e").expect("e").0 = "enqueue".into();
        check_stored_log("bad", &events, Some(&ledger.interrupters()));
    }

    #[test]
    #[should_panic(expected = "acknowledged (202, reject) but is not in the log")]
    fn a_lost_acknowledged_message_fails() {
        let mut ledger = good_ledger();
        ledger
            .accepted
            .insert("z".into(), ("reject".into(), "running".into()));
        ledger.check_against("bad", &good_log());
    }

    #[test]
    #[should_panic(expected = "no message was acknowledged")]
    fn an_unacknowledged_interaction_fails() {
        let mut ledger = good_ledger();
        ledger.accepted.remove("e");
        ledger.check_against("bad", &good_log());
    }

    #[test]
    #[should_panic(expected = "its first event is")]
    fn a_queued_answer_for_a_started_message_fails() {
        let mut ledger = good_ledger();
        ledger.accepted.get_mut("c").expect("c").1 = "queued".into();
        ledger.check_against("bad", &good_log());
    }

    #[test]
    #[should_panic(expected = "named c, which ended with")]
    fn a_clear_answer_naming_another_interaction_fails() {
        let mut ledger = good_ledger();
        ledger.clears[0].1.push("c".into());
        ledger.check_against("bad", &good_log());
    }

    #[test]
    #[should_panic(expected = "a cancel answered e as cancelled")]
    fn a_cancel_answer_for_a_completed_interaction_fails() {
        let mut ledger = good_ledger();
        ledger.cancelled.push("e".into());
        ledger.check_against("bad", &good_log());
    }

    #[test]
    fn subscribers_that_match_the_store_pass() {
        let stored = good_log();
        let after = seq_of(&stored[3]);
        let received = vec![
            ("all".to_string(), 0, stored.clone()),
            ("late".to_string(), after, stored[4..].to_vec()),
        ];
        check_subscribers("good", &stored, &received);
    }

    #[test]
    #[should_panic(expected = "differs from the stored log")]
    fn a_subscriber_with_a_gap_fails() {
        let stored = good_log();
        let mut events = stored.clone();
        events.remove(5);
        check_subscribers("bad", &stored, &[("gap".to_string(), 0, events)]);
    }

    #[test]
    #[should_panic(expected = "differs from the stored log")]
    fn a_subscriber_with_a_duplicate_fails() {
        let stored = good_log();
        let mut events = stored[..8].to_vec();
        events.insert(5, stored[4].clone());
        check_subscribers("bad", &stored, &[("dup".to_string(), 0, events)]);
    }

    #[test]
    #[should_panic(expected = "missing events at the end")]
    fn a_subscriber_missing_the_end_fails() {
        let stored = good_log();
        let events = stored[..stored.len() - 1].to_vec();
        check_subscribers("bad", &stored, &[("short".to_string(), 0, events)]);
    }

    fn answer(status: StatusCode, body: Value) -> Answer {
        Answer {
            status,
            headers: HeaderMap::new(),
            body,
        }
    }

    fn busy(running: &str) -> Answer {
        answer(
            StatusCode::CONFLICT,
            json!({"error": {"code": "session_busy", "message": "busy", "running": running}}),
        )
    }

    #[test]
    fn one_winner_is_found() {
        let won = answer(
            StatusCode::ACCEPTED,
            json!({"id": "w", "status": "running"}),
        );
        let answers = vec![busy("w"), won, busy("w")];
        assert_eq!(check_one_winner("race", &answers), "w");
    }

    #[test]
    #[should_panic(expected = "2 of 3 concurrent reject messages were accepted")]
    fn two_winners_fail() {
        let won = |id: &str| answer(StatusCode::ACCEPTED, json!({"id": id, "status": "running"}));
        check_one_winner("race", &[won("x"), won("y"), busy("x")]);
    }

    #[test]
    #[should_panic(expected = "names another running interaction")]
    fn a_conflict_naming_another_runner_fails() {
        let won = answer(
            StatusCode::ACCEPTED,
            json!({"id": "w", "status": "running"}),
        );
        check_one_winner("race", &[won, busy("other")]);
    }

    #[test]
    fn database_urls_name_the_test_database() {
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            database_url("postgresql://u:p@h/admin?sslmode=disable", "t1"),
            "postgresql://u:p@h/t1?sslmode=disable"
        );
        assert_eq!(
            database_url("postgres://h:5432", "t1"),
            "postgres://h:5432/t1"
        );
    }

    #[test]
    fn an_unset_or_blank_variable_skips() {
        assert_eq!(admin_url_from(None), None);
        assert_eq!(admin_url_from(Some("  ".into())), None);
        assert_eq!(
            admin_url_from(Some("postgres://h/db\n".into())).as_deref(),
            Some("postgres://h/db")
        );
    }

    #[test]
    fn the_generator_replays_a_seed() {
        let (mut x, mut y) = (Rng::new(7), Rng::new(7));
        let a: Vec<usize> = (0..32).map(|_| x.below(10)).collect();
        let b: Vec<usize> = (0..32).map(|_| y.below(10)).collect();
        assert_eq!(a, b);
        assert!(a.iter().collect::<HashSet<_>>().len() > 3, "{a:?}");
    }

    #[test]
    fn a_final_interaction_is_recognised() {
        assert!(is_final_interaction(&json!({"status": "failed"})));
        assert!(!is_final_interaction(&json!({"status": "queued"})));
    }
}
