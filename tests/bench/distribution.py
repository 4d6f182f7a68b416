"""Distribution beside the bare echo service: sub-tasks end to end, and the coordination cycle.

End to end: ``agents`` agents (capacity ``capacity`` each) are spread over ``workers``
client processes, one connection per agent. Each registers (TTL 60 s, heartbeating every
TTL/3 and naming the sub-tasks it holds, as a real agent does), opens StreamAssignments
and, for every assignment pushed to it, calls CompleteSubtask at once (no work) with a
result naming itself and the sub-task. The bench process then submits ONE task
(SPLIT_POLICY_EXPLICIT, ``subtasks`` independent sub-tasks, lease TTL 60 s) and polls
GetTask until it ends. A warm-up task of ``agents x capacity`` sub-tasks runs first. The
same with one agent of capacity 1 gives the assignment latency of an otherwise idle server.
The pulled flow (``FlowSpec.pull``) opens no stream: each agent runs ``capacity`` loops of
ClaimSubtask (waiting up to 1 s), then CompleteSubtask with ``lease_next`` 1 for as long as
a next lease comes back, with the same task and checks.

- Throughput: sub-tasks / (SubmitTask sent -> last successful CompleteSubtask response).
- Assignment latency, two ways (one clock: ``time.monotonic`` is system-wide on Linux):
  *refill*, from an agent's CompleteSubtask response (its capacity freed) to the next
  assignment pushed to it, the i-th assignment beyond its capacity paired with its i-th
  freed slot (the scheduler's own delay: lease write + push); and *READY -> assigned*,
  from SubmitTask sent (independent sub-tasks are READY at submit) to the assignment
  arriving, which is mostly waiting in the queue behind the backlog.
- Exactly once: GetTask(TASK_VIEW_FULL) shows the task and every sub-task SUCCEEDED
  with the result its one completer sent; the successful CompleteSubtask responses number
  the sub-tasks, no sub-task twice; ListEvents (service DISTRIBUTION, kind
  ``subtask.succeeded``, paginated) holds exactly one entry per sub-task. Durable: the
  server is then killed with SIGKILL and a new one on the same store must show the same.

The echo column runs the same agents from the same processes against the bare echo
service: an agent's bidirectional echo stream stands for StreamAssignments (a message the
size of an Assignment comes back for each free slot) and one unary echo the size of a
CompleteSubtaskRequest stands for the completion, with the same work split evenly over
the agents: the RPC ceiling of this load shape, with no scheduling and no store. For the
pulled flow each of an agent's ``capacity`` loops sends a unary echo the size of an
Assignment (the claim), then per sub-task one the size of a CompleteSubtaskRequest and an
Assignment together (the completion whose response carries the next lease).

Coordination cycle (the old prototype's ~160 ms): one sequential caller, a registered
planner, runs ListAgents (capability ``python``; 16 agents hold it, none streaming),
SubmitTask (SPLIT_POLICY_AUTO, a short description with three bulleted items, so three
sub-tasks) and PutState of a key, interleaved in rounds with single echo round trips. A
variant sends SubmitTask and PutState together (they do not depend on each other), so that
their two commits can share one group commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc
import psutil
from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.duration_pb2 import Duration

from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from agentcoord.distribution.v1 import distribution_service_pb2 as pb
from agentcoord.distribution.v1 import distribution_service_pb2_grpc as pb_grpc
from agentcoord.statesync.v1 import statesync_service_pb2 as state_pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as state_grpc
from tests.bench import echo, procs
from tests.bench.procs import Server
from tests.bench.unary import echo_call, interleaved

CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
"""One TCP connection per agent, as separate agents would have."""
BIG_MESSAGES = [("grpc.max_receive_message_length", 256 << 20)]
"""The bench process reads GetTask(TASK_VIEW_FULL) of 10,000 sub-tasks."""
AGENT_TTL = 60
"""Seconds; agents heartbeat every TTL/3 (the interval Register returns)."""
LEASE_TTL = 60
"""Seconds; the sub-tasks' lease TTL."""
CAPABILITY = "bench"
START_IN_FLIGHT = 16
"""Agents of one worker registering at the same time."""
RUN_TIMEOUT = 600.0
"""Seconds a measured task may take before the bench gives up on it."""
CYCLE_DESCRIPTION = (
    "Prepare the release notes.\n\n"
    "- collect the merged pull requests\n"
    "- summarise the user-facing changes\n"
    "- draft the upgrade notes\n"
)
"""The AUTO task of the coordination cycle: three bulleted items."""
CYCLE_KEYS = 16


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _now() -> float:
    return time.monotonic()


