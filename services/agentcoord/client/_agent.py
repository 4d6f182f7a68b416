"""Agents: register, stay alive, take assigned sub-tasks, run a handler on each, report back.

An :class:`Agent` keeps two streams open in the background, each re-opened with jittered
exponential back-off when it breaks (a server restart, a lost connection, a failover):

- the Heartbeat stream, which keeps the session alive and names the sub-tasks the agent
  holds, renewing their leases;
- the StreamAssignments stream, on which the server pushes leases and revocations. On
  reconnection the server re-sends the leases the agent still holds; the agent keeps
  working on those it already runs.

When the server asks the agent to register again, the agent presents its session token to
``Register``: a session that is still live is resumed (same epoch, leases kept); one that
ended (it expired, or the admin took the id over) is replaced by a new session of the same
id, whose leases start afresh. While another session of the id is live (this agent was
restarted and lost its token), the agent waits for it to expire or leave, retrying within
the remaining TTL the server reports. Each sub-task runs the handler in its own asyncio
task, at most ``capacity`` at a time, under the sub-task's fencing token (see
:func:`~agentcoord.client.fenced`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import signal
import sys
import traceback
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from agentcoord.client._client import AgentcoordClient
from agentcoord.client._errors import RPCError, UnavailableError, typed_error
from agentcoord.client._planner import Lease, Planner, Subtask, Task, seconds
from agentcoord.client._retry import RETRYABLE_CODES, RetryPolicy
from agentcoord.client._state import Fencing, StateClient, fenced
from agentcoord.client._streams import close_stream
from agentcoord.client._wire import JSON, duration, new_request_id, to_proto_value
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.distribution.v1 import distribution_service_pb2 as distribution_pb

log = logging.getLogger("agentcoord.client.agent")

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # gRPC waits up to 120 s between connection attempts by default; an agent should find a
    # restarted server within a couple of seconds.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # Notice a server that vanished without closing the connection (the server allows
    # pings every 10 s).
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)
"""Channel options of an agent's client; options given to the Agent override them."""

ACK_INTERVAL = 60.0
"""Seconds the agent's heartbeats let pass between answers that say nothing new.

The agent does not wait for answers: it heartbeats on its own schedule, and the server
answers only the first heartbeat of a stream, news (a command, a new interval) and one
heartbeat at least this often, which spares it the cost of the answers. A dead server
shows as the stream failing, which the agent reads at all times (keepalive pings cover a
connection that goes silent)."""
ACK_ANSWERS = duration(ACK_INTERVAL)
""":data:`ACK_INTERVAL` as the heartbeats' ``ack_interval``."""

RECONNECT = RetryPolicy(
    max_attempts=sys.maxsize, max_delay=math.inf, initial_backoff=0.05, max_backoff=2.0, jitter=0.25
)
"""Back-off of re-opening streams and registering again: for ever, at most ~2 s apart."""
REPORT_RETRY = replace(RECONNECT, max_delay=30.0)
"""Back-off of sending a result while the server is unreachable; ``max_delay`` is set to the
lease's TTL for each report."""

STREAM_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
"""Codes after which a stream is opened again: outages, and calls a busy server dropped."""

SETTLED = 1.0
"""Seconds after which a silent assignment stream counts as connected when it breaks."""
FINISHED_REMEMBERED = 4096
"""Sub-tasks whose last lease an agent remembers after its work ended, so as not to run a
re-sent lease again."""

MAX_ERROR_MESSAGE = 4096
"""Longest failure message the server accepts."""
MAX_TRACEBACK = 16_000
"""Characters of a handler's traceback sent with its failure (the end of it)."""


class NonRetryableError(Exception):
    """Raise it from a handler to fail the sub-task for good: no other attempt is made.

    Any other exception fails the attempt retryably: the server leases the sub-task again,
    preferring another agent, until its attempts run out.

    Attributes:
        details: JSON details sent with the failure.
    """

    def __init__(self, message: str, *, details: JSON = None) -> None:
        super().__init__(message)
        self.details = details


