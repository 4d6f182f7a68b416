"""Typed async clients over the generated stubs: one method per RPC."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import Message

from agentcoord.client._errors import RPCError
from agentcoord.client._planner import Planner
from agentcoord.client._retry import RetryPolicy
from agentcoord.client._state import StateClient
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from agentcoord.distribution.v1 import distribution_service_pb2 as distribution_pb
from agentcoord.distribution.v1 import distribution_service_pb2_grpc as distribution_grpc
from agentcoord.statesync.v1 import statesync_service_pb2 as statesync_pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as statesync_grpc
from agentcoord.telemetry import tracing

if TYPE_CHECKING:
    from agentcoord.telemetry.spans import Tracing

Response = TypeVar("Response", bound=Message)
Metadata = tuple[tuple[str, str], ...]
JOIN_TOKEN_HEADER = "x-agentcoord-join-token"
SERVER_VARIABLE = "AGENTCOORD_SERVER"
"""Where clients given no address find the server: ``host:port``, or several, comma-separated."""
DEFAULT_TARGET = "127.0.0.1:50051"
"""The address without ``AGENTCOORD_SERVER``: where ``make run`` listens by default."""
_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")
"""gRPC name-resolver prefixes: such targets are passed to gRPC as they are."""


def check_target(target: str) -> str:
    """Return ``target`` if it is ``host:port`` (``[v6]:port`` too) or a gRPC URI.

    Raises:
        ValueError: no host, or a port that is not a number from 1 to 65535.
    """
    if target.startswith(_SCHEMES):
        return target
    host, _, port = target.rpartition(":")
    if not host.strip("[]") or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{target!r} is not a server address host:port (port 1-65535)")
    return target


_ADDRESS_LISTS = ("ipv4:", "ipv6:")
"""gRPC URIs that list several addresses, comma-separated, for one channel."""


def parse_targets(text: str) -> tuple[str, ...]:
    """Split a comma-separated list of server addresses, checking each.

    A gRPC ``ipv4:`` or ``ipv6:`` URI lists its own addresses with commas
    (``ipv4:10.0.0.1:50051,10.0.0.2:50051``): given alone, it is one target, whose channel
    balances over those addresses as over a DNS name's.

    Raises:
        ValueError: an address is malformed, or there is none.
    """
    if text.strip().startswith(_ADDRESS_LISTS):
        return (text.strip(),)
    targets = tuple(check_target(part.strip()) for part in text.split(",") if part.strip())
    if not targets:
        raise ValueError(f"{text!r} names no server address")
    return targets


def default_targets(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Return the addresses in ``AGENTCOORD_SERVER``, or :data:`DEFAULT_TARGET` without it.

    Raises:
        ValueError: the variable holds a malformed address (the message names it).
    """
    text = (os.environ if environ is None else environ).get(SERVER_VARIABLE, "").strip()
    if not text:
        return (DEFAULT_TARGET,)
    try:
        return parse_targets(text)
    except ValueError as error:
        raise ValueError(f"{SERVER_VARIABLE}: {error}") from None


class _ServiceClient:
    """Calls one service's stub with credentials, a deadline, retries and failover."""

    SERVICE = ""
    """The service's full name."""

    def __init__(
        self, stub_type: Callable[[grpc.aio.Channel], Any], client: AgentcoordClient
    ) -> None:
        self._stub_type = stub_type
        self._client = client
        self._stub: Any = None

    def _connect(self, channel: grpc.aio.Channel) -> None:
        """Make calls through ``channel`` from now on."""
        self._stub = self._stub_type(channel)

    async def _unary(
        self,
        method: str,
        request: Message,
        response_type: type[Response],
        *,
        idempotent: bool,
        retry: RetryPolicy | None = None,
    ) -> Response:
        policy = (retry or self._client.retry) if idempotent else RetryPolicy(max_attempts=1)
        async for attempt in policy.retrying():
            with attempt:
                target = self._client.target
                try:
                    response = await self._call(method, request, target)
                except grpc.aio.AioRpcError as error:
                    raise self._client.call_error(error, target) from None
        assert isinstance(response, response_type)
        return response

    async def _call(self, method: str, request: Message, target: str) -> Any:
        """Make one attempt of a unary call; in a client span when tracing."""
        call: Callable[..., Any] = getattr(self._stub, method)
        metadata = self._client.metadata()
        traced = self._client.tracing
        if traced is None:
            return await call(request, metadata=metadata, timeout=self._client.timeout)
        with traced.client_span(f"{self.SERVICE}/{method}", target) as headers:
            return await call(request, metadata=(*metadata, *headers), timeout=self._client.timeout)

    async def _server_stream(self, method: str, request: Message) -> AsyncIterator[Any]:
        target = self._client.target
        call = getattr(self._stub, method)(request, metadata=self._client.metadata())
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as error:
            raise self._client.call_error(error, target) from None
        finally:
            call.cancel()


