"""Frozen records of Distribution: task specs, plans, tasks, sub-tasks, leases, failures.

JSON payloads (inputs, results, failure details) are carried as canonical JSON text
(:func:`canonical_json`), so the core and the stores never re-encode them. Records turn
into JSON-able snapshots and back (``to_snapshot``/``from_snapshot``), which is how the
stores keep them and how change log entries describe them.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any


def canonical_json(value: Any) -> str:
    """Return ``value`` as canonical JSON text: sorted keys, no spaces, UTF-8 kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


ADMIN_PRINCIPAL = "admin"
"""The principal of a caller presenting the admin token."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who makes a planner call (SubmitTask, CancelTask)."""

    agent_id: str = ""
    """The agent whose session token was presented; empty for none."""
    admin: bool = False
    """Whether the admin token was presented."""

    @property
    def principal(self) -> str:
        """The identity tasks record: ``agent:<id>``, ``admin``, or empty for neither.

        An agent is the same principal in every session (epoch) of its id; callers with
        neither a session nor the admin token share the empty one.
        """
        if self.admin:
            return ADMIN_PRINCIPAL
        return f"agent:{self.agent_id}" if self.agent_id else ""


class TaskState(enum.Enum):
    """Lifecycle of a task."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """Whether the task has ended."""
        return self in _FINAL_TASK_STATES


_FINAL_TASK_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})


class SubtaskState(enum.Enum):
    """Lifecycle of a sub-task."""

    BLOCKED = "blocked"
    READY = "ready"
    LEASED = "leased"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """Whether the sub-task has ended."""
        return self in _FINAL_SUBTASK_STATES


_FINAL_SUBTASK_STATES = frozenset(
    {SubtaskState.SUCCEEDED, SubtaskState.FAILED, SubtaskState.CANCELLED}
)


class SplitPolicy(enum.Enum):
    """How a task becomes sub-tasks."""

    NONE = "none"
    EXPLICIT = "explicit"
    AUTO = "auto"


class FailureClass(enum.Enum):
    """Why an attempt failed; only AGENT_DIED leaves the retry budget untouched."""

    AGENT_DIED = "agent_died"
    LEASE_LOST = "lease_lost"
    TASK_ERROR = "task_error"
    TIMEOUT = "timeout"

    @property
    def set_by_server(self) -> bool:
        """Whether the server records failures of this class (agents report the others)."""
        return self in (FailureClass.AGENT_DIED, FailureClass.LEASE_LOST)

    @property
    def burns_attempt(self) -> bool:
        """Whether a failure of this class counts against ``max_attempts``."""
        return self is not FailureClass.AGENT_DIED


class RevocationReason(enum.Enum):
    """Why an agent lost a lease it held."""

    TASK_CANCELLED = "task_cancelled"
    TASK_FAILED = "task_failed"
    LEASE_EXPIRED = "lease_expired"
    SESSION_ENDED = "session_ended"


@dataclass(frozen=True, slots=True)
class SubtaskSpec:
    """A sub-task as a client gives it or a splitter proposes it."""

    local_id: str
    """Identifier within the task."""
    title: str
    """Short title."""
    description: str = ""
    """What to do."""
    input: str | None = None
    """Canonical JSON input; None means the task's input."""
    required_capabilities: tuple[str, ...] = ()
    """Capabilities required in addition to the task's."""
    depends_on: tuple[str, ...] = ()
    """Local ids of the sub-tasks that must succeed first."""
    max_attempts: int = 0
    """Maximum attempts; 0 means the task's."""
    required_skills: tuple[str, ...] = ()
    """Skill ids or tags required in addition to the task's."""


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A task as given to SubmitTask and AnalyzeTask (validated by the handler)."""

    title: str
    """Short title."""
    split_policy: SplitPolicy
    """How to split the task."""
    description: str = ""
    """What to do; AUTO splits it."""
    input: str | None = None
    """Canonical JSON input; None for none."""
    required_capabilities: tuple[str, ...] = ()
    """Capabilities every sub-task requires."""
    priority: int = 0
    """Queue priority; higher first."""
    max_attempts: int = 0
    """Maximum attempts per sub-task; 0 for the server default."""
    lease_ttl: float = 0.0
    """Lease TTL in seconds; 0 for the server default."""
    allow_partial_results: bool = False
    """Whether the task may succeed when some sub-tasks fail."""
    subtasks: tuple[SubtaskSpec, ...] = ()
    """Sub-tasks for EXPLICIT."""
    aggregation_local_id: str = ""
    """Local id of the sub-task whose result is the task's."""
    required_skills: tuple[str, ...] = ()
    """Skill ids or tags every sub-task requires (see :meth:`Agent.has_skills`)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """How a task runs: its sub-tasks in topological order, and why."""

    parallelizable: bool
    """Whether at least two sub-tasks can run at the same time."""
    reason: str
    """Why the task was split this way."""
    subtasks: tuple[SubtaskSpec, ...]
    """Sub-tasks with dependencies, in topological order."""
    aggregation_local_id: str = ""
    """Sub-task whose result is the task's; empty to merge results by local id."""
    splitter: str = "builtin"
    """Name of the splitter that made the plan."""


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one attempt of a sub-task failed."""

    failure_class: FailureClass
    """Class of the failure."""
    message: str
    """Human-readable error."""
    retryable: bool
    """Whether another attempt may succeed."""
    subtask_id: str
    """The sub-task."""
    agent_id: str
    """Agent that held the lease."""
    attempt: int
    """Attempt that failed."""
    time: datetime
    """When it was recorded."""
    details: str | None = None
    """Canonical JSON details from the agent; None for none."""
    fencing_token: int = 0
    """Fencing token of the failed lease."""

    def to_snapshot(self) -> dict[str, Any]:
        """Return the JSON-able form."""
        return {
            "failure_class": self.failure_class.value,
            "message": self.message,
            "retryable": self.retryable,
            "subtask_id": self.subtask_id,
            "agent_id": self.agent_id,
            "attempt": self.attempt,
            "time": self.time.isoformat(),
            "details": self.details,
            "fencing_token": self.fencing_token,
        }

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any]) -> Failure:
        """Rebuild from :meth:`to_snapshot` output."""
        return cls(
            failure_class=FailureClass(data["failure_class"]),
            message=data["message"],
            retryable=bool(data["retryable"]),
            subtask_id=data["subtask_id"],
            agent_id=data["agent_id"],
            attempt=int(data["attempt"]),
            time=datetime.fromisoformat(data["time"]),
            details=data["details"],
            fencing_token=int(data["fencing_token"]),
        )


@dataclass(frozen=True, slots=True)
class Lease:
    """The right of one agent to work on one sub-task until ``expire_time``."""

    subtask_id: str
    """The sub-task."""
    fencing_token: int
    """Grows with every lease of any sub-task: the revision that granted it."""
    agent_id: str
    """The holder."""
    epoch: int
    """The holder's session (Discovery epoch); a later session of the agent does not hold it."""
    attempt: int
    """Attempt number, from 1."""
    expire_time: datetime
    """Expiry unless renewed."""
    ttl: float
    """Seconds each renewal adds."""
    claim_request_id: str = ""
    """The ``request_id`` of the ClaimSubtask that took it, if any: a repeat of that claim,
    through any process, returns this lease instead of leasing another sub-task."""

    def to_snapshot(self) -> dict[str, Any]:
        """Return the JSON-able form."""
        snapshot: dict[str, Any] = {
            "subtask_id": self.subtask_id,
            "fencing_token": self.fencing_token,
            "agent_id": self.agent_id,
            "epoch": self.epoch,
            "attempt": self.attempt,
            "expire_time": self.expire_time.isoformat(),
            "ttl": self.ttl,
        }
        if self.claim_request_id:
            snapshot["claim_request_id"] = self.claim_request_id
        return snapshot

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any]) -> Lease:
        """Rebuild from :meth:`to_snapshot` output."""
        return cls(
            subtask_id=data["subtask_id"],
            fencing_token=int(data["fencing_token"]),
            agent_id=data["agent_id"],
            epoch=int(data["epoch"]),
            attempt=int(data["attempt"]),
            expire_time=datetime.fromisoformat(data["expire_time"]),
            ttl=float(data["ttl"]),
            claim_request_id=data.get("claim_request_id", ""),
        )


