"""A real server with a seeded world, and the one way the fuzz test calls it.

The server runs on its own event loop in a thread, so the test can drive it with the
synchronous grpc client and raw request bytes, and a stuck server loop shows up as a
client deadline instead of stalling the test. Before any fuzzing, :class:`World`
registers agents, submits tasks, leases a sub-task and writes keys, and keeps what the
server answered (ids, tokens, keys, page tokens, revisions) as :class:`Seeds`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import duration_pb2, struct_pb2
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st

from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from agentcoord.distribution.v1 import distribution_service_pb2 as distribution_pb
from agentcoord.distribution.v1 import distribution_service_pb2_grpc as distribution_grpc
from agentcoord.server.app import App, start_app
from agentcoord.server.config import ServerConfig
from agentcoord.statesync.v1 import statesync_service_pb2 as statesync_pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as statesync_grpc
from tests.fuzz.strategies import (
    RequestStrategies,
    Seeds,
    Wire,
    forged_page_tokens,
)
from tests.helpers import field_violations

SERVICE_FILES = (discovery_pb, distribution_pb, statesync_pb)
METHODS: tuple[MethodDescriptor, ...] = tuple(
    method
    for module in SERVICE_FILES
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
)
"""Every RPC of every agentcoord service, from the descriptors."""

JOIN_TOKEN = "fuzz-join-token"
ADMIN_TOKEN = "fuzz-admin-token"
CALL_DEADLINE = 8.0
"""Seconds a call that must end (unary, or a stream the client half-closed) may take."""
WATCH_WINDOW = 0.25
"""Seconds a server stream on a unary request is read before the client hangs up."""
AGENT_IDS = ("fuzz-worker-0", "fuzz-worker-1", "fuzz-planner")
CREDENTIALS = (
    "session:0",
    "session:1",
    "session:2",
    "admin",
    "join",
    "none",
    "stale-session",
    "unknown-bearer",
    "malformed-authorization",
    "wrong-join-token",
)
"""Who a call claims to be; ``session:N`` is the live session of ``AGENT_IDS[N]``."""


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


class ServerThread:
    """A real server (``start_app``) on a private event loop in a daemon thread."""

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.app: App | None = None
        self._thread = threading.Thread(target=self._run, name="fuzz-server", daemon=True)

    def start(self) -> int:
        """Start the server; return its port."""
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise RuntimeError("server did not start") from self._error
        assert self.app is not None
        return self.app.port

    def stop(self) -> None:
        """Stop the server and wait for its thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # reported by start()
            self._error = error
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.app = await start_app(self._config)
        self._ready.set()
        await self._stop.wait()
        await self.app.stop(0)


