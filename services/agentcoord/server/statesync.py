"""StateSyncService handlers: validate, call the core, translate."""

from __future__ import annotations

import functools
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import grpc

from agentcoord.core.errors import InvalidInput, NotFound
from agentcoord.core.models import (
    ChangeFilter,
    Compare,
    DeleteCommand,
    Fencing,
    ModificationKind,
    ModifyCommand,
    PutCommand,
    StateValue,
    StateWriteResult,
    ValueKind,
)
from agentcoord.core.statesync import PutRequest, StateSync, Writer
from agentcoord.server import page_tokens, validation
from agentcoord.server.auth import Access, current_identity
from agentcoord.server.convert import statesync as convert
from agentcoord.server.convert import wire
from agentcoord.server.sizes import budget, fitting, revision_chunks
from agentcoord.server.streams import ChangeProtos, StreamTracker
from agentcoord.statesync.v1 import statesync_service_pb2 as pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]

SERVICE = pb.DESCRIPTOR.services_by_name["StateSyncService"]
"""Descriptor of the service."""

ACCESS = {
    "GetState": Access.READ,
    "ListStates": Access.READ,
    "ListEvents": Access.READ,
    "PutState": Access.AGENT,
    "DeleteState": Access.AGENT,
    "ModifyState": Access.AGENT,
    "Transact": Access.AGENT,
    "WatchStates": Access.READ,
    "WatchEvents": Access.READ,
}
"""Access each RPC needs."""

RESULT_OVERHEAD = 256
"""Bytes a Transact result adds to the operation it answers, at most (the state's
revisions, times and writer)."""
MAX_REQUEST_ID = 128
"""Longest request id."""
MIN_TTL = 1.0
"""Shortest key TTL, seconds."""
MAX_TTL = 30 * 24 * 3600.0
"""Longest key TTL, seconds."""


