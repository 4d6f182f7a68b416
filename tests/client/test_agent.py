"""The Agent SDK against real servers, on both stores: work, failures, revocation, drain,
reconnection, re-registration, failover and fencing."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agentcoord.client import (
    Agent,
    AgentcoordClient,
    FailedPreconditionError,
    FailureClass,
    NonRetryableError,
    SubtaskSpec,
    SubtaskState,
    TaskFailed,
    TaskSpec,
    TaskState,
    WorkItem,
)
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.server.app import App
from agentcoord.server.config import ServerConfig
from tests.helpers import eventually
from tests.server import conftest as server_fixtures
from tests.server.conftest import StartServer

start_server = server_fixtures.start_server
ADMIN = "admin-secret"
Handler = Callable[[WorkItem], Awaitable[Any]]


@pytest.fixture
async def app(start_server: StartServer) -> App:
    return await start_server(retry_backoff=0.0, admin_token=ADMIN)


def address(app: App) -> str:
    return f"127.0.0.1:{app.port}"


def agent(app: App | str, name: str, handler: Handler, **options: Any) -> Agent:
    """An agent with a short TTL, registered as ``name``."""
    options.setdefault("ttl", 1.0)
    target = address(app) if isinstance(app, App) else app
    return Agent(target, name=name, agent_id=name, handler=handler, **options)


@pytest.fixture
async def planner(app: App) -> AsyncIterator[AgentcoordClient]:
    async with AgentcoordClient(address(app)) as client:
        yield client


@pytest.fixture
async def admin(app: App) -> AsyncIterator[AgentcoordClient]:
    async with AgentcoordClient(address(app), token=ADMIN) as client:
        yield client


def one(local_id: str = "a", **fields: Any) -> TaskSpec:
    """A task of one sub-task whose lease lives 1 s unless renewed."""
    return TaskSpec("one", subtasks=[SubtaskSpec(local_id)], lease_ttl=1.0, **fields)


async def until(condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` holds, failing after 10 s."""

    async def check() -> bool:
        return condition()

    await eventually(check)


