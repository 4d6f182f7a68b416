"""Real servers for the CLI tests (the fixtures of tests/server) and an agent that does the work."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from google.protobuf import duration_pb2, struct_pb2

from agentcoord.client import AgentcoordClient, RPCError
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.distribution.v1 import distribution_service_pb2 as distribution_pb
from agentcoord.server.app import App
from tests.server.conftest import StartServer, start_server

__all__ = ["ADMIN_TOKEN", "server", "start_server", "work", "worker"]

ADMIN_TOKEN = "admin-secret"
"""The admin token of :func:`server`."""

WORKER_ID = "worker-1"
"""The agent :func:`work` registers (docs/cli.md names it)."""
FAIL_PREFIX = "fail"
"""Sub-tasks whose title starts with this fail for good."""


async def work(target: str, registered: asyncio.Event | None = None) -> None:
    """Act as ``worker-1`` until cancelled: complete every sub-task leased to it.

    A sub-task titled ``fail...`` fails without retry instead. Waits for the server to come
    up before registering; sets ``registered`` once registered.
    """
    async with AgentcoordClient(target) as client:
        request = discovery_pb.RegisterRequest(
            agent_id=WORKER_ID,
            name="Worker",
            role="worker",
            capabilities=["python"],
            capacity=2,
            ttl=duration_pb2.Duration(seconds=300),  # no heartbeats needed meanwhile
        )
        while True:
            try:
                await client.discovery.register(request)
                break
            except RPCError:  # not up yet
                await asyncio.sleep(0.05)
        if registered is not None:
            registered.set()
        while True:
            claim = distribution_pb.ClaimSubtaskRequest(
                agent_id=WORKER_ID, wait=duration_pb2.Duration(seconds=1)
            )
            response = await client.distribution.claim_subtask(claim)
            if response.HasField("assignment"):
                await _finish(client, response.assignment)


async def _finish(client: AgentcoordClient, assignment: distribution_pb.Assignment) -> None:
    lease, subtask = assignment.lease, assignment.subtask
    if subtask.title.lower().startswith(FAIL_PREFIX):
        await client.distribution.fail_subtask(
            distribution_pb.FailSubtaskRequest(
                subtask_id=lease.subtask_id,
                agent_id=WORKER_ID,
                fencing_token=lease.fencing_token,
                error_message="asked to fail",
                retryable=False,
                failure_class=distribution_pb.FAILURE_CLASS_TASK_ERROR,
            )
        )
        return
    await client.distribution.complete_subtask(
        distribution_pb.CompleteSubtaskRequest(
            subtask_id=lease.subtask_id,
            agent_id=WORKER_ID,
            fencing_token=lease.fencing_token,
            result=struct_pb2.Value(string_value=f"done: {subtask.title}"),
        )
    )


@pytest.fixture
async def server(start_server: StartServer) -> App:
    """One server hosting all three services, with the admin token ``ADMIN_TOKEN``."""
    return await start_server(admin_token=ADMIN_TOKEN)


@pytest.fixture
async def worker(server: App) -> AsyncIterator[None]:
    """``worker-1`` working for ``server``, registered before the test starts."""
    registered = asyncio.Event()
    task = asyncio.create_task(work(f"127.0.0.1:{server.port}", registered))
    await asyncio.wait_for(registered.wait(), timeout=10)
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
