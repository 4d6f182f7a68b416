"""Byte-level fuzz test: raw random and mutated request bytes sent to every method.

The calls go through the channel's generic ``unary_unary``, ``unary_stream`` and
``stream_stream`` with no serializers, so the bytes reach the server exactly as drawn:
real requests (seeded ids and tokens, see ``strategies.py``) encoded and then mutated
(bits flipped, bytes overwritten with varint and tag edge values, runs inserted, deleted,
repeated or cut off, two encodings spliced), or random bytes. Besides what the other fuzz
test asks of every call (no UNKNOWN, INTERNAL, hang or logged error; the server healthy),
a request that does not decode and that the server must read (a unary request with the
admin token, the first message of a stream with a live session) must be answered
INVALID_ARGUMENT with a BadRequest whose field path names a field of the request (or is
empty: the request as a whole).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.conftest import Target, check_call, fuzzing
from tests.fuzz.harness import METHODS, Call, Outcome, method_path, problem
from tests.fuzz.strategies import RequestStrategies, Wire, input_class, weighted
from tests.helpers import resolves

EDGE_BYTES = (0x00, 0x01, 0x02, 0x07, 0x08, 0x0A, 0x12, 0x7F, 0x80, 0xC0, 0xF8, 0xFF)
"""Bytes that mean something on the wire: varint ends and continuations, tags, wire types."""
BYTES_SHARE = 2
"""This test runs the fuzz test's examples per RPC divided by this (most calls end early)."""
CREDENTIALS = ("admin", "admin", "session:0", "session:0", "join", "none")
"""Mostly credentials the methods let in, so the bytes are what is judged."""


def reading_credential(method: MethodDescriptor) -> str:
    """The credential with which ``method`` reads its first request before anything else.

    Every method reads a unary request first with the admin token. A request stream is read
    by its handler, which first checks that the caller is an agent's live session.
    """
    return "session:0" if method.client_streaming else "admin"


@dataclass(frozen=True)
class Mutation:
    """One change to a byte string, at ``at`` (a fraction of its length)."""

    kind: str
    at: float
    data: bytes
    size: int

    def apply(self, original: bytes, other: bytes) -> bytes:
        """Return ``original`` changed; ``other`` is the encoding a splice takes from."""
        where = min(int(self.at * len(original)), len(original))
        before, after = original[:where], original[where:]
        if self.kind == "flip" and after:
            return before + bytes([after[0] ^ (1 << self.size % 8)]) + after[1:]
        if self.kind == "overwrite" and after:
            return before + self.data + after[len(self.data) :]
        if self.kind == "insert":
            return before + self.data + after
        if self.kind == "delete":
            return before + after[self.size :]
        if self.kind == "repeat":
            return before + after[: self.size] * 3 + after
        if self.kind == "cut":
            return before
        if self.kind == "splice":
            return before + other[int(self.at * len(other)) :]
        return original


def mutations() -> st.SearchStrategy[Mutation]:
    """Changes to a request's bytes, of every kind :class:`Mutation` knows."""
    edges = st.lists(st.sampled_from(EDGE_BYTES), min_size=1, max_size=4).map(bytes)
    data = st.one_of(edges, st.binary(min_size=1, max_size=16))
    kinds = st.sampled_from(("flip", "overwrite", "insert", "delete", "repeat", "cut", "splice"))
    return st.builds(Mutation, kinds, st.floats(0, 1), data, st.integers(1, 16))


def request_bytes(
    requests: RequestStrategies, method: MethodDescriptor
) -> st.SearchStrategy[bytes]:
    """Encodings of real-looking requests of ``method``, mutated, and random bytes."""
    tame = requests.tame(method.input_type).map(lambda message: message.SerializeToString())
    mutated = st.builds(
        lambda original, other, changes: _mutate(original, other, changes),
        tame,
        tame,
        st.lists(mutations(), min_size=1, max_size=4),
    )
    return weighted((6, mutated), (1, st.binary(max_size=128)), (1, tame))


def _mutate(original: bytes, other: bytes, changes: list[Mutation]) -> bytes:
    for change in changes:
        original = change.apply(original, other)
    return original


@dataclass(frozen=True)
class ByteCall:
    """A call of raw bytes, and whether the first request does not decode."""

    call: Call
    undecodable_first: bool


def byte_calls(
    requests: RequestStrategies, method: MethodDescriptor
) -> st.SearchStrategy[ByteCall]:
    """Calls of ``method`` with raw request bytes, mostly with the admin token."""
    payloads = request_bytes(requests, method)
    bodies = (
        st.lists(payloads, min_size=1, max_size=3)
        if method.client_streaming
        else payloads.map(lambda payload: [payload])
    )
    parse = input_class(method).FromString

    def build(credential: str, body: list[bytes]) -> ByteCall:
        call = Call(
            method_path(method),
            credential,
            tuple(Wire(raw=payload) for payload in body),
            method.client_streaming,
            method.server_streaming,
        )
        try:
            parse(body[0])
        except DecodeError:
            return ByteCall(call, undecodable_first=True)
        return ByteCall(call, undecodable_first=False)

    return st.builds(build, st.sampled_from(CREDENTIALS), bodies)


def judge(method: MethodDescriptor, byte_call: ByteCall) -> Callable[[Outcome], str | None]:
    """Return the judge of ``byte_call``'s outcome (see the module docstring)."""

    reading = reading_credential(method)

    def bad(outcome: Outcome) -> str | None:
        if (what := problem(outcome)) is not None:
            return what
        if outcome.code == grpc.StatusCode.INVALID_ARGUMENT:
            wrong = [p for p in outcome.violations if not resolves(method.input_type, p)]
            if not outcome.violations or wrong:
                return f"INVALID_ARGUMENT names no field of the request: {outcome.violations}"
        elif byte_call.undecodable_first and outcome.call.credential == reading:
            return f"an undecodable request answered {outcome.code.name}, not INVALID_ARGUMENT"
        return None

    return bad


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.full_name)
def test_no_request_bytes_break_the_server(target: Target, method: MethodDescriptor) -> None:
    @fuzzing(max(1, target.examples // BYTES_SHARE))
    @given(byte_calls(target.requests, method))
    def fuzz(byte_call: ByteCall) -> None:
        check_call(target, byte_call.call, judge(method, byte_call))

    fuzz()