@dataclass(frozen=True, slots=True)
class SubtaskCounts:
    """Number of a task's sub-tasks in each state."""

    blocked: int = 0
    ready: int = 0
    leased: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def total(self) -> int:
        """Number of sub-tasks in all."""
        return (
            self.blocked + self.ready + self.leased + self.succeeded + self.failed + self.cancelled
        )

    @property
    def unfinished(self) -> int:
        """Number of sub-tasks that have not ended."""
        return self.blocked + self.ready + self.leased

    def moved(self, before: SubtaskState | None, after: SubtaskState) -> SubtaskCounts:
        """Return the counts after one sub-task moved from ``before`` (None: new) to ``after``."""
        if before is after:
            return self
        values = self.to_snapshot()
        if before is not None:
            values[before.value] -= 1
        values[after.value] += 1
        return SubtaskCounts(**values)

    def to_snapshot(self) -> dict[str, int]:
        """Return the JSON-able form (by state value, in the order of ``SubtaskState``).

        Written out rather than built over the enum: every transition and every task row
        takes it, and the walk over the enum cost about 15 times as much (2.4 against 0.15 µs).
        """
        return {
            "blocked": self.blocked,
            "ready": self.ready,
            "leased": self.leased,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cancelled": self.cancelled,
        }

    @classmethod
    def from_snapshot(cls, data: Mapping[str, int]) -> SubtaskCounts:
        """Rebuild from :meth:`to_snapshot` output."""
        return cls(**{state.value: int(data[state.value]) for state in SubtaskState})


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@dataclass(frozen=True, slots=True)
class Task:
    """A task as stored; its result is assembled from its sub-tasks when read."""

    task_id: str
    title: str
    description: str
    input: str | None
    required_capabilities: tuple[str, ...]
    priority: int
    max_attempts: int
    lease_ttl: float
    split_policy: SplitPolicy
    allow_partial_results: bool
    aggregation_subtask_id: str
    state: TaskState
    counts: SubtaskCounts
    submitter_agent_id: str
    submitter: str
    """Who submitted it (:attr:`Caller.principal`): scopes ``request_id``, guards CancelTask."""
    request_id: str
    create_time: datetime
    update_time: datetime
    revision: int = 0
    """Revision of the latest change of the task or one of its sub-tasks."""
    end_time: datetime | None = None
    failure: Failure | None = None
    state_reason: str = ""
    trace_parent: str = ""
    """W3C traceparent of the SubmitTask call's span, when the server traced it; else ""."""
    required_skills: tuple[str, ...] = ()
    """Skill ids or tags every sub-task requires."""

    def to_snapshot(self) -> dict[str, Any]:
        """Return the JSON-able form."""
        return {
            "task_id": self.task_id,
            "title": self.title,
            "description": self.description,
            "input": self.input,
            "required_capabilities": list(self.required_capabilities),
            "priority": self.priority,
            "max_attempts": self.max_attempts,
            "lease_ttl": self.lease_ttl,
            "split_policy": self.split_policy.value,
            "allow_partial_results": self.allow_partial_results,
            "aggregation_subtask_id": self.aggregation_subtask_id,
            "state": self.state.value,
            "counts": self.counts.to_snapshot(),
            "submitter_agent_id": self.submitter_agent_id,
            "submitter": self.submitter,
            "request_id": self.request_id,
            "create_time": self.create_time.isoformat(),
            "update_time": self.update_time.isoformat(),
            "revision": self.revision,
            "end_time": _iso(self.end_time),
            "failure": None if self.failure is None else self.failure.to_snapshot(),
            "state_reason": self.state_reason,
            "trace_parent": self.trace_parent,
            "required_skills": list(self.required_skills),
        }

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any]) -> Task:
        """Rebuild from :meth:`to_snapshot` output."""
        return cls(
            task_id=data["task_id"],
            title=data["title"],
            description=data["description"],
            input=data["input"],
            required_capabilities=tuple(data["required_capabilities"]),
            priority=int(data["priority"]),
            max_attempts=int(data["max_attempts"]),
            lease_ttl=float(data["lease_ttl"]),
            split_policy=SplitPolicy(data["split_policy"]),
            allow_partial_results=bool(data["allow_partial_results"]),
            aggregation_subtask_id=data["aggregation_subtask_id"],
            state=TaskState(data["state"]),
            counts=SubtaskCounts.from_snapshot(data["counts"]),
            submitter_agent_id=data["submitter_agent_id"],
            submitter=data["submitter"],
            request_id=data["request_id"],
            create_time=datetime.fromisoformat(data["create_time"]),
            update_time=datetime.fromisoformat(data["update_time"]),
            revision=int(data["revision"]),
            end_time=_time(data["end_time"]),
            failure=None if data["failure"] is None else Failure.from_snapshot(data["failure"]),
            state_reason=data["state_reason"],
            trace_parent=data.get("trace_parent", ""),  # absent in tasks stored before it
            required_skills=tuple(data["required_skills"]),
        )


