"""kill -9 of the server in the middle of a write storm loses no acknowledged write.

A real ``agentcoord serve`` process takes concurrent writes (distinct keys, and a few hot
keys updated by compare-and-set); every write whose response arrived is recorded. The
process is killed with SIGKILL mid-storm and started again on the same store: every
acknowledged write must be there, its key at that version or a later one.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from agentcoord.client import AgentcoordClient, RetryPolicy, RPCError, UpdatePolicy
from tests.server.processes import ADMIN, free_port, serve

DISTINCT_WRITERS = 24
HOT_WRITERS = 8
HOT_KEYS = 3
KILL_AFTER_WRITES = 300


class Acknowledged:
    """The newest acknowledged (version, value) of every key."""

    def __init__(self) -> None:
        self.writes: dict[str, tuple[int, int]] = {}
        self.count = 0

    def record(self, key: str, version: int, value: int) -> None:
        self.count += 1
        self.writes[key] = max(self.writes.get(key, (0, 0)), (version, value))


async def acknowledged_at_least(acked: Acknowledged, count: int) -> None:
    """Return once ``count`` writes are acknowledged, so the kill lands mid-storm on any machine."""
    while acked.count < count:
        await asyncio.sleep(0.01)


async def storm(client: AgentcoordClient, acked: Acknowledged, stop: asyncio.Event) -> None:
    """Write until the server dies (or ``stop``); record every acknowledged write."""
    give_up_fast = UpdatePolicy(max_delay=1.0)

    async def distinct(writer: int) -> None:
        key = f"shared/storm/{writer}"
        for value in range(1, 1_000_000):
            entry = await client.state.put(key, value)
            acked.record(key, entry.version, value)
            if stop.is_set():
                return

    async def hot(writer: int) -> None:
        key = f"shared/hot/{writer % HOT_KEYS}"
        while not stop.is_set():
            entry = await client.state.update(key, lambda n: n + 1, default=0, policy=give_up_fast)
            acked.record(key, entry.version, entry.value)

    writers = [distinct(w) for w in range(DISTINCT_WRITERS)] + [hot(w) for w in range(HOT_WRITERS)]
    outcomes = await asyncio.gather(*writers, return_exceptions=True)
    for outcome in outcomes:  # every writer ends by losing the server, nothing else
        assert outcome is None or isinstance(outcome, RPCError), repr(outcome)


async def test_acknowledged_writes_survive_kill_9(store_url: str, tmp_path: Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    log = tmp_path / "server.log"
    acked = Acknowledged()
    stop = asyncio.Event()
    # One attempt per write: a write in flight when the server dies fails, unacknowledged.
    once = RetryPolicy(max_attempts=1)
    async with (
        serve(port, store_url, log) as process,
        AgentcoordClient(target, token=ADMIN, retry=once) as client,
    ):
        writes = asyncio.create_task(storm(client, acked, stop))
        await asyncio.wait_for(acknowledged_at_least(acked, KILL_AFTER_WRITES), 120)
        acked_before_kill = acked.count
        os.kill(process.pid, signal.SIGKILL)
        await process.wait()
        stop.set()
        await asyncio.wait_for(writes, 10)
    assert process.returncode == -signal.SIGKILL
    assert acked_before_kill >= KILL_AFTER_WRITES
    assert len(acked.writes) == DISTINCT_WRITERS + HOT_KEYS

    async with serve(port, store_url, log), AgentcoordClient(target, token=ADMIN) as client:
        stored = {entry.key: entry for entry in await client.state.list("shared/")}
    lost = []
    for key, (version, value) in sorted(acked.writes.items()):
        entry = stored.get(key)
        if entry is None or (entry.version, entry.value) < (version, value):
            lost.append((key, version, value, entry and (entry.version, entry.value)))
        elif entry.version == version:
            assert entry.value == value, key
    assert not lost, f"acknowledged writes lost by kill -9: {lost}"
