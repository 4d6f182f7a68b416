"""Watch fan-out over the change log: replay from the store, then follow commits live.

The store's change log is the source of truth. A watcher first reads every change after
its start revision from the store, then follows the changes the store announces after
each commit. Revisions are contiguous store-wide, so a watcher that sees a gap (changes
committed by another process, or announcements it lost because it fell behind) goes back
to the store and reads what it missed. Nothing is skipped and nothing is sent twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass

from agentcoord.core.errors import OutOfRange
from agentcoord.core.models import Change
from agentcoord.core.store import Store

CATCH_UP_BATCH = 100
"""Changes read from the store per query while catching up (a short turn of the loop)."""
DEFAULT_PENDING_BYTES = 8 * 1024 * 1024
"""Bytes of announced changes held per watcher before it is sent back to the store."""
SAFETY_READ_INTERVAL = 30.0
"""Seconds after which an idle watcher reads the store even though the store hears every
commit (:meth:`Store.hears_every_commit`): a guard, not a path changes need."""
_CHANGE_OVERHEAD = 64
"""Bytes counted per change beside its text (revision, time, service)."""


def change_size(change: Change) -> int:
    """Return the approximate bytes a change holds: its text fields and its details."""
    return (
        _CHANGE_OVERHEAD
        + len(change.kind)
        + len(change.subject)
        + len(change.agent_id)
        + _json_size(change.details)
    )


def _json_size(value: object) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(len(key) + _json_size(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return sum(_json_size(item) for item in value)
    return 8


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
    """The announced changes one watcher has not taken yet, bounded in bytes.

    Past ``max_bytes`` the subscriber drops what it holds and is marked lagged: its
    watcher reads the store instead, one bounded page at a time. So a watcher that
    stops reading holds at most ``max_bytes`` of announced changes and one page.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._pending: list[Sequence[Change]] = []
        self._bytes = 0
        self._wakeup = asyncio.Event()
        self.lagged = False
        self.position = 0
        """Revision the watcher has reached."""

    @property
    def held_bytes(self) -> int:
        """Bytes of the changes queued and not taken yet."""
        return self._bytes

    def offer(self, changes: Sequence[Change], size: int) -> bool:
        """Queue ``changes`` (``size`` bytes); False: past the bound, all dropped, lagged."""
        self._wakeup.set()
        if self._bytes + size > self._max_bytes:
            self.lagged = True
            self._pending, self._bytes = [], 0
            return False
        self._pending.append(changes)
        self._bytes += size
        return True

    async def next(self, timeout: float) -> list[Change] | None:
        """Take every change queued (waiting up to ``timeout``); None when none came."""
        if not self._pending and not self.lagged:
            self._wakeup.clear()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the result and
            # drops a cancellation that arrives as the event is set; the watcher never ends.
            try:
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            except TimeoutError:
                return None
        taken = [change for changes in self._pending for change in changes]
        self._pending, self._bytes = [], 0
        return taken


def _following(changes: Sequence[Change], last: int) -> tuple[list[Change], bool]:
    """Return the changes that follow on from ``last`` one by one, and whether a gap came.

    Changes at or before a revision already taken are skipped (overlapping announcements).
    """
    taken: list[Change] = []
    for change in changes:
        if change.revision <= last:
            continue
        if change.revision != last + 1:
            return taken, True
        taken.append(change)
        last = change.revision
    return taken, False


