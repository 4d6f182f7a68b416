"""Heartbeat load: many agents each holding one bidirectional stream, from several processes.

Each worker process registers its share of agents (Discovery) and opens one stream per
agent over its share of connections, all at once (the burst a fleet makes when a server
starts). A failed open is retried with jittered exponential back-off, as a real agent
would. Each agent then sends one message per heartbeat interval (the interval Register
returns; TTL/3 for echo), at a random phase, and waits for the reply. Only acks received
inside the measurement window are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import random
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc
import psutil
from google.protobuf.duration_pb2 import Duration

from agentcoord.discovery.v1 import discovery_service_pb2 as pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as pb_grpc
from tests.bench import echo
from tests.bench.procs import Server

HEARTBEAT = "/agentcoord.discovery.v1.DiscoveryService/Heartbeat"
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL}
REGISTER_IN_FLIGHT = 32
"""Concurrent Register calls per worker."""
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
"""Without this, channels of one process to one address share one TCP connection."""


@dataclass(frozen=True)
class LoadSpec:
    """One heartbeat load."""

    mode: str
    """``discovery`` or ``echo``."""
    agents: int
    """Agents, one stream each."""
    channels: int
    """Client connections in total, split over the workers."""
    workers: int
    """Client processes."""
    ttl: float
    """TTL agents register with; echo agents send every TTL/3."""
    open_timeout: float = 60.0
    """An agent gives up opening its stream after this many seconds."""

    @property
    def label(self) -> str:
        """E.g. ``1,000 agents, 16 conns``."""
        conns = "1 conn/agent" if self.channels >= self.agents else f"{self.channels} conns"
        return f"{self.agents:,} agents, {conns}"


@dataclass
class LoadStats:
    """What the workers saw, summed over them."""

    registered: int = 0
    register_seconds: float = 0.0
    opened: int = 0
    open_seconds: float = 0.0
    open_failures: Counter[str] = field(default_factory=Counter)
    open_retries: int = 0
    gave_up: int = 0
    breaks: Counter[str] = field(default_factory=Counter)
    reregistered: int = 0
    interval: float = 0.0
    acks: int = 0
    latencies: list[float] = field(default_factory=list)

    def merge(self, other: LoadStats) -> None:
        """Add another worker's figures (times are maxima: workers run in parallel)."""
        self.registered += other.registered
        self.register_seconds = max(self.register_seconds, other.register_seconds)
        self.opened += other.opened
        self.open_seconds = max(self.open_seconds, other.open_seconds)
        self.open_failures += other.open_failures
        self.open_retries += other.open_retries
        self.gave_up += other.gave_up
        self.breaks += other.breaks
        self.reregistered += other.reregistered
        self.interval = max(self.interval, other.interval)
        self.acks += other.acks
        self.latencies += other.latencies


@dataclass
class LoadResult:
    """A heartbeat load's figures."""

    spec: LoadSpec
    stats: LoadStats
    window: float
    """Seconds measured."""
    server_cpu: float
    """Server CPU over the window, in cores (1.0 = one core busy)."""
    client_cpu: float
    """All workers' CPU over the window, in cores."""
    rss_idle: int
    """Server RSS before the load, bytes."""
    rss: int
    """Server RSS at the end of the window, bytes."""
    during: Any = None
    """What the ``during`` callback returned."""

    @property
    def rate(self) -> float:
        """Acks per second in the window."""
        return self.stats.acks / self.window

    @property
    def expected_rate(self) -> float:
        """Messages per second the open streams should send."""
        return self.stats.opened / self.stats.interval if self.stats.interval else 0.0


@dataclass(frozen=True)
class _Plan:
    worker: int
    address: str
    mode: str
    first: int
    agents: int
    channels: int
    ttl: float
    open_timeout: float
    deadline: float


def _backoff(attempt: int) -> float:
    """Full jitter: uniform in [0, min(2 s, 50 ms * 2**attempt)]."""
    return random.uniform(0, min(2.0, 0.05 * 2**attempt))


