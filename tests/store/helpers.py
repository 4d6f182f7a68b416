"""Helpers of the store contract suites."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from agentcoord.core.models import Change, ChangeFilter
from agentcoord.core.store import Store
from agentcoord.store.factory import open_store


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[Store]:
    """Open another store on the same database (a restart, or another replica)."""
    store = open_store(url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def all_changes(store: Store, where: ChangeFilter | None = None) -> list[Change]:
    """Return the whole change log (that passes ``where``)."""
    return await store.list_changes(0, 100_000, where)
