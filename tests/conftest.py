"""Fixtures shared by every test: a clean environment and a store on each back end."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

from agentcoord.store.base import Store
from agentcoord.store.factory import open_store

POSTGRES_DSN_VARIABLE = "AGENTCOORD_TEST_POSTGRES_DSN"
"""Where the PostgreSQL tests connect; they are skipped when it is not set."""


@pytest.fixture(autouse=True)
def _scrub_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide the developer's AGENTCOORD_* settings from the code under test."""
    for name in list(os.environ):
        if name.startswith("AGENTCOORD_") and name != POSTGRES_DSN_VARIABLE:
            monkeypatch.delenv(name)


def with_query(url: str, **params: str) -> str:
    """Return ``url`` with ``params`` added to its query string."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A store URL of a fresh, empty database: an SQLite file, or a PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'agentcoord.db'}"
        return
    dsn = os.environ.get(POSTGRES_DSN_VARIABLE)
    if not dsn:
        pytest.skip(f"{POSTGRES_DSN_VARIABLE} is not set")
    schema = f"t_{uuid.uuid4().hex}"
    yield with_query(dsn, schema=schema)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """An open store on ``store_url``, closed afterwards."""
    store = open_store(store_url)
    await store.open()
    yield store
    await store.close()
