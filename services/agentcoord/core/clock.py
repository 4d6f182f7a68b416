"""Time is injected into the core, never read ad hoc."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Source of time for the core."""

    def monotonic(self) -> float:
        """Return seconds on a clock that never goes back; judges expiry."""
        ...

    def now(self) -> datetime:
        """Return the wall-clock time in UTC; only recorded, never used to judge expiry."""
        ...


class SystemClock:
    """The real clock of this process."""

    def monotonic(self) -> float:
        """Return ``time.monotonic()``."""
        return time.monotonic()

    def now(self) -> datetime:
        """Return the current UTC time."""
        return datetime.now(UTC)
