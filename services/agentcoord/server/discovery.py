"""DiscoveryService handlers: validate, call the core, translate."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc

from agentcoord.core.discovery import (
    AgentQuery,
    AgentSpec,
    Discovery,
    HeartbeatAck,
    HeartbeatCommand,
    Session,
    session_ended_ack,
)
from agentcoord.core.errors import InvalidInput, PermissionDenied
from agentcoord.core.models import AgentCard, AgentState, AgentStatus
from agentcoord.discovery.v1 import discovery_service_pb2 as pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as pb_grpc
from agentcoord.server import page_tokens, validation
from agentcoord.server.auth import Access, current_identity
from agentcoord.server.convert import discovery as convert
from agentcoord.server.convert import wire
from agentcoord.server.sizes import budget, revision_chunks
from agentcoord.server.streams import StreamTracker, session_messages

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]

SERVICE = pb.DESCRIPTOR.services_by_name["DiscoveryService"]
"""Descriptor of the service."""

ACCESS = {
    "GetAgent": Access.READ,
    "ListAgents": Access.READ,
    "Register": Access.JOIN,
    "Heartbeat": Access.AGENT,
    "Deregister": Access.AGENT,
    "WatchAgents": Access.READ,
    "GetSummary": Access.READ,
}
"""Access each RPC needs."""


class DiscoveryServicer(pb_grpc.DiscoveryServiceServicer):
    """Serves ``agentcoord.discovery.v1.DiscoveryService``."""

    def __init__(self, core: Discovery, streams: StreamTracker, max_message_bytes: int) -> None:
        """Serve ``core``; ``streams`` ends long streams at shutdown.

        Pages and stream messages are cut by size to stay under ``max_message_bytes``.
        """
        self._core = core
        self._streams = streams
        self._max_bytes = budget(max_message_bytes)
        self._protos = convert.AgentProtoCache()

    async def GetAgent(self, request: pb.GetAgentRequest, context: Context) -> pb.GetAgentResponse:
        """Return one agent."""
        agent_id = _agent_id("agent_id", request.agent_id)
        response = pb.GetAgentResponse()
        self._protos.fill(response.agent, await self._core.get_agent(agent_id))
        return response

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: Context
    ) -> pb.ListAgentsResponse:
        """List agents matching the filters, one page."""
        query = _query(request.capabilities, request.role, request.states, request.skills)
        fingerprint = {
            "capabilities": sorted(query.capabilities),
            "skills": sorted(query.skills),
            "role": query.role,
            "states": sorted(state.value for state in query.states),
        }
        position = page_tokens.decode(
            request.page_token, "ListAgents", fingerprint, page_tokens.agent_id
        )
        limit = validation.page_size("page_size", request.page_size)
        views, last = self._core.list_agents(
            query, after_agent_id=position[0] if position else "", limit=limit
        )
        response = pb.ListAgentsResponse()
        count = self._protos.fill_page(response.agents, views, self._max_bytes)
        if count < len(views):
            last = views[count - 1].agent.agent_id
        if last:
            response.next_page_token = page_tokens.encode("ListAgents", fingerprint, last)
        return response

    async def Register(self, request: pb.RegisterRequest, context: Context) -> pb.RegisterResponse:
        """Open a session, or resume the caller's own (its session token presented)."""
        identity = current_identity()
        spec = _agent_spec(request)
        if identity.certificate_agent_ids is not None and not identity.admin:
            agent_id = spec.agent_id or (identity.session.agent_id if identity.session else "")
            if not agent_id:
                raise InvalidInput(
                    "agent_id", "is required: this server binds agent ids to client certificates"
                )
            identity.check_may_act_as(agent_id)
        registration = await self._core.register(
            spec, current=identity.session, token=identity.token, admin=identity.admin
        )
        agent = registration.agent
        return pb.RegisterResponse(
            agent=convert.agent_to_proto(agent, agent.ttl),
            session_token=registration.session_token,
            epoch=agent.epoch,
            heartbeat_interval=wire.seconds_to_duration(agent.heartbeat_interval),
            ttl=wire.seconds_to_duration(agent.ttl),
        )

    async def Heartbeat(
        self,
        request_iterator: AsyncIterator[pb.HeartbeatRequest],
        context: Context,
    ) -> AsyncIterator[pb.HeartbeatResponse]:
        """Renew the caller's session for every message it sends.

        Each is answered, or, when it sets ``ack_interval``, only news and one at least
        that often (see :class:`_Answers`).
        """
        session = _own_session()
        silence = self._core.config.max_ttl  # past it no session is still alive
        ended = self._core.session_end(session)
        answers = _Answers(asyncio.get_running_loop())
        with self._streams.track():
            requests = session_messages(request_iterator, ended, silence, context, "--max-ttl")
            async for request in requests:
                if request is None:  # ended between heartbeats (replaced, expired, ...)
                    yield convert.heartbeat_ack_to_proto(session_ended_ack(session))
                    continue  # its next heartbeat is answered so too, and ends the stream
                load = request.load
                held: tuple[str, ...] = ()
                if load.held_subtask_ids:
                    held = tuple(load.held_subtask_ids)
                    validation.at_most("load.held_subtask_ids", held, 1024)
                    for index, subtask_id in enumerate(held):
                        validation.text(
                            f"load.held_subtask_ids[{index}]", subtask_id, max_length=128
                        )
                every = 0.0
                if request.HasField("ack_interval"):
                    every = validation.duration("ack_interval", request.ack_interval)
                ack = await self._core.heartbeat(
                    session,
                    request.agent_id,
                    active_subtasks=validation.in_range(
                        "load.active_subtasks", load.active_subtasks, 0, 1024
                    ),
                    held_subtask_ids=held,
                    status=_status("status", request.status),
                )
                reply = answers.reply(ack, every)
                if reply is not None:
                    yield reply
                if ack.command is HeartbeatCommand.REREGISTER:
                    return  # the session ended: the agent must register again

    async def Deregister(
        self, request: pb.DeregisterRequest, context: Context
    ) -> pb.DeregisterResponse:
        """End an agent's session (its own, or any for the admin)."""
        identity = current_identity()
        agent_id = _agent_id("agent_id", request.agent_id) if request.agent_id else ""
        if identity.admin and not agent_id:
            raise InvalidInput("agent_id", "is required when the admin deregisters an agent")
        agent = await self._core.deregister(None if identity.admin else identity.session, agent_id)
        return pb.DeregisterResponse(agent=convert.agent_to_proto(agent))

    async def WatchAgents(
        self, request: pb.WatchAgentsRequest, context: Context
    ) -> AsyncIterator[pb.WatchAgentsResponse]:
        """Stream agent events after the start revision, then live."""
        if request.start_revision < 0:
            raise InvalidInput("start_revision", "must not be negative")
        query = _query(request.capabilities, request.role, (), ())
        with self._streams.track():
            async for events, revision in self._core.watch(request.start_revision, query):
                messages = [convert.agent_event_to_proto(event) for event in events]
                for chunk, reached in revision_chunks(messages, revision, self._max_bytes):
                    yield pb.WatchAgentsResponse(events=chunk, revision=reached)

    async def GetSummary(
        self, request: pb.GetSummaryRequest, context: Context
    ) -> pb.GetSummaryResponse:
        """Count live agents by role, capability, skill id and skill tag."""
        summary = self._core.summary()
        share = self._max_bytes // 4
        by_role, roles_cut = _most_common(summary.by_role, share)
        by_capability, capabilities_cut = _most_common(summary.by_capability, share)
        by_skill, skills_cut = _most_common(summary.by_skill, share)
        by_skill_tag, tags_cut = _most_common(summary.by_skill_tag, share)
        return pb.GetSummaryResponse(
            live_agents=summary.live_agents,
            live_agents_by_role=by_role,
            live_agents_by_capability=by_capability,
            live_agents_by_skill=by_skill,
            live_agents_by_skill_tag=by_skill_tag,
            counts_truncated=roles_cut or capabilities_cut or skills_cut or tags_cut,
            can_coordinate=summary.can_coordinate,
            total_capacity=summary.total_capacity,
            active_subtasks=summary.active_subtasks,
            revision=await self._core.revision(),
        )


