"""Sequential unary latency, Discovery calls interleaved with echo calls in rounds."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Mapping

import grpc
from google.protobuf.duration_pb2 import Duration

from agentcoord.discovery.v1 import discovery_service_pb2 as pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as pb_grpc
from tests.bench import echo

Call = Callable[[], Awaitable[object]]
ROUNDS = 10
"""Each workload runs in this many chunks, interleaved, so drift hits all alike."""


async def interleaved(
    calls: Mapping[str, Call], count: int, warmup: int, time_limit: float = 60.0
) -> dict[str, list[float]]:
    """Time ``count`` sequential calls of each workload, in interleaved rounds.

    Stops early once ``time_limit`` s have passed (an overloaded server answers slowly),
    the warm-up calls included.

    Returns:
        Seconds per call, by workload name.
    """
    ends = time.monotonic() + time_limit
    for call in calls.values():
        for _ in range(warmup):
            if time.monotonic() > ends:
                break
            await call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    chunk = max(1, count // ROUNDS)
    for _ in range(ROUNDS):
        for name, call in calls.items():
            out = samples[name]
            for _ in range(chunk):
                if time.monotonic() > ends:
                    break
                started = time.perf_counter()
                await call()
                out.append(time.perf_counter() - started)
    return samples


def echo_call(channel: grpc.aio.Channel, payload: bytes) -> Call:
    """A unary echo of ``payload`` (raw bytes, no protobuf)."""
    method = channel.unary_unary(echo.UNARY)

    async def call() -> object:
        return await method(payload)

    return call


def register_call(stub: pb_grpc.DiscoveryServiceStub, prefix: str, registered: list[str]) -> Call:
    """Register a new agent ``{prefix}-N`` per call, its id appended to ``registered``.

    A long TTL keeps these agents from expiring (and writing) mid-measurement; they have no
    ``gpu`` capability, so ListAgents gpu pages stay the same.
    """

    async def register() -> object:
        agent_id = f"{prefix}-{len(registered)}"
        registered.append(agent_id)
        return await stub.Register(
            pb.RegisterRequest(
                agent_id=agent_id,
                name=agent_id,
                role="worker",
                capabilities=["python", "review"],
                ttl=Duration(seconds=300),
            )
        )

    return register


async def measure_unary(
    discovery_address: str, echo_address: str, count: int, warmup: int
) -> dict[str, list[float]]:
    """Register, GetAgent and echo, one sequential caller each, on an otherwise idle server."""
    async with (
        grpc.aio.insecure_channel(discovery_address) as discovery_channel,
        grpc.aio.insecure_channel(echo_address) as echo_channel,
    ):
        stub = pb_grpc.DiscoveryServiceStub(discovery_channel)
        registered: list[str] = []
        pick = random.Random(1)
        register = register_call(stub, "unary", registered)

        async def get_agent() -> object:
            return await stub.GetAgent(pb.GetAgentRequest(agent_id=pick.choice(registered)))

        payload = pb.GetAgentRequest(agent_id="unary-0").SerializeToString()
        calls = {
            "echo": echo_call(echo_channel, payload),
            "Register": register,
            "GetAgent": get_agent,
        }
        return await interleaved(calls, count, warmup)


async def measure_under_load(
    discovery_address: str, echo_address: str, count: int, warmup: int
) -> tuple[dict[str, list[float]], int]:
    """ListAgents filtered by capability ``gpu`` (one page), Register and GetAgent, beside echo.

    Meant to run while a heartbeat load holds the server (see :func:`register_call` for the
    agents it registers); GetAgent asks for agents of the load (``hb-N``).

    Returns:
        Seconds per call by workload, and how many agents one ListAgents page returned.
    """
    async with (
        grpc.aio.insecure_channel(discovery_address) as discovery_channel,
        grpc.aio.insecure_channel(echo_address) as echo_channel,
    ):
        stub = pb_grpc.DiscoveryServiceStub(discovery_channel)
        request = pb.ListAgentsRequest(capabilities=["gpu"])
        page = await stub.ListAgents(request)
        loaded = [agent.agent_id for agent in page.agents] or ["hb-0"]
        pick = random.Random(1)
        register = register_call(stub, "during", [])

        async def list_agents() -> object:
            return await stub.ListAgents(request)

        async def get_agent() -> object:
            return await stub.GetAgent(pb.GetAgentRequest(agent_id=pick.choice(loaded)))

        calls = {
            "echo": echo_call(echo_channel, request.SerializeToString()),
            "ListAgents": list_agents,
            "Register": register,
            "GetAgent": get_agent,
        }
        return await interleaved(calls, count, warmup), len(page.agents)
