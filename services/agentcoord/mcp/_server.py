"""The MCP server of one agent: its tools and resources, over stdio or streamable HTTP."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from pydantic import Field

from agentcoord.client import (
    AddToSet,
    Append,
    Increment,
    MergePatch,
    Modification,
    RemoveFromSet,
    RPCError,
    SubtaskState,
    TaskFailed,
    TaskState,
)
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.mcp._session import AgentSession, LeaseLost, NotHeld
from agentcoord.mcp._views import (
    AgentList,
    AgentView,
    Claimed,
    ClaimResult,
    EventList,
    EventView,
    FailureView,
    PlanView,
    Reported,
    StateEntry,
    StateList,
    StateRead,
    Summary,
    TaskInput,
    TaskView,
    WaitResult,
    local_ids,
)
from agentcoord.statesync.v1 import statesync_service_pb2 as statesync_pb

MAX_CLAIM_WAIT = 60.0
"""Longest claim_subtask wait, in seconds (ClaimSubtask's own limit)."""
MAX_TASK_WAIT = 300.0
"""Longest wait_task wait, in seconds."""
MAX_LIST = 1000
"""Most items a list tool returns."""

INSTRUCTIONS = """\
You are one agent of an agentcoord team. Other agents (people's programs or other models)
share tasks and state with you. Take work with claim_subtask, do it, then report it with
complete_subtask or fail_subtask; leases and fencing tokens are kept for you. Plan work for
others with analyze_task and submit_task, follow it with get_task and wait_task. Share facts
under shared/ (or your own agents/<your id>/) with get_state, put_state and list_state;
update_state counts, appends and merges without conflicts when several agents write a key."""


def rpc_message(error: RPCError) -> str:
    """Return a failed call as a model reads it: status, server message, reason, fields."""
    text = f"{error.code.name}: {error.message}"
    if error.reason:
        text += f" (reason {error.reason})"
    if error.field_violations:
        text += f" (fields: {', '.join(error.field_violations)})"
    return text


@contextlib.contextmanager
def tool_errors() -> Iterator[None]:
    """Turn a refused call into a tool error the model can act on."""
    try:
        yield
    except RPCError as error:
        raise ToolError(rpc_message(error)) from error
    except (LeaseLost, NotHeld) as error:
        raise ToolError(str(error)) from error


def _modification(
    key: str, operation: str, by: float | None, items: list[Any] | None, patch: Any
) -> Modification:
    """Return the SDK's modification for update_state's arguments.

    Raises:
        ToolError: an argument the operation does not take is given, or one it needs is not.
    """
    given = {name for name, value in (("by", by), ("items", items)) if value is not None}
    if patch is not None:
        given.add("patch")
    wanted = {"increment": {"by"}, "merge_patch": {"patch"}}.get(operation, {"items"})
    if given - wanted:
        raise ToolError(f"{operation} does not take {', '.join(sorted(given - wanted))}")
    if operation == "increment":
        return Increment(key, 1 if by is None else by)
    if operation == "merge_patch":
        if patch is None:
            raise ToolError("merge_patch needs patch (use put_state to write null)")
        return MergePatch(key, patch)
    if items is None:
        raise ToolError(f"{operation} needs items")
    if operation == "append":
        return Append(key, items)
    if operation == "add_to_set":
        return AddToSet(key, items)
    return RemoveFromSet(key, items)


def build_server(session: AgentSession) -> MCPServer[Any]:
    """Return the MCP server whose tools and resources act as ``session``'s agent."""
    app: MCPServer[Any] = MCPServer(
        "agentcoord", instructions=INSTRUCTIONS, version="0.1.0", log_level="WARNING"
    )
    client = session.agent.client

    # --- Discovery ----------------------------------------------------------------------------

    async def agents(
        capabilities: list[str], skills: list[str], role: str, live_only: bool, limit: int
    ) -> AgentList:
        request = discovery_pb.ListAgentsRequest(
            capabilities=capabilities,
            skills=skills,
            role=role,
            states=[discovery_pb.Agent.STATE_LIVE] if live_only else [],
        )
        found: list[AgentView] = []
        async for agent in client.discovery.iter_agents(request):
            found.append(AgentView.of(agent))
            if len(found) >= limit:
                break
        return AgentList(agents=found)

    @app.tool(description="List the agents of the team: who they are, what they can do, how busy.")
    async def list_agents(
        capabilities: Annotated[
            list[str], Field(description="Only agents with every one of these.")
        ] = [],  # noqa: B006 - pydantic copies defaults
        skills: Annotated[
            list[str], Field(description="Only agents with a skill of each of these ids or tags.")
        ] = [],  # noqa: B006
        role: Annotated[str, Field(description="Only agents of this role.")] = "",
        live_only: Annotated[bool, Field(description="Leave out agents that left.")] = True,
        limit: Annotated[int, Field(ge=1, le=MAX_LIST)] = 100,
    ) -> AgentList:
        with tool_errors():
            return await agents(capabilities, skills, role, live_only, limit)

    @app.tool(description="Count live agents by role, capability and skill, and their capacity.")
    async def get_summary() -> Summary:
        with tool_errors():
            return Summary.of(await client.discovery.get_summary(discovery_pb.GetSummaryRequest()))

    # --- Distribution -------------------------------------------------------------------------

    @app.tool(description="Show how a task would be split into sub-tasks, without creating it.")
    async def analyze_task(task: TaskInput) -> PlanView:
        with tool_errors():
            return PlanView.of(await client.tasks.analyze(task.to_spec()))

    @app.tool(
        description="Submit a task for the team; each sub-task goes to a live agent with the"
        " capabilities and skills it requires."
    )
    async def submit_task(task: TaskInput) -> TaskView:
        with tool_errors():
            return TaskView.of(await client.tasks.submit(task.to_spec()))

    @app.tool(description="Read a task: its state, result, and each sub-task's state and result.")
    async def get_task(task_id: str) -> TaskView:
        with tool_errors():
            return TaskView.of(await client.tasks.get(task_id))

    @app.tool(description="Wait (bounded) for a task to end; return it with its result.")
    async def wait_task(
        task_id: str,
        timeout_seconds: Annotated[float, Field(ge=0, le=MAX_TASK_WAIT)] = 60.0,
    ) -> WaitResult:
        with tool_errors():
            with contextlib.suppress(TimeoutError, TaskFailed):  # TaskCancelled is one too
                await client.tasks.result(task_id, timeout=timeout_seconds)
            task = await client.tasks.get(task_id)
        return WaitResult(finished=task.state.is_final, task=TaskView.of(task))

    @app.tool(
        description="Take the next sub-task assigned to you, waiting up to wait_seconds; "
        "returns its input and its dependencies' results, or no sub-task."
    )
    async def claim_subtask(
        wait_seconds: Annotated[float, Field(ge=0, le=MAX_CLAIM_WAIT)] = 20.0,
    ) -> ClaimResult:
        with tool_errors():
            item = await session.claim(wait_seconds)
            if item is None:
                return ClaimResult(subtask=None)
            task = await client.tasks.get(item.task_id)
        ids = local_ids(task)
        results = {
            s.local_id: s.result for s in task.subtasks if s.subtask_id in item.subtask.depends_on
        }
        subtask = item.subtask
        return ClaimResult(
            subtask=Claimed(
                subtask_id=subtask.subtask_id,
                task_id=subtask.task_id,
                local_id=subtask.local_id,
                title=subtask.title,
                description=subtask.description,
                input=subtask.input,
                attempt=item.attempt,
                depends_on=[ids.get(i, i) for i in subtask.depends_on],
                dependency_results=results,
                last_failure=FailureView.of(subtask.last_failure),
            )
        )

    @app.tool(description="Report the result of a sub-task you claimed; it is recorded once.")
    async def complete_subtask(
        subtask_id: str,
        result: Annotated[Any, Field(description="The sub-task's JSON result.")] = None,
    ) -> Reported:
        with tool_errors():
            response = await session.complete(subtask_id, result)
        return _reported(response.subtask.subtask_id, response.subtask.state, response.task_state)

    @app.tool(description="Report that you could not do a sub-task you claimed, and why.")
    async def fail_subtask(
        subtask_id: str,
        message: Annotated[str, Field(min_length=1, max_length=4096)],
        retryable: Annotated[
            bool, Field(description="Whether another attempt (maybe by another agent) may work.")
        ] = True,
    ) -> Reported:
        with tool_errors():
            response = await session.fail(subtask_id, message, retryable=retryable)
        return _reported(response.subtask.subtask_id, response.subtask.state, response.task_state)

    # --- StateSync ----------------------------------------------------------------------------

    @app.tool(description="Read one key of the shared state; entry is null if it does not exist.")
    async def get_state(key: str) -> StateRead:
        with tool_errors():
            entry = await client.state.get(key)
        return StateRead(entry=StateEntry.of(entry) if entry is not None else None)

    @app.tool(
        description="Write a JSON value under shared/... or agents/<your id>/...; with "
        "expected_version, only if the key is still at that version (0: only if absent)."
    )
    async def put_state(
        key: str,
        value: Annotated[Any, Field(description="A JSON value.")],
        expected_version: Annotated[int | None, Field(ge=0)] = None,
    ) -> StateEntry:
        with tool_errors():
            return StateEntry.of(
                await client.state.put(key, value, expected_version=expected_version)
            )

    @app.tool(
        description="Change a key in place, atomically, with no version to match: increment a "
        "number, append to a list, add or remove set members, or merge a JSON patch."
    )
    async def update_state(
        key: str,
        operation: Annotated[
            Literal["increment", "append", "add_to_set", "remove_from_set", "merge_patch"],
            Field(description="What to do; a missing key counts as 0, [] or null."),
        ],
        by: Annotated[float | None, Field(description="increment: number to add; 1.")] = None,
        items: Annotated[
            list[Any] | None,
            Field(description="append, add_to_set, remove_from_set: the JSON items."),
        ] = None,
        patch: Annotated[
            Any, Field(description="merge_patch: RFC 7396 patch; a null member deletes it.")
        ] = None,
    ) -> StateEntry:
        modification = _modification(key, operation, by, items, patch)
        with tool_errors():
            return StateEntry.of(await client.state.modify(modification))

    @app.tool(description="List the shared-state keys under a prefix, with their values.")
    async def list_state(
        prefix: Annotated[str, Field(description="Key prefix; end it with / for a folder.")] = "",
        limit: Annotated[int, Field(ge=1, le=MAX_LIST)] = 100,
    ) -> StateList:
        with tool_errors():
            entries = await client.state.list(prefix)
        return StateList(entries=[StateEntry.of(entry) for entry in entries[:limit]])

    @app.tool(description="Read the change log (who did what, oldest first) after a revision.")
    async def list_events(
        after_revision: Annotated[int, Field(ge=0)] = 0,
        agent_id: Annotated[str, Field(description="Only this agent's events.")] = "",
        kind: Annotated[str, Field(description="Only this kind, e.g. state.put.")] = "",
        limit: Annotated[int, Field(ge=1, le=MAX_LIST)] = 100,
    ) -> EventList:
        request = statesync_pb.ListEventsRequest(
            page_size=limit, start_revision=after_revision, agent_id=agent_id, kind=kind
        )
        with tool_errors():
            response = await client.statesync.list_events(request)
        events = [EventView.of(event) for event in response.events]
        return EventList(
            events=events, next_revision=events[-1].revision if events else after_revision
        )

    # --- resources ----------------------------------------------------------------------------

    @app.resource(
        "agentcoord://agents", mime_type="application/json", description="The live agents."
    )
    async def live_agents() -> str:
        with _resource_errors():
            return (await agents([], [], "", True, MAX_LIST)).model_dump_json()

    @app.resource(
        "agentcoord://tasks/{task_id}",
        mime_type="application/json",
        description="A task with its sub-tasks.",
    )
    async def task_resource(task_id: str) -> str:
        with _resource_errors():
            return TaskView.of(await client.tasks.get(task_id)).model_dump_json()

    @app.resource(
        "agentcoord://state/{+key}",
        mime_type="application/json",
        description="One key of the shared state.",
    )
    async def state_resource(key: str) -> str:
        with _resource_errors():
            entry = await client.state.get(key)
        if entry is None:
            raise ResourceError(f"NOT_FOUND: no state key {key!r}")
        return json.dumps(StateEntry.of(entry).model_dump())

    return app


@contextlib.contextmanager
def _resource_errors() -> Iterator[None]:
    try:
        yield
    except RPCError as error:
        raise ResourceError(rpc_message(error)) from error


def _reported(subtask_id: str, state: int, task_state: int) -> Reported:
    return Reported(
        subtask_id=subtask_id,
        subtask_state=SubtaskState(state).name,
        task_state=TaskState(task_state).name,
    )
