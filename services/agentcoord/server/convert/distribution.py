"""Distribution's proto ⇄ core translation: tasks, sub-tasks, leases, plans, task events."""

from __future__ import annotations

from google.protobuf import json_format, struct_pb2

from agentcoord.core.distribution import TaskView
from agentcoord.core.models import Change
from agentcoord.core.scheduler import Assignment, Revoked
from agentcoord.core.tasks import (
    Failure,
    FailureClass,
    Lease,
    Plan,
    RevocationReason,
    SplitPolicy,
    Subtask,
    SubtaskSpec,
    SubtaskState,
    Task,
    TaskState,
)
from agentcoord.distribution.v1 import distribution_service_pb2 as pb
from agentcoord.server.convert.wire import seconds_to_duration, to_timestamp

MAX_JSON_BYTES = 1 << 20
"""Largest encoded input or result."""

TASK_STATE_TO_PROTO = {
    TaskState.PENDING: pb.Task.STATE_PENDING,
    TaskState.RUNNING: pb.Task.STATE_RUNNING,
    TaskState.SUCCEEDED: pb.Task.STATE_SUCCEEDED,
    TaskState.FAILED: pb.Task.STATE_FAILED,
    TaskState.CANCELLED: pb.Task.STATE_CANCELLED,
}
TASK_STATE_FROM_PROTO = {value: key for key, value in TASK_STATE_TO_PROTO.items()}
SUBTASK_STATE_TO_PROTO = {
    SubtaskState.BLOCKED: pb.Subtask.STATE_BLOCKED,
    SubtaskState.READY: pb.Subtask.STATE_READY,
    SubtaskState.LEASED: pb.Subtask.STATE_LEASED,
    SubtaskState.SUCCEEDED: pb.Subtask.STATE_SUCCEEDED,
    SubtaskState.FAILED: pb.Subtask.STATE_FAILED,
    SubtaskState.CANCELLED: pb.Subtask.STATE_CANCELLED,
}
FULL_BY_VIEW = {pb.TASK_VIEW_BASIC: False, pb.TASK_VIEW_FULL: True}
"""Whether each known TaskView returns every sub-task."""
SPLIT_POLICY_FROM_PROTO = {
    pb.SPLIT_POLICY_NONE: SplitPolicy.NONE,
    pb.SPLIT_POLICY_EXPLICIT: SplitPolicy.EXPLICIT,
    pb.SPLIT_POLICY_AUTO: SplitPolicy.AUTO,
}
SPLIT_POLICY_TO_PROTO = {value: key for key, value in SPLIT_POLICY_FROM_PROTO.items()}
FAILURE_CLASS_TO_PROTO = {
    FailureClass.AGENT_DIED: pb.FAILURE_CLASS_AGENT_DIED,
    FailureClass.LEASE_LOST: pb.FAILURE_CLASS_LEASE_LOST,
    FailureClass.TASK_ERROR: pb.FAILURE_CLASS_TASK_ERROR,
    FailureClass.TIMEOUT: pb.FAILURE_CLASS_TIMEOUT,
}
FAILURE_CLASS_FROM_PROTO = {value: key for key, value in FAILURE_CLASS_TO_PROTO.items()}
REVOCATION_REASON_TO_PROTO = {
    RevocationReason.TASK_CANCELLED: pb.Revocation.REASON_TASK_CANCELLED,
    RevocationReason.TASK_FAILED: pb.Revocation.REASON_TASK_FAILED,
    RevocationReason.LEASE_EXPIRED: pb.Revocation.REASON_LEASE_EXPIRED,
    RevocationReason.SESSION_ENDED: pb.Revocation.REASON_SESSION_ENDED,
}


def _value(text: str | None) -> struct_pb2.Value | None:
    if text is None:
        return None
    return json_format.Parse(text, struct_pb2.Value())


def _result(text: str | None) -> struct_pb2.Value | None:
    """Return a task's aggregated result, or None when it exceeds MAX_JSON_BYTES."""
    if text is None or len(text) > MAX_JSON_BYTES:
        return None
    value = _value(text)
    return value if value is not None and value.ByteSize() <= MAX_JSON_BYTES else None


def _subtask_spec_to_proto(spec: SubtaskSpec) -> pb.SubtaskSpec:
    return pb.SubtaskSpec(
        local_id=spec.local_id,
        title=spec.title,
        description=spec.description,
        input=_value(spec.input),
        required_capabilities=spec.required_capabilities,
        depends_on=spec.depends_on,
        max_attempts=spec.max_attempts,
        required_skills=spec.required_skills,
    )


def plan_to_proto(plan: Plan) -> pb.AnalyzeTaskResponse:
    """Return the wire form of a plan."""
    return pb.AnalyzeTaskResponse(
        parallelizable=plan.parallelizable,
        reason=plan.reason,
        subtasks=[_subtask_spec_to_proto(spec) for spec in plan.subtasks],
        aggregation_local_id=plan.aggregation_local_id,
        splitter=plan.splitter,
    )


def failure_to_proto(failure: Failure | None) -> pb.Failure | None:
    """Return the wire form of a failure."""
    if failure is None:
        return None
    return pb.Failure(
        failure_class=FAILURE_CLASS_TO_PROTO[failure.failure_class],
        message=failure.message,
        retryable=failure.retryable,
        details=_value(failure.details),
        subtask_id=failure.subtask_id,
        agent_id=failure.agent_id,
        attempt=failure.attempt,
        failure_time=to_timestamp(failure.time),
    )


