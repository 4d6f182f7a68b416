"""DistributionService handlers: validate, call the core, translate."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import grpc

from agentcoord.core.discovery import Session
from agentcoord.core.distribution import Connected, Distribution, TaskView, TaskWatchItem
from agentcoord.core.errors import InvalidInput, PermissionDenied
from agentcoord.core.scheduler import Assignment
from agentcoord.core.tasks import (
    Caller,
    SplitPolicy,
    SubtaskSpec,
    TaskCursor,
    TaskFilter,
    TaskSpec,
)
from agentcoord.distribution.v1 import distribution_service_pb2 as pb
from agentcoord.distribution.v1 import distribution_service_pb2_grpc as pb_grpc
from agentcoord.server import page_tokens, validation
from agentcoord.server.auth import Access, current_identity
from agentcoord.server.convert import wire
from agentcoord.server.convert.distribution import (
    FAILURE_CLASS_FROM_PROTO,
    FULL_BY_VIEW,
    MAX_JSON_BYTES,
    SPLIT_POLICY_FROM_PROTO,
    TASK_STATE_FROM_PROTO,
    TASK_STATE_TO_PROTO,
    assignment_to_proto,
    plan_to_proto,
    revocation_to_proto,
    subtask_to_proto,
    task_event_to_proto,
    task_to_proto,
)
from agentcoord.server.sizes import budget, chunks_by_size, fitting, item_size, revision_chunks
from agentcoord.server.streams import StreamTracker

if TYPE_CHECKING:
    from agentcoord.telemetry.spans import Tracing

    Context = grpc.aio.ServicerContext[Any, Any]

SERVICE = pb.DESCRIPTOR.services_by_name["DistributionService"]
"""Descriptor of the service."""

ACCESS = {
    "GetTask": Access.READ,
    "ListTasks": Access.READ,
    "ListSubtasks": Access.READ,
    "AnalyzeTask": Access.READ,
    "SubmitTask": Access.READ,
    "CancelTask": Access.READ,
    "WatchTask": Access.READ,
    "StreamAssignments": Access.AGENT,
    "ClaimSubtask": Access.AGENT,
    "CompleteSubtask": Access.AGENT,
    "FailSubtask": Access.AGENT,
}
"""Access each RPC needs."""

LOCAL_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""A sub-task's local id."""
MAX_TITLE = 256
MAX_DESCRIPTION = 65536
MAX_SUBTASKS = 10000
MAX_DETAILS_BYTES = 64 << 10
MAX_ERROR_MESSAGE = 4096
MAX_REQUEST_ID = 128
MAX_REASON = 1024
MAX_LEASE_NEXT = 1024
"""Most sub-tasks CompleteSubtask's ``lease_next`` asks for: the most capacity an agent has."""


