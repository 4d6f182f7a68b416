"""The sweeping leader among stores of one schema: a PostgreSQL advisory lock.

Two stores on one schema stand for two replicas: one leads at a time; when its lock
connection is killed it stops leading, and one of them leads again. A store that one
process owns (SQLite) always leads.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import asyncpg

from agentcoord.core.store import Store
from agentcoord.store.postgres.leader import Leadership, leader_key
from tests.helpers import eventually
from tests.store.helpers import driver_dsn, opened, raw_postgres

CLOSES = 300
"""Leaderships started and closed by the shutdown test."""
CLOSE_LIMIT = 5.0
"""Seconds a close may take there; it takes milliseconds."""

HOLDER = (
    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1"
)
"""The backend holding an advisory lock on a bigint key (its high and low 32 bits)."""


async def lock_holders(admin: asyncpg.Connection, key: int) -> list[int]:
    """The backends holding the advisory lock ``key`` (one at most)."""
    rows = await admin.fetch(HOLDER, (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF)
    return [row["pid"] for row in rows]


async def exactly_one_leads(stores: tuple[Store, Store]) -> bool:
    return sum(store.is_leader() for store in stores) == 1


async def test_a_leader_whose_lock_connection_is_killed_stops_and_one_store_leads_again(
    postgres_url: str,
) -> None:
    async with opened(postgres_url) as a, opened(postgres_url) as b:
        await eventually(lambda: exactly_one_leads((a, b)))
        leader = a if a.is_leader() else b
        async with raw_postgres(postgres_url) as (admin, schema):
            key = leader_key(schema)
            holders = await lock_holders(admin, key)
            assert len(holders) == 1  # the leader's lock connection
            await admin.execute("SELECT pg_terminate_backend($1)", holders[0])

            async def stopped() -> bool:
                return not leader.is_leader()

            await eventually(stopped)
            await eventually(lambda: exactly_one_leads((a, b)))
            again = await lock_holders(admin, key)
            assert len(again) == 1 and again != holders  # a new session holds it


async def test_a_store_one_process_owns_always_leads_and_hears_every_commit(
    tmp_path: Path,
) -> None:
    async with opened(f"sqlite:///{tmp_path / 'leader.db'}") as store:
        assert store.is_leader()
        assert store.hears_every_commit()  # its idle watchers need not read the change log


async def test_closing_a_leadership_always_stops_it(postgres_url: str) -> None:
    """close() returns wherever its cancellation finds the lock loop.

    With a 2 ms interval the loop is nearly always inside one of its timeouts. On Python
    3.11 an asyncio.wait_for there swallowed close()'s cancellation now and then (CPython
    issue 86296: 28 of 300 closes hung), so a replica's shutdown waited forever.
    """
    connect = functools.partial(asyncpg.connect, driver_dsn(postgres_url))
    for attempt in range(CLOSES):
        leadership = Leadership(connect, interval=0.002)
        await leadership.start(leader_key(f"close-test-{attempt}"))
        await asyncio.sleep((attempt % 16) * 0.002)
        async with asyncio.timeout(CLOSE_LIMIT):
            await leadership.close()
        assert not leadership.is_leader()
