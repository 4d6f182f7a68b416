"""The unit of work both back ends share: the working set, the batch script, its driver.

An operation declares what it reads (:class:`Needs`), then applies itself to a
:class:`WorkingSet`: the rows its batch loaded, as changed by the operations before it
in the batch. Nothing touches the database while operations run, so an operation that
raises (a failed compare, a missing key, a refused fencing token) has changed nothing
and needs no savepoint: the working set undoes its partial effects in memory. What the
whole batch changed (:class:`Mutations`) is then written in a few statements.

The operations themselves live beside this engine, one module per service:
:mod:`agentcoord.store.agent_writes` (Discovery), :mod:`agentcoord.store.state_writes`
(StateSync) and :mod:`agentcoord.store.task_writes` (Distribution). Each applies the pure
rules of its service (``core.session_rules``, ``core.state_rules``, ``core.task_rules``)
to the working set. The two direct operations (heartbeat facts, compaction) are the back
end's own statements and are named here, where the batch script runs them.

:func:`batch_script` is the transaction of one batch, written once and free of I/O: it
yields requests (:class:`Step`, :class:`Load`, :class:`Flush`, :class:`Execute`,
:class:`Answer`) that a back end performs (on SQLite's writer thread, or with asyncpg)
and sends the results back in (:func:`drive`, :func:`drive_async`).

1. Together: BEGIN, which also locks the revision counter so that writers of every
   process take turns; then for each run of consecutive operations one Load of
   everything they need, the operations in memory, and one Flush. Direct operations
   (heartbeats, compaction) are single statements between runs. An operation that
   failed is settled against its run's final working set (:meth:`ViewOp.settle`: a
   conflict then carries the entry as it stands after the batch); a failure decided by
   committed rows alone is answered before the commit (:class:`Answer`). COMMIT.
2. In isolation, only if a statement of step 1 failed (a constraint, a value the driver
   cannot encode): ROLLBACK, BEGIN again, and per operation a savepoint around its own
   Load, apply and Flush, so that only the failing operation is rolled back and only its
   caller sees the error. COMMIT once.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import functools
from collections.abc import (
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Generic, TypeVar, cast

from agentcoord.core.models import (
    Agent,
    AgentEventKind,
    Change,
    HeartbeatRecord,
    NewChange,
    StateEntry,
)
from agentcoord.core.session_rules import agent_change
from agentcoord.core.state_rules import plan_expiry
from agentcoord.core.tasks import Subtask, SubtaskState, Task
from agentcoord.store.batching import Outcome
from agentcoord.store.rows import WriteRequest, to_utc

# What operations read


@dataclass(frozen=True, slots=True)
class Needs:
    """What an operation reads; a batch loads the union of its operations' needs at once."""

    state_keys: frozenset[str] = frozenset()
    """Entries of these keys (the missing ones are known to be missing)."""
    requests: frozenset[tuple[str, str]] = frozenset()
    """Remembered results of these ``(agent_id, request_id)`` writes."""
    agent_ids: frozenset[str] = frozenset()
    """These agents, with their token hashes."""
    bound_to: frozenset[str] = frozenset()
    """Every entry bound to a session of these agents."""
    expired_at: datetime | None = None
    """Every entry whose expire time is at or before this time."""
    task_ids: frozenset[str] = frozenset()
    """These tasks."""
    task_request_ids: frozenset[tuple[str, str]] = frozenset()
    """The tasks submitted with these ``(submitter, request_id)`` idempotency keys."""
    subtask_ids: frozenset[str] = frozenset()
    """These sub-tasks."""
    dependents_of: frozenset[str] = frozenset()
    """The sub-tasks that depend on these sub-tasks."""
    families_of: frozenset[str] = frozenset()
    """Every sub-task of the tasks these sub-tasks belong to."""
    task_subtasks: frozenset[str] = frozenset()
    """Every sub-task of these tasks."""
    leased_by: frozenset[str] = frozenset()
    """The LEASED sub-tasks whose lease these agents hold."""
    lease_counts: frozenset[str] = frozenset()
    """How many LEASED sub-tasks each session of these agents holds (counted, not loaded)."""

    def __or__(self, other: Needs) -> Needs:
        """Return what both need."""
        times = [t for t in (self.expired_at, other.expired_at) if t is not None]
        return Needs(
            self.state_keys | other.state_keys,
            self.requests | other.requests,
            self.agent_ids | other.agent_ids,
            self.bound_to | other.bound_to,
            max(times) if times else None,
            self.task_ids | other.task_ids,
            self.task_request_ids | other.task_request_ids,
            self.subtask_ids | other.subtask_ids,
            self.dependents_of | other.dependents_of,
            self.families_of | other.families_of,
            self.task_subtasks | other.task_subtasks,
            self.leased_by | other.leased_by,
            self.lease_counts | other.lease_counts,
        )


