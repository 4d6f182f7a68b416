"""Inputs within the documented limits never make a response larger than the max message size.

Real servers on both stores, real stubs on channels with gRPC's default 4 MiB receive limit
(the server's default max message size): every page and stream message must fit in it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from agentcoord.client import AgentcoordClient, Planner, TaskMirror
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from agentcoord.distribution.v1 import distribution_service_pb2 as pb
from agentcoord.distribution.v1 import distribution_service_pb2_grpc as pb_grpc
from agentcoord.server.app import App
from agentcoord.server.config import ServerConfig
from agentcoord.server.sizes import MIN_MAX_MESSAGE_BYTES
from agentcoord.statesync.v1 import statesync_service_pb2 as state_pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as state_grpc
from tests.helpers import field_violations
from tests.server.test_distribution import explicit, join, sub, value

WIDE = "\U0001d538"
"""A character of four UTF-8 bytes: the widest text a field limit (in characters) lets in."""


async def read_pages(
    call: Callable[[Any], Awaitable[Any]], request: Any, items: str
) -> tuple[list[Any], int]:
    """Return every item of a List RPC, following its pages, and the number of pages."""
    found: list[Any] = []
    pages = 0
    while True:
        page = await call(request)
        found += getattr(page, items)
        pages += 1
        if not page.next_page_token:
            return found, pages
        request.page_token = page.next_page_token


def text(length: int, char: str = "x") -> str:
    return char * length


def agent_at_limits(index: int, char: str) -> discovery_pb.RegisterRequest:
    """A Register request with every field at its documented limit."""
    return discovery_pb.RegisterRequest(
        agent_id=f"agent-{index:03d}".ljust(128, "x"),
        name=text(256, char),
        role="r" * 64,
        capabilities=[f"{c:02d}".ljust(64, "c") for c in range(64)],
        capacity=1024,
        labels={f"{k:02d}".ljust(63, "k"): text(256, char) for k in range(32)},
        skills=[
            discovery_pb.Skill(
                id=f"{s:02d}".ljust(128, "s"),
                name=text(256, char),
                description=text(4096, char),
                tags=[f"{t:02d}".ljust(64, "t") for t in range(32)],
            )
            for s in range(32)
        ],
    )


async def register_agents(app: App, count: int) -> set[str]:
    """Register ``count`` agents at their field limits (the last two in four-byte text)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = discovery_grpc.DiscoveryServiceStub(channel)
        requests = [agent_at_limits(i, WIDE if i >= count - 2 else "x") for i in range(count)]
        for request in requests:
            await stub.Register(request)
    return {request.agent_id for request in requests}


async def test_agents_at_their_limits_are_listed_watched_and_logged_in_pages(
    server: App, channel: grpc.aio.Channel
) -> None:
    agent_ids = await register_agents(server, 32)
    discovery = discovery_grpc.DiscoveryServiceStub(channel)

    agents, pages = await read_pages(
        discovery.ListAgents, discovery_pb.ListAgentsRequest(), "agents"
    )
    listed = [agent.agent_id for agent in agents]
    assert sorted(listed) == sorted(agent_ids) and pages > 1  # each once, in order

    joined: list[str] = []
    revisions: list[int] = []
    watch = discovery.WatchAgents(discovery_pb.WatchAgentsRequest(start_revision=1))
    async for response in watch:
        joined += [e.agent.agent_id for e in response.events]
        revisions += [e.revision for e in response.events]
        if len(joined) >= len(agent_ids) - 1:  # resumed after the first join
            break
    watch.cancel()
    assert set(joined) == agent_ids - {min(agent_ids)} and revisions == sorted(set(revisions))

    statesync = state_grpc.StateSyncServiceStub(channel)
    joins, _ = await read_pages(
        statesync.ListEvents, state_pb.ListEventsRequest(kind="agent.joined"), "events"
    )
    events = [event.subject for event in joins]
    assert sorted(events) == sorted(agent_ids)


