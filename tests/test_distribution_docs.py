"""docs/distribution.md stays true: its Python and grpcurl examples run as written.

The Python examples run as scripts against a real server; the grpcurl commands (with the shell
lines that pick values out of their output) run in order with the real ``grpcurl``
(``grpcurl_path`` in ``tests/conftest.py``; the stand-in where none is installed), with the
helpers of ``tests/test_docs.py`` and ``tests/test_statesync_docs.py``. The page's reasons table
names every reason the Distribution code raises.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from typing import Any

from agentcoord.distribution.v1 import distribution_service_pb2 as pb
from agentcoord.server.app import App
from tests.test_docs import (
    DOCS,
    ROOT,
    SERVICES,
    code_spans,
    grpcurl_args,
    json_values,
    positionals,
    request_of,
    run_shell,
    section,
    shell_commands,
    table_rows,
)
from tests.test_statesync_docs import ASSIGNMENT, PYTHON_BLOCK, app, local

__all__ = ["app"]  # the fixture, shared with tests/test_statesync_docs.py

DISTRIBUTION_MD = DOCS / "distribution.md"
DISTRIBUTION_CODE = [
    SERVICES / "core" / "distribution.py",
    SERVICES / "core" / "task_rules.py",
    SERVICES / "core" / "session_rules.py",
    SERVICES / "store" / "task_writes.py",
    SERVICES / "server" / "distribution.py",
]
VARIABLE = re.compile(r"\$([A-Z_]+)")


def test_every_rpc_is_explained() -> None:
    text = DISTRIBUTION_MD.read_text()
    service = pb.DESCRIPTOR.services_by_name["DistributionService"]
    missing = [m.name for m in service.methods if f"`{m.name}`" not in text]
    assert not missing, f"docs/distribution.md does not mention {missing}"


def test_errors_table_names_every_reason_of_the_distribution_code() -> None:
    rows = table_rows(section(DISTRIBUTION_MD.read_text(), "Errors"))
    documented = {code_spans(cells[0])[0] for cells in rows}
    raised = {
        reason
        for path in DISTRIBUTION_CODE
        for reason in re.findall(r'\breason="([A-Z_]+)"', path.read_text())
    }
    assert raised, "no reason= found in the Distribution code"
    assert raised <= documented, f"docs/distribution.md lacks {sorted(raised - documented)}"


async def test_python_examples_run_as_written(app: App) -> None:
    examples = PYTHON_BLOCK.findall(DISTRIBUTION_MD.read_text())
    assert len(examples) >= 2
    outputs = []
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
        outputs.append(output)
    assert "late write refused" in outputs[0], outputs[0]


def documented_result(text: str) -> Any:
    """The task result the grpcurl section says the commands produce."""
    match = re.search(r"its `result` is `([^`]*)`", " ".join(text.split()))
    assert match, "the grpcurl section no longer states the task's result"
    return json.loads(match.group(1))


class Walkthrough:
    """What the documented commands have done so far, to check each output against."""

    def __init__(self) -> None:
        self.variables: dict[str, str] = {}
        self.claimed: list[str] = []
        """Local ids of the sub-tasks claimed, in order."""
        self.results: dict[str, Any] = {}
        """Results completed, by local id."""

    def expand(self, value: Any) -> Any:
        """``value`` (a request parsed from the page) with ``$VARIABLES`` replaced."""
        if isinstance(value, str):
            return VARIABLE.sub(lambda m: self.variables[m.group(1)], value)
        if isinstance(value, dict):
            return {key: self.expand(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.expand(item) for item in value]
        return value

    def check_claim(self, output: str) -> None:
        (response,) = json_values(output)
        lease, subtask = response["assignment"]["lease"], response["assignment"]["subtask"]
        assert lease["agentId"] == "worker-3" and int(lease["fencingToken"]) > 0, output
        assert subtask["state"] == "STATE_LEASED" and subtask["taskId"], output
        assert subtask["taskId"] == self.variables["TASK"], output
        self.claimed.append(subtask["localId"])
        # Only `read` is READY at first; `write` once `read` has succeeded.
        assert self.claimed == ["read", "write"][: len(self.claimed)], self.claimed

    def check(self, args: list[str], output: str) -> None:
        """Assert the key facts of one call's output (protojson, as grpcurl prints it)."""
        method = positionals(args)[1].rpartition("/")[2]
        body = self.expand(request_of(args))
        responses = list(json_values(output))
        if method == "WatchTask":
            self.check_watch(responses)
            return
        (response,) = responses
        if method == "AnalyzeTask":
            assert [s["localId"] for s in response["subtasks"]] == ["step-1", "step-2", "step-3"]
            assert response["subtasks"][2]["dependsOn"] == ["step-1", "step-2"], output
            assert response["parallelizable"] is True, output
            assert response["aggregationLocalId"] == "step-3", output
            assert response["splitter"] == "builtin" and response["reason"], output
        elif method == "CompleteSubtask":
            subtask = response["subtask"]
            assert subtask["subtaskId"] == body["subtask_id"], output
            assert subtask["state"] == "STATE_SUCCEEDED", output
            assert subtask["result"] == body["result"], output
            self.results[subtask["localId"]] = subtask["result"]
            finished = set(self.results) == {"read", "write"}
            expected_state = "STATE_SUCCEEDED" if finished else "STATE_RUNNING"
            assert response["taskState"] == expected_state, output
        elif method == "GetTask":
            task = response["task"]
            assert task["taskId"] == body["task_id"], output
            assert task["state"] == "STATE_SUCCEEDED", output
            assert task["result"] == self.results, output
            assert "subtasks" not in task, f"TASK_VIEW_BASIC has no sub-tasks:\n{output}"
            assert task["counts"]["succeeded"] == task["counts"]["total"] == 2, output
        else:
            raise AssertionError(f"no check for the documented command {' '.join(args)!r}: add one")

    def check_watch(self, responses: list[Any]) -> None:
        assert len(responses) >= 2 and "events" not in responses[0], responses[0]
        events = [event for response in responses[1:] for event in response["events"]]
        revisions = [int(event["revision"]) for event in events]
        assert revisions == sorted(set(revisions)), revisions
        assert events[0]["task"] == {"toState": "STATE_PENDING"}, events[0]
        moves = [
            (e["subtask"]["localId"], e["subtask"].get("toState")) for e in events if "subtask" in e
        ]
        assert ("read", "STATE_LEASED") in moves and ("write", "STATE_SUCCEEDED") in moves, moves
        assert events[-1]["task"]["toState"] == "STATE_SUCCEEDED", events[-1]


