"""Long-lived streams: a bounded number per agent session, ended promptly at shutdown."""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

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


class _Handoff(Generic[R]):
    """What a stream's reader task hands its handler: messages, and wake-ups between them."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[R] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: R) -> None:
        """Hand ``item`` over; wakes the handler if it waits."""
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __len__(self) -> int:
        return len(self._items)

    async def get(self) -> R:
        """The next item, once there is one."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


_WOKEN = object()
"""Wakes the handler to look at the session's end."""
_SILENT = object()
"""The stream sent nothing for the silence limit."""
_EOF = object()
"""The client closed its side of the stream."""


async def session_messages(
    requests: AsyncIterator[R],
    end: asyncio.Future[None],
    silence: float,
    context: Context,
    flag: str,
) -> AsyncIterator[R | None]:
    """Yield a client stream's messages, and None once, at once, when ``end`` is done.

    A helper task reads the messages one at a time (so flow control still holds the
    client back), so that the None does not wait for the next message. The stream is
    not closed then: a client may be writing its next message, and grpc-python turns a
    write racing with the close into INTERNAL, losing what the server said. What the
    reading raises is raised here.

    A stream that never sends would otherwise hold its call for good: when no message
    comes for ``silence`` seconds the call ends with DEADLINE_EXCEEDED, naming ``flag``,
    the setting the limit comes from. A message costs the limit no timer of its own: one
    timer per stream, due at the limit after the last message it saw, looks again then.
    """
    loop = asyncio.get_running_loop()
    arrived: _Handoff[object] = _Handoff()
    last = loop.time()  # when the last message arrived
    taken: asyncio.Future[None] | None = None  # set while the reader waits for room

    async def read() -> None:
        nonlocal last, taken
        try:
            async for message in requests:
                last = loop.time()
                arrived.put((message,))
                if len(arrived) > 1:  # the handler is behind: read on once it catches up
                    taken = loop.create_future()
                    await taken
            arrived.put(_EOF)
        except Exception as error:
            arrived.put(error)

    def wake(_: object = None) -> None:
        arrived.put(_WOKEN)

    timer: asyncio.TimerHandle

    def look() -> None:
        nonlocal timer
        due = last + silence
        if loop.time() >= due:
            arrived.put(_SILENT)
        else:
            timer = loop.call_at(due, look)

    reader = loop.create_task(read())
    timer = loop.call_at(last + silence, look)
    end.add_done_callback(wake)
    told = False
    try:
        while True:
            if end.done() and not told:
                told = True
                yield None
                continue
            item = await arrived.get()
            if taken is not None and len(arrived) <= 1:
                if not taken.done():
                    taken.set_result(None)
                taken = None
            if item is _EOF:
                return
            if item is _SILENT:
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no message on this stream for {silence:g} s ({flag})",
                )
            if isinstance(item, Exception):
                raise item
            if isinstance(item, tuple):
                yield cast("R", item[0])
    finally:
        end.remove_done_callback(wake)
        timer.cancel()
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
