//! The session rules without a database: each operation on hand-made snapshots, then random
//! sequences of operations against a tiny in-memory store, checking I1–I4 after every step.

use std::collections::HashMap;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::op;
use super::plan::Needs;
use super::*;
use crate::model::{
    CancelReason, ErrorInfo, Event, EventType, IdGenerator, Interaction, InteractionId, JsonObject,
    Millis, Policy, SessionId, Status,
};

const T0: i64 = 1_700_000_000_000;

fn sid() -> SessionId {
    SessionId::new(&crate::model::Tenant::default_tenant(), "s").unwrap()
}

fn object(value: Value) -> JsonObject {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn message(content: &str, policy: Policy, key: Option<&str>) -> NewMessage {
    NewMessage {
        session: sid(),
        content: content.into(),
        metadata: JsonObject::new(),
        policy,
        idempotency_key: key.map(str::to_string),
        queue_limit: 2,
        default_agent: "default".into(),
        watch_final: false,
        invalid: None,
    }
}

/// A tiny store: what the backends keep, kept in memory, changed only by applying plans.
#[derive(Default)]
struct Memory {
    session: Option<SessionRow>,
    retired_seq: i64,
    /// Every stored interaction, with its idempotency key, in id order.
    interactions: Vec<(Interaction, Option<String>)>,
    /// Every event ever published, in order (a deleted session's included).
    published: Vec<Event>,
    ids: IdGenerator,
    now: i64,
}

impl Memory {
    fn snapshot(&self, needs: Needs<'_>) -> Snapshot {
        let mut s = Snapshot::absent(sid(), Millis(self.now));
        s.session = self.session.clone();
        if s.session.is_none() {
            s.retired_seq = if needs.creates { self.retired_seq } else { 0 };
            return s;
        }
        for (i, key) in &self.interactions {
            match i.status {
                Status::Running | Status::Waiting => s.running = Some(i.clone()),
                Status::Queued => s.queued.push(i.clone()),
                _ => {}
            }
            if key.is_some() && key.as_deref() == needs.key {
                s.keyed = Some(i.clone());
            }
            if Some(&i.id) == needs.named {
                s.named = Some(i.clone());
            }
        }
        s
    }

    fn run<O: Op>(&mut self, op: O) -> StoreResult<Plan<O::Outcome>> {
        if let Some(task) = op.task()
            && !self.interactions.iter().any(|(i, _)| &i.id == task)
        {
            // The backends answer `when_gone` here; either way nothing changes.
            return Err(StoreError::Fenced);
        }
        let mut snapshot = self.snapshot(op.needs());
        if op.needs().inserts {
            snapshot.fresh_id = Some(self.ids.next_id());
        }
        let plan = decide(snapshot, op)?;
        self.apply(&plan);
        Ok(plan)
    }

    fn accept(&mut self, message: NewMessage) -> StoreResult<Plan<Accepted>> {
        self.run(op::Accept(message)).map(|plan| {
            plan.map(|received| match received {
                Received::Accepted(accepted) => accepted,
                Received::Cleared(_) => panic!("a message, not /clear"),
            })
        })
    }

    fn find(&mut self, id: &InteractionId) -> &mut Interaction {
        let (i, _) = self
            .interactions
            .iter_mut()
            .find(|(i, _)| &i.id == id)
            .unwrap();
        i
    }

    fn apply<T>(&mut self, plan: &Plan<T>) {
        for write in &plan.writes {
            match write {
                Write::CreateSession {
                    agent,
                    context,
                    last_seq,
                } => {
                    assert!(self.session.is_none(), "created twice");
                    self.session = Some(SessionRow {
                        agent: agent.clone(),
                        context: Ok(context.clone()),
                        epoch: 0,
                        last_seq: *last_seq,
                        created_at: plan.now,
                    });
                }
                Write::SetAgent(agent) => self.session.as_mut().unwrap().agent = agent.clone(),
                Write::SetContext(c) => self.session.as_mut().unwrap().context = Ok(c.clone()),
                Write::Clear { epoch } => {
                    self.interactions.clear();
                    let row = self.session.as_mut().unwrap();
                    row.context = Ok(JsonObject::new());
                    row.epoch = *epoch;
                }
                Write::Delete { last_seq } => {
                    self.interactions.clear();
                    self.session = None;
                    self.retired_seq = *last_seq;
                }
                Write::ForgetKey(id) => {
                    for (i, key) in &mut self.interactions {
                        if &i.id == id {
                            *key = None;
                        }
                    }
                }
                Write::Insert {
                    interaction,
                    idempotency_key,
                    ..
                } => {
                    if let Some(key) = idempotency_key {
                        assert!(
                            !self
                                .interactions
                                .iter()
                                .any(|(_, k)| k.as_ref() == Some(key)),
                            "the unique key index would refuse this"
                        );
                    }
                    self.interactions
                        .push((interaction.clone(), idempotency_key.clone()));
                }
                Write::AppendResponse { id, text } => self.find(id).response.push_str(text),
                Write::Finalize(f) => {
                    let stored = self.find(&f.id);
                    assert!(!stored.status.is_final(), "finalized twice");
                    *stored = f.clone();
                }
                Write::Start(s) => {
                    let stored = self.find(&s.id);
                    assert_eq!(stored.status, Status::Queued);
                    *stored = s.clone();
                }
                Write::Wait(w) => {
                    let stored = self.find(&w.id);
                    assert_eq!(stored.status, Status::Running, "only a running one asks");
                    *stored = w.clone();
                }
                Write::Resume(r) => {
                    let stored = self.find(&r.id);
                    assert_eq!(stored.status, Status::Waiting, "only a waiting one resumes");
                    *stored = r.clone();
                }
            }
        }
        if let Some(seq) = plan.save_seq {
            self.session.as_mut().unwrap().last_seq = seq;
        }
        self.published.extend(plan.events.iter().cloned());
        self.now += 1;
    }

    fn running(&self) -> Vec<&Interaction> {
        self.interactions
            .iter()
            .map(|(i, _)| i)
            .filter(|i| i.status == Status::Running)
            .collect()
    }

    /// `running` and `waiting` ones: I1 allows one.
    fn active(&self) -> Vec<&Interaction> {
        self.interactions
            .iter()
            .map(|(i, _)| i)
            .filter(|i| i.status.is_active())
            .collect()
    }

    fn kinds_since(&self, from: usize) -> Vec<&'static str> {
        self.published[from..]
            .iter()
            .map(|e| e.kind.as_str())
            .collect()
    }
}

