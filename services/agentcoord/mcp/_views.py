"""What the tools take and return: pydantic models, so every tool has a typed JSON schema.

The models are the MCP face of the SDK's records (``agentcoord.client``): plain JSON, times
as RFC 3339 strings, enums by name, sub-task dependencies by local id.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any, Literal

from google.protobuf import json_format
from pydantic import BaseModel, Field

from agentcoord.client import (
    Entry,
    Failure,
    Plan,
    SplitPolicy,
    Subtask,
    SubtaskSpec,
    Task,
    TaskSpec,
)
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.statesync.v1 import statesync_service_pb2 as statesync_pb


def _iso(time: datetime | None) -> str | None:
    return time.isoformat() if time is not None else None


# --- inputs -------------------------------------------------------------------------------------


class SubtaskInput(BaseModel):
    """One sub-task of an explicitly split task."""

    local_id: str = Field(description="Id within the task: 1-64 of [A-Za-z0-9._-].")
    title: str = Field("", description="Short title; the local id when empty.")
    description: str = Field("", description="What to do.")
    input: Any = Field(None, description="JSON input; null hands it the task's input.")
    capabilities: list[str] = Field(default_factory=list, description="Capabilities required.")
    skills: list[str] = Field(
        default_factory=list, description="Skills required: ids or tags of an agent's skills."
    )
    depends_on: list[str] = Field(
        default_factory=list, description="Local ids of sub-tasks that must succeed first."
    )
    max_attempts: int = Field(0, ge=0, description="Attempts allowed; 0 for the task's.")


class TaskInput(BaseModel):
    """A task to analyse or submit."""

    title: str = Field(description="Short title, 1-256 characters.")
    description: str = Field("", description="What to do; AUTO splitting reads it.")
    input: Any = Field(None, description="JSON input for sub-tasks without their own.")
    capabilities: list[str] = Field(
        default_factory=list, description="Capabilities every sub-task requires."
    )
    skills: list[str] = Field(
        default_factory=list,
        description="Skills every sub-task requires: ids or tags of a live agent's skills.",
    )
    subtasks: list[SubtaskInput] = Field(
        default_factory=list, description="Explicit sub-tasks; empty for one sub-task or AUTO."
    )
    split: Literal["NONE", "EXPLICIT", "AUTO"] | None = Field(
        None, description="How to split; default EXPLICIT with sub-tasks, else NONE."
    )
    aggregate: str = Field(
        "", description="Local id whose result is the task's; it must depend on all others."
    )
    priority: int = Field(0, ge=-1000, le=1000, description="Higher runs first.")
    max_attempts: int = Field(0, ge=0, description="Attempts per sub-task; 0 for 3.")
    lease_ttl_seconds: float | None = Field(
        None, gt=0, description="Seconds a lease lives unrenewed; default 30."
    )
    allow_partial_results: bool = Field(
        False, description="Succeed with the results of the sub-tasks that did not fail."
    )

    def to_spec(self) -> TaskSpec:
        """Return the SDK's TaskSpec."""
        return TaskSpec(
            title=self.title,
            description=self.description,
            input=self.input,
            capabilities=self.capabilities,
            skills=self.skills,
            subtasks=[SubtaskSpec(**subtask.model_dump()) for subtask in self.subtasks],
            split=SplitPolicy[self.split] if self.split else None,
            aggregate=self.aggregate,
            priority=self.priority,
            max_attempts=self.max_attempts,
            lease_ttl=self.lease_ttl_seconds,
            allow_partial_results=self.allow_partial_results,
        )


# --- Discovery ----------------------------------------------------------------------------------