class StateSyncServicer(pb_grpc.StateSyncServiceServicer):
    """Serves ``agentcoord.statesync.v1.StateSyncService``."""

    def __init__(
        self, core: StateSync, streams: StreamTracker, max_message_bytes: int, max_value_bytes: int
    ) -> None:
        """Serve ``core``; ``streams`` ends long streams at shutdown.

        Responses carrying many values are cut or split by size to stay under
        ``max_message_bytes`` (:mod:`agentcoord.server.sizes`); values are at most
        ``max_value_bytes``.
        """
        self._core = core
        self._streams = streams
        self._max_bytes = budget(max_message_bytes)
        self._max_message_bytes = max_message_bytes
        self._max_value_bytes = max_value_bytes
        self._events = ChangeProtos(convert.event_to_proto)
        self._state_changes = {
            previous: ChangeProtos(
                functools.partial(convert.state_change_to_proto, include_previous=previous)
            )
            for previous in (False, True)
        }

    async def GetState(self, request: pb.GetStateRequest, context: Context) -> pb.GetStateResponse:
        """Return one key's entry."""
        key = validation.state_key("key", request.key)
        entry, revision = await self._core.get(key)
        if entry is None:
            raise NotFound(f"key: {key!r} does not exist", reason="STATE_NOT_FOUND")
        response = pb.GetStateResponse(revision=revision)
        convert.fill_state(response.state, entry)
        return response

    async def ListStates(
        self, request: pb.ListStatesRequest, context: Context
    ) -> pb.ListStatesResponse:
        """List entries under a prefix, one page, consistent at one revision."""
        prefix = validation.state_key("prefix", request.prefix, prefix=True)
        fingerprint = {"prefix": prefix, "live": request.live_agents_only}
        position = page_tokens.decode(
            request.page_token,
            "ListStates",
            fingerprint,
            page_tokens.state_key,
            page_tokens.revision,
        )
        after_key, at_revision = position or ("", 0)
        entries, next_key, revision_read = await self._core.list_states(
            prefix,
            after_key=after_key,
            at_revision=at_revision,
            limit=validation.page_size("page_size", request.page_size),
            live_agents_only=request.live_agents_only,
        )
        states = [convert.state_to_proto(e, keys_only=request.keys_only) for e in entries]
        count = fitting(states, self._max_bytes)
        if count < len(states):
            states, next_key = states[:count], states[count - 1].key
        token = ""
        if next_key:
            token = page_tokens.encode("ListStates", fingerprint, next_key, revision_read)
        return pb.ListStatesResponse(
            states=states,
            next_page_token=token,
            revision=revision_read,
        )

    async def ListEvents(
        self, request: pb.ListEventsRequest, context: Context
    ) -> pb.ListEventsResponse:
        """List the change log, oldest first, one page."""
        where = replace(
            _change_filter(request),
            start_time=_time(request, "start_time"),
            end_time=_time(request, "end_time"),
        )
        start = _start_revision(request.start_revision)
        fingerprint = {"filter": repr(where), "start": request.start_revision}
        position = page_tokens.decode(
            request.page_token, "ListEvents", fingerprint, page_tokens.revision
        )
        changes, last = await self._core.list_events(
            where,
            after_revision=position[0] if position else start,
            limit=validation.page_size("page_size", request.page_size),
        )
        events = [convert.event_to_proto(change) for change in changes]
        count = fitting(events, self._max_bytes)
        if count < len(events):
            events, last = events[:count], events[count - 1].revision
        return pb.ListEventsResponse(
            events=events,
            next_page_token=page_tokens.encode("ListEvents", fingerprint, last) if last else "",
        )

    async def PutState(self, request: pb.PutStateRequest, context: Context) -> pb.PutStateResponse:
        """Write one key."""
        writer = _writer(request.agent_id)
        key = validation.state_key("key", request.key)
        compares = _expected_version(request, key)
        put = _put_request("", request, key, self._max_value_bytes)
        result = await self._core.write(
            writer,
            compares,
            [put],
            fencing=_fencing(request),
            request_id=_request_id(request.request_id),
        )
        state = result.results[0].state
        assert state is not None
        response = pb.PutStateResponse(revision=result.revision)
        convert.fill_state(response.state, state)
        return response

    async def DeleteState(
        self, request: pb.DeleteStateRequest, context: Context
    ) -> pb.DeleteStateResponse:
        """Delete one key."""
        writer = _writer(request.agent_id)
        key = validation.state_key("key", request.key)
        compares = _expected_version(request, key)
        result = await self._core.write(
            writer,
            compares,
            [DeleteCommand(key, allow_missing=request.allow_missing)],
            fencing=_fencing(request),
            request_id=_request_id(request.request_id),
        )
        previous = result.results[0].previous
        return pb.DeleteStateResponse(
            revision=result.revision,
            previous=convert.state_to_proto(previous) if previous is not None else None,
        )

    async def ModifyState(
        self, request: pb.ModifyStateRequest, context: Context
    ) -> pb.ModifyStateResponse:
        """Change one key's value in place."""
        writer = _writer(request.agent_id)
        command = self._modify_command("", request)
        result = await self._core.write(
            writer,
            [],
            [command],
            fencing=_fencing(request),
            request_id=_request_id(request.request_id),
        )
        state = result.results[0].state
        assert state is not None
        response = pb.ModifyStateResponse(revision=result.revision)
        convert.fill_state(response.state, state)
        return response

    def _modify_command(
        self, field_prefix: str, message: pb.ModifyStateRequest | pb.ModifyOperation
    ) -> ModifyCommand:
        """Return the command of a modification (checked before its key)."""
        field = f"{field_prefix}modification"
        modification = message.modification
        kind = modification.WhichOneof("kind")
        if kind is None:
            raise InvalidInput(
                field, "set increment, append, add_to_set, remove_from_set or merge_patch"
            )
        field = f"{field}.{kind}"
        if modification.ByteSize() > self._max_value_bytes:
            raise InvalidInput(
                field,
                f"is {modification.ByteSize()} bytes; at most {self._max_value_bytes}",
            )
        operand: Any
        if kind == "increment":
            operand = modification.increment
            if not math.isfinite(operand):
                raise InvalidInput(field, "must be a finite number")
        elif kind == "merge_patch":
            if modification.merge_patch.WhichOneof("kind") is None:
                raise InvalidInput(field, "is an empty Value; set one of its kinds")
            operand = wire.json_plain(field, modification.merge_patch)
        else:
            operand = wire.json_items(field, getattr(modification, kind))
        key = validation.state_key(f"{field_prefix}key", message.key)
        return ModifyCommand(key, ModificationKind(kind), operand, self._max_value_bytes, field)

    async def Transact(self, request: pb.TransactRequest, context: Context) -> pb.TransactResponse:
        """Apply several puts, deletes and modifications all or none."""
        writer = _writer(request.agent_id)
        if not request.operations:
            raise InvalidInput("operations", "at least one operation is required")
        response_bytes = request.ByteSize() + RESULT_OVERHEAD * len(request.operations)
        if response_bytes > self._max_message_bytes:
            raise InvalidInput(
                "operations",
                f"the response would be about {response_bytes} bytes, more than the max "
                f"message size {self._max_message_bytes}: split the transaction",
            )
        compares = [
            _compare(f"compares[{i}]", c, self._max_value_bytes)
            for i, c in enumerate(request.compares)
        ]
        operations: list[PutRequest | DeleteCommand | ModifyCommand] = []
        fields = []
        for index, operation in enumerate(request.operations):
            kind = operation.WhichOneof("operation")
            field = f"operations[{index}].{kind}"
            if kind == "put":
                key = validation.state_key(f"{field}.key", operation.put.key)
                operations.append(
                    _put_request(f"{field}.", operation.put, key, self._max_value_bytes)
                )
            elif kind == "delete":
                key = validation.state_key(f"{field}.key", operation.delete.key)
                operations.append(DeleteCommand(key, allow_missing=True))
            elif kind == "modify":
                operations.append(self._modify_command(f"{field}.", operation.modify))
            else:
                raise InvalidInput(f"operations[{index}]", "set put, delete or modify")
            fields.append(field)
        result = await self._core.write(
            writer,
            compares,
            operations,
            fencing=_fencing(request),
            request_id=_request_id(request.request_id),
            fields=fields,
        )
        return pb.TransactResponse(revision=result.revision, results=_results(result))

    async def WatchStates(
        self, request: pb.WatchStatesRequest, context: Context
    ) -> AsyncIterator[pb.WatchStatesResponse]:
        """Stream the changes of keys under a prefix."""
        prefix = validation.state_key("prefix", request.prefix, prefix=True)
        start = _start_revision(request.start_revision)
        validation.duration("progress_interval", request.progress_interval)  # reserved
        with self._streams.track():
            to_proto = self._state_changes[request.include_previous]
            async for batch in self._core.watch_states(prefix, start):
                changes = [to_proto(change) for change in batch.changes]
                for chunk, revision in revision_chunks(changes, batch.revision, self._max_bytes):
                    yield pb.WatchStatesResponse(changes=chunk, revision=revision)

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Context
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        """Stream the change log."""
        where = _change_filter(request)
        start = _start_revision(request.start_revision)
        validation.duration("progress_interval", request.progress_interval)  # reserved
        with self._streams.track():
            async for batch in self._core.watch(start, where):
                events = [self._events(change) for change in batch.changes]
                for chunk, revision in revision_chunks(events, batch.revision, self._max_bytes):
                    yield pb.WatchEventsResponse(events=chunk, revision=revision)


