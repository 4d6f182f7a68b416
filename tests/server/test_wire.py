"""The shared wire forms: times and JSON values built by hand match protobuf's own helpers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from agentcoord.server.convert.wire import set_json_value, set_timestamp, to_timestamp

TIMES = [
    datetime(2026, 12, 3, 6, 24, 41, 123456, tzinfo=UTC),
    datetime(2026, 12, 3, 8, 24, 41, 999999, tzinfo=timezone(timedelta(hours=2))),
    datetime(2026, 12, 3, 6, 24, 41, 5),  # naive: UTC
    datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC),  # before the epoch
    datetime(1970, 1, 1, tzinfo=UTC),
]


@pytest.mark.parametrize("value", TIMES, ids=str)
def test_set_timestamp_matches_from_datetime(value: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value)
    stamp = timestamp_pb2.Timestamp()
    set_timestamp(stamp, value)
    assert (stamp.seconds, stamp.nanos) == (expected.seconds, expected.nanos)
    assert to_timestamp(value) == expected
    assert to_timestamp(None) is None


VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -3,
    2.5,
    1e300,
    "",
    "text ✓",
    [],
    {},
    [1, "a", None, [], {}],
    {"a": {"b": [True, {"c": None}]}, "": 1, "z": []},
]


@pytest.mark.parametrize("value", VALUES, ids=json.dumps)
def test_set_json_value_matches_json_format(value: Any) -> None:
    expected = json_format.Parse(json.dumps(value), struct_pb2.Value())
    target = struct_pb2.Value()
    set_json_value(target, value)
    assert target == expected
    assert target.WhichOneof("kind") == expected.WhichOneof("kind")
