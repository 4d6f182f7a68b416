"""Wire forms every service shares: times, durations and JSON values."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from agentcoord.core.errors import InvalidInput
from agentcoord.core.state_rules import canonical_json


def seconds_to_duration(seconds: float) -> duration_pb2.Duration:
    """Return a Duration for ``seconds`` (non-negative)."""
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(max(seconds, 0.0) * 1e9))
    return value


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """Return a Timestamp, or None for None."""
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    set_timestamp(stamp, value)
    return stamp


def set_timestamp(stamp: timestamp_pb2.Timestamp, value: datetime) -> None:
    """Set ``stamp`` (say, a field of a message being built) to ``value``; naive is UTC.

    The same as ``Timestamp.FromDatetime``, by integer arithmetic: a quarter of its cost.
    """
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    stamp.seconds = delta.days * 86_400 + delta.seconds
    stamp.nanos = delta.microseconds * 1_000


MAX_JSON_DEPTH = 30
"""Deepest nesting of arrays and objects in a JSON value a request carries.

Protobuf decodes at most 100 nested messages and every level of a JSON object costs three,
so this bound keeps every response that carries the value decodable by clients.
"""


def set_json_value(target: struct_pb2.Value, value: Any) -> None:
    """Set ``target`` to a plain JSON value (as ``json.loads`` makes).

    What ``json_format.Parse`` does for a Value, without its generic message walk.
    """
    if value is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int | float):
        target.number_value = value
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, list):
        items = target.list_value
        items.SetInParent()
        for item in value:
            set_json_value(items.values.add(), item)
    else:
        members = target.struct_value
        members.SetInParent()
        for key, item in value.items():
            set_json_value(members.fields[key], item)


def json_text(field: str, value: struct_pb2.Value) -> bytes:
    """Return the canonical JSON text of a request's Value (sorted keys, no spaces).

    Raises:
        InvalidInput: naming ``field`` and the place inside the value, for a NaN or
            infinite number (JSON has none) or nesting deeper than ``MAX_JSON_DEPTH``.
    """
    return canonical_json(json_plain(field, value))


def json_plain(field: str, value: struct_pb2.Value) -> Any:
    """Return the plain Python value (as ``json.loads`` makes) of a request's Value.

    Raises:
        InvalidInput: as for :func:`json_text`.
    """
    return _plain_json(field, value, "$", 0)


def json_items(field: str, values: struct_pb2.ListValue) -> list[Any]:
    """Return the plain Python values of a request's ListValue, checked as :func:`json_text`."""
    return [_plain_json(field, item, f"$[{index}]", 1) for index, item in enumerate(values.values)]


def _plain_json(field: str, value: struct_pb2.Value, where: str, depth: int) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise InvalidInput(
                field, f"holds {json.dumps(number)} at {where}; JSON numbers must be finite"
            )
        return number
    if kind in ("struct_value", "list_value"):
        if depth == MAX_JSON_DEPTH:
            raise InvalidInput(
                field, f"nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects at {where}"
            )
        if kind == "list_value":
            return [
                _plain_json(field, item, f"{where}[{index}]", depth + 1)
                for index, item in enumerate(value.list_value.values)
            ]
        return {
            key: _plain_json(field, item, _member(where, key), depth + 1)
            for key, item in value.struct_value.fields.items()
        }
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None  # null_value, or no kind: JSON null, as json_format reads it


def _member(where: str, key: str) -> str:
    return f"{where}.{key}" if key.isidentifier() else f"{where}[{json.dumps(key)}]"
