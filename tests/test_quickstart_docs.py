"""docs/quickstart.md stays true: every ``sh`` line and Python block runs, in order, as written.

The page is followed against a real server on a free port and a temporary SQLite file, in a
temporary working folder, with the helpers of ``tests/test_docs.py`` (each ``sh`` line in its
own ``bash -euo pipefail``), ``tests/cli/test_cli_docs.py`` (background commands, variables
that a line sets) and ``tests/test_statesync_docs.py`` (Python blocks). grpcurl is the real
one (``grpcurl_path`` in ``tests/conftest.py``; the stand-in where none is installed).
The documented address ``127.0.0.1:50051`` is replaced by the test server's everywhere.

Lines that stand for what a person does in a terminal are mapped, not run literally:

- ``make run`` (terminal 1): the test starts ``agentcoord serve &`` in the background, as
  ``tests/cli/test_cli_docs.py`` does for ``agentcoord serve ... &``. That is what the target
  runs once ``.venv`` is installed (``.venv/bin/agentcoord serve`` with the
  ``AGENTCOORD_LISTEN`` and ``AGENTCOORD_STORE`` it exports); the test sets both variables to
  the free port and the temporary store instead of installing anything.
- ``source .venv/bin/activate`` (terminal 2): the ``PATH`` of every line starts with the
  folder of this interpreter, the virtual environment's ``bin``, which is what it does.
- ``python agent.py ... &``: started in the background (same helper); the test then waits
  until the agent is live, as a person reading the output would.
- ``kill $(jobs -p)``: the background agents get SIGTERM and are waited for; they must have
  deregistered. The server (Ctrl-C in terminal 1) is stopped the same way at the end.

A Python block whose first line is ``# NAME.py: ...`` is saved as ``NAME.py`` in the working
folder; unless it "runs ... until stopped" (then a later ``sh`` line starts it) it is run
there at once, as ``python NAME.py``, and must exit 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

from agentcoord.client import AgentcoordClient
from tests.cli.test_cli_docs import ASSIGNMENT, EXPECTED_OUTPUT, background, free_port
from tests.client.test_sdk_docs import live_agents
from tests.helpers import eventually
from tests.test_docs import (
    DEFAULT_ADDRESS,
    DOCS,
    README,
    Walkthrough,
    check_output,
    grpcurl_args,
    run_shell,
    shell_commands,
)

QUICKSTART_MD = DOCS / "quickstart.md"
BLOCK = re.compile(r"^```(sh|python)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SCRIPT_NAME = re.compile(r"\A# ([\w-]+\.py):")
RUNS_UNTIL_STOPPED = re.compile(r"\A#.*runs .*until stopped")
MAKE_RUN = "make run"
SERVE = "agentcoord serve &"
"""What ``make run`` is mapped to (see the module docstring)."""
ACTIVATE = "source .venv/bin/activate"
STOP_AGENTS = "kill $(jobs -p)"
AGENT_IDS = {"research-agent", "write-agent"}
EXPECTED = {
    "agentcoord health --wait": EXPECTED_OUTPUT["agentcoord health --wait"],
    "agentcoord agents ls": "research-agent",
    "agentcoord tasks analyze": "step-3",
    'agentcoord tasks watch "$TASK"': "3/3 succeeded",
    "agentcoord events ls --service distribution": "subtask.succeeded",
    "agentcoord events ls --agent write-agent": "write-agent",
}
"""What the output of a documented command shows, by the command's start."""


def steps(text: str) -> Iterator[tuple[str, str]]:
    """``("sh", line)`` for every command and ``("python", code)`` for every block, in order."""
    for kind, body in BLOCK.findall(text):
        if kind == "python":
            yield kind, body
        else:
            for command in shell_commands(f"```sh\n{body}```\n"):
                yield kind, command


def check_task_json(output: str) -> None:
    """``tasks show --json``: the task succeeded; its result is the aggregation step's."""
    task = json.loads(output)["task"]
    assert task["state"] == "STATE_SUCCEEDED", output
    result = task["result"]
    assert set(result) == {"report", "parts"}, output
    assert [part["by"] for part in result["parts"].values()] == ["research-agent"] * 2, output
    holders = {s["localId"]: s["agentId"] for s in task["subtasks"]}
    assert holders == {
        "step-1": "research-agent",
        "step-2": "research-agent",
        "step-3": "write-agent",
    }, output


