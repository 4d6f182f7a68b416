"""Distribution: tasks in, leases out; the scheduler that matches READY sub-tasks to agents.

The store is the truth: every lease, completion, failure and cancellation is a store
operation that checks the sub-task's state and fencing token inside its transaction, so
no sub-task succeeds twice whatever this process believes. This process keeps a mirror
for speed, rebuilt from the store at start and updated from each operation's result:

- READY sub-tasks in one priority queue per set of required capabilities and skills
  (``-priority``, task age, position in the task), and sub-tasks waiting out a retry
  back-off in a heap (:class:`~agentcoord.core.scheduler.ReadyQueues`);
- the agents Discovery knows, from the change log, with the leases each one holds
  (:class:`~agentcoord.core.scheduler.Slot`);
- lease deadlines on the monotonic clock, renewed by heartbeats that name the sub-task
  (Discovery calls :meth:`Distribution.renew_leases`). Each renewal is also written to the
  lease's record (coalesced, one write at a time), so that a fenced StateSync write, in any
  process, is checked against the lease's real expire time in its own transaction.

Assignment never scans every sub-task or agent: a new READY sub-task is offered to the
agents that meet its needs only (every required capability, and for every required skill
a skill with that id or tag), least loaded first (held leases / capacity, ties to the
agent that waited longest); an agent with free capacity takes the best head among the
queues whose needs it meets. Leases are pushed to agents with an
open StreamAssignments stream; ClaimSubtask pulls from the same queues. It must run in a
process that hosts Discovery (liveness and heartbeats).

Replicas on one shared store (``Store.shared``) each keep such a mirror of the whole
cluster: besides its own operations' results, each follows the sub-task changes of the
change log and reads the sub-tasks that other processes changed, so work submitted
anywhere is queued everywhere and every agent's leases count wherever it is served. The
mirror only proposes: the lease transaction decides (the sub-task must still be READY,
the session below its capacity), and the loser of a race drops the sub-task and takes
the next. A lease is judged by its stored expire time, which the replica holding the
holder's heartbeats renews.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta

from agentcoord.core.changes import ChangeFeed, WatchBatch, check_retained
from agentcoord.core.clock import Clock
from agentcoord.core.discovery import Session
from agentcoord.core.errors import (
    AgentcoordError,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from agentcoord.core.loops import run_periodically
from agentcoord.core.models import Agent, AgentEventKind, AgentState, AgentStatus, Change, Service
from agentcoord.core.scheduler import (
    Assignment,
    Held,
    Needs,
    ReadyQueues,
    Revoked,
    Slot,
    Stream,
)
from agentcoord.core.splitter import Splitter
from agentcoord.core.statesync import Liveness
from agentcoord.core.store import Store
from agentcoord.core.task_rules import (
    LeaseRenewal,
    RetryPolicy,
    TaskDefaults,
    TaskUpdate,
    aggregate_result,
    build_task,
    check_capacity,
    check_plan,
    plan_of,
    task_after,
)
from agentcoord.core.tasks import (
    Caller,
    Failure,
    FailureClass,
    Lease,
    Plan,
    RevocationReason,
    SplitPolicy,
    Subtask,
    SubtaskState,
    Task,
    TaskCursor,
    TaskFilter,
    TaskSpec,
    TaskState,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DistributionConfig:
    """Defaults and timing of Distribution."""

    defaults: TaskDefaults = field(default_factory=TaskDefaults)
    """Attempts and lease TTL of tasks that ask for none."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Back-off of retried sub-tasks."""
    sweep_interval: float = 0.1
    """Seconds between sweeps of lease expiries and finished back-offs."""
    recent_window: float = 30.0
    """Seconds the revision of each sub-task absorbed is remembered at least, so that a read
    of another process's change that raced with a newer local result is not applied."""
    max_claim_wait: float = 60.0
    """Longest ``wait`` of ClaimSubtask."""


@dataclass(frozen=True, slots=True)
class Connected:
    """The stream is registered: leases granted from now on are pushed to it."""


AssignmentMessage = Connected | Assignment | Revoked
"""What :meth:`Distribution.assignments` yields (``Connected`` first)."""


@dataclass(frozen=True, slots=True)
class TaskView:
    """A task as read, with its sub-tasks when asked for and its aggregated result."""

    task: Task
    subtasks: tuple[Subtask, ...] | None
    """Every sub-task in task order (FULL view), or None (BASIC view)."""
    result: str | None
    """Canonical JSON of the aggregated result once SUCCEEDED."""


@dataclass(frozen=True, slots=True)
class TaskWatchItem:
    """One step of WatchTask: transitions (empty in the first) and the task after them."""

    changes: Sequence[Change]
    view: TaskView
    """The task (without sub-tasks) after the transitions."""
    revision: int
    subtasks: tuple[Subtask, ...] = ()
    """FULL watches: every sub-task in the first step, then those the transitions changed."""


class StreamReplaced(FailedPrecondition):
    """A newer StreamAssignments stream of the same agent replaced this one."""


class SessionEnded(FailedPrecondition):
    """The agent's session ended while its stream was open."""


class Repeated(Exception):
    """A claim's request id is on a lease the session holds: that claim was made before."""

    def __init__(self, subtask_id: str) -> None:
        """The claim's lease is of sub-task ``subtask_id``."""
        super().__init__(subtask_id)
        self.subtask_id = subtask_id