class AgentView(BaseModel):
    """One registered agent."""

    agent_id: str
    name: str
    role: str
    capabilities: list[str]
    skills: list[str] = Field(description="Ids of the skills its A2A card lists.")
    capacity: int
    state: str = Field(description="LIVE, LEFT or EXPIRED.")
    status: str = Field(description="READY, BUSY or DRAINING.")
    active_subtasks: int
    last_heartbeat_time: str | None

    @classmethod
    def of(cls, agent: discovery_pb.Agent) -> AgentView:
        """Build from the wire form."""
        return cls(
            agent_id=agent.agent_id,
            name=agent.name,
            role=agent.role,
            capabilities=list(agent.capabilities),
            skills=[skill.id for skill in agent.skills],
            capacity=agent.capacity,
            state=discovery_pb.Agent.State.Name(agent.state).removeprefix("STATE_"),
            status=discovery_pb.Agent.Status.Name(agent.status).removeprefix("STATUS_"),
            active_subtasks=agent.load.active_subtasks,
            last_heartbeat_time=(
                agent.last_heartbeat_time.ToDatetime().isoformat() + "Z"
                if agent.HasField("last_heartbeat_time")
                else None
            ),
        )


class AgentList(BaseModel):
    """Agents matching the filter."""

    agents: list[AgentView]


class Summary(BaseModel):
    """Live agents at a glance."""

    live_agents: int
    live_agents_by_role: dict[str, int]
    live_agents_by_capability: dict[str, int]
    live_agents_by_skill: dict[str, int]
    live_agents_by_skill_tag: dict[str, int]
    can_coordinate: bool = Field(description="At least two live agents.")
    total_capacity: int
    active_subtasks: int

    @classmethod
    def of(cls, summary: discovery_pb.GetSummaryResponse) -> Summary:
        """Build from the wire form."""
        return cls(
            live_agents=summary.live_agents,
            live_agents_by_role=dict(summary.live_agents_by_role),
            live_agents_by_capability=dict(summary.live_agents_by_capability),
            live_agents_by_skill=dict(summary.live_agents_by_skill),
            live_agents_by_skill_tag=dict(summary.live_agents_by_skill_tag),
            can_coordinate=summary.can_coordinate,
            total_capacity=summary.total_capacity,
            active_subtasks=summary.active_subtasks,
        )


# --- Distribution -------------------------------------------------------------------------------


class FailureView(BaseModel):
    """Why an attempt failed."""

    failure_class: str
    message: str
    retryable: bool
    agent_id: str
    attempt: int

    @classmethod
    def of(cls, failure: Failure | None) -> FailureView | None:
        """Build from the SDK's record."""
        if failure is None:
            return None
        return cls(
            failure_class=failure.failure_class.name,
            message=failure.message,
            retryable=failure.retryable,
            agent_id=failure.agent_id,
            attempt=failure.attempt,
        )


class SubtaskView(BaseModel):
    """One sub-task of a task."""

    subtask_id: str
    local_id: str
    title: str
    description: str
    state: str
    depends_on: list[str] = Field(description="Local ids of the sub-tasks it waits for.")
    capabilities: list[str] = Field(description="Capabilities an agent needs to take it.")
    skills: list[str] = Field(description="Skill ids or tags an agent needs to take it.")
    agent_id: str
    attempt: int
    result: Any
    last_failure: FailureView | None

    @classmethod
    def of(cls, subtask: Subtask, local_ids: dict[str, str]) -> SubtaskView:
        """Build from the SDK's record; ``local_ids`` maps the task's server ids to local ids."""
        return cls(
            subtask_id=subtask.subtask_id,
            local_id=subtask.local_id,
            title=subtask.title,
            description=subtask.description,
            state=subtask.state.name,
            depends_on=[local_ids.get(i, i) for i in subtask.depends_on],
            capabilities=list(subtask.required_capabilities),
            skills=list(subtask.required_skills),
            agent_id=subtask.agent_id,
            attempt=subtask.attempt,
            result=subtask.result,
            last_failure=FailureView.of(subtask.last_failure),
        )


def local_ids(task: Task) -> dict[str, str]:
    """Return the local id of each of ``task``'s sub-tasks, by server id."""
    return {subtask.subtask_id: subtask.local_id for subtask in task.subtasks}


