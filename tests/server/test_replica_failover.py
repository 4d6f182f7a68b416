"""Fail-over of SDK clients when the replica they use dies (``kill -9``) or drains (SIGTERM).

Three real ``agentcoord serve`` processes on a fresh PostgreSQL schema. Four SDK agents, a
planner and StateSync writers all use replica b first, and b is killed with SIGKILL in the
middle of a task and a write storm. The agents must move to another replica by themselves,
soon enough that no replica expires them (their sessions are kept: same epoch, no second
registration), every write b acknowledged must be readable, and the task must end with every
sub-task succeeded exactly once. A replica stopped with SIGTERM drains: its health turns
NOT_SERVING before its streams end with UNAVAILABLE, its agents move, and it exits with 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentcoord.client import Agent, AgentcoordClient, TaskState, WorkItem
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.statesync.v1 import statesync_service_pb2 as statesync_pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as statesync_grpc
from tests.helpers import bearer
from tests.server.processes import ADMIN, Replica, Replicas
from tests.server.test_replicas_distribution import check_log, running, spec, subtask_events

AGENTS = 4
SUBTASKS = 200
TTL = 3.0
"""The agents' TTL: they must heartbeat another replica before it runs out."""


class Storm:
    """StateSync writers through the SDK, each writing its own keys until stopped."""

    def __init__(self, targets: str | Sequence[str], writers: int = 4) -> None:
        self.acknowledged: dict[str, int] = {}
        """Value of every key whose write was acknowledged."""
        self._targets = targets
        self._writers = writers
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _write(self, client: AgentcoordClient, writer: int) -> None:
        i = 0
        while not self._stop.is_set():
            key = f"storm/{writer}/{i}"
            with contextlib.suppress(Exception):  # not acknowledged: not counted
                await client.state.put(key, i)  # a request id: retried safely elsewhere
                self.acknowledged[key] = i
            i += 1

    async def _run(self) -> None:
        async with AgentcoordClient(self._targets, token=ADMIN, timeout=3.0) as client:
            await asyncio.gather(*(self._write(client, n) for n in range(self._writers)))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


def agents_on(targets: str | Sequence[str], handled: list[tuple[str, int]]) -> list[Agent]:
    async def handle(item: WorkItem) -> object:
        handled.append((item.subtask_id, item.lease.fencing_token))
        await asyncio.sleep(0.01)
        return {"n": item.input}

    return [
        Agent(
            targets,
            name=f"w{n}",
            agent_id=f"w{n}",
            handler=handle,
            capacity=2,
            ttl=TTL,
            timeout=3.0,
        )
        for n in range(AGENTS)
    ]


async def check_sessions_kept(agents: Sequence[Agent], epochs: dict[str, int], via: str) -> None:
    """Every agent still runs its first session, live as seen through ``via``."""
    async with AgentcoordClient(via, token=ADMIN) as client:
        for agent in agents:
            assert agent.stats.registrations == 1, f"{agent.agent_id} registered again"
            assert agent.epoch == epochs[agent.agent_id]
            response = await client.discovery.get_agent(
                discovery_pb.GetAgentRequest(agent_id=agent.agent_id)
            )
            assert response.agent.state == discovery_pb.Agent.STATE_LIVE
            assert response.agent.epoch == epochs[agent.agent_id]


async def kill(replica: Replica) -> None:
    replica.process.kill()
    await replica.process.wait()


def address_list(replicas: Sequence[Replica]) -> list[str]:
    """Addresses the SDK fails over between itself, in order."""
    return [replica.address for replica in replicas]


def ipv4_uri(replicas: Sequence[Replica]) -> str:
    """One gRPC target listing every address, like a DNS name with several: gRPC's default
    policy (pick_first) uses the first that connects and moves on when it fails."""
    return "ipv4:" + ",".join(replica.address for replica in replicas)


async def cli_lists_agents(server: str) -> list[str]:
    """``agentcoord agents ls --json`` with ``AGENTCOORD_SERVER=server``: the agents' ids."""
    env = {**os.environ, "AGENTCOORD_SERVER": server, "AGENTCOORD_TOKEN": ADMIN}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentcoord.cli",
        "agents",
        "ls",
        "--json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return sorted(agent["agentId"] for agent in json.loads(out)["agents"])