def test_quickstart_is_linked_first_from_the_readme() -> None:
    documentation = README.read_text().split("## Documentation", 1)[1]
    first = next(line for line in documentation.splitlines() if line.startswith("- "))
    assert "(docs/quickstart.md)" in first, first


def test_quickstart_shows_the_steps() -> None:
    commands = [c for kind, c in steps(QUICKSTART_MD.read_text()) if kind == "sh"]
    assert commands[0] == MAKE_RUN
    for needle in (
        ACTIVATE,
        "agentcoord health",
        "grpcurl -plaintext 127.0.0.1:50051 list",
        "Health/Check",
        "python agent.py research &",
        "agentcoord tasks submit",
        "DistributionService/SubmitTask",
        'agentcoord tasks watch "$TASK"',
        'agentcoord tasks show "$TASK" --json',
        "agentcoord events ls --service distribution",
        STOP_AGENTS,
    ):
        assert any(needle in c for c in commands), f"docs/quickstart.md runs no {needle!r}"


async def test_quickstart_runs_as_written(grpcurl_path: str, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{grpcurl_path}",
        "AGENTCOORD_LISTEN": address,
        "AGENTCOORD_STORE": f"sqlite:///{tmp_path / 'quickstart.db'}",
        "AGENTCOORD_SERVER": address,
    }
    outputs: dict[str, str] = {}
    mapped: set[str] = set()
    async with contextlib.AsyncExitStack() as services:
        agents = await services.enter_async_context(contextlib.AsyncExitStack())
        client = await services.enter_async_context(AgentcoordClient(address))
        for kind, step in steps(QUICKSTART_MD.read_text()):
            step = DEFAULT_ADDRESS.sub(address, step)
            if kind == "python":
                name = SCRIPT_NAME.match(step)
                assert name, f"a Python block must start with '# NAME.py:':\n{step}"
                (tmp_path / name.group(1)).write_text(step)
                if RUNS_UNTIL_STOPPED.match(step):
                    continue
                step = f"python {name.group(1)}"  # what the page says to do with it
            elif step in (MAKE_RUN, ACTIVATE, STOP_AGENTS):
                mapped.add(step)
                if step == MAKE_RUN:
                    await services.enter_async_context(
                        background(SERVE, env, tmp_path, "server.log")
                    )
                elif step == STOP_AGENTS:
                    await agents.aclose()
                    assert await live_agents(client) == 0, "the agents did not deregister"
                continue
            elif step.endswith("&"):
                before = await live_agents(client)
                log = f"agent-{len(outputs)}.log"
                await agents.enter_async_context(background(step, env, tmp_path, log))

                async def registered(before: int = before) -> bool:
                    with contextlib.suppress(Exception):
                        return await live_agents(client) > before
                    return False

                await eventually(registered, timeout=15)
                continue
            script = f"cd {shlex.quote(str(tmp_path))}\n{step}"
            assignment = ASSIGNMENT.match(step)
            if assignment:  # print the variable it set, for the later commands
                script += f'\nprintf %s "${assignment.group(1)}"'
            code, stdout, stderr = await run_shell(script, env)
            assert code == 0, f"{step!r} exited {code}:\n{stdout}{stderr}"
            if assignment:
                assert stdout.strip(), f"{step!r} set {assignment.group(1)} to nothing"
                env[assignment.group(1)] = stdout.strip()
            elif step.startswith("grpcurl"):
                check_output(grpcurl_args(step), stdout, Walkthrough())
            outputs[step] = stdout
    assert mapped == {MAKE_RUN, ACTIVATE, STOP_AGENTS}
    for start, shown in EXPECTED.items():
        (command,) = [c for c in outputs if c.startswith(start)]
        assert shown in outputs[command], f"{command!r} printed:\n{outputs[command]}"
    assert set(outputs["agentcoord agents ls"].split()) >= AGENT_IDS, outputs
    check_task_json(outputs['agentcoord tasks show "$TASK" --json'])
    assert '"research-agent"' in outputs["python planner.py"], outputs["python planner.py"]