def _writer(agent_id: str) -> Writer:
    identity = current_identity()
    if identity.admin:
        if agent_id:
            raise InvalidInput("agent_id", "must be empty when writing with the admin token")
        return Writer(admin=True)
    session = identity.session
    assert session is not None  # Access.AGENT guarantees a session or the admin
    session.check_acts_as(agent_id)
    return Writer(agent_id=session.agent_id, epoch=session.epoch)


def _expected_version(
    request: pb.PutStateRequest | pb.DeleteStateRequest, key: str
) -> list[Compare]:
    """The compare a single-key write's ``expected_version`` asks for, if set."""
    if not request.HasField("expected_version"):
        return []
    version = _version("expected_version", request)
    return [Compare(key, version=version, field="expected_version")]


def _version(field: str, request: Any) -> int:
    version = int(request.expected_version)
    if version < 0:
        raise InvalidInput(field, "must not be negative (0 means the key must not exist)")
    return version


def _request_id(value: str) -> str:
    return validation.text("request_id", value, max_length=MAX_REQUEST_ID)


def _fencing(request: Any) -> Fencing | None:
    if not request.HasField("fencing"):
        return None
    fencing = request.fencing
    validation.text("fencing.subtask_id", fencing.subtask_id, max_length=128, required=True)
    if fencing.fencing_token <= 0:
        raise InvalidInput("fencing.fencing_token", "must be positive")
    return Fencing(fencing.subtask_id, fencing.fencing_token)


