"""The blocking facade, used from plain threads, against real servers on both stores.

The servers run on the test's event loop, so the blocking code runs in another thread.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from agentcoord.client import (
    Agent,
    AgentcoordClient,
    AgentOptions,
    CardInfo,
    ChangeType,
    ConflictError,
    FailedPreconditionError,
    NotFoundError,
    Skill,
    SubtaskSpec,
    SyncAgent,
    SyncClient,
    SyncWorkItem,
    TaskCancelled,
    TaskSpec,
    TaskState,
    WorkItem,
)
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.server.app import App
from tests.server import conftest as server_fixtures
from tests.server.conftest import StartServer

start_server = server_fixtures.start_server


@pytest.fixture
async def address(start_server: StartServer) -> str:
    app: App = await start_server(retry_backoff=0.0)
    return f"127.0.0.1:{app.port}"


async def test_the_client_works_from_a_plain_thread(address: str) -> None:
    def script() -> None:
        assert threading.current_thread() is not threading.main_thread()
        with SyncClient(address) as client:
            request = discovery_pb.RegisterRequest(agent_id="scribe", name="Scribe")
            registered = client.run(lambda c: c.discovery.register(request))
            assert registered.agent.agent_id == "scribe"
            state = client.state
            assert state.put("shared/plan", {"steps": 1}, expected_version=0).version == 1
            with pytest.raises(ConflictError) as conflict:
                state.put("shared/plan", {"steps": 2}, expected_version=0)
            assert conflict.value.current_version == 1
            updated = state.update("shared/plan", lambda plan: {"steps": plan["steps"] + 1})
            assert updated.version == 2
            assert state.get("shared/plan").value == {"steps": 2}
            assert [e.key for e in state.list("shared/")] == ["shared/plan"]
            assert state.own_key("notes") == "agents/scribe/notes"
            changes = state.watch("shared/", start_revision=updated.mod_revision)
            state.delete("shared/plan")
            assert next(changes).type is ChangeType.DELETE
            changes.close()

            spec = TaskSpec("nobody can", capabilities=["quantum"])
            task = client.tasks.submit(spec)
            assert client.tasks.get(task.task_id).state is TaskState.PENDING
            assert [t.task_id for t in client.tasks.list()] == [task.task_id]
            assert len(client.tasks.analyze(spec).subtasks) == 1
            client.tasks.cancel(task.task_id, "no quantum computer")
            with pytest.raises(TaskCancelled):
                client.tasks.result(task.task_id, timeout=5)
            with pytest.raises(NotFoundError):
                client.tasks.get("missing")
        with pytest.raises(RuntimeError):
            client.run(lambda c: c.discovery.get_summary(discovery_pb.GetSummaryRequest()))

    await asyncio.to_thread(script)


async def test_a_sync_agent_runs_blocking_handlers(address: str) -> None:
    def handle(item: SyncWorkItem) -> Any:
        assert threading.current_thread().name.startswith("agentcoord-handler")
        if item.local_id == "sum":
            return sum(item.dependency_results().values())
        item.state.put(f"shared/{item.local_id}", item.input)  # fenced by the lease
        return item.input

    def script() -> Any:
        spec = TaskSpec(
            "add",
            subtasks=[
                SubtaskSpec("x", input=2),
                SubtaskSpec("y", input=3),
                SubtaskSpec("sum", depends_on=["x", "y"]),
            ],
            aggregate="sum",
        )
        with (
            SyncAgent(address, name="adder", handler=handle, capacity=2, ttl=1.0) as agent,
            SyncClient(address) as planner,
        ):
            task = planner.tasks.submit(spec)
            result = planner.tasks.result(task.task_id, timeout=10)
            assert agent.stats.completed == 3 and agent.held_subtask_ids == ()
            assert agent.state.get("shared/y").value == 3
            return result

    assert await asyncio.to_thread(script) == 5


async def test_one_agent_options_configures_async_and_sync_agents_alike(address: str) -> None:
    options = AgentOptions(
        name="indexer",
        role="worker",
        capabilities=["index"],
        labels={"zone": "a"},
        skills=[Skill("index", "Index", tags=["search"])],
        card=CardInfo(description="indexes documents"),
        ttl=5.0,
    )

    async def handle(item: WorkItem) -> None:
        return None

    def stored_sync_agent() -> discovery_pb.Agent:
        sync = SyncAgent(address, handler=lambda item: None, agent_options=options, capacity=3)
        with sync, SyncClient(address) as client:
            request = discovery_pb.GetAgentRequest(agent_id=sync.agent_id)
            return client.run(lambda c: c.discovery.get_agent(request)).agent

    async with (
        Agent(address, handler=handle, agent_options=options, agent_id="async-indexer"),
        AgentcoordClient(address) as client,
    ):
        request = discovery_pb.GetAgentRequest(agent_id="async-indexer")
        stored = [(await client.discovery.get_agent(request)).agent]
    stored.append(await asyncio.to_thread(stored_sync_agent))
    assert [agent.capacity for agent in stored] == [1, 3]  # keywords override the options
    for agent in stored:
        assert (agent.name, agent.role, list(agent.capabilities)) == (
            "indexer",
            "worker",
            ["index"],
        )
        assert dict(agent.labels) == {"zone": "a"} and agent.description == "indexes documents"
        assert [(s.id, list(s.tags)) for s in agent.skills] == [("index", ["search"])]
    with pytest.raises(TypeError, match="capacty"):
        Agent(address, handler=handle, name="typo", capacty=2)
    with pytest.raises(ValueError, match="capacity"):
        AgentOptions(name="none", capacity=0)


async def test_a_blocking_handler_runs_on_after_a_revocation_but_cannot_write(
    address: str,
) -> None:
    started, go = threading.Event(), threading.Event()
    outcome: list[BaseException] = []

    def handle(item: SyncWorkItem) -> str:
        item.state.put("shared/draft", 1)
        started.set()
        go.wait(10)
        try:
            item.state.put("shared/draft", 2)
        except FailedPreconditionError as error:
            outcome.append(error)
        return "too late"

    def script() -> None:
        with (
            SyncAgent(address, name="w", handler=handle, ttl=1.0) as agent,
            SyncClient(address) as planner,
        ):
            task = planner.tasks.submit(TaskSpec("doomed"))
            assert started.wait(10)
            planner.tasks.cancel(task.task_id)
            while agent.stats.revoked == 0:
                threading.Event().wait(0.02)
            go.set()
            while not outcome:
                threading.Event().wait(0.02)
            assert planner.state.get("shared/draft").value == 1

    await asyncio.to_thread(script)
    (error,) = outcome
    assert error.reason == "STALE_FENCING_TOKEN"


async def test_run_forever_returns_once_closed_from_another_thread(address: str) -> None:
    def script() -> int:
        agent = SyncAgent(address, name="w", agent_id="w", handler=lambda item: None, ttl=1.0)
        runner = threading.Thread(target=agent.run_forever)
        runner.start()
        while agent.stats.registrations == 0:
            threading.Event().wait(0.02)
        agent.close()
        runner.join(10)
        assert not runner.is_alive()
        with SyncClient(address) as client:
            request = discovery_pb.GetAgentRequest(agent_id="w")
            return client.run(lambda c: c.discovery.get_agent(request)).agent.state

    assert await asyncio.to_thread(script) == discovery_pb.Agent.STATE_LEFT
