"""Pure rules of Distribution: building a task from its plan, and every state transition.

The store loads the rows an operation needs inside its transaction and calls these rules;
they return the new records and the change log entries (at consecutive revisions), which
the store persists in the same transaction. Nothing here does I/O, so both back ends
share the rules, and the unit tests run them without a database.

Change log entries of Distribution have the task id as subject. ``task.submitted`` and
``task.<state>`` record the task's transitions, ``subtask.<state>`` a sub-task's; details
hold ``from`` and ``to`` states and, for sub-tasks, the ids, attempt, fencing token and
failure, so that WatchTask and ListEvents show who did what.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any

from agentcoord.core.errors import (
    FailedPrecondition,
    InvalidInput,
    PermissionDenied,
    ResourceExhausted,
)
from agentcoord.core.models import Change, NewChange, Service, StateWrite
from agentcoord.core.state_rules import PlannedChange
from agentcoord.core.tasks import (
    ADMIN_PRINCIPAL,
    Failure,
    FailureClass,
    Lease,
    Plan,
    Subtask,
    SubtaskCounts,
    SubtaskSpec,
    SubtaskState,
    Task,
    TaskSpec,
    TaskState,
)

TASK_SUBMITTED = "task.submitted"
"""Change kind of a submission; later task transitions are ``task.<state>``."""


@dataclass(frozen=True, slots=True)
class TaskDefaults:
    """Server defaults and limits applied to submitted tasks."""

    max_attempts: int = 3
    """Attempts per sub-task when the spec says 0."""
    lease_ttl: float = 30.0
    """Lease TTL in seconds when the spec says 0."""
    min_lease_ttl: float = 1.0
    """Shortest lease TTL granted."""
    max_lease_ttl: float = 3600.0
    """Longest lease TTL granted."""

    def lease_ttl_for(self, requested: float) -> float:
        """Return the lease TTL granted for ``requested`` seconds (0: the default)."""
        ttl = requested if requested > 0 else self.lease_ttl
        return min(max(ttl, self.min_lease_ttl), self.max_lease_ttl)


def check_plan(plan: Plan, field_name: str = "task.subtasks") -> None:
    """Check that a plan's sub-tasks form a DAG over unique local ids.

    Raises:
        InvalidInput: a duplicate or unknown local id, a self-dependency, a cycle, or an
            aggregation sub-task that does not depend (transitively) on every other one.
    """
    if not plan.subtasks:
        raise InvalidInput(field_name, "a task needs at least one sub-task")
    index: dict[str, int] = {}
    for position, spec in enumerate(plan.subtasks):
        if spec.local_id in index:
            raise InvalidInput(
                f"{field_name}[{position}].local_id", f"duplicate local id {spec.local_id!r}"
            )
        index[spec.local_id] = position
    for position, spec in enumerate(plan.subtasks):
        for dependency in spec.depends_on:
            if dependency not in index:
                raise InvalidInput(
                    f"{field_name}[{position}].depends_on",
                    f"unknown local id {dependency!r}",
                )
            if dependency == spec.local_id:
                raise InvalidInput(
                    f"{field_name}[{position}].depends_on", "a sub-task cannot depend on itself"
                )
    order = topological_order(plan)
    if order is None:
        raise InvalidInput(field_name, "depends_on forms a cycle")
    if plan.aggregation_local_id:
        _check_aggregation(plan)


def _check_aggregation(plan: Plan) -> None:
    by_id = {spec.local_id: spec for spec in plan.subtasks}
    target = plan.aggregation_local_id
    if target not in by_id:
        raise InvalidInput("task.aggregation_local_id", f"unknown local id {target!r}")
    reached: set[str] = set()
    pending = list(by_id[target].depends_on)
    while pending:
        local_id = pending.pop()
        if local_id not in reached:
            reached.add(local_id)
            pending.extend(by_id[local_id].depends_on)
    missing = sorted(set(by_id) - reached - {target})
    if missing:
        raise InvalidInput(
            "task.aggregation_local_id",
            f"{target!r} must depend on every other sub-task; it does not depend on {missing[0]!r}",
        )


def topological_order(plan: Plan) -> list[int] | None:
    """Return the positions of the plan's sub-tasks in a stable topological order.

    Among sub-tasks whose prerequisites are placed, the earliest in the plan comes first,
    so a plan already in topological order keeps its order. None if there is a cycle.
    """
    index = {spec.local_id: position for position, spec in enumerate(plan.subtasks)}
    waiting = [len(set(spec.depends_on)) for spec in plan.subtasks]
    dependents: list[list[int]] = [[] for _ in plan.subtasks]
    for position, spec in enumerate(plan.subtasks):
        for dependency in set(spec.depends_on):
            dependents[index[dependency]].append(position)
    ready = [position for position, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        position = heapq.heappop(ready)
        order.append(position)
        for dependent in dependents[position]:
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                heapq.heappush(ready, dependent)
    return order if len(order) == len(plan.subtasks) else None


def plan_of(spec: TaskSpec) -> Plan:
    """Return the plan of a NONE or EXPLICIT task (AUTO asks a splitter instead).

    Explicit sub-tasks are put in stable topological order (a given one is kept).

    Raises:
        InvalidInput: the explicit sub-tasks are not a valid DAG (see :func:`check_plan`).
    """
    if spec.subtasks:
        given = Plan(False, "", spec.subtasks, spec.aggregation_local_id)
        check_plan(given)  # positions in errors are the spec's
        order = topological_order(given)
        assert order is not None  # check_plan refused cycles
        subtasks = tuple(spec.subtasks[position] for position in order)
        return Plan(
            parallelizable=_parallelizable(subtasks),
            reason=f"{len(spec.subtasks)} sub-tasks given explicitly.",
            subtasks=subtasks,
            aggregation_local_id=spec.aggregation_local_id,
            splitter="explicit",
        )
    whole = SubtaskSpec(local_id="main", title=spec.title, description=spec.description)
    return Plan(False, "Split policy NONE: the task runs as one sub-task.", (whole,), "", "none")


def _parallelizable(ordered: Sequence[SubtaskSpec]) -> bool:
    """Return whether two sub-tasks (given in topological order) can run at the same time.

    They cannot only when the DAG is a chain: each sub-task depends on the one before it.
    """
    return any(before.local_id not in after.depends_on for before, after in pairwise(ordered))


def build_task(
    spec: TaskSpec,
    plan: Plan,
    *,
    new_id: Callable[[], str],
    submitter_agent_id: str,
    submitter: str,
    request_id: str,
    now: datetime,
    defaults: TaskDefaults,
) -> tuple[Task, list[Subtask]]:
    """Return the task and its sub-tasks (not yet stored: revisions 0) for a checked plan."""
    check_plan(plan)
    task_id = new_id()
    order = topological_order(plan)
    assert order is not None  # check_plan refused cycles
    specs = [plan.subtasks[position] for position in order]
    ids = {sub.local_id: new_id() for sub in specs}
    dependents: dict[str, list[str]] = {sub.local_id: [] for sub in specs}
    for sub in specs:
        for dependency in dict.fromkeys(sub.depends_on):
            dependents[dependency].append(ids[sub.local_id])
    max_attempts = spec.max_attempts or defaults.max_attempts
    lease_ttl = defaults.lease_ttl_for(spec.lease_ttl)
    subtasks = []
    for seq, sub in enumerate(specs):
        prerequisites = tuple(ids[d] for d in dict.fromkeys(sub.depends_on))
        subtasks.append(
            Subtask(
                subtask_id=ids[sub.local_id],
                task_id=task_id,
                local_id=sub.local_id,
                seq=seq,
                title=sub.title,
                description=sub.description,
                input=sub.input if sub.input is not None else spec.input,
                required_capabilities=_union(spec.required_capabilities, sub.required_capabilities),
                required_skills=_union(spec.required_skills, sub.required_skills),
                depends_on=prerequisites,
                dependents=tuple(dependents[sub.local_id]),
                waiting_on=len(prerequisites),
                state=SubtaskState.BLOCKED if prerequisites else SubtaskState.READY,
                priority=spec.priority,
                max_attempts=sub.max_attempts or max_attempts,
                lease_ttl=lease_ttl,
                create_time=now,
                update_time=now,
            )
        )
    task = Task(
        task_id=task_id,
        title=spec.title,
        description=spec.description,
        input=spec.input,
        required_capabilities=spec.required_capabilities,
        required_skills=spec.required_skills,
        priority=spec.priority,
        max_attempts=max_attempts,
        lease_ttl=lease_ttl,
        split_policy=spec.split_policy,
        allow_partial_results=spec.allow_partial_results,
        aggregation_subtask_id=ids.get(plan.aggregation_local_id, ""),
        state=TaskState.PENDING,
        counts=SubtaskCounts(),
        submitter_agent_id=submitter_agent_id,
        submitter=submitter,
        request_id=request_id,
        create_time=now,
        update_time=now,
    )
    return task, subtasks


def _union(first: Sequence[str], second: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted({*first, *second}))


@dataclass(slots=True)
class Journal:
    """Change log entries of one operation, at consecutive revisions from ``next_revision``."""

    next_revision: int
    """Revision the next entry gets."""
    entries: list[PlannedChange] = field(default_factory=list)
    """Entries recorded so far."""

    def record(self, change: NewChange) -> int:
        """Record ``change`` and return its revision."""
        revision = self.next_revision
        self.entries.append(PlannedChange(revision, change))
        self.next_revision += 1
        return revision


@dataclass(frozen=True, slots=True)
class Revocation:
    """A lease that a transition ended while its holder may still be working."""

    lease: Lease
    """The lease that ended."""
    reason: str
    """``task_cancelled``, ``task_failed`` or ``lease_expired``."""


@dataclass(frozen=True, slots=True)
class TaskUpdate:
    """What one Distribution operation did to a task."""

    task: Task
    """The task afterwards."""
    subtask: Subtask | None
    """The sub-task the operation was about, afterwards (None for task-wide ones)."""
    changed: tuple[Subtask, ...]
    """Every sub-task that changed, afterwards."""
    revocations: tuple[Revocation, ...]
    """Leases ended under a holder that may still be working."""


@dataclass(frozen=True, slots=True)
class Completion:
    """What a completion that also leased the completer its next sub-tasks did."""

    completion: TaskUpdate
    """The completion, as ``Store.complete_subtask`` returns it."""
    leases: tuple[TaskUpdate, ...]
    """One lease per candidate leased, in the candidates' order."""
    untried: tuple[str, ...]
    """Candidates not tried, still READY as far as the store knows: the completion was a
    repeat, or the session ended or holds its capacity. The others not leased were no
    longer READY (or are gone)."""


