"""kill -9 of the server while agents work: after a restart every sub-task succeeds exactly once.

A real ``agentcoord serve`` process hands out leases to agents that pull work, sleep a
little and complete it. The process is killed with SIGKILL mid-run and started again on
the same store and port. The agents keep going (their sessions and leases survive in the
store; a completion whose answer was lost is repeated with the same fencing token), and
the task must end SUCCEEDED with every sub-task succeeded once: one ``subtask.succeeded``
change each, and the result of the agent whose completion was acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import grpc
from google.protobuf import duration_pb2, json_format, struct_pb2

from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from agentcoord.distribution.v1 import distribution_service_pb2 as pb
from agentcoord.distribution.v1 import distribution_service_pb2_grpc as pb_grpc
from agentcoord.statesync.v1 import statesync_service_pb2 as statesync_pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as statesync_grpc
from tests.helpers import bearer
from tests.server.processes import free_port, serve

AGENTS = 4
SUBTASKS = 300
WORK_SECONDS = 0.02


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def until_answered(call: object) -> object:
    """Repeat a call while the server is down (UNAVAILABLE); return its answer."""
    for _ in range(400):
        try:
            return await call()  # type: ignore[operator]
        except grpc.aio.AioRpcError as error:
            if error.code() not in RETRIED:
                raise
            await asyncio.sleep(0.05)
    raise AssertionError("the server did not come back")


async def agent(
    target: str, agent_id: str, token: str, acked: dict[str, str], done: asyncio.Event
) -> None:
    """Claim, work, complete until ``done``; record each acknowledged completion."""
    metadata = bearer(token)
    while not done.is_set():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.DistributionServiceStub(channel)
            try:
                while not done.is_set():
                    claimed = await stub.ClaimSubtask(
                        pb.ClaimSubtaskRequest(agent_id=agent_id, wait=seconds(0.2)),
                        metadata=metadata,
                        timeout=5,
                    )
                    if not claimed.HasField("assignment"):
                        continue
                    lease = claimed.assignment.lease
                    await asyncio.sleep(WORK_SECONDS)
                    result = struct_pb2.Value(string_value=f"{lease.subtask_id} by {agent_id}")
                    request = pb.CompleteSubtaskRequest(
                        subtask_id=lease.subtask_id,
                        agent_id=agent_id,
                        fencing_token=lease.fencing_token,
                        result=result,
                    )
                    try:
                        await until_answered(
                            lambda r=request, s=stub: s.CompleteSubtask(
                                r, metadata=metadata, timeout=5
                            )
                        )
                    except grpc.aio.AioRpcError as error:
                        # The lease moved on (it expired while the server was down).
                        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
                        continue
                    assert lease.subtask_id not in acked, "a sub-task was acknowledged twice"
                    acked[lease.subtask_id] = result.string_value
            except grpc.aio.AioRpcError as error:
                assert error.code() in RETRIED, error
                await asyncio.sleep(0.05)


async def test_every_subtask_succeeds_once_through_kill_9(store_url: str, tmp_path: Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    log = tmp_path / "server.log"
    acked: dict[str, str] = {}
    done = asyncio.Event()
    async with serve(port, store_url, log) as process:
        async with grpc.aio.insecure_channel(target) as channel:
            discovery = discovery_grpc.DiscoveryServiceStub(channel)
            tokens = {}
            for index in range(AGENTS):
                agent_id = f"worker-{index}"
                registered = await discovery.Register(
                    discovery_pb.RegisterRequest(
                        agent_id=agent_id, name=agent_id, capacity=2, ttl=seconds(60)
                    )
                )
                tokens[agent_id] = registered.session_token
            spec = pb.TaskSpec(
                title="kill -9",
                split_policy=pb.SPLIT_POLICY_EXPLICIT,
                lease_ttl=seconds(3),
                max_attempts=10,
                subtasks=[
                    pb.SubtaskSpec(local_id=f"s{i}", title=f"step {i}") for i in range(SUBTASKS)
                ],
            )
            task = (
                await pb_grpc.DistributionServiceStub(channel).SubmitTask(
                    pb.SubmitTaskRequest(task=spec)
                )
            ).task
        workers = [
            asyncio.create_task(agent(target, agent_id, token, acked, done))
            for agent_id, token in tokens.items()
        ]
        while len(acked) < SUBTASKS // 3:  # kill mid-run, with work in flight
            await asyncio.sleep(0.01)
        before_kill = len(acked)
        os.kill(process.pid, signal.SIGKILL)
        await process.wait()
    assert 0 < before_kill < SUBTASKS, f"{before_kill} completions before the kill"

    async with serve(port, store_url, log), grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.DistributionServiceStub(channel)
        for _ in range(600):
            current = (await stub.GetTask(pb.GetTaskRequest(task_id=task.task_id))).task
            if current.state != pb.Task.STATE_RUNNING:
                break
            await asyncio.sleep(0.05)
        done.set()
        await asyncio.wait_for(asyncio.gather(*workers), 15)
        assert current.state == pb.Task.STATE_SUCCEEDED, current.state_reason
        events = await statesync_grpc.StateSyncServiceStub(channel).ListEvents(
            statesync_pb.ListEventsRequest(
                service=statesync_pb.SERVICE_DISTRIBUTION,
                kind="subtask.succeeded",
                page_size=1000,
            )
        )
    succeeded = [json_format.MessageToDict(e.details)["subtask_id"] for e in events.events]
    assert len(succeeded) == SUBTASKS and len(set(succeeded)) == SUBTASKS
    results = {s.subtask_id: s.result.string_value for s in current.subtasks}
    assert set(acked) == set(results)
    assert all(results[subtask_id] == text for subtask_id, text in acked.items())
    assert json.loads(json_format.MessageToJson(current.result)).keys() == {
        f"s{i}" for i in range(SUBTASKS)
    }
