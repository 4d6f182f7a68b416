"""Background loops of the core."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def run_periodically(
    stop: asyncio.Event, interval: float, step: Callable[[], Awaitable[None]], name: str
) -> None:
    """Await ``step`` every ``interval`` seconds until ``stop`` is set.

    A failing step is logged and the loop goes on, so a transient store outage does not
    end expiry or flushing for good.
    """
    while not stop.is_set():
        try:
            await step()
        except Exception:
            log.exception("%s failed; retrying in %.2fs", name, interval)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):  # not wait_for: it can drop a cancellation
                await stop.wait()