class TaskTransitions:
    """Applies transitions to one task and its loaded sub-tasks, journaling each one.

    ``changed`` holds every sub-task touched, as it ends up; ``task`` the task as it ends
    up. The store persists both and the journal's entries.
    """

    def __init__(
        self,
        task: Task,
        subtasks: Mapping[str, Subtask],
        journal: Journal,
        now: datetime,
        actor: str,
    ) -> None:
        """Start from ``task`` and the sub-tasks loaded for the operation."""
        self.task = task
        self._subtasks = dict(subtasks)
        self.changed: dict[str, Subtask] = {}
        self.revocations: list[Revocation] = []
        self._journal = journal
        self._now = now
        self._actor = actor

    def subtask(self, subtask_id: str) -> Subtask:
        """Return a loaded sub-task as it stands now."""
        return self._subtasks[subtask_id]

    def loaded(self) -> list[Subtask]:
        """Return every loaded sub-task as it stands now, in task order."""
        return sorted(self._subtasks.values(), key=lambda s: s.seq)

    # Recording

    def _save(self, subtask: Subtask) -> Subtask:
        self._subtasks[subtask.subtask_id] = subtask
        self.changed[subtask.subtask_id] = subtask
        return subtask

    def amend(self, subtask: Subtask) -> Subtask:
        """Store a sub-task changed without a transition (no change log entry)."""
        return self._save(subtask)

    def create(self, subtask: Subtask) -> Subtask:
        """Record the creation of a sub-task."""
        return self._move(subtask, None, subtask.state, {})

    def move(self, subtask: Subtask, state: SubtaskState, **fields: Any) -> Subtask:
        """Move ``subtask`` to ``state``, setting ``fields``; return it as stored."""
        return self._move(subtask, subtask.state, state, fields)

    def _move(
        self,
        before: Subtask,
        from_state: SubtaskState | None,
        to_state: SubtaskState,
        fields: dict[str, Any],
    ) -> Subtask:
        """Journal a transition and store the sub-task with ``fields`` set, in one copy."""
        lease = fields.get("lease", before.lease)
        actor = lease.agent_id if lease is not None else self._actor
        failure = fields.get("last_failure", before.last_failure)
        if from_state is None or failure is before.last_failure:
            failure = None
        revision = self._journal.next_revision
        fencing_token = _token_of(before.lease or lease)
        if lease is not None and lease.fencing_token == 0:
            fields["lease"] = replace(lease, fencing_token=revision)
            fields["fencing_token"] = fencing_token = revision
        details: dict[str, Any] = {
            "task_id": before.task_id,
            "subtask_id": before.subtask_id,
            "local_id": before.local_id,
            "from": None if from_state is None else from_state.value,
            "to": to_state.value,
            "attempt": fields.get("attempt", before.attempt),
            "fencing_token": fencing_token,
            "failure": None if failure is None else failure.to_snapshot(),
        }
        kind = f"subtask.{to_state.value}"
        self._journal.record(
            NewChange(Service.DISTRIBUTION, kind, before.task_id, actor or self._actor, details)
        )
        if to_state.is_final and fields.get("end_time", before.end_time) is None:
            fields["end_time"] = self._now
        after = replace(before, state=to_state, update_time=self._now, revision=revision, **fields)
        self.task = replace(
            self.task,
            counts=self.task.counts.moved(from_state, to_state),
            update_time=self._now,
            revision=revision,
        )
        return self._save(after)

    def set_task_state(
        self, state: TaskState, *, failure: Failure | None = None, reason: str = ""
    ) -> None:
        """Move the task to ``state`` (a no-op if it is there already)."""
        before = self.task.state
        if before is state:
            return
        self._record_task(before, state, reason)
        self.task = replace(
            self.task,
            state=state,
            failure=failure or self.task.failure,
            state_reason=reason or self.task.state_reason,
            end_time=self._now if state.is_final else self.task.end_time,
        )

    def record_submission(self) -> None:
        """Record the submission of the task (before its sub-tasks' creation)."""
        self._record_task(None, self.task.state, "")

    def _record_task(self, before: TaskState | None, after: TaskState, reason: str) -> None:
        kind = TASK_SUBMITTED if before is None else f"task.{after.value}"
        details = {
            "task_id": self.task.task_id,
            "title": self.task.title,
            "from": None if before is None else before.value,
            "to": after.value,
            "reason": reason,
        }
        revision = self._journal.record(
            NewChange(Service.DISTRIBUTION, kind, self.task.task_id, self._actor, details)
        )
        self.task = replace(self.task, update_time=self._now, revision=revision)