@dataclass(frozen=True, slots=True)
class Assignment:
    """A sub-task leased to this agent: what to do, and the lease to do it under."""

    subtask: Subtask
    """The sub-task as it stood when leased."""
    lease: Lease
    """The lease; its fencing token proves the agent still holds it."""

    @property
    def subtask_id(self) -> str:
        """The sub-task's server identifier."""
        return self.subtask.subtask_id

    @property
    def task_id(self) -> str:
        """The task the sub-task belongs to."""
        return self.subtask.task_id

    @property
    def local_id(self) -> str:
        """The sub-task's identifier within its task."""
        return self.subtask.local_id

    @property
    def input(self) -> Any:
        """The sub-task's JSON input."""
        return self.subtask.input

    @property
    def attempt(self) -> int:
        """The attempt this lease is for, from 1."""
        return self.lease.attempt

    @property
    def fencing(self) -> Fencing:
        """The fencing a StateSync write presents to be made only under this lease."""
        return Fencing(self.lease.subtask_id, self.lease.fencing_token)

    @classmethod
    def from_proto(cls, assignment: distribution_pb.Assignment) -> Assignment:
        """Build from the wire form."""
        return cls(Subtask.from_proto(assignment.subtask), Lease.from_proto(assignment.lease))


def results_of(task: Task, subtask_ids: Iterable[str]) -> dict[str, Any]:
    """Return the results of a task's sub-tasks ``subtask_ids``, by local id."""
    wanted = set(subtask_ids)
    return {s.local_id: s.result for s in task.subtasks if s.subtask_id in wanted}


@dataclass(frozen=True, slots=True)
class WorkItem(Assignment):
    """What a handler gets: the assignment, and clients that act under its lease."""

    state: StateClient = field(repr=False, compare=False)
    """The agent's StateSync client; inside the handler its writes carry the lease's fencing."""
    tasks: Planner = field(repr=False, compare=False)
    """The agent's Distribution client, to read the task or submit follow-up tasks."""

    async def dependency_results(self) -> dict[str, Any]:
        """Return the results of the sub-tasks this one depends on, by local id."""
        return results_of(await self.tasks.get(self.task_id), self.subtask.depends_on)


Handler = Callable[[WorkItem], Awaitable[Any]]
"""A sub-task handler: returns the sub-task's JSON-able result, or raises to fail it."""


@dataclass(slots=True)
@dataclass(frozen=True)
class Skill:
    """A skill an agent offers, as a skill of an A2A agent card says it."""

    id: str
    """Identifier, unique within the agent (1-128 characters)."""
    name: str
    """Human-readable name."""
    description: str = ""
    """What the skill does."""
    tags: Sequence[str] = ()
    """Keywords; agents are found by skill id or tag."""
    examples: Sequence[str] = ()
    """Example requests it handles."""
    input_modes: Sequence[str] = ()
    """Media types it accepts, such as ``text/plain``."""
    output_modes: Sequence[str] = ()
    """Media types it produces."""

    def to_proto(self) -> discovery_pb.Skill:
        """Return the wire form."""
        return discovery_pb.Skill(
            id=self.id,
            name=self.name,
            description=self.description,
            tags=self.tags,
            examples=self.examples,
            input_modes=self.input_modes,
            output_modes=self.output_modes,
        )


@dataclass(frozen=True)
class CardInfo:
    """What an agent's A2A agent card says beyond its name and skills."""

    description: str = ""
    """What the agent does."""
    version: str = ""
    """The agent's version."""
    provider_organization: str = ""
    """Organisation providing it; none when empty."""
    provider_url: str = ""
    """The provider's web site."""
    a2a_url: str = ""
    """The agent's own A2A endpoint, when it serves one."""

    def fill(self, request: discovery_pb.RegisterRequest) -> None:
        """Set these fields of a registration."""
        request.description = self.description
        request.version = self.version
        request.a2a_url = self.a2a_url
        if self.provider_organization:
            request.provider.organization = self.provider_organization
            request.provider.url = self.provider_url


class AgentStats:
    """Counters of an agent, for tests, logs and dashboards."""

    registrations: int = 0
    """Successful registrations, the first included."""
    reconnects: int = 0
    """Streams opened again after they broke."""
    completed: int = 0
    """Sub-tasks completed."""
    failed: int = 0
    """Attempts reported failed (the server may retry them)."""
    revoked: int = 0
    """Handlers stopped because the lease was revoked or a newer one superseded it."""
    refused: int = 0
    """Reports the server refused because the lease had moved on."""
    heartbeats: int = 0
    """Heartbeats sent."""
    heartbeat_answers: int = 0
    """Answers the server sent on the Heartbeat stream: the first of each stream, news
    (a command, a new interval), and one at least every :data:`ACK_INTERVAL`."""


@dataclass(eq=False, slots=True)
class _Work:
    """One sub-task this agent holds."""

    item: WorkItem
    trace_parent: str = ""
    """The assignment's trace context (W3C traceparent), when the server traces."""
    task: asyncio.Task[None] | None = None
    started: bool = False
    """The handler got a slot and runs."""
    reporting: bool = False
    """The handler ended; its result or failure is being sent, so it is not stopped."""