class DistributionServicer(pb_grpc.DistributionServiceServicer):
    """Serves ``agentcoord.distribution.v1.DistributionService``."""

    def __init__(
        self,
        core: Distribution,
        streams: StreamTracker,
        max_message_bytes: int,
        tracing: Tracing | None = None,
    ) -> None:
        """Serve ``core``; ``streams`` ends long streams at shutdown.

        Responses are cut or split by size to stay under ``max_message_bytes``. With
        ``tracing``, a task keeps its submission's trace context, and each assignment gets a
        span in that trace whose context the agent receives.
        """
        self._core = core
        self._streams = streams
        self._max_bytes = budget(max_message_bytes)
        self._tracing = tracing

    async def GetTask(self, request: pb.GetTaskRequest, context: Context) -> pb.GetTaskResponse:
        """Return one task; in the FULL view the sub-tasks that fit, and a token for the rest."""
        task_id = validation.text("task_id", request.task_id, max_length=128, required=True)
        full = _full_view(request.view, unspecified=True)
        task, token = self._fitted(await self._core.get_task(task_id, full=full))
        return pb.GetTaskResponse(task=task, next_subtasks_page_token=token)

    async def ListTasks(
        self, request: pb.ListTasksRequest, context: Context
    ) -> pb.ListTasksResponse:
        """List tasks, newest first."""
        states = [
            validation.known(f"states[{index}]", state, TASK_STATE_FROM_PROTO, "task state")
            for index, state in enumerate(request.states)
        ]
        submitter = request.submitter_agent_id
        if submitter:
            validation.matching("submitter_agent_id", submitter, validation.AGENT_ID, "agent id")
        where = TaskFilter(frozenset(states), submitter)
        fingerprint = {"states": sorted(s.value for s in states), "submitter": submitter}
        position = page_tokens.decode(
            request.page_token, "ListTasks", fingerprint, page_tokens.time, page_tokens.task_id
        )
        views, cursor = await self._core.list_task_views(
            where,
            TaskCursor(*position) if position else None,
            validation.page_size("page_size", request.page_size),
            full=_full_view(request.view, unspecified=False),
        )
        tasks = [self._fitted(view)[0] for view in views]
        count = fitting(tasks, self._max_bytes)
        if count < len(tasks):
            last = views[count - 1].task
            tasks, cursor = tasks[:count], TaskCursor(last.create_time, last.task_id)
        token = ""
        if cursor is not None:
            token = page_tokens.encode("ListTasks", fingerprint, cursor.create_time, cursor.task_id)
        return pb.ListTasksResponse(tasks=tasks, next_page_token=token)

    async def ListSubtasks(
        self, request: pb.ListSubtasksRequest, context: Context
    ) -> pb.ListSubtasksResponse:
        """List a task's sub-tasks in task order, one page."""
        task_id = validation.text("task_id", request.task_id, max_length=128, required=True)
        position = page_tokens.decode(
            request.page_token, "ListSubtasks", _subtasks_query(task_id), page_tokens.subtask_place
        )
        subtasks, more = await self._core.list_subtasks(
            task_id,
            position[0] - 1 if position else -1,
            validation.page_size("page_size", request.page_size),
        )
        messages = [subtask_to_proto(subtask) for subtask in subtasks]
        count = fitting(messages, self._max_bytes)
        token = ""
        if more or count < len(messages):
            token = _subtasks_token(task_id, subtasks[count - 1].seq)
        return pb.ListSubtasksResponse(subtasks=messages[:count], next_page_token=token)

    async def AnalyzeTask(
        self, request: pb.AnalyzeTaskRequest, context: Context
    ) -> pb.AnalyzeTaskResponse:
        """Return the plan SubmitTask would run."""
        plan = self._core.analyze(task_spec_from_proto(request))
        return plan_to_proto(plan)

    async def SubmitTask(
        self, request: pb.SubmitTaskRequest, context: Context
    ) -> pb.SubmitTaskResponse:
        """Create a task."""
        spec = task_spec_from_proto(request)
        request_id = validation.text("request_id", request.request_id, max_length=MAX_REQUEST_ID)
        trace_parent = self._tracing.trace_parent() if self._tracing is not None else ""
        view = await self._core.submit(spec, request_id, _caller(), trace_parent)
        task, token = self._fitted(view)
        return pb.SubmitTaskResponse(task=task, next_subtasks_page_token=token)

    async def CancelTask(
        self, request: pb.CancelTaskRequest, context: Context
    ) -> pb.CancelTaskResponse:
        """Cancel a task."""
        task_id = validation.text("task_id", request.task_id, max_length=128, required=True)
        reason = validation.text("reason", request.reason, max_length=MAX_REASON)
        view = await self._core.cancel(task_id, reason, _caller())
        return pb.CancelTaskResponse(task=task_to_proto(view))

    async def WatchTask(
        self, request: pb.WatchTaskRequest, context: Context
    ) -> AsyncIterator[pb.WatchTaskResponse]:
        """Stream a task's transitions until it ends."""
        task_id = validation.text("task_id", request.task_id, max_length=128, required=True)
        if request.start_revision < 0:
            raise InvalidInput("start_revision", "must not be negative")
        full = _full_view(request.view, unspecified=False)
        validation.duration("progress_interval", request.progress_interval)  # reserved
        with self._streams.track():
            previous = 0
            async for item in self._core.watch(task_id, request.start_revision, full=full):
                for message in self._watch_messages(item, previous or item.revision):
                    yield message
                previous = item.revision

    def _fitted(self, view: TaskView) -> tuple[pb.Task, str]:
        """Return a task with the sub-tasks that fit one response, and a token for the rest."""
        task = task_to_proto(replace(view, subtasks=None))
        subtasks = view.subtasks or ()
        room = self._max_bytes - task.ByteSize()
        for index, subtask in enumerate(subtasks):
            message = subtask_to_proto(subtask)
            room -= item_size(message)
            if room < 0:
                after = subtasks[index - 1].seq if index else -1
                return task, _subtasks_token(view.task.task_id, after)
            task.subtasks.append(message)
        return task, ""

    def _watch_messages(self, item: TaskWatchItem, previous: int) -> Iterator[pb.WatchTaskResponse]:
        """Split one step of WatchTask by size into messages (docs: WatchTaskResponse)."""
        task = task_to_proto(item.view)
        room = self._max_bytes - task.ByteSize()
        events = [task_event_to_proto(change) for change in item.changes]
        chunks = list(revision_chunks(events, item.revision, room))
        subtasks: Sequence[pb.Subtask] = [subtask_to_proto(s) for s in item.subtasks]
        with_task = room - sum(item_size(e) for e in chunks[0][0])
        if sum(item_size(s) for s in subtasks) > with_task:
            for alone in chunks_by_size(subtasks, self._max_bytes):
                yield pb.WatchTaskResponse(subtasks=alone, revision=previous)
            subtasks = ()
        for index, (chunk, revision) in enumerate(chunks):
            yield pb.WatchTaskResponse(
                events=chunk, task=task, revision=revision, subtasks=subtasks if index == 0 else ()
            )

    async def StreamAssignments(
        self, request: pb.StreamAssignmentsRequest, context: Context
    ) -> AsyncIterator[pb.StreamAssignmentsResponse]:
        """Push leases to the calling agent."""
        session = _agent_session()
        with self._streams.track():
            async for message in self._core.assignments(session, request.agent_id):
                if isinstance(message, Connected):
                    await context.send_initial_metadata(())
                elif isinstance(message, Assignment):
                    yield pb.StreamAssignmentsResponse(assignment=self._assigned(message))
                else:
                    yield pb.StreamAssignmentsResponse(revocation=revocation_to_proto(message))

    async def ClaimSubtask(
        self, request: pb.ClaimSubtaskRequest, context: Context
    ) -> pb.ClaimSubtaskResponse:
        """Lease one READY sub-task to the calling agent, waiting up to ``wait``."""
        session = _agent_session()
        wait = validation.duration("wait", request.wait)
        if wait > 60:
            raise InvalidInput("wait", "must be between 0 and 60 s")
        remaining = context.time_remaining()
        if remaining is not None:
            wait = max(0.0, min(wait, remaining - 0.05))
        request_id = validation.text("request_id", request.request_id, max_length=MAX_REQUEST_ID)
        assignment = await self._core.claim(session, request.agent_id, wait, request_id)
        if assignment is None:
            return pb.ClaimSubtaskResponse()
        return pb.ClaimSubtaskResponse(assignment=self._assigned(assignment))

    def _assigned(self, assignment: Assignment) -> pb.Assignment:
        """Return the wire form of an assignment; when tracing, with its span's context."""
        message = assignment_to_proto(assignment)
        if self._tracing is not None:
            lease = assignment.lease
            subjects: dict[str, str | int] = {
                "agent_id": lease.agent_id,
                "task_id": assignment.subtask.task_id,
                "subtask_id": lease.subtask_id,
                "attempt": lease.attempt,
                "fencing_token": lease.fencing_token,
            }
            with self._tracing.span("assign", assignment.trace_parent, subjects) as trace_parent:
                message.trace_parent = trace_parent
        return message

    async def CompleteSubtask(
        self, request: pb.CompleteSubtaskRequest, context: Context
    ) -> pb.CompleteSubtaskResponse:
        """Record a sub-task's result."""
        session = _agent_session()
        subtask_id = validation.text(
            "subtask_id", request.subtask_id, max_length=128, required=True
        )
        token = _fencing_token(request.fencing_token)
        validation.text("request_id", request.request_id, max_length=MAX_REQUEST_ID)
        result = _json(request, "result", MAX_JSON_BYTES) or "null"
        lease_next = validation.in_range("lease_next", request.lease_next, 0, MAX_LEASE_NEXT)
        update, next_assignments = await self._core.complete(
            session, request.agent_id, subtask_id, token, result, lease_next
        )
        assert update.subtask is not None
        recorded = update.subtask
        sent = request.HasField("result") and recorded.result == result
        subtask = subtask_to_proto(recorded, result=not sent)
        if sent:  # the result as recorded is the one sent: no need to parse it again
            subtask.result.CopyFrom(request.result)
        return pb.CompleteSubtaskResponse(
            subtask=subtask,
            task_state=TASK_STATE_TO_PROTO[update.task.state],
            next_assignments=[self._assigned(a) for a in next_assignments],
        )

    async def FailSubtask(
        self, request: pb.FailSubtaskRequest, context: Context
    ) -> pb.FailSubtaskResponse:
        """Record a failed attempt of a sub-task."""
        session = _agent_session()
        subtask_id = validation.text(
            "subtask_id", request.subtask_id, max_length=128, required=True
        )
        token = _fencing_token(request.fencing_token)
        message = validation.text(
            "error_message", request.error_message, max_length=MAX_ERROR_MESSAGE, required=True
        )
        failure_class = FAILURE_CLASS_FROM_PROTO.get(request.failure_class)
        if failure_class is None:  # the core refuses the classes only the server records
            raise InvalidInput(
                "failure_class", "must be FAILURE_CLASS_TASK_ERROR or FAILURE_CLASS_TIMEOUT"
            )
        validation.text("request_id", request.request_id, max_length=MAX_REQUEST_ID)
        update = await self._core.fail(
            session,
            request.agent_id,
            subtask_id,
            token,
            message=message,
            retryable=request.retryable,
            failure_class=failure_class,
            details=_json(request, "details", MAX_DETAILS_BYTES),
        )
        assert update.subtask is not None
        return pb.FailSubtaskResponse(
            subtask=subtask_to_proto(update.subtask),
            task_state=TASK_STATE_TO_PROTO[update.task.state],
        )


