"""A Python client for Baton, the session server for conversational agents.

    from baton import Baton

    with Baton("http://127.0.0.1:7420", api_key="bk_...") as baton:
        reply = baton.send("demo", "hello", wait=30)

Layout:

- :mod:`baton.client` — :class:`Baton` (blocking) and :class:`AsyncBaton` (``async``).
- :mod:`baton.protocol` — each route's request and the parsing of its answer, without I/O.
- :mod:`baton.stream` — the resuming WebSocket event stream.
- :mod:`baton.models` — Session, Interaction, Event, Page, … as dataclasses.
- :mod:`baton.errors` — :class:`BatonError` and one subclass per error code.
"""

from .client import AsyncBaton, Baton
from .errors import (
    ERROR_CLASSES,
    AlreadyExists,
    BatonError,
    ConnectionFailed,
    ContextTooLarge,
    Forbidden,
    IdempotencyMismatch,
    Internal,
    InvalidRequest,
    InvalidSessionId,
    MethodNotAllowed,
    NotFound,
    NotWaiting,
    PayloadTooLarge,
    QueueFull,
    RateLimited,
    SessionBusy,
    TenantLimit,
    Unauthorized,
    Unavailable,
    UnknownAgent,
)
from .models import Agent, Cleared, Error, Event, Interaction, Page, Request, Session, Token

__version__ = "0.1.0"

__all__ = [
    "ERROR_CLASSES",
    "Agent",
    "AlreadyExists",
    "AsyncBaton",
    "Baton",
    "BatonError",
    "Cleared",
    "ConnectionFailed",
    "ContextTooLarge",
    "Error",
    "Event",
    "Forbidden",
    "IdempotencyMismatch",
    "Interaction",
    "Internal",
    "InvalidRequest",
    "InvalidSessionId",
    "MethodNotAllowed",
    "NotFound",
    "NotWaiting",
    "Page",
    "PayloadTooLarge",
    "QueueFull",
    "RateLimited",
    "Request",
    "Session",
    "SessionBusy",
    "TenantLimit",
    "Token",
    "Unauthorized",
    "Unavailable",
    "UnknownAgent",
]
