"""Distribution across replica processes on one PostgreSQL database.

Real ``agentcoord serve`` processes on a fresh schema, each hosting every service; SDK
agents spread over them (each registered through one replica, failing over to the others).
A task submitted on one replica is worked by the agents of every replica: each replica
pushes to the agents whose streams it holds, from queues fed by the change log, and all of
them race for the same sub-tasks, which only the lease transaction settles. The change log
read back must show every sub-task leased to one session at a time and succeeded once,
also when a replica, the sweeping leader or another, is killed with SIGKILL in the middle of
the task and of a write storm.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2

from agentcoord.client import Agent, AgentcoordClient, Handler, TaskSpec, TaskState, WorkItem
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from agentcoord.distribution.v1 import distribution_service_pb2 as dist_pb
from agentcoord.distribution.v1 import distribution_service_pb2_grpc as dist_grpc
from agentcoord.statesync.v1 import statesync_service_pb2 as statesync_pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as statesync_grpc
from tests.helpers import bearer, error_info
from tests.server.processes import ADMIN, Replica, Replicas, start_scraped, the_leader

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


@pytest.mark.parametrize("victim", ["leader", "follower"])
async def test_kill_9_of_a_replica_mid_task_loses_no_subtask_and_completes_none_twice(
    replicas: Replicas, victim: str
) -> None:
    scraped = [await start_scraped(replicas) for _ in range(3)]
    leader = await the_leader(scraped)
    killed = leader if victim == "leader" else next(s for s in scraped if s is not leader)
    started = [s.replica for s in scraped]
    dead = killed.replica
    survivor = next(r for r in started if r is not dead)
    workers = Workers(started)
    count = 400
    stop = asyncio.Event()
    addresses = [r.address for r in started]
    async with running(workers.agents()), AgentcoordClient(addresses) as planner:
        storms = [
            asyncio.create_task(write_storm(r.address, r.name, stop)) for r in (dead, survivor)
        ]
        task = await planner.tasks.submit(spec(count))
        while sum(workers.handled.values()) < count // 3:
            await asyncio.sleep(0.02)
        assert workers.by_home[dead.name] > 0, f"{dead.name}'s agents did not work before the kill"
        dead.process.kill()  # SIGKILL: its streams, heartbeats and leases in flight are cut
        await dead.process.wait()
        result = await planner.tasks.result(task.task_id, timeout=90)
        done = await planner.tasks.get(task.task_id)
        stop.set()
        written = await asyncio.gather(*storms)
        if victim == "leader":  # one of the others sweeps now
            await the_leader([s for s in scraped if s is not killed])
    assert done.state is TaskState.SUCCEEDED, done.state_reason
    assert result.keys() == {f"s{i}" for i in range(count)}
    assert all(written), written
    assert set(workers.handled.values()) == {1}, "a lease was handed out twice"
    check_log(await subtask_events(survivor.address, task.task_id), count)


class RawAgent:
    """An agent driven through the generated stubs: registered through one replica, its
    streams and calls through whichever the test names."""

    def __init__(self, agent_id: str, capacity: int, channels: dict[str, grpc.aio.Channel]):
        self.agent_id = agent_id
        self.capacity = capacity
        self._channels = channels
        self.token = ""
        self.completed: list[str] = []
        self.held: set[str] = set()
        self.pushed = 0
        """Assignments it took from its StreamAssignments stream."""

    def tasks(self, replica: str) -> dist_grpc.DistributionServiceStub:
        return dist_grpc.DistributionServiceStub(self._channels[replica])

    async def register(self, replica: str) -> None:
        stub = discovery_grpc.DiscoveryServiceStub(self._channels[replica])
        registered = await stub.Register(
            discovery_pb.RegisterRequest(
                agent_id=self.agent_id,
                name=self.agent_id,
                capacity=self.capacity,
                ttl=duration_pb2.Duration(seconds=60),  # no expiry while the test runs
            )
        )
        self.token = registered.session_token

    async def claim(self, replica: str) -> dist_pb.Assignment | None:
        """One ClaimSubtask through ``replica`` (None: nothing READY, or at capacity)."""
        try:
            claimed = await self.tasks(replica).ClaimSubtask(
                dist_pb.ClaimSubtaskRequest(agent_id=self.agent_id), metadata=bearer(self.token)
            )
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert error_info(error).reason == "AGENT_AT_CAPACITY"
            return None
        return claimed.assignment if claimed.HasField("assignment") else None

    async def complete(self, replica: str, assignment: dist_pb.Assignment) -> None:
        subtask_id = assignment.lease.subtask_id
        await self.tasks(replica).CompleteSubtask(
            dist_pb.CompleteSubtaskRequest(
                subtask_id=subtask_id,
                agent_id=self.agent_id,
                fencing_token=assignment.lease.fencing_token,
                result=struct_pb2.Value(string_value=self.agent_id),
            ),
            metadata=bearer(self.token),
        )
        self.completed.append(subtask_id)
        self.held.discard(subtask_id)

    async def serve(self, replica: str, complete_on: str, stop: asyncio.Event) -> None:
        """Heartbeat and take pushed assignments through ``replica`` until ``stop``."""
        discovery = discovery_grpc.DiscoveryServiceStub(self._channels[replica])
        beats = discovery.Heartbeat(metadata=bearer(self.token))
        pushed = self.tasks(replica).StreamAssignments(
            dist_pb.StreamAssignmentsRequest(agent_id=self.agent_id), metadata=bearer(self.token)
        )

        async def heartbeat() -> None:
            while True:
                load = discovery_pb.Load(held_subtask_ids=sorted(self.held))
                await beats.write(discovery_pb.HeartbeatRequest(agent_id=self.agent_id, load=load))
                await beats.read()
                await asyncio.sleep(0.5)

        async def work() -> None:
            async for message in pushed:
                if message.HasField("assignment"):
                    self.pushed += 1
                    self.held.add(message.assignment.lease.subtask_id)
                    await asyncio.sleep(WORK_SECONDS)
                    await self.complete(complete_on, message.assignment)

        helpers = [asyncio.create_task(heartbeat()), asyncio.create_task(work())]
        await stop.wait()
        for helper in helpers:
            helper.cancel()
        pushed.cancel()
        beats.cancel()
        for helper in helpers:
            with contextlib.suppress(asyncio.CancelledError):
                await helper


def most_held_at_once(events: Sequence[statesync_pb.Event]) -> Counter[str]:
    """The most leases each agent held at once, by the change log."""
    holder: dict[str, str] = {}
    held: Counter[str] = Counter()
    most: Counter[str] = Counter()
    for event in events:
        details = json_format.MessageToDict(event.details)
        subtask_id = details["subtask_id"]
        if subtask_id in holder:
            held[holder.pop(subtask_id)] -= 1
        if event.kind == "subtask.leased":
            holder[subtask_id] = event.agent_id
            held[event.agent_id] += 1
            most[event.agent_id] = max(most[event.agent_id], held[event.agent_id])
    return most


@contextlib.asynccontextmanager
async def channels_to(replicas: Sequence[Replica]) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    async with contextlib.AsyncExitStack() as stack:
        yield {
            r.name: await stack.enter_async_context(grpc.aio.insecure_channel(r.address))
            for r in replicas
        }


async def test_pushes_come_from_the_stream_replica_pulls_from_any_within_capacity(
    replicas: Replicas,
) -> None:
    """A task submitted on c is worked by agents whose streams are on a and b (registered
    through other replicas) and by claims through c and a; an agent that is pushed work
    on a and claims more through c never holds more than its capacity."""
    started = [await replicas.start() for _ in range(3)]
    count = 60
    stop = asyncio.Event()
    async with channels_to(started) as channels:
        push_a = RawAgent("push-a", 2, channels)  # registered on c, streams on a, claims on c
        push_b = RawAgent("push-b", 2, channels)  # registered on a, streams on b
        puller = RawAgent("puller", 1, channels)  # registered on b, claims on c and a
        for agent, home in ((push_a, "c"), (push_b, "a"), (puller, "b")):
            await agent.register(home)

        async def pull(agent: RawAgent, through: Sequence[str]) -> None:
            for n in itertools.count():
                if stop.is_set():
                    return
                replica = through[n % len(through)]
                assignment = await agent.claim(replica)
                if assignment is None:
                    await asyncio.sleep(0.01)
                    continue
                agent.held.add(assignment.lease.subtask_id)
                await agent.complete(through[(n + 1) % len(through)], assignment)

        async with AgentcoordClient(started[2].address) as planner:
            task = await planner.tasks.submit(spec(count))
            workers = [
                asyncio.create_task(push_a.serve("a", "b", stop)),
                asyncio.create_task(push_b.serve("b", "c", stop)),
                asyncio.create_task(pull(puller, ("c", "a"))),
                asyncio.create_task(pull(push_a, ("c",))),
            ]
            try:
                result = await planner.tasks.result(task.task_id, timeout=90)
            finally:
                stop.set()
                await asyncio.gather(*workers)
    assert result.keys() == {f"s{i}" for i in range(count)}
    done = [*push_a.completed, *push_b.completed, *puller.completed]
    assert sorted(done) == sorted(set(done)) and len(done) == count
    assert push_a.pushed and push_b.pushed and puller.completed
    assert len(push_a.completed) > push_a.pushed, "push-a claimed none through c"
    events = await subtask_events(started[0].address, task.task_id)
    check_log(events, count)
    most = most_held_at_once(events)
    assert most["push-a"] <= 2 and most["push-b"] <= 2 and most["puller"] <= 1, most


async def test_two_replicas_racing_to_lease_the_same_subtasks_lease_each_once(
    replicas: Replicas,
) -> None:
    """Many concurrent claims on both replicas over one task: each sub-task is leased
    once, completed once, none lost."""
    started = [await replicas.start() for _ in range(2)]
    count = 200
    async with channels_to(started) as channels:
        agents = [RawAgent(f"racer-{n}", 4, channels) for n in range(8)]
        for n, agent in enumerate(agents):
            await agent.register("ab"[n % 2])
        async with AgentcoordClient(started[0].address) as planner:
            task = await planner.tasks.submit(spec(count))

            async def race(agent: RawAgent, first: int) -> None:
                # Four claims at once per agent, alternating replicas; each completes
                # through the other replica.
                async def claimer(k: int) -> None:
                    for n in itertools.count(first + k):
                        assignment = await agent.claim("ab"[n % 2])
                        if assignment is None:
                            if (
                                len(agent.completed)
                                + sum(len(a.completed) for a in agents if a is not agent)
                                >= count
                            ):
                                return
                            await asyncio.sleep(0.01)
                            continue
                        await agent.complete("ab"[(n + 1) % 2], assignment)

                await asyncio.gather(*(claimer(k) for k in range(4)))

            await asyncio.wait_for(
                asyncio.gather(*(race(agent, n) for n, agent in enumerate(agents))), 120
            )
            done = await planner.tasks.get(task.task_id)
    assert done.state is TaskState.SUCCEEDED
    completed = Counter(s for agent in agents for s in agent.completed)
    assert len(completed) == count and set(completed.values()) == {1}
    events = await subtask_events(started[1].address, task.task_id)
    check_log(events, count)
    leased = Counter(
        json_format.MessageToDict(e.details)["subtask_id"]
        for e in events
        if e.kind == "subtask.leased"
    )
    assert set(leased.values()) == {1}, "a sub-task was leased more than once"


async def test_a_claim_repeated_through_another_replica_returns_the_lease_it_took(
    replicas: Replicas,
) -> None:
    """A ClaimSubtask retried with its request_id through another replica (the first one's
    answer lost, say) returns the lease the first took instead of leasing a second sub-task:
    at once, before that replica heard of the lease, and later."""
    a, b = [await replicas.start() for _ in range(2)]
    async with channels_to([a, b]) as channels:
        agent = RawAgent("claimer", 4, channels)
        await agent.register("a")

        async def claim(replica: str, request_id: str) -> dist_pb.ClaimSubtaskResponse:
            request = dist_pb.ClaimSubtaskRequest(
                agent_id="claimer", request_id=request_id, wait=duration_pb2.Duration(seconds=5)
            )
            answer: dist_pb.ClaimSubtaskResponse = await agent.tasks(replica).ClaimSubtask(
                request, metadata=bearer(agent.token)
            )
            return answer

        async with AgentcoordClient(a.address) as planner:
            await planner.tasks.submit(spec(10))
            first = (await claim("a", "claim-1")).assignment
            at_once = (await claim("b", "claim-1")).assignment
            await asyncio.sleep(0.5)  # b has heard of the lease by now
            later = (await claim("b", "claim-1")).assignment
            other = (await claim("b", "claim-2")).assignment
            for repeat in (at_once, later):
                assert repeat.lease.subtask_id == first.lease.subtask_id
                assert repeat.lease.fencing_token == first.lease.fencing_token
            assert other.lease.subtask_id != first.lease.subtask_id
            await agent.complete("a", first)
            # Once its lease has ended (completed here), the request id is a new claim's.
            after_end = (await claim("b", "claim-1")).assignment
            assert after_end.lease.subtask_id not in (
                first.lease.subtask_id,
                other.lease.subtask_id,
            )