def task_after(task: Task, changes: Iterable[Change]) -> Task:
    """Return ``task`` as it stood after ``changes``, those of its own it does not reflect yet.

    A task read from the store may be ahead of the change log entries being watched;
    WatchTask moves the counts and state of the task it began with by each later transition
    instead, so every message shows the task as it stood right after its transitions.
    """
    for change in changes:
        if change.subject != task.task_id or change.revision <= task.revision:
            continue
        before, after = change.details["from"], change.details["to"]
        if change.kind.startswith("subtask."):
            from_state = None if before is None else SubtaskState(before)
            task = replace(task, counts=task.counts.moved(from_state, SubtaskState(after)))
        elif before is not None:
            state = TaskState(after)
            task = replace(
                task,
                state=state,
                state_reason=change.details["reason"] or task.state_reason,
                end_time=change.time if state.is_final else task.end_time,
            )
        task = replace(task, update_time=change.time, revision=change.revision)
    return task


def _token_of(lease: Lease | None) -> int:
    return 0 if lease is None else lease.fencing_token


# Transitions


def lease_subtask(
    tx: TaskTransitions,
    subtask_id: str,
    agent_id: str,
    now: datetime,
    *,
    epoch: int,
    claim_request_id: str = "",
) -> Subtask:
    """Lease a READY sub-task to session ``epoch`` of ``agent_id``; its token is the revision.

    ``claim_request_id`` is kept in the lease (:attr:`Lease.claim_request_id`).

    Raises:
        FailedPrecondition: the sub-task is not READY or its back-off has not passed
            (reason ``SUBTASK_NOT_READY``).
    """
    subtask = tx.subtask(subtask_id)
    problem = f"is {subtask.state.name}, not READY"
    if subtask.state is SubtaskState.READY and subtask.next_attempt_time is not None:
        problem = f"is backing off until {subtask.next_attempt_time.isoformat()}"
    if subtask.state is not SubtaskState.READY or (
        subtask.next_attempt_time is not None and subtask.next_attempt_time > now
    ):
        raise FailedPrecondition(
            f"subtask_id: sub-task {subtask_id!r} {problem}",
            reason="SUBTASK_NOT_READY",
            metadata={"subtask_id": subtask_id, "state": subtask.state.name},
        )
    attempt = subtask.attempt + 1
    lease = Lease(
        subtask_id=subtask_id,
        fencing_token=0,  # becomes the revision of the lease's change
        agent_id=agent_id,
        epoch=epoch,
        attempt=attempt,
        expire_time=now + timedelta(seconds=subtask.lease_ttl),
        ttl=subtask.lease_ttl,
        claim_request_id=claim_request_id,
    )
    leased = tx.move(
        subtask,
        SubtaskState.LEASED,
        lease=lease,
        attempt=attempt,
        agent_id=agent_id,
        next_attempt_time=None,
        start_time=subtask.start_time or now,
    )
    if tx.task.state is TaskState.PENDING:
        tx.set_task_state(TaskState.RUNNING)
    return leased


