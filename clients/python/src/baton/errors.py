"""Errors: one exception class per error code of the contract, all under :class:`BatonError`.

Every error the server sends is ``{"error": {"code", "message", ...}}``; the exception carries
``code``, ``message``, the HTTP ``status`` and the object's other fields in ``extra``. A code
this version does not know is raised as a plain :class:`BatonError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class BatonError(Exception):
    """An error answer of the Baton server (or a transport failure, with ``status`` 0)."""

    code: str
    message: str
    status: int
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.code, self.message)

    def __str__(self) -> str:
        return f"{self.code} ({self.status}): {self.message}"


class InvalidRequest(BatonError):
    """``400 invalid_request``: malformed JSON, unknown policy, a missing or oversized field."""


class InvalidSessionId(InvalidRequest):
    """``400 invalid_session_id``: ids are 1–128 characters of ``[A-Za-z0-9._:-]``."""


class UnknownAgent(InvalidRequest):
    """``400 unknown_agent``: no agent of that name is configured."""


class Unauthorized(BatonError):
    """``401 unauthorized``: no credentials, or a bad key, or an expired/invalid token."""


class Forbidden(BatonError):
    """``403 forbidden``: valid credentials that may not do this (another session, say)."""


class NotFound(BatonError):
    """``404 not_found``."""


class MethodNotAllowed(BatonError):
    """``405 method_not_allowed``."""


class SessionBusy(BatonError):
    """``409 session_busy``: policy ``reject`` while the session is busy.

    ``running`` is the id of the interaction that keeps it busy.
    """

    @property
    def running(self) -> str | None:
        value = self.extra.get("running")
        return str(value) if value is not None else None


class NotWaiting(BatonError):
    """``409 not_waiting``: an answer to an interaction that is not waiting for it."""


class AlreadyExists(BatonError):
    """``409 already_exists`` (a fork's target exists)."""


class PayloadTooLarge(BatonError):
    """``413 payload_too_large``: the request body is over the server's limit."""


class ContextTooLarge(BatonError):
    """``413 context_too_large``: the resulting context would be over ``max_context_bytes``."""


class IdempotencyMismatch(BatonError):
    """``422 idempotency_mismatch``: a known idempotency key with another content or metadata."""


class QueueFull(BatonError):
    """``429 queue_full``: policy ``enqueue`` with ``queue_limit`` interactions already queued."""


@dataclass(eq=False)
class RateLimited(BatonError):
    """``429 rate_limited``: over the key's ``rate_per_s``; ``retry_after`` is in seconds."""

    retry_after: float | None = None


class TenantLimit(BatonError):
    """``429 tenant_limit``: the tenant is at ``max_sessions_per_tenant`` or its connections."""


class Internal(BatonError):
    """``500 internal``."""


class Unavailable(BatonError):
    """``503 unavailable``: the server is shutting down or its storage is down."""


class ConnectionFailed(BatonError):
    """The server could not be reached, or the connection broke (``status`` 0)."""


ERROR_CLASSES: dict[str, type[BatonError]] = {
    "invalid_request": InvalidRequest,
    "invalid_session_id": InvalidSessionId,
    "unknown_agent": UnknownAgent,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "not_found": NotFound,
    "method_not_allowed": MethodNotAllowed,
    "session_busy": SessionBusy,
    "not_waiting": NotWaiting,
    "already_exists": AlreadyExists,
    "payload_too_large": PayloadTooLarge,
    "context_too_large": ContextTooLarge,
    "idempotency_mismatch": IdempotencyMismatch,
    "queue_full": QueueFull,
    "rate_limited": RateLimited,
    "tenant_limit": TenantLimit,
    "internal": Internal,
    "unavailable": Unavailable,
}
"""The class raised for each error code."""


def error_from_response(status: int, body: Any, retry_after: str | None) -> BatonError:
    """Builds the exception for an error answer (``body`` is the parsed JSON, if it parsed)."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return BatonError(code=f"http_{status}", message=f"HTTP {status}", status=status)
    code = str(error.get("code", f"http_{status}"))
    message = str(error.get("message", ""))
    extra = {k: v for k, v in error.items() if k not in ("code", "message")}
    cls = ERROR_CLASSES.get(code, BatonError)
    if cls is RateLimited:
        return RateLimited(code, message, status, extra, retry_after=_seconds(retry_after))
    return cls(code, message, status, extra)


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
