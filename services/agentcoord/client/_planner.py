"""The planner side of Distribution: submit tasks, follow them and collect their results.

Reach it as ``client.tasks`` on an :class:`~agentcoord.client.AgentcoordClient`. Tasks and
sub-tasks come back as frozen dataclasses; inputs and results are JSON-able Python values.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeAlias

from google.protobuf import duration_pb2, struct_pb2

from agentcoord.client._errors import RPCError, typed_error, typed_errors
from agentcoord.client._retry import RetryPolicy
from agentcoord.client._streams import RESUMABLE_CODES, is_resumable, open_stream
from agentcoord.client._wire import (
    JSON,
    duration,
    from_proto_value,
    new_request_id,
    to_proto_value,
)
from agentcoord.distribution.v1 import distribution_service_pb2 as pb

if TYPE_CHECKING:
    from agentcoord.client._client import AgentcoordClient, DistributionClient

# --- enums --------------------------------------------------------------------------------------


class TaskState(enum.Enum):
    """Lifecycle of a task."""

    PENDING = pb.Task.STATE_PENDING
    """Submitted; no sub-task has been leased yet."""
    RUNNING = pb.Task.STATE_RUNNING
    """At least one sub-task has been leased."""
    SUCCEEDED = pb.Task.STATE_SUCCEEDED
    """Every sub-task succeeded (or enough, with partial results); ``result`` is set."""
    FAILED = pb.Task.STATE_FAILED
    """A sub-task failed for good; ``failure`` says which and why."""
    CANCELLED = pb.Task.STATE_CANCELLED
    """Cancelled by a planner."""

    @property
    def is_final(self) -> bool:
        """Whether the task has ended."""
        return self in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


class SubtaskState(enum.Enum):
    """Lifecycle of a sub-task."""

    BLOCKED = pb.Subtask.STATE_BLOCKED
    """Waiting for the sub-tasks it depends on."""
    READY = pb.Subtask.STATE_READY
    """Waiting for a capable agent with free capacity (or for its retry back-off)."""
    LEASED = pb.Subtask.STATE_LEASED
    """Leased to one agent, which is working on it."""
    SUCCEEDED = pb.Subtask.STATE_SUCCEEDED
    """Completed with a result."""
    FAILED = pb.Subtask.STATE_FAILED
    """Failed without retries left, or with a non-retryable error."""
    CANCELLED = pb.Subtask.STATE_CANCELLED
    """Cancelled with its task, or because its task failed."""


class SplitPolicy(enum.Enum):
    """How a task becomes sub-tasks."""

    NONE = pb.SPLIT_POLICY_NONE
    """One sub-task: the whole task."""
    EXPLICIT = pb.SPLIT_POLICY_EXPLICIT
    """The sub-tasks the planner gives."""
    AUTO = pb.SPLIT_POLICY_AUTO
    """The server's splitter derives sub-tasks and dependencies from the description."""


class FailureClass(enum.Enum):
    """Why an attempt failed; only agent deaths leave the retry budget untouched."""

    AGENT_DIED = pb.FAILURE_CLASS_AGENT_DIED
    """The holding agent expired or deregistered."""
    LEASE_LOST = pb.FAILURE_CLASS_LEASE_LOST
    """The lease expired while the agent was still live."""
    TASK_ERROR = pb.FAILURE_CLASS_TASK_ERROR
    """The work itself failed."""
    TIMEOUT = pb.FAILURE_CLASS_TIMEOUT
    """The work took too long."""


# --- what the server returns --------------------------------------------------------------------


def _time(message: Any, field: str) -> datetime | None:
    return getattr(message, field).ToDatetime(tzinfo=UTC) if message.HasField(field) else None


def _json(message: Any, field: str) -> Any:
    return from_proto_value(getattr(message, field)) if message.HasField(field) else None


