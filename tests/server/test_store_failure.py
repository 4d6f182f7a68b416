"""A failing store loses nothing and says so: a real full disk, a real PostgreSQL outage.

SQLite runs on a 2 MiB tmpfs mounted for the test (root is needed; the test is skipped with
the reason elsewhere) that is then filled; PostgreSQL keeps the test's tables in a tablespace
on such a tmpfs (when the server runs on this machine), and is also reached through a TCP
proxy that the test stops and starts again. During the outage writes answer UNAVAILABLE
(``STORE_UNAVAILABLE``), an agent's TTL runs out, and its token is refused before the
expiry can be recorded; once the store is back the expiry is recorded, and every write
that was acknowledged is still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2

from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from agentcoord.server.app import App, start_app
from agentcoord.server.config import ServerConfig
from agentcoord.statesync.v1 import statesync_service_pb2 as pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as pb_grpc
from tests.conftest import POSTGRES_DSN_VARIABLE, with_query
from tests.helpers import bearer, error_info, eventually


class Outage:
    """Breaks the store of a running server and repairs it."""

    url: str
    failure = "DISK_FULL"
    """The kind of failure writes report meanwhile (``failure`` in the ErrorInfo)."""

    async def start(self) -> None:
        """Prepare a working store at ``url``."""

    async def fail(self) -> None:
        """Make the store unable to write."""

    async def repair(self) -> None:
        """Make it work again."""

    async def close(self) -> None:
        """Clean up (after the server stopped)."""


class SmallDisk:
    """A small tmpfs mounted for one test, that the test fills and frees."""

    def __init__(self, folder: Path, size: str) -> None:
        self.folder = folder
        self._size = size
        self._filler = folder / "filler"
        self._mounted = False

    def mount(self, owner: str = "root") -> None:
        """Mount it at ``folder``, its root owned by the system user ``owner``.

        Skips the test when this is impossible here (not root, no mount(8), not permitted).
        """
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs for the full-disk test needs root and mount(8)")
        user = pwd.getpwnam(owner)
        self.folder.mkdir(exist_ok=True)
        options = f"size={self._size},mode=0700,uid={user.pw_uid},gid={user.pw_gid}"
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.folder)],
            capture_output=True,
            text=True,
        )
        if mounted.returncode != 0:
            pytest.skip(f"mount -t tmpfs is not permitted here: {mounted.stderr.strip()}")
        self._mounted = True

    def fill(self) -> None:
        """Write a file until the disk is full (ENOSPC)."""
        with contextlib.suppress(OSError), self._filler.open("wb", buffering=0) as filler:
            while True:
                filler.write(b"\0" * 4096)

    def free(self) -> None:
        """Delete what :meth:`fill` wrote."""
        self._filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        """Unmount it, if it was mounted."""
        if self._mounted:
            subprocess.run(["umount", "--lazy", str(self.folder)], check=True)


class FullDisk(Outage):
    """SQLite on a small tmpfs that the test fills up."""

    def __init__(self, folder: Path) -> None:
        self._disk = SmallDisk(folder, "2m")
        self.url = f"sqlite:///{folder / 'agentcoord.db'}"

    async def start(self) -> None:
        self._disk.mount()

    async def fail(self) -> None:
        self._disk.fill()

    async def repair(self) -> None:
        self._disk.free()

    async def close(self) -> None:
        self._disk.unmount()


class FullTablespace(Outage):
    """PostgreSQL with the test's tables in a tablespace on a small tmpfs the test fills.

    Needs the PostgreSQL server on this machine (it must see the tmpfs), its ``postgres``
    system user, and a superuser DSN (CREATE TABLESPACE); skipped with the reason otherwise.
    The write-ahead log stays on the server's own disk, as on a server whose data disk
    fills while its WAL disk does not.
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        name = f"t_{uuid.uuid4().hex}"
        self._schema = self._tablespace = name
        # Outside pytest's private tmp folder: the server's user must reach the mount.
        self._disk = SmallDisk(Path(tempfile.gettempdir()) / f"agentcoord-{name}", "4m")
        self.url = with_query(dsn, schema=name, default_tablespace=name)

    async def start(self) -> None:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("no postgres system user: the PostgreSQL server is not on this machine")
        self._disk.mount(owner="postgres")
        connection = await asyncpg.connect(self._dsn)
        try:
            await connection.execute(
                f"CREATE TABLESPACE \"{self._tablespace}\" LOCATION '{self._disk.folder}'"
            )
        except asyncpg.PostgresError as error:
            pytest.skip(f"PostgreSQL cannot put a tablespace on the test's tmpfs: {error}")
        finally:
            await connection.close()

    async def fail(self) -> None:
        self._disk.fill()

    async def repair(self) -> None:
        self._disk.free()

    async def close(self) -> None:
        connection = await asyncpg.connect(self._dsn)
        try:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{self._schema}" CASCADE')
            await connection.execute(f'DROP TABLESPACE IF EXISTS "{self._tablespace}"')
        finally:
            await connection.close()
        self._disk.unmount()
        with contextlib.suppress(FileNotFoundError):
            self._disk.folder.rmdir()


