"""Discovery across replica processes on one PostgreSQL database.

Real ``agentcoord serve`` processes on a fresh schema: an agent registered through one
replica is known to the others and may heartbeat through any of them; a registration
through one ends the session everywhere; a replica that (re)starts while agents heartbeat
another expires none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from google.protobuf import duration_pb2, struct_pb2

from agentcoord.discovery.v1 import discovery_service_pb2 as pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as pb_grpc
from agentcoord.distribution.v1 import distribution_service_pb2 as dist_pb
from agentcoord.distribution.v1 import distribution_service_pb2_grpc as dist_grpc
from agentcoord.statesync.v1 import statesync_service_pb2 as state_pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as state_grpc
from tests.helpers import bearer, error_info
from tests.server.processes import ADMIN, Replica, Replicas

ADMIN_AUTH = bearer(ADMIN)
TTL = 1.0
"""The agents' TTL (the server's minimum): several TTLs pass in each test."""
LIVE = pb.Agent.STATE_LIVE


@contextlib.asynccontextmanager
async def discovery(replica: Replica) -> AsyncIterator[pb_grpc.DiscoveryServiceStub]:
    async with grpc.aio.insecure_channel(replica.address) as channel:
        yield pb_grpc.DiscoveryServiceStub(channel)


async def register(
    stub: pb_grpc.DiscoveryServiceStub, agent_id: str, ttl: float = TTL
) -> pb.RegisterResponse:
    request = pb.RegisterRequest(
        agent_id=agent_id, name=agent_id, ttl=duration_pb2.Duration(seconds=int(ttl))
    )
    response: pb.RegisterResponse = await stub.Register(request, metadata=ADMIN_AUTH)
    return response


@contextlib.asynccontextmanager
async def heartbeating(
    stub: pb_grpc.DiscoveryServiceStub, registered: pb.RegisterResponse
) -> AsyncIterator[list[pb.HeartbeatResponse]]:
    """Heartbeat a third of the TTL apart until the block ends; yields the answers so far."""
    call = stub.Heartbeat(metadata=bearer(registered.session_token))
    answers: list[pb.HeartbeatResponse] = []

    async def beat() -> None:
        while True:
            await call.write(pb.HeartbeatRequest(agent_id=registered.agent.agent_id))
            answers.append(await call.read())
            await asyncio.sleep(TTL / 3)

    task = asyncio.create_task(beat())
    try:
        yield answers
    finally:
        task.cancel()
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await task
    assert task.cancelled(), "the heartbeat stream failed"


async def heartbeat_once(
    stub: pb_grpc.DiscoveryServiceStub, agent_id: str, token: str
) -> pb.HeartbeatResponse:
    call = stub.Heartbeat(metadata=bearer(token))
    try:
        await call.write(pb.HeartbeatRequest(agent_id=agent_id))
        answer: pb.HeartbeatResponse = await call.read()
        return answer
    finally:
        call.cancel()


async def agent_kinds(replica: Replica) -> list[str]:
    """The kinds of every Discovery change in the change log, read through ``replica``."""
    async with grpc.aio.insecure_channel(replica.address) as channel:
        stub = state_grpc.StateSyncServiceStub(channel)
        page = await stub.ListEvents(
            state_pb.ListEventsRequest(page_size=1000), metadata=ADMIN_AUTH
        )
    return [event.kind for event in page.events if event.kind.startswith("agent.")]


async def test_an_agent_registered_on_one_replica_is_known_and_heartbeats_on_another(
    replicas: Replicas,
) -> None:
    replica_a = await replicas.start()
    replica_b = await replicas.start("discovery", "statesync")
    async with discovery(replica_a) as a, discovery(replica_b) as b:
        registered = await register(a, "worker-1")
        agent = (await b.GetAgent(pb.GetAgentRequest(agent_id="worker-1"))).agent
        assert agent.state == LIVE and agent.epoch == registered.epoch
        listed = await b.ListAgents(pb.ListAgentsRequest())
        assert [listed_agent.agent_id for listed_agent in listed.agents] == ["worker-1"]
        assert (await b.GetSummary(pb.GetSummaryRequest())).live_agents == 1
        # Heartbeats through b only, for several TTLs: a sees the agent live all along,
        # from the heartbeats b flushes to the store.
        async with heartbeating(b, registered) as answers:
            for _ in range(12):
                await asyncio.sleep(TTL / 2)
                on_a = (await a.GetAgent(pb.GetAgentRequest(agent_id="worker-1"))).agent
                assert on_a.state == LIVE
                assert (await a.GetSummary(pb.GetSummaryRequest())).live_agents == 1
        assert answers and all(
            answer.command == pb.HeartbeatResponse.COMMAND_UNSPECIFIED for answer in answers
        )
        # a shows the last heartbeat that b flushed, read from the store.
        assert on_a.last_heartbeat_time.ToDatetime() > agent.register_time.ToDatetime()
    assert await agent_kinds(replica_a) == ["agent.joined"]  # it never expired


async def test_a_registration_on_another_replica_ends_the_session_everywhere(
    replicas: Replicas,
) -> None:
    replica_a = await replicas.start()
    replica_b = await replicas.start("discovery", "statesync")
    async with discovery(replica_a) as a, discovery(replica_b) as b:
        first = await register(a, "worker-1")
        second = await register(b, "worker-1")  # the admin takes the live session over
        assert second.epoch == first.epoch + 1
        old, new = bearer(first.session_token), bearer(second.session_token)
        async with grpc.aio.insecure_channel(replica_a.address) as channel:
            state_on_a = state_grpc.StateSyncServiceStub(channel)
            put = state_pb.PutStateRequest(key="shared/k", json=struct_pb2.Value(number_value=1))
            with contextlib.suppress(grpc.aio.AioRpcError):
                for _ in range(100):  # a hears the registration through the change feed
                    await state_on_a.PutState(put, metadata=old)
                    await asyncio.sleep(0.05)
            refused = state_on_a.PutState(put, metadata=old)
            try:
                await refused
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            else:
                raise AssertionError("replica a still accepts the replaced session's token")
            await state_on_a.PutState(put, metadata=new)
        for stub in (a, b):
            try:
                answer = await heartbeat_once(stub, "worker-1", first.session_token)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            else:
                assert answer.command == pb.HeartbeatResponse.COMMAND_REREGISTER
            answer = await heartbeat_once(stub, "worker-1", second.session_token)
            assert answer.command == pb.HeartbeatResponse.COMMAND_UNSPECIFIED
            assert answer.epoch == second.epoch


async def test_a_restarted_replica_expires_no_agent_that_heartbeats_another(
    replicas: Replicas,
) -> None:
    replica_a = await replicas.start()
    replica_b = await replicas.start("discovery", "statesync")
    async with discovery(replica_a) as a, contextlib.AsyncExitStack() as stack:
        for n in range(4):
            registered = await register(a, f"worker-{n}")
            await stack.enter_async_context(heartbeating(a, registered))
        replica_b.process.kill()
        await replica_b.process.wait()
        restarted = await replicas.start("discovery", "statesync")  # b again, on a new port
        await asyncio.sleep(4 * TTL)  # several TTLs of restarted's clock
        async with discovery(restarted) as b:
            summary = await b.GetSummary(pb.GetSummaryRequest())
        assert summary.live_agents == 4
        assert (await a.GetSummary(pb.GetSummaryRequest())).live_agents == 4
    assert await agent_kinds(replica_a) == ["agent.joined"] * 4


async def test_a_registration_ends_the_replaced_sessions_streams_on_another_replica_at_once(
    replicas: Replicas,
) -> None:
    """Its Heartbeat and StreamAssignments streams on b end as soon as b hears the new
    registration made through a, not at their next message; the old token is refused on
    both replicas."""
    replica_a, replica_b = await replicas.start(), await replicas.start()
    async with (
        discovery(replica_a) as a,
        grpc.aio.insecure_channel(replica_b.address) as channel_b,
    ):
        b = pb_grpc.DiscoveryServiceStub(channel_b)
        tasks_b = dist_grpc.DistributionServiceStub(channel_b)
        # A long TTL: nothing but the new registration can end the first session meanwhile.
        first = await register(a, "worker-1", ttl=60)
        old = bearer(first.session_token)
        beats = b.Heartbeat(metadata=old)
        await beats.write(pb.HeartbeatRequest(agent_id="worker-1"))
        assert (await beats.read()).command == pb.HeartbeatResponse.COMMAND_UNSPECIFIED
        assignments = tasks_b.StreamAssignments(
            dist_pb.StreamAssignmentsRequest(agent_id="worker-1"), metadata=old
        )
        await assignments.initial_metadata()  # registered on b

        second = await register(a, "worker-1", ttl=60)  # the admin takes the id over

        told = await beats.read()  # unasked: no heartbeat was sent since
        assert told is not grpc.aio.EOF
        assert told.command == pb.HeartbeatResponse.COMMAND_REREGISTER
        assert told.epoch == first.epoch
        await beats.write(pb.HeartbeatRequest(agent_id="worker-1"))  # renews nothing
        assert (await beats.read()).command == pb.HeartbeatResponse.COMMAND_REREGISTER
        assert await beats.read() is grpc.aio.EOF
        try:
            await assignments.read()
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_info(error).reason == "SESSION_ENDED"
        else:
            raise AssertionError("the replaced session's assignment stream goes on")
        for replica in (replica_a, replica_b):
            async with grpc.aio.insecure_channel(replica.address) as channel:
                claim = dist_grpc.DistributionServiceStub(channel).ClaimSubtask(
                    dist_pb.ClaimSubtaskRequest(agent_id="worker-1"), metadata=old
                )
                try:
                    await claim
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, replica.name
                else:
                    raise AssertionError(f"replica {replica.name} accepts the old token")
        answer = await heartbeat_once(b, "worker-1", second.session_token)
        assert (answer.command, answer.epoch) == (
            pb.HeartbeatResponse.COMMAND_UNSPECIFIED,
            second.epoch,
        )


FLUSH = 0.1
"""The replicas' ``--heartbeat-flush-interval`` in the staleness test."""


