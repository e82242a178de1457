"""Every method of the blocking client, against the real server."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from baton import Agent, Baton, Cleared, Interaction, Session

from .conftest import Server


def sid(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def interaction(value: Interaction | Cleared) -> Interaction:
    assert isinstance(value, Interaction)
    return value


@pytest.fixture
def baton(server: Server) -> Iterator[Baton]:
    with Baton(server.url) as client:
        yield client


def test_put_get_delete_session(baton: Baton) -> None:
    s = sid()
    created = baton.put_session(s, agent="slow", context={"user": "ada"})
    assert isinstance(created, Session)
    assert (created.id, created.agent, created.context, created.epoch) == (
        s, "slow", {"user": "ada"}, 0
    )
    again = baton.create_session(s)
    assert again.agent == "slow"  # an existing session keeps its agent
    got = baton.get_session(s)
    assert got.id == s and got.running is None and got.queued == 0 and got.last_seq >= 1
    baton.delete_session(s)
    from baton import NotFound

    with pytest.raises(NotFound):
        baton.get_session(s)


def test_ids_are_percent_encoded(baton: Baton) -> None:
    s = f"a:b.{uuid.uuid4().hex[:6]}"
    assert baton.put_session(s).id == s
    assert baton.get_session(s).id == s


def test_send_with_wait_metadata_and_idempotency(baton: Baton) -> None:
    s = sid()
    first = interaction(
        baton.send(s, "hello there world", metadata={"n": 1}, idempotency_key="k1", wait=10)
    )
    assert first.status == "completed" and first.response == "hello there world"
    assert first.metadata == {"n": 1} and not first.replayed and first.is_final
    replay = interaction(baton.send(s, "hello there world", metadata={"n": 1}, idempotency_key="k1"))
    assert replay.id == first.id and replay.replayed
    got = baton.get_interaction(s, first.id)
    assert got == first


def test_send_without_wait_then_enqueue(baton: Baton) -> None:
    s = sid()
    baton.put_session(s, agent="slow")
    running = interaction(baton.send(s, "one two three four"))
    assert running.status == "running"
    queued = interaction(baton.send(s, "next", policy="enqueue"))
    assert queued.status == "queued"
    assert baton.get_session(s).queued == 1
    assert baton.cancel(s, queued.id) == [queued.id]
    assert baton.cancel(s) == [running.id]
    assert baton.cancel(s) == []
    assert baton.get_interaction(s, running.id).cancel_reason == "cancel"


def test_interrupt(baton: Baton) -> None:
    s = sid()
    baton.put_session(s, agent="slow")
    first = interaction(baton.send(s, "a b c d e f"))
    second = interaction(baton.send(s, "now", policy="interrupt", wait=10))
    assert second.status == "completed"
    assert baton.get_interaction(s, first.id).cancel_reason == "interrupt"


def test_clear_and_clear_message(baton: Baton) -> None:
    s = sid()
    baton.put_session(s, agent="slow", context={"a": 1})
    running = interaction(baton.send(s, "a b c d e f"))
    cleared = baton.clear(s)
    assert cleared == Cleared(epoch=1, cancelled=[running.id])
    assert baton.get_context(s) == {}
    via_message = baton.send(s, "/clear")
    assert via_message == Cleared(epoch=2, cancelled=[])


def test_context_get_replace_patch(baton: Baton) -> None:
    s = sid()
    assert baton.replace_context(s, {"a": 1, "b": {"c": 2}}) == {"a": 1, "b": {"c": 2}}
    assert baton.patch_context(s, {"a": None, "b": {"d": 3}}) == {"b": {"c": 2, "d": 3}}
    assert baton.get_context(s) == {"b": {"c": 2, "d": 3}}


def test_interactions_paging(baton: Baton) -> None:
    s = sid()
    sent = [interaction(baton.send(s, f"message {i}", wait=10)).id for i in range(5)]
    page = baton.list_interactions(s, limit=2)
    assert [i.id for i in page.items] == sent[::-1][:2] and page.next is not None
    page2 = baton.list_interactions(s, limit=2, before=page.next)
    assert [i.id for i in page2.items] == sent[::-1][2:4]
    assert [i.id for i in baton.iter_interactions(s, page_size=2)] == sent[::-1]


def test_sessions_paging(baton: Baton) -> None:
    prefix = sid("page")
    ids = sorted(f"{prefix}-{i}" for i in range(7))
    for s in ids:
        baton.put_session(s)
    first = baton.list_sessions(limit=3)
    assert len(first.items) == 3 and first.next is not None
    second = baton.list_sessions(limit=3, after=first.next)
    assert first.items[-1].id < second.items[0].id
    every = [s.id for s in baton.iter_sessions(page_size=3)]
    assert every == sorted(every) and len(every) == len(set(every))
    assert [i for i in every if i.startswith(prefix)] == ids
    assert every == [s.id for s in baton.list_sessions(limit=1000).items]


def test_answer(baton: Baton) -> None:
    s = sid()
    baton.put_session(s, agent="ask")
    sent = interaction(baton.send(s, "do it"))
    asked = wait_until(baton, s, sent.id, "waiting")
    assert asked.status == "waiting" and asked.request is not None
    assert asked.request.data == {"question": "proceed?"}
    resumed = baton.answer(s, asked.id, asked.request.id, {"approved": True})
    assert resumed.status == "running"
    done = wait_until(baton, s, asked.id, "completed")
    assert done.status == "completed" and done.response == "asking answered {\"approved\": true}"


def wait_until(baton: Baton, session_id: str, interaction_id: str, status: str) -> Interaction:
    deadline = time.monotonic() + 10
    while True:
        got = baton.get_interaction(session_id, interaction_id)
        if got.status == status or got.is_final or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_list_agents(baton: Baton) -> None:
    agents = baton.list_agents()
    assert Agent(name="default", kind="echo", default=True) in agents
    assert {a.name for a in agents} >= {"default", "slow", "ask"}
