"""The planner side (``client.tasks``) against real servers, on both stores."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agentcoord.client import (
    Agent,
    AgentcoordClient,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SplitPolicy,
    SubtaskSpec,
    SubtaskState,
    SubtaskTransition,
    TaskCancelled,
    TaskEvent,
    TaskSpec,
    TaskState,
    TaskTransition,
    WorkItem,
)
from agentcoord.server.app import App
from tests.client.test_agent import closed_port
from tests.server import conftest as server_fixtures
from tests.server.conftest import StartServer

start_server = server_fixtures.start_server
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
]
"""Channel options so a client finds a restarted server quickly."""


@pytest.fixture
async def app(start_server: StartServer) -> App:
    return await start_server(retry_backoff=0.0)


@pytest.fixture
async def client(app: App) -> AsyncIterator[AgentcoordClient]:
    async with AgentcoordClient(f"127.0.0.1:{app.port}") as client:
        yield client


async def echo(item: WorkItem) -> Any:
    return item.input


@dataclasses.dataclass
class Step:
    """A user's own dataclass with the fields of a sub-task."""

    local_id: str
    depends_on: tuple[str, ...] = ()


async def test_submit_get_and_list(client: AgentcoordClient) -> None:
    spec = TaskSpec(
        "release",
        input={"version": "1.2"},
        capabilities=["python"],
        skills=["release"],
        subtasks=[
            {"local_id": "build", "title": "Build it", "input": {"target": "wheel"}},
            Step("test", depends_on=("build",)),
            SubtaskSpec(
                "publish",
                depends_on=["test"],
                capabilities=["pypi"],
                skills=["sign"],
                max_attempts=1,
            ),
        ],
        priority=5,
        lease_ttl=2.0,
    )
    task = await client.tasks.submit(spec)
    assert task.state is TaskState.PENDING and task.split_policy is SplitPolicy.EXPLICIT
    assert (task.title, task.priority, task.lease_ttl, task.input) == (
        "release",
        5,
        2.0,
        spec.input,
    )
    assert task.counts.total == 3 and task.counts.ready == 1 and task.request_id
    build, test, publish = task.subtasks
    assert (build.title, build.input, build.state) == (
        "Build it",
        {"target": "wheel"},
        SubtaskState.READY,
    )
    assert test.title == "test" and test.input == {"version": "1.2"}  # the task's input
    assert test.depends_on == (build.subtask_id,) and test.state is SubtaskState.BLOCKED
    assert publish.required_capabilities == ("pypi", "python") and publish.max_attempts == 1
    assert (task.required_skills, build.required_skills) == (("release",), ("release",))
    assert publish.required_skills == ("release", "sign")
    assert await client.tasks.get(task.task_id) == task
    basic = await client.tasks.get(task.task_id, full=False)
    assert basic.subtasks == () and basic.counts == task.counts

    other = await client.tasks.submit(TaskSpec("solo", description="one piece of work"))
    assert other.split_policy is SplitPolicy.NONE and other.counts.total == 1
    listed = [t.task_id async for t in client.tasks.list()]
    assert listed == [other.task_id, task.task_id]  # newest first
    pending = [t async for t in client.tasks.list(states=[TaskState.PENDING], full=True)]
    assert {t.task_id for t in pending} == set(listed) and pending[1].subtasks == task.subtasks
    assert [t async for t in client.tasks.list(states=[TaskState.SUCCEEDED])] == []


async def test_a_submission_is_idempotent_by_request_id(client: AgentcoordClient) -> None:
    spec = TaskSpec("once", subtasks=[SubtaskSpec("a")])
    first = await client.tasks.submit(spec, request_id="release-42")
    again = await client.tasks.submit(spec, request_id="release-42")
    assert again.task_id == first.task_id
    assert [t.task_id async for t in client.tasks.list()] == [first.task_id]


async def test_analyze_then_submit_an_auto_split(client: AgentcoordClient) -> None:
    spec = TaskSpec(
        "pipeline",
        description="1. Fetch the data\n2. Clean it\n3. Train the model\n",
        split=SplitPolicy.AUTO,
    )
    plan = await client.tasks.analyze(spec)
    assert len(plan.subtasks) == 3 and not plan.parallelizable and plan.reason
    assert plan.splitter == "builtin" and plan.subtasks[1].depends_on == (
        plan.subtasks[0].local_id,
    )
    task = await client.tasks.submit(spec)
    assert task.split_policy is SplitPolicy.AUTO
    assert [s.local_id for s in task.subtasks] == [s.local_id for s in plan.subtasks]
    # The plan, reviewed, can be submitted as an explicit task as it is.
    explicit = await client.tasks.submit(TaskSpec("reviewed", subtasks=plan.subtasks))
    assert [s.title for s in explicit.subtasks] == [s.title for s in plan.subtasks]