@dataclass(frozen=True, slots=True)
class Loaded:
    """Rows a back end read for :class:`Needs`, inside the batch's transaction."""

    revision: int
    """The revision counter."""
    states: Sequence[StateEntry] = ()
    """Every entry the needs cover (each once)."""
    agents: Sequence[tuple[Agent, str]] = ()
    """The agents asked for that exist, with their token hashes."""
    requests: Sequence[WriteRequest] = ()
    """The remembered writes asked for that exist."""
    subtasks: Sequence[Subtask] = ()
    """Every sub-task the needs cover (each once)."""
    tasks: Sequence[Task] = ()
    """The tasks the needs name, and the task of every loaded sub-task (each once)."""
    lease_counts: Sequence[tuple[str, int, int]] = ()
    """``(agent_id, epoch, leases)`` of each session of the counted agents holding any."""


@dataclass(frozen=True, slots=True)
class Mutations:
    """What a run of operations changed, for the back end to write."""

    revision: int
    """New value of the revision counter."""
    deleted_keys: Sequence[str]
    """Keys whose rows are deleted (disjoint from ``states``)."""
    states: Sequence[StateEntry]
    """Entries inserted or replaced."""
    agents: Sequence[tuple[Agent, str]]
    """Agents inserted or replaced, with their token hashes."""
    requests: Sequence[WriteRequest]
    """Results of writes to remember (new rows)."""
    changes: Sequence[Change]
    """Change log entries to append, in revision order."""
    tasks: Sequence[Task] = ()
    """Tasks inserted or replaced."""
    subtasks: Sequence[Subtask] = ()
    """Sub-tasks the batch loaded, changed: only their progress columns are written."""
    new_subtasks: Sequence[Subtask] = ()
    """Sub-tasks inserted (new rows)."""


# The working set

_MISSING: Any = object()


