"""Background loops of the core."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable

from agentcoord.core.errors import Unavailable

log = logging.getLogger(__name__)

UNAVAILABLE_LOG_INTERVAL = 10.0
"""Seconds (of steps) between two log lines of one loop about an unavailable store."""


async def run_periodically(
    stop: asyncio.Event, interval: float, step: Callable[[], Awaitable[None]], name: str
) -> None:
    """Await ``step`` every ``interval`` seconds until ``stop`` is set.

    A failing step is logged and the loop goes on, so a transient store outage does not
    end expiry or flushing for good. An unavailable store (the store logs why) is one
    line per :data:`UNAVAILABLE_LOG_INTERVAL`, not a traceback per step.
    """
    # Counted in steps, not read from a clock: the core takes no time but its Clock's.
    quiet_steps = max(1, math.ceil(UNAVAILABLE_LOG_INTERVAL / max(interval, 1e-3)))
    unavailable = 0
    while not stop.is_set():
        try:
            await step()
            unavailable = 0
        except Unavailable as error:
            if unavailable % quiet_steps == 0:
                log.warning("%s: %s; retrying every %.2fs", name, error.message, interval)
            unavailable += 1
        except Exception:
            log.exception("%s failed; retrying in %.2fs", name, interval)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):  # not wait_for: it can drop a cancellation
                await stop.wait()