class ServerLog(logging.Handler):
    """Collects the tracebacks and errors the process logs, call by call."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self._lock = threading.Lock()
        self._records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            text += "\n" + "".join(traceback.format_exception(record.exc_info[1]))
        with self._lock:
            self._records.append(text)

    def take(self) -> list[str]:
        """Return what was logged since the last call, and forget it."""
        with self._lock:
            taken, self._records = self._records, []
        return taken

    @contextmanager
    def installed(self) -> Iterator[ServerLog]:
        root = logging.getLogger()
        root.addHandler(self)
        try:
            yield self
        finally:
            root.removeHandler(self)


@dataclass
class World:
    """The seeded state of one server and the live credentials to reach it."""

    channel: grpc.Channel
    tokens: dict[str, str] = field(default_factory=dict)
    """Session token by agent id."""
    epochs: dict[str, int] = field(default_factory=dict)
    stale_token: str = ""
    seeds: Seeds = field(default_factory=Seeds)

    @property
    def admin(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {ADMIN_TOKEN}"),)

    def metadata(self, credential: str) -> tuple[tuple[str, str], ...]:
        """Return the call metadata of one of :data:`CREDENTIALS`."""
        if credential.startswith("session:"):
            token = self.tokens[AGENT_IDS[int(credential.partition(":")[2])]]
            return (("authorization", f"Bearer {token}"),)
        return {
            "admin": self.admin,
            "join": (("x-agentcoord-join-token", JOIN_TOKEN),),
            "none": (),
            "stale-session": (("authorization", f"Bearer {self.stale_token}"),),
            "unknown-bearer": (("authorization", "Bearer not-a-token"),),
            "malformed-authorization": (("authorization", "Basic Zm9vOmJhcg=="),),
            "wrong-join-token": (("x-agentcoord-join-token", "wrong"),),
        }[credential]

    # Seeding

    def register(self, agent_id: str, *, take_over: bool = False, **fields: Any) -> None:
        """Open a session for ``agent_id``; ``take_over`` ends its live one (the admin may)."""
        stub = discovery_grpc.DiscoveryServiceStub(self.channel)
        response = stub.Register(
            discovery_pb.RegisterRequest(agent_id=agent_id, name=agent_id, **fields),
            metadata=self.admin if take_over else (("x-agentcoord-join-token", JOIN_TOKEN),),
            timeout=CALL_DEADLINE,
        )
        self.tokens[agent_id] = response.session_token
        self.epochs[agent_id] = response.epoch

    def _agent_fields(self, agent_id: str) -> dict[str, Any]:
        planner = agent_id == "fuzz-planner"
        return {
            "role": "planner" if planner else "worker",
            "capabilities": ["fuzz.plan"] if planner else ["fuzz.work", "fuzz.extra"],
            "capacity": 4,
            "labels": {"zone": "a"},
            "skills": [discovery_pb.Skill(id="s1", name="skill", tags=["t"])],
            "ttl": seconds(120),
        }

    def seed(self) -> None:
        """Create real agents, tasks, a lease and keys; record them as seeds."""
        self.register("fuzz-stale", ttl=seconds(120))
        self.stale_token = self.tokens.pop("fuzz-stale")
        self.register("fuzz-stale", take_over=True, ttl=seconds(120))  # the first is stale
        for agent_id in AGENT_IDS:
            self.register(agent_id, **self._agent_fields(agent_id))
        tasks = distribution_grpc.DistributionServiceStub(self.channel)
        state = statesync_grpc.StateSyncServiceStub(self.channel)
        planner = self.metadata("session:2")
        worker = self.metadata("session:0")
        task_ids, subtask_ids, fencing = [], [], []
        specs = [
            distribution_pb.TaskSpec(
                title="one",
                split_policy=distribution_pb.SPLIT_POLICY_NONE,
                required_capabilities=["fuzz.work"],
                input=struct_pb2.Value(string_value="in"),
            ),
            distribution_pb.TaskSpec(
                title="explicit",
                split_policy=distribution_pb.SPLIT_POLICY_EXPLICIT,
                subtasks=[
                    distribution_pb.SubtaskSpec(local_id="a", title="a"),
                    distribution_pb.SubtaskSpec(local_id="b", title="b", depends_on=["a"]),
                    distribution_pb.SubtaskSpec(local_id="c", title="c", depends_on=["a", "b"]),
                ],
                aggregation_local_id="c",
                required_capabilities=["fuzz.work"],
            ),
            distribution_pb.TaskSpec(
                title="auto",
                split_policy=distribution_pb.SPLIT_POLICY_AUTO,
                description="Plan:\n- fetch the data\n- clean it\n- report on it",
                required_capabilities=["fuzz.work"],
            ),
            distribution_pb.TaskSpec(
                title="to cancel", split_policy=distribution_pb.SPLIT_POLICY_NONE
            ),
        ]
        for index, spec in enumerate(specs):
            task = tasks.SubmitTask(
                distribution_pb.SubmitTaskRequest(task=spec, request_id=f"seed-{index}"),
                metadata=planner,
                timeout=CALL_DEADLINE,
            ).task
            task_ids.append(task.task_id)
            subtask_ids.extend(subtask.subtask_id for subtask in task.subtasks)
        tasks.CancelTask(
            distribution_pb.CancelTaskRequest(task_id=task_ids[-1], reason="seed"),
            metadata=planner,
            timeout=CALL_DEADLINE,
        )
        for _ in range(3):
            claimed = tasks.ClaimSubtask(
                distribution_pb.ClaimSubtaskRequest(agent_id="fuzz-worker-0"),
                metadata=worker,
                timeout=CALL_DEADLINE,
            )
            if claimed.HasField("assignment"):
                fencing.append(claimed.assignment.lease.fencing_token)
                subtask_ids.append(claimed.assignment.lease.subtask_id)
        if len(fencing) > 1:  # one finished each way; the others stay leased
            tasks.CompleteSubtask(
                distribution_pb.CompleteSubtaskRequest(
                    subtask_id=subtask_ids[-1],
                    agent_id="fuzz-worker-0",
                    fencing_token=fencing[-1],
                    result=struct_pb2.Value(number_value=1),
                ),
                metadata=worker,
                timeout=CALL_DEADLINE,
            )
        keys = ["shared/fuzz/json", "shared/fuzz/binary", "agents/fuzz-worker-0/own"]
        state.PutState(
            statesync_pb.PutStateRequest(key=keys[0], json=struct_pb2.Value(number_value=1)),
            metadata=worker,
            timeout=CALL_DEADLINE,
        )
        state.PutState(
            statesync_pb.PutStateRequest(key=keys[1], binary=b"\x00\x01", metadata={"m": "1"}),
            metadata=worker,
            timeout=CALL_DEADLINE,
        )
        state.PutState(
            statesync_pb.PutStateRequest(
                key=keys[2], json=struct_pb2.Value(string_value="x"), bind_to_session=True
            ),
            metadata=worker,
            timeout=CALL_DEADLINE,
        )
        state.PutState(
            statesync_pb.PutStateRequest(
                key="shared/fuzz/ttl", json=struct_pb2.Value(bool_value=True), ttl=seconds(600)
            ),
            metadata=self.admin,
            timeout=CALL_DEADLINE,
        )
        keys.append("shared/fuzz/ttl")
        self.seeds = self._seeds(task_ids, subtask_ids, fencing, keys)

    def _first_pages(self, split_task_id: str) -> list[tuple[Message, str]]:
        """Return a first-page request of every listing and the next-page token it got."""
        discovery = discovery_grpc.DiscoveryServiceStub(self.channel)
        tasks = distribution_grpc.DistributionServiceStub(self.channel)
        state = statesync_grpc.StateSyncServiceStub(self.channel)
        requests: list[tuple[Any, Message]] = [
            (discovery.ListAgents, discovery_pb.ListAgentsRequest(page_size=1)),
            (tasks.ListTasks, distribution_pb.ListTasksRequest(page_size=1)),
            (state.ListStates, statesync_pb.ListStatesRequest(prefix="shared/", page_size=1)),
            (state.ListEvents, statesync_pb.ListEventsRequest(page_size=1)),
            (
                tasks.ListSubtasks,
                distribution_pb.ListSubtasksRequest(task_id=split_task_id, page_size=1),
            ),
        ]
        pages = []
        for list_page, request in requests:
            token = list_page(request, metadata=self.admin, timeout=CALL_DEADLINE).next_page_token
            assert token, f"{request.DESCRIPTOR.name} has one page only"
            pages.append((request, token))
        return pages

    @staticmethod
    def _continuations(pages: Sequence[tuple[Message, str]]) -> dict[str, list[Message]]:
        """Return each listing's first request again with its real token and forged ones.

        The filters match the token's, so a forged position is what the server must judge.
        """
        continuations: dict[str, list[Message]] = {}
        for request, token in pages:
            forged = forged_page_tokens([token])
            for page_token in [*[token] * len(forged), *forged]:
                again = type(request)()
                again.CopyFrom(request)
                again.page_token = page_token
                continuations.setdefault(request.DESCRIPTOR.name, []).append(again)
        return continuations

    def _seeds(
        self,
        task_ids: Sequence[str],
        subtask_ids: Sequence[str],
        fencing: Sequence[int],
        keys: Sequence[str],
    ) -> Seeds:
        state = statesync_grpc.StateSyncServiceStub(self.channel)
        events = state.ListEvents(
            statesync_pb.ListEventsRequest(page_size=1000), metadata=self.admin, timeout=10
        ).events
        revision = max((event.revision for event in events), default=1)
        pages = self._first_pages(task_ids[1])
        agent_ids = [*AGENT_IDS, "fuzz-stale", "no-such-agent"]
        local_ids = ["a", "b", "c", "missing"]
        capabilities = ["fuzz.work", "fuzz.plan", "fuzz.extra", "nobody.can"]
        text = {
            "agent_id": agent_ids,
            "submitter_agent_id": agent_ids,
            "task_id": [*task_ids, "no-such-task"],
            "subtask_id": [*subtask_ids, "no-such-subtask"],
            "key": [*keys, "shared/fuzz/new", "agents/fuzz-worker-1/new", "agents/x/y"],
            "prefix": ["", "shared/", "shared/fuzz/", "agents/", "agents/fuzz-worker-0/"],
            "subject": [*keys, *task_ids, *agent_ids],
            "kind": sorted({event.kind for event in events}),
            "role": ["worker", "planner", "nobody"],
            "capabilities": capabilities,
            "required_capabilities": capabilities,
            "local_id": local_ids,
            "depends_on": local_ids,
            "aggregation_local_id": local_ids,
            "page_token": [token for _, token in pages],
            "request_id": ["fuzz-request-1", "fuzz-request-2", "seed-0"],
            "title": ["a title"],
            "id": ["skill-1", "skill-2"],
            "name": ["a name"],
            "description": ["Steps:\n1. read\n2. write\n3. check", "Do it for each of A, B and C"],
            "error_message": ["it broke"],
            "reason": ["because"],
        }
        numbers = {
            "fencing_token": [*fencing, 1, revision],
            "start_revision": [0, 1, revision, revision + 1, revision + 10**6],
            "version": [0, 1, 2],
            "expected_version": [0, 1, 2],
            "page_size": [0, 1, 2, 1000, 1001],
            "capacity": [1, 1024, 1025],
            "priority": [0, 1000, 1001, -1001],
            "max_attempts": [0, 1, 100, 101],
            "active_subtasks": [0, 1, 1024, 1025],
        }
        durations = {
            "ttl": [0.0, 1.0, 2.0, 60.0, 30 * 86400.0, 30 * 86400.0 + 1],
            "wait": [0.0, 0.05, 0.2, 61.0],
            "progress_interval": [0.05, 0.2, 1.0],
            "lease_ttl": [0.5, 1.0, 30.0, 3600.0, 3601.0],
        }
        return Seeds(
            text=text,
            numbers=numbers,
            durations=durations,
            requests=self._continuations(pages),
        )

    def repair(self) -> None:
        """Bring back the seeded sessions a fuzzed call ended or replaced."""
        stub = discovery_grpc.DiscoveryServiceStub(self.channel)
        for agent_id in AGENT_IDS:
            agent = stub.GetAgent(
                discovery_pb.GetAgentRequest(agent_id=agent_id),
                metadata=self.admin,
                timeout=CALL_DEADLINE,
            ).agent
            if agent.state != discovery_pb.Agent.STATE_LIVE or agent.epoch != self.epochs[agent_id]:
                self.register(agent_id, take_over=True, **self._agent_fields(agent_id))


@dataclass(frozen=True)
class Call:
    """One fuzzed call: the RPC, who makes it, and the request(s) it sends."""

    method: str
    """Full method path, ``/package.Service/Method``."""
    credential: str
    requests: tuple[Wire, ...]
    client_streaming: bool
    server_streaming: bool


@dataclass(frozen=True)
class Outcome:
    """What came back from one call, and what the server logged meanwhile."""

    call: Call
    code: grpc.StatusCode
    details: str
    logged: tuple[str, ...]
    responses: int
    violations: tuple[str, ...] = ()
    """The field paths of the error's BadRequest detail."""


