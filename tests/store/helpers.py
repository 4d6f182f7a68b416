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


def driver_dsn(url: str) -> str:
    """The PostgreSQL store URL ``url`` as the driver takes it: without its ``schema``."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "schema"]
    return urlunsplit(parts._replace(query=urlencode(query)))


@asynccontextmanager
async def raw_postgres(url: str) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """Connect with the driver, not the store, to a PostgreSQL store URL; yield its schema too."""
    schema = dict(parse_qsl(urlsplit(url).query))["schema"]
    conn = await asyncpg.connect(driver_dsn(url))
    try:
        yield conn, schema
    finally:
        await conn.close()
