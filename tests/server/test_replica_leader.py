"""The one sweeping replica: leadership through a PostgreSQL advisory lock.

Real ``agentcoord serve`` processes on a fresh schema. Exactly one of them leads (its
``agentcoord_replica_leader`` gauge is 1) and records agent, lease and key expiries; when it is
killed with SIGKILL another takes over, and an agent that stopped heartbeating meanwhile (and a
key whose TTL ran out) expires once. Leases renewed through a replica that does not lead are
never expired.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import grpc
from google.protobuf import duration_pb2, struct_pb2

from agentcoord.client import AgentcoordClient, TaskSpec
from agentcoord.discovery.v1 import discovery_service_pb2 as pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as pb_grpc
from agentcoord.distribution.v1 import distribution_service_pb2 as dist_pb
from agentcoord.distribution.v1 import distribution_service_pb2_grpc as dist_grpc
from agentcoord.statesync.v1 import statesync_service_pb2 as state_pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as state_grpc
from tests.helpers import bearer, eventually
from tests.server.processes import (
    TAKE_OVER_BUDGET,
    Replica,
    Replicas,
    start_scraped,
    the_leader,
)
from tests.server.test_replica_discovery import ADMIN_AUTH, agent_kinds, register
from tests.server.test_replicas_distribution import subtask_events


async def test_exactly_one_replica_leads(replicas: Replicas) -> None:
    started = [await start_scraped(replicas) for _ in range(3)]
    leader = await the_leader(started)
    for _ in range(5):  # it keeps leading, and alone, over several tries of the others
        await asyncio.sleep(0.2)
        assert [s for s in started if await s.leads()] == [leader]


async def test_kill_9_of_the_leader_hands_the_sweep_over_and_an_idle_agent_expires_once(
    replicas: Replicas,
) -> None:
    started = [await start_scraped(replicas) for _ in range(3)]
    leader = await the_leader(started)
    async with grpc.aio.insecure_channel(leader.replica.address) as channel:
        # Registered through the leader and never heartbeating: it expires after 2 s.
        await register(pb_grpc.DiscoveryServiceStub(channel), "idle-1", ttl=2.0)
        # A key with a TTL of 1 s, written through the leader: deleted after the take-over.
        put = state_pb.PutStateRequest(
            key="lease/holder",
            json=struct_pb2.Value(string_value="idle-1"),
            ttl=duration_pb2.Duration(seconds=1),
        )
        await state_grpc.StateSyncServiceStub(channel).PutState(put, metadata=ADMIN_AUTH)
    leader.replica.process.kill()
    await leader.replica.process.wait()
    survivors = [s for s in started if s is not leader]
    await the_leader(survivors)
    async with grpc.aio.insecure_channel(survivors[0].replica.address) as channel:
        stub = pb_grpc.DiscoveryServiceStub(channel)

        async def expired() -> bool:
            agent = (await stub.GetAgent(pb.GetAgentRequest(agent_id="idle-1"))).agent
            return agent.state == pb.Agent.STATE_EXPIRED

        await eventually(expired, timeout=TAKE_OVER_BUDGET)

    async def key_expired() -> bool:
        return "state.expire" in await key_kinds(survivors[0].replica, "lease/holder")

    await eventually(key_expired, timeout=TAKE_OVER_BUDGET)
    await asyncio.sleep(1.0)  # five more tries of the sweeps: none records a second expiry
    assert await agent_kinds(survivors[1].replica) == ["agent.joined", "agent.expired"]
    assert await key_kinds(survivors[1].replica, "lease/holder") == ["state.put", "state.expire"]


async def key_kinds(replica: Replica, key: str) -> list[str]:
    """The kinds of the changes of state ``key`` in the change log, read through ``replica``."""
    async with grpc.aio.insecure_channel(replica.address) as channel:
        page = await state_grpc.StateSyncServiceStub(channel).ListEvents(
            state_pb.ListEventsRequest(page_size=1000), metadata=ADMIN_AUTH
        )
    return [event.kind for event in page.events if event.subject == key]


@contextlib.asynccontextmanager
async def heartbeating(
    channel: grpc.aio.Channel, agent_id: str, token: str, held: Sequence[str]
) -> AsyncIterator[None]:
    """Heartbeat naming the ``held`` sub-tasks every quarter second until the block ends."""
    call = pb_grpc.DiscoveryServiceStub(channel).Heartbeat(metadata=bearer(token))

    async def beat() -> None:
        while True:
            load = pb.Load(held_subtask_ids=list(held))
            await call.write(pb.HeartbeatRequest(agent_id=agent_id, load=load))
            await call.read()
            await asyncio.sleep(0.25)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await task


async def test_leases_renewed_through_a_replica_that_does_not_lead_never_expire(
    replicas: Replicas,
) -> None:
    started = [await start_scraped(replicas) for _ in range(2)]
    leader = await the_leader(started)
    follower = next(s for s in started if s is not leader)
    async with (
        grpc.aio.insecure_channel(follower.replica.address) as channel,
        AgentcoordClient(leader.replica.address) as planner,
    ):
        discovery = pb_grpc.DiscoveryServiceStub(channel)
        tasks = dist_grpc.DistributionServiceStub(channel)
        registered = await discovery.Register(
            pb.RegisterRequest(
                agent_id="holder", name="holder", ttl=duration_pb2.Duration(seconds=60)
            ),
            metadata=ADMIN_AUTH,
        )
        token = registered.session_token
        task = await planner.tasks.submit(
            TaskSpec("held", subtasks=[{"local_id": "s0", "input": 0}], lease_ttl=1.0)
        )
        claimed: list[dist_pb.Assignment] = []

        async def claims() -> bool:
            answer = await tasks.ClaimSubtask(
                dist_pb.ClaimSubtaskRequest(agent_id="holder"), metadata=bearer(token)
            )
            if answer.HasField("assignment"):
                claimed.append(answer.assignment)
            return bool(claimed)

        await eventually(claims)
        lease = claimed[0].lease
        async with heartbeating(channel, "holder", token, [lease.subtask_id]):
            await asyncio.sleep(5.0)  # five lease TTLs, renewed through the follower only
        await tasks.CompleteSubtask(
            dist_pb.CompleteSubtaskRequest(
                subtask_id=lease.subtask_id,
                agent_id="holder",
                fencing_token=lease.fencing_token,
                result=struct_pb2.Value(string_value="done"),
            ),
            metadata=bearer(token),
        )
    kinds = [event.kind for event in await subtask_events(leader.replica.address, task.task_id)]
    assert kinds == ["subtask.ready", "subtask.leased", "subtask.succeeded"]
