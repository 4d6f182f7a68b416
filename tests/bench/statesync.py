"""StateSync beside the bare echo service: unary latency and contended read-modify-write.

Unary: one sequential caller in the bench process, PutState (blind writes, no
``expected_version``, to 16 keys) and GetState interleaved with echo calls, on an idle
server; the caller is a registered agent, so every call carries its session token.

Contended: ``writers`` concurrent writers, spread over ``workers`` client processes, each
a registered agent on its own channel, increment ``keys`` hot keys for ``duration`` seconds:
with ``client.state.update(key, n + 1)`` (mode ``statesync``), with a plain read and a
compare-and-set put that retries at once from the entry ABORTED carries (``cas``), or
with the server-side ``client.state.increment(key)`` (``modify``, ModifyState: no read
and no conflict). The same writers then run the same loop against echo, one echo call
for the read and one for the write of each increment: the ceiling of the RPC layer for
this shape of load. Afterwards the counters are read back: their sum must equal the
increments that committed (``lost`` must be 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc
import psutil
from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration

from agentcoord.client import AgentcoordClient, ConflictError
from agentcoord.client._errors import RPCError
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.statesync.v1 import statesync_service_pb2 as pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as pb_grpc
from tests.bench import echo, procs
from tests.bench.procs import Server
from tests.bench.unary import echo_call, interleaved

CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
"""One TCP connection per writer, as separate agents would have."""
SESSION_TTL = Duration(seconds=300)
"""Writers' sessions outlive the run without heartbeats."""
UNARY_KEYS = 16
"""PutState in the unary figure cycles over this many keys."""


async def _register(client: AgentcoordClient, agent_id: str) -> None:
    request = discovery_pb.RegisterRequest(
        agent_id=agent_id, name=agent_id, role="worker", ttl=SESSION_TTL
    )
    await client.discovery.register(request)


# --- unary --------------------------------------------------------------------------------------


async def measure_unary(
    address: str, echo_address: str, count: int, warmup: int
) -> dict[str, list[float]]:
    """PutState, GetState and echo, one sequential caller each, on an otherwise idle server."""
    async with (
        AgentcoordClient(address) as client,
        grpc.aio.insecure_channel(echo_address) as echo_channel,
    ):
        await _register(client, "bench-unary")
        metadata = client.metadata()
        stub = pb_grpc.StateSyncServiceStub(client._channel)
        value = struct_pb2.Value(number_value=1)
        puts = 0

        async def put_state() -> object:
            nonlocal puts
            puts += 1
            request = pb.PutStateRequest(
                key=f"shared/bench/unary-{puts % UNARY_KEYS}",
                json=value,
                request_id=str(uuid.uuid4()),
            )
            return await stub.PutState(request, metadata=metadata)

        async def get_state() -> object:
            request = pb.GetStateRequest(key=f"shared/bench/unary-{puts % UNARY_KEYS}")
            return await stub.GetState(request, metadata=metadata)

        for _ in range(UNARY_KEYS):
            await put_state()
        payload = pb.PutStateRequest(
            key="shared/bench/unary-0", json=value, request_id=str(uuid.uuid4())
        ).SerializeToString()
        calls = {
            "echo": echo_call(echo_channel, payload),
            "PutState": put_state,
            "GetState": get_state,
        }
        return await interleaved(calls, count, warmup)


# --- contended read-modify-write ----------------------------------------------------------------


@dataclass(frozen=True)
class RmwSpec:
    """One contended read-modify-write load."""

    mode: str
    """``statesync`` (update()), ``cas`` (read + compare-and-set), ``modify`` (ModifyState)
    or ``echo``."""
    writers: int
    """Concurrent writers in all."""
    keys: int
    """Hot keys; writer ``i`` increments key ``i % keys``."""
    workers: int
    """Client processes the writers are spread over."""
    duration: float
    """Seconds measured."""

    @property
    def label(self) -> str:
        """E.g. ``32 writers, 4 keys, 4 procs``."""
        return f"{self.writers} writers, {self.keys} hot keys, {self.workers} client procs"


