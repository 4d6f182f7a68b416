"""Discovery rules: registration, sessions, liveness in memory, expiry, queries.

Liveness lives in memory and is judged on the injected monotonic clock: a heartbeat
moves the agent's deadline and costs no disk write. Heartbeat facts are flushed to the
store in batches every ``flush_interval``; expiry is swept every ``sweep_interval``.
Registrations, departures, expiries and status changes are written through at once and
land in the change log, which WatchAgents follows.

Several processes may share one store (replicas on PostgreSQL). Each mirrors every agent
change of the change log it hears, its own and other processes' commits, so an agent
registered through one replica is known to all, and a registration through one ends the
session the others held (they refuse its token from then on). A deadline that passes is
judged against the store before the agent expires: an agent whose stored last heartbeat
is newer than any this process received heartbeats through another process, and lives
until that heartbeat plus its TTL plus ``flush_interval`` (the staleness of stored
heartbeats). So a process that restarts, or that never held the agent's stream, never
expires an agent that heartbeats elsewhere. Only one of them, the store's leader,
records expiries (:meth:`Discovery.sweep`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import enum
import hashlib
import heapq
import hmac
import logging
import secrets
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from agentcoord.core.changes import ChangeFeed
from agentcoord.core.clock import Clock
from agentcoord.core.errors import NotFound, PermissionDenied, Unauthenticated, Unavailable
from agentcoord.core.loops import run_periodically
from agentcoord.core.models import (
    Agent,
    AgentCard,
    AgentEventKind,
    AgentState,
    AgentStatus,
    Change,
    HeartbeatRecord,
    Service,
    Skill,
    agent_session_live,
)
from agentcoord.core.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """Timing of Discovery."""

    default_ttl: float = 10.0
    """TTL in seconds for agents that ask for none."""
    min_ttl: float = 1.0
    """Smallest TTL granted; shorter requests are raised to it."""
    max_ttl: float = 300.0
    """Largest TTL granted; longer requests are lowered to it."""
    sweep_interval: float = 0.1
    """Seconds between expiry sweeps; bounds how late an expiry is noticed."""
    flush_interval: float = 1.0
    """Seconds between batched writes of heartbeat facts to the store."""


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """What an agent says about itself when it registers (already validated)."""

    agent_id: str
    """Chosen identifier; empty lets Discovery generate one."""
    name: str
    """Human-readable name."""
    role: str = ""
    """Role; empty for none."""
    capabilities: tuple[str, ...] = ()
    """Capabilities (sorted, unique)."""
    capacity: int = 1
    """Parallel sub-tasks."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Free-form labels."""
    skills: tuple[Skill, ...] = ()
    """A2A-style skills."""
    ttl: float = 0.0
    """Requested TTL in seconds; 0 for the default."""
    card: AgentCard = field(default_factory=AgentCard)
    """The rest of its A2A agent card."""


@dataclass(frozen=True, slots=True)
class Registration:
    """The outcome of a registration."""

    agent: Agent
    """The agent as stored, with its new epoch."""
    session_token: str
    """The secret that authenticates this session."""


@dataclass(frozen=True, slots=True)
class Session:
    """An authenticated agent session."""

    agent_id: str
    """The agent."""
    epoch: int
    """The session's generation."""

    def check_acts_as(self, agent_id: str) -> None:
        """Check a request naming ``agent_id`` (empty: the session's own) acts as this agent.

        Raises:
            PermissionDenied: the request names another agent.
        """
        if agent_id and agent_id != self.agent_id:
            raise PermissionDenied(
                f"agent_id: session belongs to agent {self.agent_id!r}, not {agent_id!r}",
                reason="AGENT_MISMATCH",
            )


async def session_from_store(store: Store, token: str) -> Session:
    """Return the live session a token belongs to, as the store records it.

    Raises:
        Unauthenticated: the token is unknown, replaced, or its session ended.
    """
    agent = await _agent_of_token(store, token)
    return Session(agent.agent_id, agent.epoch)


async def _agent_of_token(store: Store, token: str) -> Agent:
    """Return the stored agent whose live session a token belongs to.

    Raises:
        Unauthenticated: the token is unknown, replaced, or its session ended.
    """
    agent = await store.find_agent_by_token_hash(hash_token(token))
    if agent is None or agent.state is not AgentState.LIVE:
        raise Unauthenticated("session token is unknown or its session has ended")
    return agent


