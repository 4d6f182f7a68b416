"""DiscoveryService through real stubs against a real server, on both stores."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import duration_pb2

from agentcoord.discovery.v1 import discovery_service_pb2 as pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as pb_grpc
from tests.helpers import bearer, error_info, eventually, field_violations
from tests.server.conftest import StartServer

Stub = pb_grpc.DiscoveryServiceStub


def ttl(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


async def register(stub: Stub, agent_id: str, **fields: object) -> pb.RegisterResponse:
    fields.setdefault("name", f"agent {agent_id}")
    return await stub.Register(pb.RegisterRequest(agent_id=agent_id, **fields))  # type: ignore[arg-type]


class HeartbeatStream:
    """One open Heartbeat stream driven by the test."""

    def __init__(self, stub: Stub, agent_id: str, token: str) -> None:
        self.agent_id = agent_id
        self.call = stub.Heartbeat(metadata=bearer(token))

    async def beat(self, active: int = 0, **fields: object) -> pb.HeartbeatResponse:
        await self.call.write(
            pb.HeartbeatRequest(
                agent_id=self.agent_id,
                load=pb.Load(active_subtasks=active),
                **fields,  # type: ignore[arg-type]
            )
        )
        response = await self.call.read()
        assert response is not grpc.aio.EOF
        return response

    async def ended(self) -> None:
        """Check that the server tells the stream unasked (``COMMAND_REREGISTER``) and
        answers its next heartbeat so too, closing it."""
        response = await self.call.read()
        assert response is not grpc.aio.EOF
        assert response.command == pb.HeartbeatResponse.COMMAND_REREGISTER
        assert (await self.beat()).command == pb.HeartbeatResponse.COMMAND_REREGISTER
        assert await self.call.read() is grpc.aio.EOF
        assert await self.call.code() == grpc.StatusCode.OK

    def close(self) -> None:
        self.call.cancel()


async def state_of(stub: Stub, agent_id: str) -> int:
    return (await stub.GetAgent(pb.GetAgentRequest(agent_id=agent_id))).agent.state


async def test_register_returns_session_and_agent_is_live(discovery: Stub) -> None:
    response = await register(
        discovery,
        "coder-1",
        role="worker",
        capabilities=["python", "review", "python"],
        capacity=3,
        labels={"zone": "a"},
        skills=[pb.Skill(id="lint", name="Lint", tags=["python"])],
        ttl=ttl(5),
    )
    assert response.session_token and response.epoch == 1
    assert response.ttl.ToTimedelta().total_seconds() == 5
    assert response.heartbeat_interval.ToTimedelta().total_seconds() == pytest.approx(5 / 3)
    agent = (await discovery.GetAgent(pb.GetAgentRequest(agent_id="coder-1"))).agent
    assert agent.state == pb.Agent.STATE_LIVE
    assert list(agent.capabilities) == ["python", "review"]
    assert agent.capacity == 3 and agent.labels["zone"] == "a" and agent.skills[0].id == "lint"
    assert 0 < agent.ttl_remaining.ToTimedelta().total_seconds() <= 5


async def test_register_without_id_generates_one(discovery: Stub) -> None:
    first = await discovery.Register(pb.RegisterRequest(name="anon"))
    second = await discovery.Register(pb.RegisterRequest(name="anon"))
    assert first.agent.agent_id and first.agent.agent_id != second.agent.agent_id


async def test_heartbeat_renews_liveness_and_reports_load(discovery: Stub) -> None:
    registered = await register(discovery, "w1", capacity=4, ttl=ttl(0.6))
    stream = HeartbeatStream(discovery, "w1", registered.session_token)
    try:
        for _ in range(6):  # 1.2 s of heartbeats: twice the TTL
            ack = await stream.beat(active=2, status=pb.Agent.STATUS_BUSY)
            assert ack.command == pb.HeartbeatResponse.COMMAND_UNSPECIFIED
            assert ack.epoch == 1
            assert 0 < ack.ttl_remaining.ToTimedelta().total_seconds() <= 0.6
            await asyncio.sleep(0.2)
        agent = (await discovery.GetAgent(pb.GetAgentRequest(agent_id="w1"))).agent
        assert agent.state == pb.Agent.STATE_LIVE
        assert agent.load.active_subtasks == 2
        assert agent.status == pb.Agent.STATUS_BUSY
    finally:
        stream.close()


async def test_silent_agent_expires_within_ttl(discovery: Stub) -> None:
    registered = await register(discovery, "quiet", ttl=ttl(0.5))
    stream = HeartbeatStream(discovery, "quiet", registered.session_token)
    await stream.beat()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await eventually(lambda: _is_state(discovery, "quiet", pb.Agent.STATE_EXPIRED), timeout=3)
    assert loop.time() - started <= 0.5 + 1.0
    # The session is over: its open stream says re-register at once, unasked, and ends.
    await stream.ended()


async def test_closed_stream_alone_is_not_death(discovery: Stub) -> None:
    registered = await register(discovery, "flaky", ttl=ttl(1.0))
    stream = HeartbeatStream(discovery, "flaky", registered.session_token)
    await stream.beat()
    stream.close()
    await asyncio.sleep(0.5)  # half the TTL without a stream
    assert await state_of(discovery, "flaky") == pb.Agent.STATE_LIVE
    reopened = HeartbeatStream(discovery, "flaky", registered.session_token)
    ack = await reopened.beat()
    assert ack.command == pb.HeartbeatResponse.COMMAND_UNSPECIFIED and ack.epoch == 1
    reopened.close()
    await eventually(lambda: _is_state(discovery, "flaky", pb.Agent.STATE_EXPIRED), timeout=3)


async def _is_state(stub: Stub, agent_id: str, state: int) -> bool:
    return await state_of(stub, agent_id) == state


async def test_an_admin_reregistration_ends_the_old_session(start_server: StartServer) -> None:
    app = await start_server(admin_token="admin-secret")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        discovery = Stub(channel)
        old = await register(discovery, "dup", ttl=ttl(5))
        old_stream = HeartbeatStream(discovery, "dup", old.session_token)
        await old_stream.beat()
        with pytest.raises(grpc.aio.AioRpcError) as live:
            await register(discovery, "dup", ttl=ttl(5))  # without a token: the session is live
        assert live.value.code() == grpc.StatusCode.ALREADY_EXISTS
        new = await discovery.Register(
            pb.RegisterRequest(agent_id="dup", name="dup", ttl=ttl(5)),
            metadata=bearer("admin-secret"),
        )
        assert new.epoch == old.epoch + 1
        await old_stream.ended()  # at once, not at its next heartbeat
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await discovery.Deregister(
                pb.DeregisterRequest(agent_id="dup"), metadata=bearer(old.session_token)
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        new_stream = HeartbeatStream(discovery, "dup", new.session_token)
        assert (await new_stream.beat()).epoch == new.epoch
        new_stream.close()


async def test_deregister_marks_agent_left(discovery: Stub) -> None:
    registered = await register(discovery, "leaver")
    response = await discovery.Deregister(
        pb.DeregisterRequest(agent_id="leaver"), metadata=bearer(registered.session_token)
    )
    assert response.agent.state == pb.Agent.STATE_LEFT
    listed = await discovery.ListAgents(pb.ListAgentsRequest())
    assert "leaver" not in [agent.agent_id for agent in listed.agents]
    left = await discovery.ListAgents(pb.ListAgentsRequest(states=[pb.Agent.STATE_LEFT]))
    assert [agent.agent_id for agent in left.agents] == ["leaver"]


async def test_list_filters_by_capabilities_role_and_state(discovery: Stub) -> None:
    await register(discovery, "a", role="worker", capabilities=["python", "gpu"])
    await register(discovery, "b", role="worker", capabilities=["python"])
    await register(discovery, "c", role="planner", capabilities=["python", "gpu"])
    gone = await register(discovery, "d", role="worker", capabilities=["python", "gpu"])
    await discovery.Deregister(pb.DeregisterRequest(), metadata=bearer(gone.session_token))

    async def ids(**fields: object) -> list[str]:
        response = await discovery.ListAgents(pb.ListAgentsRequest(**fields))  # type: ignore[arg-type]
        return [agent.agent_id for agent in response.agents]

    assert await ids() == ["a", "b", "c"]
    assert await ids(capabilities=["gpu", "python"]) == ["a", "c"]
    assert await ids(capabilities=["gpu"], role="worker") == ["a"]
    assert await ids(role="worker", states=[pb.Agent.STATE_LIVE, pb.Agent.STATE_LEFT]) == [
        "a",
        "b",
        "d",
    ]
    assert await ids(capabilities=["rust"]) == []


async def test_pagination_is_stable_and_complete(discovery: Stub) -> None:
    names = [f"agent-{index:03d}" for index in range(25)]
    for name in reversed(names):
        await register(discovery, name, capabilities=["x"])
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await discovery.ListAgents(
            pb.ListAgentsRequest(page_size=10, page_token=token, capabilities=["x"])
        )
        seen.extend(agent.agent_id for agent in page.agents)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == names and pages == 3
    with pytest.raises(grpc.aio.AioRpcError) as mismatch:
        first = await discovery.ListAgents(pb.ListAgentsRequest(page_size=10))
        await discovery.ListAgents(
            pb.ListAgentsRequest(page_token=first.next_page_token, role="other")
        )
    assert mismatch.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(mismatch.value) == ["page_token"]


async def test_summary_counts_live_agents(discovery: Stub) -> None:
    empty = await discovery.GetSummary(pb.GetSummaryRequest())
    assert empty.live_agents == 0 and not empty.can_coordinate
    await register(discovery, "p", role="planner", capabilities=["plan"], capacity=1)
    one = await discovery.GetSummary(pb.GetSummaryRequest())
    assert one.live_agents == 1 and not one.can_coordinate
    await register(discovery, "w", role="worker", capabilities=["python", "plan"], capacity=4)
    summary = await discovery.GetSummary(pb.GetSummaryRequest())
    assert summary.live_agents == 2 and summary.can_coordinate
    assert dict(summary.live_agents_by_role) == {"planner": 1, "worker": 1}
    assert dict(summary.live_agents_by_capability) == {"plan": 2, "python": 1}
    assert summary.total_capacity == 5
    assert summary.revision > 0


async def _collect(call: AsyncIterator[pb.WatchAgentsResponse], count: int) -> list[pb.AgentEvent]:
    events: list[pb.AgentEvent] = []
    async for response in call:
        events.extend(response.events)
        if len(events) >= count:
            break
    return events


async def test_watch_streams_events_and_resumes_without_gaps(discovery: Stub) -> None:
    watch = discovery.WatchAgents(pb.WatchAgentsRequest())
    await asyncio.sleep(0.2)  # let the watch subscribe before the changes
    first = await register(discovery, "w1", capabilities=["python"])
    await discovery.Deregister(pb.DeregisterRequest(), metadata=bearer(first.session_token))
    live = await asyncio.wait_for(_collect(watch, 2), 5)
    watch.cancel()
    assert [(e.kind, e.agent.agent_id) for e in live] == [
        (pb.AgentEvent.KIND_JOINED, "w1"),
        (pb.AgentEvent.KIND_LEFT, "w1"),
    ]
    assert live[0].revision < live[1].revision
    # Changes made while nobody watched are replayed from the last revision seen.
    await register(discovery, "w2", capabilities=["python"])
    await register(discovery, "w3", capabilities=["go"])
    await register(discovery, "w4", capabilities=["python"])
    resumed = discovery.WatchAgents(
        pb.WatchAgentsRequest(start_revision=live[-1].revision, capabilities=["python"])
    )
    replayed = await asyncio.wait_for(_collect(resumed, 2), 5)
    resumed.cancel()
    assert [e.agent.agent_id for e in replayed] == ["w2", "w4"]
    revisions = [e.revision for e in replayed]
    assert revisions == sorted(set(revisions)) and revisions[0] > live[-1].revision


async def test_watch_reports_expiry(discovery: Stub) -> None:
    watch = discovery.WatchAgents(pb.WatchAgentsRequest(start_revision=0))
    await asyncio.sleep(0.2)
    await register(discovery, "short", ttl=ttl(0.3))
    events = await asyncio.wait_for(_collect(watch, 2), 5)
    watch.cancel()
    assert [e.kind for e in events] == [pb.AgentEvent.KIND_JOINED, pb.AgentEvent.KIND_EXPIRED]
    assert events[1].agent.state == pb.Agent.STATE_EXPIRED


async def test_unknown_agent_is_not_found(discovery: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await discovery.GetAgent(pb.GetAgentRequest(agent_id="ghost"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(missing.value).reason == "AGENT_NOT_FOUND"
    assert error_info(missing.value).domain == "agentcoord"


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x", "agent_id": "has space"}, "agent_id"),
        ({"name": "x", "role": "Upper"}, "role"),
        ({"name": "x", "capabilities": ["ok", "BAD!"]}, "capabilities[1]"),
        ({"name": "x", "capacity": -1}, "capacity"),
        ({"name": "x", "capacity": 5000}, "capacity"),
        ({"name": "x", "labels": {"bad key": "v"}}, "labels"),
        ({"name": "x", "skills": [pb.Skill(id="", name="n")]}, "skills[0].id"),
        ({"name": "x", "skills": [pb.Skill(id="a", name="n")] * 2}, "skills[1].id"),
        ({"name": "x", "ttl": duration_pb2.Duration(seconds=-1)}, "ttl"),
        ({"name": "x" * 257}, "name"),
        ({"name": "x", "capabilities": [f"c{i}" for i in range(65)]}, "capabilities"),
    ],
)
async def test_register_validation_names_the_field(
    discovery: Stub, request_fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await discovery.Register(pb.RegisterRequest(**request_fields))  # type: ignore[arg-type]
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(invalid.value) == [field]
    assert field in (invalid.value.details() or "")


async def test_query_validation(discovery: Stub) -> None:
    for request, field in [
        (pb.ListAgentsRequest(page_size=-1), "page_size"),
        (pb.ListAgentsRequest(page_token="not-a-token"), "page_token"),
        (pb.ListAgentsRequest(states=[pb.Agent.STATE_UNSPECIFIED]), "states[0]"),
        (pb.ListAgentsRequest(role="NO"), "role"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await discovery.ListAgents(request)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(invalid.value) == [field]
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await discovery.GetAgent(pb.GetAgentRequest())
    assert field_violations(invalid.value) == ["agent_id"]


async def test_heartbeat_needs_a_valid_session(discovery: Stub) -> None:
    for metadata, code in [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        (bearer("forged"), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Basic abc"),), grpc.StatusCode.UNAUTHENTICATED),
    ]:
        call = discovery.Heartbeat(metadata=metadata)
        # The server refuses on the metadata alone, before any message. Writing first would
        # race that refusal: a write that loses it fails on the client's side, and grpc then
        # gives the call INTERNAL. So the refusal is awaited first, then a write must fail.
        with contextlib.suppress(grpc.aio.AioRpcError):
            async with asyncio.timeout(5):
                answer = await call.read()
            pytest.fail(f"answered without a valid session: {answer}")
        assert await call.code() == code
        with pytest.raises((grpc.aio.AioRpcError, asyncio.InvalidStateError)):
            await call.write(pb.HeartbeatRequest(agent_id="x"))


async def test_agent_cannot_act_as_another(discovery: Stub) -> None:
    mine = await register(discovery, "me")
    await register(discovery, "you")
    call = discovery.Heartbeat(metadata=bearer(mine.session_token))
    await call.write(pb.HeartbeatRequest(agent_id="you"))
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await call.read()
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await discovery.Deregister(
            pb.DeregisterRequest(agent_id="you"), metadata=bearer(mine.session_token)
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await state_of(discovery, "you") == pb.Agent.STATE_LIVE


async def test_heartbeat_load_is_validated(discovery: Stub) -> None:
    registered = await register(discovery, "v")
    call = discovery.Heartbeat(metadata=bearer(registered.session_token))
    await call.write(pb.HeartbeatRequest(agent_id="v", load=pb.Load(active_subtasks=-3)))
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await call.read()
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(invalid.value) == ["load.active_subtasks"]


async def test_many_agents_heartbeat_at_once(discovery: Stub) -> None:
    count = 500
    registrations = await asyncio.gather(
        *(register(discovery, f"bulk-{index:04d}", ttl=ttl(5)) for index in range(count))
    )
    streams = [HeartbeatStream(discovery, r.agent.agent_id, r.session_token) for r in registrations]
    try:
        for round_ in range(3):
            acks = await asyncio.gather(*(stream.beat(active=round_) for stream in streams))
            assert all(a.command == pb.HeartbeatResponse.COMMAND_UNSPECIFIED for a in acks)
        summary = await discovery.GetSummary(pb.GetSummaryRequest())
        assert summary.live_agents == count
        assert summary.active_subtasks == 2 * count
    finally:
        for stream in streams:
            stream.close()


async def test_health_and_reflection_are_served(channel: grpc.aio.Channel) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    for service in ["", "agentcoord.discovery.v1.DiscoveryService"]:
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = reflection.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    answer = await call.read()
    await call.done_writing()
    names = {service.name for service in answer.list_services_response.service}
    assert {
        "agentcoord.discovery.v1.DiscoveryService",
        "agentcoord.distribution.v1.DistributionService",
        "agentcoord.statesync.v1.StateSyncService",
        "grpc.health.v1.Health",
    } <= names


async def test_restart_keeps_sessions_of_agents_that_reconnect(start_server) -> None:  # type: ignore[no-untyped-def]
    first = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
        stub = Stub(channel)
        registered = await register(stub, "survivor", ttl=ttl(2))
        stream = HeartbeatStream(stub, "survivor", registered.session_token)
        await stream.beat(active=1)
        await first.stop(0.1)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stream.call.read()
    second = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel:
        stub = Stub(channel)
        agent = (await stub.GetAgent(pb.GetAgentRequest(agent_id="survivor"))).agent
        assert agent.state == pb.Agent.STATE_LIVE and agent.epoch == registered.epoch
        stream = HeartbeatStream(stub, "survivor", registered.session_token)
        for _ in range(5):  # well past the TTL measured from before the restart
            ack = await stream.beat()
            assert ack.command == pb.HeartbeatResponse.COMMAND_UNSPECIFIED
            await asyncio.sleep(0.5)
        assert await state_of(stub, "survivor") == pb.Agent.STATE_LIVE
        stream.close()


async def test_graceful_shutdown_ends_streams_with_unavailable(start_server) -> None:  # type: ignore[no-untyped-def]
    app = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = Stub(channel)
        registered = await register(stub, "s", ttl=ttl(5))
        stream = HeartbeatStream(stub, "s", registered.session_token)
        await stream.beat()
        watch = stub.WatchAgents(pb.WatchAgentsRequest())
        stopping = asyncio.create_task(app.stop(5))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await stream.call.read()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for _ in watch:
                pass
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.wait_for(stopping, 5)  # streams ended, so no need to wait for the grace