fn new_memory() -> Memory {
    Memory {
        now: T0,
        ..Memory::default()
    }
}

fn started_id(plan: &Plan<Accepted>) -> InteractionId {
    plan.outcome.interaction.id.clone()
}

/// The interactions a plan starts here.
fn starts<T>(plan: &Plan<T>) -> Vec<InteractionId> {
    plan.effects
        .start
        .iter()
        .map(|t| t.interaction.id.clone())
        .collect()
}

#[test]
fn accepting_creates_the_session_then_starts() {
    let mut m = new_memory();
    let plan = m.accept(message("hi", Policy::Reject, None)).unwrap();
    assert_eq!(m.kinds_since(0), ["session.created", "task.started"]);
    assert_eq!(plan.events[0].seq, 1);
    // The session row is inserted with its final seq: no second write.
    assert!(matches!(
        plan.writes[0],
        Write::CreateSession { last_seq: 2, .. }
    ));
    assert_eq!(plan.save_seq, None);
    assert_eq!(plan.effects.start[0].agent, "default");
    let a = plan.outcome;
    assert_eq!(a.interaction.status, Status::Running);
    assert!(!a.replayed);
}

/// `/clear` is decided here, once: a message whose content is the command clears the session
/// (cancelling what runs, whatever the policy and key); what a transport found wrong with the
/// fields a clear ignores refuses any other message, before anything is written.
#[test]
fn a_clear_message_clears_and_only_it_ignores_invalid_extras() {
    let mut m = new_memory();
    let running = started_id(&m.accept(message("hi", Policy::Reject, None)).unwrap());
    let mut clear = message(" /clear\n", Policy::Reject, Some("key"));
    clear.invalid = Some("wait must be a number of seconds".into());
    let plan = m.run(op::Accept(clear)).unwrap();
    match &plan.outcome {
        Received::Cleared(cleared) => assert_eq!(cleared.cancelled, std::slice::from_ref(&running)),
        other => panic!("a clear, not {other:?}"),
    }
    assert_eq!(plan.effects.stop, [running]);
    assert_eq!(m.kinds_since(0).last().copied(), Some("session.cleared"));
    let before = m.kinds_since(0).len();
    let mut bad = message("hello", Policy::Reject, None);
    bad.invalid = Some("Idempotency-Key must be printable ASCII".into());
    match m.run(op::Accept(bad)) {
        Err(StoreError::Invalid(why)) => assert!(why.contains("Idempotency-Key"), "{why}"),
        other => panic!("refused, not {other:?}"),
    }
    assert_eq!(m.kinds_since(0).len(), before, "a refusal writes nothing");
}

#[test]
fn each_policy_when_busy() {
    let mut m = new_memory();
    let first = started_id(&m.accept(message("a", Policy::Reject, None)).unwrap());
    let busy = m.accept(message("b", Policy::Reject, None)).unwrap_err();
    assert!(matches!(busy, StoreError::Busy { running } if running == first));

    let queued = m.accept(message("b", Policy::Enqueue, None)).unwrap();
    assert_eq!(queued.events[0].kind, EventType::InteractionQueued);
    m.accept(message("c", Policy::Enqueue, None)).unwrap();
    let full = m.accept(message("d", Policy::Enqueue, None)).unwrap_err();
    assert!(matches!(full, StoreError::QueueFull { limit: 2 }));

    let from = m.published.len();
    let plan = m.accept(message("e", Policy::Interrupt, None)).unwrap();
    assert_eq!(
        m.kinds_since(from),
        [
            "task.cancelled",
            "task.cancelled",
            "task.cancelled",
            "task.started"
        ]
    );
    let cancelled = &plan.effects.stop;
    assert_eq!(cancelled.len(), 3);
    assert_eq!(
        cancelled[0], first,
        "the running one first, then the queue in order"
    );
    assert_eq!(m.running().len(), 1);
    assert_eq!(m.running()[0].content, "e");
}

#[test]
fn a_reject_with_only_queued_work_names_the_oldest() {
    let mut m = new_memory();
    let first = started_id(&m.accept(message("a", Policy::Reject, None)).unwrap());
    let second = started_id(&m.accept(message("b", Policy::Enqueue, None)).unwrap());
    m.run(op::Cancel {
        target: CancelTarget::Named(first),
        reason: CancelReason::Cancel,
        start_next: false,
    })
    .unwrap();
    let busy = m.accept(message("c", Policy::Reject, None)).unwrap_err();
    assert!(matches!(busy, StoreError::Busy { running } if running == second));
}

