"""Proto ⇄ core translation: the only place both worlds meet."""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from agentcoord.core.discovery import AgentEvent, AgentView, HeartbeatAck, HeartbeatCommand
from agentcoord.core.errors import InvalidInput
from agentcoord.core.models import (
    Agent,
    AgentEventKind,
    AgentState,
    AgentStatus,
    Change,
    Service,
    Skill,
    StateChangeType,
    StateEntry,
    StateValue,
    ValueKind,
)
from agentcoord.core.state_rules import canonical_json, entry_from_snapshot
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.statesync.v1 import statesync_service_pb2 as statesync_pb

AGENT_STATE_TO_PROTO = {
    AgentState.LIVE: discovery_pb.Agent.STATE_LIVE,
    AgentState.LEFT: discovery_pb.Agent.STATE_LEFT,
    AgentState.EXPIRED: discovery_pb.Agent.STATE_EXPIRED,
}
AGENT_STATE_FROM_PROTO = {value: key for key, value in AGENT_STATE_TO_PROTO.items()}

AGENT_STATUS_TO_PROTO = {
    AgentStatus.UNSPECIFIED: discovery_pb.Agent.STATUS_UNSPECIFIED,
    AgentStatus.READY: discovery_pb.Agent.STATUS_READY,
    AgentStatus.BUSY: discovery_pb.Agent.STATUS_BUSY,
    AgentStatus.DRAINING: discovery_pb.Agent.STATUS_DRAINING,
}
AGENT_STATUS_FROM_PROTO = {value: key for key, value in AGENT_STATUS_TO_PROTO.items()}

AGENT_EVENT_KIND_TO_PROTO = {
    AgentEventKind.JOINED: discovery_pb.AgentEvent.KIND_JOINED,
    AgentEventKind.UPDATED: discovery_pb.AgentEvent.KIND_UPDATED,
    AgentEventKind.LEFT: discovery_pb.AgentEvent.KIND_LEFT,
    AgentEventKind.EXPIRED: discovery_pb.AgentEvent.KIND_EXPIRED,
}

HEARTBEAT_COMMAND_TO_PROTO = {
    HeartbeatCommand.NONE: discovery_pb.HeartbeatResponse.COMMAND_UNSPECIFIED,
    HeartbeatCommand.REREGISTER: discovery_pb.HeartbeatResponse.COMMAND_REREGISTER,
    HeartbeatCommand.DRAIN: discovery_pb.HeartbeatResponse.COMMAND_DRAIN,
}


def seconds_to_duration(seconds: float) -> duration_pb2.Duration:
    """Return a Duration for ``seconds`` (non-negative)."""
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(max(seconds, 0.0) * 1e9))
    return value


def to_timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """Return a Timestamp, or None for None."""
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def agent_to_proto(agent: Agent, ttl_remaining: float = 0.0) -> discovery_pb.Agent:
    """Return the wire form of an agent."""
    return discovery_pb.Agent(
        agent_id=agent.agent_id,
        name=agent.name,
        role=agent.role,
        capabilities=agent.capabilities,
        capacity=agent.capacity,
        labels=agent.labels,
        skills=[skill_to_proto(skill) for skill in agent.skills],
        state=AGENT_STATE_TO_PROTO[agent.state],
        epoch=agent.epoch,
        heartbeat_interval=seconds_to_duration(agent.heartbeat_interval),
        ttl=seconds_to_duration(agent.ttl),
        load=discovery_pb.Load(
            active_subtasks=agent.active_subtasks, held_subtask_ids=agent.held_subtask_ids
        ),
        status=AGENT_STATUS_TO_PROTO[agent.status],
        register_time=to_timestamp(agent.register_time),
        last_heartbeat_time=to_timestamp(agent.last_heartbeat_time),
        ttl_remaining=seconds_to_duration(ttl_remaining),
        revision=agent.revision,
        description=agent.card.description,
        version=agent.card.version,
        provider=(
            discovery_pb.Provider(
                organization=agent.card.provider_organization, url=agent.card.provider_url
            )
            if agent.card.provider_organization
            else None
        ),
        a2a_url=agent.card.a2a_url,
    )


def skill_to_proto(skill: Skill) -> discovery_pb.Skill:
    """Return the wire form of a skill."""
    return discovery_pb.Skill(
        id=skill.id,
        name=skill.name,
        description=skill.description,
        tags=skill.tags,
        examples=skill.examples,
        input_modes=skill.input_modes,
        output_modes=skill.output_modes,
    )


def agent_view_to_proto(view: AgentView) -> discovery_pb.Agent:
    """Return the wire form of an agent with its remaining TTL."""
    return agent_to_proto(view.agent, view.ttl_remaining)


class AgentProtoCache:
    """Wire forms of agents, rebuilt only when the core hands out a new :class:`Agent`.

    Core agents are frozen and replaced, never mutated, so an entry is valid as long as the
    view's agent is the very object it was built from; only ``ttl_remaining`` differs per
    call, and is set on a copy (``CopyFrom`` runs in C).
    """

    def __init__(self) -> None:
        """Start empty; holds at most one message per agent id."""
        self._built: dict[str, tuple[Agent, discovery_pb.Agent]] = {}

    def fill(self, into: discovery_pb.Agent, view: AgentView) -> None:
        """Set ``into`` (empty) to the wire form of ``view``."""
        agent = view.agent
        built = self._built.get(agent.agent_id)
        if built is None or built[0] is not agent:
            built = (agent, agent_to_proto(agent))
            self._built[agent.agent_id] = built
        into.CopyFrom(built[1])
        into.ttl_remaining.FromNanoseconds(round(max(view.ttl_remaining, 0.0) * 1e9))

    def view_to_proto(self, view: AgentView) -> discovery_pb.Agent:
        """Return the wire form of ``view``, as :func:`agent_view_to_proto` does."""
        message = discovery_pb.Agent()
        self.fill(message, view)
        return message