def check_holder(subtask: Subtask, agent_id: str, fencing_token: int, *, epoch: int) -> None:
    """Check that session ``epoch`` of ``agent_id`` holds the current lease ``fencing_token``.

    Raises:
        FailedPrecondition: reason ``STALE_FENCING_TOKEN`` (not the current lease) or
            ``LEASE_NOT_HELD`` (the current lease is another agent's, or another session's
            of the same agent: a new session never inherits the leases of an earlier one).
    """
    lease = subtask.lease
    metadata = {
        "subtask_id": subtask.subtask_id,
        "fencing_token": str(fencing_token),
        "current_fencing_token": str(subtask.fencing_token),
        "state": subtask.state.name,
    }
    if subtask.state is not SubtaskState.LEASED or lease is None:
        raise FailedPrecondition(
            f"fencing_token: sub-task {subtask.subtask_id!r} is {subtask.state.name}; "
            f"lease {fencing_token} is no longer held",
            reason="STALE_FENCING_TOKEN",
            metadata=metadata,
        )
    if lease.fencing_token != fencing_token:
        raise FailedPrecondition(
            f"fencing_token: {fencing_token} is stale; the current lease of sub-task "
            f"{subtask.subtask_id!r} has token {lease.fencing_token}",
            reason="STALE_FENCING_TOKEN",
            metadata=metadata,
        )
    if lease.agent_id != agent_id:
        raise FailedPrecondition(
            f"agent_id: the lease of sub-task {subtask.subtask_id!r} is held by another agent",
            reason="LEASE_NOT_HELD",
            metadata=metadata,
        )
    if lease.epoch != epoch:
        raise FailedPrecondition(
            f"agent_id: the lease of sub-task {subtask.subtask_id!r} is held by session "
            f"{lease.epoch} of agent {agent_id!r}, not session {epoch}",
            reason="LEASE_NOT_HELD",
            metadata={**metadata, "epoch": str(epoch), "holder_epoch": str(lease.epoch)},
        )