class WorkingSet:
    """The rows a batch loaded, with the changes of the operations applied so far."""

    def __init__(self, needs: Needs, loaded: Loaded) -> None:
        """Start from the rows ``loaded`` for ``needs``."""
        self.revision = loaded.revision
        """The latest revision, including the changes applied so far."""
        self._needs = needs
        self._states = {entry.key: entry for entry in loaded.states}
        self._agents = {agent.agent_id: (agent, token) for agent, token in loaded.agents}
        self._requests = {(r.agent_id, r.request_id): r for r in loaded.requests}
        self._tasks = {task.task_id: task for task in loaded.tasks}
        self._subtasks = {subtask.subtask_id: subtask for subtask in loaded.subtasks}
        self._stored_subtasks = frozenset(self._subtasks)
        """Sub-tasks that have a row already (a put of another one inserts it)."""
        self._task_subtasks: dict[str, dict[str, Subtask]] = {}
        """The sub-tasks of ``_subtasks`` by task, kept with it."""
        for subtask in loaded.subtasks:
            self._task_subtasks.setdefault(subtask.task_id, {})[subtask.subtask_id] = subtask
        self._lease_counts = {(a, epoch): n for a, epoch, n in loaded.lease_counts}
        """Leases held by each session of ``needs.lease_counts``, kept with ``_subtasks``."""
        self._task_writes: dict[str, Task] = {}
        self._subtask_writes: dict[str, Subtask] = {}
        self._known_keys = set(needs.state_keys) | set(self._states)
        self._state_writes: dict[str, StateEntry | None] = {}
        self._agent_writes: dict[str, tuple[Agent, str]] = {}
        self._request_writes: dict[tuple[str, str], WriteRequest] = {}
        self._changes: list[Change] = []
        self._undo: list[Callable[[], None]] = []

    # Reads

    def state(self, key: str) -> StateEntry | None:
        """Return the current entry of ``key``, or None."""
        if key not in self._known_keys:
            raise LookupError(f"state key {key!r} was not loaded: declare it in Needs")
        return self._states.get(key)

    def state_changed(self, key: str) -> bool:
        """Return whether an operation applied so far wrote or deleted ``key``."""
        return key in self._state_writes

    def agent(self, agent_id: str) -> tuple[Agent, str] | None:
        """Return an agent and its token hash, or None."""
        if agent_id not in self._needs.agent_ids:
            raise LookupError(f"agent {agent_id!r} was not loaded: declare it in Needs")
        return self._agents.get(agent_id)

    def request(self, agent_id: str, request_id: str) -> WriteRequest | None:
        """Return the remembered write ``(agent_id, request_id)``, or None."""
        if (agent_id, request_id) not in self._needs.requests:
            raise LookupError(f"request {request_id!r} was not loaded: declare it in Needs")
        return self._requests.get((agent_id, request_id))

    def bound_entries(self, agent_id: str, max_epoch: int) -> list[StateEntry]:
        """Return the entries bound to sessions 1..``max_epoch`` of ``agent_id``, by key."""
        if agent_id not in self._needs.bound_to:
            raise LookupError(f"entries bound to {agent_id!r} were not loaded")
        return sorted(
            (
                entry
                for entry in self._states.values()
                if entry.agent_id == agent_id and 0 < entry.session_epoch <= max_epoch
            ),
            key=lambda entry: entry.key,
        )

    def expired_entries(self, now: datetime) -> list[StateEntry]:
        """Return the entries whose expire time is at or before ``now``, by key."""
        if self._needs.expired_at is None or now > self._needs.expired_at:
            raise LookupError(f"entries expired at {now} were not loaded")
        return sorted(
            (
                entry
                for entry in self._states.values()
                if entry.expire_time is not None and entry.expire_time <= now
            ),
            key=lambda entry: entry.key,
        )

    def task(self, task_id: str) -> Task | None:
        """Return a task that was loaded (by id, or as the task of a loaded sub-task)."""
        return self._tasks.get(task_id)

    def task_by_request(self, submitter: str, request_id: str) -> Task | None:
        """Return the task ``submitter`` submitted with key ``request_id``, or None."""
        if (submitter, request_id) not in self._needs.task_request_ids:
            raise LookupError(f"task request {request_id!r} was not loaded: declare it in Needs")
        return next(
            (
                t
                for t in self._tasks.values()
                if t.request_id == request_id and t.submitter == submitter
            ),
            None,
        )

    def subtask(self, subtask_id: str) -> Subtask | None:
        """Return a loaded sub-task, or None if it does not exist."""
        return self._subtasks.get(subtask_id)

    def subtasks_of(self, task_id: str) -> Mapping[str, Subtask]:
        """Return the loaded sub-tasks of a task, by id (a view: copy it to keep it)."""
        return self._task_subtasks.get(task_id, {})

    def leased_by(self, agent_id: str) -> list[Subtask]:
        """Return the LEASED sub-tasks whose lease ``agent_id`` holds, in task order."""
        if agent_id not in self._needs.leased_by:
            raise LookupError(f"leases of {agent_id!r} were not loaded: declare it in Needs")
        return sorted(
            (
                s
                for s in self._subtasks.values()
                if s.lease is not None and s.lease.agent_id == agent_id
            ),
            key=lambda s: (s.task_id, s.seq),
        )

    def lease_count(self, agent_id: str, epoch: int) -> int:
        """Return how many LEASED sub-tasks session ``epoch`` of ``agent_id`` holds now.

        The count read in the transaction, moved by every sub-task put since: exact for
        the whole store, not only for the loaded rows.
        """
        if agent_id not in self._needs.lease_counts:
            raise LookupError(f"leases of {agent_id!r} were not counted: declare it in Needs")
        return self._lease_counts.get((agent_id, epoch), 0)

    # Writes

    def put_task(self, task: Task) -> None:
        """Insert or replace a task."""
        self._set(self._tasks, task.task_id, task)
        self._set(self._task_writes, task.task_id, task)

    def put_subtask(self, subtask: Subtask) -> None:
        """Insert or replace a sub-task (the old one, if any, was loaded)."""
        if self._needs.lease_counts:
            self._count_lease(self._subtasks.get(subtask.subtask_id), -1)
            self._count_lease(subtask, 1)
        self._set(self._subtasks, subtask.subtask_id, subtask)
        of_task = self._task_subtasks.setdefault(subtask.task_id, {})
        self._set(of_task, subtask.subtask_id, subtask)
        self._set(self._subtask_writes, subtask.subtask_id, subtask)

    def _count_lease(self, subtask: Subtask | None, delta: int) -> None:
        """Move the count of the session holding ``subtask``'s lease, if it is counted."""
        if subtask is None or subtask.state is not SubtaskState.LEASED or subtask.lease is None:
            return
        lease = subtask.lease
        if lease.agent_id in self._needs.lease_counts:
            key = (lease.agent_id, lease.epoch)
            self._set(self._lease_counts, key, self._lease_counts.get(key, 0) + delta)

    def append(self, revision: int, now: datetime, new: NewChange) -> Change:
        """Append a change log entry at ``revision``, the next one."""
        if revision != self.revision + 1:
            raise ValueError(f"revision {revision} does not follow {self.revision}")
        change = Change(
            revision, to_utc(now), new.service, new.kind, new.subject, new.agent_id, new.details
        )
        self.revision = revision
        self._changes.append(change)
        return change

    def put_state(self, entry: StateEntry) -> None:
        """Insert or replace an entry."""
        self._set(self._states, entry.key, entry)
        self._set(self._state_writes, entry.key, entry)

    def delete_state(self, key: str) -> None:
        """Delete the entry of ``key``."""
        self._set(self._states, key, _MISSING)
        self._set(self._state_writes, key, None)

    def save_agent(
        self, agent: Agent, token_hash: str, kind: AgentEventKind, now: datetime
    ) -> Agent:
        """Store ``agent`` at the next revision with its change entry; return it as stored."""
        stored = _stored_at(agent, self.revision + 1)
        self.append(stored.revision, now, agent_change(stored, kind))
        self._set(self._agents, agent.agent_id, (stored, token_hash))
        self._set(self._agent_writes, agent.agent_id, (stored, token_hash))
        return stored

    def remember(self, request: WriteRequest) -> None:
        """Keep the result of a write for its repeats."""
        key = (request.agent_id, request.request_id)
        self._set(self._requests, key, request)
        self._set(self._request_writes, key, request)

    def expire(self, entries: Iterable[StateEntry], now: datetime) -> None:
        """Delete ``entries`` (expired, or bound to an ended session) with their changes."""
        for planned in plan_expiry(entries, self.revision + 1):
            self.append(planned.revision, now, planned.change)
            self.delete_state(planned.change.subject)

    def _set(self, mapping: dict[Any, Any], key: Any, value: Any) -> None:
        """Set (or, with ``_MISSING``, remove) ``mapping[key]``, remembering how to undo it."""
        old = mapping.get(key, _MISSING)

        def undo() -> None:
            if old is _MISSING:
                mapping.pop(key, None)
            else:
                mapping[key] = old

        self._undo.append(undo)
        if value is _MISSING:
            mapping.pop(key, None)
        else:
            mapping[key] = value

    # Running operations

    def apply(self, op: ViewOp) -> Outcome:
        """Run ``op``; if it raises, undo what it did, so that it changed nothing."""
        revision, changes = self.revision, len(self._changes)
        self._undo.clear()
        try:
            value = op.apply(self)
        except Exception as exc:
            for undo in reversed(self._undo):
                undo()
            self.revision = revision
            del self._changes[changes:]
            return Outcome(error=exc)
        finally:
            self._undo.clear()
        return Outcome(value, changes=self._changes[changes:])

    def mutations(self) -> Mutations | None:
        """Return what the operations applied so far changed, or None if nothing."""
        if not (
            self._state_writes
            or self._agent_writes
            or self._request_writes
            or self._task_writes
            or self._subtask_writes
        ):
            return None
        return Mutations(
            revision=self.revision,
            deleted_keys=sorted(k for k, e in self._state_writes.items() if e is None),
            states=[e for e in self._state_writes.values() if e is not None],
            agents=list(self._agent_writes.values()),
            requests=list(self._request_writes.values()),
            changes=list(self._changes),
            tasks=list(self._task_writes.values()),
            subtasks=[
                s for s in self._subtask_writes.values() if s.subtask_id in self._stored_subtasks
            ],
            new_subtasks=[
                s
                for s in self._subtask_writes.values()
                if s.subtask_id not in self._stored_subtasks
            ],
        )