#[test]
fn idempotency_keys_replay_mismatch_and_expire() {
    let mut m = new_memory();
    let first = started_id(&m.accept(message("a", Policy::Reject, Some("k"))).unwrap());
    let replay = m.accept(message("a", Policy::Reject, Some("k"))).unwrap();
    assert!(replay.events.is_empty() && replay.writes.is_empty());
    let a = replay.outcome;
    assert!(a.replayed);
    assert_eq!(a.interaction.id, first);
    let mismatch = m.accept(message("other", Policy::Reject, Some("k")));
    assert!(matches!(mismatch, Err(StoreError::IdempotencyMismatch)));

    m.now += IDEMPOTENCY_TTL_MS + 1;
    let plan = m
        .accept(message("other", Policy::Interrupt, Some("k")))
        .unwrap();
    assert_eq!(plan.writes[0], Write::ForgetKey(first));
    assert!(!plan.outcome.replayed);
}

#[test]
fn a_task_writes_only_while_running() {
    let mut m = new_memory();
    let id = started_id(&m.accept(message("a", Policy::Reject, None)).unwrap());
    let outputs = vec![
        TaskOutput::Delta("one ".into()),
        TaskOutput::Progress(json!({"p": 1})),
        TaskOutput::ContextPatch(object(json!({"k": 1}))),
        TaskOutput::Delta("two".into()),
    ];
    let plan = m
        .run(op::Append {
            id: id.clone(),
            outputs,
        })
        .unwrap();
    let kinds: Vec<_> = plan.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "task.delta",
            "task.progress",
            "context.updated",
            "task.delta"
        ]
    );
    assert!(plan.writes.contains(&Write::AppendResponse {
        id: id.clone(),
        text: "one two".into()
    }));
    m.run(op::Cancel {
        target: CancelTarget::Running,
        reason: CancelReason::Cancel,
        start_next: true,
    })
    .unwrap();
    let late = op::Append {
        id: id.clone(),
        outputs: vec![TaskOutput::Delta("late".into())],
    };
    assert!(matches!(m.run(late), Err(StoreError::Fenced)));
    let late_end = op::Finish {
        id,
        outputs: vec![],
        end: TaskEnd::Completed { response: None },
        start_next: true,
    };
    assert!(matches!(m.run(late_end), Err(StoreError::Fenced)));
}

#[test]
fn finishing_keeps_or_replaces_the_response_and_starts_the_next() {
    let mut m = new_memory();
    let a = started_id(&m.accept(message("a", Policy::Reject, None)).unwrap());
    let b = started_id(&m.accept(message("b", Policy::Enqueue, None)).unwrap());
    m.run(op::Append {
        id: a.clone(),
        outputs: vec![TaskOutput::Delta("x".into())],
    })
    .unwrap();
    let plan = m
        .run(op::Finish {
            id: a.clone(),
            outputs: vec![TaskOutput::Delta("y".into())],
            end: TaskEnd::Completed { response: None },
            start_next: true,
        })
        .unwrap();
    assert_eq!(starts(&plan), std::slice::from_ref(&b));
    assert_eq!(m.find(&a).response, "xy");
    assert_eq!(m.find(&a).status, Status::Completed);

    let plan = m
        .run(op::Finish {
            id: b.clone(),
            outputs: vec![TaskOutput::Delta("partial".into())],
            end: TaskEnd::Completed {
                response: Some("whole".into()),
            },
            start_next: false,
        })
        .unwrap();
    assert!(starts(&plan).is_empty());
    assert_eq!(m.find(&b).response, "whole");

    let c = started_id(&m.accept(message("c", Policy::Reject, None)).unwrap());
    let error = ErrorInfo {
        code: "agent_error".into(),
        message: "boom".into(),
    };
    m.run(op::Finish {
        id: c.clone(),
        outputs: vec![],
        end: TaskEnd::Failed(error.clone()),
        start_next: true,
    })
    .unwrap();
    assert_eq!(m.find(&c).status, Status::Failed);
    assert_eq!(m.find(&c).error, Some(error));
}

#[test]
fn cancelling_by_name_or_the_running_one() {
    let mut m = new_memory();
    let cancel = |target, start_next| op::Cancel {
        target,
        reason: CancelReason::Cancel,
        start_next,
    };
    let nothing = m.run(cancel(CancelTarget::Running, true));
    assert!(matches!(nothing, Err(StoreError::SessionNotFound)));
    let a = started_id(&m.accept(message("a", Policy::Reject, None)).unwrap());
    let b = started_id(&m.accept(message("b", Policy::Enqueue, None)).unwrap());
    let c = started_id(&m.accept(message("c", Policy::Enqueue, None)).unwrap());

    // A queued one: nothing starts, the running one keeps running.
    let plan = m.run(cancel(CancelTarget::Named(c.clone()), true)).unwrap();
    assert!(plan.outcome == [c.clone()] && starts(&plan).is_empty());
    assert_eq!(m.find(&c).cancel_reason, Some(CancelReason::Cancel));
    // Already final: nothing to do.
    let plan = m.run(cancel(CancelTarget::Named(c), true)).unwrap();
    assert!(plan.events.is_empty());
    // Unknown here.
    let stranger = m.ids.next_id();
    let unknown = m.run(cancel(CancelTarget::Named(stranger), true));
    assert!(matches!(unknown, Err(StoreError::InteractionNotFound)));
    // The running one, and the next starts.
    let plan = m.run(cancel(CancelTarget::Running, true)).unwrap();
    assert_eq!(plan.outcome, [a]);
    assert_eq!(starts(&plan), [b]);
}