async def test_heartbeat_facts_received_on_one_replica_are_seen_on_another_within_the_bound(
    replicas: Replicas,
) -> None:
    """architecture.md: the load and last heartbeat time of an agent heartbeating another
    replica lag by at most flush_interval + (TTL + flush_interval) / 2."""
    flags = ("--heartbeat-flush-interval", f"{FLUSH}s")
    replica_a, replica_b = await replicas.start(*flags), await replicas.start(*flags)
    ttl = 3.0
    bound = FLUSH + (ttl + FLUSH) / 2
    loop = asyncio.get_running_loop()
    async with discovery(replica_a) as a, discovery(replica_b) as b:
        registered = await register(a, "worker-1", ttl=ttl)
        call = b.Heartbeat(metadata=bearer(registered.session_token))
        acked: list[tuple[float, int]] = []  # (when b's answer arrived, the load it carried)
        lags: list[float] = []
        for load in range(1, 31):  # 30 heartbeats a third of the TTL apart: 10 TTLs
            await call.write(
                pb.HeartbeatRequest(agent_id="worker-1", load=pb.Load(active_subtasks=load))
            )
            assert (await call.read()).command == pb.HeartbeatResponse.COMMAND_UNSPECIFIED
            acked.append((loop.time(), load))
            for _ in range(4):
                await asyncio.sleep(ttl / 12)
                asked = loop.time()
                shown = (await a.GetAgent(pb.GetAgentRequest(agent_id="worker-1"))).agent
                assert shown.state == LIVE
                # How long ago b acknowledged the heartbeat whose load a shows, or a newer one.
                newer = [at for at, sent in acked if sent > shown.load.active_subtasks]
                lags.append(asked - newer[0] if newer else 0.0)
        call.cancel()
    # The bound, plus what a loaded machine adds to one read (a generous tenth of a TTL).
    assert max(lags) <= bound + ttl / 10, sorted(lags)[-5:]
    assert max(lags) > 0  # a showed stale facts at times: the test measured the lag


async def test_a_session_registered_a_moment_ago_elsewhere_heartbeats_at_once(
    replicas: Replicas,
) -> None:
    """A heartbeat that reaches b right after the registration through a (before b hears of
    it) renews the session: b reads the session, and the agent with it, from the store. Both
    a new agent and a new session of an agent b knows under its old one."""
    replica_a, replica_b = await replicas.start(), await replicas.start()
    async with discovery(replica_a) as a, discovery(replica_b) as b:

        async def register_then_beat_on_b(agent_id: str) -> int:
            registered = await register(a, agent_id, ttl=60)
            answer = await heartbeat_once(b, agent_id, registered.session_token)
            return answer.command

        for round_ in range(2):  # new agents, then new sessions of agents b has heard of
            commands = await asyncio.gather(
                *(register_then_beat_on_b(f"fresh-{n}") for n in range(40))
            )
            assert set(commands) == {pb.HeartbeatResponse.COMMAND_UNSPECIFIED}, round_