class TaskView(BaseModel):
    """A task, its progress and (once it succeeded) its result."""

    task_id: str
    title: str
    state: str = Field(description="PENDING, RUNNING, SUCCEEDED, FAILED or CANCELLED.")
    state_reason: str
    result: Any
    failure: FailureView | None
    subtasks_total: int
    subtasks_succeeded: int
    subtasks: list[SubtaskView]

    @classmethod
    def of(cls, task: Task) -> TaskView:
        """Build from the SDK's record."""
        ids = local_ids(task)
        return cls(
            task_id=task.task_id,
            title=task.title,
            state=task.state.name,
            state_reason=task.state_reason,
            result=task.result,
            failure=FailureView.of(task.failure),
            subtasks_total=task.counts.total,
            subtasks_succeeded=task.counts.succeeded,
            subtasks=[SubtaskView.of(subtask, ids) for subtask in task.subtasks],
        )


class WaitResult(BaseModel):
    """A task after waiting for it."""

    finished: bool = Field(description="False when the wait ended before the task did.")
    task: TaskView


class PlanView(BaseModel):
    """The sub-tasks a task would run as."""

    parallelizable: bool
    reason: str
    subtasks: list[SubtaskInput]
    aggregate: str
    splitter: str

    @classmethod
    def of(cls, plan: Plan) -> PlanView:
        """Build from the SDK's record."""
        return cls(
            parallelizable=plan.parallelizable,
            reason=plan.reason,
            subtasks=[
                SubtaskInput(
                    local_id=spec.local_id,
                    title=spec.title,
                    description=spec.description,
                    input=spec.input,
                    capabilities=list(spec.capabilities),
                    skills=list(spec.skills),
                    depends_on=list(spec.depends_on),
                    max_attempts=spec.max_attempts,
                )
                for spec in plan.subtasks
            ],
            aggregate=plan.aggregate,
            splitter=plan.splitter,
        )


class Claimed(BaseModel):
    """A sub-task this agent now holds, with everything needed to do it."""

    subtask_id: str
    task_id: str
    local_id: str
    title: str
    description: str
    input: Any
    attempt: int
    depends_on: list[str] = Field(description="Local ids of the sub-tasks it depended on.")
    dependency_results: dict[str, Any] = Field(description="Their results, by local id.")
    last_failure: FailureView | None = Field(description="Why the previous attempt failed.")


class ClaimResult(BaseModel):
    """The outcome of claim_subtask."""

    subtask: Claimed | None = Field(description="None when no work came within the wait.")


class Reported(BaseModel):
    """A completion or failure the server recorded."""

    subtask_id: str
    subtask_state: str
    task_state: str


# --- StateSync ----------------------------------------------------------------------------------


class StateEntry(BaseModel):
    """One key of shared state."""

    key: str
    value: Any = Field(description="JSON value (binary values as base64 text).")
    version: int = Field(description="Per-key version; give it as expected_version to update.")
    mod_revision: int
    agent_id: str = Field(description="Agent that wrote last.")
    update_time: str | None

    @classmethod
    def of(cls, entry: Entry) -> StateEntry:
        """Build from the SDK's record."""
        value = entry.value
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")
        return cls(
            key=entry.key,
            value=value,
            version=entry.version,
            mod_revision=entry.mod_revision,
            agent_id=entry.agent_id,
            update_time=_iso(entry.update_time),
        )


class StateRead(BaseModel):
    """The outcome of get_state."""

    entry: StateEntry | None = Field(description="None when the key does not exist.")


class StateList(BaseModel):
    """Entries under a prefix, in key order."""

    entries: list[StateEntry]


class EventView(BaseModel):
    """One entry of the change log."""

    revision: int
    event_time: str | None
    agent_id: str
    service: str
    kind: str
    subject: str
    details: dict[str, Any]

    @classmethod
    def of(cls, event: statesync_pb.Event) -> EventView:
        """Build from the wire form."""
        return cls(
            revision=event.revision,
            event_time=(
                event.event_time.ToDatetime().isoformat() + "Z"
                if event.HasField("event_time")
                else None
            ),
            agent_id=event.agent_id,
            service=statesync_pb.Service.Name(event.service).removeprefix("SERVICE_"),
            kind=event.kind,
            subject=event.subject,
            details=json_format.MessageToDict(event.details),
        )


class EventList(BaseModel):
    """Change log entries, oldest first."""

    events: list[EventView]
    next_revision: int = Field(description="Give it as after_revision to read on.")
