"""Recently read state entries of an SQLite store, served while no write is in flight.

The SQLite store is the only writer of its file (a second process is refused, and a
second store of the same process turns the cache off), and every write goes through its
group committer, one batch at a time. What a batch writes becomes visible to readers only
at its COMMIT, so until then an entry read stays current, and so does the revision. The
store keeps the cache exact:

- the writer thread raises a flag just before it runs COMMIT, and the event loop lowers it
  only after, on the loop and before the batch's callers are answered, it has dropped the
  keys the batch wrote and taken the revision the batch left (a batch that rolled anything
  back, or failed, empties the cache);
- reads are served from the cache, and fill it, only while the flag is down: a read that
  found it down before and after its SQL statement read what was committed before that
  COMMIT, and a read served from the cache is ordered before it (the flag and the cache
  are read under the GIL, in the order the two threads set them).

Entries are kept as the database returned them (TTL expiry is a write of the sweep, so a
cached entry expires as a stored one does). The cache is bounded in entries and in value
bytes, least recently read first out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from agentcoord.core.models import StateEntry

MAX_ENTRIES = 4096
"""Keys kept at most."""
MAX_VALUE_BYTES = 16 * 1024 * 1024
"""Bytes of values kept at most."""


@dataclass(slots=True)
class Written:
    """What one batch wrote to the states (collected on the writer thread)."""

    keys: set[str] = field(default_factory=set)
    """Keys written or deleted (by any flush, rolled back or not)."""
    revision: int | None = None
    """The revision counter the batch's last flush set; None if it flushed nothing."""
    rolled_back: bool = False
    """Whether any part of the batch was rolled back (then nothing of the cache is kept)."""


class StateCache:
    """Entries (None: known missing) of recently read keys, and the store's revision."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_VALUE_BYTES) -> None:
        """Keep at most ``max_entries`` keys and ``max_bytes`` bytes of values."""
        self._entries: OrderedDict[str, StateEntry | None] = OrderedDict()
        self._bytes = 0
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self.revision: int | None = None
        """The store's current revision, when known."""

    def get(self, key: str) -> tuple[StateEntry | None, int] | None:
        """Return the entry of ``key`` and the revision, or None when either is not known."""
        revision = self.revision
        if revision is None or key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key], revision

    def put(self, key: str, entry: StateEntry | None, revision: int) -> None:
        """Keep what a read returned: ``key``'s entry (or None) at ``revision``."""
        self.revision = revision
        self._drop(key)
        size = len(entry.value.data) if entry is not None else 0
        if size > self._max_bytes:
            return
        self._entries[key] = entry
        self._bytes += size
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))

    def written(self, written: Written) -> None:
        """Forget what a committed batch changed."""
        if written.rolled_back:
            self.clear()
            return
        self.forget(written.keys)
        if written.revision is not None:
            self.revision = written.revision

    def forget(self, keys: Iterable[str]) -> None:
        """Drop these keys."""
        for key in keys:
            self._drop(key)

    def clear(self) -> None:
        """Drop everything, the revision included."""
        self._entries.clear()
        self._bytes = 0
        self.revision = None

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry.value.data)
