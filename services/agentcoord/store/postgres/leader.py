"""Which replica sweeps: a PostgreSQL session-level advisory lock on one dedicated connection.

Every store sharing a schema tries ``pg_try_advisory_lock(key)`` (the key derived from the
schema, so deployments in other schemas of the database lead their own) every
``interval`` seconds; the one that gets it leads while its connection lives. PostgreSQL
frees the lock when that connection ends, so when the leader dies (even ``kill -9``)
another store takes it at its next try: within ``interval`` of PostgreSQL noticing the
closed connection (at once for a process killed on a live host; after TCP keepalive for a
host that vanished). The leader checks its connection every ``interval`` too, and stops
leading the moment the connection is lost or a check fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg

log = logging.getLogger(__name__)

Connect = Callable[[], Awaitable[asyncpg.Connection]]
FIRST_TRY_TIMEOUT = 5.0
"""Seconds :meth:`Leadership.start` waits at most for the first try's answer."""


def leader_key(schema: str) -> int:
    """Return the advisory lock key of the leader of the tables in ``schema`` (a bigint)."""
    digest = hashlib.sha256(f"agentcoord.leader.{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Leadership:
    """Holds, or keeps trying to take, the leader's advisory lock."""

    def __init__(self, connect: Connect, interval: float) -> None:
        """Try through a connection from ``connect`` every ``interval`` seconds once started."""
        self._connect = connect
        self._interval = interval
        self._leading = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._tried = asyncio.Event()
        """Set once the first try has an answer (or failed)."""

    def is_leader(self) -> bool:
        """Whether this store holds the lock (its connection is up and answered last check)."""
        return self._leading

    async def start(self, key: int) -> None:
        """Start trying to take the lock ``key``; return once the first try has an answer.

        So a store that starts alone on its schema leads as soon as it is open. The wait
        is bounded by ``FIRST_TRY_TIMEOUT``; the tries go on in the background anyway.
        """
        self._task = asyncio.get_running_loop().create_task(
            self._run(key), name="agentcoord-postgres-leadership"
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FIRST_TRY_TIMEOUT):
                await self._tried.wait()

    async def close(self) -> None:
        """Stop leading (closing the connection frees the lock) and stop trying."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self, key: int) -> None:
        while True:
            try:
                await self._hold(key)
            except Exception as error:  # the database is away: try again later
                log.warning("leadership: cannot reach the database (%s)", error)
                self._tried.set()
            await asyncio.sleep(self._interval)

    async def _hold(self, key: int) -> None:
        """Take the lock once free and hold it until the connection is lost or fails."""
        conn = await self._connect()
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: self._lose(lost))
        try:
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
                self._tried.set()
                await asyncio.sleep(self._interval)
            self._leading = True
            self._tried.set()
            log.info("leadership gained: this replica sweeps expiries and lease deadlines")
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
            # cancellation of close() (CPython issue 86296), and close() then waits forever.
            while not lost.is_set():
                try:
                    async with asyncio.timeout(self._interval):
                        await lost.wait()
                except TimeoutError:
                    async with asyncio.timeout(self._interval):
                        await conn.fetchval("SELECT 1")
        finally:
            self._lose(lost)
            conn.terminate()

    def _lose(self, lost: asyncio.Event) -> None:
        lost.set()
        if self._leading:
            self._leading = False
            if self._closing:
                log.info("leadership released: this replica stops")
            else:
                log.warning("leadership lost: this replica no longer sweeps")