@dataclass(frozen=True, slots=True)
class LeaseRenewal:
    """A lease's new expire time, from a heartbeat of its holder."""

    subtask_id: str
    """The sub-task."""
    fencing_token: int
    """The lease renewed; a newer lease of the sub-task is left alone."""
    expire_time: datetime
    """The new expiry."""


def renew_lease(subtask: Subtask, renewal: LeaseRenewal) -> Subtask | None:
    """Return the sub-task with its lease's expiry moved to ``renewal.expire_time``.

    None when there is nothing to renew: the lease ended or is another one, or it already
    expires later.
    """
    lease = subtask.lease
    if (
        subtask.state is not SubtaskState.LEASED
        or lease is None
        or lease.fencing_token != renewal.fencing_token
        or lease.expire_time >= renewal.expire_time
    ):
        return None
    return replace(subtask, lease=replace(lease, expire_time=renewal.expire_time))


def check_unexpired(subtask: Subtask, fencing_token: int, now: datetime) -> None:
    """Check that the lease ``fencing_token`` of a sub-task has not passed its expire time.

    Raises:
        FailedPrecondition: reason ``LEASE_EXPIRED``.
    """
    lease = subtask.lease
    if lease is not None and lease.fencing_token == fencing_token and lease.expire_time <= now:
        raise FailedPrecondition(
            f"fencing_token: the lease {fencing_token} of sub-task {subtask.subtask_id!r} "
            f"expired at {lease.expire_time.isoformat()}",
            reason="LEASE_EXPIRED",
            metadata={"subtask_id": subtask.subtask_id, "fencing_token": str(fencing_token)},
        )