# --- specs and results --------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowSpec:
    """One end-to-end run."""

    mode: str
    """``distribution`` or ``echo``."""
    subtasks: int
    agents: int
    capacity: int
    workers: int
    pull: bool = False
    """Agents pull with ClaimSubtask (``capacity`` claim loops each) instead of having
    assignments pushed on StreamAssignments."""

    @property
    def label(self) -> str:
        """E.g. ``10,000 sub-tasks, 16 agents x capacity 4, 4 client procs, pushed``."""
        agents = f"{self.agents} agent{'s' if self.agents != 1 else ''}"
        procs = f"{self.workers} client proc{'s' if self.workers != 1 else ''}"
        flow = "pulled (ClaimSubtask)" if self.pull else "pushed (StreamAssignments)"
        return f"{self.subtasks:,} sub-tasks, {agents} x capacity {self.capacity}, {procs}, {flow}"


@dataclass
class Checks:
    """The exactly-once and durability checks of one distribution run."""

    task_state: str = "?"
    succeeded: int = 0
    """Sub-tasks SUCCEEDED in GetTask(TASK_VIEW_FULL)."""
    matching: int = 0
    """Of them, those whose result and agent are what their one completer sent."""
    duplicates: int = 0
    """Sub-tasks with more than one successful CompleteSubtask response."""
    events: int = 0
    """``subtask.succeeded`` entries in the change log for the task."""
    event_subtasks: int = 0
    """Distinct sub-tasks among them."""
    event_pages: int = 0
    restarted_state: str = "not checked"
    restarted_matching: int = -1

    def exactly_once(self, expected: int, ok: int) -> bool:
        """Whether every check of a run of ``expected`` sub-tasks holds."""
        return (
            self.task_state == "STATE_SUCCEEDED"
            and self.succeeded == self.matching == expected
            and ok == expected
            and not self.duplicates
            and self.events == self.event_subtasks == expected
        )