async def test_grpcurl_examples_work_as_written(app: App, grpcurl_path: str) -> None:
    state = Walkthrough()

    async def run(command: str) -> str:
        script = local(command, app)
        assignment = ASSIGNMENT.match(command)
        if assignment:  # run it, then print the variable it set, for the later commands
            script += f'\nprintf %s "${assignment.group(1)}"'
        env = {**os.environ, "PATH": grpcurl_path, **state.variables}
        code, stdout, stderr = await run_shell(script, env)
        assert code == 0, f"{command!r} exited {code}:\n{stdout}{stderr}"
        if assignment:
            name = assignment.group(1)
            assert stdout.strip(), f"{command!r} set {name} to nothing"
            state.variables[name] = stdout.strip()
            if name == "CLAIM":
                state.check_claim(stdout)
        elif "grpcurl" in command:
            state.check(grpcurl_args(command), stdout)
        return stdout

    text = section(DISTRIBUTION_MD.read_text(), "grpcurl")
    commands = shell_commands(text)
    assert any("ClaimSubtask" in c for c in commands) and any("GetTask" in c for c in commands)
    first_completion: str | None = None
    for command in commands:
        output = await run(command)
        if first_completion is None and "CompleteSubtask" in command:
            first_completion = output
            # As the page says: the completion sent again answers the same, changes nothing.
            assert await run(command) == first_completion
    assert state.results == documented_result(text)
