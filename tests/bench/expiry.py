"""Expiry detection: agents heartbeat, then die; a WatchAgents stream times the EXPIRED events."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass

import grpc
from google.protobuf.duration_pb2 import Duration

from agentcoord.discovery.v1 import discovery_service_pb2 as pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as pb_grpc


@dataclass
class ExpiryResult:
    """Delays from each agent's last heartbeat to its EXPIRED event, seconds."""

    ttl: float
    """TTL granted to the agents."""
    delays: list[float]
    """One per agent whose EXPIRED event arrived."""
    missing: int
    """Agents whose EXPIRED event never arrived."""


async def _agent(address: str, response: pb.RegisterResponse, lives_for: float) -> float:
    """Heartbeat on a connection of its own for ``lives_for`` s, then die.

    Returns:
        When the last heartbeat was sent (``time.monotonic()``).
    """
    interval = response.heartbeat_interval.ToTimedelta().total_seconds()
    request = pb.HeartbeatRequest(agent_id=response.agent.agent_id)
    metadata = (("authorization", f"Bearer {response.session_token}"),)
    channel = grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    call = pb_grpc.DiscoveryServiceStub(channel).Heartbeat(metadata=metadata)
    dies_at = time.monotonic() + lives_for
    last = time.monotonic()
    try:
        while True:
            last = time.monotonic()
            await call.write(request)
            await call.read()
            if time.monotonic() + interval > dies_at:
                return last
            await asyncio.sleep(interval)
    finally:
        call.cancel()  # the agent dies: its stream and its connection go away
        await channel.close(None)


async def measure_expiry(address: str, agents: int, ttl: float) -> ExpiryResult:
    """Register ``agents`` with ``ttl``, kill them at random times, time their expiry."""
    ids = [f"expiry-{i}" for i in range(agents)]
    expired: dict[str, float] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.DiscoveryServiceStub(channel)
        watch = stub.WatchAgents(pb.WatchAgentsRequest())

        async def follow() -> None:
            async for message in watch:
                now = time.monotonic()
                for event in message.events:
                    if event.kind == pb.AgentEvent.KIND_EXPIRED:
                        expired.setdefault(event.agent.agent_id, now)

        follower = asyncio.create_task(follow())
        try:
            await asyncio.sleep(0.2)  # let the watch start before anything happens
            duration = Duration()
            duration.FromNanoseconds(round(ttl * 1e9))
            registrations = [
                await stub.Register(pb.RegisterRequest(agent_id=i, name=i, ttl=duration))
                for i in ids
            ]
            granted = registrations[0].ttl.ToTimedelta().total_seconds()
            last_beats = await asyncio.gather(
                *(_agent(address, r, random.uniform(1.0, 2.5)) for r in registrations)
            )
            deadline = max(last_beats) + granted + 5.0
            while len(expired) < agents and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await follower
    delays = [expired[i] - last for i, last in zip(ids, last_beats, strict=True) if i in expired]
    return ExpiryResult(granted, delays, agents - len(delays))
