"""`make run-cluster` runs as documented: it creates the database, starts three replicas that
share it, prints their addresses and the AGENTCOORD_SERVER value, and Ctrl-C stops them all."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from agentcoord.client import AgentcoordClient
from agentcoord.client._client import parse_targets
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from tests.conftest import postgres_dsn
from tests.server.processes import free_port
from tests.test_demo import running

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def new_database() -> AsyncIterator[str]:
    """The URL of a PostgreSQL database that does not exist yet; dropped afterwards."""
    dsn = postgres_dsn()
    name = f"t_cluster_{uuid.uuid4().hex[:12]}"
    yield urllib.parse.urlunsplit(urllib.parse.urlsplit(dsn)._replace(path=f"/{name}", query=""))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def test_make_run_cluster_serves_three_replicas_and_stops_them(
    new_database: str, tmp_path: Path
) -> None:
    ports = ",".join(str(free_port()) for _ in range(3))
    make = await asyncio.create_subprocess_exec(
        *("make", "-s", "run-cluster", f"CLUSTER_STORE={new_database}"),
        *(f"CLUSTER_PORTS={ports}", f"ARGS=--logs {tmp_path}"),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group: Ctrl-C reaches make and what it runs
    )
    assert make.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(120):
            while not lines or not lines[-1].startswith("export AGENTCOORD_SERVER="):
                line = (await make.stdout.readline()).decode()
                assert line, "".join(lines) + "".join(p.read_text() for p in tmp_path.glob("*"))
                lines.append(line.rstrip("\n"))
        output = "\n".join(lines)
        assert "created database" in output
        addresses = [f"127.0.0.1:{port}" for port in ports.split(",")]
        assert lines[-1] == f"export AGENTCOORD_SERVER={','.join(addresses)}"
        targets = parse_targets(lines[-1].partition("=")[2])
        # The replicas share one store: registered through the first, known to the last.
        async with AgentcoordClient(targets[0]) as first:
            await first.discovery.register(discovery_pb.RegisterRequest(agent_id="w", name="w"))
        async with AgentcoordClient(targets[-1]) as last:
            found = await last.discovery.get_agent(discovery_pb.GetAgentRequest(agent_id="w"))
            assert found.agent.state == discovery_pb.Agent.STATE_LIVE
        pids = [int(pid) for pid in re.findall(r"\(pid (\d+),", output)]
        assert len(pids) == 3, output
        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C
        async with asyncio.timeout(60):
            await make.communicate()
            while any(running(pid) for pid in pids):
                await asyncio.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(make.pid, signal.SIGKILL)
        await make.wait()
