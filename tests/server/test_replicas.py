"""Watches across replica processes on one PostgreSQL database.

Real ``agentcoord serve`` processes on a fresh schema: replica ``a`` hosts every service,
``b`` and ``c`` only StateSync (the set-up supported today: one Discovery per store).
Writers on two replicas commit at once; watchers on the others must see every change,
each once, in revision order, and the change log must read the same through any replica,
also when one replica is killed with SIGKILL in the middle of its writes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import struct_pb2

from agentcoord.statesync.v1 import statesync_service_pb2 as pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as pb_grpc
from tests.helpers import bearer
from tests.server.processes import ADMIN, Replicas

WRITERS_PER_REPLICA = 4
PUTS_PER_WRITER = 40
END_KEY = "shared/end"
"""Written last, after every writer is done: a watcher that sees it has seen everything."""
AUTH = bearer(ADMIN)


@pytest.fixture
async def cluster(replicas: Replicas) -> AsyncIterator[dict[str, pb_grpc.StateSyncServiceStub]]:
    """StateSync stubs of replica a (every service), b and c (StateSync only), by name."""
    await replicas.start()
    await asyncio.gather(*(replicas.start("statesync") for _ in range(2)))
    async with contextlib.AsyncExitStack() as stack:
        yield {
            name: pb_grpc.StateSyncServiceStub(
                await stack.enter_async_context(grpc.aio.insecure_channel(replica.address))
            )
            for name, replica in replicas.started.items()
        }


async def put(stub: pb_grpc.StateSyncServiceStub, key: str, value: float) -> int:
    request = pb.PutStateRequest(key=key, json=struct_pb2.Value(number_value=value))
    response = await stub.PutState(request, metadata=AUTH)
    return int(response.revision)


async def write_storm(stub: pb_grpc.StateSyncServiceStub, name: str) -> list[int]:
    """Concurrent writers on one replica: distinct keys, and one hot key shared by all."""

    async def writer(n: int) -> list[int]:
        revisions = []
        for i in range(PUTS_PER_WRITER):
            key = "shared/hot" if i % 4 == 0 else f"shared/{name}/{n}/{i}"
            revisions.append(await put(stub, key, i))
        return revisions

    done = await asyncio.gather(*(writer(n) for n in range(WRITERS_PER_REPLICA)))
    return [revision for revisions in done for revision in revisions]


class EventWatch:
    """A WatchEvents stream; :meth:`until_end` collects the events up to END_KEY's (the last)."""

    def __init__(self, stub: pb_grpc.StateSyncServiceStub) -> None:
        self.call = stub.WatchEvents(pb.WatchEventsRequest(), metadata=AUTH)
        self.events: list[pb.Event] = []

    async def registered(self) -> int:
        first = await self.call.read()
        assert isinstance(first, pb.WatchEventsResponse) and not first.events
        return int(first.revision)

    async def until_end(self) -> list[pb.Event]:
        while not self.events or self.events[-1].subject != END_KEY:
            response = await self.call.read()
            assert isinstance(response, pb.WatchEventsResponse), "the watch ended early"
            self.events.extend(response.events)
        self.call.cancel()
        return self.events


class StateWatch:
    """A WatchStates stream on ``shared/``; :meth:`until_end` collects up to END_KEY's."""

    def __init__(self, stub: pb_grpc.StateSyncServiceStub) -> None:
        self.call = stub.WatchStates(pb.WatchStatesRequest(prefix="shared/"), metadata=AUTH)
        self.changes: list[pb.StateChange] = []

    async def registered(self) -> int:
        first = await self.call.read()
        assert isinstance(first, pb.WatchStatesResponse) and not first.changes
        return int(first.revision)

    async def until_end(self) -> list[pb.StateChange]:
        while not self.changes or self.changes[-1].key != END_KEY:
            response = await self.call.read()
            assert isinstance(response, pb.WatchStatesResponse), "the watch ended early"
            self.changes.extend(response.changes)
        self.call.cancel()
        return self.changes


