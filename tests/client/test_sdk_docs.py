"""docs/sdk.md stays true: its Python examples run as written, in order, against a real server.

An example whose first line says it "runs until stopped" (an agent) is started in the
background before the examples after it; at the end it is stopped with SIGTERM and must drain,
deregister and exit cleanly.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator

import pytest

from agentcoord.client import AgentcoordClient
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.server.app import App
from tests.helpers import eventually
from tests.test_docs import DOCS, ROOT
from tests.test_statesync_docs import PYTHON_BLOCK, app, local

SDK_MD = DOCS / "sdk.md"
BACKGROUND = re.compile(r"\A# .*runs until stopped")
__all__ = ["app"]  # the server fixture of the StateSync docs test

Process = asyncio.subprocess.Process


async def start(example: str) -> Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        example,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def output_of(process: Process) -> str:
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    return (stdout + stderr).decode()


async def live_agents(client: AgentcoordClient) -> int:
    summary = await client.discovery.get_summary(discovery_pb.GetSummaryRequest())
    return summary.live_agents


async def until_registered(agent: Process, client: AgentcoordClient) -> None:
    """Wait until one more agent is live, failing with the agent's output if it exits."""
    before = await live_agents(client)

    async def registered() -> bool:
        assert agent.returncode is None, await output_of(agent)
        return await live_agents(client) > before

    await eventually(registered)


@pytest.fixture
async def background() -> AsyncIterator[list[Process]]:
    """Background examples; any still running at the end is killed."""
    processes: list[Process] = []
    yield processes
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_python_examples_run_as_written(app: App, background: list[Process]) -> None:
    examples = PYTHON_BLOCK.findall(SDK_MD.read_text())
    assert len(examples) >= 6 and BACKGROUND.match(examples[0])
    async with AgentcoordClient(f"127.0.0.1:{app.port}") as client:
        for number, example in enumerate(examples, 1):
            process = await start(local(example, app))
            if BACKGROUND.match(example):
                background.append(process)
                await until_registered(process, client)
                continue
            output = await output_of(process)
            assert process.returncode == 0, f"Python example {number} failed:\n{output}"
        for process in background:
            process.send_signal(signal.SIGTERM)
            output = await output_of(process)
            assert process.returncode == 0 and "Traceback" not in output, output
        counter = await client.discovery.get_agent(
            discovery_pb.GetAgentRequest(agent_id="counter-1")
        )
        assert counter.agent.state == discovery_pb.Agent.STATE_LEFT  # it deregistered