@pytest.mark.parametrize("targets", [address_list, ipv4_uri], ids=["address-list", "ipv4-uri"])
async def test_kill_9_of_the_replica_in_use_moves_its_clients_and_loses_nothing(
    replicas: Replicas, targets: Callable[[Sequence[Replica]], str | list[str]]
) -> None:
    a, b, c = [await replicas.start() for _ in range(3)]
    handled: list[tuple[str, int]] = []
    agents = agents_on(targets([b, a, c]), handled)
    storm = Storm(targets([b, c]))
    async with running(agents), AgentcoordClient(targets([b, c])) as planner:
        epochs = {agent.agent_id: agent.epoch for agent in agents}
        storm.start()
        task = await planner.tasks.submit(spec(SUBTASKS))
        while len(handled) < SUBTASKS // 3:
            await asyncio.sleep(0.02)
        await kill(b)
        result = await planner.tasks.result(task.task_id, timeout=120)
        done = await planner.tasks.get(task.task_id)
        await storm.stop()
        await check_sessions_kept(agents, epochs, a.address)
        server = targets([b, a])
        ids = await cli_lists_agents(server if isinstance(server, str) else ",".join(server))
        assert ids == sorted(agent.agent_id for agent in agents)
    assert done.state is TaskState.SUCCEEDED, done.state_reason
    assert result.keys() == {f"s{i}" for i in range(SUBTASKS)}
    assert len(set(handled)) == len(handled), "a lease was handed out twice"
    check_log(await subtask_events(a.address, task.task_id), SUBTASKS)
    async with AgentcoordClient(c.address, token=ADMIN) as reader:
        stored = {entry.key: entry.value for entry in await reader.state.list("storm/")}
    assert storm.acknowledged, "no write was acknowledged"
    lost = {k: v for k, v in storm.acknowledged.items() if stored.get(k) != v}
    assert not lost, f"{len(lost)} acknowledged writes lost"


async def watch_shutdown(address: str, seen: list[str]) -> None:
    """Note in ``seen`` the health of ``address`` turning NOT_SERVING and a watch ending."""
    async with grpc.aio.insecure_channel(address) as channel:
        watch = statesync_grpc.StateSyncServiceStub(channel).WatchStates(
            statesync_pb.WatchStatesRequest(prefix="nothing/"), metadata=bearer(ADMIN)
        )
        await anext(aiter(watch))  # registered
        health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())

        async def follow_health() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                async for response in health:
                    if response.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        seen.append("NOT_SERVING")
                        return

        async def follow_watch() -> None:
            try:
                async for _ in watch:
                    pass
            except grpc.aio.AioRpcError as error:
                seen.append(error.code().name)

        await asyncio.gather(follow_health(), follow_watch())


async def test_sigterm_drains_the_replica_and_its_agents_move_with_their_sessions(
    replicas: Replicas,
) -> None:
    a, b = [await replicas.start() for _ in range(2)]
    handled: list[tuple[str, int]] = []
    # Half the agents fail over along an address list, half within one gRPC address list.
    agents = (
        agents_on([b.address, a.address], handled)[:2] + agents_on(ipv4_uri([b, a]), handled)[2:]
    )
    seen: list[str] = []
    async with running(agents), AgentcoordClient([b.address, a.address]) as planner:
        epochs = {agent.agent_id: agent.epoch for agent in agents}
        watching = asyncio.create_task(watch_shutdown(b.address, seen))
        task = await planner.tasks.submit(spec(SUBTASKS))
        while len(handled) < SUBTASKS // 3:
            await asyncio.sleep(0.02)
        b.process.send_signal(signal.SIGTERM)
        assert await b.process.wait() == 0
        await watching
        result = await planner.tasks.result(task.task_id, timeout=120)
        await check_sessions_kept(agents, epochs, a.address)
        done = await planner.tasks.get(task.task_id)
    assert seen == ["NOT_SERVING", "UNAVAILABLE"]  # health first, then the streams end
    assert done.state is TaskState.SUCCEEDED, done.state_reason
    assert result.keys() == {f"s{i}" for i in range(SUBTASKS)}
    assert len(set(handled)) == len(handled), "a lease was handed out twice"
    check_log(await subtask_events(a.address, task.task_id), SUBTASKS)