class _Worker:
    """One client process: its agents, its connections, its figures."""

    def __init__(self, plan: _Plan, conn: Connection) -> None:
        self.plan = plan
        self.conn = conn
        self.stats = LoadStats()
        self.window = (math.inf, -math.inf)
        self.unsettled = plan.agents
        self.settled = asyncio.Event()
        self.opening_since = 0.0

    async def run(self) -> None:
        channels = [
            grpc.aio.insecure_channel(self.plan.address, options=CHANNEL_OPTIONS)
            for _ in range(self.plan.channels)
        ]
        tasks: list[asyncio.Task[None]] = []
        try:
            agents = await self._agents(channels[0])
            self.opening_since = time.monotonic()
            path = HEARTBEAT if self.plan.mode == "discovery" else echo.STREAM
            methods = [channel.stream_stream(path) for channel in channels]
            for index, (metadata, payload) in enumerate(agents):
                agent = self._agent(methods[index % len(methods)], metadata, payload)
                tasks.append(asyncio.create_task(agent))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.settled.wait(), self.plan.open_timeout + 5)
            self.conn.send(("ready",))
            message = await self._receive()
            if message[0] == "window":
                self.window = (message[1], message[2])
                await self._receive()  # "stop", or the deadline
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
            for channel in channels:
                await channel.close()
        self.conn.send(("result", self.stats))

    async def _receive(self) -> tuple[Any, ...]:
        """The next control message; ``("stop",)`` at the deadline or if the parent is gone."""

        def receive() -> tuple[Any, ...]:
            if self.conn.poll(max(0.0, self.plan.deadline - time.monotonic())):
                message: tuple[Any, ...] = self.conn.recv()
                return message
            return ("stop",)

        try:
            return await asyncio.to_thread(receive)
        except (EOFError, OSError):
            return ("stop",)

    async def _agents(self, channel: grpc.aio.Channel) -> list[tuple[tuple[Any, ...], bytes]]:
        """Register the agents (Discovery); return each one's stream metadata and message."""
        ids = [f"hb-{self.plan.first + i}" for i in range(self.plan.agents)]
        if self.plan.mode == "echo":
            self.stats.interval = self.plan.ttl / 3
            return [((), _heartbeat(agent_id)) for agent_id in ids]
        stub = pb_grpc.DiscoveryServiceStub(channel)
        limit = asyncio.Semaphore(REGISTER_IN_FLIGHT)
        started = time.monotonic()

        async def register(index: int, agent_id: str) -> tuple[tuple[Any, ...], bytes]:
            capabilities = ["python", "gpu"] if (self.plan.first + index) % 10 == 0 else ["python"]
            request = pb.RegisterRequest(
                agent_id=agent_id,
                name=agent_id,
                role="worker",
                capabilities=capabilities,
                capacity=4,
                ttl=_duration(self.plan.ttl),
            )
            async with limit:
                for attempt in range(8):
                    try:
                        response = await stub.Register(request, timeout=30)
                        break
                    except grpc.aio.AioRpcError as error:
                        if error.code() not in RETRYABLE or attempt == 7:
                            raise
                        await asyncio.sleep(_backoff(attempt))
            self.stats.interval = response.heartbeat_interval.ToTimedelta().total_seconds()
            metadata = (("authorization", f"Bearer {response.session_token}"),)
            return metadata, _heartbeat(agent_id)

        agents = await asyncio.gather(*(register(i, a) for i, a in enumerate(ids)))
        self.stats.registered = len(agents)
        self.stats.register_seconds = time.monotonic() - started
        return agents

    def _settle(self) -> None:
        self.unsettled -= 1
        if self.unsettled == 0:
            self.settled.set()

    def _ack(self, sent: float, reply: bytes) -> bool:
        """Count one reply; False when the server ended the session."""
        received = time.monotonic()
        if self.window[0] <= received <= self.window[1]:
            self.stats.acks += 1
            self.stats.latencies.append(received - sent)
        if self.plan.mode == "discovery":
            command = pb.HeartbeatResponse.FromString(reply).command
            if command == pb.HeartbeatResponse.COMMAND_REREGISTER:
                self.stats.reregistered += 1
                return False
        return True

    async def _agent(self, method: Any, metadata: tuple[Any, ...], payload: bytes) -> None:
        """Hold one stream: open (retrying), then one message per interval until cancelled."""
        interval = self.stats.interval
        ever_opened = False
        attempt = 0
        while True:
            call = method(metadata=metadata)
            opened = False
            try:
                sent = time.monotonic()
                await call.write(payload)
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise _StreamEnded
                opened = True
                attempt = 0
                if not ever_opened:
                    ever_opened = True
                    self.stats.opened += 1
                    self.stats.open_seconds = time.monotonic() - self.opening_since
                    self._settle()
                if not self._ack(sent, reply):
                    return
                next_at = time.monotonic() + random.uniform(0, interval)
                while True:
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    next_at = max(next_at + interval, time.monotonic())
                    sent = time.monotonic()
                    await call.write(payload)
                    reply = await call.read()
                    if reply is grpc.aio.EOF:
                        raise _StreamEnded
                    if not self._ack(sent, reply):
                        return
            except (grpc.aio.AioRpcError, _StreamEnded) as error:
                code = error.code().name if isinstance(error, grpc.aio.AioRpcError) else "EOF"
                (self.stats.breaks if opened else self.stats.open_failures)[code] += 1
            finally:
                call.cancel()
            if not ever_opened and time.monotonic() - self.opening_since > self.plan.open_timeout:
                self.stats.gave_up += 1
                self._settle()
                return
            self.stats.open_retries += 1
            attempt += 1
            await asyncio.sleep(_backoff(attempt))


