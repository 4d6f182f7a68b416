"""One agent for one model: the SDK's Agent keeps it alive, the model takes and reports work.

The :class:`~agentcoord.client.Agent` registers, keeps the Heartbeat and StreamAssignments
streams open in the background and renews the leases it holds, whatever the model is doing.
Its handler does not do the work: it offers each leased sub-task to the model
(``claim_subtask``) and waits until the model reports it (``complete_subtask``,
``fail_subtask``). The report is sent by the tool itself, under the lease's fencing token,
so the model learns at once whether the server recorded it; the handler then returns the
same outcome and the Agent's own report of it is a repeat, which the server answers as
recorded without changing anything (docs/distribution.md, "Idempotency").

A lease that ends before the model reports (the task was cancelled, the lease was taken
over, the session was lost) cancels the handler; the sub-task is remembered as lost, so a
late report is refused with a message that says so.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format, struct_pb2

from agentcoord.client import Agent, CardInfo, NonRetryableError, RPCError, Skill, WorkItem
from agentcoord.distribution.v1 import distribution_service_pb2 as distribution_pb

Request = TypeVar("Request")
Response = TypeVar("Response")

MAX_LOST = 1024
"""Lost sub-tasks remembered, to explain a late report."""


class LeaseLost(Exception):
    """The model reported a sub-task whose lease this agent no longer holds."""


class NotHeld(Exception):
    """The model reported a sub-task this agent never claimed."""


@dataclass(eq=False)
class Claim:
    """A leased sub-task, offered to the model until it reports it."""

    item: WorkItem
    outcome: asyncio.Future[Any] = field(repr=False)
    """Set when the model reported: the result, or the exception that fails the attempt."""
    claimed: bool = False
    """The model has taken it with claim_subtask."""
    reported: bool = False
    """The model's report settled it (recorded, or refused by the server)."""


@dataclass(frozen=True)
class AgentOptions:
    """How the MCP server registers its agent."""

    targets: Sequence[str]
    """Server addresses, in failover order."""
    agent_id: str = ""
    """Id to register under; empty lets the server choose."""
    name: str = ""
    """Human-readable name; the agent id when empty."""
    role: str = ""
    """Role, such as ``worker`` or ``planner``."""
    capabilities: Sequence[str] = ()
    """Capabilities, such as ``python``."""
    capacity: int = 1
    """Sub-tasks held for the model at a time."""
    skills: Sequence[Skill] = ()
    """Skills, as the agent's A2A card lists them."""
    card: CardInfo | None = None
    """The rest of its A2A card."""
    ttl: float | None = None
    """Seconds without a heartbeat after which the server declares the agent dead."""
    join_token: str = ""
    """The server's join token, if it requires one."""
    timeout: float = 10.0
    """Deadline in seconds of each unary call."""