class _Answers:
    """Which heartbeats of one stream are answered, and the answer, built once per ack.

    Acks repeat (the same TTL, interval and epoch while the TTL stays), so one message
    serves them all. A heartbeat that asks for answers at most every ``every`` seconds
    gets one only when the ack differs from the last one sent, or that long after it.
    """

    __slots__ = ("_ack", "_loop", "_reply", "_sent")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        """Time the answers on ``loop``'s clock."""
        self._loop = loop
        self._ack: HeartbeatAck | None = None
        self._reply = pb.HeartbeatResponse()
        self._sent = -math.inf

    def reply(self, ack: HeartbeatAck, every: float) -> pb.HeartbeatResponse | None:
        """The answer to a heartbeat acked with ``ack``, or None for no answer."""
        if ack is not self._ack:
            if ack != self._ack:
                self._reply = convert.heartbeat_ack_to_proto(ack)
                self._sent = -math.inf  # news: answered at once
            self._ack = ack
        if every:
            now = self._loop.time()
            if now - self._sent < every:
                return None
            self._sent = now
        return self._reply


MAP_ENTRY_OVERHEAD = 16
"""Bytes a ``map<string, int32>`` entry adds to its key, at most."""


def _most_common(counts: Mapping[str, int], max_bytes: int) -> tuple[dict[str, int], bool]:
    """Return the most common entries of ``counts`` that fit in ``max_bytes``; whether cut."""
    kept: dict[str, int] = {}
    size = 0
    for name, count in sorted(counts.items(), key=lambda entry: (-entry[1], entry[0])):
        size += len(name.encode()) + MAP_ENTRY_OVERHEAD
        if size > max_bytes:
            return kept, True
        kept[name] = count
    return kept, False