@dataclass(frozen=True, slots=True)
class Subtask:
    """A node of a task's DAG, leased to one agent at a time."""

    subtask_id: str
    task_id: str
    local_id: str
    seq: int
    """Position within the task (creation, topological order), from 0."""
    title: str
    description: str
    input: str | None
    """Canonical JSON input (the task's when the spec gave none)."""
    required_capabilities: tuple[str, ...]
    depends_on: tuple[str, ...]
    """Server ids of the prerequisites."""
    dependents: tuple[str, ...]
    """Server ids of the sub-tasks that depend on this one."""
    waiting_on: int
    """Number of prerequisites that have not succeeded yet."""
    state: SubtaskState
    priority: int
    """The task's priority (copied: the queue orders by it)."""
    max_attempts: int
    lease_ttl: float
    """The task's lease TTL in seconds."""
    create_time: datetime
    update_time: datetime
    attempt: int = 0
    """Leases granted so far."""
    burned_attempts: int = 0
    """Failures that count against ``max_attempts`` (every class but AGENT_DIED)."""
    lease: Lease | None = None
    """The current lease, while LEASED."""
    fencing_token: int = 0
    """Fencing token of the latest lease, kept after it ends (repeats are recognised by it)."""
    agent_id: str = ""
    """Lease holder, else the last holder."""
    result: str | None = None
    """Canonical JSON result once SUCCEEDED."""
    last_failure: Failure | None = None
    next_attempt_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    revision: int = 0
    required_skills: tuple[str, ...] = ()
    """Skill ids or tags an agent must offer (the task's and the spec's, sorted)."""

    def to_snapshot(self) -> dict[str, Any]:
        """Return the JSON-able form."""
        return {
            "subtask_id": self.subtask_id,
            "task_id": self.task_id,
            "seq": self.seq,
            **self.spec_snapshot(),
            "waiting_on": self.waiting_on,
            "state": self.state.value,
            "update_time": self.update_time.isoformat(),
            "attempt": self.attempt,
            "burned_attempts": self.burned_attempts,
            "lease": None if self.lease is None else self.lease.to_snapshot(),
            "fencing_token": self.fencing_token,
            "agent_id": self.agent_id,
            "result": self.result,
            "last_failure": None if self.last_failure is None else self.last_failure.to_snapshot(),
            "next_attempt_time": _iso(self.next_attempt_time),
            "start_time": _iso(self.start_time),
            "end_time": _iso(self.end_time),
            "revision": self.revision,
        }

    def spec_snapshot(self) -> dict[str, Any]:
        """Return the JSON-able form of the fields no transition changes (its spec)."""
        return {
            "local_id": self.local_id,
            "title": self.title,
            "description": self.description,
            "input": self.input,
            "required_capabilities": list(self.required_capabilities),
            "depends_on": list(self.depends_on),
            "dependents": list(self.dependents),
            "priority": self.priority,
            "max_attempts": self.max_attempts,
            "lease_ttl": self.lease_ttl,
            "create_time": self.create_time.isoformat(),
            "required_skills": list(self.required_skills),
        }

    @staticmethod
    def spec_fields(data: Mapping[str, Any]) -> dict[str, Any]:
        """Return the fields of a :meth:`spec_snapshot` (or a whole snapshot's), by name."""
        return {
            "local_id": data["local_id"],
            "title": data["title"],
            "description": data["description"],
            "input": data["input"],
            "required_capabilities": tuple(data["required_capabilities"]),
            "depends_on": tuple(data["depends_on"]),
            "dependents": tuple(data["dependents"]),
            "priority": int(data["priority"]),
            "max_attempts": int(data["max_attempts"]),
            "lease_ttl": float(data["lease_ttl"]),
            "create_time": datetime.fromisoformat(data["create_time"]),
            "required_skills": tuple(data["required_skills"]),
        }

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any]) -> Subtask:
        """Rebuild from :meth:`to_snapshot` output."""
        return cls(
            subtask_id=data["subtask_id"],
            task_id=data["task_id"],
            seq=int(data["seq"]),
            **cls.spec_fields(data),
            waiting_on=int(data["waiting_on"]),
            state=SubtaskState(data["state"]),
            update_time=datetime.fromisoformat(data["update_time"]),
            attempt=int(data["attempt"]),
            burned_attempts=int(data["burned_attempts"]),
            lease=None if data["lease"] is None else Lease.from_snapshot(data["lease"]),
            fencing_token=int(data["fencing_token"]),
            agent_id=data["agent_id"],
            result=data["result"],
            last_failure=(
                None
                if data["last_failure"] is None
                else Failure.from_snapshot(data["last_failure"])
            ),
            next_attempt_time=_time(data["next_attempt_time"]),
            start_time=_time(data["start_time"]),
            end_time=_time(data["end_time"]),
            revision=int(data["revision"]),
        )


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """Which tasks ListTasks returns; empty fields match anything."""

    states: frozenset[TaskState] = frozenset()
    """Only tasks in one of these states."""
    submitter_agent_id: str = ""
    """Only tasks submitted by this agent."""


@dataclass(frozen=True, slots=True)
class TaskCursor:
    """Position after a task in ListTasks order (newest first)."""

    create_time: datetime
    task_id: str
