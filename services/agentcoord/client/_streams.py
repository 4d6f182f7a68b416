"""Server streams of the typed clients: open, confirm, chain, close, and when to resume."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from agentcoord.client._errors import RPCError, UnavailableError, typed_errors
from agentcoord.client._retry import RETRYABLE_CODES

Message = TypeVar("Message")

RESUMABLE_CODES = frozenset(
    {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED, *RETRYABLE_CODES}
)
"""Codes after which :meth:`StateClient.watch` resumes: outages (a server shutting down
cancels the calls it has not finished), and a slow-watcher cut-off."""


def is_resumable(error: RPCError, *, progressed: bool) -> bool:
    """Whether a watch that ended with ``error`` resumes from the last revision it reached.

    It resumes after UNAVAILABLE and CANCELLED (the server cancelled the call: it is
    shutting down, or could not accept it; a call cancelled here raises
    ``asyncio.CancelledError`` instead), and after RESOURCE_EXHAUSTED (a watcher cut off for
    being slow) if it made progress first: without progress (a message too large for the
    channel) the error would only recur.
    """
    return error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) or (
        error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and progressed
    )


async def open_stream(
    start: Callable[[], AsyncIterator[Message]],
) -> AsyncGenerator[Message, None]:
    """Start a watch stream; return once the server confirmed it with its first message.

    Raises:
        RPCError: (a typed subclass) the stream failed before its first message;
            UnavailableError if it ended without one.
    """
    with typed_errors():
        stream = start()
        first = await anext(stream, None)
    if first is None:
        await close_stream(stream)
        raise UnavailableError(grpc.StatusCode.UNAVAILABLE, "the watch ended at once")
    return _chain(first, stream)


async def _chain(first: Message, rest: AsyncIterator[Message]) -> AsyncGenerator[Message, None]:
    """Yield ``first``, then ``rest``; closing this closes ``rest``."""
    try:
        yield first
        async for response in rest:
            yield response
    finally:
        await close_stream(rest)


async def close_stream(stream: AsyncIterator[Any]) -> None:
    """Close ``stream`` (cancelling its call) if it is a generator."""
    if isinstance(stream, AsyncGenerator):
        await stream.aclose()