class DiscoveryClient(_ServiceClient):
    """``agentcoord.discovery.v1.DiscoveryService``."""

    SERVICE = "agentcoord.discovery.v1.DiscoveryService"

    async def get_agent(
        self, request: discovery_pb.GetAgentRequest
    ) -> discovery_pb.GetAgentResponse:
        """Call GetAgent."""
        return await self._unary(
            "GetAgent", request, discovery_pb.GetAgentResponse, idempotent=True
        )

    async def list_agents(
        self, request: discovery_pb.ListAgentsRequest
    ) -> discovery_pb.ListAgentsResponse:
        """Call ListAgents (one page)."""
        return await self._unary(
            "ListAgents", request, discovery_pb.ListAgentsResponse, idempotent=True
        )

    async def iter_agents(
        self, request: discovery_pb.ListAgentsRequest
    ) -> AsyncIterator[discovery_pb.Agent]:
        """Yield every matching agent, following page tokens."""
        page = discovery_pb.ListAgentsRequest()
        page.CopyFrom(request)
        while True:
            response = await self.list_agents(page)
            for agent in response.agents:
                yield agent
            if not response.next_page_token:
                return
            page.page_token = response.next_page_token

    async def register(
        self, request: discovery_pb.RegisterRequest
    ) -> discovery_pb.RegisterResponse:
        """Call Register; the client then acts as the new session."""
        response = await self._unary(
            "Register", request, discovery_pb.RegisterResponse, idempotent=False
        )
        self._client.token = response.session_token
        self._client.agent_id = response.agent.agent_id
        return response

    def heartbeat(self) -> grpc.aio.StreamStreamCall[Any, Any]:
        """Open the bidirectional Heartbeat stream as the client's session."""
        call: grpc.aio.StreamStreamCall[Any, Any] = self._stub.Heartbeat(
            metadata=self._client.metadata()
        )
        return call

    async def deregister(
        self, request: discovery_pb.DeregisterRequest
    ) -> discovery_pb.DeregisterResponse:
        """Call Deregister."""
        return await self._unary(
            "Deregister", request, discovery_pb.DeregisterResponse, idempotent=True
        )

    def watch_agents(
        self, request: discovery_pb.WatchAgentsRequest
    ) -> AsyncIterator[discovery_pb.WatchAgentsResponse]:
        """Stream WatchAgents."""
        return self._server_stream("WatchAgents", request)

    async def get_summary(
        self, request: discovery_pb.GetSummaryRequest
    ) -> discovery_pb.GetSummaryResponse:
        """Call GetSummary."""
        return await self._unary(
            "GetSummary", request, discovery_pb.GetSummaryResponse, idempotent=True
        )


