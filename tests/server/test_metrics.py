"""/metrics: a real server scraped before and after real work."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from agentcoord.distribution.v1 import distribution_service_pb2 as pb
from agentcoord.statesync.v1 import statesync_service_pb2 as statesync_pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as statesync_grpc
from tests.helpers import bearer, eventually
from tests.server.conftest import StartServer
from tests.server.test_distribution import Stub, Worker, explicit, seconds, sub, submit
from tests.server.test_statesync import register

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: httpx.AsyncClient) -> Samples:
    answer = await client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


RPC = "agentcoord_rpc_duration_seconds_count"
DISTRIBUTION = "agentcoord.distribution.v1.DistributionService"
WATCH_TASK = {"service": DISTRIBUTION, "method": "WatchTask"}


async def test_the_figures_move_with_the_work(start_server: StartServer) -> None:
    app = await start_server(http_listen="127.0.0.1:0", retry_backoff=0.0)
    assert app.http is not None
    async with (
        httpx.AsyncClient(base_url=app.http.url) as client,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        before = await scrape(client)
        internal = value(before, "agentcoord_watchers")  # the server's own (Distribution's)
        assert value(before, "agentcoord_subtasks", state="succeeded") == 0
        registered = await discovery_grpc.DiscoveryServiceStub(channel).Register(
            discovery_pb.RegisterRequest(
                agent_id="w1", name="w1", role="coder", capabilities=["python"], capacity=1
            )
        )
        worker = Worker(channel, "w1", registered.session_token)
        stub = Stub(channel)
        task = await submit(stub, explicit(sub("a"), max_attempts=2))
        watch = stub.WatchTask(pb.WatchTaskRequest(task_id=task.task_id))
        await asyncio.wait_for(watch.read(), 5)  # the watch is registered
        with_work = await scrape(client)
        assert value(with_work, "agentcoord_live_agents", role="coder") == 1
        assert value(with_work, "agentcoord_live_agents_by_capability", capability="python") == 1
        assert value(with_work, "agentcoord_subtasks", state="ready") == 1
        assert value(with_work, "agentcoord_queue_depth", waiting_for="agent") == 1
        assert value(with_work, "agentcoord_watchers") == internal + 1
        assert value(with_work, "agentcoord_open_streams", **WATCH_TASK) == 1
        first = await worker.claim()
        assert first is not None
        await worker.fail(first, "boom", retryable=True)
        second = await worker.claim(wait=5)
        assert second is not None
        await worker.complete(second, "done")
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetTask(pb.GetTaskRequest(task_id="no-such-task"))
        while await asyncio.wait_for(watch.read(), 5) != grpc.aio.EOF:
            pass  # it ends when the task does

        async def watch_ended() -> bool:
            return value(await scrape(client), "agentcoord_watchers") == internal

        await eventually(watch_ended)
        after = await scrape(client)
        assert value(after, "agentcoord_subtasks", state="succeeded") == 1
        assert value(after, "agentcoord_subtasks", state="ready") == 0
        assert value(after, "agentcoord_queue_depth", waiting_for="agent") == 0
        assert value(after, "agentcoord_subtask_retries_total", failure_class="task_error") == 1
        assert value(after, "agentcoord_subtask_queue_wait_seconds_count") == 2
        assert value(after, RPC, service=DISTRIBUTION, method="SubmitTask", code="OK") == 1
        assert value(after, RPC, service=DISTRIBUTION, method="GetTask", code="NOT_FOUND") == 1
        assert value(after, RPC, service=DISTRIBUTION, method="CompleteSubtask", code="OK") == 1
        # The watch ended with the task.
        assert value(after, RPC, service=DISTRIBUTION, method="WatchTask", code="OK") == 1
        assert value(after, "agentcoord_open_streams", **WATCH_TASK) == 0
        commits = value(after, "agentcoord_store_commit_operations_count")
        assert commits > value(before, "agentcoord_store_commit_operations_count")
        assert value(after, "agentcoord_store_commit_operations_sum") >= commits
        assert value(after, "agentcoord_store_commit_duration_seconds_count") == commits


async def test_a_lease_expiry_is_counted(start_server: StartServer) -> None:
    app = await start_server(http_listen="127.0.0.1:0", retry_backoff=0.0)
    assert app.http is not None
    async with (
        httpx.AsyncClient(base_url=app.http.url) as client,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        registered = await discovery_grpc.DiscoveryServiceStub(channel).Register(
            discovery_pb.RegisterRequest(agent_id="slow", name="slow", capacity=1)
        )
        worker = Worker(channel, "slow", registered.session_token)
        task = explicit(sub("a"), lease_ttl=seconds(1), max_attempts=3)
        await submit(Stub(channel), task)
        assert await worker.claim() is not None

        async def expired() -> bool:
            return value(await scrape(client), "agentcoord_lease_expiries_total") == 1

        await eventually(expired)
        samples = await scrape(client)
        assert value(samples, "agentcoord_subtask_retries_total", failure_class="lease_lost") == 1


async def test_a_watcher_that_stops_reading_shows_its_lag(start_server: StartServer) -> None:
    app = await start_server(http_listen="127.0.0.1:0")
    assert app.http is not None
    async with (
        httpx.AsyncClient(base_url=app.http.url) as client,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        token = await register(channel, "alice")
        stub = statesync_grpc.StateSyncServiceStub(channel)
        before = await scrape(client)
        watch = stub.WatchStates(statesync_pb.WatchStatesRequest(prefix="agents/alice/"))
        await asyncio.wait_for(watch.read(), 5)  # registered; the test reads nothing more
        assert (
            value(await scrape(client), "agentcoord_watchers")
            == value(before, "agentcoord_watchers") + 1
        )
        blob = b"x" * 256 * 1024  # 16 MiB in all: more than the stream's flow-control window
        writes = 64
        for index in range(writes):
            await stub.PutState(
                statesync_pb.PutStateRequest(key=f"agents/alice/{index}", binary=blob),
                metadata=bearer(token),
            )
        lagging = await scrape(client)
        assert value(lagging, "agentcoord_watcher_lag_revisions") > 0
        commits = value(lagging, "agentcoord_store_commit_operations_count") - value(
            before, "agentcoord_store_commit_operations_count"
        )
        assert commits >= 1
        seen = 0
        while seen < writes:  # the watcher reads again and catches up
            seen += len((await asyncio.wait_for(watch.read(), 10)).changes)

        async def caught_up() -> bool:
            return value(await scrape(client), "agentcoord_watcher_lag_revisions") == 0

        await eventually(caught_up)
        watch.cancel()
