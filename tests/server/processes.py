"""Real ``agentcoord serve`` processes for the tests: start, wait until serving, SIGKILL.

:class:`Replicas` starts several on one store (the ``replicas`` fixture of
``tests/server/conftest.py``: a fresh PostgreSQL schema per test); :func:`start_scraped`
starts one with its /metrics, and :func:`the_leader` tells which of them sweeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import eventually

ADMIN = "kill9-admin"
"""The admin token of every server started here."""
STARTUP_BUDGET = 90.0
"""Seconds a server may take to serve (generous: the test machine is shared and loaded)."""
LEADER_INTERVAL = "0.2s"
"""The ``--leader-interval`` of :func:`start_scraped`: a follower tries to take over five
times a second."""
TAKE_OVER_BUDGET = 15.0
"""Seconds the tests wait for a take-over (the bound is 0.2 s; the machine is shared)."""


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start(port: int, store_url: str, log: Path, *args: str) -> asyncio.subprocess.Process:
    """Start ``agentcoord serve`` on ``port`` and ``store_url`` with ``args``, output to ``log``."""
    with log.open("ab") as output:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agentcoord.cli",
            "serve",
            *args,
            "--listen",
            f"127.0.0.1:{port}",
            "--store",
            store_url,
            "--admin-token",
            ADMIN,
            stdout=output,
            stderr=output,
        )


@contextlib.asynccontextmanager
async def serve(
    port: int, store_url: str, log: Path, *args: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run ``agentcoord serve`` until it answers health checks; SIGKILL it on exit."""
    process = await start(port, store_url, log, *args)
    try:
        await wait_serving(port, process, log)
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def wait_serving(port: int, process: asyncio.subprocess.Process, log: Path) -> None:
    """Wait until the server on ``port`` reports SERVING; fail if it exits first."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = asyncio.get_running_loop().time() + STARTUP_BUDGET
        while asyncio.get_running_loop().time() < deadline:
            assert process.returncode is None, f"server exited:\n{log.read_text()}"
            with contextlib.suppress(grpc.aio.AioRpcError):
                response = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.05)
    raise AssertionError(f"server not serving:\n{log.read_text()}")


@dataclass
class Replica:
    """One ``agentcoord serve`` process of a :class:`Replicas` set."""

    name: str
    """``a``, ``b``, ... in start order."""
    address: str
    """``127.0.0.1:<port>``."""
    process: asyncio.subprocess.Process
    """The process (``kill()`` for SIGKILL)."""


class Replicas:
    """Replica processes on one store, each on an ephemeral port; all SIGKILLed at exit."""

    def __init__(self, store_url: str, folder: Path) -> None:
        """Start replicas on ``store_url``; their logs go to ``folder/<name>.log``."""
        self.store_url = store_url
        self._folder = folder
        self._stack = contextlib.AsyncExitStack()
        self.started: dict[str, Replica] = {}
        """Every replica serving, by name (``a`` for the first started, then ``b``, ...)."""
        self._named = 0

    async def start(self, *services: str) -> Replica:
        """Start a replica hosting ``services`` (all three when none) and wait until it serves."""
        name = chr(ord("a") + self._named)  # named before any wait: concurrent starts differ
        self._named += 1
        port = free_port()
        log = self._folder / f"replica-{name}.log"
        process = await self._stack.enter_async_context(serve(port, self.store_url, log, *services))
        replica = Replica(name, f"127.0.0.1:{port}", process)
        self.started[name] = replica
        return replica

    async def __aenter__(self) -> Replicas:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._stack.aclose()


@dataclass
class Scraped:
    """A replica with its HTTP listener, whose /metrics tells whether it leads."""

    replica: Replica
    metrics_url: str

    async def leads(self) -> bool:
        """Whether its ``agentcoord_replica_leader`` gauge is 1."""
        async with httpx.AsyncClient() as client:
            answer = await client.get(self.metrics_url)
        values = {
            sample.name: sample.value
            for family in text_string_to_metric_families(answer.text)
            for sample in family.samples
        }
        return values["agentcoord_replica_leader"] == 1


async def start_scraped(replicas: Replicas) -> Scraped:
    """Start a replica of every service with /metrics and a ``LEADER_INTERVAL`` of 0.2 s."""
    port = free_port()
    replica = await replicas.start(
        "--http-listen", f"127.0.0.1:{port}", "--leader-interval", LEADER_INTERVAL
    )
    return Scraped(replica, f"http://127.0.0.1:{port}/metrics")


async def the_leader(started: Sequence[Scraped]) -> Scraped:
    """Wait until exactly one of ``started`` leads; return it."""
    leaders: list[Scraped] = []

    async def one_leads() -> bool:
        leaders[:] = [s for s in started if await s.leads()]
        return len(leaders) == 1

    await eventually(one_leads, timeout=TAKE_OVER_BUDGET)
    return leaders[0]
