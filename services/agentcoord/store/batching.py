"""Group commit: concurrent writes share one transaction and one commit.

Callers submit write operations; one writer task on the event loop takes everything
queued (up to a cap) and hands it to the back end's ``run_batch``, which runs them in
one transaction and commits once; an operation that fails changes nothing and only its
caller sees the error (:mod:`agentcoord.store.unit_of_work` says how). While a batch commits,
new operations queue up for the next one, so throughput grows with concurrency instead
of queueing on fsync. After each commit the writer calls the
change listeners, on the event loop, with the batch's changes in revision order, and
then resolves the callers' futures. A failure the commit cannot change (a compare that
failed against committed entries) is answered before the commit, as soon as the batch
has run its operations.

A write the database refuses for a reason of its own (disk full, read-only file system,
connection lost) reaches its caller as :class:`~agentcoord.core.errors.Unavailable` with
reason ``STORE_UNAVAILABLE``: the back end's ``classify`` names the kind of failure, and
each kind is logged once per :data:`FAILURE_LOG_INTERVAL`, with a count, not once per write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from agentcoord.core.errors import Unavailable
from agentcoord.core.models import Change

log = logging.getLogger(__name__)

MAX_BATCH = 256
"""Operations committed together at most."""
FAILURE_LOG_INTERVAL = 10.0
"""Seconds between two log lines about the same kind of store failure."""

OpT = TypeVar("OpT")

Listener = Callable[[Sequence[Change]], None]
"""Receives committed changes in revision order; the same as ``core.store.ChangeListener``."""

CommitObserver = Callable[[float, int], None]
"""Receives each commit's duration in seconds and its number of operations."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one operation of a batch produced."""

    value: object = None
    """The operation's result."""
    error: Exception | None = None
    """The exception it raised; it changed nothing and has no changes."""
    changes: Sequence[Change] = ()
    """Change log entries it appended, in revision order."""


EarlyAnswer = Callable[[Mapping[int, Outcome]], None]
"""Hands outcomes that the commit cannot change to their callers (by index in the batch)
before the commit; call it on the event loop."""

RunBatch = Callable[[list[OpT], EarlyAnswer], Awaitable[list[Outcome]]]
"""Runs operations in one transaction and commits; an operation that fails changes nothing.

Returns one outcome per operation, in order. Raising means nothing was committed. It may
hand some outcomes to the :data:`EarlyAnswer` first; they are still returned.
"""

Classify = Callable[[BaseException], Unavailable | None]
"""Turns a driver error that means the store cannot write now into ``Unavailable``, else None."""


def _no_classification(error: BaseException) -> Unavailable | None:
    return None


class FailureLog:
    """Logs each kind of store failure once per interval, with how often it happened."""

    def __init__(self, interval: float = FAILURE_LOG_INTERVAL) -> None:
        """Log a kind again only ``interval`` seconds after its last line."""
        self._interval = interval
        self._last: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def record(self, error: Unavailable) -> None:
        """Count one failure; log a line if its kind was not logged within the interval."""
        kind = error.metadata.get("failure", error.reason)
        now = time.monotonic()
        if now - self._last.get(kind, -self._interval) < self._interval:
            self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
            return
        self._last[kind] = now
        more = self._unlogged.pop(kind, 0)
        since = f" ({more} more since the last report)" if more else ""
        log.error("store write failed: %s%s", error.message, since)


class GroupCommitter(Generic[OpT]):
    """Queues write operations and commits them in batches, one batch at a time."""

    def __init__(
        self,
        run_batch: RunBatch[OpT],
        *,
        max_batch: int = MAX_BATCH,
        classify: Classify = _no_classification,
    ) -> None:
        """Commit through ``run_batch``, at most ``max_batch`` operations per transaction.

        ``classify`` recognises the driver errors that mean the store cannot write now.
        """
        self._run_batch = run_batch
        self._classify = classify
        self._failures = FailureLog()
        self._max_batch = max_batch
        self._queue: deque[tuple[OpT, asyncio.Future[object]]] = deque()
        self._listeners: list[Listener] = []
        self._observers: list[CommitObserver] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` after each commit; returns a function that removes it."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def observe_commits(self, observer: CommitObserver) -> None:
        """Call ``observer`` with each committed batch's duration and size."""
        self._observers.append(observer)

    def start(self) -> None:
        """Start the writer task on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(
            self._write_loop(), name="agentcoord-group-commit"
        )

    async def submit(self, op: OpT) -> object:
        """Queue ``op`` and return its result once its batch has committed.

        Raises:
            Unavailable: the committer is not started or is closing.
            Exception: whatever the operation raised (it changed nothing).
        """
        if self._task is None or self._task.done() or self._closing:
            raise Unavailable("the store is not open")
        future = asyncio.get_running_loop().create_future()
        self._queue.append((op, future))
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        """Refuse new operations, commit the queued ones, and stop the writer task."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    async def _write_loop(self) -> None:
        try:
            while self._queue or not self._closing:
                if not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                count = min(len(self._queue), self._max_batch)
                batch = [self._queue.popleft() for _ in range(count)]
                # A caller cancelled before its batch started: skip its operation.
                batch = [(op, future) for op, future in batch if not future.done()]
                if batch:
                    await self._commit(batch)
        finally:
            # Reached early only if the task is cancelled (the loop is shutting down) or fails.
            _fail(self._queue, Unavailable("the store closed"))
            self._queue.clear()

    async def _commit(self, batch: list[tuple[OpT, asyncio.Future[object]]]) -> None:
        started = time.perf_counter()

        def answer_early(outcomes: Mapping[int, Outcome]) -> None:
            for index, outcome in outcomes.items():
                self._resolve(batch[index][1], outcome)

        try:
            outcomes = await self._run_batch([op for op, _ in batch], answer_early)
        except Exception as exc:  # nothing committed: every operation of the batch fails
            _fail(batch, self._store_error(exc))
            return
        except asyncio.CancelledError:
            _fail(batch, Unavailable("the store closed during a commit"))
            raise
        for observer in self._observers:
            observer(time.perf_counter() - started, len(batch))
        changes = [change for outcome in outcomes for change in outcome.changes]
        if changes:
            self.announce(changes)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            self._resolve(future, outcome)

    def _resolve(self, future: asyncio.Future[object], outcome: Outcome) -> None:
        if future.done():
            return  # answered early, or the caller was cancelled while its operation ran
        if outcome.error is not None:
            future.set_exception(self._store_error(outcome.error))
        else:
            future.set_result(outcome.value)

    def _store_error(self, error: Exception) -> Exception:
        """Return ``error``, or the Unavailable it means when the store cannot write."""
        unavailable = error if isinstance(error, Unavailable) else self._classify(error)
        if unavailable is None:
            return error
        self._failures.record(unavailable)
        return unavailable

    def announce(self, changes: Sequence[Change]) -> None:
        """Call the listeners with ``changes``: a commit's, or another process's read back."""
        for listener in list(self._listeners):
            try:
                listener(changes)
            except Exception:
                log.exception("change listener %r failed", listener)


def _fail(batch: Iterable[tuple[object, asyncio.Future[object]]], error: Exception) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)
