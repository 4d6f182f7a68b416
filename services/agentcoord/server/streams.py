"""Helpers for long-lived streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

from agentcoord.core.errors import Unavailable

T = TypeVar("T")


async def until_shutdown(source: AsyncIterator[T], shutdown: asyncio.Event) -> AsyncIterator[T]:
    """Yield from ``source`` until it ends or ``shutdown`` is set.

    Raises:
        Unavailable: the server began shutting down; the client should reconnect.
    """
    stopping = asyncio.ensure_future(shutdown.wait())
    try:
        while True:
            step = asyncio.ensure_future(anext(source))
            await asyncio.wait({step, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
                raise Unavailable("server is shutting down; reconnect", reason="SHUTTING_DOWN")
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        stopping.cancel()
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