async def test_tasks_with_the_longest_descriptions_are_listed_in_pages(
    server: App, channel: grpc.aio.Channel
) -> None:
    stub = pb_grpc.DistributionServiceStub(channel)
    submitted = set()
    for index in range(70):
        task = pb.TaskSpec(
            title=f"task {index}", description=text(65536), split_policy=pb.SPLIT_POLICY_NONE
        )
        submitted.add((await stub.SubmitTask(pb.SubmitTaskRequest(task=task))).task.task_id)

    tasks, pages = await read_pages(stub.ListTasks, pb.ListTasksRequest(page_size=1000), "tasks")
    listed = [task.task_id for task in tasks]
    assert sorted(listed) == sorted(submitted) and len(listed) == 70 and pages > 1


async def test_a_task_of_ten_thousand_subtasks_is_submitted_read_and_watched_in_full(
    server: App, channel: grpc.aio.Channel
) -> None:
    stub = pb_grpc.DistributionServiceStub(channel)
    specs = [sub(f"s{index:05d}", description=text(300)) for index in range(10_000)]
    request = pb.SubmitTaskRequest(task=explicit(*specs), request_id="big-one")

    submitted = await stub.SubmitTask(request)
    task_id = submitted.task.task_id
    assert 0 < len(submitted.task.subtasks) < 10_000 and submitted.next_subtasks_page_token
    again = await stub.SubmitTask(request)  # the retry of a lost response
    assert again.task.task_id == task_id and again.next_subtasks_page_token

    full = await stub.GetTask(pb.GetTaskRequest(task_id=task_id, view=pb.TASK_VIEW_FULL))
    rest, _ = await read_pages(
        stub.ListSubtasks,
        pb.ListSubtasksRequest(
            task_id=task_id, page_size=1000, page_token=full.next_subtasks_page_token
        ),
        "subtasks",
    )
    subtasks = [*full.task.subtasks, *rest]
    assert [s.local_id for s in subtasks] == [s.local_id for s in specs]

    async with AgentcoordClient(f"127.0.0.1:{server.port}") as client:
        planner: Planner = client.tasks
        whole = await planner.get(task_id)
        assert [s.local_id for s in whole.subtasks] == [s.local_id for s in specs]
        assert len([s async for s in planner.subtasks(task_id)]) == 10_000

    mirror = TaskMirror()
    watch = stub.WatchTask(pb.WatchTaskRequest(task_id=task_id, view=pb.TASK_VIEW_FULL))
    first = None
    async for response in watch:
        first = mirror.update(response)
        if first is not None:
            break
    assert first is not None and len(first.subtasks) == 10_000

    # Cancelling moves every sub-task at once: the transitions are split over messages.
    before = (await stub.GetTask(pb.GetTaskRequest(task_id=task_id))).task.revision
    await stub.CancelTask(pb.CancelTaskRequest(task_id=task_id, reason="too big"))
    cancelled, last = 0, None
    async for response in watch:
        cancelled += sum(
            1 for e in response.events if e.subtask.to_state == pb.Subtask.STATE_CANCELLED
        )
        last = mirror.update(response) or last
    assert cancelled == 10_000 and last is not None
    assert last.state == pb.Task.STATE_CANCELLED
    assert {s.state for s in last.subtasks} == {pb.Subtask.STATE_CANCELLED}
    assert len(last.subtasks) == 10_000

    async with AgentcoordClient(f"127.0.0.1:{server.port}") as client:
        replayed = [e async for e in client.tasks.watch(task_id, start_revision=before, full=True)]
    assert len(replayed) == 10_001  # every sub-task's cancellation, then the task's
    assert len(replayed[-1].task.subtasks) == 10_000


async def test_a_merged_result_too_large_for_a_message_is_merged_by_the_sdk(
    server: App, channel: grpc.aio.Channel
) -> None:
    stub = pb_grpc.DistributionServiceStub(channel)
    worker = await join(channel, "worker")
    task = (
        await stub.SubmitTask(pb.SubmitTaskRequest(task=explicit(sub("a"), sub("b"), sub("c"))))
    ).task
    big = {local_id: text(900_000, local_id) for local_id in "abc"}
    for _ in range(3):
        assignment = await worker.claim(wait=5)
        assert assignment is not None
        await worker.complete(assignment, big[assignment.subtask.local_id])

    basic = await stub.GetTask(pb.GetTaskRequest(task_id=task.task_id, view=pb.TASK_VIEW_BASIC))
    assert basic.task.state == pb.Task.STATE_SUCCEEDED and not basic.task.HasField("result")
    async with AgentcoordClient(f"127.0.0.1:{server.port}") as client:
        assert await client.tasks.result(task.task_id, timeout=10) == big


