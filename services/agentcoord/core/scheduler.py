"""The scheduler's memory: what waits for an agent, and the agents as the scheduler sees them.

:class:`ReadyQueues` holds the READY sub-tasks in one priority queue per :class:`Needs` (the
required capabilities and skills; ``-priority``, task age, position in the task) and those
waiting out a retry back-off in a heap. A :class:`Slot` is an agent with its capacity, the
leases it holds (:class:`Held`), the grants in flight and its open StreamAssignments stream
(:class:`Stream`), whose messages are :class:`Assignment` and :class:`Revoked`.

Bookkeeping only, no I/O and no clock of its own: :mod:`agentcoord.core.distribution`
decides what to offer to whom and grants each lease in the store.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime

from agentcoord.core.errors import AgentcoordError
from agentcoord.core.tasks import Lease, RevocationReason, Subtask


@dataclass(frozen=True, slots=True)
class Assignment:
    """A lease for an agent, with the sub-task to work on."""

    lease: Lease
    subtask: Subtask
    trace_parent: str = ""
    """The task's :attr:`Task.trace_parent`: the agent continues that trace."""


@dataclass(frozen=True, slots=True)
class Revoked:
    """Notice that an agent lost a lease and must stop working on the sub-task."""

    subtask_id: str
    fencing_token: int
    reason: RevocationReason


@dataclass(slots=True)
class Held:
    """A lease this process knows of."""

    lease: Lease
    task_id: str
    deadline: float


class Stream:
    """The open StreamAssignments stream of one agent session."""

    def __init__(self, epoch: int) -> None:
        """Open the stream of session ``epoch``."""
        self.epoch = epoch
        self.queue: asyncio.Queue[Assignment | Revoked | AgentcoordError] = asyncio.Queue()

    def send(self, message: Assignment | Revoked | AgentcoordError) -> None:
        """Queue a message for the stream's handler."""
        self.queue.put_nowait(message)


@dataclass(slots=True)
class Slot:
    """An agent as the scheduler sees it."""

    agent_id: str
    epoch: int
    """The agent's current session; leases of earlier ones are released, never inherited."""
    capabilities: frozenset[str]
    capacity: int
    skills: frozenset[str] = frozenset()
    """Ids and tags of the agent's skills (:meth:`Agent.skill_names`)."""
    live: bool = True
    draining: bool = False
    held: dict[str, Held] = field(default_factory=dict)
    reserved: int = 0
    """Leases being granted (store write in flight)."""
    releasing: int = 0
    """Held leases being completed in the same store write as grants to refill them."""
    stream: Stream | None = None
    last_grant: int = 0
    """Sequence number of the latest grant; the lower, the longer it waited."""

    @property
    def load(self) -> int:
        """Leases held and being granted, less those being released by those grants."""
        return len(self.held) + self.reserved - self.releasing

    @property
    def free(self) -> int:
        """Leases it may still take."""
        return self.capacity - self.load

    @property
    def hungry(self) -> bool:
        """Whether leases may be pushed to it now."""
        return self.stream is not None and self.live and not self.draining and self.free > 0

    def rank(self) -> tuple[float, int, str]:
        """Least loaded first, then the one that waited longest."""
        return (self.load / self.capacity, self.last_grant, self.agent_id)


@dataclass(frozen=True, slots=True)
class Needs:
    """What an agent must offer to be leased a sub-task; READY sub-tasks queue by it."""

    capabilities: frozenset[str]
    skills: frozenset[str]
    """Skill ids or tags; each is met by a skill of the agent with that id or tag."""

    @classmethod
    def of(cls, subtask: Subtask) -> Needs:
        """Return what ``subtask`` requires."""
        return cls(frozenset(subtask.required_capabilities), frozenset(subtask.required_skills))

    def met_by(self, slot: Slot) -> bool:
        """Return whether the agent has every capability and offers every skill."""
        return self.capabilities <= slot.capabilities and self.skills <= slot.skills


QueueKey = tuple[int, float, int, str]
"""Order of a queue: higher priority, then older, then earlier in its task."""


def queue_key(subtask: Subtask) -> QueueKey:
    """Return the place of a READY sub-task in its queue (the lower, the sooner)."""
    return (-subtask.priority, subtask.create_time.timestamp(), subtask.seq, subtask.subtask_id)


class ReadyQueues:
    """READY sub-tasks by what they need, best first, and those waiting out a back-off."""

    def __init__(self) -> None:
        """Start empty."""
        self._ready: dict[str, Subtask] = {}
        """READY sub-tasks that may be leased now (not reserved, back-off passed)."""
        self._queues: dict[Needs, list[tuple[QueueKey, str]]] = {}
        self._delayed: list[tuple[datetime, str]] = []
        self._waiting: dict[str, Subtask] = {}
        """READY sub-tasks waiting out a back-off."""

    def depth(self) -> tuple[int, int]:
        """Return the sub-tasks that may be leased now, and those backing off."""
        return len(self._ready), len(self._waiting)

    def add(self, subtasks: Iterable[Subtask], now: datetime) -> list[Needs]:
        """Queue READY sub-tasks, or park those whose back-off lasts past ``now``.

        Returns the needs whose queues they joined, each once, in order.
        """
        groups: dict[Needs, None] = {}
        for subtask in subtasks:
            if subtask.next_attempt_time is not None and subtask.next_attempt_time > now:
                self._waiting[subtask.subtask_id] = subtask
                heapq.heappush(self._delayed, (subtask.next_attempt_time, subtask.subtask_id))
                continue
            self._ready[subtask.subtask_id] = subtask
            group = Needs.of(subtask)
            heapq.heappush(
                self._queues.setdefault(group, []), (queue_key(subtask), subtask.subtask_id)
            )
            groups[group] = None
        return list(groups)

    def due(self, now: datetime) -> list[Subtask]:
        """Take the parked sub-tasks whose back-off ended by ``now``, ready to queue."""
        due = []
        while self._delayed and self._delayed[0][0] <= now:
            _, subtask_id = heapq.heappop(self._delayed)
            subtask = self._waiting.pop(subtask_id, None)
            if subtask is not None:
                due.append(replace(subtask, next_attempt_time=None))
        return due

    def forget(self, subtask_id: str) -> None:
        """Drop a sub-task (lazily: heap entries are skipped later)."""
        self._ready.pop(subtask_id, None)
        self._waiting.pop(subtask_id, None)

    def take(self, subtask_id: str) -> None:
        """Take a sub-task out of its queue: a lease of it is being granted."""
        self._ready.pop(subtask_id, None)

    def head(self, group: Needs) -> Subtask | None:
        """Return the best leasable sub-task of a queue, dropping stale entries."""
        queue = self._queues.get(group)
        while queue:
            _, subtask_id = queue[0]
            subtask = self._ready.get(subtask_id)
            if subtask is None:
                heapq.heappop(queue)
                continue
            return subtask
        if queue is not None:
            del self._queues[group]
        return None

    def best_for(self, slot: Slot) -> Subtask | None:
        """Return the best head among the queues whose needs the agent meets."""
        best: Subtask | None = None
        for group in list(self._queues):
            if not group.met_by(slot):
                continue
            subtask = self.head(group)
            if subtask is not None and (best is None or queue_key(subtask) < queue_key(best)):
                best = subtask
        return best
