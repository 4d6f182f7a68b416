"""PostgreSQL stores of one database hear each other's commits (LISTEN/NOTIFY).

Two stores on one schema stand for two replicas: what one commits reaches the other's
change listeners, each change once and in revision order, and still does after the
listening connections are killed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest

from agentcoord.core.models import Change
from agentcoord.core.store import Store
from agentcoord.store.postgres.follow import channel_name
from tests.helpers import eventually
from tests.store.helpers import all_changes, opened
from tests.store.test_state_store import put, write


class Heard:
    """The revisions a store's change listener was called with, call by call."""

    def __init__(self, store: Store) -> None:
        self.calls: list[list[int]] = []
        store.add_listener(self._hear)

    def _hear(self, changes: Sequence[Change]) -> None:
        self.calls.append([change.revision for change in changes])

    @property
    def revisions(self) -> list[int]:
        return [revision for call in self.calls for revision in call]


@pytest.fixture
async def replicas(postgres_url: str) -> AsyncIterator[tuple[Store, Store]]:
    async with opened(postgres_url) as a, opened(postgres_url) as b:
        yield a, b


async def put_keys(store: Store, count: int, prefix: str = "shared/k") -> None:
    for n in range(count):
        await store.write_states(write(put(f"{prefix}{n}", n)))


async def test_commits_of_another_store_reach_the_listeners_once_in_order(
    replicas: tuple[Store, Store],
) -> None:
    a, b = replicas
    heard = Heard(b)
    await put_keys(a, 30)
    await asyncio.gather(*(a.write_states(write(put(f"shared/c{n}", n))) for n in range(40)))

    async def all_heard() -> bool:
        return len(heard.revisions) >= 70

    await eventually(all_heard)
    assert heard.revisions == list(range(1, 71))
    assert [c.revision for c in await all_changes(b)] == heard.revisions


async def test_a_store_does_not_hear_its_own_commits_twice(replicas: tuple[Store, Store]) -> None:
    a, b = replicas
    heard = Heard(a)
    await put_keys(a, 5)
    await b.write_states(write(put("shared/from-b")))  # heard after a's own five

    async def six() -> bool:
        return len(heard.revisions) >= 6

    await eventually(six)
    assert heard.calls == [[1], [2], [3], [4], [5], [6]]


async def test_it_listens_again_after_losing_its_connection(
    postgres_url: str, replicas: tuple[Store, Store]
) -> None:
    a, b = replicas
    heard = Heard(b)
    await put_keys(a, 3)

    async def three() -> bool:
        return len(heard.revisions) >= 3

    await eventually(three)
    assert b.hears_every_commit()  # so its idle watchers need not read the change log
    schema = postgres_url.rpartition("schema=")[2]
    listen = f'LISTEN "{channel_name(schema)}"'
    admin = await asyncpg.connect(postgres_url.partition("?")[0])
    try:
        killed = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = $1", listen
        )
        assert len(killed) == 2  # the listening connections of a and b
        await put_keys(a, 3, "shared/after")  # committed while b may not listen yet

        async def six() -> bool:
            return len(heard.revisions) >= 6

        await eventually(six)
        assert heard.revisions == [1, 2, 3, 4, 5, 6]
        await put_keys(a, 1, "shared/later")  # heard through the new connection

        async def seven() -> bool:
            listening = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query = $1", listen
            )
            return listening == 2 and len(heard.revisions) >= 7

        await eventually(seven)
        assert heard.revisions == list(range(1, 8))
        assert b.hears_every_commit()
    finally:
        await admin.close()