class AgentSession:
    """The agent an MCP server acts as; use as an async context manager.

    Entering registers the agent and starts its background streams; leaving hands back
    what the model still holds and deregisters.
    """

    def __init__(self, options: AgentOptions) -> None:
        """Configure the agent; it registers on entering the context."""
        self.agent = Agent(
            list(options.targets),
            name=options.name or options.agent_id or "mcp-agent",
            handler=self._offer,
            agent_id=options.agent_id,
            role=options.role,
            capabilities=options.capabilities,
            capacity=options.capacity,
            skills=options.skills,
            card=options.card,
            ttl=options.ttl,
            join_token=options.join_token,
            timeout=options.timeout,
            # Leases waiting for a model are not work in progress: hand them back at once.
            drain_timeout=0.0,
        )
        """The SDK agent; ``agent.client`` makes every call as this agent."""
        self._offers: asyncio.Queue[Claim] = asyncio.Queue()
        self._held: dict[str, Claim] = {}
        self._lost: collections.OrderedDict[str, str] = collections.OrderedDict()

    async def __aenter__(self) -> AgentSession:
        await self.agent.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.agent.close()

    @property
    def agent_id(self) -> str:
        """The registered agent's id."""
        return self.agent.agent_id

    # --- the handler side ---------------------------------------------------------------------

    async def _offer(self, item: WorkItem) -> Any:
        """The Agent's handler: offer the sub-task to the model and wait for its report."""
        claim = Claim(item, asyncio.get_running_loop().create_future())
        self._held[item.subtask_id] = claim
        self._lost.pop(item.subtask_id, None)
        self._offers.put_nowait(claim)
        try:
            return await claim.outcome
        except asyncio.CancelledError:
            if not claim.reported:  # the Agent stopped it: the lease ended
                self._forget(claim, "the lease ended (revoked, taken over or expired)")
            raise
        finally:
            if self._held.get(item.subtask_id) is claim:
                del self._held[item.subtask_id]

    def _forget(self, claim: Claim, why: str) -> None:
        if self._held.get(claim.item.subtask_id) is claim:
            del self._held[claim.item.subtask_id]
        self._lost[claim.item.subtask_id] = why
        while len(self._lost) > MAX_LOST:
            self._lost.popitem(last=False)

    # --- the model side -----------------------------------------------------------------------

    async def claim(self, wait: float) -> WorkItem | None:
        """Return the next leased sub-task the model has not taken, waiting up to ``wait`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    claim = await self._offers.get()
            except TimeoutError:
                return None
            if self._held.get(claim.item.subtask_id) is claim and not claim.outcome.done():
                claim.claimed = True
                return claim.item

    def _claim_of(self, subtask_id: str) -> Claim:
        claim = self._held.get(subtask_id)
        if claim is not None and claim.claimed and not claim.reported:
            return claim
        why = self._lost.get(subtask_id)
        if why is not None:
            raise LeaseLost(
                f"the lease of sub-task {subtask_id} was lost: {why}; nothing was recorded. "
                "Stop working on it and claim another sub-task."
            )
        raise NotHeld(
            f"this agent holds no claimed sub-task {subtask_id}; call claim_subtask first"
        )

    async def complete(
        self, subtask_id: str, result: Any
    ) -> distribution_pb.CompleteSubtaskResponse:
        """Record the model's result of a claimed sub-task.

        Raises:
            LeaseLost: the lease ended first; the server recorded nothing.
            NotHeld: the model never claimed the sub-task.
            RPCError: the server refused for another reason.
        """
        claim = self._claim_of(subtask_id)
        request = distribution_pb.CompleteSubtaskRequest(
            subtask_id=subtask_id,
            agent_id=self.agent_id,
            fencing_token=claim.item.lease.fencing_token,
            result=json_format.ParseDict(result, struct_pb2.Value()),
            request_id=str(uuid.uuid4()),
        )
        response = await self._report(
            claim, self.agent.client.distribution.complete_subtask, request
        )
        if not claim.outcome.done():
            claim.outcome.set_result(result)
        return response

    async def fail(
        self, subtask_id: str, message: str, *, retryable: bool, details: Any = None
    ) -> distribution_pb.FailSubtaskResponse:
        """Record that the model's attempt at a claimed sub-task failed.

        Raises:
            LeaseLost: the lease ended first; the server recorded nothing.
            NotHeld: the model never claimed the sub-task.
            RPCError: the server refused for another reason.
        """
        claim = self._claim_of(subtask_id)
        request = distribution_pb.FailSubtaskRequest(
            subtask_id=subtask_id,
            agent_id=self.agent_id,
            fencing_token=claim.item.lease.fencing_token,
            error_message=message,
            retryable=retryable,
            failure_class=distribution_pb.FAILURE_CLASS_TASK_ERROR,
            details=json_format.ParseDict(details, struct_pb2.Value()),
            request_id=str(uuid.uuid4()),
        )
        response = await self._report(claim, self.agent.client.distribution.fail_subtask, request)
        if not claim.outcome.done():
            claim.outcome.set_exception(
                RuntimeError(message) if retryable else NonRetryableError(message, details=details)
            )
        return response

    async def _report(
        self, claim: Claim, send: Callable[[Request], Awaitable[Response]], request: Request
    ) -> Response:
        try:
            response = await send(request)
        except RPCError as error:
            if error.code != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            why = f"the server refused the report ({error.reason or error.message})"
            claim.reported = True
            self._forget(claim, why)
            claim.outcome.cancel()
            raise LeaseLost(
                f"the lease of sub-task {claim.item.subtask_id} was lost: {why}; nothing was "
                "recorded. Stop working on it and claim another sub-task."
            ) from error
        claim.reported = True
        return response
