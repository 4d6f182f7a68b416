"""Watch latency across replicas: a write on replica A, seen by a watcher on replica B.

Two ``agentcoord serve`` processes share one PostgreSQL schema: A hosts every service, B
only StateSync. One sequential writer puts a key through A (admin token); one WatchStates
stream on B and one on A (for comparison: the same process's commit, no NOTIFY) wait for
it. A sample is the time from sending the PutState to the change arriving on each watch;
the next put is sent once both have it, so the server is otherwise idle. The PutState's
own round trip (its commit) is measured too, since it is part of every sample.

With ``background`` writers, that many more callers put other keys through B (blind puts,
as fast as they can) during the measurement, so both replicas commit at once and the
watches filter the measured key out of everyone's changes.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from google.protobuf import struct_pb2

from agentcoord.statesync.v1 import statesync_service_pb2 as pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as pb_grpc

ADMIN_TOKEN = "bench-replicas"
"""The admin token both replicas are started with."""
_AUTH = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


async def _arrivals(
    call: grpc.aio.UnaryStreamCall, times: dict[int, float], ready: asyncio.Event
) -> None:
    """Record when each revision arrives on a WatchStates stream."""
    async for response in call:
        if not response.changes:
            ready.set()  # the registration message
        for change in response.changes:
            times[change.revision] = time.perf_counter()


async def _write_until(stub: pb_grpc.StateSyncServiceStub, key: str, stop: asyncio.Event) -> int:
    """Put ``key`` again and again until ``stop``; return how many puts committed."""
    puts = 0
    while not stop.is_set():
        request = pb.PutStateRequest(key=key, json=struct_pb2.Value(number_value=puts))
        await stub.PutState(request, metadata=_AUTH)
        puts += 1
    return puts


async def measure_watch_latency(
    writer: str, watcher: str, count: int, warmup: int, background: int = 0
) -> tuple[dict[str, list[float]], int]:
    """Samples in seconds: ``cross`` (A -> B), ``local`` (A -> A) and ``put`` (the write).

    Also returns how many puts the ``background`` writers on B committed meanwhile.
    """
    async with (
        grpc.aio.insecure_channel(writer) as a,
        grpc.aio.insecure_channel(watcher) as b,
    ):
        state = pb_grpc.StateSyncServiceStub(a)
        stop = asyncio.Event()
        load = [
            asyncio.create_task(
                _write_until(pb_grpc.StateSyncServiceStub(b), f"shared/load/{n}", stop)
            )
            for n in range(background)
        ]
        times: dict[str, dict[int, float]] = {"cross": {}, "local": {}}
        watches = []
        for name, channel in (("cross", b), ("local", a)):
            call = pb_grpc.StateSyncServiceStub(channel).WatchStates(
                pb.WatchStatesRequest(prefix="shared/bench/"), metadata=_AUTH
            )
            ready = asyncio.Event()
            watches.append((call, asyncio.create_task(_arrivals(call, times[name], ready))))
            await ready.wait()
        samples: dict[str, list[float]] = {"cross": [], "local": [], "put": []}
        try:
            for n in range(warmup + count):
                request = pb.PutStateRequest(
                    key=f"shared/bench/watch-{n % 16}", json=struct_pb2.Value(number_value=n)
                )
                sent = time.perf_counter()
                response = await state.PutState(request, metadata=_AUTH)
                acked = time.perf_counter()
                while not all(response.revision in seen for seen in times.values()):
                    await asyncio.sleep(0.0005)
                if n >= warmup:
                    samples["put"].append(acked - sent)
                    for name, seen in times.items():
                        samples[name].append(seen[response.revision] - sent)
        finally:
            stop.set()
            background_puts = sum(await asyncio.gather(*load))
            for call, task in watches:
                call.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return samples, background_puts