@dataclass
class FlowResult:
    """What one end-to-end run did."""

    spec: FlowSpec
    seconds: float = float("nan")
    """Submit (or start, echo) to the last successful completion."""
    submit_seconds: float = float("nan")
    """Duration of the SubmitTask call."""
    first_assignment: float = float("nan")
    """Submit sent to the first assignment arriving anywhere."""
    ok: int = 0
    """Successful CompleteSubtask responses for the measured task."""
    errors: Counter[str] = field(default_factory=Counter)
    revoked: int = 0
    queued: list[float] = field(default_factory=list)
    """READY (submit sent) -> assignment arrived, seconds."""
    refill: list[float] = field(default_factory=list)
    """Capacity freed (CompleteSubtask response) -> next assignment arrived, seconds."""
    complete: list[float] = field(default_factory=list)
    """CompleteSubtask latency, seconds."""
    completed: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Sub-task id -> (agent id, result string) of its successful completion."""
    duplicates: int = 0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    task_id: str = ""
    finished: bool = False
    checks: Checks = field(default_factory=Checks)
    revisions: int = 0
    """The store's revision after the run (set by the replicas section: changes written)."""

    @property
    def rate(self) -> float:
        """Sub-tasks completed per second end to end."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_rate(self) -> float:
        """Sub-tasks completed per second from the first assignment on (submit excluded)."""
        window = self.seconds - self.first_assignment
        return self.ok / window if window > 0 else 0.0


# --- payloads for the echo stand-in --------------------------------------------------------------


def _sample_payloads() -> tuple[bytes, bytes]:
    """An Assignment message and a CompleteSubtaskRequest of realistic sizes."""
    now = timestamp_pb2.Timestamp(seconds=int(time.time()), nanos=123_456_000)
    subtask_id, task_id, agent_id = str(uuid.uuid4()), str(uuid.uuid4()), "bench-agent-0000"
    lease = pb.Lease(
        subtask_id=subtask_id,
        fencing_token=123_456,
        expire_time=now,
        ttl=Duration(seconds=LEASE_TTL),
        agent_id=agent_id,
        attempt=1,
    )
    subtask = pb.Subtask(
        subtask_id=subtask_id,
        task_id=task_id,
        local_id="s01234",
        title="sub-task 1234",
        required_capabilities=[],
        state=pb.Subtask.STATE_LEASED,
        attempt=1,
        max_attempts=3,
        lease=lease,
        agent_id=agent_id,
        create_time=now,
        update_time=now,
        start_time=now,
        revision=123_456,
    )
    assignment = pb.StreamAssignmentsResponse(
        assignment=pb.Assignment(lease=lease, subtask=subtask)
    ).SerializeToString()
    complete = pb.CompleteSubtaskRequest(
        subtask_id=subtask_id,
        agent_id=agent_id,
        fencing_token=123_456,
        result=struct_pb2.Value(string_value=f"{agent_id}/{subtask_id}"),
    ).SerializeToString()
    return assignment, complete


# --- one agent, in a worker process --------------------------------------------------------------


class _Agent:
    """One agent: its connection, its stream of assignments and what it saw."""

    def __init__(self, agent_id: str, capacity: int) -> None:
        self.agent_id = agent_id
        self.capacity = capacity
        self.held: set[str] = set()
        self.arrivals: dict[str, list[float]] = {}
        """Task id -> arrival times of its assignments."""
        self.freed: dict[str, list[float]] = {}
        """Task id -> times CompleteSubtask answered (a slot freed)."""
        self.complete: dict[str, list[float]] = {}
        self.completed: dict[str, list[tuple[str, str]]] = {}
        """Task id -> (sub-task id, result sent) of successful completions."""
        self.last: dict[str, float] = {}
        self.errors: Counter[str] = Counter()
        self.revoked = 0
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.interval = AGENT_TTL / 3
        self._inflight: set[asyncio.Task[None]] = set()

    # distribution

    async def join(self, channel: grpc.aio.Channel, *, pull: bool) -> None:
        """Register, heartbeat (a first one at once), and open StreamAssignments unless it pulls."""
        discovery = discovery_grpc.DiscoveryServiceStub(channel)
        response = await discovery.Register(
            discovery_pb.RegisterRequest(
                agent_id=self.agent_id,
                name=self.agent_id,
                role="worker",
                capabilities=[CAPABILITY, "python"],
                capacity=self.capacity,
                ttl=Duration(seconds=AGENT_TTL),
            )
        )
        self.metadata = _bearer(response.session_token)
        self.interval = response.heartbeat_interval.ToTimedelta().total_seconds() or self.interval
        self.stub = pb_grpc.DistributionServiceStub(channel)
        self.heartbeats = discovery.Heartbeat(self._heartbeat_requests(), metadata=self.metadata)
        await self.heartbeats.read()  # the first ack: the session is live
        if pull:
            return
        self.stream = self.stub.StreamAssignments(
            pb.StreamAssignmentsRequest(agent_id=self.agent_id), metadata=self.metadata
        )
        # The stream is up at the server before the warm-up task is done (the server sends no
        # metadata before the first assignment, so wait_for_connection() would wait for it).

    async def _heartbeat_requests(self) -> AsyncIterator[discovery_pb.HeartbeatRequest]:
        while True:
            held = sorted(self.held)[:1024]
            yield discovery_pb.HeartbeatRequest(
                agent_id=self.agent_id,
                load=discovery_pb.Load(active_subtasks=len(held), held_subtask_ids=held),
            )
            await asyncio.sleep(self.interval)

    async def serve(self, *, pull: bool) -> None:
        """Complete every assignment pushed (or, with ``pull``, claimed), until cancelled."""
        acks = asyncio.create_task(self._read_acks())
        try:
            if pull:
                await asyncio.gather(*(self._claim_loop() for _ in range(self.capacity)))
            else:
                await self._serve_stream()
        finally:
            acks.cancel()
            self.heartbeats.cancel()
            if not pull:
                self.stream.cancel()

    async def _serve_stream(self) -> None:
        try:
            async for response in self.stream:
                if response.HasField("assignment"):
                    assignment = self._arrived(response.assignment)
                    task = asyncio.create_task(self._complete(assignment))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
                else:
                    self.revoked += 1
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.errors[f"stream {error.code().name}"] += 1

    async def _claim_loop(self) -> None:
        """One slot of a pulling agent: claim (waiting up to 1 s), then complete each
        sub-task asking for the next in the same call (``lease_next``) until none comes."""
        request = pb.ClaimSubtaskRequest(agent_id=self.agent_id, wait=Duration(seconds=1))
        while True:
            try:
                response = await self.stub.ClaimSubtask(request, metadata=self.metadata)
            except grpc.aio.AioRpcError as error:
                self.errors[f"ClaimSubtask {error.code().name}"] += 1
                await asyncio.sleep(0.1)
                continue
            assignment = response.assignment if response.HasField("assignment") else None
            if assignment is not None:
                assignment = self._arrived(assignment)
            while assignment is not None:
                assignment = await self._complete(assignment, lease_next=1)

    def _arrived(self, assignment: pb.Assignment) -> pb.Assignment:
        """Note an assignment's arrival and its lease as held."""
        self.arrivals.setdefault(assignment.subtask.task_id, []).append(_now())
        self.held.add(assignment.lease.subtask_id)
        return assignment

    async def _read_acks(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            while (ack := await self.heartbeats.read()) is not grpc.aio.EOF:
                if ack.command == discovery_pb.HeartbeatResponse.COMMAND_REREGISTER:
                    self.errors["heartbeat REREGISTER"] += 1

    async def _complete(
        self, assignment: pb.Assignment, lease_next: int = 0
    ) -> pb.Assignment | None:
        """Complete a sub-task; return the next one leased in the same call, if any."""
        lease = assignment.lease
        task_id = assignment.subtask.task_id
        result = f"{self.agent_id}/{lease.subtask_id}"
        started = _now()
        following = None
        try:
            response = await self.stub.CompleteSubtask(
                pb.CompleteSubtaskRequest(
                    subtask_id=lease.subtask_id,
                    agent_id=self.agent_id,
                    fencing_token=lease.fencing_token,
                    result=struct_pb2.Value(string_value=result),
                    lease_next=lease_next,
                ),
                metadata=self.metadata,
            )
        except grpc.aio.AioRpcError as error:
            self.errors[f"CompleteSubtask {error.code().name}"] += 1
        else:
            done = _now()
            self.complete.setdefault(task_id, []).append(done - started)
            self.completed.setdefault(task_id, []).append((lease.subtask_id, result))
            self.last[task_id] = done
            following = response.next_assignments[0] if response.next_assignments else None
        finally:
            self.held.discard(lease.subtask_id)
            self.freed.setdefault(task_id, []).append(_now())
        return None if following is None else self._arrived(following)

    # echo

    async def join_echo(self, channel: grpc.aio.Channel, complete: bytes, *, pull: bool) -> None:
        """Warm the connection up and, unless it pulls, open the echo stream."""
        self.echo_unary = channel.unary_unary(echo.UNARY)
        await self.echo_unary(complete)
        if pull:
            return
        self.pushes: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.echo_stream = channel.stream_stream(echo.STREAM)(self._echo_requests())

    async def _echo_requests(self) -> AsyncIterator[bytes]:
        while (item := await self.pushes.get()) is not None:
            yield item

    async def _echo_complete(self, complete: bytes) -> None:
        """The stand-in of one CompleteSubtask, recorded as a completion."""
        key = "echo"
        started = _now()
        await self.echo_unary(complete)
        freed = _now()
        self.complete.setdefault(key, []).append(freed - started)
        self.completed.setdefault(key, []).append(("", ""))
        self.last[key] = freed
        self.freed.setdefault(key, []).append(freed)

    async def serve_echo(self, quota: int, assignment: bytes, complete: bytes) -> None:
        """Do ``quota`` echo "sub-tasks", ``capacity`` at a time, pushed on the echo stream."""
        sent = min(quota, self.capacity)
        done = 0
        for _ in range(sent):
            self.pushes.put_nowait(assignment)

        async def finish() -> None:
            nonlocal sent, done
            await self._echo_complete(complete)
            done += 1
            if sent < quota:
                sent += 1
                self.pushes.put_nowait(assignment)
            if done == quota:
                self.pushes.put_nowait(None)

        if quota == 0:
            self.pushes.put_nowait(None)
        async for _ in self.echo_stream:
            self.arrivals.setdefault("echo", []).append(_now())
            task = asyncio.create_task(finish())
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        await asyncio.gather(*self._inflight)

    async def serve_echo_pull(self, quota: int, assignment: bytes, complete: bytes) -> None:
        """Do ``quota`` echo "sub-tasks" in ``capacity`` loops: a claim, then completions.

        The claim's stand-in is a unary echo the size of an Assignment (the ClaimSubtask
        response); each completion's, one the size of a CompleteSubtaskRequest and an
        Assignment (the request, and the response carrying the next lease), as the agents'
        completions with ``lease_next`` do.
        """
        left = quota
        completion = complete + assignment

        async def loop() -> None:
            nonlocal left
            if left > 0:
                await self.echo_unary(assignment)
            while left > 0:
                left -= 1
                self.arrivals.setdefault("echo", []).append(_now())
                await self._echo_complete(completion)

        await asyncio.gather(*(loop() for _ in range(self.capacity)))

    # results

    def stats(self, task_id: str) -> dict[str, Any]:
        """What this agent saw of one task."""
        arrivals = sorted(self.arrivals.get(task_id, []))
        freed = sorted(self.freed.get(task_id, []))
        refill = [
            arrived - freed[index - self.capacity]
            for index, arrived in enumerate(arrivals)
            if self.capacity <= index < len(freed) + self.capacity
        ]
        return {
            "arrivals": arrivals,
            "refill": refill,
            "complete": self.complete.get(task_id, []),
            "completed": [(s, self.agent_id, r) for s, r in self.completed.get(task_id, [])],
            "last": self.last.get(task_id, float("-inf")),
            "errors": Counter(self.errors),
            "revoked": self.revoked,
        }


# --- a worker process ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    spec: FlowSpec
    address: str
    agents: list[int]
    """Global agent numbers of this worker."""
    quotas: list[int]
    """Echo: sub-tasks per agent."""


async def _worker(plan: _Plan, conn: Connection) -> dict[str, Any]:
    spec = plan.spec
    assignment, complete = _sample_payloads()
    agents = [_Agent(f"bench-agent-{number:04d}", spec.capacity) for number in plan.agents]
    async with contextlib.AsyncExitStack() as stack:
        starting = asyncio.Semaphore(START_IN_FLIGHT)

        async def start(agent: _Agent) -> None:
            channel = await stack.enter_async_context(
                grpc.aio.insecure_channel(plan.address, options=CHANNEL_OPTIONS)
            )
            async with starting:
                if spec.mode == "echo":
                    await agent.join_echo(channel, complete, pull=spec.pull)
                else:
                    await agent.join(channel, pull=spec.pull)

        await asyncio.gather(*(start(agent) for agent in agents))
        conn.send(("ready",))
        if spec.mode == "echo":
            _, begin = await asyncio.to_thread(conn.recv)
            await asyncio.sleep(max(0.0, begin - _now()))
            serve = _Agent.serve_echo_pull if spec.pull else _Agent.serve_echo
            await asyncio.gather(
                *(
                    serve(agent, quota, assignment, complete)
                    for agent, quota in zip(agents, plan.quotas, strict=True)
                )
            )
            task_id = "echo"
        else:
            serving = [asyncio.create_task(agent.serve(pull=spec.pull)) for agent in agents]
            _, task_id = await asyncio.to_thread(conn.recv)
            for task in serving:
                task.cancel()
            await asyncio.gather(*serving, return_exceptions=True)
        merged: dict[str, Any] = {
            "arrivals": [],
            "refill": [],
            "complete": [],
            "completed": [],
            "last": float("-inf"),
            "errors": Counter(),
            "revoked": 0,
        }
        for agent in agents:
            stats = agent.stats(task_id)
            for key in ("arrivals", "refill", "complete", "completed"):
                merged[key] += stats[key]
            merged["last"] = max(merged["last"], stats["last"])
            merged["errors"].update(stats["errors"])
            merged["revoked"] += stats["revoked"]
        return merged


def worker_main(plan: _Plan, conn: Connection) -> None:
    """Entry point of one client process: sends back ``("done", stats)`` or ``("error", tb)``."""
    procs.serve_worker(lambda: _worker(plan, conn), conn)


def _recv(conn: Connection, timeout: float) -> tuple[Any, ...]:
    return procs.receive(conn, timeout, "distribution")


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


# --- the parent ----------------------------------------------------------------------------------


def explicit_task(title: str, count: int) -> pb.TaskSpec:
    """An EXPLICIT task of ``count`` independent sub-tasks."""
    return pb.TaskSpec(
        title=title,
        split_policy=pb.SPLIT_POLICY_EXPLICIT,
        lease_ttl=Duration(seconds=LEASE_TTL),
        subtasks=[
            pb.SubtaskSpec(local_id=f"s{i:05d}", title=f"sub-task {i}") for i in range(count)
        ],
    )


async def _wait_for_end(stub: pb_grpc.DistributionServiceStub, task_id: str, timeout: float) -> str:
    """Poll GetTask (basic view) until the task ends; returns its state name."""
    deadline = _now() + timeout
    final = (pb.Task.STATE_SUCCEEDED, pb.Task.STATE_FAILED, pb.Task.STATE_CANCELLED)
    while True:
        task = (
            await stub.GetTask(pb.GetTaskRequest(task_id=task_id, view=pb.TASK_VIEW_BASIC))
        ).task
        if task.state in final:
            return pb.Task.State.Name(task.state)
        if _now() > deadline:
            return f"{pb.Task.State.Name(task.state)} after {timeout:g} s"
        await asyncio.sleep(0.1)


async def _submit_and_wait(
    address: str, count: int, warmup: int, before: Callable[[], None]
) -> dict[str, Any]:
    """The warm-up task, then the measured one (``before`` is called just before it)."""
    async with grpc.aio.insecure_channel(address, options=BIG_MESSAGES) as channel:
        stub = pb_grpc.DistributionServiceStub(channel)
        if warmup:
            response = await stub.SubmitTask(
                pb.SubmitTaskRequest(task=explicit_task("bench warm-up", warmup))
            )
            await _wait_for_end(stub, response.task.task_id, 120)
            await asyncio.sleep(0.3)
        request = pb.SubmitTaskRequest(
            task=explicit_task("bench", count), request_id=str(uuid.uuid4())
        )
        before()
        sent = _now()
        response = await stub.SubmitTask(request)
        submitted = _now()
        state = await _wait_for_end(stub, response.task.task_id, RUN_TIMEOUT)
        return {
            "task_id": response.task.task_id,
            "sent": sent,
            "submitted": submitted,
            "ended": _now(),
            "state": state,
        }


def run_flow(spec: FlowSpec, server: Server, others: Sequence[Server] = ()) -> FlowResult:
    """Run one end-to-end load against ``server`` (agentcoord or echo), checks not included.

    With ``others`` (replicas of ``server`` on the same store), the client processes are
    spread over all of them in turn (so are their agents); the task is submitted to
    ``server`` and the server CPU is the sum of them all.
    """
    servers = [server, *others]
    context = mp.get_context("spawn")
    numbers = list(range(spec.agents))
    shares = [numbers[index :: spec.workers] for index in range(spec.workers)]
    quota = [spec.subtasks // spec.agents + (n < spec.subtasks % spec.agents) for n in numbers]
    processes: list[Any] = []
    conns: list[Connection] = []
    result = FlowResult(spec)
    try:
        for index, share in enumerate(shares):
            parent, child = context.Pipe()
            address = servers[index % len(servers)].address
            plan = _Plan(spec, address, share, [quota[n] for n in share])
            process = context.Process(target=worker_main, args=(plan, child), daemon=True)
            process.start()
            child.close()
            processes.append(process)
            conns.append(parent)
        for conn in conns:
            _recv(conn, 120)
        clients = [psutil.Process(process.pid) for process in processes]
        cpu_before = [0.0, 0.0]

        def sample() -> None:
            cpu_before[:] = [sum(s.cpu_seconds() for s in servers), _cpu(clients)]

        if spec.mode == "echo":
            begin = _now() + 0.3
            for conn in conns:
                conn.send(("go", begin))
            time.sleep(max(0.0, begin - _now()))
            sample()
            replies = [_recv(conn, RUN_TIMEOUT) for conn in conns]
            ended = _now()
            server_after, clients_after = sum(s.cpu_seconds() for s in servers), _cpu(clients)
            sent = begin
            result.finished = True
        else:
            warmup = spec.agents * spec.capacity
            times = asyncio.run(_submit_and_wait(server.address, spec.subtasks, warmup, sample))
            ended = times["ended"]
            sent = times["sent"]
            result.task_id = times["task_id"]
            result.submit_seconds = times["submitted"] - sent
            result.checks.task_state = times["state"]
            result.finished = times["state"] == "STATE_SUCCEEDED"
            # CPU up to the end of the run, before the workers wind down.
            server_after, clients_after = sum(s.cpu_seconds() for s in servers), _cpu(clients)
            for conn in conns:
                conn.send(("stop", result.task_id))
            replies = [_recv(conn, 120) for conn in conns]
        last = float("-inf")
        for _, stats in replies:
            result.queued += [arrived - sent for arrived in stats["arrivals"]]
            result.refill += stats["refill"]
            result.complete += stats["complete"]
            result.errors.update(stats["errors"])
            result.revoked += stats["revoked"]
            last = max(last, stats["last"])
            for subtask_id, agent_id, sent_result in stats["completed"]:
                result.ok += 1
                if spec.mode == "echo":
                    continue
                if subtask_id in result.completed:
                    result.duplicates += 1
                result.completed[subtask_id] = (agent_id, sent_result)
        result.seconds = last - sent
        result.first_assignment = min(result.queued, default=float("nan"))
        window = max(1e-9, ended - sent)
        result.server_cpu = (server_after - cpu_before[0]) / window
        result.client_cpu = (clients_after - cpu_before[1]) / window
        return result
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)
        for conn in conns:
            conn.close()


# --- the checks ----------------------------------------------------------------------------------


async def _full_task(address: str, task_id: str) -> pb.Task:
    """GetTask(TASK_VIEW_FULL) with every sub-task: the pages past the first one too.

    The server cuts a FULL view at its message size limit (10,000 sub-tasks with results
    do not fit) and hands a token for ListSubtasks to continue.
    """
    async with grpc.aio.insecure_channel(address, options=BIG_MESSAGES) as channel:
        stub = pb_grpc.DistributionServiceStub(channel)
        request = pb.GetTaskRequest(task_id=task_id, view=pb.TASK_VIEW_FULL)
        response = await stub.GetTask(request, timeout=120)
        task, token = response.task, response.next_subtasks_page_token
        while token:
            page = await stub.ListSubtasks(
                pb.ListSubtasksRequest(task_id=task_id, page_size=1000, page_token=token),
                timeout=120,
            )
            task.subtasks.extend(page.subtasks)
            token = page.next_page_token
        return task


def _matching(task: pb.Task, completed: dict[str, tuple[str, str]]) -> tuple[int, int]:
    """Sub-tasks SUCCEEDED, and of them those holding what their one completer sent."""
    succeeded = matching = 0
    for subtask in task.subtasks:
        if subtask.state != pb.Subtask.STATE_SUCCEEDED:
            continue
        succeeded += 1
        sent = completed.get(subtask.subtask_id)
        if (
            sent is not None
            and subtask.agent_id == sent[0]
            and subtask.result.WhichOneof("kind") == "string_value"
            and subtask.result.string_value == sent[1]
        ):
            matching += 1
    return succeeded, matching


async def check_exactly_once(address: str, result: FlowResult) -> None:
    """Fill ``result.checks`` from GetTask(TASK_VIEW_FULL) and the change log."""
    checks = result.checks
    task = await _full_task(address, result.task_id)
    checks.task_state = pb.Task.State.Name(task.state)
    checks.succeeded, checks.matching = _matching(task, result.completed)
    checks.duplicates = result.duplicates
    per_subtask: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(address, options=BIG_MESSAGES) as channel:
        stub = state_grpc.StateSyncServiceStub(channel)
        token = ""
        while True:
            page = await stub.ListEvents(
                state_pb.ListEventsRequest(
                    page_size=1000,
                    page_token=token,
                    service=state_pb.SERVICE_DISTRIBUTION,
                    kind="subtask.succeeded",
                    subject=result.task_id,
                ),
                timeout=60,
            )
            checks.event_pages += 1
            for event in page.events:
                per_subtask[str(event.details.fields["subtask_id"].string_value)] += 1
            token = page.next_page_token
            if not token:
                break
    checks.events = sum(per_subtask.values())
    checks.event_subtasks = len(per_subtask)


async def check_after_restart(address: str, result: FlowResult) -> None:
    """After SIGKILL and a restart on the same store: the same task, the same results."""
    task = await _full_task(address, result.task_id)
    result.checks.restarted_state = pb.Task.State.Name(task.state)
    _, result.checks.restarted_matching = _matching(task, result.completed)


# --- the coordination cycle ----------------------------------------------------------------------


async def measure_cycle(
    address: str, echo_address: str, count: int, warmup: int
) -> tuple[dict[str, list[float]], int]:
    """Coordination cycles and single echo round trips, interleaved.

    Returns:
        Seconds per call by name (``cycle``, ``echo``, each step of ``cycle``, and
        ``overlapped``: the cycle with SubmitTask and PutState sent together), and the
        number of sub-tasks the AUTO splitter made of the cycle's task.
    """
    async with (
        grpc.aio.insecure_channel(address) as channel,
        grpc.aio.insecure_channel(echo_address) as echo_channel,
    ):
        discovery = discovery_grpc.DiscoveryServiceStub(channel)
        for index in range(16):
            await discovery.Register(
                discovery_pb.RegisterRequest(
                    agent_id=f"cycle-worker-{index:02d}",
                    name=f"cycle worker {index}",
                    role="worker",
                    capabilities=["python", f"tool-{index % 4}"],
                    capacity=4,
                    ttl=Duration(seconds=300),
                )
            )
        planner = await discovery.Register(
            discovery_pb.RegisterRequest(
                agent_id="cycle-planner",
                name="cycle planner",
                role="planner",
                capabilities=["planning"],
                ttl=Duration(seconds=300),
            )
        )
        metadata = _bearer(planner.session_token)
        distribution = pb_grpc.DistributionServiceStub(channel)
        statesync = state_grpc.StateSyncServiceStub(channel)
        steps: dict[str, list[float]] = {"ListAgents": [], "SubmitTask": [], "PutState": []}
        split: list[int] = []
        cycles = 0

        async def list_agents() -> int:
            request = discovery_pb.ListAgentsRequest(capabilities=["python"])
            return len((await discovery.ListAgents(request, metadata=metadata)).agents)

        async def submit() -> None:
            nonlocal cycles
            cycles += 1
            request = pb.SubmitTaskRequest(
                task=pb.TaskSpec(
                    title=f"release notes {cycles}",
                    description=CYCLE_DESCRIPTION,
                    split_policy=pb.SPLIT_POLICY_AUTO,
                ),
                request_id=str(uuid.uuid4()),
            )
            response = await distribution.SubmitTask(request, metadata=metadata)
            split.append(len(response.task.subtasks))

        async def put_state(found: int) -> None:
            request = state_pb.PutStateRequest(
                key=f"shared/bench/cycle-{cycles % CYCLE_KEYS}",
                json=struct_pb2.Value(number_value=found),
                request_id=str(uuid.uuid4()),
            )
            await statesync.PutState(request, metadata=metadata)

        async def cycle() -> object:
            started = _now()
            found = await list_agents()
            listed = _now()
            await submit()
            planned = _now()
            await put_state(found)
            written = _now()
            steps["ListAgents"].append(listed - started)
            steps["SubmitTask"].append(planned - listed)
            steps["PutState"].append(written - planned)
            return None

        async def overlapped() -> object:
            """The same cycle with the two writes in flight together (they are independent)."""
            found = await list_agents()
            await asyncio.gather(submit(), put_state(found))
            return None

        payload = discovery_pb.ListAgentsRequest(capabilities=["python"]).SerializeToString()
        calls = {"echo": echo_call(echo_channel, payload), "cycle": cycle, "overlapped": overlapped}
        samples = await interleaved(calls, count, warmup)
        kept = len(samples["cycle"])
        for name, values in steps.items():  # drop the warm-up cycles
            samples[name] = values[len(values) - kept :]
        return samples, max(split, default=0)