#[test]
fn clear_cancels_everything_and_starts_a_new_epoch() {
    let mut m = new_memory();
    m.accept(message("a", Policy::Reject, None)).unwrap();
    m.accept(message("b", Policy::Enqueue, None)).unwrap();
    m.run(op::UpdateContext {
        set: Some(object(json!({"k": 1}))),
        patch: None,
        default_agent: "default".into(),
    })
    .unwrap();
    let from = m.published.len();
    let plan = m
        .run(op::Clear {
            default_agent: "default".into(),
        })
        .unwrap();
    assert_eq!(
        m.kinds_since(from),
        ["task.cancelled", "task.cancelled", "session.cleared"]
    );
    assert_eq!(plan.writes, [Write::Clear { epoch: 1 }]);
    assert!(m.interactions.is_empty());
    let row = m.session.as_ref().unwrap();
    assert_eq!(row.epoch, 1);
    assert_eq!(row.context.as_ref().unwrap(), &JsonObject::new());
    assert_eq!(row.last_seq, m.published.last().unwrap().seq);
}

#[test]
fn a_deleted_session_is_gone_and_its_seqs_are_never_reused() {
    let mut m = new_memory();
    let gone = m.run(op::DeleteSession);
    assert!(matches!(gone, Err(StoreError::SessionNotFound)));
    m.accept(message("a", Policy::Reject, None)).unwrap();
    let plan = m.run(op::DeleteSession).unwrap();
    assert!(plan.deletes_session());
    assert_eq!(plan.save_seq, None);
    assert_eq!(m.kinds_since(2), ["task.cancelled", "session.deleted"]);
    assert_eq!(m.retired_seq, 4);
    let plan = m.accept(message("b", Policy::Reject, None)).unwrap();
    assert_eq!(plan.events[0].seq, 5);
    assert_eq!(plan.events[0].kind, EventType::SessionCreated);
}

#[test]
fn put_session_creates_or_changes_only_what_is_given() {
    let mut m = new_memory();
    let plan = m
        .run(op::PutSession {
            agent: Some("slow".into()),
            context: Some(object(json!({"a": 1}))),
            default_agent: "default".into(),
        })
        .unwrap();
    let (session, created) = plan.outcome;
    assert!(created);
    assert_eq!((session.agent.as_str(), session.last_seq), ("slow", 1));
    let plan = m
        .run(op::PutSession {
            agent: Some("other".into()),
            context: None,
            default_agent: "default".into(),
        })
        .unwrap();
    assert_eq!(plan.writes, [Write::SetAgent("other".into())]);
    assert!(plan.events.is_empty());
    let plan = m
        .run(op::PutSession {
            agent: None,
            context: Some(JsonObject::new()),
            default_agent: "default".into(),
        })
        .unwrap();
    assert_eq!(plan.events[0].kind, EventType::ContextUpdated);
    let (session, created) = plan.outcome;
    assert!(!created);
    assert_eq!(session.agent, "other");
    assert_eq!(session.last_seq, 2);
}

#[test]
fn context_patches_merge() {
    let mut m = new_memory();
    let update = |value: Value, patch: bool| op::UpdateContext {
        set: (!patch).then(|| object(value.clone())),
        patch: patch.then(|| object(value)),
        default_agent: "default".into(),
    };
    m.run(update(json!({"a": 1, "b": {"c": 2}}), false))
        .unwrap();
    let plan = m
        .run(update(json!({"a": null, "b": {"d": 3}}), true))
        .unwrap();
    assert_eq!(Value::Object(plan.outcome), json!({"b": {"c": 2, "d": 3}}));
}

#[test]
fn an_interrupted_task_fails_and_the_queue_goes_on() {
    let mut m = new_memory();
    let a = started_id(&m.accept(message("a", Policy::Reject, None)).unwrap());
    let b = started_id(&m.accept(message("b", Policy::Enqueue, None)).unwrap());
    let error = ErrorInfo {
        code: "interrupted".into(),
        message: "gone".into(),
    };
    // Another id: the running one stays.
    let plan = m
        .run(op::Interrupt {
            id: b.clone(),
            error: error.clone(),
        })
        .unwrap();
    assert!(plan.events.is_empty());
    let plan = m
        .run(op::Interrupt {
            id: a.clone(),
            error,
        })
        .unwrap();
    assert_eq!(plan.effects.stop, std::slice::from_ref(&a));
    assert_eq!(m.find(&a).status, Status::Failed);
    assert_eq!(starts(&plan), [b]);
    let plan = m.run(op::StartQueued).unwrap();
    assert!(plan.events.is_empty(), "one runs already");
}

fn ask(m: &mut Memory, id: &InteractionId, timeout_ms: i64) -> StoreResult<Plan<Interaction>> {
    m.run(op::Ask {
        id: id.clone(),
        outputs: vec![TaskOutput::Delta("before ".into())],
        data: json!({"question": "may I?"}),
        request_id: format!("r-{}", m.now),
        timeout_ms,
    })
}

