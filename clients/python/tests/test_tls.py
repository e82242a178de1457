"""`verify`: a private CA's bundle, off, or the system's (which refuses a self-signed server)."""

from __future__ import annotations

import pytest

from baton import AsyncBaton, Baton, ConnectionFailed, Interaction

from .conftest import Server


def test_verify_with_a_ca_bundle(tls_server: Server) -> None:
    assert tls_server.url.startswith("https://")
    ca = str(tls_server.directory / "ca.pem")
    with Baton(tls_server.url, verify=ca) as baton:
        done = baton.send("tls", "secure hello", wait=10)
        assert isinstance(done, Interaction) and done.response == "secure hello"
        for event in baton.events("tls", after=0):  # wss:// with the same CA
            if event.type == "task.completed":
                break


def test_verify_off(tls_server: Server) -> None:
    with Baton(tls_server.url, verify=False) as baton:
        assert baton.list_agents()


def test_system_trust_refuses_a_self_signed_server(tls_server: Server) -> None:
    with Baton(tls_server.url) as baton:
        with pytest.raises(ConnectionFailed):
            baton.list_agents()


async def test_async_verify_with_a_ca_bundle(tls_server: Server) -> None:
    ca = str(tls_server.directory / "ca.pem")
    async with AsyncBaton(tls_server.url, verify=ca) as baton:
        assert await baton.list_agents()
        async for event in baton.events("tls", after=0):
            if event.type == "task.completed":
                break