Report = distribution_pb.CompleteSubtaskRequest | distribution_pb.FailSubtaskRequest
"""How a handler's run ended, as sent to the server."""


class _SessionEnded(Exception):
    """The server ended this agent's session: register again."""


def _session_ended(error: RPCError) -> bool:
    return error.code == grpc.StatusCode.UNAUTHENTICATED or (
        error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "SESSION_ENDED"
    )


@dataclass(frozen=True, kw_only=True)
class AgentOptions:
    """What an agent registers as and how it runs: the settings of Agent and SyncAgent.

    Give them as keyword arguments, or build them once and share them::

        Agent(name="counter", capabilities=["count"], handler=handle)
        options = AgentOptions(name="counter", capabilities=("count",), capacity=4)
        Agent(handler=handle, agent_options=options)
        SyncAgent(handler=count, agent_options=options, name="sync-counter")

    Keyword arguments given beside ``agent_options`` override its fields.
    """

    name: str
    """Human-readable name."""
    agent_id: str = ""
    """Identifier to register under; empty lets the server choose one, which the agent
    then keeps when it registers again."""
    role: str = ""
    """Role, such as ``worker``."""
    capabilities: Iterable[str] = ()
    """Capabilities such as ``python``; sub-tasks requiring others are not assigned to it."""
    capacity: int = 1
    """Sub-tasks run at the same time (at least 1)."""
    labels: Mapping[str, str] | None = None
    """Free-form labels."""
    skills: Iterable[Skill] = ()
    """What the agent offers, as in an A2A agent card; ListAgents and GetSummary filter and
    count by skill id and tag."""
    card: CardInfo | None = None
    """The rest of its A2A agent card (description, version, provider, URL)."""
    ttl: float | None = None
    """Seconds without a heartbeat after which the server declares the agent dead; the
    server's default when None."""
    handler_timeout: float | None = None
    """Seconds a handler may run before it is cancelled and the attempt fails as a
    timeout; no limit when None."""
    drain_timeout: float = 30.0
    """Seconds running handlers get to finish when the agent closes."""
    reconnect: RetryPolicy = RECONNECT
    """Back-off of re-opening streams and registering again."""
    join_token: str = ""
    """The server's join token, if it requires one."""
    credentials: grpc.ChannelCredentials | None = None
    """TLS channel credentials; plaintext when None."""
    timeout: float = 10.0
    """Deadline in seconds of each unary call."""
    retry: RetryPolicy | None = None
    """Back-off of idempotent calls and of the first registration."""
    options: Sequence[tuple[str, Any]] = ()
    """gRPC channel options, on top of :data:`CHANNEL_OPTIONS`."""
    tracer_provider: Any = None
    """OpenTelemetry tracer provider; each sub-task's work and report then run in a span
    of the task's trace. When None, the agent traces only with an OTLP endpoint in the
    environment (docs/operations.md)."""

    def __post_init__(self) -> None:
        """Refuse a capacity below 1; keep iterables as tuples and labels as a dict."""
        if self.capacity < 1:
            raise ValueError("capacity must be at least 1")
        object.__setattr__(self, "capabilities", tuple(self.capabilities))
        object.__setattr__(self, "labels", dict(self.labels or {}))
        object.__setattr__(self, "skills", tuple(self.skills))
        object.__setattr__(self, "options", tuple(self.options))

    @classmethod
    def of(cls, base: AgentOptions | None, settings: Mapping[str, Any]) -> AgentOptions:
        """Return ``base`` with ``settings`` applied, or options made of ``settings`` alone."""
        return replace(base, **settings) if base is not None else cls(**settings)