class HeartbeatCommand(enum.Enum):
    """What the server asks of an agent in a heartbeat acknowledgement."""

    NONE = "none"
    REREGISTER = "reregister"
    DRAIN = "drain"


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    """The server's answer to one heartbeat."""

    ttl_remaining: float
    """Seconds before the agent expires unless it heartbeats again."""
    heartbeat_interval: float
    """Seconds between heartbeats the server asks for."""
    epoch: int
    """The session's generation."""
    command: HeartbeatCommand
    """What the agent should do."""


def session_ended_ack(session: Session) -> HeartbeatAck:
    """The answer to a heartbeat of a session that has ended: register again."""
    return HeartbeatAck(0.0, 0.0, session.epoch, HeartbeatCommand.REREGISTER)


@dataclass(frozen=True, slots=True)
class AgentQuery:
    """A filter over agents."""

    capabilities: frozenset[str] = frozenset()
    """Agents must have all of these."""
    role: str = ""
    """Agents must have this role; empty for any."""
    states: frozenset[AgentState] = frozenset({AgentState.LIVE})
    """Agents must be in one of these states."""
    skills: frozenset[str] = frozenset()
    """For each of these, agents must have a skill with that id or tag."""

    def matches(self, agent: Agent) -> bool:
        """Return whether ``agent`` passes the filter (its state included)."""
        return (
            agent.state in self.states
            and (not self.role or agent.role == self.role)
            and self.capabilities.issubset(agent.capabilities)
            and agent.has_skills(self.skills)
        )


@dataclass(frozen=True, slots=True)
class AgentView:
    """An agent with the liveness facts only the server's clock knows."""

    agent: Agent
    """The agent; its state accounts for a deadline passed but not yet swept."""
    ttl_remaining: float
    """Seconds before expiry; 0 when not live."""


@dataclass(frozen=True, slots=True)
class AgentEvent:
    """One agent event, derived from the change log."""

    revision: int
    """Revision of the change."""
    kind: AgentEventKind
    """What happened."""
    agent: Agent
    """The agent right after the event."""
    change: Change
    """The change log entry."""


@dataclass(frozen=True, slots=True)
class Summary:
    """Counts of live agents."""

    live_agents: int
    """Number of live agents."""
    by_role: Mapping[str, int]
    """Live agents per role."""
    by_capability: Mapping[str, int]
    """Live agents per capability."""
    by_skill: Mapping[str, int]
    """Live agents per skill id."""
    by_skill_tag: Mapping[str, int]
    """Live agents per skill tag (once per agent)."""
    total_capacity: int
    """Sum of live agents' capacities."""
    active_subtasks: int
    """Sum of live agents' reported active sub-tasks."""

    @property
    def can_coordinate(self) -> bool:
        """Whether at least two agents are live."""
        return self.live_agents >= 2


@dataclass(slots=True)
class _Entry:
    """In-memory record of one agent.

    Heartbeats only set the volatile load fields here; they are merged into ``base`` (a new
    frozen :class:`Agent`) when the agent is read, not on every heartbeat.
    """

    base: Agent
    token_hash: str
    deadline: float
    active_subtasks: int = 0
    held_subtask_ids: tuple[str, ...] = ()
    last_heartbeat_time: datetime | None = None
    pending: bool = False
    """Whether the volatile fields are newer than ``base``."""
    elsewhere: bool = False
    """Whether its heartbeats may come through another process (the store tells)."""
    look: float | None = None
    """When the sweep looks at it next: the time of its one live item in the deadline heap."""
    ended: asyncio.Future[None] | None = None
    """Done when the session ends (see :meth:`Discovery.session_end`); made on first ask."""
    ack: HeartbeatAck | None = None
    """The answer to its heartbeats while its TTL stays (the same object each time)."""
    stored_heartbeat_time: datetime | None = None
    """The last heartbeat the store showed of this session when it was last read."""

    @property
    def agent(self) -> Agent:
        """The agent with the latest heartbeat facts merged in."""
        if self.pending:
            self.base = replace(
                self.base,
                active_subtasks=self.active_subtasks,
                held_subtask_ids=self.held_subtask_ids,
                last_heartbeat_time=self.last_heartbeat_time,
            )
            self.pending = False
        return self.base

    def set_agent(self, agent: Agent) -> None:
        """Replace the agent as a whole (its load fields included)."""
        self.base = agent
        self.pending = False