def lease_to_proto(lease: Lease | None) -> pb.Lease | None:
    """Return the wire form of a lease."""
    if lease is None:
        return None
    return pb.Lease(
        subtask_id=lease.subtask_id,
        fencing_token=lease.fencing_token,
        expire_time=to_timestamp(lease.expire_time),
        ttl=seconds_to_duration(lease.ttl),
        agent_id=lease.agent_id,
        attempt=lease.attempt,
    )


def subtask_to_proto(subtask: Subtask, *, result: bool = True) -> pb.Subtask:
    """Return the wire form of a sub-task; without its ``result`` when the caller sets it."""
    return pb.Subtask(
        subtask_id=subtask.subtask_id,
        task_id=subtask.task_id,
        local_id=subtask.local_id,
        title=subtask.title,
        description=subtask.description,
        input=_value(subtask.input),
        required_capabilities=subtask.required_capabilities,
        depends_on=subtask.depends_on,
        state=SUBTASK_STATE_TO_PROTO[subtask.state],
        attempt=subtask.attempt,
        max_attempts=subtask.max_attempts,
        lease=lease_to_proto(subtask.lease),
        agent_id=subtask.agent_id,
        result=_value(subtask.result) if result else None,
        last_failure=failure_to_proto(subtask.last_failure),
        next_attempt_time=to_timestamp(subtask.next_attempt_time),
        create_time=to_timestamp(subtask.create_time),
        update_time=to_timestamp(subtask.update_time),
        start_time=to_timestamp(subtask.start_time),
        end_time=to_timestamp(subtask.end_time),
        revision=subtask.revision,
        required_skills=subtask.required_skills,
    )


def task_to_proto(view: TaskView) -> pb.Task:
    """Return the wire form of a task view."""
    task: Task = view.task
    counts = task.counts
    return pb.Task(
        task_id=task.task_id,
        title=task.title,
        description=task.description,
        input=_value(task.input),
        required_capabilities=task.required_capabilities,
        priority=task.priority,
        max_attempts=task.max_attempts,
        lease_ttl=seconds_to_duration(task.lease_ttl),
        split_policy=SPLIT_POLICY_TO_PROTO[task.split_policy],
        allow_partial_results=task.allow_partial_results,
        aggregation_subtask_id=task.aggregation_subtask_id,
        state=TASK_STATE_TO_PROTO[task.state],
        subtasks=[subtask_to_proto(s) for s in view.subtasks or ()],
        result=_result(view.result),
        counts=pb.Task.SubtaskCounts(
            total=counts.total,
            blocked=counts.blocked,
            ready=counts.ready,
            leased=counts.leased,
            succeeded=counts.succeeded,
            failed=counts.failed,
            cancelled=counts.cancelled,
        ),
        failure=failure_to_proto(task.failure),
        state_reason=task.state_reason,
        submitter_agent_id=task.submitter_agent_id,
        request_id=task.request_id,
        create_time=to_timestamp(task.create_time),
        update_time=to_timestamp(task.update_time),
        end_time=to_timestamp(task.end_time),
        revision=task.revision,
        required_skills=task.required_skills,
    )


def assignment_to_proto(assignment: Assignment) -> pb.Assignment:
    """Return the wire form of an assignment; the sub-task's lease, if it is the one, once."""
    subtask = subtask_to_proto(assignment.subtask)
    same = assignment.lease == assignment.subtask.lease
    return pb.Assignment(
        lease=subtask.lease if same else lease_to_proto(assignment.lease), subtask=subtask
    )


def revocation_to_proto(revoked: Revoked) -> pb.Revocation:
    """Return the wire form of a revocation."""
    return pb.Revocation(
        subtask_id=revoked.subtask_id,
        fencing_token=revoked.fencing_token,
        reason=REVOCATION_REASON_TO_PROTO[revoked.reason],
    )


def task_event_to_proto(change: Change) -> pb.TaskEvent:
    """Return the TaskEvent of a Distribution change log entry."""
    details = change.details
    event = pb.TaskEvent(
        revision=change.revision,
        event_time=to_timestamp(change.time),
        task_id=change.subject,
        agent_id=change.agent_id,
    )
    if change.kind.startswith("subtask."):
        failure = details.get("failure")
        event.subtask.CopyFrom(
            pb.TaskEvent.SubtaskTransition(
                subtask_id=details["subtask_id"],
                local_id=details["local_id"],
                from_state=(
                    SUBTASK_STATE_TO_PROTO[SubtaskState(details["from"])]
                    if details["from"]
                    else pb.Subtask.STATE_UNSPECIFIED
                ),
                to_state=SUBTASK_STATE_TO_PROTO[SubtaskState(details["to"])],
                attempt=details["attempt"],
                fencing_token=details["fencing_token"],
                failure=failure_to_proto(
                    None if failure is None else Failure.from_snapshot(failure)
                ),
            )
        )
    else:
        event.task.CopyFrom(
            pb.TaskEvent.TaskTransition(
                from_state=(
                    TASK_STATE_TO_PROTO[TaskState(details["from"])]
                    if details["from"]
                    else pb.Task.STATE_UNSPECIFIED
                ),
                to_state=TASK_STATE_TO_PROTO[TaskState(details["to"])],
            )
        )
    return event