def method_path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def execute(world: World, call: Call, log: ServerLog) -> Outcome:
    """Make ``call`` on the world's server and return its outcome."""
    channel = world.channel
    metadata = world.metadata(call.credential)
    payloads = [wire.encode() for wire in call.requests]
    log.take()
    responses = 0
    code, details = grpc.StatusCode.OK, ""
    violations: tuple[str, ...] = ()
    try:
        if not call.client_streaming and not call.server_streaming:
            channel.unary_unary(call.method)(payloads[0], metadata=metadata, timeout=CALL_DEADLINE)
            responses = 1
        elif call.client_streaming:
            stream = channel.stream_stream(call.method)(
                iter(payloads), metadata=metadata, timeout=CALL_DEADLINE
            )
            responses = sum(1 for _ in stream)
        else:
            stream = channel.unary_stream(call.method)(
                payloads[0], metadata=metadata, timeout=WATCH_WINDOW
            )
            try:
                for _ in stream:
                    responses += 1
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # the window closed
                    raise
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            violations = tuple(field_violations(error))
    return Outcome(call, code, details, tuple(log.take()), responses, violations)


def healthy(world: World) -> bool:
    """Whether the server still answers its health check with SERVING."""
    stub = health_pb2_grpc.HealthStub(world.channel)
    try:
        response = stub.Check(health_pb2.HealthCheckRequest(), timeout=CALL_DEADLINE)
    except grpc.RpcError:
        return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def problem(outcome: Outcome) -> str | None:
    """Say what is wrong with ``outcome``, or None when the server behaved."""
    if outcome.code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        return f"status {outcome.code.name}: {outcome.details}"
    if outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within {CALL_DEADLINE} s (a hang)"
    if outcome.logged:
        return "the server logged an error"
    return None


