"""GetAgent latency while watchers replay a long change log, or follow a hot prefix.

Three runs on one server: GetAgent alone (idle), GetAgent while ``replayers`` WatchEvents
streams read the whole change log from revision 1 again and again, and GetAgent while
``fanout`` WatchStates streams follow a prefix that ``writers`` agents keep writing. The
watchers and writers run in a separate process, so the GetAgent caller measures the
server, not its own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from dataclasses import dataclass, replace

import grpc
from google.protobuf.duration_pb2 import Duration

from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from agentcoord.statesync.v1 import statesync_service_pb2 as pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as pb_grpc
from tests.bench import procs

PREFIX = "shared/hot/"
"""The prefix the fan-out watchers follow and the writers write."""
SEED_BATCH = 100
"""Keys per Transact while seeding the change log."""


@dataclass(frozen=True, slots=True)
class WatchSpec:
    """One watcher load."""

    mode: str
    """``idle``, ``replay`` or ``fanout``."""
    watchers: int = 0
    """Streams opened."""
    writers: int = 0
    """Agents writing the hot prefix (fan-out)."""


async def register(stub: discovery_grpc.DiscoveryServiceStub, agent_id: str) -> str:
    """Register ``agent_id`` with a long TTL; return its session token."""
    response = await stub.Register(
        discovery_pb.RegisterRequest(agent_id=agent_id, name=agent_id, ttl=Duration(seconds=300))
    )
    return response.session_token


async def seed(address: str, changes: int) -> None:
    """Append ``changes`` state changes to the log, ``SEED_BATCH`` per Transact."""
    async with grpc.aio.insecure_channel(address) as channel:
        token = await register(discovery_grpc.DiscoveryServiceStub(channel), "seeder")
        stub = pb_grpc.StateSyncServiceStub(channel)
        metadata = (("authorization", f"Bearer {token}"),)
        value = pb.PutStateRequest(key="x", binary=b"v" * 100)

        async def batch(first: int) -> None:
            operations = [
                pb.Operation(put=pb.PutOperation(key=f"shared/seed/{n}", binary=value.binary))
                for n in range(first, min(first + SEED_BATCH, changes))
            ]
            await stub.Transact(pb.TransactRequest(operations=operations), metadata=metadata)

        starts = list(range(0, changes, SEED_BATCH))
        for index in range(0, len(starts), 16):
            await asyncio.gather(*(batch(first) for first in starts[index : index + 16]))


def _raw_stream(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryStreamMultiCallable:
    """A server-streaming method whose responses arrive as bytes: the client never parses.

    So the load costs the client little and the server is what is measured.
    """
    return channel.unary_stream(
        f"/agentcoord.statesync.v1.StateSyncService/{method}",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=None,
    )


async def _replay(channel: grpc.aio.Channel, head: int, stop: asyncio.Event) -> int:
    """Read the log from revision 1 up to ``head``, again and again, until ``stop``.

    Returns:
        Revisions replayed, over all passes.
    """
    watch = _raw_stream(channel, "WatchEvents")
    replayed = 0
    while not stop.is_set():
        call = watch(pb.WatchEventsRequest(start_revision=1))
        reached = 0
        async for message in call:
            reached = pb.WatchEventsResponse.FromString(message).revision
            if reached >= head or stop.is_set():
                break
        call.cancel()
        replayed += reached
    return replayed


async def _follow(channel: grpc.aio.Channel, stop: asyncio.Event) -> int:
    """Follow the hot prefix until ``stop``; return the messages received."""
    call = _raw_stream(channel, "WatchStates")(pb.WatchStatesRequest(prefix=PREFIX))
    received = 0
    stream = aiter(call)
    with contextlib.suppress(TimeoutError, StopAsyncIteration):
        while not stop.is_set():
            async with asyncio.timeout(1.0):
                await anext(stream)
            received += 1
    call.cancel()
    return received


async def _write(address: str, index: int, stop: asyncio.Event) -> int:
    """Write the hot prefix as agent ``writer-<index>`` until ``stop``; return writes made."""
    async with grpc.aio.insecure_channel(address) as channel:
        token = await register(discovery_grpc.DiscoveryServiceStub(channel), f"writer-{index}")
        stub = pb_grpc.StateSyncServiceStub(channel)
        metadata = (("authorization", f"Bearer {token}"),)
        writes = 0
        while not stop.is_set():
            key = f"{PREFIX}{index}-{writes % 16}"
            await stub.PutState(pb.PutStateRequest(key=key, binary=b"w" * 100), metadata=metadata)
            writes += 1
        return writes


async def _load(address: str, spec: WatchSpec, seconds: float, head: int) -> dict[str, int]:
    """Run the watchers (and writers) of ``spec`` for ``seconds``; return what they did."""
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(address) as channel:
        if spec.mode == "replay":
            jobs = [_replay(channel, head, stop) for _ in range(spec.watchers)]
        else:
            jobs = [_follow(channel, stop) for _ in range(spec.watchers)]
            jobs += [_write(address, index, stop) for index in range(spec.writers)]
        tasks = [asyncio.ensure_future(job) for job in jobs]
        await asyncio.sleep(seconds)
        stop.set()
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    counts = [value for value in done if isinstance(value, int)]
    watcher_counts = counts[: spec.watchers]
    return {
        "watchers": len(watcher_counts),
        "watched": sum(watcher_counts),
        "writes": sum(counts[spec.watchers :]),
        "errors": sum(1 for value in done if isinstance(value, BaseException)),
    }


def _load_worker(address: str, spec: WatchSpec, seconds: float, head: int, conn: object) -> None:
    procs.serve_worker(lambda: _load(address, spec, seconds, head), conn)  # type: ignore[arg-type]


async def get_agent_latency(address: str, seconds: float, agent_id: str) -> list[float]:
    """Sequential GetAgent calls for ``seconds``; seconds per call."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = discovery_grpc.DiscoveryServiceStub(channel)
        request = discovery_pb.GetAgentRequest(agent_id=agent_id)
        for _ in range(20):
            await stub.GetAgent(request)
        samples = []
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            started = time.perf_counter()
            await stub.GetAgent(request)
            samples.append(time.perf_counter() - started)
        return samples


