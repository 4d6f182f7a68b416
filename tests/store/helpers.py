"""Helpers of the store contract suites."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

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


@asynccontextmanager
async def raw_postgres(url: str) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """Connect with the driver, not the store, to a PostgreSQL store URL; yield its schema too."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    schema = dict(query)["schema"]
    dsn = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query if k != "schema"])))
    conn = await asyncpg.connect(dsn)
    try:
        yield conn, schema
    finally:
        await conn.close()
