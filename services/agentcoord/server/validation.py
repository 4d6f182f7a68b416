"""Request-shape checks: each failure is an InvalidInput naming the field."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf import duration_pb2, timestamp_pb2

from agentcoord.core.errors import InvalidInput

AGENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
"""Agent ids: 1-128 characters of letters, digits and ``._:-``."""
ROLE = re.compile(r"[a-z0-9_.-]{1,64}")
"""Roles: 1-64 characters of lower-case letters, digits and ``_.-``."""
CAPABILITY = re.compile(r"[a-z0-9_.:-]{1,64}")
"""Capabilities: 1-64 characters of lower-case letters, digits and ``_.:-``."""
LABEL_KEY = re.compile(r"[A-Za-z0-9_./-]{1,63}")
"""Label keys: 1-63 characters of letters, digits and ``_./-``."""
T = TypeVar("T")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

MAX_PAGE_SIZE = 1000
"""Largest page any List RPC returns."""
DEFAULT_PAGE_SIZE = 100
"""Page size when a request asks for none."""


def matching(field: str, value: str, pattern: re.Pattern[str], what: str) -> str:
    """Return ``value`` if it fully matches ``pattern``."""
    if not pattern.fullmatch(value):
        raise InvalidInput(field, f"{value[:80]!r} is not a valid {what}")
    return value


def text(field: str, value: str, *, max_length: int, required: bool = False) -> str:
    """Return printable ``value`` of at most ``max_length`` characters."""
    if required and not value.strip():
        raise InvalidInput(field, "is required")
    if len(value) > max_length:
        raise InvalidInput(field, f"is {len(value)} characters; at most {max_length}")
    if _CONTROL.search(value.replace("\n", "").replace("\t", "")):
        raise InvalidInput(field, "contains control characters")
    return value


def at_most(field: str, items: Collection[Any], limit: int) -> None:
    """Check a repeated or map field has at most ``limit`` entries."""
    if len(items) > limit:
        raise InvalidInput(field, f"has {len(items)} entries; at most {limit}")


def in_range(field: str, value: int, low: int, high: int) -> int:
    """Return ``value`` if ``low <= value <= high``."""
    if not low <= value <= high:
        raise InvalidInput(field, f"is {value}; must be between {low} and {high}")
    return value


def capabilities(field: str, values: Sequence[str]) -> tuple[str, ...]:
    """Return valid capabilities, sorted and without duplicates."""
    at_most(field, values, 64)
    for index, value in enumerate(values):
        matching(f"{field}[{index}]", value, CAPABILITY, "capability ([a-z0-9_.:-], 1-64)")
    return tuple(sorted(set(values)))


def skill_names(field: str, values: Sequence[str]) -> tuple[str, ...]:
    """Return valid skill ids or tags (1-128 characters, at most 32), sorted and unique."""
    at_most(field, values, 32)
    for index, value in enumerate(values):
        text(f"{field}[{index}]", value, max_length=128, required=True)
    return tuple(sorted(set(values)))


def labels(field: str, values: Mapping[str, str]) -> dict[str, str]:
    """Return valid labels."""
    at_most(field, values, 32)
    for key, value in values.items():
        matching(field, key, LABEL_KEY, "label key ([A-Za-z0-9_./-], 1-63)")
        text(f"{field}[{key}]", value, max_length=256)
    return dict(values)


MAX_DURATION_SECONDS = 315_576_000_000
"""Longest valid ``google.protobuf.Duration`` (about 10,000 years)."""
MIN_TIMESTAMP_SECONDS = -62_135_596_800
"""Seconds of 0001-01-01T00:00:00Z, the earliest valid ``google.protobuf.Timestamp``."""
MAX_TIMESTAMP_SECONDS = 253_402_300_799
"""Seconds of 9999-12-31T23:59:59Z, the latest valid ``google.protobuf.Timestamp``."""
_NANOS = 1_000_000_000


def duration(field: str, value: duration_pb2.Duration) -> float:
    """Return a valid, non-negative Duration in seconds; every request Duration goes here."""
    if not 0 <= value.seconds <= MAX_DURATION_SECONDS or not 0 <= value.nanos < _NANOS:
        raise InvalidInput(
            field,
            f"{{seconds: {value.seconds}, nanos: {value.nanos}}} is not a valid non-negative "
            f"duration (seconds 0 to {MAX_DURATION_SECONDS}, nanos 0 to 999999999)",
        )
    return value.seconds + value.nanos / _NANOS


def timestamp(field: str, value: timestamp_pb2.Timestamp) -> datetime:
    """Return a valid Timestamp as a UTC datetime; every request Timestamp goes here."""
    if (
        not MIN_TIMESTAMP_SECONDS <= value.seconds <= MAX_TIMESTAMP_SECONDS
        or not 0 <= value.nanos < _NANOS
    ):
        raise InvalidInput(
            field,
            f"{{seconds: {value.seconds}, nanos: {value.nanos}}} is not a valid timestamp "
            "(0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z)",
        )
    return value.ToDatetime(tzinfo=UTC)


def known(field: str, value: int, table: Mapping[Any, T], what: str) -> T:
    """Return the core value of enum number ``value``; unknown numbers are refused."""
    try:
        return table[value]
    except KeyError:
        raise InvalidInput(field, f"{value} is not a known {what}") from None


def page_size(field: str, value: int) -> int:
    """Return the effective page size: 0 is the default, large values are capped."""
    if value < 0:
        raise InvalidInput(field, "must not be negative")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


KEY_SEGMENT = re.compile(r"[A-Za-z0-9._~:@=+-]+")
"""Characters of one key segment."""
MAX_KEY_BYTES = 512
"""Longest key, in UTF-8 bytes."""


def state_key(field: str, key: str, *, prefix: bool = False) -> str:
    """Return a valid state key (or key prefix, which may be empty or end with ``/``).

    Keys are ``/``-separated segments of ``[A-Za-z0-9._~:@=+-]``, 1-512 bytes, with no
    empty, ``.`` or ``..`` segment and no leading or trailing ``/``.
    """
    if prefix and not key:
        return key
    if not key:
        raise InvalidInput(field, "is required")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidInput(field, f"is longer than {MAX_KEY_BYTES} bytes")
    segments = key.split("/")
    if prefix and segments[-1] == "":
        segments = segments[:-1]
    for segment in segments:
        if segment in ("", ".", "..") or not KEY_SEGMENT.fullmatch(segment):
            raise InvalidInput(
                field,
                f"{key[:80]!r} is not a valid key: '/'-separated segments of "
                "[A-Za-z0-9._~:@=+-], none empty, '.' or '..'",
            )
    return key