@dataclass
class WatchResult:
    """GetAgent latency during one load, and what the load did."""

    spec: WatchSpec
    latencies: list[float]
    done: dict[str, int]
    server_rss: int
    server_cpu: float = 0.0
    """Server CPU during the measurement, share of one core."""


def run(server: procs.Server, spec: WatchSpec, seconds: float, head: int) -> WatchResult:
    """Measure GetAgent for ``seconds`` while the load of ``spec`` runs."""
    if spec.mode == "idle":
        cpu, started = server.cpu_seconds(), time.monotonic()
        samples = asyncio.run(get_agent_latency(server.address, seconds, "seeder"))
        used = (server.cpu_seconds() - cpu) / (time.monotonic() - started)
        return WatchResult(spec, samples, {}, server.rss(), used)
    # Watchers and writers in separate processes: neither slows the other's loop.
    parts = [replace(spec, writers=0)]
    if spec.writers:
        parts.append(replace(spec, watchers=0))
    workers = []
    for part in parts:
        parent, child = multiprocessing.Pipe()
        worker = multiprocessing.get_context("spawn").Process(
            target=_load_worker, args=(server.address, part, seconds + 2.0, head, child)
        )
        worker.start()
        workers.append((worker, parent))
    try:
        time.sleep(2.0)  # watchers open, writers register
        cpu, started = server.cpu_seconds(), time.monotonic()
        samples = asyncio.run(get_agent_latency(server.address, seconds, "seeder"))
        used = (server.cpu_seconds() - cpu) / (time.monotonic() - started)
        rss = server.rss()
        done: dict[str, int] = {}
        for _, parent in workers:
            (_, part_done) = procs.receive(parent, seconds + 60, "watchers")
            for key, value in part_done.items():
                done[key] = done.get(key, 0) + value
    finally:
        for worker, _ in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
    return WatchResult(spec, samples, done, rss, used)


async def head_revision(address: str) -> int:
    """The store's current revision, from GetSummary."""
    async with grpc.aio.insecure_channel(address) as channel:
        summary = await discovery_grpc.DiscoveryServiceStub(channel).GetSummary(
            discovery_pb.GetSummaryRequest()
        )
        return int(summary.revision)