@dataclass
class RmwResult:
    """What one contended load did."""

    spec: RmwSpec
    committed: int = 0
    """Increments that committed, all of them (also those that ended after the window)."""
    in_window: int = 0
    """Increments that committed inside the measured window."""
    conflicts: int = 0
    """Attempts refused with ABORTED and retried."""
    unavailable: int = 0
    """Attempts retried after UNAVAILABLE."""
    gave_up: int = 0
    """Updates still conflicting when the client's retry policy ran out."""
    errors: Counter[str] = field(default_factory=Counter)
    """Other failures by status code."""
    latencies: list[float] = field(default_factory=list)
    """Seconds per committed increment (all attempts), inside the window."""
    counters: int = -1
    """Sum of the hot keys' final values (-1: not read, echo)."""
    server_cpu: float = 0.0
    """Server CPU over the window, fraction of one core."""
    client_cpu: float = 0.0
    """Client processes' CPU over the window, fraction of one core."""

    @property
    def rate(self) -> float:
        """Committed increments per second inside the window."""
        return self.in_window / self.spec.duration

    @property
    def lost(self) -> int:
        """Committed increments missing from the counters (must be 0)."""
        return self.committed - self.counters


@dataclass(frozen=True)
class _Plan:
    spec: RmwSpec
    address: str
    index: int
    writers: list[int]
    """Global writer numbers of this worker."""


async def _worker(plan: _Plan, conn: Connection) -> dict[str, Any]:
    spec = plan.spec
    stats: dict[str, Any] = {
        "in_window": 0,
        "done": 0,
        "cas_conflicts": 0,
        "gave_up": 0,
        "errors": Counter(),
        "latencies": [],
    }
    async with contextlib.AsyncExitStack() as stack:
        calls = []
        clients: list[AgentcoordClient] = []
        for writer in plan.writers:
            key = f"shared/bench/hot-{writer % spec.keys}"
            if spec.mode == "echo":
                channel = await stack.enter_async_context(
                    grpc.aio.insecure_channel(plan.address, options=CHANNEL_OPTIONS)
                )
                calls.append(_echo_increment(channel, key))
            else:
                client = await stack.enter_async_context(
                    AgentcoordClient(plan.address, options=CHANNEL_OPTIONS)
                )
                await _register(client, f"bench-rmw-{writer}")
                clients.append(client)
                calls.append(_INCREMENTS[spec.mode](client, key, stats))
        for call in calls:  # warm the connections up
            await call()
        conn.send(("ready",))
        start, end = conn.recv()
        await asyncio.sleep(max(0.0, start - time.time()))
        await asyncio.gather(*(_writer(call, end, stats) for call in calls))
        stats["committed"] = sum(client.state.stats.committed for client in clients)
        if spec.mode != "statesync":  # update() counts its own; the others count calls
            stats["committed"] = stats["done"] + len(calls)  # and the warm-up calls
        stats["conflicts"] = stats["cas_conflicts"]
        stats["conflicts"] += sum(client.state.stats.conflicts for client in clients)
        stats["unavailable"] = sum(client.state.stats.unavailable for client in clients)
    return stats


def _state_increment(client: AgentcoordClient, key: str, stats: dict[str, Any]) -> Any:
    def increment(value: Any) -> int:
        return int(value) + 1

    async def call() -> object:
        return await client.state.update(key, increment, default=0)

    return call


def _cas_increment(client: AgentcoordClient, key: str, stats: dict[str, Any]) -> Any:
    """Read, then put at the version read; on ABORTED put again at once from the entry the
    conflict carries (a read only if it carries none), with no back-off."""

    async def call() -> object:
        entry = await client.state.get(key)
        while True:
            value, version = (int(entry.value), entry.version) if entry else (0, 0)
            try:
                return await client.state.put(key, value + 1, expected_version=version)
            except ConflictError as conflict:
                stats["cas_conflicts"] += 1
                entry = conflict.current
                if entry is None and conflict.current_version:
                    entry = await client.state.get(key)

    return call


