"""Page tokens of every List RPC: opaque to clients, versioned, and checked here only.

A token is the URL-safe base64 (without padding) of compact JSON::

    {"v": 1, "l": "<listing>", "q": {<the listing's filters>}, "p": [<position>, ...]}

``v`` is :data:`VERSION`; ``l`` names the listing (``ListTasks``...); ``q`` holds the filters
of the first request, which every later page must repeat; ``p`` is the position the next page
starts after, one element per :class:`Part` of the listing. :func:`decode` refuses anything
else (another version or listing, other filters, a position of the wrong type or out of
range) with INVALID_ARGUMENT naming ``page_token``, so no forged token reaches the core or
the store. Tokens are not signed: a client can only choose where a listing it may read
starts. docs/errors.md describes the format for operators.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from agentcoord.core.errors import AgentcoordError, InvalidInput
from agentcoord.server import validation

FIELD: Final = "page_token"
"""The request field every listing reads its token from."""
VERSION: Final = 1
"""Format version written into every token; tokens of other versions are refused."""
MAX_TOKEN_LENGTH: Final = 8192
"""Longest token accepted, in characters (the longest issued is far shorter)."""
MAX_INT64: Final = (1 << 63) - 1
MAX_INT32: Final = (1 << 31) - 1

_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")

Part = Callable[[object], Any]
"""Parses one element of a position from its JSON form; raises ValueError when it is bad."""


def _string(value: object, limit: int) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ValueError("not a string of the right length")
    return value


def _integer(value: object, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"not an integer from {low} to {high}")
    return value


def revision(value: object) -> int:
    """Part: a store revision, an int64 of at least 0."""
    return _integer(value, 0, MAX_INT64)


def subtask_place(value: object) -> int:
    """Part: one past a sub-task's place in its task, from 1 to the int32 maximum.

    (The place is an int32 column in PostgreSQL: a larger one would fail the query.)
    """
    return _integer(value, 1, MAX_INT32)


def time(value: object) -> datetime:
    """Part: an ISO 8601 time with its UTC offset, returned in UTC."""
    moment = datetime.fromisoformat(_string(value, 64))
    if moment.utcoffset() is None:
        raise ValueError("a time without its UTC offset")
    return moment.astimezone(UTC)


def agent_id(value: object) -> str:
    """Part: an agent id."""
    return validation.matching(FIELD, _string(value, 128), validation.AGENT_ID, "agent id")


def state_key(value: object) -> str:
    """Part: a state key."""
    return validation.state_key(FIELD, _string(value, validation.MAX_KEY_BYTES))


def task_id(value: object) -> str:
    """Part: a task id."""
    return validation.text(FIELD, _string(value, 128), max_length=128)


def encode(listing: str, query: Mapping[str, Any], *position: str | int | datetime) -> str:
    """Return the token continuing ``listing`` with filters ``query`` after ``position``."""
    parts = [p.astimezone(UTC).isoformat() if isinstance(p, datetime) else p for p in position]
    payload = json.dumps(
        {"v": VERSION, "l": listing, "q": query, "p": parts},
        sort_keys=True,
        separators=(",", ":"),
    )
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode(
    token: str, listing: str, query: Mapping[str, Any], *parts: Part
) -> tuple[Any, ...] | None:
    """Return the position in ``token`` (one value per part), or None for no token.

    Raises:
        InvalidInput: naming ``page_token``, for anything but a token :func:`encode` made
            for this listing and these filters.
    """
    if not token:
        return None
    if len(token) > MAX_TOKEN_LENGTH or not _BASE64URL.fullmatch(token):
        raise _not_issued()
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw, parse_constant=_no_constants)
    except (binascii.Error, ValueError, RecursionError):
        raise _not_issued() from None
    if not isinstance(payload, dict) or payload.get("l") != listing:
        raise _not_issued()
    if _canonical(payload.get("v")) != _canonical(VERSION):
        raise InvalidInput(FIELD, "was issued by another version of the server; list again")
    if _canonical(payload.get("q")) != _canonical(query):
        raise InvalidInput(FIELD, "was issued for a listing with other filters")
    position = payload.get("p")
    if not isinstance(position, list) or len(position) != len(parts):
        raise _not_issued()
    try:
        return tuple(part(value) for part, value in zip(parts, position, strict=True))
    except (ValueError, TypeError, OverflowError, AgentcoordError):
        raise _not_issued() from None


def _canonical(value: object) -> str:
    """Return ``value`` as JSON with sorted keys: equal only for the same JSON (1 is not true)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _not_issued() -> InvalidInput:
    return InvalidInput(FIELD, "is not a page token this server issued for this listing")
