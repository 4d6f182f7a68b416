"""Typed StateSync client: entries, compare-and-set, retried read-modify-write, resuming watches.

Reach it as ``client.state`` on an :class:`~agentcoord.client.AgentcoordClient`. Values are
JSON-able Python values or ``bytes`` (:mod:`agentcoord.client._wire`); errors are the typed
:class:`~agentcoord.client.RPCError` subclasses of :mod:`agentcoord.client._errors`.
"""

from __future__ import annotations

import builtins
import contextlib
import contextvars
import enum
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeAlias, TypedDict, Unpack

import grpc
from google.protobuf import struct_pb2

from agentcoord.client._errors import (
    NotFoundError,
    OutOfRangeError,
    RPCError,
    entry_in,
    typed_error,
    typed_errors,
)
from agentcoord.client._retry import RETRYABLE_CODES, RetryPolicy
from agentcoord.client._streams import RESUMABLE_CODES, is_resumable, open_stream
from agentcoord.client._wire import (
    JSON,
    Entry,
    Value,
    duration,
    new_request_id,
    set_value,
    time_of,
    to_proto_value,
)
from agentcoord.statesync.v1 import statesync_service_pb2 as pb

if TYPE_CHECKING:
    from agentcoord.client._client import AgentcoordClient, StateSyncClient


# --- entries and changes ------------------------------------------------------------------------


class ChangeType(enum.Enum):
    """What happened to a key."""

    PUT = pb.StateChange.TYPE_PUT
    """Created or overwritten."""
    DELETE = pb.StateChange.TYPE_DELETE
    """Deleted by ``delete`` or ``transact``."""
    EXPIRE = pb.StateChange.TYPE_EXPIRE
    """Deleted because its TTL ran out or its writer's session ended."""


@dataclass(frozen=True, slots=True)
class Change:
    """One change of one key, as :meth:`StateClient.watch` yields it."""

    revision: int
    """Store revision of the change."""
    type: ChangeType
    """What happened."""
    key: str
    """The key that changed."""
    entry: Entry | None
    """The entry after the change; None unless ``type`` is PUT."""
    previous: Entry | None
    """The entry before the change, when the watch asked for it and the key existed."""
    agent_id: str
    """Agent that made the change; empty for expiries and admin writes."""
    change_time: datetime
    """Time the change was committed."""

    @classmethod
    def from_proto(cls, change: pb.StateChange) -> Change:
        """Build from the wire form."""
        return cls(
            revision=change.revision,
            type=ChangeType(change.type),
            key=change.key,
            entry=Entry.from_proto(change.state) if change.HasField("state") else None,
            previous=Entry.from_proto(change.previous) if change.HasField("previous") else None,
            agent_id=change.agent_id,
            change_time=time_of(change.change_time),
        )


# --- writes -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fencing:
    """Proof that a write is made under a current lease of a Distribution sub-task."""

    subtask_id: str
    """The leased sub-task."""
    fencing_token: int
    """The fencing token of the writer's lease."""


@dataclass(frozen=True, slots=True)
class VersionIs:
    """Transaction compare: the key's version equals ``version`` (0: the key must not exist)."""

    key: str
    """Key to test."""
    version: int
    """Expected version."""


@dataclass(frozen=True, slots=True)
class Exists:
    """Transaction compare: the key exists (or, with ``exists=False``, does not)."""

    key: str
    """Key to test."""
    exists: bool = True
    """Whether the key must exist."""


@dataclass(frozen=True, slots=True)
class ValueIs:
    """Transaction compare: the key holds this value (JSON compared ignoring key order)."""

    key: str
    """Key to test."""
    value: Value
    """Expected value."""


Compare: TypeAlias = VersionIs | Exists | ValueIs
"""A condition of a transaction."""


@dataclass(frozen=True, slots=True)
class Put:
    """Transaction operation: write a key."""

    key: str
    """Key to write."""
    value: Value
    """Value to write."""
    metadata: Mapping[str, str] = field(default_factory=dict)
    """Metadata stored with the value (replaces the previous metadata)."""
    ttl: float | timedelta | None = None
    """Delete the key after this long unless written again (at least 1 s)."""
    bind_to_session: bool = False
    """Delete the key when the writer's session ends."""


@dataclass(frozen=True, slots=True)
class Delete:
    """Transaction operation: delete a key (a missing key is a no-op)."""

    key: str
    """Key to delete."""