def _own_session() -> Session:
    session = current_identity().session
    if session is None:
        raise PermissionDenied(
            "authorization: only an agent's own session token can heartbeat",
            reason="SESSION_REQUIRED",
        )
    return session


def _agent_id(field: str, value: str) -> str:
    if not value:
        raise InvalidInput(field, "is required")
    return validation.matching(field, value, validation.AGENT_ID, "agent id ([A-Za-z0-9._:-])")


def _status(field: str, value: int) -> AgentStatus:
    return validation.known(field, value, convert.AGENT_STATUS_FROM_PROTO, "status")


def _query(
    capabilities: Sequence[str], role: str, states: Sequence[int], skills: Sequence[str]
) -> AgentQuery:
    chosen = {
        validation.known(f"states[{index}]", value, convert.AGENT_STATE_FROM_PROTO, "agent state")
        for index, value in enumerate(states)
    }
    if role:
        validation.matching("role", role, validation.ROLE, "role ([a-z0-9_.-], 1-64)")
    return AgentQuery(
        capabilities=frozenset(validation.capabilities("capabilities", capabilities)),
        role=role,
        states=frozenset(chosen) or frozenset({AgentState.LIVE}),
        skills=frozenset(validation.skill_names("skills", skills)),
    )


def _modes(field: str, values: Sequence[str]) -> None:
    validation.at_most(field, values, 16)
    for index, value in enumerate(values):
        validation.text(f"{field}[{index}]", value, max_length=128, required=True)


def _url(field: str, value: str) -> str:
    """Check an optional absolute http(s) URL of at most 2048 characters."""
    validation.text(field, value, max_length=2048)
    if value:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidInput(field, f"must be an absolute http(s) URL, not {value!r}")
    return value


def _card(request: pb.RegisterRequest) -> AgentCard:
    provider = request.provider
    if request.HasField("provider"):
        validation.text(
            "provider.organization", provider.organization, max_length=256, required=True
        )
    return AgentCard(
        description=validation.text("description", request.description, max_length=4096),
        version=validation.text("version", request.version, max_length=64),
        provider_organization=provider.organization,
        provider_url=_url("provider.url", provider.url),
        a2a_url=_url("a2a_url", request.a2a_url),
    )


def _agent_spec(request: pb.RegisterRequest) -> AgentSpec:
    if request.agent_id:
        _agent_id("agent_id", request.agent_id)
    if request.role:
        validation.matching("role", request.role, validation.ROLE, "role ([a-z0-9_.-], 1-64)")
    validation.at_most("skills", request.skills, 32)
    seen: set[str] = set()
    for index, skill in enumerate(request.skills):
        field = f"skills[{index}]"
        validation.text(f"{field}.id", skill.id, max_length=128, required=True)
        if skill.id in seen:
            raise InvalidInput(f"{field}.id", f"duplicate skill id {skill.id!r}")
        seen.add(skill.id)
        validation.text(f"{field}.name", skill.name, max_length=256, required=True)
        validation.text(f"{field}.description", skill.description, max_length=4096)
        validation.at_most(f"{field}.tags", skill.tags, 32)
        for tag_index, tag in enumerate(skill.tags):
            validation.text(f"{field}.tags[{tag_index}]", tag, max_length=64, required=True)
        validation.at_most(f"{field}.examples", skill.examples, 16)
        for example_index, example in enumerate(skill.examples):
            validation.text(
                f"{field}.examples[{example_index}]", example, max_length=1024, required=True
            )
        _modes(f"{field}.input_modes", skill.input_modes)
        _modes(f"{field}.output_modes", skill.output_modes)
    return AgentSpec(
        agent_id=request.agent_id,
        name=validation.text("name", request.name, max_length=256, required=True),
        role=request.role,
        capabilities=validation.capabilities("capabilities", request.capabilities),
        capacity=validation.in_range("capacity", request.capacity or 1, 1, 1024),
        labels=validation.labels("labels", request.labels),
        skills=tuple(convert.skill_from_proto(skill) for skill in request.skills),
        ttl=validation.duration("ttl", request.ttl),
        card=_card(request),
    )