def _stored_at(agent: Agent, revision: int) -> Agent:
    """Return ``agent`` as stored at ``revision``, its times in UTC."""
    return replace(
        agent,
        register_time=None if agent.register_time is None else to_utc(agent.register_time),
        last_heartbeat_time=(
            None if agent.last_heartbeat_time is None else to_utc(agent.last_heartbeat_time)
        ),
        revision=revision,
    )


# Operations


class ViewOp(abc.ABC):
    """An operation that runs against a :class:`WorkingSet`."""

    @abc.abstractmethod
    def needs(self) -> Needs:
        """Return what the operation reads."""

    @abc.abstractmethod
    def apply(self, ws: WorkingSet) -> object:
        """Apply the operation and return its result; raising means it changed nothing."""

    def settle(self, ws: WorkingSet, error: Exception) -> tuple[Exception, bool]:
        """Return what the operation, which raised ``error``, reports once its run is applied.

        Called after every operation of the run has been applied to ``ws``, before the
        commit. Returns the error to report (by default ``error`` itself) and whether its
        caller may hear it before the commit: only an outcome the commit cannot change
        (decided by committed rows alone) may; the batch script then answers it early.
        """
        return error, False


@dataclass(frozen=True, slots=True)
class RecordHeartbeats:
    """``Store.record_heartbeats``: one statement of the back end's own."""

    records: Sequence[HeartbeatRecord]