async def test_watch_yields_typed_transitions_until_the_task_ends(
    app: App, client: AgentcoordClient
) -> None:
    task = await client.tasks.submit(
        TaskSpec("two", subtasks=[{"local_id": "a"}, {"local_id": "b", "depends_on": ["a"]}])
    )
    events: list[TaskEvent] = []
    async with Agent(f"127.0.0.1:{app.port}", name="w", handler=echo, ttl=1.0):
        async for event in client.tasks.watch(task.task_id, start_revision=1):
            events.append(event)
    created = [e for e in events if isinstance(e, SubtaskTransition) and e.from_state is None]
    assert [(e.local_id, e.to_state) for e in created] == [
        ("a", SubtaskState.READY),
        ("b", SubtaskState.BLOCKED),
    ]
    assert isinstance(events[-1], TaskTransition) and events[-1].to_state is TaskState.SUCCEEDED
    assert events[-1].task.state is TaskState.SUCCEEDED and events[-1].task.result == {
        "a": None,
        "b": None,
    }
    moves = [(e.local_id, e.to_state) for e in events if isinstance(e, SubtaskTransition)]
    assert moves[-3:] == [
        ("b", SubtaskState.READY),
        ("b", SubtaskState.LEASED),
        ("b", SubtaskState.SUCCEEDED),
    ]
    leases = [
        e for e in events if isinstance(e, SubtaskTransition) and e.to_state is SubtaskState.LEASED
    ]
    assert all(e.agent_id and e.fencing_token > 0 and e.attempt == 1 for e in leases)
    revisions = [e.revision for e in events]
    assert revisions == sorted(set(revisions))


async def test_cancel_and_result(client: AgentcoordClient) -> None:
    task = await client.tasks.submit(TaskSpec("nobody can", capabilities=["quantum"]))
    with pytest.raises(TimeoutError):
        await client.tasks.result(task.task_id, timeout=0.1)
    waiting = asyncio.create_task(client.tasks.result(task.task_id))
    cancelled = await client.tasks.cancel(task.task_id, "not needed")
    assert cancelled.state is TaskState.CANCELLED and cancelled.state_reason == "not needed"
    with pytest.raises(TaskCancelled) as caught:
        await waiting
    assert caught.value.task.task_id == task.task_id and str(caught.value) == "not needed"
    assert (await client.tasks.cancel(task.task_id)).state is TaskState.CANCELLED


async def test_errors_are_typed(app: App, client: AgentcoordClient) -> None:
    with pytest.raises(NotFoundError) as missing:
        await client.tasks.get("no-such-task")
    assert missing.value.reason == "TASK_NOT_FOUND"
    cycle = TaskSpec(
        "loop",
        subtasks=[{"local_id": "a", "depends_on": ["b"]}, {"local_id": "b", "depends_on": ["a"]}],
    )
    with pytest.raises(InvalidArgumentError) as invalid:
        await client.tasks.submit(cycle)
    assert invalid.value.field_violations
    with pytest.raises(TypeError):
        await client.tasks.submit(TaskSpec("bad", subtasks=["not a spec"]))
    async with Agent(f"127.0.0.1:{app.port}", name="w", handler=echo, ttl=1.0):
        done = await client.tasks.submit(TaskSpec("quick"))
        await client.tasks.result(done.task_id, timeout=10)
    with pytest.raises(FailedPreconditionError):
        await client.tasks.cancel(done.task_id)


async def test_watch_resumes_after_a_server_restart(start_server: StartServer) -> None:
    port = closed_port()
    app = await start_server(listen=f"127.0.0.1:{port}")
    release = asyncio.Event()

    async def handle(item: WorkItem) -> str:
        await release.wait()
        return "done"

    address = f"127.0.0.1:{port}"
    async with AgentcoordClient(address, options=FAST_RECONNECT) as client:
        task = await client.tasks.submit(TaskSpec("survives", lease_ttl=2.0))
        async with Agent(address, name="w", handler=handle, ttl=3.0):
            events = client.tasks.watch(task.task_id, start_revision=1)
            async with contextlib.aclosing(events):
                seen = []
                async for event in events:
                    seen.append(event)
                    if (
                        isinstance(event, SubtaskTransition)
                        and event.to_state is SubtaskState.LEASED
                    ):
                        break
                await app.stop(0)
                app = await start_server(listen=address)
                release.set()
                rest = [event async for event in events]
        assert isinstance(rest[-1], TaskTransition) and rest[-1].to_state is TaskState.SUCCEEDED
        assert [e.revision for e in seen + rest] == sorted({e.revision for e in seen + rest})