class DistributionClient(_ServiceClient):
    """``agentcoord.distribution.v1.DistributionService``."""

    SERVICE = "agentcoord.distribution.v1.DistributionService"

    async def get_task(
        self, request: distribution_pb.GetTaskRequest
    ) -> distribution_pb.GetTaskResponse:
        """Call GetTask."""
        return await self._unary(
            "GetTask", request, distribution_pb.GetTaskResponse, idempotent=True
        )

    async def list_tasks(
        self, request: distribution_pb.ListTasksRequest
    ) -> distribution_pb.ListTasksResponse:
        """Call ListTasks (one page)."""
        return await self._unary(
            "ListTasks", request, distribution_pb.ListTasksResponse, idempotent=True
        )

    async def list_subtasks(
        self, request: distribution_pb.ListSubtasksRequest
    ) -> distribution_pb.ListSubtasksResponse:
        """Call ListSubtasks (one page)."""
        return await self._unary(
            "ListSubtasks", request, distribution_pb.ListSubtasksResponse, idempotent=True
        )

    async def analyze_task(
        self, request: distribution_pb.AnalyzeTaskRequest
    ) -> distribution_pb.AnalyzeTaskResponse:
        """Call AnalyzeTask (a dry run)."""
        return await self._unary(
            "AnalyzeTask", request, distribution_pb.AnalyzeTaskResponse, idempotent=True
        )

    async def submit_task(
        self, request: distribution_pb.SubmitTaskRequest
    ) -> distribution_pb.SubmitTaskResponse:
        """Call SubmitTask; retried only when the request carries a request id."""
        return await self._unary(
            "SubmitTask",
            request,
            distribution_pb.SubmitTaskResponse,
            idempotent=bool(request.request_id),
        )

    async def cancel_task(
        self, request: distribution_pb.CancelTaskRequest
    ) -> distribution_pb.CancelTaskResponse:
        """Call CancelTask."""
        return await self._unary(
            "CancelTask", request, distribution_pb.CancelTaskResponse, idempotent=True
        )

    def watch_task(
        self, request: distribution_pb.WatchTaskRequest
    ) -> AsyncIterator[distribution_pb.WatchTaskResponse]:
        """Stream WatchTask."""
        return self._server_stream("WatchTask", request)

    def stream_assignments(
        self, request: distribution_pb.StreamAssignmentsRequest
    ) -> AsyncIterator[distribution_pb.StreamAssignmentsResponse]:
        """Stream StreamAssignments as the client's session."""
        return self._server_stream("StreamAssignments", request)

    async def claim_subtask(
        self, request: distribution_pb.ClaimSubtaskRequest
    ) -> distribution_pb.ClaimSubtaskResponse:
        """Call ClaimSubtask; retried only when the request carries a request id.

        The server stores the request id in the lease it grants, so a retry through any
        replica returns that lease instead of a second one.
        """
        return await self._unary(
            "ClaimSubtask",
            request,
            distribution_pb.ClaimSubtaskResponse,
            idempotent=bool(request.request_id),
        )

    async def complete_subtask(
        self,
        request: distribution_pb.CompleteSubtaskRequest,
        *,
        retry: RetryPolicy | None = None,
    ) -> distribution_pb.CompleteSubtaskResponse:
        """Call CompleteSubtask; retried only when the request carries a request id.

        ``retry`` replaces the client's retry policy for this call.
        """
        return await self._unary(
            "CompleteSubtask",
            request,
            distribution_pb.CompleteSubtaskResponse,
            idempotent=bool(request.request_id),
            retry=retry,
        )

    async def fail_subtask(
        self, request: distribution_pb.FailSubtaskRequest, *, retry: RetryPolicy | None = None
    ) -> distribution_pb.FailSubtaskResponse:
        """Call FailSubtask; retried like :meth:`complete_subtask`."""
        return await self._unary(
            "FailSubtask",
            request,
            distribution_pb.FailSubtaskResponse,
            idempotent=bool(request.request_id),
            retry=retry,
        )


class StateSyncClient(_ServiceClient):
    """``agentcoord.statesync.v1.StateSyncService``."""

    SERVICE = "agentcoord.statesync.v1.StateSyncService"

    async def get_state(
        self, request: statesync_pb.GetStateRequest
    ) -> statesync_pb.GetStateResponse:
        """Call GetState."""
        return await self._unary(
            "GetState", request, statesync_pb.GetStateResponse, idempotent=True
        )

    async def list_states(
        self, request: statesync_pb.ListStatesRequest
    ) -> statesync_pb.ListStatesResponse:
        """Call ListStates (one page)."""
        return await self._unary(
            "ListStates", request, statesync_pb.ListStatesResponse, idempotent=True
        )

    async def list_events(
        self, request: statesync_pb.ListEventsRequest
    ) -> statesync_pb.ListEventsResponse:
        """Call ListEvents (one page)."""
        return await self._unary(
            "ListEvents", request, statesync_pb.ListEventsResponse, idempotent=True
        )

    async def put_state(
        self, request: statesync_pb.PutStateRequest
    ) -> statesync_pb.PutStateResponse:
        """Call PutState; retried only when the request carries a request id."""
        return await self._unary(
            "PutState", request, statesync_pb.PutStateResponse, idempotent=bool(request.request_id)
        )

    async def delete_state(
        self, request: statesync_pb.DeleteStateRequest
    ) -> statesync_pb.DeleteStateResponse:
        """Call DeleteState; retried only when the request carries a request id."""
        return await self._unary(
            "DeleteState",
            request,
            statesync_pb.DeleteStateResponse,
            idempotent=bool(request.request_id),
        )

    async def modify_state(
        self, request: statesync_pb.ModifyStateRequest
    ) -> statesync_pb.ModifyStateResponse:
        """Call ModifyState; retried only when the request carries a request id."""
        return await self._unary(
            "ModifyState",
            request,
            statesync_pb.ModifyStateResponse,
            idempotent=bool(request.request_id),
        )

    async def transact(
        self, request: statesync_pb.TransactRequest
    ) -> statesync_pb.TransactResponse:
        """Call Transact; retried only when the request carries a request id."""
        return await self._unary(
            "Transact", request, statesync_pb.TransactResponse, idempotent=bool(request.request_id)
        )

    def watch_states(
        self, request: statesync_pb.WatchStatesRequest
    ) -> AsyncIterator[statesync_pb.WatchStatesResponse]:
        """Stream WatchStates."""
        return self._server_stream("WatchStates", request)

    def watch_events(
        self, request: statesync_pb.WatchEventsRequest
    ) -> AsyncIterator[statesync_pb.WatchEventsResponse]:
        """Stream WatchEvents."""
        return self._server_stream("WatchEvents", request)


MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""Largest message sent or received: the server's default ``--max-message-bytes``."""
MESSAGE_SIZE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)
"""Channel options matching the server's message size; override both with the server's."""


class AgentcoordClient:
    """Channels to agentcoord servers and a client per service.

    Use as ``async with AgentcoordClient("127.0.0.1:50051") as client: ...``. Given several
    addresses, calls go to one of them at a time and move to the next when a call answers
    UNAVAILABLE (failover); idempotent calls are then retried there. Given none, the client
    reads ``AGENTCOORD_SERVER`` (comma-separated addresses), as the CLI does, and uses
    ``127.0.0.1:50051`` without it.
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
        tracer_provider: Any = None,
    ) -> None:
        """Configure the client; the channel opens on entering the context.

        Args:
            target: ``host:port`` of a server, or several, tried in turn; None reads
                ``AGENTCOORD_SERVER`` (see :func:`default_targets`).
            token: Session or admin token sent as ``authorization: Bearer``.
            agent_id: The agent the session token belongs to (set by ``register``), for
                ``state.own_key`` and ``state.clear_own``.
            join_token: Join token sent with every call, for servers that require one.
            credentials: TLS channel credentials; plaintext when None.
            timeout: Deadline in seconds of each unary call.
            retry: Back-off for idempotent calls on UNAVAILABLE.
            options: Extra grpc channel options; they override :data:`MESSAGE_SIZE_OPTIONS`.
            tracer_provider: OpenTelemetry tracer provider: each unary call gets a client
                span, its context sent in ``traceparent`` metadata. When None, calls are
                traced only with an OTLP endpoint in the environment (docs/operations.md).

        Raises:
            ValueError: no address, or a malformed one (such as port 99999).
        """
        if target is None:
            self.targets: tuple[str, ...] = default_targets()
        else:
            self.targets = tuple(
                check_target(t) for t in ((target,) if isinstance(target, str) else target)
            )
        """Every address, in failover order."""
        if not self.targets:
            raise ValueError("give at least one target")
        self._current = 0
        self.token = token
        self.agent_id = agent_id
        self.join_token = join_token
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._credentials = credentials
        self._options = list({**dict(MESSAGE_SIZE_OPTIONS), **dict(options)}.items())
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._channel: grpc.aio.Channel | None = None
        self.tracing: Tracing | None = tracing("agentcoord-client", tracer_provider)
        """Spans of the calls, or None when tracing is off."""

    @property
    def target(self) -> str:
        """The address calls go to now."""
        return self.targets[self._current]

    def call_error(self, error: grpc.aio.AioRpcError, target: str) -> RPCError:
        """Return ``error`` of a call to ``target`` as an RPCError, failing over on UNAVAILABLE."""
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            self.failover(target)
        return RPCError.from_call_error(error)

    def failover(self, failed: str) -> None:
        """Move to the next target after ``failed`` answered UNAVAILABLE.

        Does nothing with a single target (its channel reconnects by itself), or when another
        call already moved on from ``failed``. Channels stay open, so streams opened on
        another target run on until they end.
        """
        if len(self.targets) == 1 or failed != self.target or self._channel is None:
            return
        self._current = (self._current + 1) % len(self.targets)
        self._use(self.target)

    def _use(self, target: str) -> None:
        """Send calls to ``target`` from now on, through its own channel."""
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = self._open(target)
        self._channel = channel
        for service in (self.discovery, self.distribution, self.statesync):
            service._connect(channel)

    def _open(self, target: str) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(target, options=self._options)
        return grpc.aio.secure_channel(target, self._credentials, options=self._options)

    def metadata(self) -> Metadata:
        """Return the credentials metadata of every call."""
        pairs: list[tuple[str, str]] = []
        if self.token:
            pairs.append(("authorization", f"Bearer {self.token}"))
        if self.join_token:
            pairs.append((JOIN_TOKEN_HEADER, self.join_token))
        return tuple(pairs)

    async def __aenter__(self) -> AgentcoordClient:
        self.discovery = DiscoveryClient(discovery_grpc.DiscoveryServiceStub, self)
        self.distribution = DistributionClient(distribution_grpc.DistributionServiceStub, self)
        self.statesync = StateSyncClient(statesync_grpc.StateSyncServiceStub, self)
        self.state = StateClient(self.statesync, self)
        self.tasks = Planner(self.distribution, self)
        self._use(self.target)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        channels, self._channels, self._channel = self._channels, {}, None
        for channel in channels.values():
            await channel.close()