def _caller() -> Caller:
    identity = current_identity()
    session = identity.session
    return Caller(agent_id=session.agent_id if session else "", admin=identity.admin)


def _subtasks_query(task_id: str) -> dict[str, str]:
    return {"subtasks_of": task_id}


def _subtasks_token(task_id: str, after_seq: int) -> str:
    """Return the ListSubtasks page token continuing after the sub-task at ``after_seq``."""
    return page_tokens.encode("ListSubtasks", _subtasks_query(task_id), after_seq + 1)


def _agent_session() -> Session:
    session = current_identity().session
    if session is None:
        raise PermissionDenied(
            "authorization: this call acts as an agent and needs its session token, "
            "not the admin token",
            reason="AGENT_SESSION_REQUIRED",
        )
    return session


def _full_view(value: int, *, unspecified: bool) -> bool:
    """Whether TaskView ``value`` asks for every sub-task; ``unspecified`` is the default."""
    if value == pb.TASK_VIEW_UNSPECIFIED:
        return unspecified
    return validation.known("view", value, FULL_BY_VIEW, "task view")


def _fencing_token(value: int) -> int:
    if value <= 0:
        raise InvalidInput("fencing_token", "must be positive (the token of your lease)")
    return value


def _json(message: Any, field: str, max_bytes: int, prefix: str = "") -> str | None:
    """Return the canonical JSON text of a Value field, or None when it is unset.

    ``prefix`` is the path of ``message`` in the request (``task.`` for a TaskSpec).
    """
    if not message.HasField(field):
        return None
    path = prefix + field
    value = getattr(message, field)
    text = wire.json_text(path, value)
    size = max(len(text), value.ByteSize())
    if size > max_bytes:
        raise InvalidInput(path, f"encodes to {size} bytes; at most {max_bytes}")
    return text.decode()


