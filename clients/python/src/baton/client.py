"""The two clients: :class:`Baton` (blocking, over ``httpx.Client``) and :class:`AsyncBaton`
(``async``, over ``httpx.AsyncClient``).

Both are thin: each method takes a :class:`baton.protocol.Call` from :mod:`baton.protocol` and
carries it; only the I/O (and the rate-limit retry's sleep) differs.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import httpx

from . import protocol
from .errors import ConnectionFailed, RateLimited
from .models import Agent, Cleared, Event, Interaction, JSONObject, Page, Session, Token
from .protocol import Call

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
MAX_RATE_LIMIT_RETRIES = 5


def _verify(verify: bool | str | ssl.SSLContext) -> bool | ssl.SSLContext:
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    return verify


class _Config:
    """What both clients share: where the server is, the credentials and the options."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        token: str | Callable[[], str] | None,
        tenant: str | None,
        timeout: float,
        verify: bool | str | ssl.SSLContext,
        retry_on_rate_limit: bool,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token_provider = token if callable(token) else None
        static_token = token if isinstance(token, str) else None
        if api_key is not None and token is not None:
            raise ValueError("give api_key or token, not both")
        self.headers = protocol.auth_headers(api_key, static_token, tenant)
        self.timeout = timeout
        self.verify = _verify(verify)
        self.retry_on_rate_limit = retry_on_rate_limit

    def current_headers(self) -> dict[str, str]:
        """The headers of a request made now (a token callable is asked for a fresh token)."""
        if self.token_provider is None:
            return self.headers
        return {**self.headers, "Authorization": f"Bearer {self.token_provider()}"}

    def auth(self, request: httpx.Request) -> httpx.Request:
        if self.token_provider is not None:
            request.headers["Authorization"] = f"Bearer {self.token_provider()}"
        return request

    def request_args(self, call: Call[Any]) -> dict[str, Any]:
        args: dict[str, Any] = {"params": call.params, "headers": call.headers}
        if call.has_body:
            args["json"] = call.body
        if call.extra_timeout:
            args["timeout"] = httpx.Timeout(self.timeout, read=self.timeout + call.extra_timeout)
        return args

    def retry_delay(self, error: RateLimited, attempt: int) -> float | None:
        """How long to sleep before retrying a ``429 rate_limited``, or None to raise it."""
        if not self.retry_on_rate_limit or attempt >= MAX_RATE_LIMIT_RETRIES:
            return None
        return error.retry_after if error.retry_after is not None else 1.0


