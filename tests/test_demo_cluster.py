"""`make demo-cluster` runs as documented: three replicas on a fresh schema, the leader killed
mid-task, the agents move with their sessions, nothing is lost or done twice, and nothing it
started is left behind (processes, the schema)."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import asyncpg

from tests.conftest import postgres_dsn
from tests.test_demo import running

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "cluster" / "demo_cluster.py"


async def test_demo_cluster_kills_the_leader_and_the_team_carries_on() -> None:
    dsn = postgres_dsn()
    demo = await asyncio.create_subprocess_exec(
        sys.executable,
        str(DEMO),
        "--store",
        dsn,
        cwd=DEMO.parent,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(demo.communicate(), timeout=240)
    output = out.decode()
    assert demo.returncode == 0, output

    killed = re.search(r"== 4\. kill -9 of replica (\w), the leader", output)
    assert killed is not None, output
    moved = re.findall(r"agent-(\w)\d moved to replica (\w) ", output)
    assert moved, output  # the killed replica's two agents, to another replica each
    assert {home for home, _ in moved} == {killed[1]}
    assert killed[1] not in {to for _, to in moved}
    new_leader = re.search(r"replica (\w) leads now", output)
    assert new_leader is not None and new_leader[1] != killed[1]
    assert re.search(r"change log: 300 sub-tasks succeeded once each", output)
    assert "sessions kept: all 6 agents, same epoch" in output
    assert re.search(r"writes: [1-9]\d* acknowledged, all stored", output)
    assert "demo OK" in output

    pids = {int(pid) for pid in re.findall(r"\(pid (\d+)\)", output)}
    assert len(pids) == 3, output
    assert not [pid for pid in pids if running(pid)], output
    schema = re.search(r"dropped schema (demo_[0-9a-f]+)", output)
    assert schema is not None
    conn = await asyncpg.connect(dsn)
    try:
        found = await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema[1])
    finally:
        await conn.close()
    assert found is None, f"schema {schema[1]} was left behind"
