"""Long-lived streams end promptly, with UNAVAILABLE, when the server shuts down."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from agentcoord.core.errors import Unavailable


class StreamTracker:
    """Knows the tasks serving long-lived streams, so shutdown can end them at once.

    Tracking costs nothing per message: a stream's task is cancelled only at shutdown,
    and the cancellation is turned into UNAVAILABLE so clients reconnect elsewhere or
    after the restart, instead of waiting out the grace period.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()
        self._closing = False

    @contextmanager
    def track(self) -> Iterator[None]:
        """Serve one stream inside this block.

        Raises:
            Unavailable: the server is shutting down (also when it already was).
        """
        task = asyncio.current_task()
        if self._closing or task is None:
            raise Unavailable("server is shutting down; reconnect", reason="SHUTTING_DOWN")
        self._tasks.add(task)
        try:
            yield
        except asyncio.CancelledError:
            if not self._closing:
                raise
            task.uncancel()
            raise Unavailable(
                "server is shutting down; reconnect", reason="SHUTTING_DOWN"
            ) from None
        finally:
            self._tasks.discard(task)

    def close_all(self) -> None:
        """End every tracked stream with UNAVAILABLE and refuse new ones."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