def _value(field_prefix: str, message: Any, max_bytes: int, oneof: str = "value") -> StateValue:
    kind = message.WhichOneof(oneof)
    if kind == "json":
        if message.json.WhichOneof("kind") is None:
            raise InvalidInput(f"{field_prefix}json", "is an empty Value; set one of its kinds")
        value = StateValue(ValueKind.JSON, wire.json_text(f"{field_prefix}json", message.json))
        size = max(len(value.data), message.json.ByteSize())  # as JSON and as protobuf
    elif kind == "binary":
        value = StateValue(ValueKind.BINARY, bytes(message.binary))
        size = len(value.data)
    else:
        raise InvalidInput(f"{field_prefix}json", "is required: set json or binary")
    if size > max_bytes:
        raise InvalidInput(f"{field_prefix}{kind}", f"is {size} bytes; at most {max_bytes}")
    return value


def _put_request(field_prefix: str, message: Any, key: str, max_bytes: int) -> PutRequest:
    metadata: Mapping[str, str] = validation.labels(f"{field_prefix}metadata", message.metadata)
    ttl = validation.duration(f"{field_prefix}ttl", message.ttl)
    if ttl and not MIN_TTL <= ttl <= MAX_TTL:
        raise InvalidInput(f"{field_prefix}ttl", "must be between 1 s and 30 days (0: no TTL)")
    if ttl and message.bind_to_session:
        raise InvalidInput(f"{field_prefix}bind_to_session", "cannot be combined with ttl")
    return PutRequest(
        PutCommand(key, _value(field_prefix, message, max_bytes), metadata),
        ttl=ttl,
        bind_to_session=message.bind_to_session,
    )


def _compare(field: str, compare: pb.Compare, max_bytes: int) -> Compare:
    key = validation.state_key(f"{field}.key", compare.key)
    target = compare.WhichOneof("target")
    if target == "version":
        if compare.version < 0:
            raise InvalidInput(f"{field}.version", "must not be negative")
        return Compare(key, version=compare.version)
    if target == "exists":
        return Compare(key, exists=compare.exists)
    if target in ("json", "binary"):
        return Compare(key, value=_value(f"{field}.", compare, max_bytes, "target"))
    raise InvalidInput(field, "set version, exists, json or binary")


def _results(result: StateWriteResult) -> Sequence[pb.OperationResult]:
    return [
        pb.OperationResult(
            state=convert.state_to_proto(r.state) if r.state is not None else None,
            deleted=r.state is None and r.previous is not None,
        )
        for r in result.results
    ]


def _start_revision(value: int) -> int:
    if value < 0:
        raise InvalidInput("start_revision", "must not be negative")
    return value


def _change_filter(request: Any) -> ChangeFilter:
    service = None
    if request.service:
        service = convert.SERVICE_FROM_PROTO.get(request.service)
        if service is None:
            raise InvalidInput("service", f"{request.service} is not a known service")
    if request.agent_id:
        validation.matching("agent_id", request.agent_id, validation.AGENT_ID, "agent id")
    validation.text("kind", request.kind, max_length=128)
    validation.text("subject", request.subject, max_length=validation.MAX_KEY_BYTES)
    return ChangeFilter(
        service=service,
        kind=request.kind,
        subject=request.subject,
        agent_id=request.agent_id,
    )


def _time(request: Any, field: str) -> datetime | None:
    if not request.HasField(field):
        return None
    return validation.timestamp(field, getattr(request, field))