@dataclass(frozen=True, slots=True)
class Increment:
    """Modification: add ``by`` to the JSON number ``key`` holds (a missing key counts as 0)."""

    key: str
    """Key to change."""
    by: float = 1
    """Number to add (negative to subtract); finite."""


@dataclass(frozen=True, slots=True)
class Append:
    """Modification: append ``items`` to the JSON array ``key`` holds (missing: [])."""

    key: str
    """Key to change."""
    items: Sequence[JSON]
    """Items to append, in order."""

    def __post_init__(self) -> None:
        """Refuse a lone string, which would be taken for a sequence of characters."""
        _check_items(self.items, "items")


@dataclass(frozen=True, slots=True)
class AddToSet:
    """Modification: append each of ``members`` the JSON array ``key`` holds not yet."""

    key: str
    """Key to change; a missing key counts as []."""
    members: Sequence[JSON]
    """Members to add; compared as JSON (key order ignored, ``1`` is not ``True``)."""

    def __post_init__(self) -> None:
        """Refuse a lone string, which would be taken for a sequence of characters."""
        _check_items(self.members, "members")


@dataclass(frozen=True, slots=True)
class RemoveFromSet:
    """Modification: remove every item equal to one of ``members`` from the array ``key`` holds."""

    key: str
    """Key to change; a missing key counts as []."""
    members: Sequence[JSON]
    """Members to remove; compared as JSON."""

    def __post_init__(self) -> None:
        """Refuse a lone string, which would be taken for a sequence of characters."""
        _check_items(self.members, "members")


@dataclass(frozen=True, slots=True)
class MergePatch:
    """Modification: merge ``patch`` into the JSON value ``key`` holds (RFC 7396).

    Object members are merged recursively, a ``None`` member removes the member, and
    anything else replaces the value; a missing key counts as null.
    """

    key: str
    """Key to change."""
    patch: JSON
    """The merge patch."""


Modification: TypeAlias = Increment | Append | AddToSet | RemoveFromSet | MergePatch
"""A change the server computes from the value it holds, so concurrent writers never conflict."""

Operation: TypeAlias = Put | Delete | Modification
"""A write of a transaction."""


@dataclass(frozen=True, slots=True)
class TransactResult:
    """What a transaction did."""

    revision: int
    """Store revision of the transaction's last change."""
    entries: tuple[Entry | None, ...]
    """Per operation, in order: the entry written by a put, None for a delete."""
    deleted: tuple[str, ...]
    """Keys that existed and were deleted."""


def _fill_put(message: Any, put: Put) -> None:
    """Fill the fields PutStateRequest and PutOperation share."""
    message.key = put.key
    set_value(message, put.value)
    message.metadata.update(put.metadata)
    if put.ttl is not None:
        message.ttl.CopyFrom(duration(put.ttl))
    message.bind_to_session = put.bind_to_session


_current_fencing: contextvars.ContextVar[Fencing | None] = contextvars.ContextVar(
    "agentcoord_fencing", default=None
)


@contextlib.contextmanager
def fenced(fencing: Fencing | None) -> Iterator[None]:
    """Make StateClient writes in this context carry ``fencing`` unless they give their own.

    An :class:`~agentcoord.client.Agent` runs each handler under the fencing of its sub-task,
    so a worker whose lease has moved on cannot overwrite the new holder's state. Tasks
    started inside the context inherit it; ``fenced(None)`` turns fencing off again.
    """
    token = _current_fencing.set(fencing)
    try:
        yield
    finally:
        _current_fencing.reset(token)


def _fencing(fencing: Fencing | None) -> pb.Fencing | None:
    """Return the wire form of ``fencing``, or of the context's (see :func:`fenced`)."""
    if fencing is None:
        fencing = _current_fencing.get()
        if fencing is None:
            return None
    return pb.Fencing(subtask_id=fencing.subtask_id, fencing_token=fencing.fencing_token)


def _compare(compare: Compare) -> pb.Compare:
    if isinstance(compare, VersionIs):
        return pb.Compare(key=compare.key, version=compare.version)
    if isinstance(compare, Exists):
        return pb.Compare(key=compare.key, exists=compare.exists)
    message = pb.Compare(key=compare.key)
    set_value(message, compare.value)
    return message


def _check_items(values: Sequence[JSON], name: str) -> None:
    if isinstance(values, str | bytes | bytearray):
        raise TypeError(f"{name} must be a sequence of JSON values, not {type(values).__name__}")


