"""Distribution across replica processes on one PostgreSQL database.

Real ``agentcoord serve`` processes on a fresh schema, each hosting every service; SDK
agents spread over them (each registered through one replica, failing over to the others).
A task submitted on one replica is worked by the agents of every replica: each replica
pushes to the agents whose streams it holds, from queues fed by the change log, and all of
them race for the same sub-tasks, which only the lease transaction settles. The change log
read back must show every sub-task leased to one session at a time and succeeded once,
also when a replica is killed with SIGKILL in the middle of the task and of a write storm.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import grpc
from google.protobuf import json_format, struct_pb2

from agentcoord.client import Agent, AgentcoordClient, Handler, TaskSpec, TaskState, WorkItem
from agentcoord.statesync.v1 import statesync_service_pb2 as statesync_pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as statesync_grpc
from tests.helpers import bearer
from tests.server.processes import ADMIN, Replica, Replicas

AGENTS_PER_REPLICA = 2
WORK_SECONDS = 0.005


def spec(count: int) -> TaskSpec:
    return TaskSpec(
        "shared work",
        subtasks=[{"local_id": f"s{i}", "input": i} for i in range(count)],
        lease_ttl=2.0,
        max_attempts=20,
    )


class Workers:
    """SDK agents, ``AGENTS_PER_REPLICA`` registered through each replica."""

    def __init__(self, replicas: Sequence[Replica]) -> None:
        self.handled: Counter[tuple[str, int]] = Counter()
        """(sub-task id, fencing token) of each handler run."""
        self.by_home: Counter[str] = Counter()
        """Handler runs by the name of the replica each agent registered through first."""
        self._replicas = replicas

    def agents(self) -> list[Agent]:
        agents = []
        for home in self._replicas:
            # Its own replica first, then the others to fail over to.
            targets = [home.address] + [r.address for r in self._replicas if r is not home]
            for n in range(AGENTS_PER_REPLICA):
                agents.append(
                    Agent(
                        targets,
                        name=f"worker-{home.name}{n}",
                        agent_id=f"worker-{home.name}{n}",
                        handler=self._handler(home.name),
                        capacity=2,
                        ttl=1.5,
                        timeout=3.0,
                    )
                )
        return agents

    def _handler(self, home: str) -> Handler:
        async def handle(item: WorkItem) -> object:
            self.handled[(item.subtask.subtask_id, item.lease.fencing_token)] += 1
            self.by_home[home] += 1
            await asyncio.sleep(WORK_SECONDS)
            return {"n": item.input, "by": item.lease.agent_id}

        return handle


@contextlib.asynccontextmanager
async def running(agents: Sequence[Agent]) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for agent in agents:
            await stack.enter_async_context(agent)
        yield


async def subtask_events(address: str, task_id: str) -> list[statesync_pb.Event]:
    """Every change of the task's sub-tasks, in revision order, read through ``address``."""
    events: list[statesync_pb.Event] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = statesync_grpc.StateSyncServiceStub(channel)
        token = ""
        while True:
            page = await stub.ListEvents(
                statesync_pb.ListEventsRequest(
                    service=statesync_pb.SERVICE_DISTRIBUTION,
                    subject=task_id,
                    page_size=1000,
                    page_token=token,
                ),
                metadata=bearer(ADMIN),
            )
            events.extend(e for e in page.events if e.kind.startswith("subtask."))
            token = page.next_page_token
            if not token:
                return events


def check_log(events: Sequence[statesync_pb.Event], count: int) -> None:
    """One lease at a time per sub-task, each sub-task succeeded exactly once."""
    revisions = [e.revision for e in events]
    assert revisions == sorted(revisions)
    leased: dict[str, bool] = {}
    succeeded: Counter[str] = Counter()
    for event in events:
        details = json_format.MessageToDict(event.details)
        subtask_id = details["subtask_id"]
        if event.kind == "subtask.leased":
            assert not leased.get(subtask_id), f"{subtask_id} leased twice at once"
            leased[subtask_id] = True
        else:
            leased[subtask_id] = False
        if event.kind == "subtask.succeeded":
            succeeded[subtask_id] += 1
    assert len(succeeded) == count
    assert set(succeeded.values()) == {1}, "a sub-task succeeded twice"


async def test_a_task_submitted_on_one_replica_is_worked_on_every_replica(
    replicas: Replicas,
) -> None:
    started = [await replicas.start() for _ in range(3)]
    workers = Workers(started)
    count = 300
    async with running(workers.agents()), AgentcoordClient(started[1].address) as planner:
        task = await planner.tasks.submit(spec(count))
        result = await planner.tasks.result(task.task_id, timeout=60)
        done = await planner.tasks.get(task.task_id)
    assert done.state is TaskState.SUCCEEDED
    assert result.keys() == {f"s{i}" for i in range(count)}
    assert set(workers.by_home) == {"a", "b", "c"}, workers.by_home
    assert set(workers.handled.values()) == {1}, "a lease was handed out twice"
    check_log(await subtask_events(started[0].address, task.task_id), count)
    # The same log through another replica.
    assert [e.revision for e in await subtask_events(started[2].address, task.task_id)] == [
        e.revision for e in await subtask_events(started[0].address, task.task_id)
    ]


async def write_storm(address: str, name: str, stop: asyncio.Event) -> int:
    """StateSync writers on one replica until ``stop``; returns the writes acknowledged."""
    acknowledged = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = statesync_grpc.StateSyncServiceStub(channel)

        async def writer(n: int) -> None:
            nonlocal acknowledged
            i = 0
            while not stop.is_set():
                request = statesync_pb.PutStateRequest(
                    key=f"shared/{name}/{n}/{i % 50}",
                    json=struct_pb2.Value(number_value=i),
                )
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.PutState(request, metadata=bearer(ADMIN), timeout=3)
                    acknowledged += 1
                i += 1

        await asyncio.gather(*(writer(n) for n in range(4)))
    return acknowledged


async def test_kill_9_of_a_replica_mid_task_loses_no_subtask_and_completes_none_twice(
    replicas: Replicas,
) -> None:
    started = [await replicas.start() for _ in range(3)]
    a, b, c = started
    workers = Workers(started)
    count = 400
    stop = asyncio.Event()
    async with running(workers.agents()), AgentcoordClient([c.address, a.address]) as planner:
        storms = [
            asyncio.create_task(write_storm(address, name, stop))
            for address, name in ((a.address, "a"), (b.address, "b"))
        ]
        task = await planner.tasks.submit(spec(count))
        while sum(workers.handled.values()) < count // 3:
            await asyncio.sleep(0.02)
        assert workers.by_home["b"] > 0, "b's agents did not work before the kill"
        b.process.kill()  # SIGKILL: its streams, heartbeats and leases in flight are cut
        await b.process.wait()
        result = await planner.tasks.result(task.task_id, timeout=90)
        done = await planner.tasks.get(task.task_id)
        stop.set()
        written = await asyncio.gather(*storms)
    assert done.state is TaskState.SUCCEEDED, done.state_reason
    assert result.keys() == {f"s{i}" for i in range(count)}
    assert all(written), written
    assert set(workers.handled.values()) == {1}, "a lease was handed out twice"
    check_log(await subtask_events(a.address, task.task_id), count)