def check_fencing(write: StateWrite, subtask: Subtask | None) -> None:
    """Refuse a write whose fencing token is not that of a lease the writer holds.

    The one place where StateSync writes meet Distribution's leases, inside the write's
    transaction: the sub-task must be LEASED to the writer with exactly this token, and the
    write must come before the lease's expire time (which heartbeats move: the record carries
    the deadline the lease is judged by, ``Store.renew_leases``).

    Raises:
        FailedPrecondition: reason ``LEASE_NOT_HELD`` (no such sub-task),
            ``STALE_FENCING_TOKEN`` or ``LEASE_NOT_HELD`` (see ``check_holder``), or
            ``LEASE_EXPIRED`` (the write's time is at or past the lease's expire time).
    """
    fencing = write.fencing
    if fencing is None:
        return
    if subtask is None:
        raise FailedPrecondition(
            f"fencing: sub-task {fencing.subtask_id!r} does not exist, so no lease of it is held",
            reason="LEASE_NOT_HELD",
            metadata={
                "field": "fencing",
                "subtask_id": fencing.subtask_id,
                "fencing_token": str(fencing.fencing_token),
            },
        )
    check_holder(subtask, write.agent_id, fencing.fencing_token, epoch=write.epoch)
    check_unexpired(subtask, fencing.fencing_token, write.now)


def check_expired(subtask: Subtask, now: datetime) -> None:
    """Check that a sub-task's lease has passed its stored expire time (before failing it).

    A replica judges a lease by the deadline it knows; a heartbeat through another replica
    may have renewed it since, and the stored expire time is the one that counts.

    Raises:
        FailedPrecondition: it expires after ``now`` (reason ``LEASE_RENEWED``, with
            ``expire_time`` in the metadata).
    """
    lease = subtask.lease
    if lease is not None and lease.expire_time > now:
        raise FailedPrecondition(
            f"fencing_token: the lease {lease.fencing_token} of sub-task "
            f"{subtask.subtask_id!r} was renewed until {lease.expire_time.isoformat()}",
            reason="LEASE_RENEWED",
            metadata={
                "subtask_id": subtask.subtask_id,
                "expire_time": lease.expire_time.isoformat(),
            },
        )


def check_capacity(agent_id: str, held: int, capacity: int) -> None:
    """Check that an agent holding ``held`` leases may take one more.

    Raises:
        ResourceExhausted: it holds ``capacity`` or more (reason ``AGENT_AT_CAPACITY``).
    """
    if held >= capacity:
        raise ResourceExhausted(
            f"agent_id: agent {agent_id!r} holds {held} leases, its capacity",
            reason="AGENT_AT_CAPACITY",
            metadata={"capacity": str(capacity)},
        )


def check_claim_new(agent_id: str, request_id: str, held: Iterable[Lease]) -> None:
    """Check that no lease in ``held`` (a session's) was taken by the claim ``request_id``.

    Raises:
        FailedPrecondition: one was (reason ``CLAIM_REPEATED``; metadata ``subtask_id``).
    """
    for lease in held:
        if lease.claim_request_id == request_id:
            raise FailedPrecondition(
                f"request_id: agent {agent_id!r} holds the lease of claim {request_id!r} "
                f"already (sub-task {lease.subtask_id!r})",
                reason="CLAIM_REPEATED",
                metadata={"subtask_id": lease.subtask_id},
            )


