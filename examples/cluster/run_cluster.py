"""``make run-cluster``: three agentcoord replicas on one local PostgreSQL database.

Creates the database if it is missing, starts one ``agentcoord serve`` per port (each hosting
all three services, logging to ``var/cluster/replica-<name>.log``), waits until every one
serves, then prints their addresses and the ``AGENTCOORD_SERVER`` value that points clients
at all of them. It runs until SIGINT (Ctrl-C) or SIGTERM, which it passes on to the replicas
(each drains and exits), and it exits once they all have. A replica that dies meanwhile
(say ``kill -9`` of its pid, to watch its agents move) is reported, and the others go on.

Exit code 0 after a clean stop; 1 if a replica did not start, or the database cannot be
reached or created (the message says which).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_STORE = "postgresql://root@127.0.0.1:5432/agentcoord"
"""The database of ``make run-cluster`` unless ``CLUSTER_STORE`` names another."""
DEFAULT_PORTS = "50051,50052,50053"
"""Ports of the replicas unless ``CLUSTER_PORTS`` names others."""
STARTUP_SECONDS = 60.0
"""Time each replica gets to serve."""


@dataclass
class Replica:
    """One running ``agentcoord serve``."""

    name: str
    address: str
    log: Path
    process: asyncio.subprocess.Process


async def create_database(store: str) -> None:
    """Create the database ``store`` names, unless it exists.

    Raises:
        OSError, asyncpg.PostgresError: the server cannot be reached or refused.
    """
    parts = urllib.parse.urlsplit(store)
    name = urllib.parse.unquote(parts.path.lstrip("/"))
    if not name:
        return  # the server's default database
    maintenance = urllib.parse.urlunsplit(parts._replace(path="/postgres", query=""))
    conn = await asyncpg.connect(maintenance)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            quoted = name.replace('"', '""')
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):  # created meanwhile
                await conn.execute(f'CREATE DATABASE "{quoted}"')
            print(f"created database {name}", flush=True)
    finally:
        await conn.close()


async def start(name: str, address: str, store: str, folder: Path, extra: list[str]) -> Replica:
    """Start one replica on ``address``, its output appended to ``folder/replica-<name>.log``."""
    log = folder / f"replica-{name}.log"
    with log.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agentcoord.cli",
            "serve",
            "--listen",
            address,
            "--store",
            store,
            *extra,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )
    return Replica(name, address, log, process)


async def serving(replica: Replica) -> bool:
    """Wait until ``replica`` answers SERVING; False if it exits or takes too long."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_SECONDS
    async with grpc.aio.insecure_channel(replica.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while loop.time() < deadline and replica.process.returncode is None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            await asyncio.sleep(0.1)
    return False


async def stop(replicas: list[Replica]) -> None:
    """SIGTERM every replica still running (each drains), and wait for all of them."""
    for replica in replicas:
        if replica.process.returncode is None:
            replica.process.send_signal(signal.SIGTERM)
    await asyncio.gather(*(replica.process.wait() for replica in replicas))


async def report_exit(replica: Replica, stopping: asyncio.Event) -> None:
    """Say so when a replica exits before the cluster is stopped."""
    status = await replica.process.wait()
    if not stopping.is_set():
        print(
            f"replica {replica.name} ({replica.address}) exited with status {status}; "
            f"the others go on (log: {replica.log})",
            flush=True,
        )


async def run(store: str, host: str, ports: list[int], folder: Path, extra: list[str]) -> int:
    """Create the database, run one replica per port until SIGINT or SIGTERM; the exit code."""
    try:
        await create_database(store)
    except (OSError, asyncpg.PostgresError) as error:
        print(f"run-cluster: cannot reach or create the database of {store}: {error}")
        return 1
    folder.mkdir(parents=True, exist_ok=True)
    names = [chr(ord("a") + n) for n in range(len(ports))]
    replicas = [
        await start(name, f"{host}:{port}", store, folder, extra)
        for name, port in zip(names, ports, strict=True)
    ]
    stopping = asyncio.Event()
    watchers: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        started = await asyncio.gather(*(serving(replica) for replica in replicas))
        for replica, ok in zip(replicas, started, strict=True):
            if not ok:
                print(f"replica {replica.name} did not start; its log, {replica.log}:")
                print(replica.log.read_text(errors="replace"))
                return 1
        for replica in replicas:
            print(
                f"replica {replica.name}: {replica.address} (pid {replica.process.pid}, "
                f"log {replica.log})"
            )
        print(f"store: {store}")
        print(f"export AGENTCOORD_SERVER={','.join(r.address for r in replicas)}")
        print("Ctrl-C stops all of them.", flush=True)
        watchers.extend(asyncio.create_task(report_exit(r, stopping)) for r in replicas)
        await stopping.wait()
        print("stopping: every replica drains and exits", flush=True)
        return 0
    finally:
        stopping.set()
        await stop(replicas)
        await asyncio.gather(*watchers)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the cluster until it is stopped; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=DEFAULT_STORE, help="PostgreSQL URL of the database")
    parser.add_argument("--host", default="127.0.0.1", help="address the replicas listen on")
    parser.add_argument(
        "--ports", default=DEFAULT_PORTS, help="comma-separated ports, one replica each"
    )
    parser.add_argument("--logs", default="var/cluster", help="folder of the replicas' logs")
    parser.add_argument(
        "serve_args", nargs=argparse.REMAINDER, help="after --: more flags of agentcoord serve"
    )
    args = parser.parse_args(argv)
    try:
        ports = [int(port) for port in args.ports.split(",") if port.strip()]
    except ValueError:
        parser.error(f"--ports: {args.ports!r} is not a comma-separated list of ports")
    if not args.store.startswith(("postgresql://", "postgres://")):
        parser.error(f"--store: {args.store!r} is not a postgresql:// URL")
    extra = [arg for arg in args.serve_args if arg != "--"]
    return asyncio.run(run(args.store, args.host, ports, Path(args.logs), extra))


if __name__ == "__main__":
    sys.exit(main())
