"""The Node example agent (examples/node-agent) against a real server.

It registers, heartbeats, claims the one sub-task of an EXPLICIT task and completes it; the
task must then be SUCCEEDED with the Node agent's result. Skipped when ``node`` is not on the
PATH or ``npm ci`` has not installed @grpc/grpc-js and @grpc/proto-loader (``make lint`` does).
Nothing is downloaded here.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from agentcoord.distribution.v1 import distribution_service_pb2 as pb
from agentcoord.distribution.v1 import distribution_service_pb2_grpc as pb_grpc
from agentcoord.server.app import App
from tests.server.conftest import server, start_server  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "examples" / "node-agent" / "agent.js"
NODE = shutil.which("node")
MODULES = [ROOT / "node_modules" / "@grpc" / name for name in ("grpc-js", "proto-loader")]

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(
        not all(module.is_dir() for module in MODULES),
        reason="node_modules/@grpc is missing; run `npm ci` (make lint does)",
    ),
]


async def run_agent(port: int) -> tuple[int, list[dict[str, object]], str]:
    """Run the Node agent against 127.0.0.1:``port``; return its exit code, events and stderr."""
    assert NODE is not None
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AGENTCOORD_")}
    process = await asyncio.create_subprocess_exec(
        NODE,
        str(AGENT),
        f"127.0.0.1:{port}",
        "node",
        cwd=ROOT,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    events = [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]
    assert process.returncode is not None
    return process.returncode, events, stderr.decode()


async def test_node_agent_claims_and_completes_a_subtask(server: App) -> None:  # noqa: F811
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.DistributionServiceStub(channel)
        spec = pb.TaskSpec(
            title="a task for node",
            split_policy=pb.SPLIT_POLICY_EXPLICIT,
            subtasks=[pb.SubtaskSpec(local_id="shout", title="say hello")],
        )
        task = (await stub.SubmitTask(pb.SubmitTaskRequest(task=spec))).task

        code, events, stderr = await run_agent(server.port)

        assert code == 0, (events, stderr)
        kinds = [event["event"] for event in events]
        assert kinds == ["registered", "heartbeating", "claimed", "completed", "deregistered"]
        agent_id = events[0]["agent_id"]
        assert str(agent_id).startswith("node-agent-")
        assert events[2]["task_id"] == task.task_id

        done = (await stub.GetTask(pb.GetTaskRequest(task_id=task.task_id))).task
        assert done.state == pb.Task.STATE_SUCCEEDED
        (subtask,) = done.subtasks
        assert subtask.state == pb.Subtask.STATE_SUCCEEDED
        assert subtask.agent_id == agent_id
        expected = {"title": "SAY HELLO", "agent_id": agent_id}
        assert json_format.MessageToDict(subtask.result) == expected
        assert json_format.MessageToDict(done.result) == {"shout": expected}
