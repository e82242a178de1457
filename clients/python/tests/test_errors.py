"""Every error class the server can be made to send, from its real cause."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from baton import (
    AsyncBaton,
    Baton,
    BatonError,
    ContextTooLarge,
    Forbidden,
    IdempotencyMismatch,
    Interaction,
    InvalidRequest,
    InvalidSessionId,
    NotFound,
    NotWaiting,
    PayloadTooLarge,
    QueueFull,
    RateLimited,
    SessionBusy,
    TenantLimit,
    Unauthorized,
    UnknownAgent,
)
from baton.errors import error_from_response

from .conftest import AuthServer, Server


def sid() -> str:
    return f"e-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def baton(server: Server) -> Iterator[Baton]:
    with Baton(server.url) as client:
        yield client


def test_session_busy_names_the_running_interaction(baton: Baton) -> None:
    s = sid()
    baton.put_session(s, agent="slow")
    running = baton.send(s, "a b c d e f g h")
    assert isinstance(running, Interaction)
    with pytest.raises(SessionBusy) as e:
        baton.send(s, "again", policy="reject")
    assert e.value.running == running.id
    assert (e.value.code, e.value.status) == ("session_busy", 409)
    assert e.value.extra == {"running": running.id}
    baton.cancel(s)


def test_queue_full(baton: Baton) -> None:
    s = sid()
    baton.put_session(s, agent="slow")
    baton.send(s, "a b c d e f g h")
    baton.send(s, "q1", policy="enqueue")
    baton.send(s, "q2", policy="enqueue")  # queue_limit = 2 in the test config
    with pytest.raises(QueueFull) as e:
        baton.send(s, "q3", policy="enqueue")
    assert e.value.status == 429
    baton.clear(s)


def test_not_waiting(baton: Baton) -> None:
    s = sid()
    done = baton.send(s, "hi", wait=10)
    assert isinstance(done, Interaction)
    with pytest.raises(NotWaiting) as e:
        baton.answer(s, done.id, "r1", "yes")
    assert e.value.status == 409


def test_not_found(baton: Baton) -> None:
    with pytest.raises(NotFound) as e:
        baton.get_session(sid())
    assert (e.value.code, e.value.status) == ("not_found", 404)
    with pytest.raises(NotFound):
        baton.cancel(sid())


def test_invalid_requests(baton: Baton) -> None:
    with pytest.raises(InvalidRequest) as e:
        baton.send(sid(), "   ")
    assert e.value.code == "invalid_request" and e.value.status == 400
    with pytest.raises(InvalidRequest):
        baton.send(sid(), "hi", policy="sometimes")
    with pytest.raises(InvalidRequest):
        baton.send(sid(), "hi", wait=0)
    with pytest.raises(InvalidRequest):
        baton.list_sessions(limit=0)
    with pytest.raises(InvalidSessionId) as bad_id:
        baton.get_session("a b")
    assert bad_id.value.code == "invalid_session_id"
    with pytest.raises(InvalidSessionId):
        baton.get_session("a/b")
    with pytest.raises(UnknownAgent):
        baton.put_session(sid(), agent="nobody")
    with pytest.raises(InvalidRequest):  # no token secret on this server
        baton.mint_token(sid())


def test_idempotency_mismatch(baton: Baton) -> None:
    s = sid()
    baton.send(s, "hi", idempotency_key="same", wait=10)
    with pytest.raises(IdempotencyMismatch) as e:
        baton.send(s, "something else", idempotency_key="same")
    assert e.value.status == 422


def test_payload_too_large(baton: Baton) -> None:
    with pytest.raises(PayloadTooLarge) as e:
        baton.send(sid(), "x" * (1024 * 1024 + 10))
    assert e.value.status == 413


def test_context_too_large(baton: Baton) -> None:
    s = sid()
    baton.replace_context(s, {"small": 1})
    with pytest.raises(ContextTooLarge) as e:
        baton.patch_context(s, {"big": "x" * 5000})  # max_context_bytes = 4096
    assert e.value.status == 413
    assert baton.get_context(s) == {"small": 1}


def test_unknown_code_falls_back_to_baton_error() -> None:
    error = error_from_response(418, {"error": {"code": "teapot", "message": "short", "x": 1}}, None)
    assert type(error) is BatonError
    assert (error.code, error.message, error.status, error.extra) == ("teapot", "short", 418, {"x": 1})
    not_json = error_from_response(502, None, None)
    assert type(not_json) is BatonError and not_json.status == 502


def test_unauthorized(auth_server: AuthServer) -> None:
    with Baton(auth_server.url) as anonymous:
        with pytest.raises(Unauthorized) as e:
            anonymous.list_agents()
        assert e.value.status == 401
    with Baton(auth_server.url, api_key="bk_not-a-key") as wrong:
        with pytest.raises(Unauthorized):
            wrong.list_sessions()


def test_forbidden_and_tokens(auth_server: AuthServer) -> None:
    with Baton(auth_server.url, api_key=auth_server.keys["acme"]) as acme:
        token = acme.mint_token("tok-a", scope="read", ttl_s=60)
        assert (token.session, token.scope) == ("tok-a", "read") and token.token
        write = acme.mint_token("tok-a")
        assert write.scope == "write"
    with Baton(auth_server.url, token=token.token) as reader:
        assert reader.get_session("tok-a").id == "tok-a"
        with pytest.raises(Forbidden) as e:
            reader.send("tok-a", "hi")
        assert e.value.status == 403
        with pytest.raises(Forbidden):
            reader.get_session("tok-b")
        assert reader.list_agents()
    with Baton(auth_server.url, token=write.token) as writer:
        assert isinstance(writer.send("tok-a", "hi", wait=10), Interaction)
        with pytest.raises(Forbidden):
            writer.list_sessions()
    with Baton(auth_server.url, api_key=auth_server.keys["acme"], tenant="other") as meddler:
        with pytest.raises(Forbidden):
            meddler.list_sessions()


def test_tenants_are_apart(auth_server: AuthServer) -> None:
    with Baton(auth_server.url, api_key=auth_server.keys["other"]) as other:
        with pytest.raises(NotFound):
            other.get_session("tok-a")
    with Baton(auth_server.url, api_key=auth_server.keys["admin"], tenant="acme") as admin:
        assert "tok-a" in [s.id for s in admin.iter_sessions()]


def test_tenant_limit(auth_server: AuthServer) -> None:
    with Baton(auth_server.url, api_key=auth_server.keys["limited"]) as limited:
        for i in range(3):  # max_sessions_per_tenant = 3
            limited.put_session(f"lim-{i}")
        with pytest.raises(TenantLimit) as e:
            limited.put_session("lim-3")
        assert e.value.status == 429


def test_rate_limited_and_retry(auth_server: AuthServer) -> None:
    key = auth_server.keys["slowpoke"]  # rate_per_s = 1, bursts of 2
    with Baton(auth_server.url, api_key=key) as hasty:
        with pytest.raises(RateLimited) as e:
            for _ in range(10):
                hasty.list_agents()
        assert e.value.status == 429 and e.value.retry_after is not None
        assert e.value.retry_after >= 1
    with Baton(auth_server.url, api_key=key, retry_on_rate_limit=True) as patient:
        for _ in range(4):
            assert patient.list_agents()


async def test_async_errors(server: Server) -> None:
    async with AsyncBaton(server.url) as baton:
        with pytest.raises(NotFound):
            await baton.get_session(sid())
        s = sid()
        await baton.put_session(s, agent="slow")
        running = await baton.send(s, "a b c d e f")
        assert isinstance(running, Interaction)
        with pytest.raises(SessionBusy) as e:
            await baton.send(s, "again")
        assert e.value.running == running.id
        await baton.cancel(s)


async def test_async_rate_limit_retry(auth_server: AuthServer) -> None:
    key = auth_server.keys["slowpoke"]
    async with AsyncBaton(auth_server.url, api_key=key) as hasty:
        with pytest.raises(RateLimited):
            for _ in range(10):
                await hasty.list_agents()
    async with AsyncBaton(auth_server.url, api_key=key, retry_on_rate_limit=True) as patient:
        for _ in range(3):
            assert await patient.list_agents()


def test_on_disconnect(baton: Baton) -> None:
    try:
        baton.send(sid(), "hi", on_disconnect="continue")
    except InvalidRequest as e:
        if "unknown field" in e.message:
            pytest.skip("this server does not know on_disconnect yet")
        raise
    with pytest.raises(InvalidRequest):  # "cancel" needs a connection to watch: wait, here
        baton.send(sid(), "hi", on_disconnect="cancel")
    done = baton.send(sid(), "hi", on_disconnect="cancel", wait=10)
    assert isinstance(done, Interaction) and done.status == "completed"
    assert isinstance(baton.send(sid(), "hi", on_disconnect="continue"), Interaction)
