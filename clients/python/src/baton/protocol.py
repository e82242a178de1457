"""What each route of the contract sends and how its answer is read, free of any I/O.

Every client method is one function here returning a :class:`Call`: the request to make and
the parser of its answer. :class:`baton.Baton` and :class:`baton.AsyncBaton` only carry calls
over httpx, so the two clients cannot drift apart.
"""

from __future__ import annotations

import json as jsonlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from .errors import BatonError, error_from_response
from .models import Agent, Cleared, Interaction, JSONObject, Page, Session, Token

T = TypeVar("T")

POLICIES = ("reject", "enqueue", "interrupt", "rollback")


@dataclass(frozen=True)
class Reply:
    """A successful HTTP answer: status, headers (lower-case names) and the parsed JSON body."""

    status: int
    headers: Mapping[str, str]
    body: Any


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request and the parser of its successful answer."""

    method: str
    path: str
    parse: Callable[[Reply], T]
    params: dict[str, str] = field(default_factory=dict)
    body: Any = None
    has_body: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    extra_timeout: float = 0.0
    """Seconds to add to the read timeout (a ``wait`` holds the answer that long)."""


def read_reply(status: int, headers: Mapping[str, str], content: bytes) -> Reply:
    """Parses an answer, raising the contract's exception for an error status."""
    body: Any = None
    if content:
        try:
            body = jsonlib.loads(content)
        except ValueError:
            body = None
    if status >= 400:
        raise error_from_response(status, body, headers.get("retry-after"))
    return Reply(status=status, headers=headers, body=body)


def auth_headers(
    api_key: str | None, token: str | None, tenant: str | None
) -> dict[str, str]:
    """The headers that carry the credentials (a key or a session token) and the tenant."""
    if api_key is not None and token is not None:
        raise ValueError("give api_key or token, not both")
    headers: dict[str, str] = {}
    secret = api_key if api_key is not None else token
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    if tenant is not None:
        headers["Baton-Tenant"] = tenant
    return headers


def session_path(session_id: str, *rest: str) -> str:
    """``/v1/sessions/{id}/...`` with the id percent-encoded, as the contract expects."""
    parts = [quote(session_id, safe="")] + [quote(p, safe="") for p in rest]
    return "/v1/sessions/" + "/".join(parts)


def _params(**values: object) -> dict[str, str]:
    return {k: str(v) for k, v in values.items() if v is not None}


def _session(reply: Reply) -> Session:
    return Session.from_json(reply.body)


def _interaction(reply: Reply) -> Interaction:
    return Interaction.from_json(
        reply.body, replayed=reply.headers.get("idempotent-replayed") == "true"
    )


def _object(reply: Reply) -> JSONObject:
    body = reply.body
    if not isinstance(body, dict):
        raise BatonError("invalid_response", "expected a JSON object", reply.status)
    return body


def _cancelled(reply: Reply) -> list[str]:
    return [str(i) for i in _object(reply).get("cancelled", [])]


def _nothing(reply: Reply) -> None:
    return None


# Sessions


def put_session(
    session_id: str, agent: str | None = None, context: JSONObject | None = None
) -> Call[Session]:
    body: JSONObject = {}
    if agent is not None:
        body["agent"] = agent
    if context is not None:
        body["context"] = context
    return Call("PUT", session_path(session_id), _session, body=body, has_body=True)


def get_session(session_id: str) -> Call[Session]:
    return Call("GET", session_path(session_id), _session)


def list_sessions(limit: int | None = None, after: str | None = None) -> Call[Page[Session]]:
    def parse(reply: Reply) -> Page[Session]:
        body = _object(reply)
        return Page([Session.from_json(s) for s in body["sessions"]], body.get("next"))

    return Call("GET", "/v1/sessions", parse, params=_params(limit=limit, after=after))


def delete_session(session_id: str) -> Call[None]:
    return Call("DELETE", session_path(session_id), _nothing)


# Messages and the session's work


def send_message(
    session_id: str,
    content: str,
    policy: str | None = None,
    metadata: JSONObject | None = None,
    idempotency_key: str | None = None,
    wait: float | None = None,
    on_disconnect: str | None = None,
) -> Call[Interaction | Cleared]:
    body: JSONObject = {"content": content}
    if policy is not None:
        body["policy"] = policy
    if metadata is not None:
        body["metadata"] = metadata
    if on_disconnect is not None:
        body["on_disconnect"] = on_disconnect
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else {}
    wait_param = None if wait is None else (int(wait) if float(wait).is_integer() else wait)

    def parse(reply: Reply) -> Interaction | Cleared:
        body = _object(reply)
        if "epoch" in body and "id" not in body:
            return Cleared.from_json(body)  # the message was "/clear"
        return _interaction(reply)

    return Call(
        "POST",
        session_path(session_id, "messages"),
        parse,
        params=_params(wait=wait_param),
        body=body,
        has_body=True,
        headers=headers,
        extra_timeout=float(wait or 0),
    )


def cancel(session_id: str, interaction_id: str | None = None) -> Call[list[str]]:
    body: JSONObject = {} if interaction_id is None else {"interaction_id": interaction_id}
    return Call("POST", session_path(session_id, "cancel"), _cancelled, body=body, has_body=True)


def clear(session_id: str) -> Call[Cleared]:
    return Call(
        "POST",
        session_path(session_id, "clear"),
        lambda reply: Cleared.from_json(_object(reply)),
        body={},
        has_body=True,
    )


# Context


def get_context(session_id: str) -> Call[JSONObject]:
    return Call("GET", session_path(session_id, "context"), _object)


def replace_context(session_id: str, context: JSONObject) -> Call[JSONObject]:
    return Call("PUT", session_path(session_id, "context"), _object, body=context, has_body=True)


def patch_context(session_id: str, patch: JSONObject) -> Call[JSONObject]:
    return Call("PATCH", session_path(session_id, "context"), _object, body=patch, has_body=True)


# Interactions


def list_interactions(
    session_id: str, limit: int | None = None, before: str | None = None
) -> Call[Page[Interaction]]:
    def parse(reply: Reply) -> Page[Interaction]:
        body = _object(reply)
        return Page([Interaction.from_json(i) for i in body["interactions"]], body.get("next"))

    return Call(
        "GET",
        session_path(session_id, "interactions"),
        parse,
        params=_params(limit=limit, before=before),
    )


def get_interaction(session_id: str, interaction_id: str) -> Call[Interaction]:
    return Call("GET", session_path(session_id, "interactions", interaction_id), _interaction)


def answer(
    session_id: str, interaction_id: str, request_id: str, answer: Any
) -> Call[Interaction]:
    return Call(
        "POST",
        session_path(session_id, "interactions", interaction_id, "answer"),
        _interaction,
        body={"request_id": request_id, "answer": answer},
        has_body=True,
    )


# Access and agents


def mint_token(
    session_id: str, scope: str | None = None, ttl_s: int | None = None
) -> Call[Token]:
    body: JSONObject = {}
    if scope is not None:
        body["scope"] = scope
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    return Call(
        "POST",
        session_path(session_id, "tokens"),
        lambda reply: Token.from_json(_object(reply)),
        body=body,
        has_body=True,
    )


def list_agents() -> Call[list[Agent]]:
    return Call(
        "GET",
        "/v1/agents",
        lambda reply: [Agent.from_json(a) for a in _object(reply)["agents"]],
    )
