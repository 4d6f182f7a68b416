"""Following the commits of other processes on one PostgreSQL database: LISTEN/NOTIFY.

Every batch that appends changes sends ``NOTIFY <channel>, '<last revision> <origin>'``
inside its transaction, so the notice is delivered when, and only if, the batch commits
(see the Flush statement in :mod:`agentcoord.store.postgres.store`). The channel is named
after the schema, so deployments in other schemas of the database are not heard. Each
store LISTENs on a dedicated connection with a :class:`Follower`: a notice from another
store wakes it, it reads the change log after the last revision it has announced and
hands those changes to the store's change listeners, as if committed here. Notices of its
own commits are skipped: the group committer has announced those already.

The follower reconnects when its connection is lost, and reads what it missed once it
listens again. While it cannot listen (:attr:`Follower.listening` is False), the change
feed's idle poll (the watchers' own re-read of the change log) still brings other
processes' changes, later.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from agentcoord.core.models import Change

log = logging.getLogger(__name__)

READ_BATCH = 500
"""Changes read per query when following."""
RECONNECT_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
"""Seconds between attempts to listen again after losing the connection; the last repeats."""

Connect = Callable[[], Awaitable[asyncpg.Connection]]
ReadChanges = Callable[[int, int], Awaitable[Sequence[Change]]]
Announce = Callable[[Sequence[Change]], None]


def channel_name(schema: str) -> str:
    """Return the NOTIFY channel of the tables in ``schema`` (PostgreSQL allows 63 bytes)."""
    name = f"agentcoord.{schema}"
    if len(name.encode()) <= 63:
        return name
    return f"agentcoord.{hashlib.sha256(schema.encode()).hexdigest()[:40]}"


class Follower:
    """Announces the changes that other stores commit, woken by their NOTIFY."""

    def __init__(self, connect: Connect, read: ReadChanges, announce: Announce) -> None:
        """Listen through a connection from ``connect`` once started.

        Args:
            connect: Opens the dedicated listening connection.
            read: ``read(after_revision, limit)`` reads the change log, in revision order.
            announce: Hands changes to the store's change listeners.
        """
        self.channel = ""
        """The NOTIFY channel of the store's schema (set by :meth:`start`)."""
        self.origin = secrets.token_hex(8)
        """Tag of this store's notices, so that it skips its own."""
        self._connect = connect
        self._read = read
        self._announce = announce
        self._seen = 0
        self._wanted = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.listening = False
        """Whether it listens: every notice of another store's commit reaches it."""

    def notice(self, last_revision: int) -> str:
        """Return the payload this store NOTIFYs after a batch whose last change is that."""
        return f"{last_revision} {self.origin}"

    def start(self, channel: str, revision: int) -> None:
        """Follow the commits noticed on ``channel`` after ``revision`` (the current one)."""
        self.channel = channel
        self._seen = self._wanted = revision
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="agentcoord-postgres-follower"
        )

    def saw(self, changes: Sequence[Change]) -> None:
        """Note changes announced to the listeners (a change listener of the store)."""
        self._seen = max(self._seen, changes[-1].revision)

    async def close(self) -> None:
        """Stop listening."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        revision, _, origin = payload.partition(" ")
        if origin != self.origin and revision.isdigit():
            self._wanted = max(self._wanted, int(revision))
            self._wake.set()

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._listen()
                failures = 0  # it listened, then lost the connection
            except Exception as error:  # the database is away: listen again later
                delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
                failures += 1
                log.warning(
                    "not following other processes' commits (%s); retry in %gs", error, delay
                )
                await asyncio.sleep(delay)

    async def _listen(self) -> None:
        """Listen until the connection is lost; read every change noticed meanwhile."""
        conn = await self._connect()
        try:
            conn.add_termination_listener(lambda _conn: self._wake.set())
            await conn.add_listener(self.channel, self._notified)
            self.listening = True
            # What other stores committed while this one did not listen.
            self._wanted = max(self._wanted, self._seen + 1)
            while not conn.is_closed():
                if self._wanted > self._seen:
                    await self._catch_up()
                else:
                    self._wake.clear()
                    await self._wake.wait()
        finally:
            self.listening = False
            conn.terminate()

    async def _catch_up(self) -> None:
        """Announce every change after the last one announced."""
        wanted = self._wanted
        while True:
            changes = await self._read(self._seen, READ_BATCH)
            if changes:
                self._seen = max(self._seen, changes[-1].revision)
                self._announce(changes)
            if len(changes) < READ_BATCH:
                break
        if self._wanted == wanted:  # no newer notice came while reading
            self._wanted = self._seen