def _items(values: Sequence[JSON]) -> struct_pb2.ListValue:
    return struct_pb2.ListValue(values=[to_proto_value(value) for value in values])


def _modification(modification: Modification) -> pb.Modification:
    """Return the wire form of a modification (the key travels beside it)."""
    if isinstance(modification, Increment):
        return pb.Modification(increment=modification.by)
    if isinstance(modification, Append):
        return pb.Modification(append=_items(modification.items))
    if isinstance(modification, AddToSet):
        return pb.Modification(add_to_set=_items(modification.members))
    if isinstance(modification, RemoveFromSet):
        return pb.Modification(remove_from_set=_items(modification.members))
    return pb.Modification(merge_patch=to_proto_value(modification.patch))


def _operation(operation: Operation) -> pb.Operation:
    if isinstance(operation, Delete):
        return pb.Operation(delete=pb.DeleteOperation(key=operation.key))
    if isinstance(operation, Put):
        message = pb.Operation()
        _fill_put(message.put, operation)
        return message
    modify = pb.ModifyOperation(key=operation.key, modification=_modification(operation))
    return pb.Operation(modify=modify)


class WriteOptions(TypedDict, total=False):
    """Keyword options of :meth:`StateClient.modify` and its shorthands."""

    fencing: Fencing | None
    """Write only under this sub-task lease; by default the context's (:func:`fenced`)."""
    request_id: str | None
    """Idempotency key; a fresh one by default."""


# --- retries ------------------------------------------------------------------------------------

UPDATE_CODES = frozenset({grpc.StatusCode.ABORTED, *RETRYABLE_CODES})
"""Codes :meth:`StateClient.update` retries: conflicts and outages."""


@dataclass(frozen=True, slots=True)
class UpdatePolicy(RetryPolicy):
    """Back-off of :meth:`StateClient.update`: short pauses, since conflicts clear fast."""

    max_attempts: int = 64
    """Attempts in all, the first included."""
    max_delay: float = 30.0
    """Seconds after which no further attempt starts."""
    initial_backoff: float = 0.002
    """Seconds before the first retry (before jitter); doubles on every retry."""
    max_backoff: float = 0.25
    """Longest pause between two attempts."""
    jitter: float = 0.01
    """Random extra pause, up to this many seconds, so colliding writers spread out."""


@dataclass(slots=True)
class UpdateStats:
    """Counters of :meth:`StateClient.update` calls, for tuning and benchmarks."""

    committed: int = 0
    """Updates that committed."""
    conflicts: int = 0
    """Attempts refused with ABORTED (each is re-read and retried)."""
    unavailable: int = 0
    """Attempts that failed with UNAVAILABLE (the same write is sent again)."""

    @property
    def retries(self) -> int:
        """Attempts that were retried."""
        return self.conflicts + self.unavailable


CONFLICT = frozenset({grpc.StatusCode.ABORTED})
"""The code whose first occurrence :meth:`StateClient.update` retries at once."""


class _Unread:
    """The key's entry is not known: read it."""


_UNREAD = _Unread()


def _retry_from(error: RPCError) -> Entry | _Unread | None:
    """Return what the next attempt of an update starts from after ``error``.

    A conflict names the key's current version and carries its entry: the attempt starts
    from it (None when the key does not exist). Anything else, or a conflict without the
    entry, makes the attempt read the key.
    """
    if error.code != grpc.StatusCode.ABORTED:
        return _UNREAD
    if error.metadata.get("current_version") == "0":
        return None
    entry = entry_in(error)
    return entry if entry is not None else _UNREAD


# --- the client ---------------------------------------------------------------------------------


