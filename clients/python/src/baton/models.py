"""The contract's objects (Session, Interaction, Event, …) as typed dataclasses.

Each has a ``from_json`` that builds it from the wire shape; unknown fields are kept in
``extra`` so that additive server changes never break a client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")

JSON = Any
"""Any JSON value (object, array, string, number, bool or None)."""

JSONObject = dict[str, Any]


def _known(raw: JSONObject, names: tuple[str, ...]) -> JSONObject:
    return {k: v for k, v in raw.items() if k not in names}


@dataclass(frozen=True)
class Error:
    """The ``error`` of a failed interaction: ``{"code", "message"}``."""

    code: str
    message: str

    @classmethod
    def from_json(cls, raw: JSONObject) -> Error:
        return cls(code=str(raw.get("code", "")), message=str(raw.get("message", "")))


@dataclass(frozen=True)
class Request:
    """The pending question of a ``waiting`` interaction: answer it with ``request_id=id``."""

    id: str
    data: JSON

    @classmethod
    def from_json(cls, raw: JSONObject) -> Request:
        return cls(id=str(raw["id"]), data=raw.get("data"))


_INTERACTION_FIELDS = (
    "id", "session", "content", "metadata", "status", "response", "error", "request",
    "cancel_reason", "created_at", "started_at", "finished_at",
)


@dataclass(frozen=True)
class Interaction:
    """One request to the agent and its outcome.

    ``status`` is one of ``queued``, ``running``, ``waiting``, ``completed``, ``failed``,
    ``cancelled``. Times are RFC 3339 strings as the server sent them. ``replayed`` is true when
    the server answered an idempotency-key replay (``Idempotent-Replayed: true``).
    """

    id: str
    session: str
    content: str
    metadata: JSONObject
    status: str
    response: str
    error: Error | None
    request: Request | None
    cancel_reason: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    replayed: bool = False
    extra: JSONObject = field(default_factory=dict)

    @property
    def is_final(self) -> bool:
        """Whether the interaction has ended (completed, failed or cancelled)."""
        return self.status in ("completed", "failed", "cancelled")

    @classmethod
    def from_json(cls, raw: JSONObject, replayed: bool = False) -> Interaction:
        error = raw.get("error")
        request = raw.get("request")
        return cls(
            id=str(raw["id"]),
            session=str(raw.get("session", "")),
            content=str(raw.get("content", "")),
            metadata=dict(raw.get("metadata") or {}),
            status=str(raw["status"]),
            response=str(raw.get("response") or ""),
            error=Error.from_json(error) if isinstance(error, dict) else None,
            request=Request.from_json(request) if isinstance(request, dict) else None,
            cancel_reason=raw.get("cancel_reason"),
            created_at=str(raw.get("created_at", "")),
            started_at=raw.get("started_at"),
            finished_at=raw.get("finished_at"),
            replayed=replayed,
            extra=_known(raw, _INTERACTION_FIELDS),
        )


_SESSION_FIELDS = (
    "id", "agent", "context", "epoch", "last_seq", "created_at", "running", "queued",
)


@dataclass(frozen=True)
class Session:
    """A conversation: its agent, context (key/value memory), epoch and last event seq.

    ``running`` is the active interaction (``running`` or ``waiting``), ``queued`` how many wait
    behind it.
    """

    id: str
    agent: str
    context: JSONObject
    epoch: int
    last_seq: int
    created_at: str
    running: Interaction | None
    queued: int
    extra: JSONObject = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: JSONObject) -> Session:
        running = raw.get("running")
        return cls(
            id=str(raw["id"]),
            agent=str(raw.get("agent", "")),
            context=dict(raw.get("context") or {}),
            epoch=int(raw.get("epoch", 0)),
            last_seq=int(raw.get("last_seq", 0)),
            created_at=str(raw.get("created_at", "")),
            running=Interaction.from_json(running) if isinstance(running, dict) else None,
            queued=int(raw.get("queued", 0)),
            extra=_known(raw, _SESSION_FIELDS),
        )


@dataclass(frozen=True)
class Event:
    """An entry of a session's ordered event log (``task.delta``, ``task.completed``, …)."""

    seq: int
    session: str
    type: str
    at: str
    data: JSONObject

    @property
    def interaction(self) -> Interaction | None:
        """The interaction an event carries in ``data.interaction``, if any."""
        raw = self.data.get("interaction")
        return Interaction.from_json(raw) if isinstance(raw, dict) else None

    @classmethod
    def from_json(cls, raw: JSONObject) -> Event:
        return cls(
            seq=int(raw["seq"]),
            session=str(raw.get("session", "")),
            type=str(raw["type"]),
            at=str(raw.get("at", "")),
            data=dict(raw.get("data") or {}),
        )


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing; pass ``next`` back (as ``after`` or ``before``) for the next one.

    ``next`` is ``None`` on the last page.
    """

    items: list[T]
    next: str | None


@dataclass(frozen=True)
class Cleared:
    """The outcome of a clear: the new ``epoch`` and the ids of the interactions it cancelled."""

    epoch: int
    cancelled: list[str]

    @classmethod
    def from_json(cls, raw: JSONObject) -> Cleared:
        return cls(epoch=int(raw["epoch"]), cancelled=[str(i) for i in raw.get("cancelled", [])])


@dataclass(frozen=True)
class Token:
    """A session token: give ``token`` to a browser (or any client) that must reach one session."""

    token: str
    session: str
    scope: str
    expires_at: str

    @classmethod
    def from_json(cls, raw: JSONObject) -> Token:
        return cls(
            token=str(raw["token"]),
            session=str(raw["session"]),
            scope=str(raw["scope"]),
            expires_at=str(raw["expires_at"]),
        )


@dataclass(frozen=True)
class Agent:
    """A configured agent: its name, kind, and whether it is the default one."""

    name: str
    kind: str
    default: bool

    @classmethod
    def from_json(cls, raw: JSONObject) -> Agent:
        return cls(
            name=str(raw["name"]), kind=str(raw.get("kind", "")), default=bool(raw.get("default"))
        )