fn pending_request(m: &mut Memory, id: &InteractionId) -> String {
    m.find(id).request.clone().expect("waiting").id
}

#[test]
fn an_ask_waits_and_one_answer_resumes_it() {
    let mut m = new_memory();
    let a = started_id(&m.accept(message("a", Policy::Reject, None)).unwrap());
    let plan = ask(&mut m, &a, 1_000).unwrap();
    assert_eq!(
        m.kinds_since(m.published.len() - plan.events.len()),
        ["task.delta", "task.waiting"]
    );
    let waiting = m.find(&a).clone();
    assert_eq!(waiting.status, Status::Waiting);
    assert_eq!(waiting.response, "before ");
    assert_eq!(
        waiting.request.as_ref().unwrap().data,
        json!({"question": "may I?"})
    );
    // The task that asked may write nothing more.
    let late = m.run(op::Append {
        id: a.clone(),
        outputs: vec![TaskOutput::Delta("late".into())],
    });
    assert!(matches!(late, Err(StoreError::Fenced)));
    // A wrong request id, then the right one, then the right one again.
    let wrong = m.run(op::Answer {
        id: a.clone(),
        request_id: "nope".into(),
        answer: json!(true),
    });
    assert!(matches!(wrong, Err(StoreError::NotWaiting)));
    let request_id = pending_request(&mut m, &a);
    let answer = |request_id: &str| op::Answer {
        id: a.clone(),
        request_id: request_id.into(),
        answer: json!({"approved": true}),
    };
    let plan = m.run(answer(&request_id)).unwrap();
    assert_eq!(plan.outcome.id, a);
    assert_eq!(starts(&plan), std::slice::from_ref(&a));
    assert_eq!(plan.events.len(), 1);
    assert_eq!(plan.events[0].kind, EventType::TaskResumed);
    let resumed = m.find(&a).clone();
    assert_eq!(resumed.status, Status::Running);
    assert!(resumed.request.is_none());
    assert_eq!(resumed.answers.len(), 1);
    assert_eq!(resumed.answers[0].request.id, request_id);
    assert_eq!(resumed.answers[0].answer, json!({"approved": true}));
    assert!(matches!(
        m.run(answer(&request_id)),
        Err(StoreError::NotWaiting)
    ));
    // The resumed task goes on and completes: the text before the ask, then after it.
    m.run(op::Finish {
        id: a.clone(),
        outputs: vec![TaskOutput::Delta("after".into())],
        end: TaskEnd::Completed { response: None },
        start_next: true,
    })
    .unwrap();
    assert_eq!(m.find(&a).response, "before after");
    assert_eq!(m.find(&a).status, Status::Completed);
}

#[test]
fn a_waiting_interaction_keeps_the_session_busy_under_every_policy() {
    let mut m = new_memory();
    let a = started_id(&m.accept(message("a", Policy::Reject, None)).unwrap());
    ask(&mut m, &a, 1_000).unwrap();
    match m.accept(message("b", Policy::Reject, None)) {
        Err(StoreError::Busy { running }) => assert_eq!(running, a),
        other => panic!("expected busy: {other:?}"),
    }
    let b = started_id(&m.accept(message("b", Policy::Enqueue, None)).unwrap());
    assert_eq!(m.find(&b).status, Status::Queued);
    // Nothing starts while it waits.
    assert!(m.run(op::StartQueued).unwrap().events.is_empty());
    let plan = m.accept(message("c", Policy::Interrupt, None)).unwrap();
    let c = started_id(&plan);
    assert_eq!(m.find(&a).status, Status::Cancelled);
    assert_eq!(m.find(&a).cancel_reason, Some(CancelReason::Interrupt));
    assert!(m.find(&a).request.is_none(), "request is null once final");
    assert_eq!(m.find(&b).status, Status::Cancelled);
    assert_eq!(m.find(&c).status, Status::Running);
}

#[test]
fn cancel_clear_and_delete_end_a_waiting_interaction_but_a_lost_node_or_shutdown_do_not() {
    let mut m = new_memory();
    let a = started_id(&m.accept(message("a", Policy::Reject, None)).unwrap());
    ask(&mut m, &a, 1_000).unwrap();
    let gone = ErrorInfo {
        code: "interrupted".into(),
        message: "gone".into(),
    };
    let plan = m
        .run(op::Interrupt {
            id: a.clone(),
            error: gone,
        })
        .unwrap();
    assert!(plan.events.is_empty(), "nothing ran: nothing was lost");
    let plan = m
        .run(op::Cancel {
            target: CancelTarget::Named(a.clone()),
            reason: CancelReason::Shutdown,
            start_next: false,
        })
        .unwrap();
    assert!(plan.events.is_empty(), "shutdown leaves it waiting");
    assert_eq!(m.find(&a).status, Status::Waiting);
    let plan = m
        .run(op::Cancel {
            target: CancelTarget::Running,
            reason: CancelReason::Cancel,
            start_next: true,
        })
        .unwrap();
    assert_eq!(plan.outcome, std::slice::from_ref(&a));
    assert_eq!(m.find(&a).status, Status::Cancelled);

    let b = started_id(&m.accept(message("b", Policy::Reject, None)).unwrap());
    ask(&mut m, &b, 1_000).unwrap();
    let plan = m
        .run(op::Clear {
            default_agent: "default".into(),
        })
        .unwrap();
    assert_eq!(plan.outcome.cancelled, std::slice::from_ref(&b));

    let c = started_id(&m.accept(message("c", Policy::Reject, None)).unwrap());
    ask(&mut m, &c, 1_000).unwrap();
    let plan = m.run(op::DeleteSession).unwrap();
    assert_eq!(plan.outcome, std::slice::from_ref(&c));
    // An answer to what is gone: not found.
    let answer = m.run(op::Answer {
        id: c,
        request_id: "r".into(),
        answer: json!(1),
    });
    assert!(
        matches!(answer, Err(StoreError::SessionNotFound)),
        "{answer:?}"
    );
}

