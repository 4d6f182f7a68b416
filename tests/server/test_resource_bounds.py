"""Every client gets a bounded share: real servers, real stubs, both stores.

A watcher that stops reading holds a bounded number of bytes and still misses nothing;
calls whose request never arrives end; one connection and one agent session open a
bounded number of streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2

from agentcoord.core.models import Change, Service
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from agentcoord.server.app import App
from agentcoord.server.streams import ChangeProtos
from agentcoord.statesync.v1 import statesync_service_pb2 as pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as pb_grpc
from tests.helpers import bearer, error_info, eventually
from tests.server.conftest import StartServer

BUFFER = 64 * 1024
"""The smallest --watch-buffer-bytes."""
GET_AGENT = "/agentcoord.discovery.v1.DiscoveryService/GetAgent"
WATCH_EVENTS = "/agentcoord.statesync.v1.StateSyncService/WatchEvents"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


async def register(channel: grpc.aio.Channel, agent_id: str) -> str:
    response = await discovery_grpc.DiscoveryServiceStub(channel).Register(
        discovery_pb.RegisterRequest(
            agent_id=agent_id, name=agent_id, ttl=duration_pb2.Duration(seconds=60)
        )
    )
    return response.session_token


@pytest.fixture
async def app(start_server: StartServer) -> App:
    return await start_server(watch_buffer_bytes=BUFFER, request_timeout=0.5)


@pytest.fixture
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield channel


async def test_a_watcher_that_stops_reading_holds_bounded_bytes_and_misses_nothing(
    app: App, channel: grpc.aio.Channel
) -> None:
    state = pb_grpc.StateSyncServiceStub(channel)
    token = await register(channel, "writer")
    watch = state.WatchStates(pb.WatchStatesRequest(prefix="shared/big/"))
    stream = aiter(watch)
    await anext(stream)  # registered; from now on it does not read
    value = b"v" * (100 * 1024)
    count = 60  # 6 MiB of values: past the buffer and grpc's flow-control window (~4 MiB)
    for index in range(count):
        await state.PutState(
            pb.PutStateRequest(key=f"shared/big/{index % 10}", binary=value),
            metadata=bearer(token),
        )
        assert app.feed.held_bytes() <= BUFFER
    received: list[pb.StateChange] = []
    while len(received) < count:
        response = await asyncio.wait_for(anext(stream), 30)
        received.extend(response.changes)
    watch.cancel()
    revisions = [change.revision for change in received]
    assert revisions == sorted(set(revisions)) and len(revisions) == count
    assert all(change.state.binary == value for change in received)


async def test_a_replay_of_large_values_reads_the_whole_log(
    app: App, channel: grpc.aio.Channel
) -> None:
    # Pages are cut by bytes (an eighth of the buffer: 8 KiB, less than one value here).
    state = pb_grpc.StateSyncServiceStub(channel)
    token = await register(channel, "writer")
    first = 0
    for index in range(30):
        put = await state.PutState(
            pb.PutStateRequest(key=f"shared/r/{index}", binary=b"r" * 20_000),
            metadata=bearer(token),
        )
        first = first or put.revision
    watch = state.WatchStates(pb.WatchStatesRequest(prefix="shared/r/", start_revision=first - 1))
    keys: list[str] = []
    async for response in watch:
        keys.extend(change.key for change in response.changes)
        if len(keys) >= 30:
            break
    watch.cancel()
    assert keys == [f"shared/r/{index}" for index in range(30)]


@pytest.mark.parametrize(
    "method",
    [GET_AGENT, WATCH_EVENTS, HEALTH_CHECK],
    ids=["unary", "server-streaming", "health"],
)
async def test_a_call_whose_request_never_arrives_ends(
    channel: grpc.aio.Channel, method: str
) -> None:
    # A client-streaming call on the wire is headers, then messages: open it, send none.
    stalled = channel.stream_stream(method)()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await asyncio.wait_for(stalled.read(), 30)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--request-timeout" in (raised.value.details() or "")
    # The same methods still serve callers that send their request.
    answer = await channel.unary_unary(
        HEALTH_CHECK,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_silent_heartbeat_stream_ends(start_server: StartServer) -> None:
    app = await start_server(min_ttl=0.2, default_ttl=0.5, max_ttl=0.5)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        token = await register(channel, "quiet")
        stub = discovery_grpc.DiscoveryServiceStub(channel)
        # Another stream keeps the session live, so only the silence ends this one.
        beating = stub.Heartbeat(metadata=bearer(token))

        async def beat() -> None:
            while True:
                await beating.write(discovery_pb.HeartbeatRequest(agent_id="quiet"))
                await beating.read()
                await asyncio.sleep(0.1)

        beats = asyncio.create_task(beat())
        stream = stub.Heartbeat(metadata=bearer(token))
        try:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await asyncio.wait_for(stream.read(), 30)
        finally:
            beats.cancel()
            beating.cancel()
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_one_connection_opens_a_bounded_number_of_calls(
    start_server: StartServer,
) -> None:
    app = await start_server(max_streams_per_connection=3, request_timeout=60)
    address = f"127.0.0.1:{app.port}"
    async with (
        grpc.aio.insecure_channel(address) as crowded,
        # A channel of its own subchannel pool: a connection of its own.
        grpc.aio.insecure_channel(address, [("grpc.use_local_subchannel_pool", 1)]) as other,
    ):
        token = await register(crowded, "busy")
        stub = discovery_grpc.DiscoveryServiceStub(crowded)
        held = [stub.WatchAgents(discovery_pb.WatchAgentsRequest()) for _ in range(3)]
        for call in held:
            await anext(aiter(call))
        # A fourth call on this connection waits for a free stream; other connections don't.
        request = discovery_pb.GetAgentRequest(agent_id="busy")
        waiting = asyncio.ensure_future(stub.GetAgent(request, metadata=bearer(token)))
        other_stub = discovery_grpc.DiscoveryServiceStub(other)
        assert (await other_stub.GetAgent(request)).agent.agent_id == "busy"
        assert not waiting.done()
        held[0].cancel()
        assert (await asyncio.wait_for(waiting, 30)).agent.agent_id == "busy"
        for call in held[1:]:
            call.cancel()


async def test_one_session_opens_a_bounded_number_of_streams(
    start_server: StartServer,
) -> None:
    app = await start_server(max_streams_per_session=3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        token = await register(channel, "greedy")
        stub = discovery_grpc.DiscoveryServiceStub(channel)
        heartbeat = stub.Heartbeat(metadata=bearer(token))
        await heartbeat.write(discovery_pb.HeartbeatRequest(agent_id="greedy"))
        await heartbeat.read()
        watches = [
            stub.WatchAgents(discovery_pb.WatchAgentsRequest(), metadata=bearer(token))
            for _ in range(2)
        ]
        for watch in watches:
            await anext(aiter(watch))
        refused = stub.WatchAgents(discovery_pb.WatchAgentsRequest(), metadata=bearer(token))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await anext(aiter(refused))
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(raised.value)
        assert info.reason == "TOO_MANY_STREAMS" and info.metadata["limit"] == "3"
        assert "--max-streams-per-session 3" in (raised.value.details() or "")
        # Other callers are not limited by this session's streams; a closed one frees a slot.
        anonymous = stub.WatchAgents(discovery_pb.WatchAgentsRequest())
        await anext(aiter(anonymous))
        watches[0].cancel()

        async def reopened() -> bool:
            again = stub.WatchAgents(discovery_pb.WatchAgentsRequest(), metadata=bearer(token))
            try:
                await anext(aiter(again))
            except grpc.aio.AioRpcError:
                return False
            watches.append(again)
            return True

        await eventually(reopened)
        for call in [heartbeat, anonymous, *watches]:
            call.cancel()


def test_wire_forms_kept_for_fan_out_are_bounded_in_bytes() -> None:
    # 64 changes of 1 MiB each: the cache keeps at most its byte budget of them.
    built: list[int] = []

    def build(change: Change) -> pb.WatchEventsResponse:
        built.append(change.revision)
        return pb.WatchEventsResponse(revision=change.revision)

    protos = ChangeProtos(build, max_bytes=4 * 1024 * 1024)
    changes = [
        Change(
            n,
            datetime.now(UTC),
            Service.STATESYNC,
            "state.put",
            f"shared/{n}",
            "a",
            {"value": "v" * 1024 * 1024},
        )
        for n in range(1, 65)
    ]
    for change in changes:
        assert protos(change).revision == change.revision
        assert protos.held_bytes <= 4 * 1024 * 1024 + 64 * 1024
    assert protos(changes[-1]).revision == 64 and built.count(64) == 1  # kept: built once
    protos(changes[0])  # long dropped: built again
    assert built.count(1) == 2