class ChangeFeed:
    """Fans committed changes out to watchers."""

    def __init__(
        self,
        store: Store,
        *,
        poll_interval: float = 1.0,
        max_pending_bytes: int = DEFAULT_PENDING_BYTES,
    ):
        """Subscribe to ``store``'s commits.

        Args:
            store: The store whose change log is watched.
            poll_interval: Seconds after which an idle watcher re-reads the store while
                the store does not hear every commit (:meth:`Store.hears_every_commit`:
                a PostgreSQL replica whose LISTEN connection is down), so changes
                committed by other processes reach it too. While it hears them, an idle
                watcher reads the store only every ``SAFETY_READ_INTERVAL``.
            max_pending_bytes: Bytes of announced changes held per watcher before it is
                sent back to read the store; a store page read while catching up holds
                at most an eighth of it.
        """
        self._store = store
        self._poll_interval = poll_interval
        self._max_pending_bytes = max_pending_bytes
        self._page_bytes = max(1, max_pending_bytes // 8)
        self._subscribers: set[_Subscriber] = set()
        self.overflows = 0
        """Times a watcher's queue overflowed (it fell behind and re-read the store)."""
        self._remove_listener = store.add_listener(self._announce)
        self._reading = asyncio.Lock()
        """Held by one catching-up watcher at a time, so replays share the loop fairly."""

    def close(self) -> None:
        """Stop following the store."""
        self._remove_listener()

    def watcher_positions(self) -> list[int]:
        """Return the revision each open watch has reached (its lag is the rest)."""
        return [subscriber.position for subscriber in self._subscribers]

    def held_bytes(self) -> int:
        """Return the bytes of announced changes held for all watchers (for monitoring)."""
        return sum(subscriber.held_bytes for subscriber in self._subscribers)

    def _announce(self, changes: Sequence[Change]) -> None:
        size = sum(change_size(change) for change in changes)
        for subscriber in self._subscribers:
            if not subscriber.offer(changes, size):
                self.overflows += 1

    async def watch(
        self, start_revision: int, matches: Callable[[Change], bool]
    ) -> AsyncIterator[WatchBatch]:
        """Yield the matching changes after ``start_revision`` (0: from now on), forever.

        The first batch comes as soon as the watch is registered: it has no changes and
        the revision the watch starts after, so a client that waits for it misses no
        change made afterwards. Every later batch has at least one matching change.
        """
        subscriber = _Subscriber(self._max_pending_bytes)
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
                read_at = self._monotonic()
                while not subscriber.lagged:
                    announced = await subscriber.next(self._poll_interval)
                    if announced is None:
                        if self._hears_all_since(read_at):
                            continue  # idle, and no commit can have been missed
                        break  # idle: look in the store for other processes' changes
                    # Announcements may overlap (another process's commits read back):
                    # take the changes that follow on, up to a gap.
                    fresh, gap = _following(announced, last)
                    if fresh:
                        last = subscriber.position = fresh[-1].revision
                        matching = [c for c in fresh if matches(c)]
                        if matching:
                            yield WatchBatch(matching, last)
                    if gap:
                        break  # the store has what we missed
        finally:
            self._subscribers.discard(subscriber)

    @staticmethod
    def _monotonic() -> float:
        return asyncio.get_running_loop().time()

    def _hears_all_since(self, read_at: float) -> bool:
        """Whether an idle watcher that last read the store at ``read_at`` may wait on."""
        recent = self._monotonic() - read_at < SAFETY_READ_INTERVAL
        return recent and self._store.hears_every_commit()

    async def _catch_up(
        self, after: int, matches: Callable[[Change], bool]
    ) -> AsyncIterator[WatchBatch]:
        """Read the store from ``after`` to its head in pages bounded in count and bytes.

        One watcher reads at a time and lets the loop run between pages, so many
        watchers replaying a long log do not starve other calls.
        """
        while True:
            async with self._reading:
                changes = await self._store.list_changes(
                    after, CATCH_UP_BATCH, max_bytes=self._page_bytes
                )
                matching = [c for c in changes if matches(c)]
            await asyncio.sleep(0)
            if not changes:
                return
            after = changes[-1].revision
            yield WatchBatch(matching, after)
            # Short: the head of the log, unless the page was cut by bytes (it then holds
            # at least the budget: its last change crossed it).
            if len(changes) < CATCH_UP_BATCH and (
                sum(map(change_size, changes)) < self._page_bytes // 2
            ):
                return