def seconds(duration: duration_pb2.Duration) -> float:
    """Return a protobuf Duration in seconds."""
    return float(duration.ToNanoseconds()) / 1e9


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one attempt of a sub-task failed."""

    failure_class: FailureClass
    """Class of the failure."""
    message: str
    """Human-readable error message."""
    retryable: bool
    """Whether another attempt may succeed."""
    details: Any
    """JSON details reported with the failure (for an agent's handler: type and traceback)."""
    subtask_id: str
    """The sub-task that failed."""
    agent_id: str
    """Agent that held the lease."""
    attempt: int
    """Attempt number that failed."""
    time: datetime | None
    """Time the failure was recorded."""

    @classmethod
    def from_proto(cls, failure: pb.Failure) -> Failure:
        """Build from the wire form."""
        return cls(
            failure_class=FailureClass(failure.failure_class),
            message=failure.message,
            retryable=failure.retryable,
            details=_json(failure, "details"),
            subtask_id=failure.subtask_id,
            agent_id=failure.agent_id,
            attempt=failure.attempt,
            time=_time(failure, "failure_time"),
        )


def _failure(message: Any, field: str) -> Failure | None:
    return Failure.from_proto(getattr(message, field)) if message.HasField(field) else None


@dataclass(frozen=True, slots=True)
class Lease:
    """The right of one agent to work on one sub-task for a while."""

    subtask_id: str
    """The leased sub-task."""
    fencing_token: int
    """Token that completions and fenced writes present; grows with every lease."""
    agent_id: str
    """Agent holding the lease."""
    attempt: int
    """Attempt number the lease is for, from 1."""
    ttl: float
    """Seconds the lease lives without a heartbeat naming the sub-task."""
    expire_time: datetime | None
    """Time the lease expires unless renewed."""

    @classmethod
    def from_proto(cls, lease: pb.Lease) -> Lease:
        """Build from the wire form."""
        return cls(
            subtask_id=lease.subtask_id,
            fencing_token=lease.fencing_token,
            agent_id=lease.agent_id,
            attempt=lease.attempt,
            ttl=seconds(lease.ttl),
            expire_time=_time(lease, "expire_time"),
        )


@dataclass(frozen=True, slots=True)
class Subtask:
    """One node of a task's DAG."""

    subtask_id: str
    """Server identifier, unique across tasks."""
    task_id: str
    """The task it belongs to."""
    local_id: str
    """Identifier within the task, as submitted or chosen by the splitter."""
    title: str
    """Short title."""
    description: str
    """What to do."""
    input: Any
    """JSON input (the task's when the sub-task has none of its own)."""
    required_capabilities: tuple[str, ...]
    """Capabilities an agent needs to be assigned it."""
    required_skills: tuple[str, ...]
    """Skill ids or tags an agent must offer to be assigned it (the task's and its own)."""
    depends_on: tuple[str, ...]
    """Server identifiers of the sub-tasks that must succeed first."""
    state: SubtaskState
    """Lifecycle state."""
    attempt: int
    """Attempts started so far."""
    max_attempts: int
    """Attempts allowed; agent deaths do not count."""
    lease: Lease | None
    """Current lease while LEASED."""
    agent_id: str
    """Agent holding it while LEASED, else the last one that did."""
    result: Any
    """JSON result once SUCCEEDED."""
    last_failure: Failure | None
    """Latest failure, if any."""
    create_time: datetime | None
    """Time it was created."""
    update_time: datetime | None
    """Time of its latest change."""
    start_time: datetime | None
    """Time its first lease was granted."""
    end_time: datetime | None
    """Time it reached a final state."""
    revision: int
    """Store revision of its latest change."""

    @classmethod
    def from_proto(cls, subtask: pb.Subtask) -> Subtask:
        """Build from the wire form."""
        return cls(
            subtask_id=subtask.subtask_id,
            task_id=subtask.task_id,
            local_id=subtask.local_id,
            title=subtask.title,
            description=subtask.description,
            input=_json(subtask, "input"),
            required_capabilities=tuple(subtask.required_capabilities),
            required_skills=tuple(subtask.required_skills),
            depends_on=tuple(subtask.depends_on),
            state=SubtaskState(subtask.state),
            attempt=subtask.attempt,
            max_attempts=subtask.max_attempts,
            lease=Lease.from_proto(subtask.lease) if subtask.HasField("lease") else None,
            agent_id=subtask.agent_id,
            result=_json(subtask, "result"),
            last_failure=_failure(subtask, "last_failure"),
            create_time=_time(subtask, "create_time"),
            update_time=_time(subtask, "update_time"),
            start_time=_time(subtask, "start_time"),
            end_time=_time(subtask, "end_time"),
            revision=subtask.revision,
        )


@dataclass(frozen=True, slots=True)
class SubtaskCounts:
    """Number of a task's sub-tasks in each state."""

    total: int
    """All of them."""
    blocked: int
    """Waiting on dependencies."""
    ready: int
    """Waiting for an agent."""
    leased: int
    """Being worked on."""
    succeeded: int
    """Done."""
    failed: int
    """Failed for good."""
    cancelled: int
    """Cancelled."""


@dataclass(frozen=True, slots=True)
class Task:
    """A submitted task: its state, progress and, once it succeeded, its aggregated result."""

    task_id: str
    """Server identifier (a UUID)."""
    title: str
    """Short title."""
    description: str
    """What to do."""
    input: Any
    """JSON input handed to sub-tasks that have none of their own."""
    required_capabilities: tuple[str, ...]
    """Capabilities every sub-task requires."""
    required_skills: tuple[str, ...]
    """Skill ids or tags every sub-task requires."""
    priority: int
    """Queue priority; higher runs first."""
    max_attempts: int
    """Attempts per sub-task."""
    lease_ttl: float
    """Seconds each lease lives without renewal."""
    split_policy: SplitPolicy
    """How it was split."""
    allow_partial_results: bool
    """Whether it succeeds with the results of the sub-tasks that did not fail."""
    aggregation_subtask_id: str
    """Sub-task whose result is the task's; empty when results are merged by local id."""
    state: TaskState
    """Lifecycle state."""
    subtasks: tuple[Subtask, ...]
    """Sub-tasks in creation (topological) order; empty unless read in full."""
    result: Any
    """Aggregated JSON result once SUCCEEDED: the aggregation sub-task's result, or an
    object mapping each succeeded sub-task's local id to its result."""
    counts: SubtaskCounts
    """Sub-tasks per state."""
    failure: Failure | None
    """The failure that failed the task."""
    state_reason: str
    """Why it reached a final state (a cancel reason or failure summary)."""
    submitter_agent_id: str
    """Agent that submitted it; empty without an agent session."""
    request_id: str
    """Idempotency key it was submitted with."""
    create_time: datetime | None
    """Time it was submitted."""
    update_time: datetime | None
    """Time of its latest change."""
    end_time: datetime | None
    """Time it reached a final state."""
    revision: int
    """Store revision of its latest change, its sub-tasks' included."""

    @classmethod
    def from_proto(cls, task: pb.Task) -> Task:
        """Build from the wire form."""
        counts = task.counts
        return cls(
            task_id=task.task_id,
            title=task.title,
            description=task.description,
            input=_json(task, "input"),
            required_capabilities=tuple(task.required_capabilities),
            required_skills=tuple(task.required_skills),
            priority=task.priority,
            max_attempts=task.max_attempts,
            lease_ttl=seconds(task.lease_ttl),
            split_policy=SplitPolicy(task.split_policy),
            allow_partial_results=task.allow_partial_results,
            aggregation_subtask_id=task.aggregation_subtask_id,
            state=TaskState(task.state),
            subtasks=tuple(Subtask.from_proto(subtask) for subtask in task.subtasks),
            result=_json(task, "result"),
            counts=SubtaskCounts(
                total=counts.total,
                blocked=counts.blocked,
                ready=counts.ready,
                leased=counts.leased,
                succeeded=counts.succeeded,
                failed=counts.failed,
                cancelled=counts.cancelled,
            ),
            failure=_failure(task, "failure"),
            state_reason=task.state_reason,
            submitter_agent_id=task.submitter_agent_id,
            request_id=task.request_id,
            create_time=_time(task, "create_time"),
            update_time=_time(task, "update_time"),
            end_time=_time(task, "end_time"),
            revision=task.revision,
        )


@dataclass(frozen=True, slots=True)
class TaskTransition:
    """The task changed state (:meth:`Planner.watch` yields it)."""

    revision: int
    """Store revision of the transition."""
    time: datetime | None
    """Time it was recorded."""
    task_id: str
    """The task."""
    agent_id: str
    """Agent that caused it (submitter, canceller, lease holder); empty for the server."""
    from_state: TaskState | None
    """State before; None for the submission."""
    to_state: TaskState
    """State after."""
    task: Task
    """The task as it stood when the transition was delivered (it may be ahead of it)."""


@dataclass(frozen=True, slots=True)
class SubtaskTransition:
    """A sub-task changed state (:meth:`Planner.watch` yields it)."""

    revision: int
    """Store revision of the transition."""
    time: datetime | None
    """Time it was recorded."""
    task_id: str
    """The task."""
    agent_id: str
    """Agent that caused it (the lease holder, for leases, completions and failures)."""
    subtask_id: str
    """The sub-task."""
    local_id: str
    """Its local id within the task."""
    from_state: SubtaskState | None
    """State before; None for the creation."""
    to_state: SubtaskState
    """State after."""
    attempt: int
    """Attempt the transition belongs to."""
    fencing_token: int
    """Fencing token of the lease granted or ended; 0 if none."""
    failure: Failure | None
    """Why the sub-task left LEASED other than by completing."""
    task: Task
    """The task as it stood when the transition was delivered (it may be ahead of it)."""


TaskEvent: TypeAlias = TaskTransition | SubtaskTransition
"""One transition of a task or of one of its sub-tasks."""


def _event(event: pb.TaskEvent, task: Task) -> TaskEvent:
    time = _time(event, "event_time")
    if event.HasField("subtask"):
        change = event.subtask
        return SubtaskTransition(
            revision=event.revision,
            time=time,
            task_id=event.task_id,
            agent_id=event.agent_id,
            subtask_id=change.subtask_id,
            local_id=change.local_id,
            from_state=SubtaskState(change.from_state) if change.from_state else None,
            to_state=SubtaskState(change.to_state),
            attempt=change.attempt,
            fencing_token=change.fencing_token,
            failure=_failure(change, "failure"),
            task=task,
        )
    return TaskTransition(
        revision=event.revision,
        time=time,
        task_id=event.task_id,
        agent_id=event.agent_id,
        from_state=TaskState(event.task.from_state) if event.task.from_state else None,
        to_state=TaskState(event.task.to_state),
        task=task,
    )


class TaskFailed(Exception):
    """A task ended without a result (:meth:`Planner.result` raises it).

    Attributes:
        task: The task as it ended.
        failure: The sub-task failure that failed it, if any.
    """

    def __init__(self, task: Task) -> None:
        super().__init__(task.state_reason or f"task {task.task_id} {task.state.name.lower()}")
        self.task = task
        self.failure = task.failure


class TaskCancelled(TaskFailed):
    """A task was cancelled before it succeeded."""


# --- what the planner sends ---------------------------------------------------------------------


def _value(value: JSON) -> struct_pb2.Value | None:
    return None if value is None else to_proto_value(value)


@dataclass(frozen=True, slots=True)
class SubtaskSpec:
    """A sub-task of an EXPLICIT task (a dict with these keys works as well)."""

    local_id: str
    """Identifier within the task, 1-64 characters of ``[A-Za-z0-9._-]``."""
    title: str = ""
    """Short title; the local id when empty."""
    description: str = ""
    """What to do."""
    input: JSON = None
    """JSON input; None hands the sub-task the task's input."""
    capabilities: Sequence[str] = ()
    """Capabilities required on top of the task's."""
    skills: Sequence[str] = ()
    """Skills required on top of the task's: each an id or tag of a skill the agent offers."""
    depends_on: Sequence[str] = ()
    """Local ids of the sub-tasks that must succeed first."""
    max_attempts: int = 0
    """Attempts allowed; 0 for the task's."""

    @classmethod
    def of(cls, spec: SubtaskSpec | Mapping[str, Any] | Any) -> SubtaskSpec:
        """Return ``spec`` as a SubtaskSpec: given one, a mapping or a dataclass of its fields.

        Raises:
            TypeError: ``spec`` is none of those, or has fields a SubtaskSpec has not.
        """
        if isinstance(spec, SubtaskSpec):
            return spec
        if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
            return cls(**dataclasses.asdict(spec))
        if isinstance(spec, Mapping):
            return cls(**spec)
        raise TypeError(f"a sub-task is a SubtaskSpec, a mapping or a dataclass, not {spec!r}")

    @classmethod
    def from_proto(cls, spec: pb.SubtaskSpec) -> SubtaskSpec:
        """Build from the wire form."""
        return cls(
            local_id=spec.local_id,
            title=spec.title,
            description=spec.description,
            input=_json(spec, "input"),
            capabilities=tuple(spec.required_capabilities),
            skills=tuple(spec.required_skills),
            depends_on=tuple(spec.depends_on),
            max_attempts=spec.max_attempts,
        )

    def to_proto(self) -> pb.SubtaskSpec:
        """Return the wire form."""
        return pb.SubtaskSpec(
            local_id=self.local_id,
            title=self.title or self.local_id,
            description=self.description,
            input=_value(self.input),
            required_capabilities=list(self.capabilities),
            depends_on=list(self.depends_on),
            max_attempts=self.max_attempts,
            required_skills=list(self.skills),
        )


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A task to analyse or submit."""

    title: str
    """Short title, 1-256 characters."""
    description: str = ""
    """What to do; the AUTO split policy splits it."""
    input: JSON = None
    """JSON input for sub-tasks that have none of their own; None for none."""
    capabilities: Sequence[str] = ()
    """Capabilities every sub-task requires."""
    skills: Sequence[str] = ()
    """Skills every sub-task requires: for each, the agent offers a skill with that id or tag."""
    subtasks: Sequence[SubtaskSpec | Mapping[str, Any] | Any] = ()
    """Sub-tasks (SubtaskSpecs, or dicts or dataclasses of the same fields)."""
    split: SplitPolicy | None = None
    """How to split; None means EXPLICIT when ``subtasks`` are given, else NONE."""
    aggregate: str = ""
    """Local id of the sub-task whose result is the task's; it must depend on all others."""
    priority: int = 0
    """Queue priority, -1000 to 1000; higher runs first."""
    max_attempts: int = 0
    """Attempts per sub-task; 0 for the server's default (3)."""
    lease_ttl: float | None = None
    """Seconds a lease lives without renewal; None for the server's default (30 s)."""
    allow_partial_results: bool = False
    """Succeed with the results of the sub-tasks that did not fail."""

    def to_proto(self) -> pb.TaskSpec:
        """Return the wire form.

        Raises:
            TypeError: a sub-task is not a SubtaskSpec, mapping or dataclass of its fields.
        """
        subtasks = [SubtaskSpec.of(subtask).to_proto() for subtask in self.subtasks]
        split = self.split or (SplitPolicy.EXPLICIT if subtasks else SplitPolicy.NONE)
        return pb.TaskSpec(
            title=self.title,
            description=self.description,
            input=_value(self.input),
            required_capabilities=list(self.capabilities),
            priority=self.priority,
            max_attempts=self.max_attempts,
            lease_ttl=None if self.lease_ttl is None else duration(self.lease_ttl),
            split_policy=split.value,
            allow_partial_results=self.allow_partial_results,
            subtasks=subtasks,
            aggregation_local_id=self.aggregate,
            required_skills=list(self.skills),
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """What :meth:`Planner.analyze` proposes: the sub-tasks a task would run as."""

    parallelizable: bool
    """Whether at least two sub-tasks can run at the same time."""
    reason: str
    """Why it was split this way."""
    subtasks: tuple[SubtaskSpec, ...]
    """Proposed sub-tasks with their dependencies, in topological order."""
    aggregate: str
    """Proposed aggregation sub-task's local id; empty when results are merged by local id."""
    splitter: str
    """Name of the splitter that made the plan."""


class TaskMirror:
    """The whole task of a WatchTask stream, rebuilt from its messages.

    In ``TASK_VIEW_FULL`` a stream sends every sub-task first, then the sub-tasks each
    transition changed (``WatchTaskResponse.subtasks``); the mirror keeps the latest of each.
    """

    def __init__(self) -> None:
        """Start empty, for one stream."""
        self._subtasks: dict[str, pb.Subtask] = {}

    def update(self, response: pb.WatchTaskResponse) -> pb.Task | None:
        """Take in one message; return its task with every sub-task known so far.

        Returns None for a message that only carries sub-tasks (more follow).
        """
        for subtask in response.subtasks:
            self._subtasks[subtask.subtask_id] = subtask
        if not response.HasField("task"):
            return None
        if not self._subtasks:
            return response.task
        task = pb.Task()
        task.CopyFrom(response.task)
        task.subtasks.extend(self._subtasks.values())
        return task


# --- the client ---------------------------------------------------------------------------------


class Planner:
    """Submits tasks and follows them; ``client.tasks`` of an AgentcoordClient.

    Errors are :class:`~agentcoord.client.RPCError` subclasses, as for ``client.state``:
    for example :class:`~agentcoord.client.NotFoundError` for an unknown task id.
    """

    def __init__(self, raw: DistributionClient, client: AgentcoordClient) -> None:
        """Wrap the raw per-RPC Distribution client ``raw`` of ``client``."""
        self._raw = raw
        self._client = client

    async def analyze(self, spec: TaskSpec) -> Plan:
        """Return the plan ``spec`` would run as, without creating anything.

        Raises:
            InvalidArgumentError: the spec is not valid (``field_violations`` names the field).
        """
        with typed_errors():
            response = await self._raw.analyze_task(pb.AnalyzeTaskRequest(task=spec.to_proto()))
        return Plan(
            parallelizable=response.parallelizable,
            reason=response.reason,
            subtasks=tuple(SubtaskSpec.from_proto(spec) for spec in response.subtasks),
            aggregate=response.aggregation_local_id,
            splitter=response.splitter,
        )

    async def submit(self, spec: TaskSpec, *, request_id: str | None = None) -> Task:
        """Create a task; return it with its sub-tasks.

        The submission carries an idempotency key, so it is retried after UNAVAILABLE
        without creating the task twice.

        Args:
            spec: The task.
            request_id: Idempotency key; a fresh one by default. Submitting again with the
                same key returns the first task.

        Raises:
            InvalidArgumentError: the spec is not valid, e.g. a cycle or an unknown local id.
        """
        request = pb.SubmitTaskRequest(
            task=spec.to_proto(), request_id=request_id or new_request_id()
        )
        with typed_errors():
            response = await self._raw.submit_task(request)
        return await self._complete(response.task, response.next_subtasks_page_token)

    async def get(self, task_id: str, *, full: bool = True) -> Task:
        """Return a task; with ``full`` (the default) all its sub-tasks too.

        A task too large for one message comes with its first sub-tasks; the rest are
        read page by page (ListSubtasks) before this returns.

        Raises:
            NotFoundError: no such task.
        """
        view = pb.TASK_VIEW_FULL if full else pb.TASK_VIEW_BASIC
        with typed_errors():
            response = await self._raw.get_task(pb.GetTaskRequest(task_id=task_id, view=view))
        return await self._complete(response.task, response.next_subtasks_page_token)

    async def subtasks(self, task_id: str, *, page_token: str = "") -> AsyncIterator[Subtask]:
        """Yield a task's sub-tasks in task order, following the pages (ListSubtasks).

        Args:
            task_id: The task.
            page_token: Start after the sub-tasks a GetTask or SubmitTask response held
                (its ``next_subtasks_page_token``); the first sub-task when empty.

        Raises:
            NotFoundError: no such task.
        """
        async for message in self._subtask_pages(task_id, page_token):
            yield Subtask.from_proto(message)

    async def _subtask_pages(self, task_id: str, page_token: str) -> AsyncIterator[pb.Subtask]:
        request = pb.ListSubtasksRequest(task_id=task_id, page_size=1000, page_token=page_token)
        while True:
            with typed_errors():
                response = await self._raw.list_subtasks(request)
            for subtask in response.subtasks:
                yield subtask
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    async def _complete(self, task: pb.Task, page_token: str) -> Task:
        """Return ``task`` with the sub-tasks the server could not fit in its message."""
        if page_token:
            task.subtasks.extend([s async for s in self._subtask_pages(task.task_id, page_token)])
        if task.state == pb.Task.STATE_SUCCEEDED and not task.HasField("result"):
            # The merged result was too large for one message: merge it here.
            subtasks = task.subtasks or [s async for s in self._subtask_pages(task.task_id, "")]
            task.result.struct_value.update(
                {
                    s.local_id: from_proto_value(s.result) if s.HasField("result") else None
                    for s in subtasks
                    if s.state == pb.Subtask.STATE_SUCCEEDED
                }
            )
        return Task.from_proto(task)

    async def list(
        self,
        *,
        states: Iterable[TaskState] = (),
        submitter_agent_id: str = "",
        full: bool = False,
    ) -> AsyncIterator[Task]:
        """Yield tasks, newest first, following the pages.

        Args:
            states: Only tasks in these states; every state when empty.
            submitter_agent_id: Only tasks this agent submitted.
            full: Include every task's sub-tasks.
        """
        request = pb.ListTasksRequest(
            states=[state.value for state in states],
            submitter_agent_id=submitter_agent_id,
            view=pb.TASK_VIEW_FULL if full else pb.TASK_VIEW_BASIC,
        )
        while True:
            with typed_errors():
                response = await self._raw.list_tasks(request)
            for task in response.tasks:
                if full and len(task.subtasks) < task.counts.total:
                    # Only the first ones fitted in the page: read them all.
                    del task.subtasks[:]
                    task.subtasks.extend([s async for s in self._subtask_pages(task.task_id, "")])
                yield await self._complete(task, "")
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    async def cancel(self, task_id: str, reason: str = "") -> Task:
        """Cancel a task; holders of its leases are told to stop. Return the task.

        Raises:
            NotFoundError: no such task.
            FailedPreconditionError: the task already succeeded or failed.
        """
        with typed_errors():
            response = await self._raw.cancel_task(
                pb.CancelTaskRequest(task_id=task_id, reason=reason)
            )
        return Task.from_proto(response.task)

    async def watch(
        self,
        task_id: str,
        *,
        start_revision: int = 0,
        full: bool = False,
        retry: RetryPolicy | None = None,
    ) -> AsyncGenerator[TaskEvent, None]:
        """Yield the task's transitions in revision order, exactly once, until it ends.

        After UNAVAILABLE (a restart, a lost connection, a failover) the watch reconnects by
        itself and resumes from the last revision it reached.

        Args:
            task_id: The task.
            start_revision: Replay the transitions after this revision first; 0: from now.
            full: Give each event's ``task`` its sub-tasks.
            retry: Back-off while reconnecting; the client's policy by default.

        Raises:
            NotFoundError: no such task.
            OutOfRangeError: the revision to resume from is no longer retained.
        """
        policy = retry or self._client.retry
        last = start_revision
        view = pb.TASK_VIEW_FULL if full else pb.TASK_VIEW_BASIC
        while True:
            request = pb.WatchTaskRequest(task_id=task_id, start_revision=last, view=view)
            stream: AsyncGenerator[pb.WatchTaskResponse, None] = await policy.retrying(
                RESUMABLE_CODES
            )(open_stream, functools.partial(self._raw.watch_task, request))
            opened_at = last
            subtasks: dict[str, Subtask] = {}  # FULL: every sub-task first, then the changed
            try:
                async for response in stream:
                    for subtask in response.subtasks:
                        subtasks[subtask.subtask_id] = Subtask.from_proto(subtask)
                    if not response.HasField("task"):
                        continue  # sub-tasks only: the message with the task follows
                    task = Task.from_proto(response.task)
                    if subtasks:
                        task = dataclasses.replace(task, subtasks=tuple(subtasks.values()))
                    for event in response.events:
                        if event.revision > last:
                            yield _event(event, task)
                    last = max(last, response.revision)
                return  # the stream ends when the task does
            except RPCError as error:
                if not is_resumable(error, progressed=last > opened_at):
                    raise typed_error(error) from None
            finally:
                await stream.aclose()

    async def result(self, task_id: str, *, timeout: float | None = None) -> Any:
        """Wait for a task to end; return its aggregated result.

        Args:
            task_id: The task.
            timeout: Seconds to wait at most; None waits as long as it takes.

        Raises:
            TaskFailed: the task failed (``failure`` says which sub-task and why).
            TaskCancelled: the task was cancelled.
            TimeoutError: ``timeout`` passed first.
            NotFoundError: no such task.
        """
        async with asyncio.timeout(timeout):
            task = await self.get(task_id, full=False)
            while not task.state.is_final:
                async with contextlib.aclosing(self.watch(task_id)) as events:
                    async for _ in events:
                        pass
                task = await self.get(task_id, full=False)
        if task.state is TaskState.SUCCEEDED:
            return task.result
        if task.state is TaskState.CANCELLED:
            raise TaskCancelled(task)
        raise TaskFailed(task)
