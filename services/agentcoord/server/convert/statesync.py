"""StateSync's proto ⇄ core translation: entries, events and state changes."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import struct_pb2

from agentcoord.core.models import (
    Change,
    Service,
    StateChangeType,
    StateEntry,
    StateValue,
    ValueKind,
)
from agentcoord.core.state_rules import entry_from_snapshot
from agentcoord.server.convert.wire import set_json_value, set_timestamp, to_timestamp
from agentcoord.statesync.v1 import statesync_service_pb2 as statesync_pb

SERVICE_TO_PROTO = {
    Service.DISCOVERY: statesync_pb.SERVICE_DISCOVERY,
    Service.DISTRIBUTION: statesync_pb.SERVICE_DISTRIBUTION,
    Service.STATESYNC: statesync_pb.SERVICE_STATESYNC,
}
SERVICE_FROM_PROTO = {value: key for key, value in SERVICE_TO_PROTO.items()}

STATE_CHANGE_TYPE_TO_PROTO = {
    StateChangeType.PUT: statesync_pb.StateChange.TYPE_PUT,
    StateChangeType.DELETE: statesync_pb.StateChange.TYPE_DELETE,
    StateChangeType.EXPIRE: statesync_pb.StateChange.TYPE_EXPIRE,
}


def state_value_to_proto(value: StateValue, into: Any) -> None:
    """Set the ``json`` or ``binary`` member of the ``value`` oneof of ``into``."""
    if value.kind is ValueKind.JSON:
        set_json_value(into.json, json.loads(value.data))
    else:
        into.binary = value.data


def state_to_proto(entry: StateEntry, *, keys_only: bool = False) -> statesync_pb.State:
    """Return the wire form of a state entry."""
    state = statesync_pb.State()
    fill_state(state, entry, keys_only=keys_only)
    return state


def fill_state(state: statesync_pb.State, entry: StateEntry, *, keys_only: bool = False) -> None:
    """Set the empty ``state`` (say, a response's field) to the wire form of ``entry``.

    Filling the response's own field saves building a State and copying it in.
    """
    state.key = entry.key
    if entry.metadata:
        state.metadata.update(entry.metadata)
    state.version = entry.version
    state.create_revision = entry.create_revision
    state.mod_revision = entry.mod_revision
    state.agent_id = entry.agent_id
    set_timestamp(state.create_time, entry.create_time)
    set_timestamp(state.update_time, entry.update_time)
    if entry.expire_time is not None:
        set_timestamp(state.expire_time, entry.expire_time)
    state.bound_to_session = entry.bound_to_session
    if not keys_only:
        state_value_to_proto(entry.value, state)


def event_to_proto(change: Change) -> statesync_pb.Event:
    """Return the wire form of a change log entry."""
    details = struct_pb2.Struct()
    details.update(dict(change.details))
    return statesync_pb.Event(
        revision=change.revision,
        event_time=to_timestamp(change.time),
        agent_id=change.agent_id,
        service=SERVICE_TO_PROTO[change.service],
        kind=change.kind,
        subject=change.subject,
        details=details,
    )


def state_change_to_proto(change: Change, *, include_previous: bool) -> statesync_pb.StateChange:
    """Return the wire form of a StateSync change log entry."""
    state = change.details.get("state")
    previous = change.details.get("previous")
    return statesync_pb.StateChange(
        revision=change.revision,
        type=STATE_CHANGE_TYPE_TO_PROTO[StateChangeType(change.kind.removeprefix("state."))],
        key=change.subject,
        state=state_to_proto(entry_from_snapshot(state)) if state else None,
        previous=(
            state_to_proto(entry_from_snapshot(previous)) if previous and include_previous else None
        ),
        agent_id=change.agent_id,
        change_time=to_timestamp(change.time),
    )