def complete_subtask(
    tx: TaskTransitions,
    subtask_id: str,
    agent_id: str,
    fencing_token: int,
    result: str,
    *,
    epoch: int,
) -> Subtask:
    """Record a sub-task's result, unblock its dependents, and end the task if it was last.

    A repeat (the sub-task SUCCEEDED with this agent's lease ``fencing_token``) returns the
    sub-task unchanged.

    Raises:
        FailedPrecondition: see :func:`check_holder`.
    """
    subtask = tx.subtask(subtask_id)
    if (
        subtask.state is SubtaskState.SUCCEEDED
        and subtask.fencing_token == fencing_token
        and subtask.agent_id == agent_id
    ):
        return subtask
    check_holder(subtask, agent_id, fencing_token, epoch=epoch)
    done = tx.move(subtask, SubtaskState.SUCCEEDED, lease=None, result=result)
    for dependent_id in subtask.dependents:
        dependent = tx.subtask(dependent_id)
        if dependent.state is not SubtaskState.BLOCKED:
            continue
        waiting_on = dependent.waiting_on - 1
        if waiting_on == 0:
            tx.move(dependent, SubtaskState.READY, waiting_on=0)
        else:
            tx.amend(replace(dependent, waiting_on=waiting_on))
    _end_task_if_done(tx)
    return done


def _end_task_if_done(tx: TaskTransitions, failure: Failure | None = None) -> None:
    """End the task once no sub-task is unfinished; ``failure`` fails it if nothing succeeded."""
    counts = tx.task.counts
    if counts.unfinished or tx.task.state.is_final:
        return
    if counts.failed == 0 or (tx.task.allow_partial_results and counts.succeeded > 0):
        reason = f"{counts.failed} sub-task(s) failed; partial results" if counts.failed else ""
        tx.set_task_state(TaskState.SUCCEEDED, reason=reason)
    else:
        tx.set_task_state(TaskState.FAILED, failure=failure, reason="every sub-task failed")


