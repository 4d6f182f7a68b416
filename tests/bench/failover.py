"""Fail-over times of replicas on one PostgreSQL schema: agents moving, and the sweep moving.

- Agent fail-over: SDK agents (:class:`agentcoord.client.Agent`, given every replica's
  address, the victim first) heartbeat one replica; it is killed with SIGKILL. A sample is
  the time from the kill to the first heartbeat another replica received from that agent
  (its ``last_heartbeat_time``, polled through ListAgents on every survivor, is after the
  kill); the reply follows at once. One TTL later every agent must still run its first
  session: one registration, the same epoch, LIVE as a survivor sees it.
- Leader take-over: an idle agent (it never heartbeats) registers through a survivor, then
  the sweeping leader (its ``agentcoord_replica_leader`` gauge on ``/metrics`` reads 1) is
  killed with SIGKILL. Measured: kill -> a survivor's gauge reads 1, and the idle agent's
  registration -> its EXPIRED event on a survivor's WatchAgents stream, against its TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from agentcoord.client import Agent, WorkItem
from agentcoord.discovery.v1 import discovery_service_pb2 as pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as pb_grpc

POLL = 0.01
"""Seconds between two looks at the survivors (ListAgents, /metrics)."""
_METRICS_URL = re.compile(r"dashboard and metrics at (\S+)")
_LEADER = re.compile(r"^agentcoord_replica_leader (\S+)$", re.MULTILINE)


def metrics_url(log: Path) -> str:
    """The ``/metrics`` URL a replica started with ``--http-listen`` logged at start."""
    match = _METRICS_URL.search(log.read_text(errors="replace"))
    if match is None:
        raise RuntimeError(f"{log} names no HTTP listener (started without --http-listen?)")
    return f"{match.group(1)}metrics"


async def leads(http: httpx.AsyncClient, url: str) -> bool:
    """Whether the replica whose ``/metrics`` is at ``url`` sweeps; False if it is gone."""
    try:
        answer = await http.get(url, timeout=2.0)
    except httpx.HTTPError:
        return False
    match = _LEADER.search(answer.text)
    return match is not None and float(match.group(1)) == 1


async def the_leader(urls: Sequence[str], timeout: float = 15.0) -> int:
    """Wait until exactly one of the replicas at ``urls`` leads; return its index.

    Raises:
        TimeoutError: none, or more than one, led for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            leading = [i for i, url in enumerate(urls) if await leads(http, url)]
            if len(leading) == 1:
                return leading[0]
            await asyncio.sleep(POLL)
    raise TimeoutError(f"no single leader among {len(urls)} replicas within {timeout:g} s")


@dataclass
class AgentFailover:
    """How SDK agents moved off a killed replica."""

    agents: int
    ttl: float
    delays: dict[str, float] = field(default_factory=dict)
    """Agent id -> seconds from the kill to its first heartbeat received by a survivor."""
    moved_to: Counter[str] = field(default_factory=Counter)
    """Survivor address -> agents whose first heartbeat after the kill it received."""
    kept: int = 0
    """Agents still in their first session one TTL after moving (same epoch, LIVE)."""


async def _idle(item: WorkItem) -> None:
    """The agents' handler: they get no work."""


async def _close(agent: Agent) -> None:
    """Drain and deregister ``agent`` within a bound, whatever the replicas do."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(agent.close(), 15)


def _seconds(timestamp: Timestamp) -> float:
    return timestamp.seconds + timestamp.nanos / 1e9


async def _first_heartbeats(
    survivors: Sequence[str], ids: set[str], after: float, timeout: float
) -> dict[str, tuple[float, str]]:
    """Agent id -> (wall time, survivor) of the first heartbeat after ``after`` a survivor shows.

    The survivor that holds the agent's new stream shows the heartbeat at once, from its
    memory; the others only after its next flush, so the first to show it is the holder.
    """
    first: dict[str, tuple[float, str]] = {}
    deadline = time.monotonic() + timeout
    channels = [grpc.aio.insecure_channel(address) for address in survivors]
    try:
        stubs = [pb_grpc.DiscoveryServiceStub(channel) for channel in channels]
        while len(first) < len(ids) and time.monotonic() < deadline:
            for address, stub in zip(survivors, stubs, strict=True):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    listed = await stub.ListAgents(pb.ListAgentsRequest(page_size=1000), timeout=2)
                    for agent in listed.agents:
                        beat = _seconds(agent.last_heartbeat_time)
                        if agent.agent_id in ids and beat > after:
                            first.setdefault(agent.agent_id, (beat, address))
            await asyncio.sleep(POLL)
    finally:
        for channel in channels:
            await channel.close(None)
    return first


async def _wait_heartbeating(address: str, ids: set[str], timeout: float = 15.0) -> None:
    """Wait until ``address`` has a heartbeat from every agent of ``ids``."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.DiscoveryServiceStub(channel)
        while time.monotonic() < deadline:
            listed = await stub.ListAgents(pb.ListAgentsRequest(page_size=1000))
            if ids <= {a.agent_id for a in listed.agents if a.HasField("last_heartbeat_time")}:
                return
            await asyncio.sleep(0.05)
    raise TimeoutError(f"the agents did not all heartbeat {address} within {timeout:g} s")