async def list_events(stub: pb_grpc.StateSyncServiceStub) -> list[pb.Event]:
    """The whole change log, page by page, through one replica."""
    events: list[pb.Event] = []
    token = ""
    while True:
        page = await stub.ListEvents(
            pb.ListEventsRequest(page_size=1000, page_token=token), metadata=AUTH
        )
        events.extend(page.events)
        token = page.next_page_token
        if not token:
            return events


async def test_watchers_on_other_replicas_see_every_change_once_in_order(
    cluster: dict[str, pb_grpc.StateSyncServiceStub],
) -> None:
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    events_b, events_c, states_b = EventWatch(b), EventWatch(c), StateWatch(b)
    starts = {await events_b.registered(), await events_c.registered(), await states_b.registered()}
    [start] = starts  # nothing written yet: all start at the same revision
    collected = asyncio.gather(events_b.until_end(), events_c.until_end(), states_b.until_end())

    acknowledged = await asyncio.gather(write_storm(a, "a"), write_storm(b, "b"))
    last = await put(a, END_KEY, 0)
    async with asyncio.timeout(60):
        seen_b, seen_c, changes_b = await collected

    written = sorted(acknowledged[0] + acknowledged[1] + [last])
    expected = list(range(start + 1, last + 1))
    assert written == expected  # every put is one change: both replicas share one order
    assert [event.revision for event in seen_b] == expected
    assert [event.revision for event in seen_c] == expected
    assert [change.revision for change in changes_b] == expected
    assert [change.key for change in changes_b] == [event.subject for event in seen_b]
    # Each replica reads the same change log, and it is what the watchers saw.
    log_a, log_b, log_c = await asyncio.gather(list_events(a), list_events(b), list_events(c))
    assert log_a == log_b == log_c == seen_b == seen_c


async def test_a_watch_resumed_on_another_replica_continues_without_gap_or_repeat(
    cluster: dict[str, pb_grpc.StateSyncServiceStub],
) -> None:
    a, b = cluster["a"], cluster["b"]
    revisions = [await put(a, f"shared/before/{n}", n) for n in range(10)]
    resume_after = revisions[4]  # a client of a that had seen five changes moves to b
    resumed = b.WatchEvents(pb.WatchEventsRequest(start_revision=resume_after), metadata=AUTH)
    await asyncio.gather(write_storm(a, "a"), write_storm(b, "b"))
    last = await put(a, END_KEY, 0)
    seen: list[int] = []
    async with asyncio.timeout(60):
        async for response in resumed:
            seen.extend(event.revision for event in response.events)
            if seen and seen[-1] == last:
                break
    resumed.cancel()
    assert seen == list(range(resume_after + 1, last + 1))


async def test_kill_9_of_a_replica_loses_no_acknowledged_write_and_stops_no_other_watch(
    replicas: Replicas, cluster: dict[str, pb_grpc.StateSyncServiceStub]
) -> None:
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    watch = EventWatch(c)
    start = await watch.registered()
    collected = asyncio.create_task(watch.until_end())
    acknowledged_on_b: dict[int, str] = {}
    enough = asyncio.Event()

    async def write_to_b(n: int) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):  # b dies under it
            for i in range(10_000):
                key = f"shared/b/{n}/{i}"
                acknowledged_on_b[await put(b, key, i)] = key
                if len(acknowledged_on_b) >= 100:
                    enough.set()

    b_writers = [asyncio.create_task(write_to_b(n)) for n in range(WRITERS_PER_REPLICA)]
    on_a = asyncio.create_task(write_storm(a, "a"))
    await enough.wait()
    replicas.started["b"].process.kill()  # SIGKILLed mid-storm
    await asyncio.gather(*b_writers)
    await on_a
    last = await put(a, END_KEY, 0)
    async with asyncio.timeout(60):
        seen = await collected
    assert [event.revision for event in seen] == list(range(start + 1, last + 1))
    subjects = {event.revision: event.subject for event in seen}
    assert all(subjects[revision] == key for revision, key in acknowledged_on_b.items())
    assert await list_events(a) == await list_events(c) == seen
