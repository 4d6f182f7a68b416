"""The :class:`~agentcoord.core.store.Store` API, once for both back ends.

A back end supplies three things: how to run a read statement (:meth:`SqlStore._fetch`),
how to perform the requests of a batch script (:meth:`SqlStore._run_batch`, see
:mod:`agentcoord.store.unit_of_work`), and its placeholder style and :class:`Codec`. Everything
else (turning calls into operations, decoding rows, building filtered queries) is here.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from typing import Any, cast

from agentcoord.core.errors import InvalidInput
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
from agentcoord.store.agent_writes import (
    EndAgentSession,
    RegisterAgent,
    ResumeSession,
    UpdateAgentStatus,
)
from agentcoord.store.batching import (
    Classify,
    CommitObserver,
    EarlyAnswer,
    GroupCommitter,
    Listener,
    Outcome,
)
from agentcoord.store.queries import (
    MAX_IDS,
    Query,
    Statements,
    select_agents_by_id,
    select_changes,
    select_states_page,
    select_subtasks,
    select_tasks_page,
    state_changed_since,
)
from agentcoord.store.rows import Codec, Row, to_utc
from agentcoord.store.state_writes import ExpireStates, WriteStates
from agentcoord.store.task_writes import (
    CancelTask,
    CompleteSubtask,
    FailSubtask,
    LeaseSubtask,
    ReleaseLeases,
    RenewLeases,
    SubmitTask,
)
from agentcoord.store.unit_of_work import CompactChanges, Op, RecordHeartbeats


class SqlStore(abc.ABC):
    """What both back ends share above their driver calls."""

    shared = False
    """Whether other processes may write to the same store (see ``Store.shared``)."""

    def hears_every_commit(self) -> bool:
        """Whether every commit reaches the listeners (see ``Store``): one process's, always."""
        return True

    def is_leader(self) -> bool:
        """Whether this process sweeps (see ``Store.is_leader``): a store it owns alone, always."""
        return True

    def writes_alone(self) -> bool:
        """Whether every write goes through this object (see ``Store``): not known here."""
        return False

    def __init__(self, marker: str, codec: Codec, classify: Classify) -> None:
        """Use placeholders ``<marker>1``, ``<marker>2``... and ``codec`` for rows.

        ``classify`` recognises the driver's errors that mean the database cannot write now.
        """
        self._marker = marker
        self._codec = codec
        self._sql = Statements.numbered(marker)
        self._writes: GroupCommitter[Op] = GroupCommitter(self._run_batch, classify=classify)

    async def _fetch_by_ids(
        self, select: Callable[[str, Sequence[str]], Query], ids: Collection[str]
    ) -> list[Row]:
        """Return the rows ``select`` reads for ``ids`` (sorted), ``MAX_IDS`` per statement."""
        ordered = sorted(ids)
        rows: list[Row] = []
        for start in range(0, len(ordered), MAX_IDS):
            query = select(self._marker, ordered[start : start + MAX_IDS])
            rows += await self._fetch(query.sql, query.params)
        return rows

    @abc.abstractmethod
    async def _fetch(self, sql: str, params: Sequence[Any]) -> Sequence[Row]:
        """Run a read statement and return its rows.

        Raises:
            Unavailable: the store is not open, or the database is unreachable.
        """

    @abc.abstractmethod
    async def _run_batch(self, ops: list[Op], answer: EarlyAnswer) -> list[Outcome]:
        """Run :func:`~agentcoord.store.unit_of_work.batch_script` for ``ops`` and commit.

        The script's :class:`~agentcoord.store.unit_of_work.Answer` goes to ``answer``, on
        the event loop.
        """

    async def _submit(self, op: Op) -> Any:
        return await self._writes.submit(op)

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` after each commit; returns a function that removes it."""
        return self._writes.add_listener(listener)

    def observe_commits(self, observer: CommitObserver) -> None:
        """Call ``observer`` with each commit's duration (seconds) and number of operations."""
        self._writes.observe_commits(observer)

    # The change log

    async def current_revision(self) -> int:
        """Return the revision of the latest committed change (0 when there is none)."""
        [row] = await self._fetch(self._sql.revisions, ())
        return int(row["value"])

    async def compact_revision(self) -> int:
        """Return the highest revision dropped by compaction (0 when none was)."""
        [row] = await self._fetch(self._sql.revisions, ())
        return int(row["compact_revision"])

    async def list_changes(
        self,
        after_revision: int,
        limit: int,
        where: ChangeFilter | None = None,
        *,
        max_bytes: int = 0,
    ) -> list[Change]:
        """Return up to ``limit`` changes after ``after_revision`` passing ``where``, in order."""
        if limit <= 0:
            raise InvalidInput("limit", "must be positive")
        query = select_changes(
            self._marker, after_revision, limit, where, self._codec.encode_time, max_bytes
        )
        rows = await self._fetch(query.sql, query.params)
        return [self._codec.change_from_row(row) for row in rows]

    async def compact_changes(self, before: datetime) -> int:
        """Drop the oldest changes, all older than ``before``, and older write results.

        The changes dropped are a prefix of the log: every change up to the first one at
        or after ``before``. Returns the compact revision.
        """
        return cast(int, await self._submit(CompactChanges(to_utc(before))))

    # Discovery

    async def register_agent(
        self, agent: Agent, token_hash: str, now: datetime, *, replacing_epoch: int | None = None
    ) -> Agent:
        """Insert or replace an agent and open a new session (see the protocol)."""
        op = RegisterAgent(agent, token_hash, now, replacing_epoch)
        return cast(Agent, await self._submit(op))

    async def end_agent_session(
        self,
        agent_id: str,
        epoch: int,
        state: AgentState,
        now: datetime,
        *,
        heartbeat_at_most: datetime | None = None,
    ) -> Agent | None:
        """Mark a live agent LEFT or EXPIRED if its stored epoch is ``epoch``."""
        op = EndAgentSession(agent_id, epoch, state, now, heartbeat_at_most)
        return cast(Agent | None, await self._submit(op))

    async def resume_session(self, agent: Agent, now: datetime) -> Agent | None:
        """Record new registration fields of a live session (see the protocol)."""
        return cast(Agent | None, await self._submit(ResumeSession(agent, now)))

    async def update_agent_status(
        self, agent_id: str, epoch: int, status: AgentStatus, now: datetime
    ) -> Agent | None:
        """Record a new working status of a live agent of that epoch."""
        op = UpdateAgentStatus(agent_id, epoch, status, now)
        return cast(Agent | None, await self._submit(op))

    async def record_heartbeats(self, records: Sequence[HeartbeatRecord]) -> None:
        """Store the latest liveness facts of many agents in one transaction."""
        if records:
            await self._submit(RecordHeartbeats(tuple(records)))

    async def get_agent(self, agent_id: str) -> Agent | None:
        """Return one agent, or None."""
        rows = await self._fetch(self._sql.select_agent, (agent_id,))
        return self._codec.agent_from_row(rows[0]) if rows else None

    async def get_agents(self, agent_ids: Collection[str]) -> list[Agent]:
        """Return the agents with these ids that exist, ordered by agent id."""
        rows = await self._fetch_by_ids(select_agents_by_id, agent_ids)
        return [self._codec.agent_from_row(row) for row in rows]

    async def load_agents(self) -> list[tuple[Agent, str]]:
        """Return every agent with its session token hash, ordered by agent id."""
        rows = await self._fetch(self._sql.select_agents, ())
        return [(self._codec.agent_from_row(row), row["token_hash"]) for row in rows]

    async def find_agent_by_token_hash(self, token_hash: str) -> Agent | None:
        """Return the agent whose current session has this token hash, or None."""
        rows = await self._fetch(self._sql.select_agent_by_token, (token_hash,))
        return self._codec.agent_from_row(rows[0]) if rows else None

    # StateSync

    async def write_states(self, write: StateWrite) -> StateWriteResult:
        """Apply a state write atomically (see the protocol)."""
        return cast(StateWriteResult, await self._submit(WriteStates(write)))

    async def get_state(self, key: str) -> StateEntry | None:
        """Return the current entry of ``key``, or None."""
        entry, _ = await self.read_state(key)
        return entry

    async def read_state(self, key: str) -> tuple[StateEntry | None, int]:
        """Return the current entry of ``key`` (or None) and the revision, in one read."""
        [row] = await self._fetch(self._sql.select_state, (key,))
        entry = self._codec.state_from_row(row) if row["key"] is not None else None
        return entry, int(row["revision"])

    async def list_states(
        self, prefix: str, after_key: str, limit: int
    ) -> tuple[list[StateEntry], int]:
        """Return a page of entries under ``prefix`` after ``after_key``, and its revision."""
        if limit <= 0:
            raise InvalidInput("limit", "must be positive")
        query = select_states_page(self._marker, prefix, after_key, limit)
        rows = await self._fetch(query.sql, query.params)
        entries = [self._codec.state_from_row(row) for row in rows if row["key"] is not None]
        return entries, int(rows[0]["revision"])

    async def state_changed_since(self, prefix: str, revision: int) -> bool:
        """Return whether any key starting with ``prefix`` changed after ``revision``."""
        query = state_changed_since(self._marker, prefix, revision)
        [row] = await self._fetch(query.sql, query.params)
        return bool(row["changed"])

    async def expire_states(self, now: datetime) -> list[StateEntry]:
        """Delete every entry whose ``expire_time`` is at or before ``now``."""
        return cast(list[StateEntry], await self._submit(ExpireStates(now)))

    # Distribution

    async def submit_task(
        self, task: Task, subtasks: Sequence[Subtask]
    ) -> tuple[Task, tuple[Subtask, ...], bool]:
        """Store a new task and its sub-tasks, or return the task of the same request id."""
        op = SubmitTask(task, tuple(subtasks))
        return cast(tuple[Task, tuple[Subtask, ...], bool], await self._submit(op))

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
        """Lease a READY sub-task to session ``epoch`` of ``agent_id``, if it has room."""
        op = LeaseSubtask(subtask_id, agent_id, epoch, now, capacity, claim_request_id)
        return cast(TaskUpdate, await self._submit(op))

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
        """Record the result of a leased sub-task."""
        op = CompleteSubtask(subtask_id, agent_id, epoch, fencing_token, result, now)
        return cast(Completion, await self._submit(op)).completion

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
        """Record the result of a leased sub-task and lease the candidates still READY."""
        op = CompleteSubtask(
            subtask_id, agent_id, epoch, fencing_token, result, now, tuple(candidates), capacity
        )
        return cast(Completion, await self._submit(op))

    async def fail_subtask(
        self, failure: Failure, fencing_token: int, retry: RetryPolicy, *, epoch: int
    ) -> TaskUpdate:
        """Record a failed attempt of a leased sub-task."""
        op = FailSubtask(failure, epoch, fencing_token, retry)
        return cast(TaskUpdate, await self._submit(op))

    async def release_leases(
        self, agent_id: str, now: datetime, *, through_epoch: int
    ) -> list[TaskUpdate]:
        """Make every sub-task leased by sessions 1..``through_epoch`` READY again."""
        op = ReleaseLeases(agent_id, through_epoch, now)
        return cast(list[TaskUpdate], await self._submit(op))

    async def renew_leases(self, renewals: Sequence[LeaseRenewal]) -> int:
        """Move the expire times of leases still held."""
        if not renewals:
            return 0
        return cast(int, await self._submit(RenewLeases(tuple(renewals))))

    async def cancel_task(
        self, task_id: str, reason: str, agent_id: str, now: datetime, *, canceller: str
    ) -> TaskUpdate:
        """Cancel a task and its unfinished sub-tasks, if ``canceller`` may."""
        op = CancelTask(task_id, reason, agent_id, canceller, now)
        return cast(TaskUpdate, await self._submit(op))

    async def get_task(self, task_id: str) -> Task | None:
        """Return one task, or None."""
        rows = await self._fetch(self._sql.select_task, (task_id,))
        return self._codec.task_from_row(rows[0]) if rows else None

    async def get_subtask(self, subtask_id: str) -> Subtask | None:
        """Return one sub-task, or None."""
        rows = await self._fetch(self._sql.select_subtask, (subtask_id,))
        return self._codec.subtask_from_row(rows[0]) if rows else None

    async def get_subtasks(self, subtask_ids: Collection[str]) -> list[Subtask]:
        """Return the sub-tasks with these ids that exist, in ``(task, seq)`` order."""
        rows = await self._fetch_by_ids(select_subtasks, subtask_ids)
        found = [self._codec.subtask_from_row(row) for row in rows]
        return sorted(found, key=lambda s: (s.task_id, s.seq))

    async def list_subtasks(self, task_id: str) -> list[Subtask]:
        """Return every sub-task of a task, in task order."""
        rows = await self._fetch(self._sql.select_subtasks_of_task, (task_id,))
        return [self._codec.subtask_from_row(row) for row in rows]

    async def list_subtasks_page(self, task_id: str, after_seq: int, limit: int) -> list[Subtask]:
        """Return a page of a task's sub-tasks in task order, after ``after_seq``."""
        if limit <= 0:
            raise InvalidInput("limit", "must be positive")
        rows = await self._fetch(self._sql.select_subtasks_page, (task_id, after_seq, limit))
        return [self._codec.subtask_from_row(row) for row in rows]

    async def list_tasks(
        self, where: TaskFilter, after: TaskCursor | None, limit: int
    ) -> list[Task]:
        """Return a page of tasks passing ``where``, newest first."""
        if limit <= 0:
            raise InvalidInput("limit", "must be positive")
        query = select_tasks_page(self._marker, where, after, limit, self._codec.encode_time)
        rows = await self._fetch(query.sql, query.params)
        return [self._codec.task_from_row(row) for row in rows]

    async def count_subtasks(self) -> SubtaskCounts:
        """Return the number of sub-tasks of all tasks in each state."""
        rows = await self._fetch(self._sql.count_subtasks, ())
        return SubtaskCounts(**{str(row["state"]): int(row["count"]) for row in rows})

    async def load_open_subtasks(self) -> list[Subtask]:
        """Return every READY or LEASED sub-task."""
        rows = await self._fetch(self._sql.select_open_subtasks, ())
        return [self._codec.subtask_from_row(row) for row in rows]
