"""A blocking facade for scripts without asyncio: the same names, without ``await``.

:class:`SyncClient` and :class:`SyncAgent` each run an asyncio event loop in a daemon thread
and hand it their calls; results and exceptions come back to the calling thread. Their
``state`` and ``tasks`` have the methods of :class:`~agentcoord.client.StateClient` and
:class:`~agentcoord.client.Planner`, blocking; ``watch`` and ``list`` give plain iterators.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import functools
import threading
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterator,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Concatenate, Generic, Literal, ParamSpec, TypeVar

import grpc

from agentcoord.client._agent import (
    Agent,
    AgentOptions,
    AgentStats,
    Assignment,
    WorkItem,
    results_of,
)
from agentcoord.client._client import AgentcoordClient
from agentcoord.client._planner import Planner
from agentcoord.client._retry import RetryPolicy
from agentcoord.client._state import StateClient

P = ParamSpec("P")
T = TypeVar("T")
Inner = TypeVar("Inner")


class _End(enum.Enum):
    END = enum.auto()


async def _next(iterator: AsyncIterator[T]) -> T | Literal[_End.END]:
    return await anext(iterator, _End.END)


class _Portal:
    """An event loop in a daemon thread that runs coroutines for blocking callers."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="agentcoord-sync", daemon=True
        )
        self._thread.start()
        self._stopped = False

    def call(self, start: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run the coroutine ``start()`` on the loop, in a copy of the caller's context.

        Copying the context carries a handler's fencing (see ``fenced``) to its writes.

        Raises:
            RuntimeError: called from the loop's own thread, or after :meth:`stop`.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("a blocking agentcoord call inside its own event loop")
        if self._stopped:
            raise RuntimeError("the client is closed")
        context = contextvars.copy_context()

        async def run() -> T:
            return await asyncio.get_running_loop().create_task(start(), context=context)

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            return future.result()
        except BaseException:  # e.g. KeyboardInterrupt while waiting: stop the call too
            future.cancel()
            raise

    def iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        """Return a blocking iterator over ``iterator``; closing it closes ``iterator``."""
        try:
            while (item := self.call(functools.partial(_next, iterator))) is not _End.END:
                yield item
        finally:
            if isinstance(iterator, AsyncGenerator) and not self._stopped:
                self.call(iterator.aclose)

    def stop(self) -> None:
        """Cancel what still runs on the loop, then stop it and its thread."""
        if self._stopped:
            return
        self._stopped = True
        asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _cancel_other_tasks() -> None:
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


class _Facade(Generic[Inner]):
    """Blocking methods over an async object."""

    def __init__(self, portal: _Portal, inner: Inner) -> None:
        self._portal = portal
        self._async = inner


def _blocking(
    method: Callable[Concatenate[Inner, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[_Facade[Inner], P], T]:
    """Return a blocking version of the coroutine method ``method``, with its docs."""

    @functools.wraps(method)
    def call(self: _Facade[Inner], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._portal.call(lambda: method(self._async, *args, **kwargs))

    return call


def _blocking_iter(
    method: Callable[Concatenate[Inner, P], AsyncIterator[T]],
) -> Callable[Concatenate[_Facade[Inner], P], Iterator[T]]:
    """Return a version of the async-generator method ``method`` giving a plain iterator."""

    @functools.wraps(method)
    def call(self: _Facade[Inner], /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        return self._portal.iterate(method(self._async, *args, **kwargs))

    return call


class SyncState(_Facade[StateClient]):
    """:class:`~agentcoord.client.StateClient`, blocking; ``watch`` gives an iterator."""

    get = _blocking(StateClient.get)
    put = _blocking(StateClient.put)
    delete = _blocking(StateClient.delete)
    transact = _blocking(StateClient.transact)
    modify = _blocking(StateClient.modify)
    increment = _blocking(StateClient.increment)
    append = _blocking(StateClient.append)
    add_to_set = _blocking(StateClient.add_to_set)
    remove_from_set = _blocking(StateClient.remove_from_set)
    merge = _blocking(StateClient.merge)
    list = _blocking(StateClient.list)
    watch = _blocking_iter(StateClient.watch)
    update = _blocking(StateClient.update)
    list_own = _blocking(StateClient.list_own)
    list_agent_states = _blocking(StateClient.list_agent_states)
    clear_own = _blocking(StateClient.clear_own)

    def own_key(self, name: str) -> str:
        """Return ``agents/<own id>/<name>``, a key only this agent (or the admin) may write."""
        return self._async.own_key(name)


class SyncPlanner(_Facade[Planner]):
    """:class:`~agentcoord.client.Planner`, blocking; ``list`` and ``watch`` give iterators."""

    analyze = _blocking(Planner.analyze)
    submit = _blocking(Planner.submit)
    get = _blocking(Planner.get)
    list = _blocking_iter(Planner.list)
    subtasks = _blocking_iter(Planner.subtasks)
    cancel = _blocking(Planner.cancel)
    watch = _blocking_iter(Planner.watch)
    result = _blocking(Planner.result)


class SyncClient:
    """:class:`~agentcoord.client.AgentcoordClient` for code without asyncio.

    Use as ``with SyncClient("127.0.0.1:50051") as client: client.state.put(...)``.
    """

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        token: str = "",
        agent_id: str = "",
        join_token: str = "",
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """Configure the client (arguments as for AgentcoordClient); it opens on entering."""
        self._client = AgentcoordClient(
            target,
            token=token,
            agent_id=agent_id,
            join_token=join_token,
            credentials=credentials,
            timeout=timeout,
            retry=retry,
            options=options,
        )
        self._portal: _Portal | None = None

    def __enter__(self) -> SyncClient:
        self._portal = _Portal()
        self._portal.call(self._client.__aenter__)
        self.state = SyncState(self._portal, self._client.state)
        """Blocking StateSync operations."""
        self.tasks = SyncPlanner(self._portal, self._client.tasks)
        """Blocking task operations."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channels and stop the client's thread."""
        if self._portal is not None:
            portal, self._portal = self._portal, None
            portal.call(lambda: self._client.__aexit__(None, None, None))
            portal.stop()

    def run(self, call: Callable[[AgentcoordClient], Coroutine[Any, Any, T]]) -> T:
        """Run ``call(client)`` on the async client and return its result.

        The way to any raw RPC: ``client.run(lambda c: c.discovery.register(request))``.

        Raises:
            RuntimeError: the client is not open.
        """
        if self._portal is None:
            raise RuntimeError("the client is not open: use `with SyncClient(...)`")
        return self._portal.call(lambda: call(self._client))


@dataclass(frozen=True, slots=True)
class SyncWorkItem(Assignment):
    """What a :class:`SyncAgent` handler gets: the assignment, and blocking clients."""

    state: SyncState = field(repr=False, compare=False)
    """Blocking StateSync client; inside the handler its writes carry the lease's fencing."""
    tasks: SyncPlanner = field(repr=False, compare=False)
    """Blocking Distribution client, to read the task or submit follow-up tasks."""

    def dependency_results(self) -> dict[str, Any]:
        """Return the results of the sub-tasks this one depends on, by local id."""
        return results_of(self.tasks.get(self.task_id), self.subtask.depends_on)


SyncHandler = Callable[[SyncWorkItem], Any]
"""A blocking sub-task handler: returns the JSON-able result, or raises to fail it."""


class SyncAgent:
    """:class:`~agentcoord.client.Agent` for code without asyncio; handlers are functions.

    Handlers run in a pool of ``capacity`` threads. A revocation or timeout cannot stop a
    thread: the agent stops waiting for it and the handler runs on, but its StateSync
    writes are fenced and refused once the lease has moved on.
    """

    def __init__(
        self,
        targets: str | Sequence[str] | None = None,
        *,
        handler: SyncHandler,
        agent_options: AgentOptions | None = None,
        **settings: Any,
    ) -> None:
        """Configure the agent (arguments as for Agent); it registers on entering."""
        options = AgentOptions.of(agent_options, settings)
        self._agent = Agent(targets, handler=self._handle, agent_options=options)
        self._handler = handler
        self._executor = ThreadPoolExecutor(
            options.capacity, thread_name_prefix="agentcoord-handler"
        )
        self._portal: _Portal | None = None
        self._closing = threading.Lock()

    @property
    def agent_id(self) -> str:
        """The agent's id, once registered."""
        return self._agent.agent_id

    @property
    def stats(self) -> AgentStats:
        """Counters."""
        return self._agent.stats

    @property
    def held_subtask_ids(self) -> tuple[str, ...]:
        """Sub-tasks the agent holds a lease of."""
        return self._agent.held_subtask_ids

    @property
    def state(self) -> SyncState:
        """Blocking StateSync client acting as this agent."""
        return SyncState(self._open_portal(), self._agent.state)

    @property
    def tasks(self) -> SyncPlanner:
        """Blocking task client acting as this agent."""
        return SyncPlanner(self._open_portal(), self._agent.tasks)

    def _open_portal(self) -> _Portal:
        if self._portal is None:
            raise RuntimeError("the agent is not running: use `with SyncAgent(...)`")
        return self._portal

    async def _handle(self, item: WorkItem) -> Any:
        portal = self._open_portal()
        work = SyncWorkItem(
            item.subtask,
            item.lease,
            state=SyncState(portal, item.state),
            tasks=SyncPlanner(portal, item.tasks),
        )
        context = contextvars.copy_context()  # the fencing, for the handler's writes
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, context.run, self._handler, work)

    def __enter__(self) -> SyncAgent:
        self._portal = _Portal()
        try:
            self._portal.call(self._agent.__aenter__)
        except BaseException:
            self._portal.stop()
            self._portal = None
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Drain and deregister (as :meth:`Agent.close`), then stop the agent's threads.

        Safe to call from any thread, and more than once.
        """
        with self._closing:
            if self._portal is not None:
                self._portal.call(self._agent.close)
                self._portal.stop()
                self._portal = None
                self._executor.shutdown(wait=False, cancel_futures=True)

    def wait_closed(self) -> None:
        """Block until the agent has closed (see :meth:`Agent.wait_closed`)."""
        self._open_portal().call(self._agent.wait_closed)

    def run_forever(self) -> None:
        """Register, work until closed or interrupted (Ctrl-C), then drain and leave."""
        with self:
            self.wait_closed()
