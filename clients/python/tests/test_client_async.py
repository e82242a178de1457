"""Every method of the async client, against the real server."""

from __future__ import annotations

import asyncio
import uuid

from baton import AsyncBaton, Cleared, Interaction, NotFound

import pytest

from .conftest import AuthServer, Server


def sid(prefix: str = "as") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def interaction(value: Interaction | Cleared) -> Interaction:
    assert isinstance(value, Interaction)
    return value


async def test_sessions(server: Server) -> None:
    async with AsyncBaton(server.url) as baton:
        s = sid()
        created = await baton.put_session(s, agent="slow", context={"k": "v"})
        assert (created.id, created.agent, created.context) == (s, "slow", {"k": "v"})
        assert (await baton.create_session(s)).agent == "slow"
        assert (await baton.get_session(s)).id == s
        await baton.delete_session(s)
        with pytest.raises(NotFound):
            await baton.get_session(s)


async def test_sessions_paging(server: Server) -> None:
    async with AsyncBaton(server.url) as baton:
        prefix = sid("apage")
        ids = sorted(f"{prefix}-{i}" for i in range(5))
        await asyncio.gather(*(baton.put_session(s) for s in ids))
        page = await baton.list_sessions(limit=2)
        assert len(page.items) == 2 and page.next is not None
        page2 = await baton.list_sessions(limit=2, after=page.next)
        assert page.items[-1].id < page2.items[0].id
        every = [s.id async for s in baton.iter_sessions(page_size=2)]
        assert every == sorted(every) and [i for i in every if i.startswith(prefix)] == ids


async def test_messages_cancel_clear(server: Server) -> None:
    async with AsyncBaton(server.url) as baton:
        s = sid()
        done = interaction(
            await baton.send(s, "one two", metadata={"m": True}, idempotency_key="ik", wait=10)
        )
        assert (done.status, done.response, done.metadata) == ("completed", "one two", {"m": True})
        replay = interaction(
            await baton.send(s, "one two", metadata={"m": True}, idempotency_key="ik")
        )
        assert replay.replayed and replay.id == done.id
        assert await baton.get_interaction(s, done.id) == done
        await baton.put_session(s, agent="slow")
        running = interaction(await baton.send(s, "a b c d e f"))
        queued = interaction(await baton.send(s, "later", policy="enqueue"))
        assert queued.status == "queued"
        assert await baton.cancel(s, queued.id) == [queued.id]
        interrupting = interaction(await baton.send(s, "x y z", policy="interrupt"))
        assert (await baton.get_interaction(s, running.id)).cancel_reason == "interrupt"
        assert await baton.cancel(s) == [interrupting.id]
        await baton.send(s, "a b c d e f")
        cleared = await baton.clear(s)
        assert cleared.epoch == 1 and len(cleared.cancelled) == 1
        assert await baton.send(s, "/clear") == Cleared(epoch=2, cancelled=[])


async def test_context(server: Server) -> None:
    async with AsyncBaton(server.url) as baton:
        s = sid()
        assert await baton.replace_context(s, {"a": 1, "b": 2}) == {"a": 1, "b": 2}
        assert await baton.patch_context(s, {"a": None, "c": [1]}) == {"b": 2, "c": [1]}
        assert await baton.get_context(s) == {"b": 2, "c": [1]}


async def test_interactions_paging(server: Server) -> None:
    async with AsyncBaton(server.url) as baton:
        s = sid()
        sent = [interaction(await baton.send(s, f"m {i}", wait=10)).id for i in range(5)]
        page = await baton.list_interactions(s, limit=2)
        assert [i.id for i in page.items] == sent[::-1][:2]
        page2 = await baton.list_interactions(s, limit=2, before=page.next)
        assert [i.id for i in page2.items] == sent[::-1][2:4]
        assert [i.id async for i in baton.iter_interactions(s, page_size=2)] == sent[::-1]


async def test_answer(server: Server) -> None:
    async with AsyncBaton(server.url) as baton:
        s = sid()
        await baton.put_session(s, agent="ask")
        sent = interaction(await baton.send(s, "go"))
        for _ in range(200):
            asked = await baton.get_interaction(s, sent.id)
            if asked.status != "running":
                break
            await asyncio.sleep(0.05)
        assert asked.status == "waiting" and asked.request is not None
        resumed = await baton.answer(s, asked.id, asked.request.id, "yes")
        assert resumed.status == "running"
        for _ in range(200):
            got = await baton.get_interaction(s, asked.id)
            if got.is_final:
                break
            await asyncio.sleep(0.05)
        assert got.status == "completed" and got.response == 'asking answered "yes"'


async def test_agents(server: Server) -> None:
    async with AsyncBaton(server.url) as baton:
        assert {a.name for a in await baton.list_agents()} >= {"default", "slow", "ask"}


async def test_tokens(auth_server: AuthServer) -> None:
    async with AsyncBaton(auth_server.url, api_key=auth_server.keys["other"]) as baton:
        token = await baton.mint_token("atok", scope="write", ttl_s=120)
        assert token.session == "atok" and token.scope == "write"
    async with AsyncBaton(auth_server.url, token=token.token) as holder:
        assert interaction(await holder.send("atok", "hi", wait=10)).response == "hi"