@dataclass(frozen=True, slots=True)
class CompactChanges:
    """``Store.compact_changes``: statements of the back end's own; returns the compact revision."""

    before: datetime


DirectOp = RecordHeartbeats | CompactChanges
"""An operation the back end runs as its own statements, between runs of :class:`ViewOp`."""

Op = ViewOp | DirectOp
"""Anything the group committer queues."""


# The batch script


class Step(enum.Enum):
    """A transaction control statement."""

    BEGIN = "begin"
    """Start a transaction and lock the revision counter (writers take turns)."""
    COMMIT = "commit"
    ROLLBACK = "rollback"
    SAVEPOINT = "savepoint"
    RELEASE = "release"
    """Release the savepoint."""
    ROLLBACK_TO = "rollback_to"
    """Roll back to the savepoint (which stays; RELEASE follows)."""


@dataclass(frozen=True, slots=True)
class Load:
    """Read the revision counter and the rows ``needs`` covers; the reply is :class:`Loaded`."""

    needs: Needs


@dataclass(frozen=True, slots=True)
class Flush:
    """Write ``mutations``, revision counter included; the reply is None."""

    mutations: Mutations


@dataclass(frozen=True, slots=True)
class Execute:
    """Run a direct operation; the reply is its result."""

    op: DirectOp


@dataclass(frozen=True, slots=True)
class Answer:
    """Hand these outcomes (by index in the batch) to their callers now, before the commit.

    The reply is None. An outcome answered here is still returned with the others at
    the end; a failed answer is not retried (its caller hears it after the commit).
    """

    outcomes: Mapping[int, Outcome]


Request = Step | Load | Flush | Execute | Answer
"""What the batch script asks its back end to do."""

Script = Generator[Request, Any, list[Outcome]]
"""A batch script: yields requests, receives their replies, returns one outcome per op."""


def batch_script(ops: Sequence[Op]) -> Script:
    """Return the transaction of one batch (see the module docstring).

    A request that raises is thrown back into the script. A failure of BEGIN or COMMIT,
    or of the isolated re-run's own savepoint handling, ends the script with that error:
    the back end rolls back, and nothing of the batch is committed.
    """
    yield Step.BEGIN
    early: dict[int, Outcome] = {}
    try:
        outcomes = yield from _together(ops, early)
    except Exception:
        early.clear()
        yield Step.ROLLBACK
        yield Step.BEGIN
        outcomes = yield from _in_isolation(ops)
    if early:
        # Failures decided by committed rows alone: their callers need not wait for
        # the fsync (the winners of this batch still do).
        with contextlib.suppress(Exception):
            yield Answer(early)
    yield Step.COMMIT
    return outcomes


def _runs(ops: Sequence[Op]) -> Iterator[list[ViewOp] | DirectOp]:
    """Split ``ops`` into runs of consecutive view operations and single direct ones."""
    run: list[ViewOp] = []
    for op in ops:
        if isinstance(op, ViewOp):
            run.append(op)
            continue
        if run:
            yield run
            run = []
        yield op
    if run:
        yield run