async def _sessions_kept(address: str, agents: Sequence[Agent], epochs: dict[str, int]) -> int:
    """How many of ``agents`` still run their first session, live as ``address`` sees them."""
    kept = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.DiscoveryServiceStub(channel)
        for agent in agents:
            seen = (await stub.GetAgent(pb.GetAgentRequest(agent_id=agent.agent_id))).agent
            kept += (
                agent.stats.registrations == 1
                and agent.epoch == epochs[agent.agent_id] == seen.epoch
                and seen.state == pb.Agent.STATE_LIVE
            )
    return kept


async def measure_agent_failover(
    victim: str, survivors: Sequence[str], kill: Callable[[], None], agents: int, ttl: float
) -> AgentFailover:
    """Start ``agents`` SDK agents on ``victim``, ``kill()`` it, time their moves to ``survivors``.

    Half the agents list the survivors in one order, half in the other, so both get some.
    They start one after another over one heartbeat interval (TTL/3), so their heartbeats
    fall at phases spread over it, as a fleet's do.
    """
    result = AgentFailover(agents, ttl)
    orders = [[victim, *survivors], [victim, *reversed(survivors)]]
    fleet = [
        Agent(orders[n % 2], name=f"failover-{n}", agent_id=f"failover-{n}", handler=_idle, ttl=ttl)
        for n in range(agents)
    ]
    ids = {agent.agent_id for agent in fleet}
    entered: list[Agent] = []
    try:
        for agent in fleet:  # spread over one heartbeat interval, as agents' phases are
            await agent.__aenter__()
            entered.append(agent)
            await asyncio.sleep(ttl / 3 / agents)
        epochs = {agent.agent_id: agent.epoch for agent in fleet}
        await _wait_heartbeating(victim, ids)
        killed = time.time()
        kill()
        first = await _first_heartbeats(survivors, ids, killed, timeout=3 * ttl)
        for agent_id, (beat, address) in first.items():
            result.delays[agent_id] = beat - killed
            result.moved_to[address] += 1
        await asyncio.sleep(ttl + 1.0)  # past their TTL: an agent that did not move is expired
        result.kept = await _sessions_kept(survivors[0], fleet, epochs)
    finally:
        await asyncio.gather(*(_close(agent) for agent in entered))
    return result


@dataclass
class TakeOver:
    """One kill of the sweeping leader."""

    ttl: float
    """The idle agent's TTL."""
    takeover: float
    """Seconds from the kill to a survivor's gauge reading 1."""
    expiry: float
    """Seconds from the idle agent's registration (answered) to its EXPIRED event; NaN if none."""
    expiries: int
    """EXPIRED events of the idle agent seen on the survivor's WatchAgents (1 expected)."""


def _ttl(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


async def measure_takeover(
    survivors: Sequence[str],
    survivor_metrics: Sequence[str],
    kill: Callable[[], None],
    agent_id: str,
    ttl: float,
) -> TakeOver:
    """Register an idle agent through ``survivors[0]``, ``kill()`` the leader, time both.

    ``survivor_metrics`` are the survivors' ``/metrics`` URLs, in the same order.
    """
    expired: list[float] = []
    async with (
        grpc.aio.insecure_channel(survivors[0]) as channel,
        httpx.AsyncClient() as http,
    ):
        stub = pb_grpc.DiscoveryServiceStub(channel)
        watch = stub.WatchAgents(pb.WatchAgentsRequest())
        await anext(aiter(watch))  # registered: events from now on

        async def follow() -> None:
            async for message in watch:
                now = time.monotonic()
                for event in message.events:
                    if (
                        event.kind == pb.AgentEvent.KIND_EXPIRED
                        and event.agent.agent_id == agent_id
                    ):
                        expired.append(now)

        follower = asyncio.create_task(follow())
        try:
            await stub.Register(pb.RegisterRequest(agent_id=agent_id, name=agent_id, ttl=_ttl(ttl)))
            registered = time.monotonic()
            kill()
            killed = time.monotonic()
            takeover = float("nan")
            deadline = killed + 15.0
            while time.monotonic() < deadline:
                if any([await leads(http, url) for url in survivor_metrics]):
                    takeover = time.monotonic() - killed
                    break
                await asyncio.sleep(POLL)
            deadline = registered + ttl + 15.0
            while not expired and time.monotonic() < deadline:
                await asyncio.sleep(POLL)
            await asyncio.sleep(1.5)  # more sweeps: none may record a second expiry
        finally:
            watch.cancel()
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await follower
    expiry = expired[0] - registered if expired else float("nan")
    return TakeOver(ttl, takeover, expiry, len(expired))
