"""docs/statesync.md stays true: its Python and grpcurl examples run as written.

The Python examples run as scripts against a real server; the grpcurl commands run with the
real ``grpcurl`` (``grpcurl_path`` in ``tests/conftest.py``; the stand-in where none is
installed), with the helpers of ``tests/test_docs.py``.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agentcoord.server.app import App, start_app
from agentcoord.server.config import ServerConfig
from agentcoord.statesync.v1 import statesync_service_pb2 as pb
from tests.test_docs import (
    DEFAULT_ADDRESS,
    DOCS,
    ROOT,
    documented_grpcurl_commands,
    grpcurl_args,
    json_values,
    positionals,
    request_of,
    run_shell,
)

STATESYNC_MD = DOCS / "statesync.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
ASSIGNMENT = re.compile(r"^([A-Z_]+)=\$\(")


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    app = await start_app(ServerConfig(listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/t.db"))
    yield app
    await app.stop(0)


def local(text: str, app: App) -> str:
    """``text`` with the documented address replaced by the test server's."""
    return DEFAULT_ADDRESS.sub(f"127.0.0.1:{app.port}", text)


def test_every_rpc_is_explained() -> None:
    text = STATESYNC_MD.read_text()
    service = pb.DESCRIPTOR.services_by_name["StateSyncService"]
    missing = [m.name for m in service.methods if f"`{m.name}`" not in text]
    assert not missing, f"docs/statesync.md does not mention {missing}"


async def test_python_examples_run_as_written(app: App) -> None:
    examples = PYTHON_BLOCK.findall(STATESYNC_MD.read_text())
    assert len(examples) >= 3
    for number, example in enumerate(examples, 1):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            local(example, app),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
        output = (stdout + stderr).decode()
        assert process.returncode == 0, f"Python example {number} failed:\n{output}"


def check_output(args: list[str], output: str) -> None:
    """Assert the key facts of one StateSync call's output (protojson, as grpcurl prints it)."""
    method = positionals(args)[1].rpartition("/")[2]
    body = request_of(args)
    (response,) = json_values(output)
    if method == "PutState":
        expected = int(body.get("expected_version", 0)) + 1
        assert response["state"]["key"] == body["key"], output
        assert response["state"]["version"] == str(expected), output
    elif method == "GetState":
        assert response["state"]["key"] == body["key"], output
    elif method == "ModifyState":
        assert response["state"]["key"] == body["key"], output
        assert int(response["state"]["version"]) >= 1, output
    elif method == "Transact":
        assert len(response["results"]) == len(body["operations"]), output
    elif method == "ListStates":
        keys = [state["key"] for state in response["states"]]
        assert keys and all(key.startswith(body["prefix"]) for key in keys), output
    elif method == "DeleteState":
        assert response["previous"]["key"] == body["key"], output
    elif method == "ListEvents":
        events: list[dict[str, Any]] = response["events"]
        assert events, output
        for event in events:
            assert event["agentId"] == body["agent_id"], output
            assert event["kind"].startswith(body["kind"]), output
    else:
        raise AssertionError(f"no check for the documented command {' '.join(args)!r}: add one")


async def test_grpcurl_examples_work_as_written(app: App, grpcurl_path: str) -> None:
    variables: dict[str, str] = {}

    async def run(command: str) -> str:
        script = local(command, app)
        assignment = ASSIGNMENT.match(command)
        if assignment:  # run it, then print the variable it set, for the later commands
            script += f'\nprintf %s "${assignment.group(1)}"'
        code, stdout, stderr = await run_shell(
            script, {**os.environ, "PATH": grpcurl_path, **variables}
        )
        assert code == 0, f"{command!r} exited {code}:\n{stdout}{stderr}"
        if assignment:
            assert stdout.strip(), f"{command!r} set {assignment.group(1)} to nothing"
            variables[assignment.group(1)] = stdout.strip()
        else:
            check_output(grpcurl_args(command), stdout)
        return stdout

    commands = documented_grpcurl_commands(STATESYNC_MD.read_text())
    outputs = [await run(command) for command in commands]
    # As the page says: the first write sent again answers the same and writes nothing.
    first_put = next(i for i, c in enumerate(commands) if "request_id" in c and "PutState" in c)
    assert await run(commands[first_put]) == outputs[first_put]
