"""The resuming event stream: every event once, in order, across a server crash and restart."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest

from baton import AsyncBaton, Baton, Event, Interaction, Unauthorized

from .conftest import AuthServer, Server
from .proxy import Proxy

LONG = " ".join(f"w{i}" for i in range(40))  # 40 deltas, 100 ms apart with the `slow` agent


def stored_log(baton: Baton, session_id: str) -> list[int]:
    """Every retained seq, read back over a fresh replay."""
    last = baton.get_session(session_id).last_seq
    seqs = []
    for event in baton.events(session_id, replay=True):
        seqs.append(event.seq)
        if event.seq >= last:
            return seqs
    return seqs


def wait_for(predicate: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_stream_replays_and_follows(server: Server) -> None:
    with Baton(server.url) as baton:
        baton.send("ev-basic", "one two three", wait=10)
        types = []
        for event in baton.events("ev-basic", after=0):
            assert isinstance(event, Event) and event.session == "ev-basic"
            types.append(event.type)
            if event.type == "task.completed":
                assert event.interaction is not None
                assert event.interaction.response == "one two three"
                break
        assert types[0] == "session.created" and types.count("task.delta") == 3


def test_stream_ends_after_delete(server: Server) -> None:
    with Baton(server.url) as baton:
        baton.put_session("ev-del")
        seen: list[str] = []
        consumer = threading.Thread(
            target=lambda: seen.extend(e.type for e in baton.events("ev-del", after=0))
        )
        consumer.start()
        wait_for(lambda: seen)
        baton.delete_session("ev-del")
        consumer.join(10)
        assert not consumer.is_alive() and seen[-1] == "session.deleted"


def test_sync_stream_survives_restart(fresh_server: Server) -> None:
    with Baton(fresh_server.url) as baton:
        s = "ev-restart"
        baton.put_session(s, agent="slow")
        seen: list[Event] = []

        def consume() -> None:
            for event in baton.events(s, after=0):
                seen.append(event)
                if event.type == "task.completed" and "after" in str(event.data):
                    return

        consumer = threading.Thread(target=consume)
        consumer.start()
        baton.send(s, LONG)
        wait_for(lambda: sum(e.type == "task.delta" for e in seen) >= 3)
        fresh_server.restart(signal.SIGKILL)  # a crash: same port, same database
        done = baton.send(s, "after restart", wait=30, policy="enqueue")
        assert isinstance(done, Interaction) and done.status == "completed"
        consumer.join(30)
        assert not consumer.is_alive()
        seqs = [e.seq for e in seen]
        assert seqs == sorted(set(seqs))  # in order, none repeated
        assert seqs == stored_log(baton, s)  # none lost
        assert any(e.type == "task.failed" for e in seen)  # the crashed run, interrupted


async def test_async_stream_survives_restart(fresh_server: Server) -> None:
    async with AsyncBaton(fresh_server.url) as baton:
        s = "ev-async-restart"
        await baton.put_session(s, agent="slow")
        seen: list[Event] = []

        async def consume() -> None:
            async for event in baton.events(s, after=0):
                seen.append(event)
                if event.type == "task.completed" and "after" in str(event.data):
                    return

        consumer = asyncio.create_task(consume())
        await baton.send(s, LONG)
        for _ in range(400):
            if sum(e.type == "task.delta" for e in seen) >= 3:
                break
            await asyncio.sleep(0.02)
        await asyncio.to_thread(fresh_server.restart, signal.SIGTERM)  # a graceful restart
        done = await baton.send(s, "after restart", wait=30, policy="enqueue")
        assert isinstance(done, Interaction) and done.status == "completed"
        await asyncio.wait_for(consumer, 30)
    seqs = [e.seq for e in seen]
    assert seqs == sorted(set(seqs))
    with Baton(fresh_server.url) as sync:
        assert seqs == stored_log(sync, s)
    assert any(e.type == "task.cancelled" for e in seen)  # the run shutdown cancelled


def test_token_expiry_raises_without_a_callback(auth_server: AuthServer) -> None:
    with Baton(auth_server.url, api_key=auth_server.keys["other"]) as key:
        token = key.mint_token("exp-a", scope="read", ttl_s=1)
    with Baton(auth_server.url, token=token.token) as reader:
        started = time.monotonic()
        with pytest.raises(Unauthorized):
            for _ in reader.events("exp-a"):
                pass
        assert time.monotonic() - started < 10


def test_token_expiry_refreshes_through_the_callback(auth_server: AuthServer) -> None:
    with Baton(auth_server.url, api_key=auth_server.keys["other"]) as key:
        minted: list[str] = []

        def fresh_token() -> str:
            minted.append(key.mint_token("exp-b", scope="read", ttl_s=1).token)
            return minted[-1]

        with Baton(auth_server.url, token=fresh_token) as reader:
            seen: list[Event] = []

            def consume() -> None:
                for event in reader.events("exp-b", after=0):
                    seen.append(event)
                    if event.type == "task.completed":
                        return

            consumer = threading.Thread(target=consume)
            key.put_session("exp-b")
            consumer.start()
            time.sleep(2.5)  # past the first token's expiry: closed with 4001, reconnected
            key.send("exp-b", "still here", wait=10)
            consumer.join(15)
            assert not consumer.is_alive()
        assert len(minted) >= 2
        seqs = [e.seq for e in seen]
        assert seqs == sorted(set(seqs)) and seen[0].type == "session.created"
        assert seen[-1].interaction is not None
        assert seen[-1].interaction.response == "still here"


def test_stream_survives_dropped_connections(server: Server) -> None:
    proxy = Proxy(server.port)
    try:
        with Baton(server.url) as direct, Baton(proxy.url) as through_proxy:
            s = "ev-drop"
            direct.put_session(s, agent="slow")
            seen: list[Event] = []

            def consume() -> None:
                for event in through_proxy.events(s, after=0):
                    seen.append(event)
                    if event.type == "task.completed":
                        return

            consumer = threading.Thread(target=consume)
            consumer.start()
            sent = direct.send(s, " ".join(f"d{i}" for i in range(20)))
            assert isinstance(sent, Interaction)
            for deltas in (3, 8, 13):
                wait_for(lambda: sum(e.type == "task.delta" for e in seen) >= deltas)
                proxy.drop_all()
            consumer.join(20)
            assert not consumer.is_alive() and proxy.connections >= 4  # it reconnected
            seqs = [e.seq for e in seen]
            assert seqs == sorted(set(seqs)) and seqs == stored_log(direct, s)
            texts = [e.data["text"] for e in seen if e.type == "task.delta"]
            assert " ".join(texts).split() == [f"d{i}" for i in range(20)]
    finally:
        proxy.close()


async def test_async_stream_survives_dropped_connections(server: Server) -> None:
    proxy = Proxy(server.port)
    try:
        async with AsyncBaton(server.url) as direct, AsyncBaton(proxy.url) as through_proxy:
            s = "ev-async-drop"
            await direct.put_session(s, agent="slow")
            seen: list[Event] = []

            async def consume() -> None:
                async for event in through_proxy.events(s, after=0):
                    seen.append(event)
                    if event.type == "task.completed":
                        return

            consumer = asyncio.create_task(consume())
            await direct.send(s, " ".join(f"d{i}" for i in range(20)))
            for deltas in (3, 8, 13):
                while sum(e.type == "task.delta" for e in seen) < deltas:
                    await asyncio.sleep(0.02)
                proxy.drop_all()
            await asyncio.wait_for(consumer, 20)
        assert proxy.connections >= 4
        seqs = [e.seq for e in seen]
        with Baton(server.url) as sync:
            assert seqs == sorted(set(seqs)) and seqs == stored_log(sync, s)
        texts = [e.data["text"] for e in seen if e.type == "task.delta"]
        assert " ".join(texts).split() == [f"d{i}" for i in range(20)]
    finally:
        proxy.close()