class Agent:
    """An agent that takes sub-tasks from Distribution and runs ``handler`` on each.

    Use as an async context manager: entering registers and starts the background streams,
    leaving drains (no new work, running handlers finish within ``drain_timeout``, the rest
    are cancelled and handed back) and deregisters::

        async def handle(item: WorkItem) -> dict[str, int]:
            return {"words": len(item.input["text"].split())}

        async with Agent("127.0.0.1:50051", name="counter", handler=handle) as agent:
            await agent.wait_closed()

    A handler's return value (JSON-able) completes the sub-task. An exception fails the
    attempt: retryably, unless it is a :class:`NonRetryableError`; a ``TimeoutError``
    (also from ``handler_timeout``) is reported as a timeout. A revocation of the lease
    (the task was cancelled or failed, or the lease expired) cancels the handler's task.
    """

    def __init__(
        self,
        targets: str | Sequence[str] | None = None,
        *,
        handler: Handler,
        agent_options: AgentOptions | None = None,
        **settings: Any,
    ) -> None:
        """Configure the agent; it registers on entering the context.

        Args:
            targets: ``host:port`` of a server, or several to fail over between; None
                reads ``AGENTCOORD_SERVER``, like :class:`AgentcoordClient`.
            handler: Coroutine function run for each sub-task.
            agent_options: What the agent registers as and how it runs.
            settings: Fields of :class:`AgentOptions` (``name=``, ``capacity=``, ...), given
                one by one; they override those of ``agent_options``.

        Raises:
            TypeError: a setting is not a field of :class:`AgentOptions`, or ``name`` is
                missing.
            ValueError: ``capacity`` is below 1.
        """
        opts = AgentOptions.of(agent_options, settings)
        self.options = opts
        """The agent's settings."""
        self._registration = discovery_pb.RegisterRequest(
            agent_id=opts.agent_id,
            name=opts.name,
            role=opts.role,
            capabilities=sorted(set(opts.capabilities)),
            capacity=opts.capacity,
            labels=opts.labels,
            skills=[skill.to_proto() for skill in opts.skills],
        )
        if opts.card is not None:
            opts.card.fill(self._registration)
        if opts.ttl is not None:
            self._registration.ttl.FromNanoseconds(round(opts.ttl * 1e9))
        self.client = AgentcoordClient(
            targets,
            agent_id=opts.agent_id,
            join_token=opts.join_token,
            credentials=opts.credentials,
            timeout=opts.timeout,
            retry=opts.retry,
            options=list({**dict(CHANNEL_OPTIONS), **dict(opts.options)}.items()),
            tracer_provider=opts.tracer_provider,
        )
        """The agent's client; its session token is the agent's."""
        self.capacity = opts.capacity
        """Sub-tasks run at the same time."""
        self.handler_timeout = opts.handler_timeout
        """Seconds a handler may run; None for no limit."""
        self.drain_timeout = opts.drain_timeout
        """Seconds running handlers get to finish when the agent closes."""
        self.reconnect = opts.reconnect
        """Back-off of re-opening streams and registering again."""
        self.stats = AgentStats()
        """Counters."""
        self._handler = handler
        self._work: dict[str, _Work] = {}
        self._finished: OrderedDict[str, int] = OrderedDict()
        """Fencing token of the last lease of each sub-task whose work ended, latest last
        (at most ``FINISHED_REMEMBERED``): a re-send of that lease is not run again."""
        self._slots = asyncio.Semaphore(opts.capacity)
        self._register_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._urgent = False
        self._epoch = 0
        self._generation = 0
        """Registrations so far: a stream that saw session ``n`` end registers once."""
        self._interval = 1.0
        self._draining = False
        self._heartbeating: asyncio.Task[None] | None = None
        self._taking_work: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._error: BaseException | None = None

    @property
    def agent_id(self) -> str:
        """The agent's id (the server's choice if none was given), once registered."""
        return self._registration.agent_id

    @property
    def epoch(self) -> int:
        """Generation of the current session; grows with every registration."""
        return self._epoch

    @property
    def state(self) -> StateClient:
        """The StateSync client, acting as this agent; fenced inside handlers."""
        return self.client.state

    @property
    def tasks(self) -> Planner:
        """The Distribution client, to submit and follow tasks as this agent."""
        return self.client.tasks

    @property
    def held_subtask_ids(self) -> tuple[str, ...]:
        """Sub-tasks the agent holds a lease of (running, queued or reporting)."""
        return tuple(self._work)

    # --- life cycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        await self.client.__aenter__()
        try:
            async for attempt in self.client.retry.retrying():
                with attempt:
                    await self._register()
        except BaseException:
            await self.client.__aexit__(None, None, None)
            raise
        self._heartbeating = asyncio.create_task(
            self._keep(self._heartbeat_stream), name=f"agentcoord-heartbeat-{self.agent_id}"
        )
        self._taking_work = asyncio.create_task(
            self._keep(self._assignment_stream), name=f"agentcoord-assignments-{self.agent_id}"
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Drain and deregister: the same as leaving the context; safe to call twice."""
        if self._heartbeating is not None:  # entered
            await self._begin_close()

    async def wait_closed(self) -> None:
        """Wait until the agent has closed: by :meth:`close`, a server DRAIN or an error.

        Raises:
            RPCError: the agent stopped because the server refused it for good (for
                example a bad join token), or could not be reached for the whole
                ``reconnect`` policy.
        """
        await self._closed.wait()
        if self._error is not None:
            raise self._error

    async def run_forever(self) -> None:
        """Register, work until the agent is closed, then leave.

        SIGTERM (when running in the main thread) drains, deregisters and returns; so does
        cancelling the task, which is what Ctrl-C does under ``asyncio.run``.

        Raises:
            RPCError: as for :meth:`wait_closed`.
        """
        async with self:
            with _on_sigterm(self._begin_close):
                await self.wait_closed()

    def _begin_close(self) -> asyncio.Task[None]:
        if self._closer is None:
            self._closer = asyncio.create_task(self._shutdown(), name="agentcoord-agent-close")
        return self._closer

    def _fail(self, error: BaseException) -> None:
        log.error("agent %s: giving up: %s", self.agent_id, error)
        self._error = error
        self._begin_close()

    async def _shutdown(self) -> None:
        try:
            self._draining = True
            self._beat_soon()  # tell the server: DRAINING
            await _cancelled(self._taking_work)
            works = list(self._work.values())
            for work in works:
                if not work.started:
                    self._stop(work, "the agent is closing")  # Deregister hands it back
            running = [work.task for work in works if work.task is not None]
            if running:
                await asyncio.wait(running, timeout=self.drain_timeout)
                for work in list(self._work.values()):
                    if not work.reporting:
                        self._stop(work, f"still running after {self.drain_timeout:g} s")
                await asyncio.gather(*running, return_exceptions=True)
            await _cancelled(self._heartbeating)
            await self._deregister()
        finally:
            await self.client.__aexit__(None, None, None)
            self._closed.set()

    async def _deregister(self) -> None:
        """End the session; the server hands back every lease still held, at once."""
        try:
            await self.client.discovery.deregister(
                discovery_pb.DeregisterRequest(agent_id=self.agent_id)
            )
        except RPCError as error:
            log.warning("agent %s: could not deregister: %s", self.agent_id, error)

    # --- registration -------------------------------------------------------------------------

    async def _register(self) -> None:
        """Resume the session whose token the client holds, or open a new one.

        Waits while another session of this id is live: the server refuses with
        ALREADY_EXISTS and the seconds that session has left, and Register is tried again
        with back-off, never sleeping past that expiry.
        """
        waits = 0
        while True:
            try:
                response = await self.client.discovery.register(self._registration)
                break
            except RPCError as error:
                if error.code == grpc.StatusCode.UNAUTHENTICATED and self.client.token:
                    log.info(
                        "agent %s: the session token is no longer valid; opening a new session",
                        self.agent_id,
                    )
                    self.client.token = ""
                    continue
                if error.reason != "AGENT_ALREADY_REGISTERED":
                    raise
                await asyncio.sleep(self._wait_for_live_session(error, waits))
                waits += 1
        resumed = response.epoch == self._epoch
        self._registration.agent_id = response.agent.agent_id
        self._epoch = response.epoch
        self._interval = seconds(response.heartbeat_interval)
        self._generation += 1
        self.stats.registrations += 1
        if waits or resumed:
            log.info(
                "agent %s: %s session %d",
                self.agent_id,
                "resumed" if resumed else "registered",
                self._epoch,
            )
        self._beat_soon()

    def _wait_for_live_session(self, error: RPCError, waits: int) -> float:
        """Return how long to wait before registering again over another live session."""
        try:
            remaining = float(error.metadata.get("ttl_remaining", ""))
        except ValueError:
            remaining = self.reconnect.max_backoff
        backoff = min(self.reconnect.initial_backoff * 2.0**waits, self.reconnect.max_backoff)
        delay = min(backoff, remaining) + random.uniform(0, self.reconnect.jitter)
        (log.warning if waits == 0 else log.info)(
            "agent %s: another session of this id is live and expires in %.1f s unless "
            "renewed (this agent restarted without its token, or another process uses the "
            "id); registering again in %.2f s",
            self.agent_id,
            remaining,
            delay,
        )
        return delay

    async def _register_again(self, generation: int) -> None:
        """Register again after session ``generation`` ended, unless another stream did."""
        async with self._register_lock:
            if self._generation == generation:
                log.warning(
                    "agent %s: the server asks to register again; resuming or renewing the session",
                    self.agent_id,
                )
                await self.reconnect.retrying(STREAM_CODES)(self._register)

    async def _keep(self, run_stream: Callable[[], Awaitable[None]]) -> None:
        """Run a stream again and again, backing off while it fails to connect."""
        try:
            while True:
                generation = self._generation
                try:
                    await self.reconnect.retrying(STREAM_CODES)(run_stream)
                except _SessionEnded:
                    if self._draining:
                        return  # the server already handed back what this agent held
                    await self._register_again(generation)
        except RPCError as error:
            self._fail(typed_error(error))

    def _stream_broke(self, name: str, error: RPCError, *, connected: bool) -> None:
        """Return to open the stream again at once, or raise to back off or stop.

        Raises:
            _SessionEnded: the session ended.
            RPCError: the stream failed before it connected (backed off if transient).
        """
        if _session_ended(error):
            raise _SessionEnded from error
        if connected and error.code in STREAM_CODES:
            log.info("agent %s: %s stream broke (%s); reconnecting", self.agent_id, name, error)
            self.stats.reconnects += 1
            return
        raise typed_error(error) from None

    # --- heartbeats ---------------------------------------------------------------------------

    async def _heartbeat_stream(self) -> None:
        """Heartbeat on one stream until it fails: every interval, answered or not.

        The first heartbeat's answer shows the stream open; from then on a reader takes
        the answers as they come (see :data:`ACK_INTERVAL`), and its failure (the stream
        broke, or the server said to register again) ends the stream at once, not at the
        next heartbeat.
        """
        target = self.client.target
        call = self.client.discovery.heartbeat()
        answered = False
        answers: asyncio.Future[None] | None = None
        try:
            await self._beat(call)
            self._heard(await call.read())
            answered = True
            answers = asyncio.ensure_future(self._read_answers(call))
            while True:
                pause = asyncio.ensure_future(self._until_next_beat())
                try:
                    await asyncio.wait((answers, pause), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    pause.cancel()
                if answers.done():
                    answers.result()  # raises why the stream ended
                await self._beat(call)
        except grpc.aio.AioRpcError as error:
            self._stream_broke(
                "heartbeat", self.client.call_error(error, target), connected=answered
            )
        except RPCError as error:
            self._stream_broke("heartbeat", error, connected=answered)
        finally:
            if answers is not None:
                answers.cancel()
                answers.add_done_callback(_retrieve)
            call.cancel()

    async def _beat(self, call: grpc.aio.StreamStreamCall[Any, Any]) -> None:
        with contextlib.suppress(asyncio.InvalidStateError):  # ended: read() says why
            await call.write(self._heartbeat())
            self.stats.heartbeats += 1

    async def _read_answers(self, call: grpc.aio.StreamStreamCall[Any, Any]) -> None:
        while True:
            self._heard(await call.read())

    def _heard(self, response: object) -> None:
        """Act on one answer of the Heartbeat stream.

        Raises:
            _SessionEnded: the server asks to register again.
            UnavailableError: the stream ended.
        """
        if not isinstance(response, discovery_pb.HeartbeatResponse):  # EOF
            raise UnavailableError(grpc.StatusCode.UNAVAILABLE, "heartbeat stream ended")
        self.stats.heartbeat_answers += 1
        if response.command == discovery_pb.HeartbeatResponse.COMMAND_REREGISTER:
            raise _SessionEnded
        if response.command == discovery_pb.HeartbeatResponse.COMMAND_DRAIN:
            log.info("agent %s: the server asks to drain", self.agent_id)
            self._begin_close()
        interval = seconds(response.heartbeat_interval) or self._interval
        if interval != self._interval:
            self._interval = interval
            self._wake.set()  # the next heartbeat may be due earlier

    def _heartbeat(self) -> discovery_pb.HeartbeatRequest:
        self._urgent = False
        return discovery_pb.HeartbeatRequest(
            ack_interval=ACK_ANSWERS,
            agent_id=self.agent_id,
            load=discovery_pb.Load(
                active_subtasks=sum(work.started for work in self._work.values()),
                held_subtask_ids=list(self._work),
            ),
            status=(
                discovery_pb.Agent.STATUS_DRAINING
                if self._draining
                else discovery_pb.Agent.STATUS_UNSPECIFIED  # keeps READY, costs no write
            ),
        )

    def _beat_soon(self) -> None:
        """Send a heartbeat now rather than at the next interval."""
        self._urgent = True
        self._wake.set()

    def _beat_interval(self) -> float:
        """The server's interval, shorter when a held lease would otherwise expire first."""
        return min([self._interval, *(work.item.lease.ttl / 3 for work in self._work.values())])

    async def _until_next_beat(self) -> None:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        while True:
            self._wake.clear()  # before reading the state it signals: no wake-up is lost
            remaining = sent + self._beat_interval() - loop.time()
            if self._urgent or remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()

    # --- assignments --------------------------------------------------------------------------

    async def _assignment_stream(self) -> None:
        request = distribution_pb.StreamAssignmentsRequest(agent_id=self.agent_id)
        loop = asyncio.get_running_loop()
        opened = loop.time()
        received = False
        stream = self.client.distribution.stream_assignments(request)
        try:
            async for message in stream:
                received = True
                if message.HasField("assignment"):
                    self._accept(message.assignment)
                else:
                    self._revoke(message.revocation)
            raise UnavailableError(grpc.StatusCode.UNAVAILABLE, "assignment stream ended")
        except RPCError as error:
            connected = received or loop.time() - opened >= SETTLED
            self._stream_broke("assignment", error, connected=connected)
        finally:
            await close_stream(stream)

    def _accept(self, message: distribution_pb.Assignment) -> None:
        assignment = Assignment.from_proto(message)
        if self._finished.get(assignment.subtask_id, 0) >= assignment.lease.fencing_token:
            # Re-sent by a replica that has not heard of its end yet (a stream reopened
            # elsewhere just after the work reported): it was run once already.
            return
        current = self._work.get(assignment.subtask_id)
        if current is not None:
            if current.item.lease.fencing_token >= assignment.lease.fencing_token:
                return  # re-sent on reconnection: already working on it
            self.stats.revoked += 1
            self._stop(current, "a newer lease of the sub-task superseded it")
        if self._draining:
            return  # Deregister hands it back
        item = WorkItem(
            assignment.subtask, assignment.lease, state=self.client.state, tasks=self.client.tasks
        )
        work = _Work(item, message.trace_parent)
        self._work[item.subtask_id] = work
        work.task = asyncio.create_task(self._run(work), name=f"agentcoord-{item.subtask_id}")
        self._wake.set()  # its lease may need more frequent heartbeats

    def _revoke(self, revocation: distribution_pb.Revocation) -> None:
        work = self._work.get(revocation.subtask_id)
        if work is not None and work.item.lease.fencing_token == revocation.fencing_token:
            self.stats.revoked += 1
            reason = distribution_pb.Revocation.Reason.Name(revocation.reason)
            self._stop(work, f"lease revoked ({reason})")

    def _stop(self, work: _Work, why: str) -> None:
        """Forget a held sub-task and cancel its handler, unless it is already reporting."""
        log.info("agent %s: stopping sub-task %s: %s", self.agent_id, work.item.subtask_id, why)
        if self._work.get(work.item.subtask_id) is work:
            del self._work[work.item.subtask_id]
        if work.task is not None and not work.reporting:
            work.task.cancel()

    # --- running handlers ---------------------------------------------------------------------

    async def _run(self, work: _Work) -> None:
        item = work.item
        try:
            async with self._slots:
                work.started = True
                with self._span_of(work):
                    report = await self._outcome(item)
                    work.reporting = True
                    await self._report(report, item.lease.ttl)
        finally:
            if self._work.get(item.subtask_id) is work:
                del self._work[item.subtask_id]
            self._finished[item.subtask_id] = item.lease.fencing_token
            self._finished.move_to_end(item.subtask_id)
            if len(self._finished) > FINISHED_REMEMBERED:
                self._finished.popitem(last=False)

    def _span_of(self, work: _Work) -> contextlib.AbstractContextManager[object]:
        """The span of the work on a sub-task in the task's trace, when tracing."""
        if self.client.tracing is None:
            return contextlib.nullcontext()
        item = work.item
        subjects: dict[str, str | int] = {
            "agent_id": self.agent_id,
            "task_id": item.task_id,
            "subtask_id": item.subtask_id,
            "attempt": item.attempt,
        }
        return self.client.tracing.span("work", work.trace_parent, subjects)

    async def _outcome(self, item: WorkItem) -> Report:
        """Run the handler; return the completion or failure to report."""
        try:
            with fenced(item.fencing):
                async with asyncio.timeout(self.handler_timeout):
                    result = await self._handler(item)
        except asyncio.CancelledError as error:
            if _cancelling():
                raise  # stopped by this agent: revoked, superseded or drained
            return self._failure(item, error, retryable=True)
        except NonRetryableError as error:
            return self._failure(item, error, retryable=False, details=error.details)
        except TimeoutError as error:
            return self._failure(item, error, retryable=True, timed_out=True)
        except Exception as error:
            return self._failure(item, error, retryable=True)
        try:
            value = to_proto_value(result)
        except (TypeError, ValueError) as error:
            return self._failure(item, error, retryable=False)
        return distribution_pb.CompleteSubtaskRequest(
            subtask_id=item.subtask_id,
            agent_id=self.agent_id,
            fencing_token=item.lease.fencing_token,
            result=value,
            request_id=new_request_id(),
        )

    def _failure(
        self,
        item: WorkItem,
        error: BaseException,
        *,
        retryable: bool,
        timed_out: bool = False,
        details: JSON = None,
    ) -> distribution_pb.FailSubtaskRequest:
        kind = type(error).__name__
        message = f"{kind}: {error}" if str(error) else kind
        if details is None:
            trace = "".join(traceback.format_exception(error))
            details = {"type": kind, "traceback": trace[-MAX_TRACEBACK:]}
        log.warning(
            "agent %s: the handler failed on sub-task %s (attempt %d): %s; reporting it %s",
            self.agent_id,
            item.subtask_id,
            item.attempt,
            message,
            "as retryable" if retryable else "as final: no other attempt",
            exc_info=None if isinstance(error, NonRetryableError) else error,  # deliberate
        )
        if self.client.tracing is not None:
            self.client.tracing.fail_current(message)
        return distribution_pb.FailSubtaskRequest(
            subtask_id=item.subtask_id,
            agent_id=self.agent_id,
            fencing_token=item.lease.fencing_token,
            error_message=message[:MAX_ERROR_MESSAGE],
            retryable=retryable,
            failure_class=(
                distribution_pb.FAILURE_CLASS_TIMEOUT
                if timed_out
                else distribution_pb.FAILURE_CLASS_TASK_ERROR
            ),
            details=to_proto_value(details),
            request_id=new_request_id(),
        )

    async def _report(self, report: Report, lease_ttl: float) -> None:
        """Send a completion or failure; after a session change, once more as the new one.

        While the server is unreachable the report is retried for ``lease_ttl`` seconds:
        the lease stays renewed while heartbeats get through (it is still held), and cannot
        outlive the last renewal by more than its TTL, so until then the result can count.
        """
        generation = self._generation
        policy = replace(REPORT_RETRY, max_delay=lease_ttl)
        try:
            try:
                await self._send(report, policy)
            except RPCError as error:
                if error.code != grpc.StatusCode.UNAUTHENTICATED or self._draining:
                    raise
                await self._register_again(generation)
                await self._send(report, policy)
        except RPCError as error:
            if error.code == grpc.StatusCode.FAILED_PRECONDITION:
                self.stats.refused += 1
                log.info("agent %s: %s: the lease moved on", self.agent_id, error)
            else:
                log.warning(
                    "agent %s: gave up reporting sub-task %s (%s)%s; the server will lease it "
                    "again once this lease ends, and the work will run again if attempts remain",
                    self.agent_id,
                    report.subtask_id,
                    error,
                    f" after retrying for its lease TTL ({lease_ttl:g} s)"
                    if error.code in RETRYABLE_CODES
                    else "",
                )

    async def _send(self, report: Report, policy: RetryPolicy) -> None:
        """Send a report (a request id makes retries after UNAVAILABLE safe).

        A completion asks for the next sub-task in the same call (``lease_next``) unless
        the agent is draining: it arrives in the response instead of on the stream.
        """
        if isinstance(report, distribution_pb.CompleteSubtaskRequest):
            report.lease_next = 0 if self._draining else 1
            response = await self.client.distribution.complete_subtask(report, retry=policy)
            self.stats.completed += 1
            for assignment in response.next_assignments:
                self._accept(assignment)
        else:
            await self.client.distribution.fail_subtask(report, retry=policy)
            self.stats.failed += 1


@contextlib.contextmanager
def _on_sigterm(callback: Callable[[], object]) -> Iterator[None]:
    """Call ``callback`` on SIGTERM while in the context, where the loop can catch signals."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, callback)
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread; Windows
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _cancelling() -> bool:
    """Whether the current task was asked to cancel (rather than a callee raising it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _retrieve(future: asyncio.Future[None]) -> None:
    """Take a cancelled reader's outcome, so that asyncio does not log it as lost."""
    if not future.cancelled():
        future.exception()


async def _cancelled(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` and wait for it to end."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
