"""Hypothesis strategies for any request message, built from its descriptor alone.

Every field gets a mix of three kinds of values:

- real ones seeded on the server (agent, task and sub-task ids, keys, page tokens,
  fencing tokens, revisions), chosen for fields whose names say they hold one, so that
  requests get past validation into the core and the store;
- plausible ones (short text, small numbers, known enum values, short durations);
- hostile ones: random unicode, over-long text, int64 extremes, unknown enum numbers,
  NaN and infinities in ``Value``/``Struct``, out-of-range ``Timestamp`` and
  ``Duration``, garbled page tokens.

What the Python protobuf API refuses to build (invalid UTF-8, unicode surrogates, JSON
nested past the decoder's depth limit) is written on the wire instead: a :class:`Wire`
request is a message plus raw bytes appended to its encoding (protobuf merges a repeated
field occurrence into the message), or raw bytes on their own.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import duration_pb2, struct_pb2, text_format, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

INT64_EDGES = (0, 1, -1, 2**31 - 1, -(2**31), 2**32, 2**53 + 1, 2**63 - 1, -(2**63))
INT32_EDGES = (0, 1, -1, 2, 1024, 1025, 2**31 - 1, -(2**31))
UNKNOWN_ENUM_NUMBERS = (-1, 7, 99, 2**31 - 1, -(2**31))
MAX_TIMESTAMP_SECONDS = 253402300799  # 9999-12-31T23:59:59Z
MIN_TIMESTAMP_SECONDS = -62135596800  # 0001-01-01T00:00:00Z
MAX_DURATION_SECONDS = 315576000000  # 10,000 years
DEEP_JSON_LEVELS = (40, 64, 120, 400)
"""Nesting depths of the deep JSON arrays written on the wire (upb refuses past ~100)."""
BAD_UTF8 = (
    b"\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",  # a lone surrogate, as 'surrogatepass' encodes U+D800
    b"ok\xed\xbf\xbfok",
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"\xe2\x82",  # truncated sequence
)
HOSTILE_TEXT = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\n",
    "..",
    "a//b",
    "/",
    "²³",
    "١٢٣",
    "\u202e\u0301",
    "\U0001f600",
    "null",
    "-1",
    "9" * 40,
    "' OR 1=1 --",
    "%s%n",
    "a" * 129,
    "a" * 513,
    "x" * 65537,
)


@dataclass(frozen=True)
class Seeds:
    """Real values on the server, by the request field names that hold them."""

    text: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """String pools by field name (``agent_id``, ``key``, ``page_token``, ...)."""
    numbers: Mapping[str, Sequence[int]] = field(default_factory=dict)
    """Integer pools by field name (``fencing_token``, ``start_revision``, ...)."""
    durations: Mapping[str, Sequence[float]] = field(default_factory=dict)
    """Duration pools in seconds by field name (``ttl``, ``wait``, ...)."""
    requests: Mapping[str, Sequence[Message]] = field(default_factory=dict)
    """Whole requests by message name, sent as they are (listings continued with real and
    forged page tokens)."""


@dataclass(frozen=True)
class Wire:
    """One request as sent: ``message`` encoded, then ``suffix``; or ``raw`` alone."""

    message: Message | None = None
    suffix: bytes = b""
    raw: bytes | None = None

    def encode(self) -> bytes:
        """Return the bytes on the wire."""
        if self.raw is not None:
            return self.raw
        assert self.message is not None
        return self.message.SerializeToString() + self.suffix

    def __repr__(self) -> str:
        if self.raw is not None:
            return f"Wire(raw={self.raw[:200]!r}{'...' if len(self.raw) > 200 else ''})"
        assert self.message is not None
        body = text_format.MessageToString(self.message, as_one_line=True, as_utf8=True)
        if len(body) > 600:
            body = body[:600] + f"... ({len(body)} characters)"
        name = self.message.DESCRIPTOR.name
        suffix = f", suffix={self.suffix[:120]!r}" if self.suffix else ""
        return f"Wire({name} {{{body}}}{suffix})"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    """Return one length-delimited field (wire type 2) on the wire."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def deep_json_array(levels: int) -> bytes:
    """Return the encoding of a ``Value`` holding ``[[[...]]]`` nested ``levels`` deep."""
    value = b""  # the innermost Value: null (no kind set)
    for _ in range(levels):
        list_value = length_delimited(1, value)  # ListValue.values
        value = length_delimited(6, list_value)  # Value.list_value
    return value


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Draw from one of ``choices`` in proportion to its weight.

    (``st.one_of`` draws its branches uniformly and merges repeated ones, so repeating a
    strategy does not weigh it.)
    """
    slots = [index for index, (weight, _) in enumerate(choices) for _ in range(weight)]
    return st.sampled_from(slots).flatmap(lambda index: choices[index][1])


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _real_oneof(fd: FieldDescriptor) -> bool:
    oneof = fd.containing_oneof
    return oneof is not None and not (len(oneof.fields) == 1 and oneof.name == f"_{fd.name}")


def text_strategy(max_size: int = 24) -> st.SearchStrategy[str]:
    """Random text without lone surrogates (those go on the wire as bytes)."""
    return st.text(st.characters(exclude_categories=("Cs",)), max_size=max_size)


def json_numbers(*, hostile: bool = True) -> st.SearchStrategy[float]:
    """Numbers for ``Value``; hostile ones include huge, NaN and infinite numbers."""
    if not hostile:
        return st.floats(-1e6, 1e6, allow_nan=False)
    return st.one_of(
        st.sampled_from((0.0, -0.0, 1.0, 1e308, -1e308, 2.0**63, 5e-324)),
        st.sampled_from((math.nan, math.inf, -math.inf)),
        st.floats(allow_nan=True, allow_infinity=True),
    )


def json_documents(*, hostile: bool = True) -> st.SearchStrategy[Any]:
    """JSON-like Python values; hostile ones hold NaN, infinities and odd text."""
    texts = text_strategy() if hostile else st.text("abc xyz", max_size=8)
    leaves = st.one_of(st.none(), st.booleans(), json_numbers(hostile=hostile), texts)
    if hostile:
        leaves = st.one_of(leaves, st.sampled_from(HOSTILE_TEXT))
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(
                text_strategy(8) if hostile else st.text("kv", max_size=4), children, max_size=4
            ),
        ),
        max_leaves=10,
    )


def to_value(document: Any, value: struct_pb2.Value | None = None) -> struct_pb2.Value:
    """Build a ``Value`` from a JSON-like document, keeping NaN and infinities."""
    value = struct_pb2.Value() if value is None else value
    if document is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(document, bool):
        value.bool_value = document
    elif isinstance(document, float | int):
        value.number_value = float(document)
    elif isinstance(document, str):
        value.string_value = document
    elif isinstance(document, list):
        value.list_value.SetInParent()
        for item in document:
            to_value(item, value.list_value.values.add())
    else:
        value.struct_value.SetInParent()
        for key, item in document.items():
            to_value(item, value.struct_value.fields[key])
    return value


def _duration(seconds: int, nanos: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


def _from_seconds(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


HOSTILE_DURATIONS = (
    _duration(-1, 0),
    _duration(0, -1),
    _duration(1, -1),  # mixed signs
    _duration(0, 1_000_000_000),
    _duration(0, 2**31 - 1),
    _duration(MAX_DURATION_SECONDS + 1, 0),
    _duration(2**63 - 1, 999_999_999),
    _duration(-(2**63), 0),
)
HOSTILE_TIMESTAMPS = (
    timestamp_pb2.Timestamp(seconds=MIN_TIMESTAMP_SECONDS - 1),
    timestamp_pb2.Timestamp(seconds=MAX_TIMESTAMP_SECONDS + 1),
    timestamp_pb2.Timestamp(seconds=2**63 - 1),
    timestamp_pb2.Timestamp(seconds=-(2**63)),
    timestamp_pb2.Timestamp(seconds=0, nanos=-1),
    timestamp_pb2.Timestamp(seconds=0, nanos=1_000_000_000),
)


def garbled_page_tokens(real: Sequence[str]) -> st.SearchStrategy[str]:
    """Page tokens that this server did not issue, some of them nearly right."""

    def encoded(payload: str) -> str:
        return base64.urlsafe_b64encode(payload.encode()).decode()

    payloads = st.one_of(
        st.builds(
            lambda after, query: f'{{"after": {after}, "query": {query}}}',
            st.sampled_from(('"x"', '"²"', '"9999999999999999999999"', '"-1"', "1", "null")),
            st.sampled_from(("{}", "[]", "null", '{"prefix": ""}')),
        ),
        st.builds(lambda after: f'{{"after": "{after}", "query": {{}}}}', text_strategy()),
        text_strategy(40),
    )
    flipped = [token[:-2] + "A=" for token in real if len(token) > 3]
    choices = [
        st.builds(encoded, payloads),
        text_strategy(40),
        st.sampled_from(["!!!", "====", "e30=", *flipped]),
    ]
    if forged := forged_page_tokens(real):
        choices.append(st.sampled_from(forged))
    return st.one_of(choices)


FORGED_POSITIONS: tuple[object, ...] = (
    "x",
    "²",
    "9" * 30,
    "-1",
    "",
    "|",
    "2026-13-40|x",
    "2026-01-01T00:00:00",
    "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+01:00",
    "a@²",
    -1,
    0,
    2**31,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    1.5,
    True,
    None,
    [],
)
"""Values written into real page tokens, in place of one element of their position."""


def forged_page_tokens(real: Sequence[str]) -> list[str]:
    """Return real page tokens with one element of their position replaced by a hostile one."""
    forged = []
    for original in real:
        payload = _payload(original)
        position = payload.get("p") if payload else None
        if not isinstance(position, list):
            continue
        for index in range(len(position)):
            for value in FORGED_POSITIONS:
                changed = [*position[:index], value, *position[index + 1 :]]
                raw = json.dumps({**payload, "p": changed}).encode()
                forged.append(base64.urlsafe_b64encode(raw).decode().rstrip("="))
    return forged


def _payload(token: str) -> dict[str, Any]:
    """Return the JSON object inside a page token, or an empty dict."""
    try:
        payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


class RequestStrategies:
    """Strategies for the request messages of RPCs, biased towards seeded values.

    A tame instance (``hostile=False``) draws only seeded and plausible values, so its
    requests mostly pass validation and reach the core and the store; a hostile one mixes
    in everything listed in the module docstring.
    """

    def __init__(self, seeds: Seeds, *, hostile: bool = True, max_depth: int = 4) -> None:
        """Draw real values from ``seeds``; nest messages at most ``max_depth`` deep."""
        self._seeds = seeds
        self._hostile = hostile
        self._max_depth = max_depth
        self._cache: dict[tuple[str, int], st.SearchStrategy[Message]] = {}
        self._tame = self if not hostile else RequestStrategies(seeds, hostile=False)
        self._unseeded = self if not seeds.text else RequestStrategies(Seeds(), hostile=hostile)

    # Scalars

    def _string(self, name: str) -> st.SearchStrategy[str]:
        plausible = st.text("abcdefgh0123456789", min_size=1, max_size=12)
        pool = self._seeds.text.get(name)
        if not self._hostile:
            return weighted((4, st.sampled_from(list(pool))), (1, plausible)) if pool else plausible
        choices = [
            st.sampled_from(HOSTILE_TEXT),
            text_strategy(),
            st.text("abcdefgh-._:/0123456789", min_size=1, max_size=12),
        ]
        if name == "page_token":
            choices.append(garbled_page_tokens(pool or ()))
        if not pool:
            return st.one_of(choices)
        # Mostly real, so that calls get past validation.
        return weighted((3, st.sampled_from(list(pool))), (2, st.one_of(choices)))

    def _integer(self, fd: FieldDescriptor) -> st.SearchStrategy[int]:
        wide = fd.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64)
        edges = INT64_EDGES if wide else INT32_EDGES
        low, high = (-(2**63), 2**63 - 1) if wide else (-(2**31), 2**31 - 1)
        pool = [n for n in self._seeds.numbers.get(fd.name, ()) if low <= n <= high]
        if not self._hostile:
            return (
                weighted((3, st.sampled_from(pool)), (1, st.integers(0, 5)))
                if pool
                else st.integers(0, 5)
            )
        choices: list[st.SearchStrategy[int]] = [
            st.integers(-3, 12),
            st.sampled_from(edges),
            st.integers(low, high),
        ]
        if not pool:
            return st.one_of(choices)
        return weighted((2, st.sampled_from(pool)), (1, st.one_of(choices)))

    def _enum(self, fd: FieldDescriptor) -> st.SearchStrategy[int]:
        known = [value.number for value in fd.enum_type.values]
        if not self._hostile:  # UNSPECIFIED is refused where a value is required
            return st.sampled_from([number for number in known if number] or known)
        return weighted((3, st.sampled_from(known)), (1, st.sampled_from(UNKNOWN_ENUM_NUMBERS)))

    def _bytes(self) -> st.SearchStrategy[bytes]:
        if not self._hostile:
            return st.binary(max_size=48)
        return st.one_of(
            st.binary(max_size=48), st.sampled_from((b"", b"\x00" * 1025, b"x" * (1 << 16)))
        )

    def _scalar(self, fd: FieldDescriptor) -> st.SearchStrategy[Any]:
        kind = fd.type
        if kind == FieldDescriptor.TYPE_STRING:
            return self._string(fd.name)
        if kind == FieldDescriptor.TYPE_BYTES:
            return self._bytes()
        if kind == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if kind == FieldDescriptor.TYPE_ENUM:
            return self._enum(fd)
        if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return json_numbers(hostile=self._hostile)
        return self._integer(fd)

    # Well-known types

    def _duration(self, name: str) -> st.SearchStrategy[duration_pb2.Duration]:
        plausible = st.builds(_from_seconds, st.sampled_from((0.0, 0.05, 0.2, 1.0, 2.5)))
        hostile = st.sampled_from(HOSTILE_DURATIONS)
        pool = self._seeds.durations.get(name)
        if not self._hostile:
            return st.builds(_from_seconds, st.sampled_from(list(pool))) if pool else plausible
        if pool is None:
            # Large but valid durations only where no pool bounds how long a call may wait.
            large = st.builds(_from_seconds, st.sampled_from((60.0, 61.0, 31 * 86400.0)))
            return weighted((2, plausible), (1, hostile), (1, large))
        real = st.builds(_from_seconds, st.sampled_from(list(pool)))
        return weighted((3, real), (1, plausible), (1, hostile))

    def _timestamp(self) -> st.SearchStrategy[timestamp_pb2.Timestamp]:
        valid = st.builds(
            lambda seconds, nanos: timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos),
            st.integers(MIN_TIMESTAMP_SECONDS, MAX_TIMESTAMP_SECONDS),
            st.integers(0, 999_999_999),
        )
        recent = st.builds(
            lambda seconds: timestamp_pb2.Timestamp(seconds=seconds),
            st.integers(1_700_000_000, 1_900_000_000),
        )
        if not self._hostile:
            return recent
        return st.one_of(recent, valid, st.sampled_from(HOSTILE_TIMESTAMPS))

    # Messages

    def message(self, descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
        """Return a strategy for messages of ``descriptor``."""
        key = (descriptor.full_name, depth)
        if key not in self._cache:
            self._cache[key] = self._build(descriptor, depth)
        return self._cache[key]

    def _build(self, descriptor: Descriptor, depth: int) -> st.SearchStrategy[Message]:
        name = descriptor.full_name
        if name == "google.protobuf.Value":
            return st.builds(to_value, json_documents(hostile=self._hostile))
        if name == "google.protobuf.Struct":
            return st.builds(
                lambda doc: to_value(doc).struct_value,
                st.dictionaries(
                    text_strategy(8), json_documents(hostile=self._hostile), max_size=4
                ),
            )
        if name == "google.protobuf.Duration":
            return self._duration("")
        if name == "google.protobuf.Timestamp":
            return self._timestamp()
        cls = GetMessageClass(descriptor)
        if depth >= self._max_depth:
            return st.just(cls())
        setters: list[st.SearchStrategy[Callable[[Message], None]]] = []
        oneofs: dict[str, list[FieldDescriptor]] = {}
        for fd in descriptor.fields:
            if _real_oneof(fd):
                oneofs.setdefault(fd.containing_oneof.name, []).append(fd)
            else:
                setters.append(self._optional_setter(fd, depth))
        for members in oneofs.values():
            setters.append(
                st.one_of(
                    st.just(_no_op),
                    *(self._setter(fd, depth) for fd in members),
                )
                if self._hostile
                else st.one_of(*(self._setter(fd, depth) for fd in members))
            )
        return st.builds(_assemble, st.just(cls), st.tuples(*setters))

    def _optional_setter(
        self, fd: FieldDescriptor, depth: int
    ) -> st.SearchStrategy[Callable[[Message], None]]:
        # Tame messages set most fields (required ones are often left out otherwise);
        # hostile ones few, so that one bad value is often alone and gets deep.
        # (Hypothesis leans towards the first choice, so it is the setter for tame ones.)
        if self._hostile:
            return weighted((3, st.just(_no_op)), (1, self._setter(fd, depth)))
        return weighted((3, self._setter(fd, depth)), (1, st.just(_no_op)))

    def _field_value(self, fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        if fd.message_type is None:
            return self._scalar(fd)
        if fd.message_type.full_name == "google.protobuf.Duration":
            return self._duration(fd.name)
        return self.message(fd.message_type, depth + 1)

    def _setter(
        self, fd: FieldDescriptor, depth: int
    ) -> st.SearchStrategy[Callable[[Message], None]]:
        if _is_map(fd):
            key_fd = fd.message_type.fields_by_name["key"]
            value_fd = fd.message_type.fields_by_name["value"]
            entries = st.dictionaries(
                self._field_value(key_fd, depth),
                self._field_value(value_fd, depth),
                max_size=3,
            )
            return st.builds(lambda items: _set_map(fd, items), entries)
        if fd.is_repeated and not self._hostile:
            items = st.lists(self._field_value(fd, depth), max_size=3)
            return st.builds(lambda values: _extend(fd, values), items)
        if fd.is_repeated:
            many = st.one_of(
                st.lists(self._field_value(fd, depth), max_size=3),
                st.builds(
                    _repeat, self._field_value(fd, depth), st.sampled_from((33, 65, 129, 1025))
                ),
            )
            return st.builds(lambda items: _extend(fd, items), many)
        return st.builds(lambda value: _set(fd, value), self._field_value(fd, depth))

    def tame(self, descriptor: Descriptor) -> st.SearchStrategy[Message]:
        """Messages of seeded and plausible values only, and the seeded whole requests."""
        messages = self._tame.message(descriptor)
        if whole := self._seeds.requests.get(descriptor.name):
            return st.one_of(messages, st.sampled_from(list(whole)))
        return messages

    def mutated(self, descriptor: Descriptor) -> st.SearchStrategy[Message]:
        """Tame messages with one field, at any depth, set to an unseeded hostile value.

        One bad value among good ones gets past the checks of the other fields, so it is
        the value that reaches the deepest code.
        """
        mutation = self._mutation(descriptor, 0, self._unseeded)
        return st.builds(_mutate, self._tame.message(descriptor), mutation)

    def single(self, descriptor: Descriptor) -> st.SearchStrategy[Message]:
        """Empty messages but for one field, at any depth (a forged page token alone, ...)."""
        empty = GetMessageClass(descriptor)()
        return st.builds(_mutate, st.just(empty), self._mutation(descriptor, 0, self))

    def _mutation(
        self, descriptor: Descriptor, depth: int, source: RequestStrategies
    ) -> st.SearchStrategy[Callable[[Message], None]]:
        options = []
        for fd in descriptor.fields:
            options.append(source._setter(fd, depth))
            nested = fd.message_type
            if (
                nested is not None
                and not fd.is_repeated
                and depth < 3
                and not nested.full_name.startswith("google.protobuf.")
            ):
                inner = self._mutation(nested, depth + 1, source)
                options.append(st.builds(_inside, st.just(fd), inner))
        return st.one_of(options) if options else st.just(_no_op)

    # Wire-level requests

    def wire(self, descriptor: Descriptor) -> st.SearchStrategy[Wire]:
        """Return a strategy for requests of ``descriptor`` as sent on the wire.

        A third are tame messages, a quarter tame messages with one field made hostile,
        and the rest messages with a single field set, hostile messages, raw bytes,
        truncated encodings, and encodings with an invalid UTF-8 string or deeply nested
        JSON appended.
        """
        messages = self.message(descriptor)
        paths = _paths(descriptor)
        suffixes: list[st.SearchStrategy[bytes]] = []
        string_paths = [path for path, leaf in paths if leaf.type == FieldDescriptor.TYPE_STRING]
        value_paths = [
            path
            for path, leaf in paths
            if leaf.message_type is not None
            and leaf.message_type.full_name == "google.protobuf.Value"
        ]
        if string_paths:
            suffixes.append(
                st.builds(_wrap, st.sampled_from(string_paths), st.sampled_from(BAD_UTF8))
            )
        if value_paths:
            suffixes.append(
                st.builds(
                    _wrap,
                    st.sampled_from(value_paths),
                    st.builds(deep_json_array, st.sampled_from(DEEP_JSON_LEVELS)),
                )
            )
        choices: list[tuple[int, st.SearchStrategy[Wire]]] = [
            (8, st.builds(Wire, self._tame.message(descriptor))),
            (6, st.builds(Wire, self.mutated(descriptor))),
            (3, st.builds(Wire, self.single(descriptor))),
            (3, st.builds(Wire, messages)),
            (1, st.builds(lambda raw: Wire(raw=raw), st.binary(max_size=96))),
            (
                1,
                st.builds(
                    lambda message, cut: Wire(raw=message.SerializeToString()[:cut]),
                    messages,
                    st.integers(1, 64),
                ),
            ),
        ]
        if suffixes:
            choices.append((2, st.builds(Wire, messages, st.one_of(suffixes))))
        if whole := self._seeds.requests.get(descriptor.name):
            choices.append((4, st.builds(Wire, st.sampled_from(list(whole)))))
        return weighted(*choices)


def _paths(descriptor: Descriptor, depth: int = 0) -> list[tuple[tuple[int, ...], FieldDescriptor]]:
    """Field-number paths to every string and Value field (map keys and values included)."""
    found: list[tuple[tuple[int, ...], FieldDescriptor]] = []
    for fd in descriptor.fields:
        if fd.type == FieldDescriptor.TYPE_STRING:
            found.append(((fd.number,), fd))
        elif fd.message_type is not None:
            if fd.message_type.full_name == "google.protobuf.Value":
                found.append(((fd.number,), fd))
            elif depth < 3 and not fd.message_type.full_name.startswith("google.protobuf."):
                for path, leaf in _paths(fd.message_type, depth + 1):
                    found.append(((fd.number, *path), leaf))
    return found


def _wrap(path: tuple[int, ...], payload: bytes) -> bytes:
    """Return ``payload`` as the length-delimited field at ``path``, wrapped outwards."""
    for number in reversed(path):
        payload = length_delimited(number, payload)
    return payload


MAX_REPEATED_BYTES = 1 << 20
"""Bound on one over-long repeated field, so a request stays under the message limit."""


def _repeat(item: Any, count: int) -> list[Any]:
    size = item.ByteSize() if isinstance(item, Message) else len(str(item))
    return [item] * max(1, min(count, MAX_REPEATED_BYTES // max(size, 1)))


def _mutate(message: Message, mutation: Callable[[Message], None]) -> Message:
    copy = type(message)()
    copy.CopyFrom(message)
    mutation(copy)
    return copy


def _inside(fd: FieldDescriptor, mutation: Callable[[Message], None]) -> Callable[[Message], None]:
    def apply(message: Message) -> None:
        mutation(getattr(message, fd.name))

    return apply


def _no_op(message: Message) -> None:
    pass


def _assemble(cls: type[Message], setters: Sequence[Callable[[Message], None]]) -> Message:
    message = cls()
    for setter in setters:
        setter(message)
    return message


def _set(fd: FieldDescriptor, value: Any) -> Callable[[Message], None]:
    def apply(message: Message) -> None:
        if isinstance(value, Message):
            getattr(message, fd.name).CopyFrom(value)
        else:
            setattr(message, fd.name, value)

    return apply


def _extend(fd: FieldDescriptor, items: Sequence[Any]) -> Callable[[Message], None]:
    def apply(message: Message) -> None:
        container = getattr(message, fd.name)
        for item in items:
            if isinstance(item, Message):
                container.add().CopyFrom(item)
            else:
                container.append(item)

    return apply


def _set_map(fd: FieldDescriptor, items: Mapping[Any, Any]) -> Callable[[Message], None]:
    def apply(message: Message) -> None:
        container = getattr(message, fd.name)
        for key, item in items.items():
            if isinstance(item, Message):
                container[key].CopyFrom(item)
            else:
                container[key] = item

    return apply


def input_class(method: MethodDescriptor) -> type[Message]:
    """Return the request message class of ``method``."""
    return GetMessageClass(method.input_type)
