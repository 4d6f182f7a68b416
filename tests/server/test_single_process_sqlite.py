"""SQLite serves one process: a second ``agentcoord serve`` on the same file is refused.

The first process holds a ``flock`` on ``<file>.lock``; the kernel drops it when that
process dies, so after ``kill -9`` a new server starts on the same file.
"""

from __future__ import annotations

from pathlib import Path

from agentcoord.cli.exits import Exit
from tests.server.processes import free_port, serve, start


async def test_a_second_process_is_refused_until_the_first_is_killed(tmp_path: Path) -> None:
    database = tmp_path / "agentcoord.db"
    url = f"sqlite:///{database}"
    async with serve(free_port(), url, tmp_path / "first.log") as first:
        second_log = tmp_path / "second.log"
        second = await start(free_port(), url, second_log)
        assert await second.wait() == Exit.UNAVAILABLE
        lines = second_log.read_text().splitlines()
        assert lines == [
            f"agentcoord: {database} is in use by another agentcoord process "
            f"(pid {first.pid}): an SQLite store serves one process; stop that one, or use a "
            "postgresql:// store to run several"
        ]
        first.kill()  # SIGKILL: no shutdown, the lock goes with the process
        await first.wait()
    assert (tmp_path / "agentcoord.db.lock").exists()
    async with serve(free_port(), url, tmp_path / "third.log") as third:
        assert (tmp_path / "agentcoord.db.lock").read_text() == f"{third.pid}\n"
