"""Server subprocesses and the stores they use: start, sample CPU and RSS, stop, clean up."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import pstats
import re
import secrets
import signal
import subprocess
import sys
import time
import traceback
import urllib.parse
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[2]
"""Repository root: servers run from here so ``tests.bench`` imports."""

_LISTENING = re.compile(r"listening on (\S+)")


@dataclass
class Server:
    """A server subprocess and where it listens."""

    name: str
    proc: subprocess.Popen[bytes]
    address: str
    log: Path
    profile: Path | None = None
    ps: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.ps = psutil.Process(self.proc.pid)

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the process so far, all threads."""
        times = self.ps.cpu_times()
        return times.user + times.system

    def rss(self) -> int:
        """Resident set size in bytes."""
        return int(self.ps.memory_info().rss)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (graceful shutdown), then SIGKILL after ``timeout`` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def profile_summary(self, top: int = 25) -> str:
        """The ``top`` functions by own time from the cProfile output, once stopped."""
        if self.profile is None or not self.profile.exists():
            return ""
        out = io.StringIO()
        stats = pstats.Stats(str(self.profile), stream=out)
        stats.sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)
        return out.getvalue()


def _clean_env() -> dict[str, str]:
    """The environment minus ``AGENTCOORD_*``, so only the bench's flags configure servers."""
    return {key: value for key, value in os.environ.items() if not key.startswith("AGENTCOORD_")}


def start_server(
    name: str,
    module_args: list[str],
    workdir: Path,
    *,
    profile: bool = False,
    env: Mapping[str, str] | None = None,
) -> Server:
    """Start ``python -m <module_args>`` and wait for its ``listening on host:port`` line.

    ``env`` adds variables to the server's environment.

    Raises:
        RuntimeError: the server exited or did not listen within 30 s (its log is quoted).
    """
    log = workdir / f"{name}.log"
    prof = workdir / f"{name}.prof" if profile else None
    command = [sys.executable, *(["-m", "cProfile", "-o", str(prof)] if prof else []), "-m"]
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [*command, *module_args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env={**_clean_env(), **(env or {})},
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        match = _LISTENING.search(log.read_text(errors="replace"))
        if match:
            return Server(name, proc, match.group(1), log, prof)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait(5)
    raise RuntimeError(f"{name} did not start:\n{log.read_text(errors='replace')[-3000:]}")


def start_agentcoord(
    name: str,
    store_url: str,
    workdir: Path,
    extra: list[str],
    *,
    profile: bool = False,
    env: Mapping[str, str] | None = None,
) -> Server:
    """Start ``agentcoord serve`` on an ephemeral loopback port."""
    args = ["agentcoord.cli", "serve", "--listen", "127.0.0.1:0", "--store", store_url]
    args += ["--log-level", "INFO", "--grace", "1", *extra]  # INFO: the listening line
    return start_server(name, args, workdir, profile=profile, env=env)


def start_echo(name: str, workdir: Path, max_pending_requests: int = 20_000) -> Server:
    """Start the bare echo server on an ephemeral loopback port."""
    args = ["tests.bench.echo", "--max-pending-requests", str(max_pending_requests)]
    return start_server(name, args, workdir)


class Stores:
    """Hands out a fresh store URL per server; drops PostgreSQL schemas afterwards."""

    def __init__(self, base_url: str, workdir: Path) -> None:
        """``base_url`` is ``sqlite`` (a file per server under ``workdir``) or a PostgreSQL URL."""
        self.base_url = base_url
        self._workdir = workdir
        self._schemas: list[str] = []

    @property
    def kind(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return "postgresql" if self.base_url.startswith("postgres") else "sqlite"

    def fresh(self, name: str) -> str:
        """A URL of an empty store for one server."""
        if self.kind == "sqlite":
            return f"sqlite:///{self._workdir / name}.db"
        schema = f"bench_{secrets.token_hex(4)}"
        self._schemas.append(schema)
        sep = "&" if "?" in self.base_url else "?"
        return f"{self.base_url}{sep}schema={schema}"

    def drop_all(self) -> None:
        """Drop every PostgreSQL schema handed out."""
        if self._schemas:
            asyncio.run(self._drop())

    async def _drop(self) -> None:
        import asyncpg  # only needed with PostgreSQL

        parts = urllib.parse.urlsplit(self.base_url)
        query = urllib.parse.urlencode(
            [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "schema"]
        )
        dsn = urllib.parse.urlunsplit(parts._replace(query=query))
        connection = await asyncpg.connect(dsn)
        try:
            for schema in self._schemas:
                await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await connection.close()
        self._schemas.clear()


def serve_worker(run: Callable[[], Coroutine[Any, Any, Any]], conn: Connection) -> None:
    """Run a load worker's coroutine; send back ``("done", result)`` or ``("error", tb)``."""
    try:
        conn.send(("done", asyncio.run(run())))
    except BaseException:  # reported to the parent, which raises
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def receive(conn: Connection, timeout: float, what: str) -> tuple[Any, ...]:
    """Return a worker's next message; raise if it failed or did not answer in time."""
    if not conn.poll(timeout):
        raise TimeoutError(f"a {what} bench worker did not answer")
    message = conn.recv()
    if message[0] == "error":
        raise RuntimeError(f"{what} bench worker failed:\n{message[1]}")
    return tuple(message)
