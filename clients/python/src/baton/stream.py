"""The resuming event stream over a session's WebSocket (``GET /v1/sessions/{id}/ws``).

:class:`_Resume` holds what both transports share — the URL to (re)connect to, and the last
``seq`` delivered, so that a reconnect asks for ``after=`` it and nothing is lost or repeated —
and the sync and async loops only carry frames.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI
from websockets.sync.client import connect as sync_connect

from .errors import BatonError, Unauthorized, error_from_response
from .models import Event
from .protocol import session_path

if TYPE_CHECKING:
    from .client import _Config

INITIAL_BACKOFF = 0.1
MAX_BACKOFF = 5.0


class _Resume:
    """The state of one resuming stream."""

    def __init__(self, config: _Config, session_id: str, after: int | None, replay: bool):
        self.config = config
        self.session_id = session_id
        self.after = after
        self.replay = replay
        self.done = False

    def url(self) -> str:
        base = self.config.base_url
        if base.startswith("https://"):
            base = "wss://" + base[len("https://"):]
        elif base.startswith("http://"):
            base = "ws://" + base[len("http://"):]
        url = base + session_path(self.session_id, "ws")
        if self.after is not None:
            return f"{url}?after={self.after}"
        return url + "?replay=true" if self.replay else url

    def ssl(self) -> ssl.SSLContext | None:
        if not self.config.base_url.startswith("https://"):
            return None
        verify = self.config.verify
        if isinstance(verify, ssl.SSLContext):
            return verify
        context = ssl.create_default_context()
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def accept(self, raw: str | bytes) -> Event | None:
        """The event a frame carries, if it is one not delivered yet."""
        frame: Any = json.loads(raw)
        if not isinstance(frame, dict):
            return None
        if frame.get("kind") == "hello" and self.after is None:
            # From now on a reconnect resumes where this connection started.
            self.after = int(frame["session"]["last_seq"]) if not self.replay else 0
            return None
        if frame.get("kind") != "event":
            return None
        event = Event.from_json(frame)
        if self.after is not None and event.seq <= self.after:
            return None
        self.after = event.seq
        if event.type == "session.deleted":
            self.done = True
        return event

    def refused(self, error: InvalidStatus) -> BatonError | None:
        """The error to raise for a refused upgrade, or None to retry it (429, 5xx)."""
        status = error.response.status_code
        if status == 429 or status >= 500:
            return None
        try:
            body = json.loads(error.response.body or b"")
        except ValueError:
            body = None
        return error_from_response(status, body, error.response.headers.get("retry-after"))

    def closed(self, error: ConnectionClosed) -> None:
        """Raises for a close that must not be retried: the token expired, and there is no
        token callable to ask for a new one."""
        if (
            error.rcvd is not None
            and error.rcvd.code == 4001
            and self.config.token_provider is None
        ):
            raise Unauthorized("unauthorized", error.rcvd.reason or "token expired", 401) from error


def sync_events(
    config: _Config, session_id: str, after: int | None, replay: bool
) -> Iterator[Event]:
    state = _Resume(config, session_id, after, replay)
    backoff = INITIAL_BACKOFF
    while not state.done:
        try:
            with sync_connect(
                state.url(), additional_headers=config.current_headers(), ssl=state.ssl(),
                open_timeout=config.timeout,
            ) as ws:
                backoff = INITIAL_BACKOFF
                for raw in ws:
                    event = state.accept(raw)
                    if event is not None:
                        yield event
                        if state.done:
                            return
        except InvalidStatus as e:
            refusal = state.refused(e)
            if refusal is not None:
                raise refusal from e
        except ConnectionClosed as e:
            state.closed(e)
            if e.rcvd is not None and e.rcvd.code == 4001:
                continue  # a fresh token, at once
        except InvalidURI:
            raise
        except (OSError, TimeoutError):
            pass
        time.sleep(backoff)
        backoff = min(backoff * 2, MAX_BACKOFF)


async def async_events(
    config: _Config, session_id: str, after: int | None, replay: bool
) -> AsyncIterator[Event]:
    state = _Resume(config, session_id, after, replay)
    backoff = INITIAL_BACKOFF
    while not state.done:
        try:
            async with async_connect(
                state.url(), additional_headers=config.current_headers(), ssl=state.ssl(),
                open_timeout=config.timeout,
            ) as ws:
                backoff = INITIAL_BACKOFF
                async for raw in ws:
                    event = state.accept(raw)
                    if event is not None:
                        yield event
                        if state.done:
                            return
        except InvalidStatus as e:
            refusal = state.refused(e)
            if refusal is not None:
                raise refusal from e
        except ConnectionClosed as e:
            state.closed(e)
            if e.rcvd is not None and e.rcvd.code == 4001:
                continue  # a fresh token, at once
        except InvalidURI:
            raise
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, MAX_BACKOFF)