#[test]
fn an_unanswered_request_times_out_at_its_deadline_only() {
    let mut m = new_memory();
    let a = started_id(&m.accept(message("a", Policy::Reject, None)).unwrap());
    let b = started_id(&m.accept(message("b", Policy::Enqueue, None)).unwrap());
    ask(&mut m, &a, 5).unwrap();
    let expire = |id: &InteractionId| op::ExpireWait {
        id: id.clone(),
        start_next: true,
    };
    // Each step advances the memory's clock by 1 ms: not yet.
    let plan = m.run(expire(&a)).unwrap();
    assert!(plan.events.is_empty());
    m.now += 10;
    let plan = m.run(expire(&a)).unwrap();
    assert_eq!(m.find(&a).status, Status::Cancelled);
    assert_eq!(m.find(&a).cancel_reason, Some(CancelReason::Timeout));
    assert!(starts(&plan) == [b.clone()]);
    // Answered in time, a wait is not expired.
    ask(&mut m, &b, 5).unwrap();
    let request_id = pending_request(&mut m, &b);
    m.run(op::Answer {
        id: b.clone(),
        request_id,
        answer: json!("yes"),
    })
    .unwrap();
    m.now += 10;
    assert!(m.run(expire(&b)).unwrap().events.is_empty());
    assert_eq!(m.find(&b).status, Status::Running);
}

#[test]
fn answers_reach_only_this_sessions_interactions() {
    let mut m = new_memory();
    let a = started_id(&m.accept(message("a", Policy::Reject, None)).unwrap());
    let unknown = IdGenerator::default().next_id();
    let answer = m.run(op::Answer {
        id: unknown,
        request_id: "r".into(),
        answer: json!(1),
    });
    assert!(
        matches!(answer, Err(StoreError::InteractionNotFound)),
        "{answer:?}"
    );
    // Running, not waiting: 409.
    let answer = m.run(op::Answer {
        id: a,
        request_id: "r".into(),
        answer: json!(1),
    });
    assert!(matches!(answer, Err(StoreError::NotWaiting)), "{answer:?}");
}

/// An operation as the property test draws it; ids are picked among those seen so far.
#[derive(Debug, Clone)]
enum Step {
    Accept {
        policy: Policy,
        content: u8,
        key: Option<u8>,
    },
    Append(u8, u8),
    Finish {
        pick: u8,
        fail: bool,
        replace: bool,
        start_next: bool,
    },
    CancelRunning(bool),
    CancelNamed(u8),
    Clear,
    Delete,
    Put(bool),
    Patch(u8),
    Interrupt(u8),
    StartQueued,
    Ask(u8, u8, i64),
    Answer(u8, bool),
    ExpireWait(u8, bool),
}

