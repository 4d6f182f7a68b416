"""The Node examples (examples/node-agent) against a real server.

agent.js registers, heartbeats, claims the one sub-task of an EXPLICIT task and completes it;
the task must then be SUCCEEDED with the Node agent's result. reflection-client.js learns every
type from reflection (protobufjs 8) and writes a map field and a JSON input the server must
store as sent. Skipped when ``node`` is not on the PATH or ``npm ci`` has not installed the
root package.json's modules (``make lint`` does). Nothing is downloaded here.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from agentcoord.distribution.v1 import distribution_service_pb2 as pb
from agentcoord.distribution.v1 import distribution_service_pb2_grpc as pb_grpc
from agentcoord.server.app import App
from tests.server.conftest import server, start_server  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "examples" / "node-agent" / "agent.js"
REFLECTION_CLIENT = ROOT / "examples" / "node-agent" / "reflection-client.js"
PROTOBUFJS = ROOT / "node_modules" / "protobufjs" / "package.json"
NODE = shutil.which("node")
MODULES = [ROOT / "node_modules" / "@grpc" / name for name in ("grpc-js", "proto-loader")]

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(
        not all(module.is_dir() for module in MODULES),
        reason="node_modules/@grpc is missing; run `npm ci` (make lint does)",
    ),
]


async def run_agent(port: int, script: Path = AGENT) -> tuple[int, list[dict[str, Any]], str]:
    """Run a Node script against 127.0.0.1:``port``; return its exit code, events and stderr."""
    assert NODE is not None
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AGENTCOORD_")}
    process = await asyncio.create_subprocess_exec(
        NODE,
        str(script),
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


def protobufjs_major() -> int:
    return (
        int(json.loads(PROTOBUFJS.read_text())["version"].split(".")[0])
        if PROTOBUFJS.exists()
        else 0
    )


@pytest.mark.skipif(protobufjs_major() < 8, reason="node_modules/protobufjs 8 is missing; npm ci")
async def test_reflection_client_writes_maps_and_json_values(server: App) -> None:  # noqa: F811
    code, events, stderr = await run_agent(server.port, REFLECTION_CLIENT)

    assert code == 0, (events, stderr)
    assert [event["event"] for event in events] == [
        "reflected",
        "registered",
        "task",
        "deregistered",
    ]
    reflected, registered, task, left = events
    assert "agentcoord/discovery/v1/discovery_service.proto" in reflected["files"]
    labels = {"runtime": "node", "descriptors": "reflection"}
    assert registered["labels"] == labels and registered["ttl"] == "10s"
    sent = {"words": ["map", "struct"], "count": 2, "nested": {"ok": True}, "nothing": None}
    assert task["input"] == sent and task["state"] == "STATE_PENDING"
    assert left["state"] == "STATE_LEFT"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        agent_request = discovery_pb.GetAgentRequest(agent_id=registered["agent_id"])
        agent = (await discovery_grpc.DiscoveryServiceStub(channel).GetAgent(agent_request)).agent
        task_request = pb.GetTaskRequest(task_id=task["task_id"])
        stored = (await pb_grpc.DistributionServiceStub(channel).GetTask(task_request)).task
    assert dict(agent.labels) == labels
    assert json_format.MessageToDict(stored.subtasks[0].input) == sent
