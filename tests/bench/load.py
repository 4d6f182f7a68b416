"""Heartbeat load: many agents each holding one bidirectional stream, from several processes.

Each worker process runs its share of the agents over its share of the connections.
An agent starts like a real one: it registers (Discovery only) and opens its stream at
once; at most ``START_IN_FLIGHT`` agents per worker are starting at any moment, so the
fleet comes up as fast as Register allows. It then sends one message per heartbeat
interval (the interval Register returns; TTL/3 for echo) at a random phase. It behaves as
the SDK's agents do: its heartbeats set ``ack_interval`` (the SDK's
:data:`~agentcoord.client._agent.ACK_INTERVAL`), so only the first message of a stream
and news are answered, and it does not wait for answers, reading them as they come; the
echo agents use the echo's Quiet stream, which answers the same way. With
``LoadSpec.answer_every`` every message is answered and the agent waits for the answer
before it sleeps (the SDK before ``ack_interval``; the echo's plain Stream). Only
messages sent, and answers received, inside the measurement window are counted.

After the window, once the whole fleet is up, comes a reconnect storm: every worker
drops all its connections at once (as a network blip or a proxy restart would) and
every agent reopens its stream immediately, retrying failed opens with jittered
exponential back-off. That burst of thousands of opens is what grpc core's
pending-request limit sees.
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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import grpc
import psutil
from google.protobuf.duration_pb2 import Duration

from agentcoord.client._agent import ACK_ANSWERS, ACK_INTERVAL
from agentcoord.discovery.v1 import discovery_service_pb2 as pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as pb_grpc
from tests.bench import echo
from tests.bench.procs import Server

HEARTBEAT = "/agentcoord.discovery.v1.DiscoveryService/Heartbeat"
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL}
START_IN_FLIGHT = 32
"""Agents of one worker registering and opening their stream at the same time."""
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
    open_timeout: float = 30.0
    """An agent gives up (re)opening its stream after this many seconds of a phase."""
    answer_every: bool = False
    """Every message answered, each answer awaited before the next sleep (the SDK before
    ``ack_interval``); otherwise as the SDK does now (see the module's docstring)."""

    @property
    def label(self) -> str:
        """E.g. ``1,000 agents, TTL 3 s, 16 conns``."""
        conns = "1 conn/agent" if self.channels >= self.agents else f"{self.channels} conns"
        every = ", every message answered" if self.answer_every else ""
        return f"{self.agents:,} agents, TTL {self.ttl:g} s, {conns}{every}"


@dataclass
class OpenStats:
    """How one phase's stream opens went."""

    opened: int = 0
    """Agents whose stream opened in the phase."""
    seconds: float = 0.0
    """From the phase's start until the last stream opened."""
    failures: dict[str, list[float]] = field(default_factory=dict)
    """Failed open attempts by status code: seconds from the attempt to its failure."""
    retries: int = 0
    """Open attempts after a failure."""
    gave_up: int = 0
    """Agents that could not open within the open timeout."""
    lost: Counter[str] = field(default_factory=Counter)
    """Sessions that ended in the phase (REREGISTER, UNAUTHENTICATED, Register failed)."""

    def merge(self, other: OpenStats) -> None:
        """Add another worker's figures (workers run in parallel: times are maxima)."""
        self.opened += other.opened
        self.seconds = max(self.seconds, other.seconds)
        for code, waits in other.failures.items():
            self.failures.setdefault(code, []).extend(waits)
        self.retries += other.retries
        self.gave_up += other.gave_up
        self.lost += other.lost


@dataclass
class LoadStats:
    """What the workers saw, summed over them."""

    start: OpenStats = field(default_factory=OpenStats)
    """From the start until the storm (the measurement window included)."""
    storm: OpenStats = field(default_factory=OpenStats)
    """From the storm until the stop."""
    breaks: Counter[str] = field(default_factory=Counter)
    """Open streams that failed outside the storm, by status code."""
    interval: float = 0.0
    """Seconds between an agent's messages (what Register returned; TTL/3 for echo)."""
    beats: int = 0
    """Messages sent in the measurement window."""
    acks: int = 0
    """Replies received in the measurement window."""
    latencies: list[float] = field(default_factory=list)
    """Seconds from each of those replies' message (the agent's latest) to the reply."""

    def merge(self, other: LoadStats) -> None:
        """Add another worker's figures."""
        self.start.merge(other.start)
        self.storm.merge(other.storm)
        self.breaks += other.breaks
        self.interval = max(self.interval, other.interval)
        self.beats += other.beats
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
    """Server CPU over the window, in cores (1.0 = one core busy); all servers together."""
    client_cpu: float
    """All workers' CPU over the window, in cores."""
    rss_idle: int
    """Server RSS before the load, bytes."""
    rss: int
    """Server RSS at the end of the window, bytes."""
    stormed: bool
    """Whether the reconnect storm ran (only once the whole fleet was up)."""
    during: Any = None
    """What the ``during`` callback returned."""
    server_cpus: tuple[float, ...] = ()
    """Each server's CPU over the window, in cores, in the order given to :func:`run_load`."""

    @property
    def rate(self) -> float:
        """Messages sent per second in the window (with answers awaited, each answered)."""
        return self.stats.beats / self.window

    @property
    def ack_rate(self) -> float:
        """Replies per second in the window."""
        return self.stats.acks / self.window

    @property
    def expected_rate(self) -> float:
        """Messages per second the open streams would send if every reply were instant."""
        return self.stats.start.opened / self.stats.interval if self.stats.interval else 0.0


@dataclass(frozen=True)
class _Plan:
    worker: int
    addresses: tuple[str, ...]
    mode: str
    first: int
    agents: int
    channels: int
    ttl: float
    open_timeout: float
    deadline: float
    answer_every: bool


class _SessionLost(Exception):
    """The server ended the agent's session; a real agent would register again."""


class _Broken(Exception):
    """The stream failed; ``args[0]`` names the status code (``EOF``: ended without one)."""


def _backoff(attempt: int) -> float:
    """Full jitter: uniform in [0, min(2 s, 50 ms * 2**attempt)]."""
    return random.uniform(0, min(2.0, 0.05 * 2**attempt))


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


class _Worker:
    """One client process: its agents, its connections, its figures."""

    def __init__(self, plan: _Plan, conn: Connection) -> None:
        self.plan = plan
        self.conn = conn
        self.stats = LoadStats()
        self.window = (math.inf, -math.inf)
        self.gate = asyncio.Semaphore(START_IN_FLIGHT)
        self.channels: list[grpc.aio.Channel] = []
        self.methods: list[Any] = []
        self.phase = self.stats.start
        self.phase_started = time.monotonic()
        self.waiting: set[int] = set(range(plan.agents))
        self.settled = asyncio.Event()
        self.live: set[int] = set()
        self.starting: set[int] = set()

    def _connect(self) -> None:
        if self.plan.mode == "discovery":
            path = HEARTBEAT
        else:
            path = echo.STREAM if self.plan.answer_every else echo.QUIET
        addresses = self.plan.addresses
        self.channels = [  # spread over the servers, each worker starting one further on
            grpc.aio.insecure_channel(
                addresses[(self.plan.worker + n) % len(addresses)], options=CHANNEL_OPTIONS
            )
            for n in range(self.plan.channels)
        ]
        self.methods = [channel.stream_stream(path) for channel in self.channels]

    async def run(self) -> None:
        self._connect()
        if self.plan.mode == "echo":
            self.stats.interval = self.plan.ttl / 3
        tasks = [asyncio.create_task(self._agent(i)) for i in range(self.plan.agents)]
        try:
            await self._until_settled()
            self.conn.send(("ready", self.stats.start.opened))
            while True:
                message = await self._receive()
                if message[0] == "window":
                    self.window = (message[1], message[2])
                elif message[0] == "storm":
                    await self._storm()
                    self.conn.send(("stormed",))
                else:
                    break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
            for channel in self.channels:
                await channel.close(None)
        self.conn.send(("result", self.stats))

    async def _until_settled(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.settled.wait(), self.plan.open_timeout + 10)

    async def _storm(self) -> None:
        """Drop every connection at once; every live agent reopens its stream."""
        old = self.channels
        self.phase, self.phase_started = self.stats.storm, time.monotonic()
        self.waiting = set(self.live)
        self.settled.clear()
        self._connect()
        for channel in old:
            await channel.close(None)
        if not self.waiting:
            self.settled.set()
        await self._until_settled()

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

    async def _register(self, index: int) -> tuple[tuple[str, str], ...]:
        """Register agent ``index``; return its stream metadata."""
        agent_id = f"hb-{self.plan.first + index}"
        capabilities = ["python", "gpu"] if (self.plan.first + index) % 10 == 0 else ["python"]
        request = pb.RegisterRequest(
            agent_id=agent_id,
            name=agent_id,
            role="worker",
            capabilities=capabilities,
            capacity=4,
            ttl=_duration(self.plan.ttl),
        )
        stub = pb_grpc.DiscoveryServiceStub(self.channels[index % len(self.channels)])
        for attempt in range(8):
            try:
                response = await stub.Register(request, timeout=30)
                break
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE or attempt == 7:
                    raise
                await asyncio.sleep(_backoff(attempt))
        self.stats.interval = response.heartbeat_interval.ToTimedelta().total_seconds()
        return (("authorization", f"Bearer {response.session_token}"),)

    def _ack(self, sent: float, reply: bytes) -> None:
        """Count one reply to a message sent at ``sent``.

        Raises:
            _SessionLost: the server told the agent to register again.
        """
        received = time.monotonic()
        if self.window[0] <= received <= self.window[1]:
            self.stats.acks += 1
            self.stats.latencies.append(received - sent)
        if self.plan.mode == "discovery":
            command = pb.HeartbeatResponse.FromString(reply).command
            if command == pb.HeartbeatResponse.COMMAND_REREGISTER:
                raise _SessionLost("REREGISTER")

    async def _send(self, call: Any, payload: bytes) -> float:
        """Send one message; return when.

        Raises:
            _Broken: the stream failed (see :func:`_stream_errors`).
        """
        sent = time.monotonic()
        async with _stream_errors(call):
            await call.write(payload)
        if self.window[0] <= sent <= self.window[1]:
            self.stats.beats += 1
        return sent

    async def _reply(self, call: Any, sent: float) -> None:
        """Wait for the next reply and count it (``sent``: its message's time).

        Raises:
            _Broken: the stream failed or ended (EOF).
            _SessionLost: the server told the agent to register again.
        """
        async with _stream_errors(call):
            reply = await call.read()
        if reply is grpc.aio.EOF:
            raise _Broken("EOF")
        self._ack(sent, reply)

    async def _replies(self, call: Any, sent: list[float]) -> None:
        """Take replies as they come, until the stream fails (``sent[0]``: the last send)."""
        while True:
            await self._reply(call, sent[0])

    async def _agent(self, index: int) -> None:
        """One agent: register, then hold a stream, reopening it whenever it fails."""
        await self.gate.acquire()
        self.starting.add(index)
        try:
            metadata = await self._register(index) if self.plan.mode == "discovery" else ()
        except grpc.aio.AioRpcError as error:
            self._started(index)
            self._finish(index, "lost", f"Register {error.code().name}")
            return
        request = pb.HeartbeatRequest(
            agent_id=f"hb-{self.plan.first + index}",
            load=pb.Load(active_subtasks=0),
            status=pb.Agent.STATUS_READY,
        )
        if not self.plan.answer_every:
            request.ack_interval.CopyFrom(ACK_ANSWERS)
            if self.plan.mode == "echo":
                metadata = ((echo.ACK_INTERVAL_KEY, f"{ACK_INTERVAL:g}"),)
        payload = request.SerializeToString()
        attempt = 0
        while True:
            attempt = await self._hold(index, metadata, payload, attempt)
            if not attempt:
                return
            await asyncio.sleep(_backoff(attempt))

    def _started(self, index: int) -> None:
        """Agent ``index`` made its first open attempt: let the next agent start."""
        if index in self.starting:
            self.starting.discard(index)
            self.gate.release()

    async def _hold(self, index: int, metadata: Any, payload: bytes, attempt: int) -> int:
        """Open the stream and heartbeat on it until it fails.

        Returns:
            The next attempt number, or 0 when the agent stops (gave up or lost).
        """
        phase, attempted = self.phase, time.monotonic()
        call = self.methods[index % len(self.methods)](metadata=metadata)
        opened = False
        replies: asyncio.Future[None] | None = None
        try:
            await self._reply(call, await self._send(call, payload))
            opened = True
            self._started(index)
            self._finish(index, "opened")
            interval = self.stats.interval
            next_at = time.monotonic() + random.uniform(0, interval)
            sent = [0.0]
            if not self.plan.answer_every:
                replies = asyncio.ensure_future(self._replies(call, sent))
            while True:
                pause = max(0.0, next_at - time.monotonic())
                if replies is None:
                    await asyncio.sleep(pause)
                else:
                    await asyncio.wait((replies,), timeout=pause)
                    if replies.done():
                        replies.result()  # raises why the stream ended
                next_at = max(next_at + interval, time.monotonic())
                sent[0] = await self._send(call, payload)
                if replies is None:
                    await self._reply(call, sent[0])
        except _SessionLost as lost:
            self._finish(index, "lost", str(lost))
            return 0
        except _Broken as broken:
            code = broken.args[0]
            if code == "UNAUTHENTICATED":
                self._finish(index, "lost", code)
                return 0
            if not opened:
                phase.failures.setdefault(code, []).append(time.monotonic() - attempted)
            elif phase is self.phase:  # not the storm's doing
                self.stats.breaks[code] += 1
        finally:
            self._started(index)
            if replies is not None:
                replies.cancel()
                replies.add_done_callback(_retrieve)
            call.cancel()
        if opened:
            return 1
        if index in self.waiting and time.monotonic() - self.phase_started > self.plan.open_timeout:
            self._finish(index, "gave up")
            return 0
        self.phase.retries += 1
        return attempt + 1

    def _finish(self, index: int, outcome: str, cause: str = "") -> None:
        """Record that agent ``index`` opened its stream, gave up, or lost its session."""
        if outcome == "opened":
            self.live.add(index)
        else:
            self.live.discard(index)
        if outcome == "lost":
            self.phase.lost[cause] += 1
        if index not in self.waiting:
            return
        self.waiting.discard(index)
        if outcome == "opened":
            self.phase.opened += 1
            self.phase.seconds = time.monotonic() - self.phase_started
        elif outcome == "gave up":
            self.phase.gave_up += 1
        if not self.waiting:
            self.settled.set()


@contextlib.asynccontextmanager
async def _stream_errors(call: Any) -> AsyncIterator[None]:
    """Turn however grpc.aio reports a failed stream into :class:`_Broken`.

    That is an error status, a write to a finished call, or a read cancelled by the
    channel closing; the agent's own cancellation passes through.
    """
    try:
        yield
    except grpc.aio.AioRpcError as error:
        raise _Broken(error.code().name) from None
    except asyncio.InvalidStateError:
        raise _Broken((await call.code()).name) from None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the agent itself is being stopped
        raise _Broken("CANCELLED") from None


def _retrieve(future: asyncio.Future[None]) -> None:
    """Take a cancelled reader's outcome, so that asyncio does not log it as lost."""
    if not future.cancelled():
        future.exception()


def worker_main(plan: _Plan, conn: Connection) -> None:
    """Entry point of a worker process."""
    try:
        asyncio.run(_Worker(plan, conn).run())
    except KeyboardInterrupt:
        pass  # Ctrl-C reached the whole process group; the parent cleans up
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise


def _plans(spec: LoadSpec, addresses: tuple[str, ...], deadline: float) -> list[_Plan]:
    workers = max(1, min(spec.workers, spec.channels, spec.agents))
    plans, first = [], 0
    for worker in range(workers):
        agents = spec.agents // workers + (1 if worker < spec.agents % workers else 0)
        channels = spec.channels // workers + (1 if worker < spec.channels % workers else 0)
        plans.append(
            _Plan(
                worker,
                addresses,
                spec.mode,
                first,
                agents,
                max(1, min(channels, agents)),
                spec.ttl,
                spec.open_timeout,
                deadline,
                spec.answer_every,
            )
        )
        first += agents
    return plans


def agents_by_server(spec: LoadSpec, servers: int) -> list[int]:
    """How many of the fleet's agents :func:`run_load` puts on each of ``servers`` servers."""
    counts = [0] * servers
    for plan in _plans(spec, tuple(str(n) for n in range(servers)), 0.0):
        for index in range(plan.agents):
            counts[(plan.worker + index % plan.channels) % servers] += 1
    return counts


def _gather(conns: list[Connection], timeout: float) -> list[tuple[Any, ...]]:
    """One message from every worker, in order.

    Raises:
        RuntimeError: a worker failed or exited.
        TimeoutError: a worker said nothing within ``timeout`` seconds.
    """
    messages: dict[int, tuple[Any, ...]] = {}
    deadline = time.monotonic() + timeout
    while len(messages) < len(conns):
        waiting = [conn for i, conn in enumerate(conns) if i not in messages]
        ready = wait(waiting, max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"no word from a load worker within {timeout:.0f} s")
        for conn in ready:
            assert isinstance(conn, Connection)
            try:
                message: tuple[Any, ...] = conn.recv()
            except EOFError:
                raise RuntimeError("a load worker exited without a word") from None
            if message[0] == "error":
                raise RuntimeError(f"load worker failed:\n{message[1]}")
            messages[conns.index(conn)] = message
    return [messages[i] for i in range(len(conns))]


def run_load(
    spec: LoadSpec,
    server: Server,
    duration: float,
    during: Callable[[], Awaitable[Any]] | None = None,
    others: Sequence[Server] = (),
) -> LoadResult:
    """Drive ``server`` with ``spec``: start, measure ``duration`` s, ``during``, storm, stop.

    With ``others`` (replicas of ``server`` on the same store), every worker spreads its
    connections, and so its agents, over all of them in turn; the server CPU is then
    reported per server and summed. The storm is skipped when not every agent got its
    stream open at the start. Every worker process is stopped (or killed) before this
    returns or raises.
    """
    servers = [server, *others]
    phase_timeout = spec.open_timeout + 60
    settle = 2.0 * spec.ttl / 3
    deadline = time.monotonic() + 2 * phase_timeout + settle + duration + 300
    rss_idle = server.rss()
    context = mp.get_context("spawn")
    processes, conns = [], []
    try:
        for plan in _plans(spec, tuple(s.address for s in servers), deadline):
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, args=(plan, child), daemon=True)
            process.start()
            child.close()
            processes.append(process)
            conns.append(parent)
        readies = _gather(conns, phase_timeout)
        fleet_up = sum(ready[1] for ready in readies) == spec.agents
        start = time.monotonic() + settle
        end = start + duration
        for conn in conns:
            conn.send(("window", start, end))
        clients = [psutil.Process(process.pid) for process in processes]
        time.sleep(start - time.monotonic())
        servers_before, clients_before = [s.cpu_seconds() for s in servers], _cpu(clients)
        time.sleep(end - time.monotonic())
        servers_after, clients_cpu = [s.cpu_seconds() for s in servers], _cpu(clients)
        rss = server.rss()
        during_result = asyncio.run(during()) if during is not None else None
        if fleet_up:
            for conn in conns:
                conn.send(("storm",))
            _gather(conns, phase_timeout)
        for conn in conns:
            conn.send(("stop",))
        stats = LoadStats()
        for message in _gather(conns, 60):
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
    cpus = tuple(
        (after - before) / duration
        for before, after in zip(servers_before, servers_after, strict=True)
    )
    return LoadResult(
        spec,
        stats,
        duration,
        sum(cpus),
        (clients_cpu - clients_before) / duration,
        rss_idle,
        rss,
        fleet_up,
        during_result,
        cpus,
    )


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total
