"""Failures the fuzz test knows about and tolerates until their fixes land.

Each entry is one bullet of issue 9 ("No input ends in INTERNAL or UNKNOWN") that another
branch is fixing. An outcome it matches does not fail the fuzz test; anything else does.
The matchers are narrow on purpose (the exception and where it was raised), so a new kind
of failure on the same RPC still fails the test.

Empty this list as the fixes land: each removal makes the fuzz test check that class
again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc

from tests.fuzz.harness import Outcome


@dataclass(frozen=True)
class Known:
    """One class of failure that is known and not fixed yet."""

    bullet: str
    """The bullet of issue 9 it belongs to."""
    owner: str
    """The branch fixing it."""
    matches: Callable[[Outcome], bool]


def _evidence(outcome: Outcome) -> str:
    return "\n".join((outcome.details, *outcome.logged))


def _failed(outcome: Outcome) -> bool:
    return outcome.code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


def _undecodable(outcome: Outcome) -> bool:
    # grpc.aio decodes the request before any agentcoord code runs: UNKNOWN on unary calls,
    # INTERNAL from the interceptor when a stream's next message does not decode.
    return _failed(outcome) and "google.protobuf.message.DecodeError" in _evidence(outcome)


def _non_finite_json(outcome: Outcome) -> bool:
    text = _evidence(outcome)
    return (
        outcome.code == grpc.StatusCode.INTERNAL
        and "json_format.py" in text
        and "which would parse as string_value" in text
    )


def _out_of_range_time(outcome: Outcome) -> bool:
    text = _evidence(outcome)
    return outcome.code == grpc.StatusCode.INTERNAL and (
        "ValueError: Timestamp is not valid" in text or "ValueError: Duration is not valid" in text
    )


def _garbled_page_token(outcome: Outcome) -> bool:
    text = _evidence(outcome)
    decoding = (
        "int(position)" in text
        or "datetime.fromisoformat(time)" in text
        or "int(revision) if revision.isdigit()" in text
    )
    return outcome.code == grpc.StatusCode.INTERNAL and decoding


KNOWN_UNFIXED: tuple[Known, ...] = (
    Known(
        "Request bytes that do not decode (invalid UTF-8 in a string, a truncated message, "
        "JSON nested 50+ deep), on unary calls and on streams",
        "input",
        _undecodable,
    ),
    Known(
        "NaN or ±Infinity anywhere in a JSON value (PutState, Transact puts and compares, "
        "SubmitTask input, CompleteSubtask result, FailSubtask details)",
        "input",
        _non_finite_json,
    ),
    Known(
        "Out-of-range Timestamp and Duration values in any field (ListEvents "
        "start_time/end_time today)",
        "input",
        _out_of_range_time,
    ),
    Known(
        "Forged or garbled page tokens (ListEvents after, ListStates unicode digits, "
        "ListTasks times)",
        "input",
        _garbled_page_token,
    ),
)
"""Known failure classes, tolerated until the branch named in each lands."""


def known_unfixed(outcome: Outcome) -> Known | None:
    """Return the known class ``outcome`` belongs to, if any."""
    return next((known for known in KNOWN_UNFIXED if known.matches(outcome)), None)