class Baton:
    """A blocking client of a Baton server.

    ``api_key`` or ``token`` (a session token, or a callable returning a current one, asked
    before each request and each WebSocket connect) authenticates every request when access
    control is on; ``tenant`` sends ``Baton-Tenant`` (admin keys only). ``verify`` is ``True``,
    ``False``, the path of a CA bundle (PEM), or an ``ssl.SSLContext``. With
    ``retry_on_rate_limit=True`` a ``429 rate_limited`` is retried (up to 5 times) after its
    ``Retry-After``. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        token: str | Callable[[], str] | None = None,
        *,
        tenant: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        verify: bool | str | ssl.SSLContext = True,
        retry_on_rate_limit: bool = False,
    ) -> None:
        self._config = _Config(
            base_url, api_key, token, tenant, timeout, verify, retry_on_rate_limit
        )
        self._http = httpx.Client(
            base_url=self._config.base_url,
            headers=self._config.headers,
            timeout=timeout,
            verify=self._config.verify,
            auth=self._config.auth,
        )

    def __enter__(self) -> Baton:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connection pool."""
        self._http.close()

    def _run(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    call.method, call.path, **self._config.request_args(call)
                )
            except httpx.TransportError as e:
                raise ConnectionFailed("connection_failed", str(e), 0) from e
            try:
                return call.parse(
                    protocol.read_reply(response.status_code, response.headers, response.content)
                )
            except RateLimited as e:
                delay = self._config.retry_delay(e, attempt)
                if delay is None:
                    raise
                attempt += 1
                time.sleep(delay)

    # Sessions

    def put_session(
        self, session_id: str, agent: str | None = None, context: JSONObject | None = None
    ) -> Session:
        """Creates the session, or updates its agent/context (``PUT /v1/sessions/{id}``)."""
        return self._run(protocol.put_session(session_id, agent, context))

    create_session = put_session

    def get_session(self, session_id: str) -> Session:
        """The session (``NotFound`` if absent)."""
        return self._run(protocol.get_session(session_id))

    def list_sessions(self, limit: int | None = None, after: str | None = None) -> Page[Session]:
        """One page of the sessions, ordered by id; pass ``page.next`` as ``after``."""
        return self._run(protocol.list_sessions(limit, after))

    def iter_sessions(self, page_size: int | None = None) -> Iterator[Session]:
        """Every session, fetching page after page."""
        after: str | None = None
        while True:
            page = self.list_sessions(page_size, after)
            yield from page.items
            if page.next is None:
                return
            after = page.next

    def delete_session(self, session_id: str) -> None:
        """Deletes the session and everything in it (its tasks are cancelled)."""
        self._run(protocol.delete_session(session_id))

    # Messages

    def send(
        self,
        session_id: str,
        content: str,
        *,
        policy: str | None = None,
        metadata: JSONObject | None = None,
        idempotency_key: str | None = None,
        wait: float | None = None,
        on_disconnect: str | None = None,
    ) -> Interaction | Cleared:
        """Sends a message: the new (or, for a known ``idempotency_key``, the first) Interaction.

        ``policy`` is ``reject`` (default: ``SessionBusy`` if busy), ``enqueue`` or
        ``interrupt``. ``wait`` (1–300 s) holds the answer until the interaction is final. A
        message ``/clear`` clears the session and returns :class:`Cleared`.
        """
        return self._run(
            protocol.send_message(
                session_id, content, policy, metadata, idempotency_key, wait, on_disconnect
            )
        )

    def cancel(self, session_id: str, interaction_id: str | None = None) -> list[str]:
        """Cancels the running interaction (or the named one); the ids it cancelled."""
        return self._run(protocol.cancel(session_id, interaction_id))

    def clear(self, session_id: str) -> Cleared:
        """Cancels all work, removes interactions and context, and starts a new epoch."""
        return self._run(protocol.clear(session_id))

    # Context

    def get_context(self, session_id: str) -> JSONObject:
        """The session's context."""
        return self._run(protocol.get_context(session_id))

    def replace_context(self, session_id: str, context: JSONObject) -> JSONObject:
        """Replaces the context; returns it."""
        return self._run(protocol.replace_context(session_id, context))

    def patch_context(self, session_id: str, patch: JSONObject) -> JSONObject:
        """Applies a JSON Merge Patch (RFC 7396: ``None`` removes a key); returns the context."""
        return self._run(protocol.patch_context(session_id, patch))

    # Interactions

    def list_interactions(
        self, session_id: str, limit: int | None = None, before: str | None = None
    ) -> Page[Interaction]:
        """One page of the current epoch's interactions, newest first; ``page.next`` → ``before``."""
        return self._run(protocol.list_interactions(session_id, limit, before))

    def iter_interactions(
        self, session_id: str, page_size: int | None = None
    ) -> Iterator[Interaction]:
        """Every interaction of the current epoch, newest first."""
        before: str | None = None
        while True:
            page = self.list_interactions(session_id, page_size, before)
            yield from page.items
            if page.next is None:
                return
            before = page.next

    def get_interaction(self, session_id: str, interaction_id: str) -> Interaction:
        """One interaction."""
        return self._run(protocol.get_interaction(session_id, interaction_id))

    def answer(
        self, session_id: str, interaction_id: str, request_id: str, answer: Any
    ) -> Interaction:
        """Answers a ``waiting`` interaction's request (``NotWaiting`` if it is not pending)."""
        return self._run(protocol.answer(session_id, interaction_id, request_id, answer))

    # Access and agents

    def mint_token(
        self, session_id: str, scope: str | None = None, ttl_s: int | None = None
    ) -> Token:
        """A session token (scope ``read`` or ``write``, ``ttl_s`` 1–86400) for one session."""
        return self._run(protocol.mint_token(session_id, scope, ttl_s))

    def list_agents(self) -> list[Agent]:
        """The configured agents."""
        return self._run(protocol.list_agents())

    # Events

    def events(
        self, session_id: str, after: int | None = None, *, replay: bool = False
    ) -> Iterator[Event]:
        """The session's events over its WebSocket, resuming after a dropped connection.

        Starts after ``after`` (or, with ``replay=True``, from the first retained event; with
        neither, with new events only), and on a lost connection reconnects with backoff and
        ``after=`` the last seq delivered: each event comes once, in order. Ends after
        ``session.deleted``.
        """
        from .stream import sync_events

        return sync_events(self._config, session_id, after, replay)


