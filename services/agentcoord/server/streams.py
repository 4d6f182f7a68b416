"""Long-lived streams: a bounded number per agent session, ended promptly at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message

from agentcoord.core.changes import change_size
from agentcoord.core.errors import ResourceExhausted, Unavailable
from agentcoord.core.models import Change
from agentcoord.server.auth import current_identity

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_MAX_STREAMS_PER_SESSION = 64
"""Streams one agent session may hold open at once, unless configured otherwise."""
DEFAULT_CHANGE_PROTO_BYTES = 8 * 1024 * 1024
"""Bytes of changes whose wire forms one :class:`ChangeProtos` keeps."""


class StreamTracker:
    """Knows the tasks serving long-lived streams, so shutdown can end them at once.

    Tracking costs nothing per message: a stream's task is cancelled only at shutdown,
    and the cancellation is turned into UNAVAILABLE so clients reconnect elsewhere or
    after the restart, instead of waiting out the grace period. Streams opened with a
    session token (Heartbeat, StreamAssignments, and watches) count against that
    session's limit.
    """

    def __init__(self, max_per_session: int = DEFAULT_MAX_STREAMS_PER_SESSION) -> None:
        """Allow ``max_per_session`` open streams per agent session."""
        self._tasks: set[asyncio.Task[object]] = set()
        self._closing = False
        self._max_per_session = max_per_session
        self._per_session: Counter[tuple[str, int]] = Counter()

    @contextmanager
    def track(self) -> Iterator[None]:
        """Serve one stream of the current caller inside this block.

        Raises:
            Unavailable: the server is shutting down (also when it already was).
            ResourceExhausted: the caller's session has as many streams open as allowed
                (reason ``TOO_MANY_STREAMS``).
        """
        task = asyncio.current_task()
        if self._closing or task is None:
            raise Unavailable("server is shutting down; reconnect", reason="SHUTTING_DOWN")
        session = current_identity().session
        key = (session.agent_id, session.epoch) if session is not None else None
        if key is not None:
            if self._per_session[key] >= self._max_per_session:
                raise ResourceExhausted(
                    f"agent {key[0]!r} has {self._per_session[key]} streams open, the most one "
                    f"session may (--max-streams-per-session {self._max_per_session}); "
                    "close one first",
                    reason="TOO_MANY_STREAMS",
                    metadata={"limit": str(self._max_per_session), "agent_id": key[0]},
                )
            self._per_session[key] += 1
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
            if key is not None:
                self._per_session[key] -= 1
                if not self._per_session[key]:
                    del self._per_session[key]

    def close_all(self) -> None:
        """End every tracked stream with UNAVAILABLE and refuse new ones."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()


M = TypeVar("M", bound=Message)
R = TypeVar("R")


async def messages_within(
    requests: AsyncIterator[R], seconds: float, context: Context, flag: str
) -> AsyncIterator[R]:
    """Yield a client stream's messages; end the call if none comes for ``seconds``.

    A stream that never sends would otherwise hold its call for good. The call ends with
    DEADLINE_EXCEEDED, naming ``flag``, the setting the limit comes from.
    """
    stream = aiter(requests)
    while True:
        try:
            async with asyncio.timeout(seconds):
                message = await anext(stream)
        except StopAsyncIteration:
            return
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no message on this stream for {seconds:g} s ({flag})",
            )
        yield message


async def messages_and_end(
    requests: AsyncIterator[R], end: asyncio.Future[None]
) -> AsyncIterator[R | None]:
    """Yield a client stream's messages, and None once, at once, when ``end`` is done.

    A helper task reads the messages one at a time (so flow control still holds the
    client back), so that the None does not wait for the next message. The stream is
    not closed then: a client may be writing its next message, and grpc-python turns a
    write racing with the close into INTERNAL, losing what the server said. What the
    reading raises (an abort, say) is raised here.
    """
    arrived: asyncio.Queue[tuple[R] | Exception | None] = asyncio.Queue(maxsize=1)
    woken = (None,)  # not a message: wakes the loop up to see ``end``

    async def read() -> None:
        try:
            async for message in requests:
                await arrived.put((message,))
            await arrived.put(None)
        except Exception as error:
            await arrived.put(error)

    def wake(_: object) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # full: the loop sees ``end`` next
            arrived.put_nowait(woken)  # type: ignore[arg-type]

    reader = asyncio.create_task(read())
    end.add_done_callback(wake)
    told = False
    try:
        while True:
            if end.done() and not told:
                told = True
                yield None
                continue
            item = await arrived.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            if item is not woken:
                yield item[0]
    finally:
        end.remove_done_callback(wake)
        reader.cancel()


class ChangeProtos(Generic[M]):
    """Wire forms of recent changes, built once however many watchers send each one.

    The change feed hands every watcher the same :class:`Change` objects, so fan-out to
    many watchers converts a change once; an entry serves only the very object it was
    built from. Entries are kept up to ``max_bytes`` (by :func:`change_size`), the oldest
    dropped first, so large values cannot pile up here.
    """

    def __init__(
        self, build: Callable[[Change], M], max_bytes: int = DEFAULT_CHANGE_PROTO_BYTES
    ) -> None:
        """Build missing wire forms with ``build``."""
        self._build = build
        self._max_bytes = max_bytes
        self._bytes = 0
        self._built: dict[int, tuple[Change, M, int]] = {}

    def __call__(self, change: Change) -> M:
        """Return the wire form of ``change``."""
        built = self._built.get(change.revision)
        if built is not None and built[0] is change:
            return built[1]
        if built is not None:
            self._bytes -= built[2]
        size = change_size(change)
        built = (change, self._build(change), size)
        self._built[change.revision] = built
        self._bytes += size
        while self._bytes > self._max_bytes and len(self._built) > 1:
            _, _, dropped = self._built.pop(next(iter(self._built)))
            self._bytes -= dropped
        return built[1]

    @property
    def held_bytes(self) -> int:
        """Bytes of the changes whose wire forms are kept (by :func:`change_size`)."""
        return self._bytes
