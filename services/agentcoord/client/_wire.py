"""Wire helpers the typed clients share: JSON values, entries, times, request ids.

Values are JSON-able Python values (``None``, ``bool``, numbers, ``str``, lists and dicts
with ``str`` keys), sent as ``google.protobuf.Value``, or ``bytes``, sent as ``binary``. JSON
numbers are doubles: an integral number comes back as ``int``, any other as ``float``.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from agentcoord.statesync.v1 import statesync_service_pb2 as pb

JSON: TypeAlias = "bool | int | float | str | Sequence[JSON] | Mapping[str, JSON] | None"
"""A JSON-able Python value (tuples are sent as lists)."""
Value: TypeAlias = "bytes | JSON"
"""What a key holds: bytes, or a JSON-able value."""

MAX_EXACT_INTEGER = 2**53
"""Integral JSON numbers up to this magnitude come back as ``int``."""


def to_proto_value(value: JSON) -> struct_pb2.Value:
    """Return ``value`` as a ``google.protobuf.Value``.

    Raises:
        TypeError: the value (or a part of it) is not JSON-able.
        ValueError: a number is NaN or infinite, which JSON cannot hold.
    """
    if value is None:
        return struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a JSON number")
        return struct_pb2.Value(number_value=value)
    if isinstance(value, str):
        return struct_pb2.Value(string_value=value)
    if isinstance(value, Mapping):
        struct = struct_pb2.Struct()
        for name, item in value.items():
            if not isinstance(name, str):
                raise TypeError(f"JSON object keys must be str, not {type(name).__name__}")
            struct.fields[name].CopyFrom(to_proto_value(item))
        return struct_pb2.Value(struct_value=struct)
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        items = struct_pb2.ListValue(values=[to_proto_value(item) for item in value])
        return struct_pb2.Value(list_value=items)
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def from_proto_value(value: struct_pb2.Value) -> Any:
    """Return the Python value of a ``google.protobuf.Value`` (integral numbers as ``int``)."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if number.is_integer() and abs(number) <= MAX_EXACT_INTEGER:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {name: from_proto_value(item) for name, item in value.struct_value.fields.items()}
    if kind == "list_value":
        return [from_proto_value(item) for item in value.list_value.values]
    return None


def set_value(message: Any, value: Value) -> None:
    """Set the ``json`` or ``binary`` member of the ``value`` oneof of ``message``."""
    if isinstance(value, bytes | bytearray):
        message.binary = bytes(value)
    else:
        message.json.CopyFrom(to_proto_value(value))


def value_of(message: Any) -> Any:
    kind = message.WhichOneof("value")
    if kind == "binary":
        return bytes(message.binary)
    if kind == "json":
        return from_proto_value(message.json)
    return None


def time_of(timestamp: timestamp_pb2.Timestamp) -> datetime:
    return timestamp.ToDatetime(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Entry:
    """The entry of one key: its value and its versions."""

    key: str
    """The key, a UTF-8 path such as ``shared/plan``."""
    value: Any
    """A JSON-able value, or ``bytes``."""
    version: int
    """Per-key version: 1 when created, +1 on every put; restarts at 1 after a delete."""
    create_revision: int
    """Store revision of the put that created the key."""
    mod_revision: int
    """Store revision of the latest put."""
    agent_id: str
    """Agent that wrote last; empty for writes with the admin token."""
    metadata: Mapping[str, str]
    """Free-form metadata written with the value."""
    create_time: datetime
    """Time the key was created."""
    update_time: datetime
    """Time of the latest put."""
    expire_time: datetime | None
    """Time the key is deleted unless written again; None without a TTL."""
    bound_to_session: bool
    """Whether the key is deleted when its writer's session ends."""

    @classmethod
    def from_proto(cls, state: pb.State) -> Entry:
        """Build from the wire form."""
        return cls(
            key=state.key,
            value=value_of(state),
            version=state.version,
            create_revision=state.create_revision,
            mod_revision=state.mod_revision,
            agent_id=state.agent_id,
            metadata=dict(state.metadata),
            create_time=time_of(state.create_time),
            update_time=time_of(state.update_time),
            expire_time=time_of(state.expire_time) if state.HasField("expire_time") else None,
            bound_to_session=state.bound_to_session,
        )


def duration(ttl: float | timedelta) -> duration_pb2.Duration:
    seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else ttl
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def new_request_id() -> str:
    """Return a fresh idempotency key for a write."""
    return str(uuid.uuid4())