def closed_port() -> int:
    """A port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_agents_run_a_dag_and_the_planner_gets_the_aggregated_result(
    app: App, planner: AgentcoordClient
) -> None:
    async def handle(item: WorkItem) -> Any:
        if item.local_id == "report":
            upstream = await item.dependency_results()
            return {"total": sum(result["words"] for result in upstream.values())}
        return {"words": len(item.input.split()), "by": item.lease.agent_id}

    spec = TaskSpec(
        "count words",
        subtasks=[
            {"local_id": "intro", "input": "one two"},
            SubtaskSpec("body", input="three four five"),
            {"local_id": "report", "depends_on": ["intro", "body"]},
        ],
        aggregate="report",
        lease_ttl=1.0,
    )
    async with agent(app, "w1", handle, capacity=2) as w1, agent(app, "w2", handle) as w2:
        task = await planner.tasks.submit(spec)
        assert [s.local_id for s in task.subtasks] == ["intro", "body", "report"]
        assert await planner.tasks.result(task.task_id, timeout=10) == {"total": 5}
        done = await planner.tasks.get(task.task_id)
        assert done.state is TaskState.SUCCEEDED
        assert all(s.attempt == 1 and s.state is SubtaskState.SUCCEEDED for s in done.subtasks)
        assert w1.stats.completed + w2.stats.completed == 3
        assert w1.stats.failed == w2.stats.failed == 0


async def test_capacity_bounds_the_handlers_running_at_once(
    app: App, planner: AgentcoordClient
) -> None:
    running = peak = 0

    async def handle(item: WorkItem) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1

    spec = TaskSpec("many", subtasks=[SubtaskSpec(f"s{i}") for i in range(6)], lease_ttl=1.0)
    async with agent(app, "w", handle, capacity=2):
        task = await planner.tasks.submit(spec)
        await planner.tasks.result(task.task_id, timeout=10)
    assert peak == 2


async def test_a_failed_attempt_is_retried_by_another_agent(
    start_server: StartServer,
) -> None:
    app = await start_server(retry_backoff=0.5)  # time for the second agent to join

    async def handle(item: WorkItem) -> str:
        if item.lease.agent_id == "flaky":
            raise ValueError("disk full")
        return "done by steady"

    async with AgentcoordClient(address(app)) as planner, agent(app, "flaky", handle) as flaky:
        task = await planner.tasks.submit(one(max_attempts=3))
        await until(lambda: flaky.stats.failed == 1)
        async with agent(app, "steady", handle):
            assert await planner.tasks.result(task.task_id, timeout=10) == {"a": "done by steady"}
        (subtask,) = (await planner.tasks.get(task.task_id)).subtasks
    assert subtask.attempt == 2 and subtask.agent_id == "steady"
    failure = subtask.last_failure
    assert failure is not None and failure.agent_id == "flaky"
    assert failure.failure_class is FailureClass.TASK_ERROR and failure.retryable
    assert failure.message == "ValueError: disk full"
    assert failure.details["type"] == "ValueError" and "disk full" in failure.details["traceback"]


async def test_failures_use_up_the_attempts_then_fail_the_task(
    app: App, planner: AgentcoordClient
) -> None:
    async def handle(item: WorkItem) -> None:
        raise RuntimeError(f"attempt {item.attempt}")

    async with agent(app, "w", handle) as worker:
        task = await planner.tasks.submit(one(max_attempts=2))
        with pytest.raises(TaskFailed) as failed:
            await planner.tasks.result(task.task_id, timeout=10)
    assert worker.stats.failed == 2
    assert failed.value.task.state is TaskState.FAILED
    assert failed.value.failure is not None
    assert failed.value.failure.message == "RuntimeError: attempt 2"


async def test_a_non_retryable_error_fails_at_once(app: App, planner: AgentcoordClient) -> None:
    async def handle(item: WorkItem) -> None:
        raise NonRetryableError("bad input", details={"field": "text"})

    async with agent(app, "w", handle):
        task = await planner.tasks.submit(one(max_attempts=5))
        with pytest.raises(TaskFailed) as failed:
            await planner.tasks.result(task.task_id, timeout=10)
    failure = failed.value.failure
    assert failure is not None and failure.attempt == 1 and not failure.retryable
    assert failure.message == "NonRetryableError: bad input"
    assert failure.details == {"field": "text"}


async def test_a_handler_over_its_time_fails_as_a_timeout(
    app: App, planner: AgentcoordClient
) -> None:
    async def handle(item: WorkItem) -> None:
        await asyncio.sleep(30)

    async with agent(app, "w", handle, handler_timeout=0.1):
        task = await planner.tasks.submit(one(max_attempts=1))
        with pytest.raises(TaskFailed) as failed:
            await planner.tasks.result(task.task_id, timeout=10)
    assert failed.value.failure is not None
    assert failed.value.failure.failure_class is FailureClass.TIMEOUT


async def test_a_result_that_is_not_json_fails_for_good(
    app: App, planner: AgentcoordClient
) -> None:
    async def handle(item: WorkItem) -> object:
        return object()

    async with agent(app, "w", handle):
        task = await planner.tasks.submit(one(max_attempts=3))
        with pytest.raises(TaskFailed) as failed:
            await planner.tasks.result(task.task_id, timeout=10)
    assert failed.value.failure is not None and failed.value.failure.attempt == 1


async def test_a_revocation_cancels_the_handler(app: App, planner: AgentcoordClient) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handle(item: WorkItem) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with agent(app, "w", handle) as worker:
        task = await planner.tasks.submit(one())
        await asyncio.wait_for(started.wait(), 10)
        await planner.tasks.cancel(task.task_id, "changed my mind")
        await asyncio.wait_for(cancelled.wait(), 10)
        assert worker.stats.revoked == 1 and worker.held_subtask_ids == ()
        assert worker.stats.failed == worker.stats.completed == 0


async def test_closing_finishes_running_work_then_deregisters(
    app: App, planner: AgentcoordClient
) -> None:
    started = asyncio.Event()

    async def handle(item: WorkItem) -> str:
        started.set()
        await asyncio.sleep(0.3)
        return "finished while draining"

    async with agent(app, "w", handle, capacity=2) as worker:
        task = await planner.tasks.submit(one())
        await asyncio.wait_for(started.wait(), 10)
    assert worker.stats.completed == 1
    assert (await planner.tasks.result(task.task_id, timeout=1)) == {"a": "finished while draining"}
    response = await planner.discovery.get_agent(discovery_pb.GetAgentRequest(agent_id="w"))
    assert response.agent.state == discovery_pb.Agent.STATE_LEFT


async def test_work_still_running_after_the_drain_timeout_is_handed_back_at_once(
    app: App, planner: AgentcoordClient
) -> None:
    async def stuck(item: WorkItem) -> None:
        await asyncio.sleep(30)

    async def quick(item: WorkItem) -> str:
        return f"attempt {item.attempt}"

    async with agent(app, "stuck", stuck, drain_timeout=0.1) as first:
        task = await planner.tasks.submit(one(max_attempts=1))
        await until(lambda: first.held_subtask_ids != ())

    async def handed_back() -> bool:  # by Deregister, well before the 1 s lease expires
        return (await planner.tasks.get(task.task_id, full=False)).counts.leased == 0

    await eventually(handed_back, timeout=0.5)
    async with agent(app, "quick", quick):
        # Deregistering is an agent death: the attempt is not counted against max_attempts.
        assert await planner.tasks.result(task.task_id, timeout=10) == {"a": "attempt 2"}
    (subtask,) = (await planner.tasks.get(task.task_id)).subtasks
    assert subtask.last_failure is not None
    assert subtask.last_failure.failure_class is FailureClass.AGENT_DIED


async def test_the_agent_rides_out_a_server_restart(start_server: StartServer, port: int) -> None:
    app = await start_server(listen=f"127.0.0.1:{port}")
    release = asyncio.Event()
    started = asyncio.Event()

    async def handle(item: WorkItem) -> str:
        started.set()
        await release.wait()
        return f"{item.local_id} done"

    async with agent(app, "w", handle, ttl=3.0, capacity=2) as worker:
        async with AgentcoordClient(address(app)) as planner:
            first = await planner.tasks.submit(one())
            await asyncio.wait_for(started.wait(), 10)
        await app.stop(0)
        app = await start_server(listen=f"127.0.0.1:{port}")
        async with AgentcoordClient(address(app)) as planner:
            await until(lambda: worker.stats.reconnects >= 2)
            release.set()
            assert await planner.tasks.result(first.task_id, timeout=10) == {"a": "a done"}
            second = await planner.tasks.submit(one("b"))
            assert await planner.tasks.result(second.task_id, timeout=10) == {"b": "b done"}
        assert worker.stats.registrations == 1  # the session survived the restart


@pytest.fixture
def port() -> int:
    return closed_port()


async def test_the_agent_registers_again_when_its_session_ends(
    app: App, planner: AgentcoordClient, admin: AgentcoordClient
) -> None:
    async def handle(item: WorkItem) -> str:
        return "ok"

    async with agent(app, "w", handle, ttl=0.6) as worker:
        first_epoch = worker.epoch
        await admin.discovery.deregister(discovery_pb.DeregisterRequest(agent_id="w"))
        await until(lambda: worker.stats.registrations == 2)
        assert worker.epoch > first_epoch
        task = await planner.tasks.submit(one())
        assert await planner.tasks.result(task.task_id, timeout=10) == {"a": "ok"}
        response = await planner.discovery.get_agent(discovery_pb.GetAgentRequest(agent_id="w"))
        assert response.agent.state == discovery_pb.Agent.STATE_LIVE


async def test_the_agents_heartbeats_need_no_answer_each(
    app: App, planner: AgentcoordClient
) -> None:
    async def handle(item: WorkItem) -> str:
        return "ok"

    async with agent(app, "w", handle, ttl=0.6) as worker:
        await until(lambda: worker.stats.heartbeats >= 7)  # more than two TTLs of them
        response = await planner.discovery.get_agent(discovery_pb.GetAgentRequest(agent_id="w"))
        assert response.agent.state == discovery_pb.Agent.STATE_LIVE
        assert worker.stats.registrations == 1
        # The server answered the stream's first heartbeat only: nothing else was news.
        assert worker.stats.heartbeat_answers == 1


async def test_the_agent_fails_over_to_the_next_address(
    app: App, planner: AgentcoordClient
) -> None:
    async def handle(item: WorkItem) -> str:
        return "ok"

    dead = f"127.0.0.1:{closed_port()}"
    worker = Agent([dead, address(app)], name="w", handler=handle, ttl=1.0)
    async with worker:
        assert worker.client.target == address(app) and worker.agent_id
        task = await planner.tasks.submit(one())
        assert await planner.tasks.result(task.task_id, timeout=10) == {"a": "ok"}


async def test_a_client_fails_over_and_keeps_single_targets_working(app: App) -> None:
    dead = f"127.0.0.1:{closed_port()}"
    async with AgentcoordClient([dead, address(app)]) as client:
        summary = await client.discovery.get_summary(discovery_pb.GetSummaryRequest())
        assert summary.live_agents == 0 and client.target == address(app)
    async with AgentcoordClient(address(app)) as client:
        assert client.targets == (address(app),)


async def test_a_stale_workers_state_writes_are_refused(
    app: App, planner: AgentcoordClient, admin: AgentcoordClient
) -> None:
    first_write, go = asyncio.Event(), asyncio.Event()
    stale_write: list[BaseException] = []

    async def handle(item: WorkItem) -> str:
        if item.attempt == 1:
            await item.state.put("shared/report", "draft")  # fenced by the handler's lease
            first_write.set()
            try:
                await go.wait()
            except asyncio.CancelledError:
                # The revocation cancels the handler. One that carries on regardless (blocking
                # code, say) still cannot overwrite the new holder's result: writes are fenced.
                await go.wait()
            try:
                await item.state.put("shared/report", "stale")
            except FailedPreconditionError as error:
                stale_write.append(error)
            return "too late"
        await item.state.put("shared/report", "final")
        return "fresh"

    async with agent(app, "slow", handle, ttl=5.0):
        task = await planner.tasks.submit(one())
        await asyncio.wait_for(first_write.wait(), 10)
        async with agent(app, "fast", handle) as fast:
            # The operator removes "slow": its lease moves on to "fast".
            await admin.discovery.deregister(discovery_pb.DeregisterRequest(agent_id="slow"))
            assert await planner.tasks.result(task.task_id, timeout=10) == {"a": "fresh"}
            go.set()
            await until(lambda: len(stale_write) == 1)
            assert fast.stats.completed == 1
    (error,) = stale_write
    assert error.reason == "STALE_FENCING_TOKEN"
    entry = await planner.state.get("shared/report")
    assert entry is not None and entry.value == "final"


async def test_fenced_writes_work_for_as_long_as_heartbeats_renew_the_lease(
    start_server: StartServer, port: int
) -> None:
    # The lease's record carries its expire time; heartbeats move it, and so does a restart
    # (a full TTL from then), or the 1 s lease would refuse these writes as LEASE_EXPIRED.
    app = await start_server(listen=f"127.0.0.1:{port}")
    halfway, restarted = asyncio.Event(), asyncio.Event()

    async def handle(item: WorkItem) -> str:
        for step in range(3):  # 3 x 1 s: three times the lease's TTL
            await item.state.put("shared/progress", step)
            await asyncio.sleep(1.0)
        halfway.set()
        await restarted.wait()
        await item.state.put("shared/progress", "after the restart")
        return "done"

    async with agent(app, "w", handle, ttl=5.0) as worker:
        async with AgentcoordClient(address(app)) as planner:
            task = await planner.tasks.submit(one())
            await asyncio.wait_for(halfway.wait(), 20)
        await app.stop(0)
        app = await start_server(listen=f"127.0.0.1:{port}")
        restarted.set()
        async with AgentcoordClient(address(app)) as planner:
            assert await planner.tasks.result(task.task_id, timeout=10) == {"a": "done"}
            entry = await planner.state.get("shared/progress")
        assert entry is not None and entry.value == "after the restart"
        assert worker.stats.failed == 0


async def test_finished_work_is_reported_after_an_outage_longer_than_the_retries_were(
    start_server: StartServer, port: int
) -> None:
    # Eight results finish while the server is down for 3 s (the client's default retries
    # give up after about 2 s); each is sent once the server is back, within its lease, so
    # no sub-task runs a second time.
    app = await start_server(listen=f"127.0.0.1:{port}")
    release = asyncio.Event()
    runs: list[str] = []

    async def handle(item: WorkItem) -> str:
        runs.append(item.local_id)
        await release.wait()
        return f"{item.local_id} done"

    names = [f"s{n}" for n in range(8)]
    spec = TaskSpec("eight", subtasks=[SubtaskSpec(name) for name in names], lease_ttl=20.0)
    async with agent(app, "w", handle, ttl=5.0, capacity=8) as worker:
        async with AgentcoordClient(address(app)) as planner:
            task = await planner.tasks.submit(spec)
        await until(lambda: len(runs) == 8)
        await app.stop(0)
        release.set()  # the handlers finish; their reports meet a refused connection
        await asyncio.sleep(3.0)  # the outage
        app = await start_server(listen=f"127.0.0.1:{port}")
        async with AgentcoordClient(address(app)) as planner:
            result = await planner.tasks.result(task.task_id, timeout=20)
            done = await planner.tasks.get(task.task_id)
        assert result == {name: f"{name} done" for name in names}
        assert sorted(runs) == names  # each ran once
        assert all(subtask.attempt == 1 for subtask in done.subtasks)
        assert worker.stats.completed == 8


async def test_a_handler_that_raises_is_logged_at_warning_with_its_traceback(
    app: App, planner: AgentcoordClient, caplog: pytest.LogCaptureFixture
) -> None:
    async def handle(item: WorkItem) -> str:
        return str(1 / 0)

    async with agent(app, "w", handle) as worker:
        await planner.tasks.submit(one(max_attempts=1))
        await until(lambda: worker.stats.failed == 1)
    (record,) = [r for r in caplog.records if "the handler failed" in r.getMessage()]
    assert record.levelno == logging.WARNING and record.name == "agentcoord.client.agent"
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError
    assert "ZeroDivisionError: division by zero" in record.getMessage()


async def test_clients_and_agents_find_the_server_in_agentcoord_server(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same default as `make run` and `agentcoord serve` listen on.
    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    assert f"AGENTCOORD_LISTEN ?= {ServerConfig().listen}\n" in makefile
    assert AgentcoordClient().targets == (ServerConfig().listen,)

    dead = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AGENTCOORD_SERVER", f"{dead}, {address(app)}")  # failover list
    async with AgentcoordClient() as client:
        summary = await client.discovery.get_summary(discovery_pb.GetSummaryRequest())
        assert summary.live_agents == 0 and client.targets == (dead, address(app))

    async def handle(item: WorkItem) -> str:
        return "ok"

    async with Agent(name="env", agent_id="env", handler=handle, ttl=1.0) as worker:
        assert worker.client.target == address(app)

    # A gRPC address list is one target: its commas are its own.
    listed = f"ipv4:{dead},{address(app)}"
    monkeypatch.setenv("AGENTCOORD_SERVER", listed)
    async with AgentcoordClient() as client:
        summary = await client.discovery.get_summary(discovery_pb.GetSummaryRequest())
        assert summary.live_agents == 0 and client.targets == (listed,)

    monkeypatch.setenv("AGENTCOORD_SERVER", "127.0.0.1:99999")
    with pytest.raises(ValueError, match=re.escape("AGENTCOORD_SERVER: '127.0.0.1:99999'")):
        AgentcoordClient()
    with pytest.raises(ValueError, match="port 1-65535"):
        AgentcoordClient("127.0.0.1:0")