def _local_id(field: str, value: str) -> str:
    return validation.matching(field, value, LOCAL_ID, "local id (1-64 of [A-Za-z0-9._-])")


def _subtask_spec_from_proto(prefix: str, spec: pb.SubtaskSpec) -> SubtaskSpec:
    validation.at_most(f"{prefix}.depends_on", spec.depends_on, MAX_SUBTASKS)
    return SubtaskSpec(
        local_id=_local_id(f"{prefix}.local_id", spec.local_id),
        title=validation.text(f"{prefix}.title", spec.title, max_length=MAX_TITLE, required=True),
        description=validation.text(
            f"{prefix}.description", spec.description, max_length=MAX_DESCRIPTION
        ),
        input=_json(spec, "input", MAX_JSON_BYTES, f"{prefix}."),
        required_capabilities=validation.capabilities(
            f"{prefix}.required_capabilities", spec.required_capabilities
        ),
        depends_on=tuple(
            _local_id(f"{prefix}.depends_on[{index}]", local_id)
            for index, local_id in enumerate(spec.depends_on)
        ),
        max_attempts=validation.in_range(f"{prefix}.max_attempts", spec.max_attempts, 0, 100),
        required_skills=validation.skill_names(f"{prefix}.required_skills", spec.required_skills),
    )


