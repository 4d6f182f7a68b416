"""docs/cli.md stays true: its commands run as written, and its tables match the code.

The ``sh`` blocks run in order, each line in its own ``bash`` (``set -euo pipefail``), with the
helpers of ``tests/test_docs.py``. The documented ``agentcoord serve ... &`` is started in the
background on a free port and a temporary SQLite file (through ``AGENTCOORD_LISTEN`` and
``AGENTCOORD_STORE``, which the command leaves to the environment); the other commands reach it
through ``AGENTCOORD_SERVER``. ``worker-1`` (tests/cli/conftest.py) joins before the first
``agentcoord tasks`` command, as the page says, and does the tasks' work.
Variables a line sets (``X=$(...)``, ``export X=...``) are passed to the lines after it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shlex
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from agentcoord.cli.exits import EXIT_BY_STATUS, Exit
from agentcoord.cli.main import build_parser
from agentcoord.cli.rpc import add_client_flags
from tests.cli.conftest import work
from tests.test_docs import DOCS, code_spans, run_shell, section, shell_commands, table_rows

CLI_MD = DOCS / "cli.md"
ASSIGNMENT = re.compile(r"^(?:export )?([A-Z_]+)=")
SERVE = re.compile(r"^agentcoord serve\b.*&$")
EXPECTED_OUTPUT = {
    "agentcoord health --wait": "statesync     SERVING",
    "agentcoord state watch": "put  shared/status",
    "agentcoord state put shared/plan '{}'": "exit code 4",
    "agentcoord state incr shared/done 2": "shared/done: 3 (version 2",
    "agentcoord state discard": 'shared/reviewers: ["bo"] (version 2',
    'agentcoord tasks watch "$TASK"': "[##########] 5/5 succeeded",
    'agentcoord tasks watch "$TRAIN"': "exit code 1",
    "agentcoord agents watch": "joined  worker-1",
}
"""What the output of a documented command shows, as the page says, by the command's start."""


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-commands of ``parser`` by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def leaf_commands(
    parser: argparse.ArgumentParser, prefix: str = "agentcoord"
) -> dict[str, argparse.ArgumentParser]:
    """Every runnable command, such as ``agentcoord tasks submit``, with its parser."""
    children = subparsers(parser)
    if not children:
        return {prefix: parser}
    found: dict[str, argparse.ArgumentParser] = {}
    for name, child in children.items():
        found.update(leaf_commands(child, f"{prefix} {name}"))
    return found


def test_every_command_has_an_example() -> None:
    examples = shell_commands(CLI_MD.read_text())
    for command in leaf_commands(build_parser()):
        pattern = re.compile(rf"(^|\s){re.escape(command.removeprefix('agentcoord '))}(\s|$)")
        assert any(c.startswith("agentcoord") and pattern.search(c) for c in examples), (
            f"docs/cli.md runs no `{command}`"
        )


def test_every_flag_the_page_names_exists() -> None:
    parsers = [build_parser(), *leaf_commands(build_parser()).values()]
    known = {flag for parser in parsers for flag in parser._option_string_actions}
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", CLI_MD.read_text()))
    assert named <= known, f"docs/cli.md names flags no command has: {sorted(named - known)}"


def test_connection_table_lists_the_client_flags() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    add_client_flags(parser, nested=False)
    documented = {
        code_spans(cells[0])[0].split()[0]
        for cells in table_rows(section(CLI_MD.read_text(), "Connecting"))
    }
    assert documented == set(parser._option_string_actions)


def test_exit_code_table_matches_the_code() -> None:
    documented = {
        int(code_spans(cells[0])[0]): set(code_spans(cells[2]))
        for cells in table_rows(section(CLI_MD.read_text(), "Exit codes"))
    }
    assert set(documented) == {int(status) for status in Exit}
    for status in Exit:
        in_code = {code.name for code, exit in EXIT_BY_STATUS.items() if exit is status}
        expected = {"OK"} if status is Exit.OK else in_code
        assert documented[status] == expected, f"exit code {int(status)}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def background(
    command: str, env: dict[str, str], cwd: Path, log_name: str = "background.log"
) -> AsyncIterator[None]:
    """Run a documented ``... &`` command until the block ends, then stop it with SIGTERM.

    Its output goes to ``cwd / log_name``.
    """
    log = (cwd / log_name).open("wb")
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", f"exec {command.removesuffix('&')}",
        env=env, cwd=cwd, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        yield
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=15)
        log.close()


async def test_documented_commands_run_as_written(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "AGENTCOORD_LISTEN": address,
        "AGENTCOORD_STORE": f"sqlite:///{tmp_path / 'docs.db'}",
        "AGENTCOORD_SERVER": address,
    }
    outputs: dict[str, str] = {}
    working: list[asyncio.Task[None]] = []
    async with contextlib.AsyncExitStack() as running:
        for command in shell_commands(CLI_MD.read_text()):
            if SERVE.match(command):
                await running.enter_async_context(background(command, env, tmp_path))
                continue
            if command.startswith("agentcoord tasks") and not working:
                registered = asyncio.Event()
                working.append(asyncio.create_task(work(address, registered)))
                running.callback(working[0].cancel)
                await asyncio.wait_for(registered.wait(), timeout=15)
            script = f"cd {shlex.quote(str(tmp_path))}\n{command}"
            assignment = ASSIGNMENT.match(command)
            if assignment:  # print the variable it set, for the later commands
                script += f'\nprintf %s "${assignment.group(1)}"'
            code, stdout, stderr = await run_shell(script, env)
            assert code == 0, f"{command!r} exited {code}:\n{stdout}{stderr}"
            if assignment:
                assert stdout.strip(), f"{command!r} set {assignment.group(1)} to nothing"
                env[assignment.group(1)] = stdout.strip()
            outputs[command] = stdout
    for start, shown in EXPECTED_OUTPUT.items():
        (command,) = [c for c in outputs if c.startswith(start)]
        assert shown in outputs[command], f"{command!r} printed:\n{outputs[command]}"
