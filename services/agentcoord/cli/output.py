"""How the CLI prints: aligned tables and field lists for people, proto JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC
from typing import Any, Protocol, TextIO

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

NONE = "-"
"""What an empty cell shows."""


class Output:
    """Where a command prints, and whether it prints JSON (``--json``) or text."""

    def __init__(self, *, json_mode: bool, stream: TextIO | None = None) -> None:
        """Print to ``stream`` (standard output by default), as JSON if ``json_mode``."""
        self.json = json_mode
        self.stream = stream or sys.stdout

    @property
    def is_terminal(self) -> bool:
        """Whether the output goes to a terminal (which can be redrawn)."""
        return self.stream.isatty()

    def document(self, data: Message | Mapping[str, Any]) -> None:
        """Print one JSON document (a message in the proto JSON mapping)."""
        self.line(json.dumps(to_json(data), indent=2, ensure_ascii=False))

    def json_line(self, data: Message | Mapping[str, Any]) -> None:
        """Print one JSON value on one line (JSON lines, for streams)."""
        self.line(compact(to_json(data)))

    def line(self, text: str = "") -> None:
        """Print one line and flush it, so watchers see it at once."""
        self.stream.write(text + "\n")
        self.stream.flush()

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
        """Print rows under headers, columns aligned, the last one unpadded."""
        lines = [list(headers), *(list(row) for row in rows)]
        widths = [max(len(line[column]) for line in lines) for column in range(len(headers))]
        for line in lines:
            cells = [cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=False)]
            self.line("  ".join([*cells, line[-1]]).rstrip())

    def fields(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Print ``name  value`` lines, values aligned."""
        width = max(len(name) for name, _ in pairs)
        for name, value in pairs:
            self.line(f"{name.ljust(width)}  {value}")


MAX_EXACT_INTEGER = 2**53
"""Integral JSON numbers up to this magnitude print without a fraction."""


def to_json(data: Message | Mapping[str, Any]) -> Any:
    """Return a message in the proto JSON mapping (fields without presence included).

    JSON values hold doubles; integral ones print as integers (``3``, not ``3.0``).
    """
    if isinstance(data, Message):
        data = json_format.MessageToDict(data, always_print_fields_with_no_presence=True)
    return _integral(data)


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_EXACT_INTEGER:
        return int(value)
    if isinstance(value, Mapping):
        return {name: _integral(item) for name, item in value.items()}
    if isinstance(value, list):
        return [_integral(item) for item in value]
    return value


def compact(value: Any) -> str:
    """Return ``value`` as JSON on one line, object keys sorted."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def json_value(value: struct_pb2.Value) -> str:
    """Return a ``google.protobuf.Value`` as JSON on one line."""
    return compact(to_json(value))


class EnumType(Protocol):
    """A generated enum (its values' names by number)."""

    def Name(self, number: Any) -> str:
        """Return the name of the value ``number``."""
        ...


def label(enum: EnumType, value: int) -> str:
    """Return an enum value's name without its prefix, in lower case (``STATE_LIVE``: ``live``)."""
    return enum.Name(value).partition("_")[2].lower()


def when(timestamp: timestamp_pb2.Timestamp) -> str:
    """Return a timestamp in local time to the second; ``-`` when unset."""
    if not (timestamp.seconds or timestamp.nanos):
        return NONE
    return timestamp.ToDatetime(tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def clock(timestamp: timestamp_pb2.Timestamp) -> str:
    """Return the local time of day of a timestamp, to the millisecond."""
    return timestamp.ToDatetime(tzinfo=UTC).astimezone().strftime("%H:%M:%S.%f")[:-3]


def seconds(duration: duration_pb2.Duration) -> str:
    """Return a duration in seconds, such as ``2.5s``."""
    return f"{duration.ToNanoseconds() / 1e9:g}s"


def listing(items: Iterable[str]) -> str:
    """Return items separated by commas; ``-`` when there are none."""
    return ",".join(items) or NONE


def shorten(text: str, width: int = 60) -> str:
    """Return ``text`` on one line, cut to ``width`` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
