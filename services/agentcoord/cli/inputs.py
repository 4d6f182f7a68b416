"""Reading what a command is given: text from a file or standard input, and JSON."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import TypeVar

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from agentcoord.cli.exits import CliError

STDIN = "-"
"""The file name that means standard input."""

M = TypeVar("M", bound=Message)


def read_text(path: str) -> str:
    """Return the text of the file ``path``, or of standard input for ``-``.

    Raises:
        CliError: the file cannot be read.
    """
    if path == STDIN:
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CliError(f"cannot read {path}: {error}") from None


def parse_value(text: str, what: str) -> struct_pb2.Value:
    """Parse JSON text into a ``google.protobuf.Value``.

    Raises:
        CliError: the text is not JSON, or holds NaN, Infinity or a number beyond a
            double's range (``what`` names the argument in the message).
    """
    _refuse_non_finite(text, what)
    try:
        return json_format.Parse(text, struct_pb2.Value())
    except (json_format.ParseError, RecursionError):
        raise CliError(f"{what} is not JSON (quote a string: '\"text\"'): {text[:80]!r}") from None


def parse_message(text: str, message_type: type[M], what: str) -> M:
    """Parse a message from its proto JSON form.

    Raises:
        CliError: the text is not JSON of that message, or holds a non-finite number
            (``what`` names the argument).
    """
    _refuse_non_finite(text, what)
    try:
        return json_format.Parse(text, message_type())
    except RecursionError:
        raise CliError(f"{what}: nests too deep") from None
    except json_format.ParseError as error:
        raise CliError(
            f"{what}: not valid JSON of {message_type.DESCRIPTOR.name}: {error}"
        ) from None


def _refuse_non_finite(text: str, what: str) -> None:
    """Refuse NaN, Infinity and numbers a double cannot hold: the server would refuse them."""

    def refuse(literal: str) -> float:
        raise CliError(f"{what}: {literal[:40]} is not a finite JSON number")

    def finite(literal: str) -> float:
        try:
            number = float(literal)
        except OverflowError:  # an integer literal beyond a double
            return refuse(literal)
        return number if math.isfinite(number) else refuse(literal)

    with contextlib.suppress(ValueError, RecursionError):  # not JSON: the next parser says so
        json.loads(text, parse_constant=refuse, parse_float=finite, parse_int=finite)