def _registration_fields(agent: Agent) -> tuple[object, ...]:
    """The fields a registration sets (what a resume may change)."""
    return (
        agent.name,
        agent.role,
        agent.capabilities,
        agent.capacity,
        dict(agent.labels),
        agent.skills,
        agent.card,
        agent.ttl,
    )


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def hash_token(token: str) -> str:
    """Return the stored form of a session token (tokens themselves are never stored)."""
    return hashlib.sha256(token.encode()).hexdigest()


class Discovery:
    """The Discovery domain service."""

    def __init__(
        self, store: Store, clock: Clock, feed: ChangeFeed, config: DiscoveryConfig
    ) -> None:
        """Wire the service; call :meth:`start` before use."""
        self._store = store
        self._clock = clock
        self._feed = feed
        self.config = config
        self._entries: dict[str, _Entry] = {}
        self._sorted_ids: list[str] = []
        self._by_token: dict[str, str] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._dirty: dict[str, None] = {}
        """Agents with heartbeat facts not flushed yet (an ordered set)."""
        self._by_capability: dict[str, list[str]] = {}
        """Sorted ids of the agents (any state) with each capability."""
        self._by_role: dict[str, list[str]] = {}
        """Sorted ids of the agents (any state) with each non-empty role."""
        self.heartbeat_listeners: list[Callable[[Session, tuple[str, ...]], None]] = []
        """Called with the session and its held sub-task ids on every accepted heartbeat."""

    async def start(self) -> None:
        """Load agents from the store; live ones get a full TTL from now.

        Judging agents that were live before a restart by their TTL from the restart,
        not from their last flushed heartbeat, lets them reconnect without being
        reported expired.
        """
        self._store.add_listener(self._heard)
        now = self._clock.monotonic()
        for agent, token_hash in await self._store.load_agents():
            entry = self._entries.get(agent.agent_id)
            if entry is None or entry.base.revision < agent.revision:
                self._remember(agent, token_hash, now + agent.ttl, elsewhere=True)

    def _heard(self, changes: Sequence[Change]) -> None:
        """Mirror the agent changes of a commit, this process's or another's."""
        now = self._clock.monotonic()
        for change in changes:
            if change.service is Service.DISCOVERY and "agent" in change.details:
                self._heard_agent(Agent.from_snapshot(change.details["agent"]), now)

    def _heard_agent(self, agent: Agent, now: float) -> None:
        entry = self._entries.get(agent.agent_id)
        if entry is not None and entry.base.revision >= agent.revision:
            return  # known already (or an older change heard late)
        if entry is not None and entry.base.epoch == agent.epoch:
            if agent.state is not AgentState.LIVE:
                self._end(entry, agent)
            else:
                entry.set_agent(agent)
        else:  # a new session, opened through this process or another
            self._remember(agent, "", now + agent.ttl, elsewhere=True)

    def _remember(
        self, agent: Agent, token_hash: str, deadline: float, *, elsewhere: bool = False
    ) -> _Entry:
        """Record ``agent``; with ``elsewhere``, the store is asked halfway to ``deadline``."""
        agent_id = agent.agent_id
        previous = self._entries.get(agent_id)
        if previous is None:
            bisect.insort(self._sorted_ids, agent_id)
            self._index(agent_id, agent.capabilities, agent.role)
        else:
            self._by_token.pop(previous.token_hash, None)
            if previous.base.capabilities != agent.capabilities or previous.base.role != agent.role:
                self._unindex(agent_id, previous.base.capabilities, previous.base.role)
                self._index(agent_id, agent.capabilities, agent.role)
        self._dirty.pop(agent_id, None)
        # The previous entry's item in the deadline heap serves this one (it looks no later).
        look = None if previous is None else previous.look
        entry = _Entry(agent, token_hash, deadline, elsewhere=elsewhere, look=look)
        if previous is not None and previous.ended is not None:
            if previous.base.epoch == agent.epoch and agent.state is AgentState.LIVE:
                entry.ended = previous.ended  # the same session, its fields stored anew
            else:
                _resolve(previous.ended)
        self._entries[agent.agent_id] = entry
        if agent.state is AgentState.LIVE:
            if token_hash:
                self._by_token[token_hash] = agent.agent_id
            # Elsewhere: look at the store halfway (as after each look), so that the facts
            # shown of an agent heartbeating another process lag by the documented bound
            # from the start, and at least a flush interval before the deadline.
            early = max(self.config.flush_interval, agent.ttl / 2) if elsewhere else 0.0
            self._schedule(entry, deadline - early)
        return entry

    def _schedule(self, entry: _Entry, at: float) -> None:
        """Have the sweep look at ``entry`` at ``at``, or sooner if it already looks sooner.

        Each entry has one live item in the deadline heap (the one at ``entry.look``); items
        it superseded, and those of entries replaced since, are dropped when they come up.
        A look that comes too early costs nothing: the sweep schedules the next one.
        """
        if entry.look is None or at < entry.look:
            entry.look = at
            heapq.heappush(self._deadlines, (at, entry.base.agent_id))

    def _index(self, agent_id: str, capabilities: tuple[str, ...], role: str) -> None:
        for capability in capabilities:
            bisect.insort(self._by_capability.setdefault(capability, []), agent_id)
        if role:
            bisect.insort(self._by_role.setdefault(role, []), agent_id)

    def _unindex(self, agent_id: str, capabilities: tuple[str, ...], role: str) -> None:
        for key, index in [(c, self._by_capability) for c in capabilities] + (
            [(role, self._by_role)] if role else []
        ):
            ids = index[key]
            del ids[bisect.bisect_left(ids, agent_id)]
            if not ids:
                del index[key]

    def _grant_ttl(self, requested: float) -> float:
        if requested <= 0:
            requested = self.config.default_ttl
        return min(max(requested, self.config.min_ttl), self.config.max_ttl)

    async def register(
        self,
        spec: AgentSpec,
        *,
        current: Session | None = None,
        token: str = "",
        admin: bool = False,
    ) -> Registration:
        """Open a session for an agent, or resume the caller's own.

        A live session belongs to whoever holds its token; an id is taken over by no one
        else while it lives (ZooKeeper's ephemeral nodes behave alike):

        - the caller that presents the session token ``token`` of the id's live session
          (``current``) resumes it: same epoch, token and leases, a full TTL from now, the
          registration's fields recorded;
        - otherwise a new session (the next epoch) opens if the id has no live session, or
          if the caller is the admin, who takes the live one over (it ends; its leases are
          revoked and offered again, and its bound keys expire);
        - an empty ``spec.agent_id`` means the caller's own (with ``current``) or a new UUID.

        Raises:
            PermissionDenied: ``current`` is another agent's session (``AGENT_MISMATCH``).
            AlreadyExists: the id has a live session the caller may not take over
                (``AGENT_ALREADY_REGISTERED``, with ``ttl_remaining`` in the metadata).
        """
        agent_id = spec.agent_id or (current.agent_id if current else str(uuid.uuid4()))
        if current is not None:
            current.check_acts_as(agent_id)
        agent = self._agent_of(spec, agent_id)
        entry = await self._entry_read_through(agent_id)
        if entry is not None and entry.base.state is AgentState.LIVE:
            remaining = entry.deadline - self._clock.monotonic()
            if remaining > 0 and current is not None and current.epoch == entry.base.epoch:
                return await self._resume(entry, agent, token)
            if remaining > 0 and not admin:
                raise agent_session_live(agent_id, remaining)
        # The session that may be replaced: the one memory knows (expired, or taken over by
        # the admin), else the caller's own (opened through another process); the store
        # refuses if another registration got in first.
        replacing = 0
        if entry is not None and entry.base.state is AgentState.LIVE:
            replacing = entry.base.epoch
        elif current is not None:
            replacing = current.epoch
        new_token = secrets.token_urlsafe(32)
        token_hash = hash_token(new_token)
        stored = await self._store.register_agent(
            agent, token_hash, self._clock.now(), replacing_epoch=replacing
        )
        # Its stream may open on another process: elsewhere until it heartbeats here.
        self._remember(stored, token_hash, self._clock.monotonic() + stored.ttl, elsewhere=True)
        return Registration(stored, new_token)

    async def _resume(self, entry: _Entry, agent: Agent, token: str) -> Registration:
        """Renew a live session for a full TTL, recording changed registration fields."""
        base = entry.base
        if _registration_fields(agent) != _registration_fields(base):
            updated = await self._store.resume_session(
                replace(agent, epoch=base.epoch), self._clock.now()
            )
            if updated is None:  # ended meanwhile
                raise Unauthenticated("session token is unknown or its session has ended")
            unflushed = base.agent_id in self._dirty
            fresh = self._remember(updated, entry.token_hash, entry.deadline)
            if unflushed:  # the heartbeat facts the store does not have yet stay
                self._carry_load(entry, fresh)
            entry = fresh
        entry.deadline = self._clock.monotonic() + entry.base.ttl  # looked at in time already
        return Registration(entry.agent, token)

    def _carry_load(self, old: _Entry, new: _Entry) -> None:
        """Give ``new`` the unflushed heartbeat facts of ``old`` (the same session)."""
        new.active_subtasks = old.active_subtasks
        new.held_subtask_ids = old.held_subtask_ids
        new.last_heartbeat_time = old.last_heartbeat_time
        new.pending = True
        self._dirty[new.base.agent_id] = None

    def _agent_of(self, spec: AgentSpec, agent_id: str) -> Agent:
        return Agent(
            agent_id=agent_id,
            name=spec.name,
            role=spec.role,
            capabilities=spec.capabilities,
            capacity=spec.capacity,
            labels=dict(spec.labels),
            skills=spec.skills,
            card=spec.card,
            ttl=self._grant_ttl(spec.ttl),
            status=AgentStatus.READY,
        )

    async def authenticate(self, token: str) -> Session:
        """Return the live session a token belongs to.

        Raises:
            Unauthenticated: the token is unknown, replaced, or its session ended.
        """
        token_hash = hash_token(token)
        agent_id = self._by_token.get(token_hash)
        if agent_id is not None:
            entry = self._entries[agent_id]
            if hmac.compare_digest(entry.token_hash, token_hash):
                if entry.deadline <= self._clock.monotonic():
                    # Expired, even if the sweep has not recorded it yet (say, the disk is full).
                    raise Unauthenticated("session token's session has expired; register again")
                return Session(agent_id, entry.base.epoch)
        # A session opened through another process of the same store.
        stored = await _agent_of_token(self._store, token)
        session = Session(stored.agent_id, stored.epoch)
        mirrored = self._entries.get(session.agent_id)
        if mirrored is None or mirrored.base.epoch < session.epoch:
            # Registered a moment ago and not heard of yet: mirror the agent as read, so
            # that the call the token authenticates finds the session (not a stale one).
            self._heard_agent(stored, self._clock.monotonic())
            mirrored = self._entries.get(session.agent_id)
        if (
            mirrored is not None
            and mirrored.base.epoch == session.epoch
            and not mirrored.token_hash
        ):
            mirrored.token_hash = token_hash
            self._by_token[token_hash] = session.agent_id
        return session

    def _session_entry(self, session: Session, agent_id: str) -> _Entry | None:
        """Return the entry of a still-current session, checking the caller acts as itself."""
        session.check_acts_as(agent_id)
        entry = self._entries.get(session.agent_id)
        if (
            entry is None
            or entry.base.epoch != session.epoch
            or entry.base.state is not AgentState.LIVE
        ):
            return None
        return entry

    async def heartbeat(
        self,
        session: Session,
        agent_id: str,
        *,
        active_subtasks: int,
        held_subtask_ids: tuple[str, ...],
        status: AgentStatus,
    ) -> HeartbeatAck:
        """Renew a session's liveness for one TTL and record its load.

        A session that ended (replaced by a newer registration, or expired) is answered
        with :attr:`HeartbeatCommand.REREGISTER` and not renewed.
        """
        entry = self._session_entry(session, agent_id)
        if entry is None:
            return session_ended_ack(session)
        now = self._clock.monotonic()
        if now >= entry.deadline:
            # Recorded now or, if the store fails, by a later sweep: the deadline stays due.
            # No expiry either if it heartbeat through another process meanwhile.
            with contextlib.suppress(Unavailable):
                await self._expire(entry)
            if entry.base.state is not AgentState.LIVE or now >= entry.deadline:
                return session_ended_ack(session)
        agent = entry.base
        ttl = agent.ttl
        entry.deadline = now + ttl
        entry.elsewhere = False
        wall = self._clock.now()
        if status is not AgentStatus.UNSPECIFIED and status is not agent.status:
            updated = await self._store.update_agent_status(
                agent.agent_id, agent.epoch, status, wall
            )
            if updated is not None:
                entry.set_agent(updated)
        entry.active_subtasks = active_subtasks
        entry.held_subtask_ids = held_subtask_ids
        entry.last_heartbeat_time = wall
        entry.pending = True
        self._dirty[session.agent_id] = None
        for listener in self.heartbeat_listeners:
            listener(session, held_subtask_ids)
        ack = entry.ack
        if ack is None or ack.ttl_remaining != ttl:
            ack = entry.ack = HeartbeatAck(
                ttl, agent.heartbeat_interval, session.epoch, HeartbeatCommand.NONE
            )
        return ack

    async def deregister(self, session: Session | None, agent_id: str) -> Agent:
        """End an agent's session; ``session`` None means an operator acting for it.

        A session ends only itself: one that ended meanwhile (replaced while its call was on
        the way) leaves the session that replaced it alone and gets the agent as it is.

        Raises:
            NotFound: no such agent.
            PermissionDenied: the session belongs to another agent.
        """
        target = session.agent_id if session is not None and not agent_id else agent_id
        if session is not None:
            session.check_acts_as(target)
        entry = self._entries.get(target)
        if entry is None:
            raise NotFound(f"agent_id: agent {target!r} does not exist", reason="AGENT_NOT_FOUND")
        epoch = entry.base.epoch if session is None else session.epoch
        if entry.base.state is AgentState.LIVE and entry.base.epoch == epoch:
            ended = await self._store.end_agent_session(
                target, epoch, AgentState.LEFT, self._clock.now()
            )
            if ended is not None:
                self._end(entry, ended)
        return entry.agent

    def _end(self, entry: _Entry, ended: Agent) -> None:
        self._by_token.pop(entry.token_hash, None)
        entry.set_agent(ended)
        self._dirty.pop(ended.agent_id, None)
        if entry.ended is not None:
            _resolve(entry.ended)

    def session_end(self, session: Session) -> asyncio.Future[None]:
        """Return a future that is done once the session has ended (done already if it has).

        A session ends when this process records or hears its end: a registration of the
        same id through any process, an expiry, a departure. Streams of the session wait
        on it to end at once rather than at their next message.
        """
        entry = self._session_entry(session, session.agent_id)
        if entry is None:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        if entry.ended is None:
            entry.ended = asyncio.get_running_loop().create_future()
        return entry.ended

    async def _heartbeats_elsewhere(self, entry: _Entry) -> bool:
        """Whether the store shows the agent alive through another process's heartbeats.

        If so, the entry's deadline moves to its stored last heartbeat plus its TTL plus
        ``flush_interval`` (never sooner than it was), and its heartbeat facts (time, load)
        become the stored ones.
        """
        return self._alive_elsewhere(entry, await self._store.get_agent(entry.base.agent_id))

    def _alive_elsewhere(self, entry: _Entry, stored: Agent | None) -> bool:
        """:meth:`_heartbeats_elsewhere`, judged by ``stored``, the agent as just read."""
        if stored is None or stored.state is not AgentState.LIVE:
            return False
        if stored.epoch != entry.base.epoch:
            return False
        times = [t for t in (stored.register_time, stored.last_heartbeat_time) if t is not None]
        if not times:
            return False
        last = max(times)
        entry.stored_heartbeat_time = last
        if entry.last_heartbeat_time is not None and last <= entry.last_heartbeat_time:
            return False  # the last heartbeat came through this process: memory knows best
        now = self._clock.monotonic()
        stored_deadline = now + (last - self._clock.now()).total_seconds() + stored.ttl
        # Never sooner than this process already granted (a full TTL from its start, or
        # from when it heard of the session): stored facts only ever extend it.
        entry.deadline = max(entry.deadline, stored_deadline + self.config.flush_interval)
        if entry.deadline <= now:
            return False
        entry.elsewhere = True
        entry.set_agent(
            replace(
                entry.base,
                last_heartbeat_time=stored.last_heartbeat_time,
                active_subtasks=stored.active_subtasks,
                held_subtask_ids=stored.held_subtask_ids,
            )
        )
        # Look again halfway to the deadline (newer heartbeats are flushed by then), so
        # that an agent live elsewhere never reaches its deadline here.
        self._schedule(entry, (now + entry.deadline) / 2)
        return True

    async def _expire(self, entry: _Entry) -> None:
        """Record the expiry, unless the store shows a heartbeat later than those judged.

        The store refuses the expiry if another process flushed a newer heartbeat after
        this one looked (a late flush); the agent is then judged again by it.
        """
        if await self._heartbeats_elsewhere(entry):
            return
        judged = [t for t in (entry.last_heartbeat_time, entry.stored_heartbeat_time) if t]
        ended = await self._store.end_agent_session(
            entry.base.agent_id,
            entry.base.epoch,
            AgentState.EXPIRED,
            self._clock.now(),
            heartbeat_at_most=max(judged) if judged else entry.base.register_time,
        )
        if ended is not None:
            self._end(entry, ended)
        elif not await self._heartbeats_elsewhere(entry):  # refused: judge it again soon
            self._schedule(entry, self._clock.monotonic() + self.config.flush_interval)

    async def sweep(self) -> list[Agent]:
        """Expire every live agent whose deadline has passed; return them.

        An expiry the store fails to record is not dropped: its deadline goes back on the
        heap, so the next sweep tries again until it is recorded. Meanwhile the session is
        already refused (:meth:`authenticate`, :meth:`heartbeat`, :meth:`is_live`).

        Only the leader of the processes sharing the store (:meth:`Store.is_leader`)
        records expiries. Another one keeps a passed deadline, looks at the store for
        heartbeats through other processes every ``flush_interval``, and hears the
        leader's expiry; should it become the leader, it expires the agent at its next look.

        Raises:
            Exception: the store failed to record an expiry (the rest stay due).
        """
        now = self._clock.monotonic()
        due: list[_Entry] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            at, agent_id = heapq.heappop(self._deadlines)
            entry = self._entries.get(agent_id)
            if entry is None or entry.look != at:
                continue  # superseded by a sooner look, or the entry by a newer one
            entry.look = None
            if entry.base.state is not AgentState.LIVE:
                continue
            if entry.deadline > now and not entry.elsewhere:
                self._schedule(entry, entry.deadline)
            else:
                due.append(entry)
        expired = []
        leading = self._store.is_leader()
        # One read for every look at what other processes flushed (an expiry reads afresh).
        looks = [e.base.agent_id for e in due if e.deadline > now or not leading]
        try:
            stored = {a.agent_id: a for a in await self._store.get_agents(looks)} if looks else {}
        except Exception:
            for unread in due:
                self._schedule(unread, unread.deadline)
            raise
        for index, entry in enumerate(due):
            try:
                if entry.deadline > now:  # an early look at what other processes flushed
                    if not self._alive_elsewhere(entry, stored.get(entry.base.agent_id)):
                        self._schedule(entry, entry.deadline)
                    continue
                if not leading:  # the leader records the expiry
                    if not self._alive_elsewhere(entry, stored.get(entry.base.agent_id)):
                        self._schedule(entry, now + self.config.flush_interval)
                    continue
                await self._expire(entry)
            except Exception:
                for unrecorded in due[index:]:
                    self._schedule(unrecorded, unrecorded.deadline)
                raise
            if entry.base.state is AgentState.EXPIRED:
                expired.append(entry.agent)
        return expired

    async def flush(self) -> None:
        """Write the heartbeat facts gathered since the last flush, in one batch."""
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, {}
        records = []
        for agent_id in dirty:
            entry = self._entries[agent_id]
            if entry.last_heartbeat_time is not None:
                records.append(
                    HeartbeatRecord(
                        agent_id=agent_id,
                        epoch=entry.base.epoch,
                        last_heartbeat_time=entry.last_heartbeat_time,
                        status=entry.base.status,
                        active_subtasks=entry.active_subtasks,
                        held_subtask_ids=entry.held_subtask_ids,
                    )
                )
        if records:
            await self._store.record_heartbeats(records)

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep expiries and flush heartbeats until ``stop`` is set, then flush once more."""
        next_flush = self._clock.monotonic() + self.config.flush_interval

        async def step() -> None:
            nonlocal next_flush
            await self.sweep()
            if self._clock.monotonic() >= next_flush:
                next_flush = self._clock.monotonic() + self.config.flush_interval
                await self.flush()

        await run_periodically(stop, self.config.sweep_interval, step, "discovery sweep")
        try:
            await self.flush()
        except Unavailable as error:  # shutting down on a failing store: facts are volatile
            log.warning("discovery: last heartbeat flush failed: %s", error.message)

    async def is_live(self, agent_id: str) -> bool:
        """Return whether the agent is live, on this process's clock."""
        entry = self._entries.get(agent_id)
        return (
            entry is not None
            and entry.base.state is AgentState.LIVE
            and entry.deadline > self._clock.monotonic()
        )

    async def revision(self) -> int:
        """Return the store's current revision."""
        return await self._store.current_revision()

    def _view(self, entry: _Entry, now: float) -> AgentView:
        agent = entry.agent
        if agent.state is AgentState.LIVE:
            remaining = entry.deadline - now
            if remaining > 0:
                return AgentView(agent, remaining)
            agent = replace(agent, state=AgentState.EXPIRED)
        return AgentView(agent, 0.0)

    async def _entry_read_through(self, agent_id: str) -> _Entry | None:
        """The agent's entry; one not heard of yet is read from the store.

        Unless every write to the store goes through this process's store object: every
        agent it holds was then loaded at start or heard of since.
        """
        entry = self._entries.get(agent_id)
        if entry is None and not self._store.writes_alone():
            stored = await self._store.get_agent(agent_id)
            if stored is not None:  # registered through another process a moment ago
                self._heard_agent(stored, self._clock.monotonic())
                entry = self._entries.get(agent_id)
        return entry

    async def get_agent(self, agent_id: str) -> AgentView:
        """Return one agent; one this process has not heard of yet is read from the store.

        Raises:
            NotFound: no such agent.
        """
        entry = await self._entry_read_through(agent_id)
        if entry is None:
            raise NotFound(f"agent_id: agent {agent_id!r} does not exist", reason="AGENT_NOT_FOUND")
        return self._view(entry, self._clock.monotonic())

    def list_agents(
        self, query: AgentQuery, *, after_agent_id: str, limit: int
    ) -> tuple[list[AgentView], str]:
        """Return up to ``limit`` matching agents after ``after_agent_id``, by agent id.

        Returns:
            The page and the agent id to continue after, or "" when there is no more.
        """
        now = self._clock.monotonic()
        page: list[AgentView] = []
        # Walk only the shortest id list that every match must be in (all sorted by id).
        candidates = self._sorted_ids
        for capability in query.capabilities:
            ids = self._by_capability.get(capability)
            if ids is None:
                return page, ""
            if len(ids) < len(candidates):
                candidates = ids
        if query.role:
            ids = self._by_role.get(query.role)
            if ids is None:
                return page, ""
            if len(ids) < len(candidates):
                candidates = ids
        states = tuple(query.states)  # a tuple: enum members compare by identity, not hash
        role = query.role
        capabilities = query.capabilities
        skills = query.skills
        entries = self._entries
        start = bisect.bisect_right(candidates, after_agent_id) if after_agent_id else 0
        for index in range(start, len(candidates)):
            entry = entries[candidates[index]]
            base = entry.base
            state = base.state
            if state is AgentState.LIVE and entry.deadline <= now:
                state = AgentState.EXPIRED
            if (
                state not in states
                or (role and base.role != role)
                or not capabilities.issubset(base.capabilities)
                or (skills and not base.has_skills(skills))
            ):
                continue
            if len(page) == limit:
                return page, page[-1].agent.agent_id
            page.append(self._view(entry, now))
        return page, ""

    def summary(self) -> Summary:
        """Count the live agents."""
        now = self._clock.monotonic()
        by_role: Counter[str] = Counter()
        by_capability: Counter[str] = Counter()
        by_skill: Counter[str] = Counter()
        by_skill_tag: Counter[str] = Counter()
        live = capacity = active = 0
        for entry in self._entries.values():
            agent = entry.base
            if agent.state is not AgentState.LIVE or entry.deadline <= now:
                continue
            live += 1
            capacity += agent.capacity
            active += entry.active_subtasks if entry.pending else agent.active_subtasks
            by_role[agent.role] += 1
            by_capability.update(agent.capabilities)
            by_skill.update({skill.id for skill in agent.skills})
            by_skill_tag.update({tag for skill in agent.skills for tag in skill.tags})
        return Summary(
            live,
            dict(by_role),
            dict(by_capability),
            dict(by_skill),
            dict(by_skill_tag),
            capacity,
            active,
        )

    async def watch(
        self, start_revision: int, query: AgentQuery
    ) -> AsyncIterator[tuple[list[AgentEvent], int]]:
        """Yield agent events matching ``query`` (its states ignored) after ``start_revision``.

        Each item is the events of one batch and the revision reached; the list is empty
        only in the first item, which comes once the watch is registered.
        """
        any_state = replace(query, states=frozenset(AgentState))

        def is_matching_agent_change(change: Change) -> bool:
            return change.service is Service.DISCOVERY and any_state.matches(
                Agent.from_snapshot(change.details["agent"])
            )

        async for batch in self._feed.watch(start_revision, is_matching_agent_change):
            events = [
                AgentEvent(
                    change.revision,
                    AgentEventKind(change.kind.removeprefix("agent.")),
                    Agent.from_snapshot(change.details["agent"]),
                    change,
                )
                for change in batch.changes
            ]
            yield events, batch.revision