@dataclass
class ProxiedPostgres(Outage):
    """PostgreSQL behind a TCP proxy the test stops (every connection cut) and restarts."""

    dsn: str
    failure = "CONNECTION_LOST"
    schema: str = field(default_factory=lambda: f"t_{uuid.uuid4().hex}")
    url: str = ""
    _listener: asyncio.Server | None = None
    _port: int = 0
    _pipes: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> None:
        await self._listen()
        parts = urlsplit(self.dsn)
        netloc = parts.netloc.rpartition("@")[0]
        netloc = f"{netloc}@127.0.0.1:{self._port}" if netloc else f"127.0.0.1:{self._port}"
        self.url = with_query(urlunsplit(parts._replace(netloc=netloc)), schema=self.schema)

    async def _listen(self) -> None:
        self._listener = await asyncio.start_server(self._pipe, "127.0.0.1", self._port)
        self._port = self._listener.sockets[0].getsockname()[1]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parts = urlsplit(self.dsn)
        upstream_reader, upstream_writer = await asyncio.open_connection(
            parts.hostname or "127.0.0.1", parts.port or 5432
        )
        self._pipes |= {writer, upstream_writer}

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(copy(reader, upstream_writer), copy(upstream_reader, writer))

    async def fail(self) -> None:
        assert self._listener is not None
        self._listener.close()
        for pipe in self._pipes:
            pipe.transport.abort()
        self._pipes.clear()
        await self._listener.wait_closed()

    async def repair(self) -> None:
        await self._listen()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        connection = await asyncpg.connect(self.dsn)
        try:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        finally:
            await connection.close()


@pytest.fixture(params=["sqlite-full-disk", "postgres-full-disk", "postgres-gone"])
async def outage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Outage]:
    """A store that can be broken while a server uses it."""
    broken: Outage
    if request.param == "sqlite-full-disk":
        broken = FullDisk(tmp_path / "disk")
    else:
        dsn = os.environ.get(POSTGRES_DSN_VARIABLE)
        if not dsn:
            pytest.skip(f"{POSTGRES_DSN_VARIABLE} is not set")
        broken = (
            FullTablespace(dsn) if request.param == "postgres-full-disk" else ProxiedPostgres(dsn)
        )
    try:
        await broken.start()
        yield broken
    finally:
        await broken.close()


@pytest.fixture
async def app(outage: Outage) -> AsyncIterator[App]:
    app = await start_app(
        ServerConfig(listen="127.0.0.1:0", store=outage.url, min_ttl=0.2, grace=0.5)
    )
    yield app
    await app.stop(0)


async def register(channel: grpc.aio.Channel, agent_id: str, ttl: float) -> str:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(ttl * 1e9))
    response = await discovery_grpc.DiscoveryServiceStub(channel).Register(
        discovery_pb.RegisterRequest(agent_id=agent_id, name=agent_id, ttl=duration)
    )
    return response.session_token


async def test_a_failing_store_answers_unavailable_loses_nothing_and_records_expiries_later(
    app: App, outage: Outage, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        state = pb_grpc.StateSyncServiceStub(channel)
        discovery = discovery_grpc.DiscoveryServiceStub(channel)
        writer = await register(channel, "writer", 60)
        doomed = await register(channel, "doomed", 1.0)
        acknowledged: dict[str, bytes] = {}

        async def put(token: str, key: str, value: bytes) -> None:
            await state.PutState(pb.PutStateRequest(key=key, binary=value), metadata=bearer(token))

        for index in range(5):
            await put(writer, f"shared/before/{index}", b"b%d" % index)
            acknowledged[f"shared/before/{index}"] = b"b%d" % index

        await outage.fail()
        refused: list[grpc.aio.AioRpcError] = []
        for index in range(300):  # until the store refuses, then a few more
            key, value = f"shared/during/{index}", bytes([index % 256]) * 8192
            try:
                await put(writer, key, value)
                acknowledged[key] = value
            except grpc.aio.AioRpcError as error:
                refused.append(error)
                if len(refused) == 5:
                    break
        assert refused, "the store never refused a write"
        for error in refused:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            info = error_info(error)
            assert info.reason == "STORE_UNAVAILABLE"
            assert info.metadata["failure"] == outage.failure
            kind = outage.failure.lower().replace("_", " ")
            assert f"the store is unavailable ({kind})" in (error.details() or "")

        # The TTL runs out while the store cannot record the expiry: the token is refused.
        async def doomed_refused() -> bool:
            try:
                await put(doomed, "agents/doomed/x", b"late")
            except grpc.aio.AioRpcError as error:
                return error.code() == grpc.StatusCode.UNAUTHENTICATED
            return False

        await eventually(doomed_refused)
        view = await discovery.GetAgent(discovery_pb.GetAgentRequest(agent_id="doomed"))
        assert view.agent.state == discovery_pb.Agent.STATE_EXPIRED

        await outage.repair()

        async def expiry_recorded() -> bool:
            try:
                events = await state.ListEvents(
                    pb.ListEventsRequest(kind="agent.expired", subject="doomed")
                )
            except grpc.aio.AioRpcError:
                return False
            return len(events.events) == 1

        await eventually(expiry_recorded, timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as stale:
            await put(doomed, "agents/doomed/x", b"late")
        assert stale.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await put(writer, "shared/after", b"a")  # writes work again
        for key, value in acknowledged.items():
            got = await state.GetState(pb.GetStateRequest(key=key))
            assert got.state.binary == value, key

    # One line per kind of failure per interval, and no traceback, however many failed.
    failures = [r for r in caplog.records if "store write failed" in r.getMessage()]
    assert 1 <= len(failures) <= 3
    tracebacks = [r for r in caplog.records if r.exc_info and r.name.startswith("agentcoord")]
    assert not tracebacks, "a traceback was logged"