def describe(outcome: Outcome, what: str) -> str:
    """Return a report of a bad outcome: the RPC, the status, the request, the traceback."""
    call = outcome.call
    lines = [
        f"{call.method}: {what}",
        f"  credential: {call.credential}",
        f"  status: {outcome.code.name} {outcome.details!r}",
        *(f"  request[{index}]: {wire!r}" for index, wire in enumerate(call.requests)),
    ]
    for text in outcome.logged:
        lines.append("  server log:\n    " + text.rstrip().replace("\n", "\n    "))
    return "\n".join(lines)


def calls(requests: RequestStrategies, method: MethodDescriptor) -> st.SearchStrategy[Call]:
    """Calls of ``method``: mostly with live credentials, one request or a short stream."""
    wires = requests.wire(method.input_type)
    # Live sessions and the admin and join tokens most of the time, so calls get in.
    credentials = st.sampled_from([*CREDENTIALS[:5], *CREDENTIALS[:5], *CREDENTIALS])
    bodies = (
        st.lists(wires, min_size=0, max_size=4).map(tuple)
        if method.client_streaming
        else wires.map(lambda wire: (wire,))
    )
    return st.builds(
        Call,
        st.just(method_path(method)),
        credentials,
        bodies,
        st.just(method.client_streaming),
        st.just(method.server_streaming),
    )