async def test_json_limits_count_the_encoded_protobuf_too(channel: grpc.aio.Channel) -> None:
    # 200,000 zeros: 400 KB of JSON but 2.2 MB of protobuf, more than twice the 1 MiB limit.
    zeros = value([0] * 200_000)
    stub = pb_grpc.DistributionServiceStub(channel)
    task = pb.TaskSpec(title="zeros", split_policy=pb.SPLIT_POLICY_NONE, input=zeros)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitTask(pb.SubmitTaskRequest(task=task))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert any(field.endswith("input") for field in field_violations(caught.value))


def test_the_max_message_size_holds_the_largest_item_and_two_values() -> None:
    with pytest.raises(Exception, match="max_message_bytes"):
        ServerConfig(max_message_bytes=MIN_MAX_MESSAGE_BYTES - 1).validate()
    with pytest.raises(Exception, match="max_value_bytes"):
        ServerConfig(max_value_bytes=2 << 20).validate()  # half of 4 MiB
    ServerConfig(max_message_bytes=16 << 20, max_value_bytes=4 << 20).validate()


async def test_watch_and_list_of_events_split_big_value_changes(
    server: App, channel: grpc.aio.Channel
) -> None:
    statesync = state_grpc.StateSyncServiceStub(channel)
    worker = await join(channel, "writer")
    for index in range(6):
        await statesync.PutState(
            state_pb.PutStateRequest(
                agent_id="writer",
                key="shared/big",
                binary=bytes([index]) * (1 << 20),
            ),
            metadata=worker.metadata,
        )
    logged, pages = await read_pages(
        statesync.ListEvents, state_pb.ListEventsRequest(subject="shared/big"), "events"
    )
    events = len(logged)
    assert events == 6 and pages > 1

    watch = statesync.WatchStates(
        state_pb.WatchStatesRequest(prefix="shared/", start_revision=1, include_previous=True)
    )
    seen = 0
    async for response in watch:
        seen += len(response.changes)
        if seen == 6:
            break
    watch.cancel()


async def test_a_transaction_whose_response_would_not_fit_is_refused(
    channel: grpc.aio.Channel,
) -> None:
    worker = await join(channel, "writer")

    def transact(last: int) -> state_pb.TransactRequest:
        sizes = [1 << 20, 1 << 20, 1 << 20, last]
        return state_pb.TransactRequest(
            agent_id="writer",
            operations=[
                state_pb.Operation(
                    put=state_pb.PutOperation(key=f"shared/k{i}", binary=b"v" * size)
                )
                for i, size in enumerate(sizes)
            ],
        )

    # Within the 4 MiB a request may have, but the response repeats every value and more.
    last = (4 << 20) - 500 - transact(0).ByteSize() - 8
    request = transact(last)
    assert (4 << 20) - 1024 < request.ByteSize() <= 4 << 20
    statesync = state_grpc.StateSyncServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await statesync.Transact(request, metadata=worker.metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == ["operations"]


async def test_the_summary_of_agents_with_many_distinct_capabilities_fits(
    server: App, channel: grpc.aio.Channel
) -> None:
    stub = discovery_grpc.DiscoveryServiceStub(channel)
    # 1,000 agents of 64 capabilities each, none shared: 64,000 map entries, about 4.6 MB.
    await asyncio.gather(
        *(
            stub.Register(
                discovery_pb.RegisterRequest(
                    agent_id=f"a{i:04d}",
                    name="n",
                    capabilities=[f"{i:04d}-{c:02d}".ljust(64, "c") for c in range(64)],
                )
            )
            for i in range(1000)
        )
    )
    summary = await stub.GetSummary(discovery_pb.GetSummaryRequest())
    assert summary.live_agents == 1000 and summary.counts_truncated
    assert 0 < len(summary.live_agents_by_capability) < 64_000
    assert set(summary.live_agents_by_capability.values()) == {1}
    assert dict(summary.live_agents_by_role) == {"": 1000}