class AsyncBaton:
    """The ``async`` client: the same methods as :class:`Baton`, as coroutines.

    Use it as an ``async`` context manager, or ``await client.aclose()``.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        token: str | Callable[[], str] | None = None,
        *,
        tenant: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        verify: bool | str | ssl.SSLContext = True,
        retry_on_rate_limit: bool = False,
    ) -> None:
        self._config = _Config(
            base_url, api_key, token, tenant, timeout, verify, retry_on_rate_limit
        )
        self._http = httpx.AsyncClient(
            base_url=self._config.base_url,
            headers=self._config.headers,
            timeout=timeout,
            verify=self._config.verify,
            auth=self._config.auth,
        )

    async def __aenter__(self) -> AsyncBaton:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the connection pool."""
        await self._http.aclose()

    async def _run(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    call.method, call.path, **self._config.request_args(call)
                )
            except httpx.TransportError as e:
                raise ConnectionFailed("connection_failed", str(e), 0) from e
            try:
                return call.parse(
                    protocol.read_reply(response.status_code, response.headers, response.content)
                )
            except RateLimited as e:
                delay = self._config.retry_delay(e, attempt)
                if delay is None:
                    raise
                attempt += 1
                await asyncio.sleep(delay)

    async def put_session(
        self, session_id: str, agent: str | None = None, context: JSONObject | None = None
    ) -> Session:
        """See :meth:`Baton.put_session`."""
        return await self._run(protocol.put_session(session_id, agent, context))

    create_session = put_session

    async def get_session(self, session_id: str) -> Session:
        """See :meth:`Baton.get_session`."""
        return await self._run(protocol.get_session(session_id))

    async def list_sessions(
        self, limit: int | None = None, after: str | None = None
    ) -> Page[Session]:
        """See :meth:`Baton.list_sessions`."""
        return await self._run(protocol.list_sessions(limit, after))

    async def iter_sessions(self, page_size: int | None = None) -> AsyncIterator[Session]:
        """See :meth:`Baton.iter_sessions` (``async for``)."""
        after: str | None = None
        while True:
            page = await self.list_sessions(page_size, after)
            for session in page.items:
                yield session
            if page.next is None:
                return
            after = page.next

    async def delete_session(self, session_id: str) -> None:
        """See :meth:`Baton.delete_session`."""
        await self._run(protocol.delete_session(session_id))

    async def send(
        self,
        session_id: str,
        content: str,
        *,
        policy: str | None = None,
        metadata: JSONObject | None = None,
        idempotency_key: str | None = None,
        wait: float | None = None,
        on_disconnect: str | None = None,
    ) -> Interaction | Cleared:
        """See :meth:`Baton.send`."""
        return await self._run(
            protocol.send_message(
                session_id, content, policy, metadata, idempotency_key, wait, on_disconnect
            )
        )

    async def cancel(self, session_id: str, interaction_id: str | None = None) -> list[str]:
        """See :meth:`Baton.cancel`."""
        return await self._run(protocol.cancel(session_id, interaction_id))

    async def clear(self, session_id: str) -> Cleared:
        """See :meth:`Baton.clear`."""
        return await self._run(protocol.clear(session_id))

    async def get_context(self, session_id: str) -> JSONObject:
        """See :meth:`Baton.get_context`."""
        return await self._run(protocol.get_context(session_id))

    async def replace_context(self, session_id: str, context: JSONObject) -> JSONObject:
        """See :meth:`Baton.replace_context`."""
        return await self._run(protocol.replace_context(session_id, context))

    async def patch_context(self, session_id: str, patch: JSONObject) -> JSONObject:
        """See :meth:`Baton.patch_context`."""
        return await self._run(protocol.patch_context(session_id, patch))

    async def list_interactions(
        self, session_id: str, limit: int | None = None, before: str | None = None
    ) -> Page[Interaction]:
        """See :meth:`Baton.list_interactions`."""
        return await self._run(protocol.list_interactions(session_id, limit, before))

    async def iter_interactions(
        self, session_id: str, page_size: int | None = None
    ) -> AsyncIterator[Interaction]:
        """See :meth:`Baton.iter_interactions` (``async for``)."""
        before: str | None = None
        while True:
            page = await self.list_interactions(session_id, page_size, before)
            for interaction in page.items:
                yield interaction
            if page.next is None:
                return
            before = page.next

    async def get_interaction(self, session_id: str, interaction_id: str) -> Interaction:
        """See :meth:`Baton.get_interaction`."""
        return await self._run(protocol.get_interaction(session_id, interaction_id))

    async def answer(
        self, session_id: str, interaction_id: str, request_id: str, answer: Any
    ) -> Interaction:
        """See :meth:`Baton.answer`."""
        return await self._run(protocol.answer(session_id, interaction_id, request_id, answer))

    async def mint_token(
        self, session_id: str, scope: str | None = None, ttl_s: int | None = None
    ) -> Token:
        """See :meth:`Baton.mint_token`."""
        return await self._run(protocol.mint_token(session_id, scope, ttl_s))

    async def list_agents(self) -> list[Agent]:
        """See :meth:`Baton.list_agents`."""
        return await self._run(protocol.list_agents())

    def events(
        self, session_id: str, after: int | None = None, *, replay: bool = False
    ) -> AsyncIterator[Event]:
        """See :meth:`Baton.events` (``async for``)."""
        from .stream import async_events

        return async_events(self._config, session_id, after, replay)