fn step() -> impl Strategy<Value = Step> {
    let policy = prop_oneof![
        Just(Policy::Reject),
        Just(Policy::Enqueue),
        Just(Policy::Interrupt)
    ];
    prop_oneof![
        4 => (policy, 0..3u8, proptest::option::of(0..3u8))
            .prop_map(|(policy, content, key)| Step::Accept { policy, content, key }),
        3 => (any::<u8>(), 0..3u8).prop_map(|(pick, n)| Step::Append(pick, n)),
        3 => (any::<u8>(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            |(pick, fail, replace, start_next)| Step::Finish { pick, fail, replace, start_next }
        ),
        1 => any::<bool>().prop_map(Step::CancelRunning),
        1 => any::<u8>().prop_map(Step::CancelNamed),
        1 => Just(Step::Clear),
        1 => Just(Step::Delete),
        1 => any::<bool>().prop_map(Step::Put),
        1 => any::<u8>().prop_map(Step::Patch),
        1 => any::<u8>().prop_map(Step::Interrupt),
        1 => Just(Step::StartQueued),
        2 => (any::<u8>(), 0..3u8, 0..4i64).prop_map(|(pick, n, timeout)| Step::Ask(pick, n, timeout)),
        2 => (any::<u8>(), any::<bool>()).prop_map(|(pick, right)| Step::Answer(pick, right)),
        1 => (any::<u8>(), any::<bool>()).prop_map(|(pick, start)| Step::ExpireWait(pick, start)),
    ]
}

/// What the property test knows of the history, to check I2 and I3.
#[derive(Default)]
struct Ledger {
    /// Every id ever accepted (stored, not replayed), in order.
    accepted: Vec<InteractionId>,
    /// Final events seen per interaction.
    finals: HashMap<InteractionId, usize>,
    /// The text each running interaction's deltas have added so far.
    deltas: HashMap<InteractionId, String>,
}

fn pick(ledger: &Ledger, n: u8) -> Option<InteractionId> {
    let all = &ledger.accepted;
    (!all.is_empty()).then(|| all[n as usize % all.len()].clone())
}

/// One of the operations, for the property test to draw (each runs with its own outcome
/// type; the test keeps only what an accept answers).
#[derive(Debug, Clone)]
enum AnyOp {
    Accept(op::Accept),
    Append(op::Append),
    Finish(op::Finish),
    Cancel(op::Cancel),
    Clear(op::Clear),
    DeleteSession(op::DeleteSession),
    PutSession(op::PutSession),
    UpdateContext(op::UpdateContext),
    Interrupt(op::Interrupt),
    StartQueued(op::StartQueued),
    Ask(op::Ask),
    Answer(op::Answer),
    ExpireWait(op::ExpireWait),
}

impl AnyOp {
    fn task(&self) -> Option<&InteractionId> {
        match self {
            AnyOp::Append(o) => o.task(),
            AnyOp::Finish(o) => o.task(),
            AnyOp::Interrupt(o) => o.task(),
            AnyOp::Ask(o) => o.task(),
            _ => None,
        }
    }

    fn run(self, m: &mut Memory) -> StoreResult<Plan<Option<Accepted>>> {
        fn erased<T>(plan: StoreResult<Plan<T>>) -> StoreResult<Plan<Option<Accepted>>> {
            plan.map(|p| p.map(|_| None))
        }
        match self {
            AnyOp::Accept(o) => m.run(o).map(|p| p.map(|r| r.accepted().cloned())),
            AnyOp::Append(o) => erased(m.run(o)),
            AnyOp::Finish(o) => erased(m.run(o)),
            AnyOp::Cancel(o) => erased(m.run(o)),
            AnyOp::Clear(o) => erased(m.run(o)),
            AnyOp::DeleteSession(o) => erased(m.run(o)),
            AnyOp::PutSession(o) => erased(m.run(o)),
            AnyOp::UpdateContext(o) => erased(m.run(o)),
            AnyOp::Interrupt(o) => erased(m.run(o)),
            AnyOp::StartQueued(o) => erased(m.run(o)),
            AnyOp::Ask(o) => erased(m.run(o)),
            AnyOp::Answer(o) => erased(m.run(o)),
            AnyOp::ExpireWait(o) => erased(m.run(o)),
        }
    }
}

fn to_operation(m: &Memory, ledger: &Ledger, step: &Step) -> Option<AnyOp> {
    let default_agent = || "default".to_string();
    Some(match step.clone() {
        Step::Accept {
            policy,
            content,
            key,
        } => {
            let key = key.map(|k| format!("k{k}"));
            let mut message = message(&format!("c{content}"), policy, key.as_deref());
            message.metadata = object(json!({"n": content}));
            AnyOp::Accept(op::Accept(message))
        }
        Step::Append(n, words) => AnyOp::Append(op::Append {
            id: pick(ledger, n)?,
            outputs: (0..words)
                .map(|w| TaskOutput::Delta(format!("w{w} ")))
                .collect(),
        }),
        Step::Finish {
            pick: n,
            fail,
            replace,
            start_next,
        } => AnyOp::Finish(op::Finish {
            id: pick(ledger, n)?,
            outputs: vec![TaskOutput::Delta("end".into())],
            end: if fail {
                TaskEnd::Failed(ErrorInfo {
                    code: "agent_error".into(),
                    message: "x".into(),
                })
            } else {
                TaskEnd::Completed {
                    response: replace.then(|| "replaced".into()),
                }
            },
            start_next,
        }),
        Step::CancelRunning(start_next) => AnyOp::Cancel(op::Cancel {
            target: CancelTarget::Running,
            reason: CancelReason::Cancel,
            start_next,
        }),
        Step::CancelNamed(n) => AnyOp::Cancel(op::Cancel {
            target: CancelTarget::Named(pick(ledger, n)?),
            reason: CancelReason::Cancel,
            start_next: true,
        }),
        Step::Clear => AnyOp::Clear(op::Clear {
            default_agent: default_agent(),
        }),
        Step::Delete => AnyOp::DeleteSession(op::DeleteSession),
        Step::Put(with_context) => AnyOp::PutSession(op::PutSession {
            agent: Some("other".into()),
            context: with_context.then(|| object(json!({"put": true}))),
            default_agent: default_agent(),
        }),
        Step::Patch(n) => AnyOp::UpdateContext(op::UpdateContext {
            set: None,
            patch: Some(object(json!({ format!("k{}", n % 4): n }))),
            default_agent: default_agent(),
        }),
        Step::Interrupt(n) => AnyOp::Interrupt(op::Interrupt {
            id: pick(ledger, n)?,
            error: ErrorInfo {
                code: "interrupted".into(),
                message: "gone".into(),
            },
        }),
        Step::StartQueued => AnyOp::StartQueued(op::StartQueued),
        Step::Ask(n, words, timeout_ms) => AnyOp::Ask(op::Ask {
            id: pick(ledger, n)?,
            outputs: (0..words)
                .map(|w| TaskOutput::Delta(format!("a{w} ")))
                .collect(),
            data: json!({"q": n}),
            request_id: format!("r{}", m.now),
            timeout_ms,
        }),
        Step::Answer(n, right) => {
            let id = pick(ledger, n)?;
            let pending = m
                .interactions
                .iter()
                .find(|(i, _)| i.id == id)
                .and_then(|(i, _)| i.request.as_ref())
                .map(|r| r.id.clone());
            AnyOp::Answer(op::Answer {
                id,
                request_id: match (right, pending) {
                    (true, Some(pending)) => pending,
                    _ => "not-the-request".into(),
                },
                answer: json!({"ok": right}),
            })
        }
        Step::ExpireWait(n, start_next) => AnyOp::ExpireWait(op::ExpireWait {
            id: pick(ledger, n)?,
            start_next,
        }),
    })
}

/// I1–I4 (and fencing) after one step.
fn check_step(
    m: &Memory,
    ledger: &mut Ledger,
    op: &AnyOp,
    result: &StoreResult<Plan<Option<Accepted>>>,
    before: &[Event],
) {
    // I1: at most one active (running or waiting) interaction.
    assert!(m.active().len() <= 1, "I1: {} active", m.active().len());
    // A waiting one has its request, and only it.
    for (i, _) in &m.interactions {
        assert_eq!(i.request.is_some(), i.status == Status::Waiting, "{i:?}");
    }
    let Ok(plan) = result else {
        // A refusal changes nothing.
        assert_eq!(m.published.len(), before.len());
        if let Some(task) = op.task() {
            let running = m.running().first().map(|i| i.id.clone());
            if matches!(op, AnyOp::Append(_) | AnyOp::Finish(_) | AnyOp::Ask(_)) {
                assert_ne!(running.as_ref(), Some(task), "a running task was fenced");
            }
        }
        return;
    };
    // The state the plan says it leaves is what a backend would read back (a backend that
    // keeps it between operations, as the SQLite writer does, relies on this).
    match (&plan.after, &m.session) {
        (None, None) => {}
        (Some(after), Some(row)) => {
            let read = m.snapshot(Needs::default());
            assert_eq!(after.running, read.running, "the running one as stored");
            assert_eq!(after.queued, read.queued, "the queue as stored");
            assert_eq!(
                (
                    &after.row.agent,
                    after.row.epoch,
                    after.row.last_seq,
                    after.row.created_at
                ),
                (&row.agent, row.epoch, row.last_seq, row.created_at)
            );
            let context = |c: &Result<JsonObject, String>| match c {
                Ok(c) => c.clone(),
                Err(text) => serde_json::from_str(text).unwrap(),
            };
            assert_eq!(context(&after.row.context), context(&row.context));
        }
        (after, row) => panic!("after: {after:?}, stored: {row:?}"),
    }
    // I4: the new events continue the session's seqs without gap, and the row knows the last.
    let mut seq = before.last().map_or(0, |e| e.seq);
    for event in &plan.events {
        assert_eq!(event.seq, seq + 1, "I4: seqs contiguous and increasing");
        seq = event.seq;
        let envelope: Value = serde_json::from_str(&event.envelope).unwrap();
        assert_eq!(envelope["seq"], json!(event.seq));
        assert_eq!(envelope["type"], json!(event.kind.as_str()));
        assert_eq!(envelope["session"], json!("s"));
    }
    match &m.session {
        Some(row) => assert_eq!(row.last_seq, seq, "I4: the stored last_seq"),
        None => assert_eq!(m.retired_seq, seq, "I4: a deleted session's seq is retired"),
    }
    // I3: exactly one final event per interaction, and a final status only with it.
    for event in &plan.events {
        if event.kind.is_final() {
            let id = event.interaction_id.clone().unwrap();
            let count = ledger.finals.entry(id.clone()).or_default();
            *count += 1;
            assert_eq!(*count, 1, "I3: a second final event for {id}");
            let carried = event.interaction.as_ref().unwrap();
            assert!(carried.status.is_final());
            if carried.status == Status::Completed && carried.response != "replaced" {
                let expected = ledger.deltas.get(&id).cloned().unwrap_or_default();
                assert_eq!(carried.response, expected, "the response is the deltas");
            }
        }
        if event.kind == EventType::TaskDelta {
            let id = event.interaction_id.clone().unwrap();
            let data: Value = serde_json::from_str(&event.envelope).unwrap();
            let text = data["data"]["text"].as_str().unwrap().to_string();
            ledger.deltas.entry(id).or_default().push_str(&text);
        }
    }
    if let Some(a) = &plan.outcome
        && !a.replayed
    {
        ledger.accepted.push(a.interaction.id.clone());
    }
    for id in &ledger.accepted {
        let finals = ledger.finals.get(id).copied().unwrap_or(0);
        let stored = m.interactions.iter().find(|(i, _)| &i.id == id);
        match stored {
            Some((i, _)) if !i.status.is_final() => {
                assert_eq!(finals, 0, "I3: {id} is active yet has a final event")
            }
            // Final, or wiped by a clear or a delete: it ended exactly once.
            _ => assert_eq!(finals, 1, "I3: {id} ended without its final event"),
        }
    }
    // I2: after a clear nothing of the old epoch is left.
    if matches!(op, AnyOp::Clear(_)) {
        assert!(m.interactions.is_empty());
        assert_eq!(plan.events.last().unwrap().kind, EventType::SessionCleared);
        let row = m.session.as_ref().unwrap();
        assert!(row.context.as_ref().unwrap().is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_the_invariants(steps in proptest::collection::vec(step(), 1..60)) {
        let mut m = new_memory();
        let mut ledger = Ledger::default();
        for step in &steps {
            let Some(op) = to_operation(&m, &ledger, step) else {
                continue;
            };
            let before = m.published.clone();
            let result = op.clone().run(&mut m);
            check_step(&m, &mut ledger, &op, &result, &before);
        }
    }
}
