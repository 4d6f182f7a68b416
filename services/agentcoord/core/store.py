"""The store interface the core is given and every back end implements.

It lives in the core because the core is what uses it: the services receive a ``Store``
through their constructors, and the store package imports this protocol (and the core's
records and pure rules), never the reverse.

Operations reveal intention (``register_agent``, ``end_agent_session``) rather than
exposing SQL. Each mutating operation is atomic: it commits its row changes and its
change log entries in one transaction, and concurrent operations may share one
transaction and one fsync (group commit). After a commit the store calls its change
listeners with the new change log entries, in revision order, on the event loop; a back end
that can hear other processes' commits (PostgreSQL: LISTEN/NOTIFY) calls them with those
too, read back from the change log.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from typing import Protocol

from agentcoord.core.models import (
    Agent,
    AgentState,
    AgentStatus,
    Change,
    ChangeFilter,
    HeartbeatRecord,
    StateEntry,
    StateWrite,
    StateWriteResult,
)
from agentcoord.core.task_rules import Completion, LeaseRenewal, RetryPolicy, TaskUpdate
from agentcoord.core.tasks import Failure, Subtask, SubtaskCounts, Task, TaskCursor, TaskFilter

ChangeListener = Callable[[Sequence[Change]], None]
"""Receives committed change log entries, in revision order."""


class Store(Protocol):
    """Durable state of all services, shared by every process of a deployment."""

    shared: bool
    """Whether other processes may write to it (PostgreSQL replicas); False when one
    process owns it (SQLite refuses a second one)."""

    def is_leader(self) -> bool:
        """Whether this process leads: the one of those sharing the store that sweeps.

        Exactly one process at a time records agent expiries and lease expiries; the others
        keep their deadlines and take over when they become the leader. A store one process
        owns (SQLite) always leads.
        """
        ...

    def hears_every_commit(self) -> bool:
        """Whether every commit reaches the change listeners, this process's and others'.

        True for a store one process owns, and for a shared one while it follows the others'
        commits (PostgreSQL: its LISTEN connection is up). Announcements may still overlap
        or leave a gap that a later one reveals (see :meth:`add_listener`). While False,
        other processes' commits reach no listener, and watchers look in the change log
        themselves.
        """
        ...

    def writes_alone(self) -> bool:
        """Whether every write to the database goes through this store object.

        Its change listeners then hear every commit there is, so a process that mirrors
        the change log knows every row and need not look for one it has not heard of.
        True for an SQLite file opened once; False for a shared store, and for an SQLite
        file opened a second time in the same process (as the tests' replicas do).
        """
        ...

    async def open(self) -> None:
        """Connect and apply pending schema migrations (idempotent, safe with several replicas)."""
        ...

    async def close(self) -> None:
        """Finish pending writes and release connections."""
        ...

    def add_listener(self, listener: ChangeListener) -> Callable[[], None]:
        """Call ``listener`` after each commit; returns a function that removes it.

        Each call carries consecutive changes in revision order. Where other processes'
        commits are heard too, successive calls may overlap or leave a gap (a local commit
        announced before another process's earlier one); the change log is the truth.
        """
        ...

    def observe_commits(self, observer: Callable[[float, int], None]) -> None:
        """Call ``observer`` with each commit's duration (seconds) and number of operations."""
        ...

    async def current_revision(self) -> int:
        """Return the revision of the latest committed change (0 when there is none)."""
        ...

    async def list_changes(
        self,
        after_revision: int,
        limit: int,
        where: ChangeFilter | None = None,
        *,
        max_bytes: int = 0,
    ) -> list[Change]:
        """Return up to ``limit`` changes with revision > ``after_revision``, oldest first.

        Only changes that pass ``where`` are returned (all of them when None); the
        filter runs in SQL, using the indexes on service, agent and subject. With
        ``max_bytes`` > 0 the page stops before the change whose stored details would
        take it past that many bytes (characters), but holds at least one change.
        """
        ...

    async def compact_changes(self, before: datetime) -> int:
        """Drop change log entries and idempotency records older than ``before``.

        Returns the compact revision: the highest revision dropped (or the previous
        compact revision if nothing was dropped). Watches and listings from a revision
        below it can no longer be served completely.
        """
        ...

    async def compact_revision(self) -> int:
        """Return the highest revision dropped by compaction (0 when none was)."""
        ...

    async def register_agent(
        self, agent: Agent, token_hash: str, now: datetime, *, replacing_epoch: int | None = None
    ) -> Agent:
        """Insert or replace an agent and open a new session.

        With ``replacing_epoch``, a stored LIVE session of another epoch is not replaced
        (``AlreadyExists``, reason ``AGENT_ALREADY_REGISTERED``): the caller judged that
        session ``replacing_epoch`` (0: none) may be replaced, and another registration
        got in first.

        In the same transaction, state keys bound to the agent's earlier sessions are
        deleted, each with a ``state.expire`` change after the ``agent.joined`` one.

        The stored epoch becomes the previous epoch plus one (1 for a new id), the state
        LIVE, ``register_time`` ``now``; an ``agent.joined`` change is appended (service
        DISCOVERY, subject and agent_id the agent id, details ``{"agent": snapshot}`` where
        snapshot is ``Agent.to_snapshot()`` of the stored agent, revision included).
        Returns the agent as stored, with epoch and revision.
        """
        ...

    async def end_agent_session(
        self,
        agent_id: str,
        epoch: int,
        state: AgentState,
        now: datetime,
        *,
        heartbeat_at_most: datetime | None = None,
    ) -> Agent | None:
        """Mark a live agent LEFT or EXPIRED if its stored epoch is ``epoch``.

        Appends ``agent.left`` or ``agent.expired`` (details as for ``register_agent``), then
        deletes the state keys bound to that session, each with a ``state.expire`` change.
        Returns the updated agent, or None when the agent is missing, not live, has a
        different epoch, or its stored last heartbeat is later than ``heartbeat_at_most``
        (flushed by another process after the caller judged it; nothing changes then).
        """
        ...

    async def resume_session(self, agent: Agent, now: datetime) -> Agent | None:
        """Record new registration fields of live session ``agent.epoch``, same epoch and token.

        Name, role, capabilities, capacity, labels, skills and TTL are taken from ``agent``;
        an ``agent.updated`` change is appended. Returns the updated agent, or None when
        the agent is missing, not live or of another epoch.
        """
        ...

    async def update_agent_status(
        self, agent_id: str, epoch: int, status: AgentStatus, now: datetime
    ) -> Agent | None:
        """Record a new working status of a live agent of that epoch, appending ``agent.updated``.

        Returns the updated agent, or None when the agent is missing, not live or of
        another epoch.
        """
        ...

    async def record_heartbeats(self, records: Sequence[HeartbeatRecord]) -> None:
        """Store the latest liveness facts of many agents in one transaction; no change entry.

        A record whose epoch differs from the stored epoch is ignored.
        """
        ...

    async def get_agent(self, agent_id: str) -> Agent | None:
        """Return one agent, or None."""
        ...

    async def get_agents(self, agent_ids: Collection[str]) -> list[Agent]:
        """Return the agents with these ids that exist, ordered by agent id."""
        ...

    async def load_agents(self) -> list[tuple[Agent, str]]:
        """Return every agent with its session token hash, ordered by agent id."""
        ...

    async def find_agent_by_token_hash(self, token_hash: str) -> Agent | None:
        """Return the agent whose current session has this token hash, or None."""
        ...

    async def write_states(self, write: StateWrite) -> StateWriteResult:
        """Apply a state write atomically, by :func:`agentcoord.core.state_rules.plan_write`.

        In one transaction: a repeat of ``(agent_id, request_id)`` returns the stored
        result and writes nothing; ``fencing`` is checked against the sub-task's lease
        (until leases exist, any fencing is refused); the current entries of the write's
        keys are read (locked) and the plan is persisted with its change log entries and,
        when ``request_id`` is set, the result for repeats.

        Raises:
            Conflict: a comparison does not hold.
            NotFound: a delete names a missing key without ``allow_missing``.
            FailedPrecondition: the fencing token is stale or no lease is held
                (reason ``LEASE_NOT_HELD``).
        """
        ...

    async def get_state(self, key: str) -> StateEntry | None:
        """Return the current entry of ``key``, or None."""
        ...

    async def read_state(self, key: str) -> tuple[StateEntry | None, int]:
        """Return the current entry of ``key`` (or None) and the current revision.

        Both come from one read, so the entry is exactly the one at that revision.
        """
        ...

    async def list_states(
        self, prefix: str, after_key: str, limit: int
    ) -> tuple[list[StateEntry], int]:
        """Return up to ``limit`` entries with keys starting with ``prefix`` after ``after_key``.

        Ordered by key (code point order). The entries and the returned current revision
        are read in one read transaction, so the page is consistent at that revision.
        """
        ...

    async def state_changed_since(self, prefix: str, revision: int) -> bool:
        """Return whether any key starting with ``prefix`` changed after ``revision``."""
        ...

    async def expire_states(self, now: datetime) -> list[StateEntry]:
        """Delete every entry whose ``expire_time`` is at or before ``now``.

        Each deletion appends a ``state.expire`` change. Returns the deleted entries.
        """
        ...

    # Distribution

    async def submit_task(
        self, task: Task, subtasks: Sequence[Subtask]
    ) -> tuple[Task, tuple[Subtask, ...], bool]:
        """Store a new task and its sub-tasks (revisions 0, assigned here).

        Appends ``task.submitted`` then one ``subtask.<state>`` per sub-task, and returns the
        task and its sub-tasks as stored, in task order, with True. When ``task.request_id``
        is set and a task of the same ``submitter`` with that request id exists, nothing is
        written and that task is returned with no sub-tasks and False (request ids are
        scoped to the submitter: another submitter's equal id makes a new task).
        """
        ...

    async def lease_subtask(
        self,
        subtask_id: str,
        agent_id: str,
        now: datetime,
        *,
        epoch: int,
        capacity: int,
        claim_request_id: str = "",
    ) -> TaskUpdate:
        """Lease a READY sub-task whose back-off has passed to session ``epoch`` of ``agent_id``.

        The lease's fencing token is the revision of its ``subtask.leased`` change. The
        transaction is the arbiter between processes: it sees every lease committed before
        it, so no sub-task is leased twice and no session holds more than ``capacity``.
        ``claim_request_id`` (a ClaimSubtask's ``request_id``) is stored in the lease.

        Raises:
            NotFound: no such sub-task.
            FailedPrecondition: session ``epoch`` is not the agent's stored live session
                (reason ``SESSION_ENDED``: replaced, expired or left, through any process),
                the sub-task is not READY (reason ``SUBTASK_NOT_READY``), or the session
                holds a lease of the claim ``claim_request_id`` already (reason
                ``CLAIM_REPEATED``, metadata ``subtask_id``).
            ResourceExhausted: the session holds ``capacity`` leases (``AGENT_AT_CAPACITY``).
        """
        ...

    async def complete_subtask(
        self,
        subtask_id: str,
        agent_id: str,
        fencing_token: int,
        result: str,
        now: datetime,
        *,
        epoch: int,
    ) -> TaskUpdate:
        """Record a result of session ``epoch`` (``task_rules.complete_subtask``).

        Raises:
            NotFound: no such sub-task.
            FailedPrecondition: the lease is not the caller's current one.
        """
        ...

    async def complete_and_lease(
        self,
        subtask_id: str,
        agent_id: str,
        fencing_token: int,
        result: str,
        now: datetime,
        *,
        epoch: int,
        candidates: Sequence[str],
        capacity: int,
    ) -> Completion:
        """Record a result, then lease the session the ``candidates`` still READY, in one commit.

        The completion is :meth:`complete_subtask`'s, and its refusals raise as there. Then
        each candidate (best first) is leased as :meth:`lease_subtask` would, while the
        session is live and below ``capacity``; a lease refused changes nothing else, and a
        repeat of a recorded completion leases none.
        """
        ...

    async def fail_subtask(
        self, failure: Failure, fencing_token: int, retry: RetryPolicy, *, epoch: int
    ) -> TaskUpdate:
        """Record a failed attempt under session ``epoch`` (``task_rules.fail_subtask``).

        Raises:
            NotFound: no such sub-task.
            FailedPrecondition: the lease is not the failing agent's current one.
        """
        ...

    async def release_leases(
        self, agent_id: str, now: datetime, *, through_epoch: int
    ) -> list[TaskUpdate]:
        """Make the sub-tasks leased by sessions 1..``through_epoch`` of an agent READY again.

        Each lease fails as AGENT_DIED: no attempt is burned.
        """
        ...

    async def renew_leases(self, renewals: Sequence[LeaseRenewal]) -> int:
        """Move the expire time of each lease still held to the later one given.

        The records of a lease carry its real deadline, so a fenced StateSync write checks
        it in its own transaction. Writes no change log entry; returns how many moved.
        """
        ...

    async def cancel_task(
        self, task_id: str, reason: str, agent_id: str, now: datetime, *, canceller: str
    ) -> TaskUpdate:
        """Cancel a task (:func:`agentcoord.core.task_rules.cancel_task`).

        ``canceller`` is the caller's principal: the task's submitter or the admin's.

        Raises:
            NotFound: no such task.
            PermissionDenied: ``canceller`` may not cancel it.
            FailedPrecondition: it SUCCEEDED or FAILED.
        """
        ...

    async def get_task(self, task_id: str) -> Task | None:
        """Return one task, or None."""
        ...

    async def get_subtask(self, subtask_id: str) -> Subtask | None:
        """Return one sub-task, or None."""
        ...

    async def get_subtasks(self, subtask_ids: Collection[str]) -> list[Subtask]:
        """Return the sub-tasks with these ids that exist, in ``(task, seq)`` order."""
        ...

    async def list_subtasks(self, task_id: str) -> list[Subtask]:
        """Return every sub-task of a task, in task order (``seq``)."""
        ...

    async def list_subtasks_page(self, task_id: str, after_seq: int, limit: int) -> list[Subtask]:
        """Return up to ``limit`` sub-tasks of a task whose ``seq`` is above ``after_seq``."""
        ...

    async def list_tasks(
        self, where: TaskFilter, after: TaskCursor | None, limit: int
    ) -> list[Task]:
        """Return up to ``limit`` tasks passing ``where``, newest first, after ``after``.

        Order: ``create_time`` descending, then ``task_id`` descending.
        """
        ...

    async def count_subtasks(self) -> SubtaskCounts:
        """Return the number of sub-tasks of all tasks in each state."""
        ...

    async def load_open_subtasks(self) -> list[Subtask]:
        """Return every READY or LEASED sub-task (what a scheduler rebuilds its queue from)."""
        ...