class Distribution:
    """The Distribution domain service and its scheduler."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        feed: ChangeFeed,
        config: DistributionConfig,
        splitter: Splitter,
        is_live: Liveness,
    ) -> None:
        """Wire the service; call :meth:`start` before use."""
        self._store = store
        self._clock = clock
        self._feed = feed
        self.config = config
        self.splitter = splitter
        self._is_live = is_live
        self._slots: dict[str, Slot] = {}
        self._queues = ReadyQueues()
        self._capable: dict[Needs, list[str]] = {}
        """Agents (ids) meeting the needs of each queue."""
        self._held: dict[str, Held] = {}
        self._deadlines: list[tuple[float, str, int]] = []
        self._granted: dict[tuple[str, int], tuple[str, ...]] = {}
        """Sub-tasks a CompleteSubtask with lease_next leased, for its repeats, by (sub-task
        id, fencing token). A ClaimSubtask's request id is kept in its lease instead."""
        self._renewals: dict[str, LeaseRenewal] = {}
        """Renewals not yet written to the store, by sub-task (the latest of each)."""
        self._renewed = asyncio.Event()
        self._grants = itertools.count(1)
        self._work_arrived = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._agents_revision = 0
        self._seen: dict[str, int] = {}
        """Revision of each sub-task absorbed lately (with ``_seen_before``)."""
        self._seen_before: dict[str, int] = {}
        self._seen_since = 0.0
        self._unreleased: dict[str, int] = {}
        """Agents whose ended sessions' leases (through that epoch) are not released yet."""

    def queue_depth(self) -> tuple[int, int]:
        """Return the READY sub-tasks waiting for an agent, and those backing off."""
        return self._queues.depth()

    # Start and background work

    async def start(self) -> None:
        """Rebuild the mirror from the store.

        A lease whose stored expire time is still ahead on a shared store keeps it (another
        replica may be renewing it); any other lease held gets a full TTL from now, so its
        agent has time to reconnect after the server was down.
        """
        self._agents_revision = await self._store.current_revision()
        self._seen_since = self._clock.monotonic()
        for agent, _ in await self._store.load_agents():
            if agent.state is AgentState.LIVE:
                self._slots[agent.agent_id] = self._slot_of(agent)
        now = self._clock.monotonic()
        for subtask in await self._store.load_open_subtasks():
            if subtask.state is SubtaskState.READY:
                self._enqueue(subtask)
            elif subtask.lease is not None:
                lease = subtask.lease
                slot = self._slots.get(lease.agent_id)
                if slot is None:
                    slot = Slot(lease.agent_id, lease.epoch, frozenset(), 1, live=False)
                    self._slots[lease.agent_id] = slot
                if self._store.shared and lease.expire_time > self._clock.now():
                    deadline = self._deadline_of(lease)
                else:
                    deadline = now + lease.ttl
                    self._queue_renewal(lease, lease.ttl)
                self._track(slot, lease, subtask.task_id, deadline)
        await self._write_renewals()  # the stored expire times of the full TTLs just given

    @staticmethod
    def _slot_of(agent: Agent) -> Slot:
        return Slot(
            agent.agent_id,
            agent.epoch,
            frozenset(agent.capabilities),
            max(agent.capacity, 1),
            agent.skill_names(),
            draining=agent.status is AgentStatus.DRAINING,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Follow agent changes and sweep leases and back-offs until ``stop`` is set."""
        helpers = [
            asyncio.create_task(self._follow_agents(), name="distribution-agents"),
            asyncio.create_task(self._keep_renewals(), name="distribution-renewals"),
        ]
        if self._store.shared:
            helpers.append(
                asyncio.create_task(self._follow_subtasks(), name="distribution-subtasks")
            )
        try:
            # Leases of sessions that ended while the server was down.
            for slot in list(self._slots.values()):
                stale = [h.lease.epoch for h in slot.held.values() if _is_stale(slot, h.lease)]
                if stale:
                    await self._release(slot.agent_id, max(stale))
            await run_periodically(stop, self.config.sweep_interval, self.sweep, "lease sweep")
        finally:
            for helper in helpers:
                helper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await helper
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _follow_agents(self) -> None:
        def is_agent_change(change: Change) -> bool:
            return change.service is Service.DISCOVERY and change.kind.startswith("agent.")

        async def handle(batch: WatchBatch) -> None:
            for change in batch.changes:
                try:
                    await self._on_agent_change(change)
                except Exception:
                    log.exception("distribution: handling %s failed", change.kind)

        await self._follow(is_agent_change, handle, "agent changes")

    async def _follow(
        self,
        matches: Callable[[Change], bool],
        handle: Callable[[WatchBatch], Awaitable[None]],
        name: str,
    ) -> None:
        """Hand ``handle`` each batch of matching changes after the loaded revision, forever.

        From the revision the agents were loaded at, so no change in between is missed. A
        store outage while catching up does not end the follower: it logs once, waits a
        sweep interval and resumes after the last batch it handled.
        """
        revision = self._agents_revision
        failing = False
        while True:
            try:
                async for batch in self._feed.watch(revision, matches):
                    await handle(batch)
                    revision, failing = batch.revision, False
            except Unavailable as error:
                if not failing:
                    log.warning("distribution following %s: %s", name, error.message)
                failing = True
                await asyncio.sleep(self.config.sweep_interval)

    async def _follow_subtasks(self) -> None:
        """Absorb the sub-tasks other processes changed, as they stand in the store."""

        def is_subtask_change(change: Change) -> bool:
            return change.service is Service.DISTRIBUTION and change.kind.startswith("subtask.")

        async def handle(batch: WatchBatch) -> None:
            # The operations of this process whose changes these are resume first and
            # absorb their own results: those changes are no news by then.
            await asyncio.sleep(0)
            latest: dict[str, int] = {}
            for change in batch.changes:
                latest[change.details["subtask_id"]] = change.revision
            news = [i for i, revision in latest.items() if self._absorbed(i) < revision]
            try:
                if news:
                    await self._absorb_others(await self._store.get_subtasks(news))
            except Exception:
                log.exception("distribution: reading sub-tasks changed elsewhere failed")

        await self._follow(is_subtask_change, handle, "sub-task changes")

    async def _absorb_others(self, subtasks: Sequence[Subtask]) -> None:
        """Absorb sub-tasks another process changed; revoke the leases that ended there."""
        ended = {
            s.task_id
            for s in subtasks
            if s.state is SubtaskState.CANCELLED and s.subtask_id in self._held
        }
        cancelled = {
            task_id
            for task_id in ended
            if (task := await self._store.get_task(task_id)) is not None
            and task.state is TaskState.CANCELLED
        }

        def reason(subtask: Subtask, held: Held) -> RevocationReason | None:
            if subtask.state is SubtaskState.CANCELLED:
                if subtask.task_id in cancelled:
                    return RevocationReason.TASK_CANCELLED
                return RevocationReason.TASK_FAILED
            failure = subtask.last_failure
            if (
                failure is not None
                and failure.failure_class is FailureClass.LEASE_LOST
                and failure.fencing_token == held.lease.fencing_token
            ):
                return RevocationReason.LEASE_EXPIRED
            return None

        self._absorb_subtasks(subtasks, reason)

    async def _on_agent_change(self, change: Change) -> None:
        agent = Agent.from_snapshot(change.details["agent"])
        kind = AgentEventKind(change.kind.removeprefix("agent."))
        slot = self._slots.get(agent.agent_id)
        if kind in (AgentEventKind.LEFT, AgentEventKind.EXPIRED):
            if slot is not None and slot.epoch <= agent.epoch:
                slot.live = False
                self._end_stream(slot, f"agent {agent.agent_id!r} {kind.value}")
            await self._release(agent.agent_id, agent.epoch)
            return
        if slot is None:
            self._slots[agent.agent_id] = slot = self._slot_of(agent)
        elif slot.epoch < agent.epoch:
            await self._new_session(slot, agent)
        elif slot.epoch > agent.epoch:
            return  # a change of a session already replaced
        else:
            _refresh(slot, agent)
        self._capable.clear()  # needs are re-matched lazily
        self._feed_agent(slot)

    def _end_stream(self, slot: Slot, why: str) -> None:
        """Revoke the leases of the slot's session on its stream, and end the stream."""
        stream = slot.stream
        if stream is None:
            return
        for held in sorted(slot.held.values(), key=lambda h: h.lease.fencing_token):
            if held.lease.epoch == stream.epoch:
                stream.send(
                    Revoked(
                        held.lease.subtask_id,
                        held.lease.fencing_token,
                        RevocationReason.SESSION_ENDED,
                    )
                )
        stream.send(SessionEnded(f"{why}: its session ended", reason="SESSION_ENDED"))
        slot.stream = None

    async def _new_session(self, slot: Slot, agent: Agent) -> None:
        """Move a slot to the agent's newer session: the earlier one's leases are released.

        They are revoked on the earlier session's stream and offered again without
        burning an attempt (AGENT_DIED): a new session never inherits them.
        """
        self._end_stream(slot, f"session {slot.epoch} of agent {agent.agent_id!r} was replaced")
        slot.epoch = agent.epoch
        _refresh(slot, agent)
        self._capable.clear()
        await self._release(agent.agent_id, agent.epoch - 1)

    async def _release(self, agent_id: str, through_epoch: int) -> None:
        """Return the leases of ended sessions (1..``through_epoch``) to READY (AGENT_DIED).

        Until the store records it, the agent stays in ``_unreleased`` for the sweep.
        """
        through_epoch = max(through_epoch, self._unreleased.get(agent_id, 0))
        self._unreleased[agent_id] = through_epoch
        updates = await self._store.release_leases(
            agent_id, self._clock.now(), through_epoch=through_epoch
        )
        if self._unreleased.get(agent_id) == through_epoch:
            del self._unreleased[agent_id]
        for update in updates:
            self._absorb(update)
        slot = self._slots.get(agent_id)
        if slot is not None and not slot.live and not slot.held and slot.stream is None:
            del self._slots[agent_id]
            self._capable.clear()

    async def sweep(self) -> None:
        """Expire overdue leases and make sub-tasks whose back-off ended leasable.

        Neither a lease expiry nor the release of a dead agent's leases is dropped when
        the store fails to record it: the lease stays due, the agent stays to be released,
        and the next sweep tries again. An overdue lease is refused meanwhile
        (``LEASE_EXPIRED``).

        Only the leader of the processes sharing the store (:meth:`Store.is_leader`)
        expires leases; the others keep the deadlines, to expire them once they lead.

        Raises:
            Exception: the store failed to record an expiry or a release.
        """
        for agent_id, through_epoch in list(self._unreleased.items()):
            await self._release(agent_id, through_epoch)
        now = self._clock.monotonic()
        leading = self._store.is_leader()
        while leading and self._deadlines and self._deadlines[0][0] <= now:
            _, subtask_id, token = heapq.heappop(self._deadlines)
            held = self._held.get(subtask_id)
            if held is None or held.lease.fencing_token != token:
                continue
            if held.deadline > now:
                heapq.heappush(self._deadlines, (held.deadline, subtask_id, token))
                continue
            try:
                await self._expire(held)
            except Exception:
                heapq.heappush(self._deadlines, (held.deadline, subtask_id, token))
                raise
        if now - self._seen_since >= self.config.recent_window:
            self._seen_before, self._seen = self._seen, {}
            self._seen_since = now
        for subtask in self._queues.due(self._clock.now()):
            self._enqueue(subtask)

    async def _expire(self, held: Held) -> None:
        lease = held.lease
        failure = Failure(
            failure_class=FailureClass.LEASE_LOST,
            message=f"lease expired: not renewed within {lease.ttl:g} s",
            retryable=True,
            subtask_id=lease.subtask_id,
            agent_id=lease.agent_id,
            attempt=lease.attempt,
            time=self._clock.now(),
        )
        try:
            update = await self._store.fail_subtask(
                failure, lease.fencing_token, self.config.retry, epoch=lease.epoch
            )
        except FailedPrecondition as error:
            if error.reason == "LEASE_RENEWED":  # through another replica: judge it again
                await self._rejudge(held)
                return
            update = None  # ended meanwhile; the operation that ended it updated the mirror
        slot = self._slots.get(lease.agent_id)
        if slot is not None and slot.stream is not None and slot.stream.epoch == lease.epoch:
            slot.stream.send(
                Revoked(lease.subtask_id, lease.fencing_token, RevocationReason.LEASE_EXPIRED)
            )
        if update is not None:
            self._absorb(update)

    async def _rejudge(self, held: Held) -> None:
        """Give a lease renewed elsewhere the deadline of its stored expire time."""
        subtask = await self._store.get_subtask(held.lease.subtask_id)
        lease = None if subtask is None else subtask.lease
        if lease is None or lease.fencing_token != held.lease.fencing_token:
            return  # ended meanwhile: its change brings the mirror up to date
        held.deadline = self._deadline_of(lease)
        held.lease = lease
        heapq.heappush(self._deadlines, (held.deadline, lease.subtask_id, lease.fencing_token))

    def _deadline_of(self, lease: Lease) -> float:
        """Return the monotonic deadline of a lease's stored expire time."""
        remaining = (lease.expire_time - self._clock.now()).total_seconds()
        return self._clock.monotonic() + max(0.0, remaining)

    # The mirror

    def _absorbed(self, subtask_id: str) -> int:
        """Return the revision of the sub-task absorbed lately (0: none)."""
        return max(self._seen.get(subtask_id, 0), self._seen_before.get(subtask_id, 0))

    def _enqueue(self, subtask: Subtask) -> None:
        """Queue a READY sub-task (or park it until its back-off ends) and offer it."""
        self._enqueue_all([subtask])

    def _enqueue_all(self, subtasks: Sequence[Subtask]) -> None:
        """Queue READY sub-tasks, then offer each queue they joined once."""
        groups = self._queues.add(subtasks, self._clock.now())
        if not groups:
            return
        for group in groups:
            self._offer(group)
        self._work_arrived.set()
        self._work_arrived = asyncio.Event()

    def _track(self, slot: Slot, lease: Lease, task_id: str, deadline: float) -> None:
        held = Held(lease, task_id, deadline)
        slot.held[lease.subtask_id] = held
        self._held[lease.subtask_id] = held
        heapq.heappush(self._deadlines, (deadline, lease.subtask_id, lease.fencing_token))

    def _untrack(self, subtask_id: str) -> Slot | None:
        held = self._held.pop(subtask_id, None)
        if held is None:
            return None
        slot = self._slots.get(held.lease.agent_id)
        if slot is not None:
            slot.held.pop(subtask_id, None)
        return slot

    def _absorb(self, update: TaskUpdate) -> None:
        """Bring the mirror up to date with what a store operation of this process did."""
        self._absorb_subtasks(update.changed, lambda _subtask, _held: None)
        for revocation in update.revocations:
            slot = self._slots.get(revocation.lease.agent_id)
            if (
                slot is not None
                and slot.stream is not None
                and slot.stream.epoch == revocation.lease.epoch
            ):
                slot.stream.send(
                    Revoked(
                        revocation.lease.subtask_id,
                        revocation.lease.fencing_token,
                        RevocationReason(revocation.reason),
                    )
                )

    def _absorb_subtasks(
        self,
        subtasks: Sequence[Subtask],
        revoke: Callable[[Subtask, Held], RevocationReason | None],
    ) -> None:
        """Bring the mirror up to date with sub-tasks as stored (older ones are skipped).

        A lease tracked here that ended is untracked (and revoked on its holder's stream
        when ``revoke`` gives a reason); a lease not tracked yet, granted elsewhere, is
        tracked by its stored expire time; READY sub-tasks are queued.
        """
        freed: dict[str, Slot] = {}
        fresh: list[Subtask] = []
        for subtask in subtasks:
            if subtask.revision <= self._absorbed(subtask.subtask_id):
                continue  # a newer state was absorbed already
            self._seen[subtask.subtask_id] = subtask.revision
            fresh.append(subtask)
            held = self._held.get(subtask.subtask_id)
            lease = subtask.lease if subtask.state is SubtaskState.LEASED else None
            if held is not None and (
                lease is None or lease.fencing_token != held.lease.fencing_token
            ):
                slot = self._untrack(subtask.subtask_id)
                reason = revoke(subtask, held)
                if slot is not None:
                    freed[slot.agent_id] = slot
                    stream = slot.stream
                    if (
                        reason is not None
                        and stream is not None
                        and stream.epoch == held.lease.epoch
                    ):
                        stream.send(
                            Revoked(held.lease.subtask_id, held.lease.fencing_token, reason)
                        )
            self._queues.forget(subtask.subtask_id)
            if lease is not None and subtask.subtask_id not in self._held:
                slot = self._slots.get(lease.agent_id)
                if slot is None:  # its join is on the way through the change log
                    slot = Slot(lease.agent_id, lease.epoch, frozenset(), 1, live=False)
                    self._slots[lease.agent_id] = slot
                self._track(slot, lease, subtask.task_id, self._deadline_of(lease))
        self._enqueue_all([s for s in fresh if s.state is SubtaskState.READY])
        for slot in freed.values():
            if not slot.live and not slot.held and slot.stream is None:
                self._slots.pop(slot.agent_id, None)
                self._capable.clear()
            else:
                self._feed_agent(slot)

    # Matching

    def _capable_of(self, group: Needs) -> list[str]:
        agents = self._capable.get(group)
        if agents is None:
            agents = [a for a, slot in self._slots.items() if group.met_by(slot)]
            self._capable[group] = agents
        return agents

    def _offer(self, group: Needs) -> None:
        """Push the queue's sub-tasks to the hungry agents meeting its needs, least loaded first."""
        while True:
            subtask = self._queues.head(group)
            if subtask is None:
                return
            hungry = [
                slot
                for agent_id in self._capable_of(group)
                if (slot := self._slots[agent_id]).hungry
            ]
            if not hungry:
                return
            slot = min(hungry, key=Slot.rank)
            avoided = _last_failed_agent(subtask)
            if slot.agent_id == avoided and len(hungry) > 1:
                slot = min((s for s in hungry if s.agent_id != avoided), key=Slot.rank)
            self._reserve_and_grant(slot, subtask)

    def _feed_agent(self, slot: Slot) -> None:
        """Push work to an agent that has free capacity, best sub-task first."""
        while slot.hungry:
            subtask = self._queues.best_for(slot)
            if subtask is None:
                return
            self._reserve_and_grant(slot, subtask)

    def _reserve(self, slot: Slot, subtask: Subtask) -> None:
        self._queues.take(subtask.subtask_id)
        slot.reserved += 1
        slot.last_grant = next(self._grants)

    def _reserve_and_grant(self, slot: Slot, subtask: Subtask) -> None:
        self._reserve(slot, subtask)
        task = asyncio.create_task(self._push(slot, subtask))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _push(self, slot: Slot, subtask: Subtask) -> None:
        try:
            assignment = await self._grant(slot, subtask)
        except (ResourceExhausted, SessionEnded):
            return  # its leases, or its end, from elsewhere are on the way (the change log)
        if assignment is not None:
            if slot.stream is not None and slot.stream.epoch == assignment.lease.epoch:
                slot.stream.send(assignment)
            # Otherwise the stream closed meanwhile: the lease is re-sent when it reopens
            # (or, granted to a session replaced meanwhile, it is being released).
        elif slot.hungry:
            self._feed_agent(slot)

    async def _grant(
        self, slot: Slot, subtask: Subtask, claim_request_id: str = ""
    ) -> Assignment | None:
        """Lease a reserved sub-task to ``slot``'s agent in the store.

        Raises:
            Repeated: the lease of the claim ``claim_request_id`` is held already (granted
                through another process, say): that sub-task's id.
            ResourceExhausted: the agent holds its capacity of leases, some granted by
                another process that this one has not heard of yet.
            SessionEnded: the slot's session ended (replaced through another process,
                say); its end is on the way through the change log.
        """
        try:
            if not await self._is_live(slot.agent_id):
                slot.live = False  # its expiry is on the way through the change log
                update = None
            else:
                update = await self._store.lease_subtask(
                    subtask.subtask_id,
                    slot.agent_id,
                    self._clock.now(),
                    epoch=slot.epoch,
                    capacity=slot.capacity,
                    claim_request_id=claim_request_id,
                )
        except FailedPrecondition as error:
            if error.reason == "CLAIM_REPEATED":
                self._enqueue(subtask)
                raise Repeated(error.metadata["subtask_id"]) from None
            if error.reason != "SESSION_ENDED":
                return None  # cancelled or leased meanwhile: the store knows best
            self._enqueue(subtask)
            raise SessionEnded(
                error.message, reason=error.reason, metadata=error.metadata
            ) from None
        except ResourceExhausted:
            self._enqueue(subtask)
            raise
        except Exception:
            log.exception("leasing sub-task %s failed; retrying in 1 s", subtask.subtask_id)
            retry_at = self._clock.now() + timedelta(seconds=1)
            update, subtask = None, replace(subtask, next_attempt_time=retry_at)
        finally:
            slot.reserved -= 1
        if update is None:
            self._enqueue(subtask)
            return None
        self._absorb(update)
        return self._held_assignment(update)

    def _held_assignment(self, update: TaskUpdate) -> Assignment | None:
        """Return the assignment of a lease just granted and absorbed, unless it ended."""
        leased = update.subtask
        assert leased is not None and leased.lease is not None
        held = self._held.get(leased.subtask_id)
        if held is None or held.lease.fencing_token != leased.lease.fencing_token:
            return None  # ended meanwhile, as another process's change already told
        return Assignment(leased.lease, leased, update.task.trace_parent)

    # Agent-facing calls

    async def _slot_for(self, session: Session, agent_id: str) -> Slot:
        session.check_acts_as(agent_id)
        slot = self._slots.get(session.agent_id)
        if slot is None or not slot.live or slot.epoch != session.epoch:
            agent = await self._store.get_agent(session.agent_id)
            if agent is None or agent.state is not AgentState.LIVE or agent.epoch != session.epoch:
                raise SessionEnded(
                    f"agent_id: session {session.epoch} of agent {session.agent_id!r} has ended",
                    reason="SESSION_ENDED",
                )
            if slot is None:
                self._slots[agent.agent_id] = slot = self._slot_of(agent)
                self._capable.clear()
            elif slot.epoch != agent.epoch:  # the change feed has not brought the join yet
                await self._new_session(slot, agent)
            else:
                _refresh(slot, agent)
        return slot

    async def assignments(
        self, session: Session, agent_id: str
    ) -> AsyncIterator[AssignmentMessage]:
        """Stream leases to the agent: ``Connected``, those it holds, then new ones as granted.

        Raises:
            StreamReplaced: a newer stream of the same agent took over.
            SessionEnded: the agent's session ended.
        """
        slot = await self._slot_for(session, agent_id)
        if slot.stream is not None:
            slot.stream.send(
                StreamReplaced(
                    f"agent_id: a newer StreamAssignments stream of {slot.agent_id!r} replaced "
                    "this one",
                    reason="STREAM_REPLACED",
                )
            )
        stream = Stream(session.epoch)
        slot.stream = stream
        try:
            yield Connected()
            # A lease granted while these are sent is queued on the stream too: sent once.
            resent: set[int] = set()
            for held in sorted(slot.held.values(), key=lambda h: h.lease.fencing_token):
                if held.lease.epoch != session.epoch:
                    continue  # an earlier session's, being released
                subtask = await self._store.get_subtask(held.lease.subtask_id)
                if subtask is not None and subtask.state is SubtaskState.LEASED:
                    resent.add(held.lease.fencing_token)
                    yield await self._assignment(self._live_lease(held), subtask)
            self._feed_agent(slot)
            while True:
                message = await stream.queue.get()
                if isinstance(message, AgentcoordError):
                    raise message
                if isinstance(message, Assignment) and message.lease.fencing_token in resent:
                    resent.discard(message.lease.fencing_token)
                    continue
                yield message
        finally:
            if slot.stream is stream:
                slot.stream = None

    async def _assignment(self, lease: Lease, subtask: Subtask) -> Assignment:
        """Return a lease held before, again, with its task's trace context."""
        task = await self._store.get_task(subtask.task_id)
        return Assignment(lease, subtask, task.trace_parent if task is not None else "")

    def _live_lease(self, held: Held) -> Lease:
        """Return a lease with the expiry this process judges it by."""
        remaining = max(0.0, held.deadline - self._clock.monotonic())
        return replace(held.lease, expire_time=self._clock.now() + timedelta(seconds=remaining))

    async def claim(
        self, session: Session, agent_id: str, wait: float, request_id: str
    ) -> Assignment | None:
        """Lease the best sub-task for the agent, waiting up to ``wait`` seconds for one.

        Raises:
            ResourceExhausted: the agent holds as many leases as its capacity.
        """
        slot = await self._slot_for(session, agent_id)
        if request_id:
            for held in list(slot.held.values()):  # granted here, or through another process
                if held.lease.claim_request_id == request_id and held.lease.epoch == slot.epoch:
                    subtask = await self._store.get_subtask(held.lease.subtask_id)
                    # The store has the last word: a lease that ended through another
                    # process, whose end this one has not heard of yet, is not returned.
                    if (
                        subtask is not None
                        and subtask.state is SubtaskState.LEASED
                        and subtask.lease is not None
                        and subtask.lease.fencing_token == held.lease.fencing_token
                    ):
                        return await self._assignment(self._live_lease(held), subtask)
        deadline = self._clock.monotonic() + min(wait, self.config.max_claim_wait)
        while True:
            # Checked again after each wait (a stream may have filled it); the lease
            # transaction checks it again against every lease stored.
            check_capacity(slot.agent_id, slot.load, slot.capacity)
            subtask = self._queues.best_for(slot)
            if subtask is not None:
                self._reserve(slot, subtask)
                try:
                    assignment = await self._grant(slot, subtask, request_id)
                except Repeated as repeated:  # not heard of here yet: the store has it
                    return await self._held_claim(repeated.subtask_id, slot)
                if assignment is not None:
                    return assignment
                continue
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                return None
            arrived = self._work_arrived
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await arrived.wait()

    async def _held_claim(self, subtask_id: str, slot: Slot) -> Assignment | None:
        """Return the assignment of the lease of a repeated claim, as the store has it."""
        subtask = await self._store.get_subtask(subtask_id)
        if subtask is None or subtask.lease is None or subtask.state is not SubtaskState.LEASED:
            return None  # it ended meanwhile
        if subtask.lease.agent_id != slot.agent_id or subtask.lease.epoch != slot.epoch:
            return None
        return await self._assignment(subtask.lease, subtask)

    async def _granted_before(
        self, slot: Slot, epoch: int, key: tuple[str, int]
    ) -> list[Assignment]:
        """Return the leases granted for the request ``key`` that session ``epoch`` still holds."""
        assignments = []
        for subtask_id in self._granted.get(key, ()):
            held = slot.held.get(subtask_id)
            if held is not None and held.lease.epoch == epoch:
                subtask = await self._store.get_subtask(subtask_id)
                if subtask is not None:
                    assignments.append(await self._assignment(self._live_lease(held), subtask))
        return assignments

    async def complete(
        self,
        session: Session,
        agent_id: str,
        subtask_id: str,
        fencing_token: int,
        result: str,
        lease_next: int = 0,
    ) -> tuple[TaskUpdate, list[Assignment]]:
        """Record the result of a leased sub-task, and lease the agent its next ones.

        In the completion's transaction (the store's ``complete_and_lease``) the agent is
        leased up to ``lease_next`` of the best READY sub-tasks for it, returned with the
        completion; with ``lease_next`` 0 and an open stream, those that refill its freed
        capacity are leased there too and pushed on the stream instead. A repeat of a
        recorded completion returns the leases its first call granted that are still held.
        The work runs to its end even if the caller is cancelled meanwhile, so that the
        mirror knows every lease the store granted.
        """
        session.check_acts_as(agent_id)
        return await asyncio.shield(
            self._complete(session, subtask_id, fencing_token, result, lease_next)
        )

    async def _complete(
        self, session: Session, subtask_id: str, fencing_token: int, result: str, lease_next: int
    ) -> tuple[TaskUpdate, list[Assignment]]:
        slot = self._slots.get(session.agent_id)
        if slot is None or not slot.live or slot.epoch != session.epoch:
            slot = None
        elif (lease_next or slot.stream is not None) and not await self._is_live(slot.agent_id):
            slot = None  # as for a grant: no lease to an agent whose expiry is on the way
        push = (
            not lease_next
            and slot is not None
            and slot.stream is not None
            and slot.stream.epoch == session.epoch
            and not slot.draining
        )
        candidates: list[Subtask] = []
        if slot is not None and (lease_next or push):
            free = slot.free + (subtask_id in slot.held)  # once this lease is released
            for _ in range(min(lease_next, free) if lease_next else free):
                candidate = self._queues.best_for(slot)
                if candidate is None:
                    break
                self._reserve(slot, candidate)
                candidates.append(candidate)
        # Until the store answers, the lease being completed no longer counts against the
        # capacity its successors were reserved in (a claim waiting meanwhile sees its room).
        releasing = bool(candidates) and slot is not None and subtask_id in slot.held
        if releasing:
            assert slot is not None
            slot.releasing += 1
        try:
            done = await self._store.complete_and_lease(
                subtask_id,
                session.agent_id,
                fencing_token,
                result,
                self._clock.now(),
                epoch=session.epoch,
                candidates=[c.subtask_id for c in candidates],
                capacity=slot.capacity if slot is not None else 0,
            )
        except BaseException:
            self._unreserve(slot, candidates, candidates, releasing)
            raise
        for lease in done.leases:  # tracked before the reservations and the lease end
            self._absorb(lease)
        untried = set(done.untried)
        again = [c for c in candidates if c.subtask_id in untried]
        self._unreserve(slot, candidates, again, releasing)
        self._absorb(done.completion)
        self._forget_grants(subtask_id)
        assignments = [a for lease in done.leases if (a := self._held_assignment(lease))]
        if push:
            assert slot is not None
            for assignment in assignments:
                if slot.stream is not None and slot.stream.epoch == session.epoch:
                    slot.stream.send(assignment)
            return done.completion, []
        if lease_next and slot is not None:
            key = (subtask_id, fencing_token)
            if not done.completion.changed:
                assignments = await self._granted_before(slot, session.epoch, key)
            elif assignments:
                self._granted[key] = tuple(a.lease.subtask_id for a in assignments)
        return done.completion, assignments

    def _unreserve(
        self,
        slot: Slot | None,
        reserved: Sequence[Subtask],
        untried: Sequence[Subtask],
        releasing: bool,
    ) -> None:
        """End the slot's reservations; queue the ``untried`` again (no lease was tried).

        The others were leased, or refused as no longer READY: the store knows best.
        """
        if slot is None or not reserved:
            return
        slot.reserved -= len(reserved)
        slot.releasing -= releasing
        self._enqueue_all(untried)

    async def fail(
        self,
        session: Session,
        agent_id: str,
        subtask_id: str,
        fencing_token: int,
        *,
        message: str,
        retryable: bool,
        failure_class: FailureClass,
        details: str | None,
    ) -> TaskUpdate:
        """Record a failed attempt reported by the lease holder."""
        session.check_acts_as(agent_id)
        if failure_class.set_by_server:
            raise InvalidInput(
                "failure_class", "must be FAILURE_CLASS_TASK_ERROR or FAILURE_CLASS_TIMEOUT"
            )
        held = self._held.get(subtask_id)
        failure = Failure(
            failure_class=failure_class,
            message=message,
            retryable=retryable,
            subtask_id=subtask_id,
            agent_id=session.agent_id,
            attempt=held.lease.attempt if held is not None else 0,
            time=self._clock.now(),
            details=details,
        )
        update = await self._store.fail_subtask(
            failure, fencing_token, self.config.retry, epoch=session.epoch
        )
        self._absorb(update)
        self._forget_grants(subtask_id)
        return update

    def _forget_grants(self, subtask_id: str) -> None:
        """Forget the requests whose leases include one that just ended."""
        for key in [k for k, ids in self._granted.items() if subtask_id in ids]:
            del self._granted[key]

    def renew_leases(self, session: Session, subtask_ids: Sequence[str]) -> None:
        """Renew the named leases the session holds, each by its TTL (from its heartbeat)."""
        slot = self._slots.get(session.agent_id)
        if slot is None:
            return
        now = self._clock.monotonic()
        for subtask_id in subtask_ids:
            held = slot.held.get(subtask_id)
            if held is not None and held.lease.epoch == session.epoch:
                held.deadline = now + held.lease.ttl
                self._queue_renewal(held.lease, held.lease.ttl)
        if self._renewals:
            self._renewed.set()

    def _queue_renewal(self, lease: Lease, ttl: float) -> None:
        """Note that ``lease`` now expires ``ttl`` seconds from now, for the store."""
        expire_time = self._clock.now() + timedelta(seconds=ttl)
        self._renewals[lease.subtask_id] = LeaseRenewal(
            lease.subtask_id, lease.fencing_token, expire_time
        )

    async def _write_renewals(self) -> None:
        """Write the pending renewals to the store in one operation; kept if it fails."""
        renewals, self._renewals = self._renewals, {}
        try:
            await self._store.renew_leases(list(renewals.values()))
        except BaseException:
            self._renewals = renewals | self._renewals  # newer renewals win
            raise

    async def _keep_renewals(self) -> None:
        """Write renewals as they come, one write at a time (later ones coalesce meanwhile)."""
        while True:
            await self._renewed.wait()
            self._renewed.clear()
            try:
                await self._write_renewals()
            except Exception:
                log.exception("distribution: writing lease renewals failed; retrying in 1 s")
                await asyncio.sleep(1.0)

    # Planner-facing calls

    def analyze(self, spec: TaskSpec) -> Plan:
        """Return the plan SubmitTask would run for ``spec``.

        Raises:
            InvalidInput: the sub-tasks do not form a valid DAG, or AUTO has no description.
        """
        if spec.split_policy is SplitPolicy.AUTO:
            plan: Plan = self.splitter.split(spec)
            if spec.aggregation_local_id:
                plan = replace(plan, aggregation_local_id=spec.aggregation_local_id)
        else:
            plan = plan_of(spec)
        check_plan(plan)
        return plan

    async def submit(
        self, spec: TaskSpec, request_id: str, caller: Caller, trace_parent: str = ""
    ) -> TaskView:
        """Create a task and queue its READY sub-tasks.

        A request id the same caller used before gives its first task; request ids are
        scoped to the caller's principal, so another caller's equal id makes a new task.
        ``trace_parent`` (the submitting call's span, when traced) is stored with the task
        and handed out with each of its assignments.
        """
        task, subtasks = build_task(
            spec,
            self.analyze(spec),
            new_id=lambda: str(uuid.uuid4()),
            submitter_agent_id=caller.agent_id,
            submitter=caller.principal,
            request_id=request_id,
            now=self._clock.now(),
            defaults=self.config.defaults,
        )
        if trace_parent:
            task = replace(task, trace_parent=trace_parent)
        stored, written, created = await self._store.submit_task(task, subtasks)
        if not created:
            return await self.get_task(stored.task_id, full=True)
        self._enqueue_all([s for s in subtasks if s.state is SubtaskState.READY])
        # The answer is what was written: no sub-task of a new task can have moved yet
        # that this reply must show (a lease granted meanwhile is pushed to its agent).
        return TaskView(stored, written, aggregate_result(stored, written))

    async def get_task(self, task_id: str, *, full: bool) -> TaskView:
        """Return a task; ``full`` includes every sub-task.

        Raises:
            NotFound: no such task.
        """
        return await self._view(await self._task(task_id), full)

    async def _task(self, task_id: str) -> Task:
        task = await self._store.get_task(task_id)
        if task is None:
            raise NotFound(f"task_id: task {task_id!r} does not exist", reason="TASK_NOT_FOUND")
        return task

    async def _view(self, task: Task, full: bool) -> TaskView:
        subtasks: list[Subtask] = []
        if full or task.state is TaskState.SUCCEEDED:
            subtasks = [
                self._with_live_lease(s) for s in await self._store.list_subtasks(task.task_id)
            ]
        return TaskView(task, tuple(subtasks) if full else None, aggregate_result(task, subtasks))

    async def list_subtasks(
        self, task_id: str, after_seq: int, limit: int
    ) -> tuple[list[Subtask], bool]:
        """Return up to ``limit`` sub-tasks of a task after ``after_seq``, and whether more follow.

        Raises:
            NotFound: no such task.
        """
        await self._task(task_id)
        subtasks = await self._store.list_subtasks_page(task_id, after_seq, limit + 1)
        return [self._with_live_lease(s) for s in subtasks[:limit]], len(subtasks) > limit

    async def _changed_subtasks(self, task_id: str, changes: Sequence[Change]) -> list[Subtask]:
        """Return the sub-tasks ``changes`` moved, as they stand now, in task order."""
        ids = {c.details["subtask_id"] for c in changes if c.kind.startswith("subtask.")}
        return [self._with_live_lease(s) for s in await self._store.get_subtasks(ids)]

    def _with_live_lease(self, subtask: Subtask) -> Subtask:
        held = self._held.get(subtask.subtask_id)
        if held is None or subtask.lease is None:
            return subtask
        live = self._live_lease(held)
        if (
            live.fencing_token != subtask.lease.fencing_token
            or live.expire_time <= subtask.lease.expire_time  # renewed through another replica
        ):
            return subtask
        return replace(subtask, lease=live)

    async def list_task_views(
        self, where: TaskFilter, after: TaskCursor | None, limit: int, *, full: bool
    ) -> tuple[list[TaskView], TaskCursor | None]:
        """Return a page of task views, newest first, and the cursor of the next page."""
        tasks = await self._store.list_tasks(where, after, limit + 1)
        views = [await self._view(t, full) for t in tasks[:limit]]
        cursor = None
        if len(tasks) > limit:
            last = tasks[limit - 1]
            cursor = TaskCursor(last.create_time, last.task_id)
        return views, cursor

    async def cancel(self, task_id: str, reason: str, caller: Caller) -> TaskView:
        """Cancel a task, revoking its leases; only its submitter or the admin may.

        Raises:
            NotFound: no such task.
            PermissionDenied: the caller did not submit it and is not the admin.
            FailedPrecondition: it SUCCEEDED or FAILED (reason ``TASK_ENDED``).
        """
        update = await self._store.cancel_task(
            task_id, reason, caller.agent_id, self._clock.now(), canceller=caller.principal
        )
        self._absorb(update)
        return await self._view(update.task, False)

    async def watch(
        self, task_id: str, start_revision: int, *, full: bool
    ) -> AsyncIterator[TaskWatchItem]:
        """Yield the task's transitions after ``start_revision`` until the task ends.

        With ``full`` each item also has sub-tasks: all of them in the first item, then
        those its transitions changed.

        Raises:
            NotFound: no such task.
            OutOfRange: ``start_revision`` is compacted.
        """
        await self._task(task_id)
        await check_retained(self._store, "start_revision", start_revision)

        def is_task_change(change: Change) -> bool:
            return change.service is Service.DISTRIBUTION and change.subject == task_id

        view: TaskView | None = None
        async for batch in self._feed.watch(start_revision, is_task_change):
            if view is None:
                # Read after the watch is registered: no later change can be missed.
                first = await self.get_task(task_id, full=full)
                view = replace(first, subtasks=None)
                yield TaskWatchItem([], view, batch.revision, first.subtasks or ())
                if view.task.state.is_final and view.task.revision <= batch.revision:
                    return  # its last transition is behind the watch: nothing more comes
                continue
            changed = await self._changed_subtasks(task_id, batch.changes) if full else []
            ended = any(_ends_task(change) for change in batch.changes)
            if ended:  # the end brings the result and the failure: read them
                view = await self.get_task(task_id, full=False)
            else:
                view = replace(view, task=task_after(view.task, batch.changes))
            yield TaskWatchItem(batch.changes, view, batch.revision, tuple(changed))
            if ended:
                return


def _refresh(slot: Slot, agent: Agent) -> None:
    """Bring a slot up to date with its agent's record (of the slot's session)."""
    slot.capabilities = frozenset(agent.capabilities)
    slot.skills = agent.skill_names()
    slot.capacity = max(agent.capacity, 1)
    slot.draining = agent.status is AgentStatus.DRAINING
    slot.live = True


def _is_stale(slot: Slot, lease: Lease) -> bool:
    """Whether a lease belongs to a session of the slot's agent that has ended."""
    return not slot.live or lease.epoch != slot.epoch


def _ends_task(change: Change) -> bool:
    return change.kind in ("task.succeeded", "task.failed", "task.cancelled")


def _last_failed_agent(subtask: Subtask) -> str:
    failure = subtask.last_failure
    return failure.agent_id if failure is not None else ""