def task_spec_from_proto(request: pb.SubmitTaskRequest | pb.AnalyzeTaskRequest) -> TaskSpec:
    """Validate and translate the ``task`` of a SubmitTask or AnalyzeTask request."""
    if not request.HasField("task"):
        raise InvalidInput("task", "is required")
    task = request.task
    policy = SPLIT_POLICY_FROM_PROTO.get(task.split_policy)
    if policy is None:
        raise InvalidInput("task.split_policy", "must be NONE, EXPLICIT or AUTO")
    validation.at_most("task.subtasks", task.subtasks, MAX_SUBTASKS)
    if policy is SplitPolicy.EXPLICIT and not task.subtasks:
        raise InvalidInput("task.subtasks", "SPLIT_POLICY_EXPLICIT needs at least one sub-task")
    if policy is not SplitPolicy.EXPLICIT and task.subtasks:
        raise InvalidInput("task.subtasks", "must be empty unless the split policy is EXPLICIT")
    description = validation.text("task.description", task.description, max_length=MAX_DESCRIPTION)
    if policy is SplitPolicy.AUTO and not description.strip():
        raise InvalidInput("task.description", "SPLIT_POLICY_AUTO splits the description: give one")
    # Unset or zero: the server default; otherwise clamped to the server's limits.
    lease_ttl = validation.duration("task.lease_ttl", task.lease_ttl)
    aggregation = task.aggregation_local_id
    if aggregation:
        _local_id("task.aggregation_local_id", aggregation)
    return TaskSpec(
        title=validation.text("task.title", task.title, max_length=MAX_TITLE, required=True),
        split_policy=policy,
        description=description,
        input=_json(task, "input", MAX_JSON_BYTES, "task."),
        required_capabilities=validation.capabilities(
            "task.required_capabilities", task.required_capabilities
        ),
        priority=validation.in_range("task.priority", task.priority, -1000, 1000),
        max_attempts=validation.in_range("task.max_attempts", task.max_attempts, 0, 100),
        lease_ttl=lease_ttl,
        allow_partial_results=task.allow_partial_results,
        subtasks=tuple(
            _subtask_spec_from_proto(f"task.subtasks[{index}]", spec)
            for index, spec in enumerate(task.subtasks)
        ),
        aggregation_local_id=aggregation,
        required_skills=validation.skill_names("task.required_skills", task.required_skills),
    )