def _modify_increment(client: AgentcoordClient, key: str, stats: dict[str, Any]) -> Any:
    async def call() -> object:
        return await client.state.increment(key)

    return call


_INCREMENTS = {"statesync": _state_increment, "cas": _cas_increment, "modify": _modify_increment}
"""How a writer of each mode increments its key."""


def _echo_increment(channel: grpc.aio.Channel, key: str) -> Any:
    method = channel.unary_unary(echo.UNARY)
    read = pb.GetStateRequest(key=key).SerializeToString()
    write = pb.PutStateRequest(
        key=key, json=struct_pb2.Value(number_value=1), expected_version=1
    ).SerializeToString()

    async def call() -> object:
        await method(read)
        return await method(write)

    return call


async def _writer(call: Any, end: float, stats: dict[str, Any]) -> None:
    """Increment until ``end`` (wall clock); each update is bounded by the retry policy."""
    while time.time() < end:
        started = time.perf_counter()
        try:
            await call()
            stats["done"] += 1
        except RPCError as error:
            if error.code == grpc.StatusCode.ABORTED:
                stats["gave_up"] += 1
            else:
                stats["errors"][error.code.name] += 1
            continue
        except grpc.aio.AioRpcError as error:
            stats["errors"][error.code().name] += 1
            continue
        if time.time() <= end:
            stats["in_window"] += 1
            stats["latencies"].append(time.perf_counter() - started)


def worker_main(plan: _Plan, conn: Connection) -> None:
    """Entry point of one client process: sends back ``("done", stats)`` or ``("error", tb)``."""
    procs.serve_worker(lambda: _worker(plan, conn), conn)


def _recv(conn: Connection, timeout: float) -> tuple[Any, ...]:
    return procs.receive(conn, timeout, "state")


def run_rmw(spec: RmwSpec, server: Server) -> RmwResult:
    """Run one contended load against ``server`` from ``spec.workers`` client processes."""
    context = mp.get_context("spawn")
    shares = [list(range(spec.writers))[index :: spec.workers] for index in range(spec.workers)]
    processes: list[Any] = []
    conns: list[Connection] = []
    try:
        for index, writers in enumerate(shares):
            parent, child = context.Pipe()
            plan = _Plan(spec, server.address, index, writers)
            process = context.Process(target=worker_main, args=(plan, child), daemon=True)
            process.start()
            child.close()
            processes.append(process)
            conns.append(parent)
        for conn in conns:
            _recv(conn, 60)
        clients = [psutil.Process(process.pid) for process in processes]
        start = time.time() + 0.3
        end = start + spec.duration
        for conn in conns:
            conn.send((start, end))
        time.sleep(max(0.0, start - time.time()))
        server_before, clients_before = server.cpu_seconds(), _cpu(clients)
        time.sleep(max(0.0, end - time.time()))
        server_after, clients_after = server.cpu_seconds(), _cpu(clients)
        result = RmwResult(spec)
        result.server_cpu = (server_after - server_before) / spec.duration
        result.client_cpu = (clients_after - clients_before) / spec.duration
        for conn in conns:
            stats = _recv(conn, 60)[1]
            result.committed += stats.get("committed", 0)
            result.in_window += stats["in_window"]
            result.conflicts += stats.get("conflicts", 0)
            result.unavailable += stats.get("unavailable", 0)
            result.gave_up += stats["gave_up"]
            result.errors.update(stats["errors"])
            result.latencies += stats["latencies"]
        if spec.mode == "echo":
            result.committed = result.in_window
        else:
            result.counters = asyncio.run(_read_counters(server.address, spec.keys))
        return result
    finally:
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        for conn in conns:
            conn.close()


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


async def _read_counters(address: str, keys: int) -> int:
    """Sum of the hot keys' values."""
    async with AgentcoordClient(address) as client:
        await _register(client, "bench-rmw-reader")
        total = 0
        for index in range(keys):
            entry = await client.state.get(f"shared/bench/hot-{index}")
            total += int(entry.value) if entry is not None else 0
        return total