class StateClient:
    """Typed StateSync operations; ``client.state`` of an AgentcoordClient.

    Writes carry a fresh request id, so the client's retry of a write after UNAVAILABLE is
    not applied twice. Errors are :class:`RPCError` subclasses such as
    :class:`ConflictError` (with ``current_version``).
    """

    def __init__(self, raw: StateSyncClient, client: AgentcoordClient) -> None:
        """Wrap the raw per-RPC client ``raw`` of ``client``."""
        self._raw = raw
        self._client = client
        self.update_policy = UpdatePolicy()
        """Retry policy of :meth:`update` when a call gives none."""
        self.stats = UpdateStats()
        """Counters of :meth:`update`."""

    async def get(self, key: str) -> Entry | None:
        """Return the entry of ``key``, or None if it does not exist."""
        try:
            with typed_errors():
                response = await self._raw.get_state(pb.GetStateRequest(key=key))
        except NotFoundError:
            return None
        return Entry.from_proto(response.state)

    async def put(
        self,
        key: str,
        value: Value,
        *,
        expected_version: int | None = None,
        metadata: Mapping[str, str] | None = None,
        ttl: float | timedelta | None = None,
        bind_to_session: bool = False,
        fencing: Fencing | None = None,
        request_id: str | None = None,
    ) -> Entry:
        """Write ``key`` and return the entry as written.

        Args:
            key: Key to write.
            value: JSON-able value or bytes.
            expected_version: Write only at this version; 0: only if the key does not exist.
            metadata: Metadata stored with the value (replaces the previous metadata).
            ttl: Delete the key after this long (seconds or timedelta) unless written again.
            bind_to_session: Delete the key when this agent's session ends.
            fencing: Write only under this sub-task lease; by default the context's
                (:func:`fenced`), which is the handled sub-task's inside an agent's handler.
            request_id: Idempotency key; a fresh one by default.

        Raises:
            ConflictError: ``expected_version`` does not match.
            FailedPreconditionError: the fencing token is stale or no lease is held.
        """
        request = self._put_request(
            Put(key, value, metadata or {}, ttl, bind_to_session),
            expected_version=expected_version,
            fencing=fencing,
            request_id=request_id,
        )
        with typed_errors():
            response = await self._raw.put_state(request)
        return Entry.from_proto(response.state)

    async def delete(
        self,
        key: str,
        *,
        expected_version: int | None = None,
        allow_missing: bool = False,
        fencing: Fencing | None = None,
        request_id: str | None = None,
    ) -> Entry | None:
        """Delete ``key``; return its entry as it was (None if it was missing).

        Raises:
            NotFoundError: the key does not exist and ``allow_missing`` is False.
            ConflictError: ``expected_version`` does not match.
        """
        request = pb.DeleteStateRequest(
            key=key,
            expected_version=expected_version,
            allow_missing=allow_missing,
            fencing=_fencing(fencing),
            request_id=request_id or new_request_id(),
        )
        with typed_errors():
            response = await self._raw.delete_state(request)
        return Entry.from_proto(response.previous) if response.HasField("previous") else None

    async def modify(
        self,
        modification: Modification,
        *,
        fencing: Fencing | None = None,
        request_id: str | None = None,
    ) -> Entry:
        """Change a key by ``modification``, computed by the server; return the entry as written.

        Concurrent modifications of one key never conflict and none is lost: each is applied
        to the value stored when it commits. The entry keeps its metadata and TTL.

        Args:
            modification: :class:`Increment`, :class:`Append`, :class:`AddToSet`,
                :class:`RemoveFromSet` or :class:`MergePatch`.
            fencing: Write only under this sub-task lease; by default the context's
                (:func:`fenced`).
            request_id: Idempotency key; a fresh one by default.

        Raises:
            FailedPreconditionError: the key holds a value of another type (reason
                ``VALUE_TYPE_MISMATCH``), or the result would be too large
                (``VALUE_TOO_LARGE``).
        """
        request = pb.ModifyStateRequest(
            key=modification.key,
            modification=_modification(modification),
            fencing=_fencing(fencing),
            request_id=request_id or new_request_id(),
        )
        with typed_errors():
            response = await self._raw.modify_state(request)
        return Entry.from_proto(response.state)

    async def increment(self, key: str, by: float = 1, **options: Unpack[WriteOptions]) -> Entry:
        """Add ``by`` to the number ``key`` holds (0 if missing); see :meth:`modify`."""
        return await self.modify(Increment(key, by), **options)

    async def append(self, key: str, *items: JSON, **options: Unpack[WriteOptions]) -> Entry:
        """Append ``items`` to the array ``key`` holds; see :meth:`modify`."""
        return await self.modify(Append(key, items), **options)

    async def add_to_set(self, key: str, *members: JSON, **options: Unpack[WriteOptions]) -> Entry:
        """Add the ``members`` the array ``key`` holds not yet; see :meth:`modify`."""
        return await self.modify(AddToSet(key, members), **options)

    async def remove_from_set(
        self, key: str, *members: JSON, **options: Unpack[WriteOptions]
    ) -> Entry:
        """Remove ``members`` from the array ``key`` holds; see :meth:`modify`."""
        return await self.modify(RemoveFromSet(key, members), **options)

    async def merge(self, key: str, patch: JSON, **options: Unpack[WriteOptions]) -> Entry:
        """Merge ``patch`` into the value of ``key`` (RFC 7396); see :meth:`modify`."""
        return await self.modify(MergePatch(key, patch), **options)

    async def transact(
        self,
        compares: Sequence[Compare],
        operations: Sequence[Operation],
        *,
        fencing: Fencing | None = None,
        request_id: str | None = None,
    ) -> TransactResult:
        """Apply ``operations`` all or none, if every compare holds.

        Raises:
            ConflictError: a compare failed (``failed_compare`` names it); nothing was written.
        """
        request = pb.TransactRequest(
            compares=[_compare(compare) for compare in compares],
            operations=[_operation(operation) for operation in operations],
            fencing=_fencing(fencing),
            request_id=request_id or new_request_id(),
        )
        with typed_errors():
            response = await self._raw.transact(request)
        entries = tuple(
            Entry.from_proto(r.state) if r.HasField("state") else None for r in response.results
        )
        deleted = tuple(
            op.key for op, r in zip(operations, response.results, strict=True) if r.deleted
        )
        return TransactResult(response.revision, entries, deleted)

    async def list(
        self, prefix: str = "", *, live_agents_only: bool = False
    ) -> builtins.list[Entry]:
        """Return every entry whose key starts with ``prefix``, in key order, at one revision.

        Follows the pages; if the keys change between pages, lists again once.

        Args:
            prefix: Key prefix; end it with ``/`` for a folder.
            live_agents_only: Under ``agents/``, only keys of agents live in Discovery.

        Raises:
            OutOfRangeError: the keys changed between pages twice in a row.
        """
        request = pb.ListStatesRequest(prefix=prefix, live_agents_only=live_agents_only)
        return [Entry.from_proto(state) for state in await self._list_states(request)]

    async def _list_states(self, request: pb.ListStatesRequest) -> builtins.list[pb.State]:
        try:
            return await self._list_pages(request)
        except OutOfRangeError:  # the keys changed between pages: list once more
            return await self._list_pages(request)

    async def _list_pages(self, request: pb.ListStatesRequest) -> builtins.list[pb.State]:
        page = pb.ListStatesRequest()
        page.CopyFrom(request)
        states: builtins.list[pb.State] = []
        while True:
            with typed_errors():
                response = await self._raw.list_states(page)
            states.extend(response.states)
            if not response.next_page_token:
                return states
            page.page_token = response.next_page_token

    async def watch(
        self,
        prefix: str = "",
        *,
        start_revision: int = 0,
        include_previous: bool = False,
        retry: RetryPolicy | None = None,
    ) -> AsyncGenerator[Change, None]:
        """Yield every change of the keys under ``prefix``, in revision order, exactly once.

        After UNAVAILABLE or CANCELLED (a restart, a lost connection) or RESOURCE_EXHAUSTED
        (a slow watcher cut off) the watch reconnects by itself from the last revision it
        reached.
        Close the generator (``aclose``, or ``contextlib.aclosing``) to end the watch.

        Args:
            prefix: Key prefix; empty for every key.
            start_revision: Replay the changes after this revision first; 0: from now on.
            include_previous: Fill ``Change.previous``.
            retry: Back-off while reconnecting; the client's policy by default. Each
                outage gets the policy's attempts anew.

        Raises:
            OutOfRangeError: the revision to resume from is compacted; list again and
                watch from the listing's revision.
            UnavailableError: the server stayed unreachable for the whole policy.
            ResourceExhaustedError: a message was too large for the channel.
        """
        policy = retry or self._client.retry
        last = start_revision
        while True:
            request = pb.WatchStatesRequest(
                prefix=prefix, start_revision=last, include_previous=include_previous
            )
            stream: AsyncGenerator[pb.WatchStatesResponse, None] = await policy.retrying(
                RESUMABLE_CODES
            )(self._open_watch, request)
            opened_at = last
            try:
                async for response in stream:
                    for change in response.changes:
                        if change.revision > last:  # never repeat a change
                            yield Change.from_proto(change)
                    last = max(last, response.revision)
            except RPCError as error:
                if not is_resumable(error, progressed=last > opened_at):
                    raise typed_error(error) from None
            finally:
                await stream.aclose()

    async def _open_watch(
        self, request: pb.WatchStatesRequest
    ) -> AsyncGenerator[pb.WatchStatesResponse, None]:
        return await open_stream(lambda: self._raw.watch_states(request))

    async def update(
        self,
        key: str,
        fn: Callable[[Any], Value],
        *,
        default: Value = None,
        metadata: Mapping[str, str] | None = None,
        fencing: Fencing | None = None,
        policy: UpdatePolicy | None = None,
    ) -> Entry:
        """Read ``key``, write ``fn(value)`` if nobody wrote in between, and retry until it does.

        Each attempt calls ``fn`` with the key's value (``default`` when the key is missing)
        and writes the result at the version it came from. The first attempt reads the key;
        a conflict (ABORTED) carries the key's current entry, so the next attempt starts from
        it with no read, and with a fresh request id: at once after the first conflict,
        after the policy's back-off after later ones. UNAVAILABLE sends the same write again
        with the same request id, so a write whose first attempt committed is not applied
        twice. For a commutative change (a counter, a set) :meth:`modify` needs no retry.

        Args:
            key: Key to update.
            fn: Computes the new value from the current one; may be called several times.
            default: Value passed to ``fn`` when the key does not exist.
            metadata: Metadata stored with the new value.
            fencing: Write only under this sub-task lease; by default the context's
                (:func:`fenced`).
            policy: Back-off and bounds; ``self.update_policy`` by default.

        Raises:
            ConflictError: still conflicting when the policy's attempts or time ran out.
            UnavailableError: still unreachable when the policy's attempts or time ran out.
        """
        request: pb.PutStateRequest | None = None
        current: Entry | _Unread | None = _UNREAD
        retrying = (policy or self.update_policy).retrying(UPDATE_CODES, at_once=CONFLICT)
        async for attempt in retrying:
            with attempt, typed_errors():
                try:
                    if request is None:
                        if isinstance(current, _Unread):
                            current = await self._get_once(key)
                        value = fn(current.value if current is not None else default)
                        expected = current.version if current is not None else 0
                        put = Put(key, value, metadata or {})
                        request = self._put_request(put, expected, fencing, None)
                    response = await self._raw._unary(
                        "PutState", request, pb.PutStateResponse, idempotent=False
                    )
                except RPCError as error:
                    if error.code == grpc.StatusCode.UNAVAILABLE:
                        self.stats.unavailable += 1
                        raise  # retried: the same write, with the same request id
                    if error.code == grpc.StatusCode.ABORTED:
                        self.stats.conflicts += 1
                    current = _retry_from(error)
                    request = None  # recompute on the next attempt
                    raise
        self.stats.committed += 1
        return Entry.from_proto(response.state)

    async def _get_once(self, key: str) -> Entry | None:
        try:
            response = await self._raw._unary(
                "GetState", pb.GetStateRequest(key=key), pb.GetStateResponse, idempotent=False
            )
        except RPCError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return Entry.from_proto(response.state)

    @staticmethod
    def _put_request(
        put: Put,
        expected_version: int | None,
        fencing: Fencing | None,
        request_id: str | None,
    ) -> pb.PutStateRequest:
        request = pb.PutStateRequest(
            expected_version=expected_version,
            fencing=_fencing(fencing),
            request_id=request_id or new_request_id(),
        )
        _fill_put(request, put)
        return request

    # --- an agent's own keys (parity with the prototype) --------------------------------------

    def own_key(self, name: str) -> str:
        """Return ``agents/<own id>/<name>``, a key only this agent (or the admin) may write.

        Raises:
            ValueError: the client has no agent id (register first, or pass ``agent_id``).
        """
        if not self._client.agent_id:
            raise ValueError("no agent id: register, or pass agent_id to AgentcoordClient")
        return f"agents/{self._client.agent_id}/{name}"

    async def list_own(self) -> builtins.list[Entry]:
        """Return this agent's own entries (``agents/<own id>/``)."""
        return await self.list(self.own_key(""))

    async def list_agent_states(self, *, live_only: bool = False) -> builtins.list[Entry]:
        """Return every agent's entries (``agents/``), or only live agents' ones."""
        return await self.list("agents/", live_agents_only=live_only)

    async def clear_own(self, *, chunk_size: int = 128) -> int:
        """Delete every key under ``agents/<own id>/``; return how many were deleted.

        Deletes in transactions of at most ``chunk_size`` keys (the server's default limit).
        """
        request = pb.ListStatesRequest(prefix=self.own_key(""), keys_only=True)
        keys = [state.key for state in await self._list_states(request)]
        deleted = 0
        for start in range(0, len(keys), chunk_size):
            chunk = keys[start : start + chunk_size]
            deleted += len((await self.transact([], [Delete(key) for key in chunk])).deleted)
        return deleted
