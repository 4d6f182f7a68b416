"""Discovery's proto ⇄ core translation: agents, skills, agent events, heartbeat acks."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import duration_pb2
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from agentcoord.core.discovery import AgentEvent, AgentView, HeartbeatAck, HeartbeatCommand
from agentcoord.core.models import Agent, AgentEventKind, AgentState, AgentStatus, Skill
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.server.convert.wire import seconds_to_duration, to_timestamp
from agentcoord.server.sizes import ITEM_OVERHEAD, fitting_sizes

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


TTL_REMAINING_BYTES = 20
"""Bytes an agent's ``ttl_remaining`` adds to its encoding at most (tag, length, Duration)."""


class AgentProtoCache:
    """Wire forms of agents, rebuilt only when the core hands out a new :class:`Agent`.

    Core agents are frozen and replaced, never mutated, so an entry is valid as long as the
    view's agent is the very object it was built from; only ``ttl_remaining`` differs per
    call, and is set on a copy (``CopyFrom`` runs in C). Each entry keeps its encoded size
    too, so a page is cut by size without encoding it first.
    """

    def __init__(self) -> None:
        """Start empty; holds at most one message per agent id."""
        self._built: dict[str, tuple[Agent, discovery_pb.Agent, int]] = {}

    def _entry(self, agent: Agent) -> tuple[Agent, discovery_pb.Agent, int]:
        built = self._built.get(agent.agent_id)
        if built is None or built[0] is not agent:
            message = agent_to_proto(agent)
            built = (agent, message, message.ByteSize() + TTL_REMAINING_BYTES + ITEM_OVERHEAD)
            self._built[agent.agent_id] = built
        return built

    def fill(self, into: discovery_pb.Agent, view: AgentView) -> None:
        """Set ``into`` (empty) to the wire form of ``view``."""
        into.CopyFrom(self._entry(view.agent)[1])
        _set_remaining(into, view.ttl_remaining)

    def fill_page(
        self,
        into: RepeatedCompositeFieldContainer[discovery_pb.Agent],
        views: Sequence[AgentView],
        max_bytes: int,
    ) -> int:
        """Append to ``into`` the wire forms of the leading ``views`` that fit in ``max_bytes``.

        As :func:`~agentcoord.server.sizes.fitting` counts (one view at least), from the
        sizes kept. Returns how many were appended.
        """
        entries = [self._entry(view.agent) for view in views]
        count = fitting_sizes([entry[2] for entry in entries], max_bytes)
        for view, entry in zip(views[:count], entries, strict=False):
            message = into.add()
            message.CopyFrom(entry[1])
            _set_remaining(message, view.ttl_remaining)
        return count


def _set_remaining(message: discovery_pb.Agent, seconds: float) -> None:
    """Set ``ttl_remaining`` (not negative) without the Duration helpers' Python overhead."""
    nanos = round(max(seconds, 0.0) * 1e9)
    if nanos:
        remaining = message.ttl_remaining
        remaining.seconds, remaining.nanos = divmod(nanos, 1_000_000_000)


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
