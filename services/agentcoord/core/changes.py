"""Watch fan-out over the change log: replay from the store, then follow commits live.

The store's change log is the source of truth. A watcher first reads every change after
its start revision from the store, then follows the changes the store announces after
each commit. Revisions are contiguous store-wide, so a watcher that sees a gap (changes
committed by another process, or announcements it lost because it fell behind) goes back
to the store and reads what it missed. Nothing is skipped and nothing is sent twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from agentcoord.core.errors import OutOfRange
from agentcoord.core.models import Change
from agentcoord.store.base import Store

CATCH_UP_BATCH = 500
"""Changes read from the store per query while catching up."""


async def check_retained(store: Store, field: str, revision: int) -> None:
    """Refuse a start revision whose later changes compaction may have dropped.

    Raises:
        OutOfRange: ``revision`` is below the compact revision (reason ``REVISION_COMPACTED``).
    """
    compacted = await store.compact_revision()
    if revision and revision < compacted:
        raise OutOfRange(
            f"{field}: revision {revision} is compacted; the oldest kept is {compacted + 1}",
            reason="REVISION_COMPACTED",
            metadata={"compact_revision": str(compacted)},
        )


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """Changes a watcher receives at once."""

    changes: Sequence[Change]
    """Matching changes, in revision order; empty only in a watch's first batch."""
    revision: int
    """Revision the watcher has reached; resume after it."""


class _Subscriber:
    """A bounded queue of announced changes for one watcher."""

    def __init__(self, max_pending: int) -> None:
        self._queue: asyncio.Queue[Sequence[Change]] = asyncio.Queue(max_pending)
        self.lagged = False
        self.position = 0
        """Revision the watcher has reached."""

    def offer(self, changes: Sequence[Change]) -> bool:
        """Queue ``changes``; return False when the queue overflowed instead."""
        try:
            self._queue.put_nowait(changes)
        except asyncio.QueueFull:
            # The watcher fell behind: drop the queue; it re-reads the store instead.
            self.lagged = True
            self._queue = asyncio.Queue(self._queue.maxsize)
            return False
        return True

    async def next(self, timeout: float) -> Sequence[Change] | None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the result and drops
        # a cancellation that arrives as the queue delivers, and the watcher never ends.
        try:
            async with asyncio.timeout(timeout):
                return await self._queue.get()
        except TimeoutError:
            return None


class ChangeFeed:
    """Fans committed changes out to watchers."""

    def __init__(self, store: Store, *, poll_interval: float = 1.0, max_pending: int = 1024):
        """Subscribe to ``store``'s commits.

        Args:
            store: The store whose change log is watched.
            poll_interval: Seconds after which an idle watcher re-reads the store, so
                changes committed by other processes reach it too.
            max_pending: Commit announcements buffered per watcher before it is sent
                back to read the store.
        """
        self._store = store
        self._poll_interval = poll_interval
        self._max_pending = max_pending
        self._subscribers: set[_Subscriber] = set()
        self.overflows = 0
        """Times a watcher's queue overflowed (it fell behind and re-read the store)."""
        self._remove_listener = store.add_listener(self._announce)

    def close(self) -> None:
        """Stop following the store."""
        self._remove_listener()

    def watcher_positions(self) -> list[int]:
        """Return the revision each open watch has reached (its lag is the rest)."""
        return [subscriber.position for subscriber in self._subscribers]

    def _announce(self, changes: Sequence[Change]) -> None:
        for subscriber in self._subscribers:
            if not subscriber.offer(changes):
                self.overflows += 1

    async def watch(
        self, start_revision: int, matches: Callable[[Change], bool]
    ) -> AsyncIterator[WatchBatch]:
        """Yield the matching changes after ``start_revision`` (0: from now on), forever.

        The first batch comes as soon as the watch is registered: it has no changes and
        the revision the watch starts after, so a client that waits for it misses no
        change made afterwards. Every later batch has at least one matching change.
        """
        subscriber = _Subscriber(self._max_pending)
        self._subscribers.add(subscriber)
        try:
            last = start_revision if start_revision > 0 else await self._store.current_revision()
            subscriber.position = last
            yield WatchBatch([], last)
            while True:
                async for batch in self._catch_up(last, matches):
                    last = subscriber.position = batch.revision
                    if batch.changes:
                        yield batch
                subscriber.lagged = False
                while not subscriber.lagged:
                    announced = await subscriber.next(self._poll_interval)
                    if announced is None:
                        break  # idle: look in the store for other processes' changes
                    fresh = [change for change in announced if change.revision > last]
                    if not fresh:
                        continue
                    if fresh[0].revision != last + 1:
                        break  # a gap: the store has what we missed
                    last = subscriber.position = fresh[-1].revision
                    matching = [c for c in fresh if matches(c)]
                    if matching:
                        yield WatchBatch(matching, last)
        finally:
            self._subscribers.discard(subscriber)

    async def _catch_up(
        self, after: int, matches: Callable[[Change], bool]
    ) -> AsyncIterator[WatchBatch]:
        while True:
            changes = await self._store.list_changes(after, CATCH_UP_BATCH)
            if not changes:
                return
            after = changes[-1].revision
            yield WatchBatch([c for c in changes if matches(c)], after)
            if len(changes) < CATCH_UP_BATCH:
                return