def _together(
    ops: Sequence[Op], early: dict[int, Outcome]
) -> Generator[Request, Any, list[Outcome]]:
    """Run ``ops`` as runs over one working set each; fill ``early`` (see ViewOp.settle).

    Early answers are given only when the batch is one run: with several, a later run
    could still change what a failure of an earlier one was decided on.
    """
    outcomes: list[Outcome] = []
    runs = list(_runs(ops))
    for run in runs:
        if not isinstance(run, list):
            outcomes.append(Outcome((yield Execute(run))))
            continue
        needs = Needs()
        for op in run:
            needs |= op.needs()
        ws = WorkingSet(needs, (yield Load(needs)))
        start = len(outcomes)
        outcomes.extend(ws.apply(op) for op in run)
        for offset, op in enumerate(run):
            error = outcomes[start + offset].error
            if error is None:
                continue
            reported, now = op.settle(ws, error)
            if reported is not error:
                outcomes[start + offset] = Outcome(error=reported)
            if now and len(runs) == 1:
                early[start + offset] = outcomes[start + offset]
        mutations = ws.mutations()
        if mutations is not None:
            yield Flush(mutations)
    return outcomes


def _in_isolation(ops: Sequence[Op]) -> Generator[Request, Any, list[Outcome]]:
    outcomes: list[Outcome] = []
    for op in ops:
        yield Step.SAVEPOINT
        try:
            if isinstance(op, ViewOp):
                needs = op.needs()
                ws = WorkingSet(needs, (yield Load(needs)))
                outcome = ws.apply(op)
                mutations = ws.mutations()
                if mutations is not None:
                    yield Flush(mutations)
            else:
                outcome = Outcome((yield Execute(op)))
        except Exception as exc:
            yield Step.ROLLBACK_TO
            outcome = Outcome(error=exc)
        yield Step.RELEASE
        outcomes.append(outcome)
    return outcomes


R = TypeVar("R")
C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class Performer(Generic[R]):
    """How a back end performs each kind of request; ``R`` is ``object`` or an awaitable."""

    step: Callable[[Step], R]
    """Run a transaction control statement; the reply is None."""
    load: Callable[[Needs], R]
    """Read what :class:`Load` asks for; the reply is :class:`Loaded`."""
    flush: Callable[[Mutations], R]
    """Write what :class:`Flush` carries; the reply is None."""
    execute: Callable[[DirectOp], R]
    """Run a direct operation; the reply is its result."""
    answer: Callable[[Mapping[int, Outcome]], R]
    """Hand outcomes to their callers before the commit; the reply is None."""

    @classmethod
    def on(
        cls,
        conn: C,
        step: Callable[[C, Step], R],
        load: Callable[[C, Needs], R],
        flush: Callable[[C, Mutations], R],
        execute: Callable[[C, DirectOp], R],
        answer: Callable[[Mapping[int, Outcome]], R],
    ) -> Performer[R]:
        """Return the performer that calls each statement function with ``conn`` first."""
        return cls(
            functools.partial(step, conn),
            functools.partial(load, conn),
            functools.partial(flush, conn),
            functools.partial(execute, conn),
            answer,
        )

    def __call__(self, request: Request) -> R:
        """Perform ``request``."""
        if isinstance(request, Load):
            return self.load(request.needs)
        if isinstance(request, Flush):
            return self.flush(request.mutations)
        if isinstance(request, Execute):
            return self.execute(request.op)
        if isinstance(request, Answer):
            return self.answer(request.outcomes)
        return self.step(request)


async def drive_async(
    script: Script, perform: Callable[[Request], Awaitable[object]]
) -> list[Outcome]:
    """Run ``script``, awaiting each request (asyncpg)."""
    reply: object = None
    error: Exception | None = None
    while True:
        try:
            request = script.send(reply) if error is None else script.throw(error)
        except StopIteration as stop:
            return list(stop.value)
        try:
            reply, error = await perform(request), None
        except Exception as exc:
            reply, error = None, exc


async def _ready(value: object) -> object:
    return value


def drive(script: Script, perform: Callable[[Request], object]) -> list[Outcome]:
    """Run ``script``, performing its requests synchronously (SQLite's writer thread).

    The same loop as :func:`drive_async`, which never suspends here: each request is
    performed before its awaitable is made, so the coroutine runs to its end in one step,
    without an event loop.
    """
    driver = drive_async(script, lambda request: _ready(perform(request)))
    try:
        driver.send(None)
    except StopIteration as stop:
        return cast(list[Outcome], stop.value)
    driver.close()
    raise RuntimeError("a synchronous batch script suspended")
