"""Heartbeats that set ``ack_interval``: answered only with news, through real stubs and servers.

Old clients (no ``ack_interval``) get an answer to every heartbeat, as
tests/server/test_discovery.py shows throughout.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from agentcoord.discovery.v1 import discovery_service_pb2 as pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as pb_grpc
from tests.helpers import bearer, eventually, field_violations
from tests.server.conftest import StartServer
from tests.server.test_discovery import register, state_of, ttl

Stub = pb_grpc.DiscoveryServiceStub
ADMIN = "admin-secret"


def beat(agent_id: str, active: int = 0, every: float = 60.0) -> pb.HeartbeatRequest:
    """A heartbeat that wants an answer only with news, or ``every`` seconds after the last."""
    return pb.HeartbeatRequest(
        agent_id=agent_id, load=pb.Load(active_subtasks=active), ack_interval=ttl(every)
    )


async def active_subtasks(stub: Stub, agent_id: str) -> int:
    return (await stub.GetAgent(pb.GetAgentRequest(agent_id=agent_id))).agent.load.active_subtasks


async def test_only_the_first_heartbeat_and_news_are_answered(start_server: StartServer) -> None:
    app = await start_server(admin_token=ADMIN)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        discovery = Stub(channel)
        registered = await register(discovery, "q", ttl=ttl(5))
        call = discovery.Heartbeat(metadata=bearer(registered.session_token))
        await call.write(beat("q"))
        first = await call.read()  # the stream's first heartbeat is answered: the stream is up
        assert first.command == pb.HeartbeatResponse.COMMAND_UNSPECIFIED
        assert first.epoch == registered.epoch
        assert first.heartbeat_interval == registered.heartbeat_interval
        for active in (1, 2, 3):
            await call.write(beat("q", active))

        async def renewed() -> bool:  # each one was handled
            return await active_subtasks(discovery, "q") == 3

        await eventually(renewed)
        # News: the admin takes the id over. Nothing was answered in between, so the next
        # message on the stream is the unasked REREGISTER.
        await discovery.Register(
            pb.RegisterRequest(agent_id="q", name="q", ttl=ttl(5)), metadata=bearer(ADMIN)
        )
        told = await call.read()
        assert told is not grpc.aio.EOF
        assert told.command == pb.HeartbeatResponse.COMMAND_REREGISTER
        await call.write(beat("q"))  # the next heartbeat is news too, and ends the stream
        assert (await call.read()).command == pb.HeartbeatResponse.COMMAND_REREGISTER
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_a_quiet_stream_keeps_its_agent_alive_and_is_told_of_its_expiry(
    discovery: Stub,
) -> None:
    registered = await register(discovery, "kept", ttl=ttl(0.6))
    interval = registered.heartbeat_interval.ToTimedelta().total_seconds()
    call = discovery.Heartbeat(metadata=bearer(registered.session_token))
    await call.write(beat("kept"))
    assert (await call.read()).command == pb.HeartbeatResponse.COMMAND_UNSPECIFIED
    for active in range(1, 7):  # 6 heartbeats an interval apart: twice the TTL, unanswered
        await asyncio.sleep(interval)
        await call.write(beat("kept", active))

    async def renewed() -> bool:
        return await active_subtasks(discovery, "kept") == 6

    await eventually(renewed)
    assert await state_of(discovery, "kept") == pb.Agent.STATE_LIVE
    # Then silence: the agent expires, and its quiet stream is told at once, unasked.

    async def expired() -> bool:
        return await state_of(discovery, "kept") == pb.Agent.STATE_EXPIRED

    await eventually(expired, timeout=5)
    told = await call.read()
    assert told is not grpc.aio.EOF
    assert told.command == pb.HeartbeatResponse.COMMAND_REREGISTER
    call.cancel()


async def test_an_answer_comes_once_ack_interval_has_passed(discovery: Stub) -> None:
    registered = await register(discovery, "paced", ttl=ttl(5))
    call = discovery.Heartbeat(metadata=bearer(registered.session_token))
    for active in range(3):  # a microsecond has passed by each next heartbeat: all answered
        await call.write(beat("paced", active, every=1e-6))
        answer = await call.read()
        assert answer.command == pb.HeartbeatResponse.COMMAND_UNSPECIFIED
        assert answer.epoch == registered.epoch
    # Zero asks for every answer, as a client that does not set the field.
    for active in range(3):
        await call.write(beat("paced", active, every=0))
        assert (await call.read()).epoch == registered.epoch
    call.cancel()


async def test_a_bad_ack_interval_names_the_field(discovery: Stub) -> None:
    registered = await register(discovery, "bad")
    call = discovery.Heartbeat(metadata=bearer(registered.session_token))
    request = beat("bad")
    request.ack_interval.seconds = -1
    await call.write(request)
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await call.read()
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(invalid.value) == ["ack_interval"]