def skill_from_proto(skill: discovery_pb.Skill) -> Skill:
    """Return the core form of a (validated) skill."""
    return Skill(
        skill.id,
        skill.name,
        skill.description,
        tuple(skill.tags),
        tuple(skill.examples),
        tuple(skill.input_modes),
        tuple(skill.output_modes),
    )


def agent_event_to_proto(event: AgentEvent) -> discovery_pb.AgentEvent:
    """Return the wire form of an agent event."""
    return discovery_pb.AgentEvent(
        revision=event.revision,
        kind=AGENT_EVENT_KIND_TO_PROTO[event.kind],
        agent=agent_to_proto(event.agent),
        event_time=to_timestamp(event.change.time),
    )


_ACK_DURATIONS: dict[float, duration_pb2.Duration] = {}
"""Durations of heartbeat acks by seconds: a handful of TTLs, reused (they are copied)."""


def _ack_duration(seconds: float) -> duration_pb2.Duration:
    value = _ACK_DURATIONS.get(seconds)
    if value is None:
        value = seconds_to_duration(seconds)
        if len(_ACK_DURATIONS) < 1024:
            _ACK_DURATIONS[seconds] = value
    return value


def heartbeat_ack_to_proto(ack: HeartbeatAck) -> discovery_pb.HeartbeatResponse:
    """Return the wire form of a heartbeat acknowledgement."""
    return discovery_pb.HeartbeatResponse(
        ttl_remaining=_ack_duration(ack.ttl_remaining),
        heartbeat_interval=_ack_duration(ack.heartbeat_interval),
        epoch=ack.epoch,
        command=HEARTBEAT_COMMAND_TO_PROTO[ack.command],
    )


# StateSync


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


MAX_JSON_DEPTH = 30
"""Deepest nesting of arrays and objects in a JSON value a request carries.

Protobuf decodes at most 100 nested messages and every level of a JSON object costs three,
so this bound keeps every response that carries the value decodable by clients.
"""


def json_text(field: str, value: struct_pb2.Value) -> bytes:
    """Return the canonical JSON text of a request's Value (sorted keys, no spaces).

    Raises:
        InvalidInput: naming ``field`` and the place inside the value, for a NaN or
            infinite number (JSON has none) or nesting deeper than ``MAX_JSON_DEPTH``.
    """
    return canonical_json(json_plain(field, value))


def json_plain(field: str, value: struct_pb2.Value) -> Any:
    """Return the plain Python value (as ``json.loads`` makes) of a request's Value.

    Raises:
        InvalidInput: as for :func:`json_text`.
    """
    return _plain_json(field, value, "$", 0)


def json_items(field: str, values: struct_pb2.ListValue) -> list[Any]:
    """Return the plain Python values of a request's ListValue, checked as :func:`json_text`."""
    return [_plain_json(field, item, f"$[{index}]", 1) for index, item in enumerate(values.values)]


def _plain_json(field: str, value: struct_pb2.Value, where: str, depth: int) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise InvalidInput(
                field, f"holds {json.dumps(number)} at {where}; JSON numbers must be finite"
            )
        return number
    if kind in ("struct_value", "list_value"):
        if depth == MAX_JSON_DEPTH:
            raise InvalidInput(
                field, f"nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects at {where}"
            )
        if kind == "list_value":
            return [
                _plain_json(field, item, f"{where}[{index}]", depth + 1)
                for index, item in enumerate(value.list_value.values)
            ]
        return {
            key: _plain_json(field, item, _member(where, key), depth + 1)
            for key, item in value.struct_value.fields.items()
        }
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None  # null_value, or no kind: JSON null, as json_format reads it


def _member(where: str, key: str) -> str:
    return f"{where}.{key}" if key.isidentifier() else f"{where}[{json.dumps(key)}]"


def state_value_to_proto(value: StateValue, into: Any) -> None:
    """Set the ``json`` or ``binary`` member of the ``value`` oneof of ``into``."""
    if value.kind is ValueKind.JSON:
        json_format.Parse(value.data, into.json)
    else:
        into.binary = value.data


def state_to_proto(entry: StateEntry, *, keys_only: bool = False) -> statesync_pb.State:
    """Return the wire form of a state entry."""
    state = statesync_pb.State(
        key=entry.key,
        metadata=entry.metadata,
        version=entry.version,
        create_revision=entry.create_revision,
        mod_revision=entry.mod_revision,
        agent_id=entry.agent_id,
        create_time=to_timestamp(entry.create_time),
        update_time=to_timestamp(entry.update_time),
        expire_time=to_timestamp(entry.expire_time),
        bound_to_session=entry.bound_to_session,
    )
    if not keys_only:
        state_value_to_proto(entry.value, state)
    return state


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