class _StreamEnded(Exception):
    """The server closed the stream without an error status."""


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def _heartbeat(agent_id: str) -> bytes:
    return pb.HeartbeatRequest(
        agent_id=agent_id,
        load=pb.Load(active_subtasks=0),
        status=pb.Agent.STATUS_READY,
    ).SerializeToString()


def worker_main(plan: _Plan, conn: Connection) -> None:
    """Entry point of a worker process."""
    try:
        asyncio.run(_Worker(plan, conn).run())
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise


def _plans(spec: LoadSpec, address: str, deadline: float) -> list[_Plan]:
    workers = max(1, min(spec.workers, spec.channels, spec.agents))
    plans, first = [], 0
    for worker in range(workers):
        agents = spec.agents // workers + (1 if worker < spec.agents % workers else 0)
        channels = spec.channels // workers + (1 if worker < spec.channels % workers else 0)
        plans.append(
            _Plan(
                worker,
                address,
                spec.mode,
                first,
                agents,
                max(1, min(channels, agents)),
                spec.ttl,
                spec.open_timeout,
                deadline,
            )
        )
        first += agents
    return plans


async def _receive(conn: Connection, timeout: float) -> tuple[Any, ...]:
    def receive() -> tuple[Any, ...]:
        if not conn.poll(timeout):
            raise TimeoutError(f"no word from a load worker within {timeout:.0f} s")
        message: tuple[Any, ...] = conn.recv()
        if message[0] == "error":
            raise RuntimeError(f"load worker failed:\n{message[1]}")
        return message

    return await asyncio.to_thread(receive)


async def run_load(
    spec: LoadSpec,
    server: Server,
    duration: float,
    during: Callable[[], Awaitable[Any]] | None = None,
) -> LoadResult:
    """Drive ``server`` with ``spec``; measure for ``duration`` s, then run ``during``.

    Every worker process is stopped (or killed) before this returns or raises.
    """
    setup_timeout = 120.0 + spec.open_timeout
    settle = 2.0 * spec.ttl / 3
    deadline = time.monotonic() + setup_timeout + settle + duration + 300
    rss_idle = server.rss()
    context = mp.get_context("spawn")
    processes, conns = [], []
    try:
        for plan in _plans(spec, server.address, deadline):
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, args=(plan, child), daemon=True)
            process.start()
            child.close()
            processes.append(process)
            conns.append(parent)
        await asyncio.gather(*(_receive(conn, setup_timeout) for conn in conns))
        start = time.monotonic() + settle
        end = start + duration
        for conn in conns:
            conn.send(("window", start, end))
        clients = [psutil.Process(process.pid) for process in processes]
        await asyncio.sleep(start - time.monotonic())
        server_before, clients_before = server.cpu_seconds(), _cpu(clients)
        await asyncio.sleep(end - time.monotonic())
        server_cpu, clients_cpu = server.cpu_seconds(), _cpu(clients)
        rss = server.rss()
        during_result = await during() if during is not None else None
        for conn in conns:
            conn.send(("stop",))
        stats = LoadStats()
        for message in await asyncio.gather(*(_receive(conn, 60) for conn in conns)):
            stats.merge(message[1])
    finally:
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for process in processes:
            process.join(15)
            if process.is_alive():
                process.kill()
                process.join(5)
    return LoadResult(
        spec,
        stats,
        duration,
        (server_cpu - server_before) / duration,
        (clients_cpu - clients_before) / duration,
        rss_idle,
        rss,
        during_result,
    )


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total