def retry_delay(burned_attempts: int, base: float, cap: float) -> float:
    """Return the back-off before the next attempt: ``base`` doubling per failure, capped."""
    if burned_attempts <= 0 or base <= 0:
        return 0.0
    return float(min(cap, base * 2 ** (burned_attempts - 1)))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Back-off of retried sub-tasks after TASK_ERROR and TIMEOUT failures."""

    base: float = 1.0
    """Seconds before the first retry."""
    cap: float = 60.0
    """Longest back-off in seconds."""


def fail_subtask(
    tx: TaskTransitions, failure: Failure, fencing_token: int, retry: RetryPolicy, *, epoch: int
) -> Subtask:
    """Record a failed attempt: READY again (after a back-off) or FAILED for good.

    Agent deaths and lost leases are retried at once; agent deaths do not burn an
    attempt. A sub-task FAILED for good fails its task, whose other unfinished sub-tasks
    are cancelled, unless the task allows partial results (then only its dependents are
    cancelled). A repeat of the same failure returns the sub-task as it stands.

    Raises:
        FailedPrecondition: see :func:`check_holder`.
    """
    subtask = tx.subtask(failure.subtask_id)
    last = subtask.last_failure
    if (
        last is not None
        and not last.failure_class.set_by_server
        and last.fencing_token == fencing_token
        and last.agent_id == failure.agent_id
        and subtask.fencing_token == fencing_token
        and subtask.state is not SubtaskState.LEASED
    ):
        return subtask
    check_holder(subtask, failure.agent_id, fencing_token, epoch=epoch)
    if failure.failure_class is FailureClass.LEASE_LOST:
        check_expired(subtask, failure.time)
    failure = replace(failure, attempt=subtask.attempt, fencing_token=fencing_token)
    burned = subtask.burned_attempts + (1 if failure.failure_class.burns_attempt else 0)
    if failure.retryable and burned < subtask.max_attempts:
        delay = (
            retry_delay(burned, retry.base, retry.cap)
            if failure.failure_class in (FailureClass.TASK_ERROR, FailureClass.TIMEOUT)
            else 0.0
        )
        return tx.move(
            subtask,
            SubtaskState.READY,
            lease=None,
            burned_attempts=burned,
            last_failure=failure,
            next_attempt_time=failure.time + timedelta(seconds=delay) if delay else None,
        )
    failed = tx.move(
        subtask, SubtaskState.FAILED, lease=None, burned_attempts=burned, last_failure=failure
    )
    if tx.task.allow_partial_results:
        _cancel(tx, _descendants(tx, failed), "task_failed")
        _end_task_if_done(tx, failure)
    else:
        _cancel(tx, [s for s in tx.loaded() if not s.state.is_final], "task_failed")
        summary = f"sub-task {failed.local_id!r} failed: {failure.message}"
        tx.set_task_state(TaskState.FAILED, failure=failure, reason=summary[:1024])
    return tx.subtask(failed.subtask_id)


def _descendants(tx: TaskTransitions, root: Subtask) -> list[Subtask]:
    found: dict[str, Subtask] = {}
    pending = list(root.dependents)
    while pending:
        subtask_id = pending.pop()
        if subtask_id not in found:
            found[subtask_id] = tx.subtask(subtask_id)
            pending.extend(found[subtask_id].dependents)
    return [s for s in found.values() if not s.state.is_final]


def _cancel(tx: TaskTransitions, subtasks: Iterable[Subtask], reason: str) -> None:
    for subtask in sorted(subtasks, key=lambda s: s.seq):
        if subtask.lease is not None:
            tx.revocations.append(Revocation(subtask.lease, reason))
        tx.move(subtask, SubtaskState.CANCELLED, lease=None)


def check_canceller(task: Task, canceller: str) -> None:
    """Check that principal ``canceller`` may cancel ``task``: its submitter, or the admin.

    Raises:
        PermissionDenied: reason ``NOT_TASK_SUBMITTER``.
    """
    if canceller != ADMIN_PRINCIPAL and canceller != task.submitter:
        raise PermissionDenied(
            f"task_id: task {task.task_id!r} can be cancelled only by the identity that "
            "submitted it, or with the admin token",
            reason="NOT_TASK_SUBMITTER",
            metadata={"field": "task_id", "task_id": task.task_id},
        )


def cancel_task(tx: TaskTransitions, reason: str, *, canceller: str) -> bool:
    """Cancel the task and its unfinished sub-tasks; False if it was CANCELLED already.

    Raises:
        PermissionDenied: ``canceller`` is not the task's submitter nor the admin.
        FailedPrecondition: the task SUCCEEDED or FAILED (reason ``TASK_ENDED``).
    """
    check_canceller(tx.task, canceller)
    state = tx.task.state
    if state is TaskState.CANCELLED:
        return False
    if state.is_final:
        raise FailedPrecondition(
            f"task_id: task {tx.task.task_id!r} has ended as {state.name}",
            reason="TASK_ENDED",
            metadata={"task_id": tx.task.task_id, "state": state.name},
        )
    _cancel(tx, [s for s in tx.loaded() if not s.state.is_final], "task_cancelled")
    tx.set_task_state(TaskState.CANCELLED, reason=reason or "cancelled")
    return True


def aggregate_result(task: Task, subtasks: Sequence[Subtask]) -> str | None:
    """Return the task's result as canonical JSON, or None until it SUCCEEDED.

    The aggregation sub-task's result when the task names one and it succeeded; else (no
    aggregation sub-task, or partial results cancelled it) an object mapping each
    succeeded sub-task's local id to its result, in task order (``subtasks`` must hold at
    least the succeeded ones).
    """
    if task.state is not TaskState.SUCCEEDED:
        return None
    for subtask in subtasks:
        if (
            subtask.subtask_id == task.aggregation_subtask_id
            and subtask.state is SubtaskState.SUCCEEDED
        ):
            return subtask.result
    merged = {
        s.local_id: json.loads(s.result if s.result is not None else "null")
        for s in sorted(subtasks, key=lambda s: s.seq)
        if s.state is SubtaskState.SUCCEEDED
    }
    return json.dumps(merged, separators=(",", ":"), ensure_ascii=False)
