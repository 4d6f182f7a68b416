"""The ``agentcoord`` command line against real servers: output, inputs and exit codes.

Commands run in-process through ``main()`` (in a thread, since it runs its own event loop),
and once as the installed ``agentcoord`` script in a subprocess.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import duration_pb2

from agentcoord.cli.exits import Exit
from agentcoord.cli.main import main
from agentcoord.cli.output import Output
from agentcoord.cli.progress import Board
from agentcoord.client import AgentcoordClient
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.distribution.v1 import distribution_service_pb2 as distribution_pb
from agentcoord.server.app import App
from tests.cli.conftest import ADMIN_TOKEN
from tests.server.conftest import StartServer

SCRIPT = Path(sys.executable).parent / "agentcoord"
DAG = "Build the wheel, then test it for each of linux, mac and windows, then publish it"


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)

    @property
    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines()]


@dataclass
class Cli:
    """Runs ``agentcoord --server <the test server> ARGS`` in-process."""

    address: str
    capsys: pytest.CaptureFixture[str]
    monkeypatch: pytest.MonkeyPatch

    async def __call__(self, *argv: str, stdin: str = "") -> Result:
        self.monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = await asyncio.to_thread(main, ["--server", self.address, *argv])
        captured = self.capsys.readouterr()
        return Result(code, captured.out, captured.err)


def cli_for(app: App, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(f"127.0.0.1:{app.port}", capsys, monkeypatch)


@pytest.fixture
def cli(server: App, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return cli_for(server, capsys, monkeypatch)


async def register(app: App, agent_id: str, role: str, *capabilities: str) -> str:
    """Register an agent with a long TTL; return its session token."""
    async with AgentcoordClient(f"127.0.0.1:{app.port}") as client:
        response = await client.discovery.register(
            discovery_pb.RegisterRequest(
                agent_id=agent_id,
                name=agent_id.title(),
                role=role,
                capabilities=capabilities,
                ttl=duration_pb2.Duration(seconds=300),
            )
        )
    return response.session_token


def table(output: str) -> list[list[str]]:
    """The cells of a printed table, header included (cells contain no double spaces)."""
    return [
        [cell.strip() for cell in line.split("  ") if cell.strip()] for line in output.splitlines()
    ]


# --- agents -------------------------------------------------------------------------------------


async def test_agents_show_prints_the_a2a_card_and_ls_filters_by_skill(
    cli: Cli, server: App
) -> None:
    await register(server, "plain", "worker")
    async with AgentcoordClient(f"127.0.0.1:{server.port}") as client:
        await client.discovery.register(
            discovery_pb.RegisterRequest(
                agent_id="reviewer",
                name="Reviewer",
                description="Reviews diffs.",
                version="1.2.0",
                provider=discovery_pb.Provider(organization="Example Labs", url="https://ex.org"),
                a2a_url="https://ex.org/a2a",
                skills=[
                    discovery_pb.Skill(
                        id="code-review",
                        name="Code review",
                        description="Finds bugs",
                        tags=["python", "review"],
                        examples=["Review this"],
                        input_modes=["text/x-diff"],
                        output_modes=["text/markdown"],
                    )
                ],
                ttl=duration_pb2.Duration(seconds=300),
            )
        )
    shown = await cli("agents", "show", "reviewer")
    assert shown.code == Exit.OK, shown.err
    lines = {tuple(row[:1]): row[1:] for row in table(shown.out)}
    assert lines[("description",)] == ["Reviews diffs."]
    assert lines[("version",)] == ["1.2.0"]
    assert lines[("provider",)] == ["Example Labs (https://ex.org)"]
    assert lines[("a2a url",)] == ["https://ex.org/a2a"]
    assert lines[("skill code-review",)] == [
        "Code review: Finds bugs; tags python,review; examples Review this; in text/x-diff; "
        "out text/markdown"
    ]
    for wanted in ("code-review", "python"):
        found = await cli("agents", "ls", "--skill", wanted)
        assert [row[0] for row in table(found.out)[1:]] == ["reviewer"]
    none = await cli("--json", "agents", "ls", "--skill", "review", "--skill", "cooking")
    assert none.json.get("agents", []) == []


async def test_agents_ls_show_and_watch(cli: Cli, server: App) -> None:
    await register(server, "gpu-1", "trainer", "gpu", "python")
    token = await register(server, "py-1", "worker", "python")

    listed = await cli("agents", "ls")
    assert listed.code == Exit.OK, listed.err
    rows = table(listed.out)
    assert rows[0] == ["AGENT", "ROLE", "STATE", "STATUS", "LOAD", "CAPABILITIES", "NAME"]
    assert [row[0] for row in rows[1:]] == ["gpu-1", "py-1"]
    assert rows[1][1:6] == ["trainer", "live", "ready", "0/1", "gpu,python"]

    only_gpu = await cli("--json", "agents", "ls", "--capability", "gpu", "--capability", "python")
    assert [a["agentId"] for a in only_gpu.json["agents"]] == ["gpu-1"]
    by_role = await cli("agents", "ls", "--role", "worker", "--json")  # flags after the command
    assert [a["agentId"] for a in by_role.json["agents"]] == ["py-1"]

    shown = await cli("agents", "show", "py-1")
    assert "state         live" in shown.out and "capabilities  python" in shown.out
    assert "provider      -" in shown.out
    joined_at = int((await cli("--json", "agents", "show", "py-1")).json["agent"]["revision"])

    async with AgentcoordClient(f"127.0.0.1:{server.port}", token=token) as client:
        await client.discovery.deregister(discovery_pb.DeregisterRequest(agent_id="py-1"))
    assert [row[0] for row in table((await cli("agents", "ls")).out)[1:]] == ["gpu-1"]
    everyone = await cli("agents", "ls", "--all")
    assert [row[:3] for row in table(everyone.out)[1:]] == [
        ["gpu-1", "trainer", "live"],
        ["py-1", "worker", "left"],
    ]

    watched = await cli("agents", "watch", "--since", str(joined_at - 1), "--count", "2")
    lines = [line.split() for line in watched.out.splitlines()]
    assert [(line[2], line[3]) for line in lines] == [("joined", "py-1"), ("left", "py-1")]
    as_json = await cli("--json", "agents", "watch", "--since", str(joined_at), "--count", "1")
    (event,) = as_json.json_lines
    assert event["kind"] == "KIND_LEFT" and event["agent"]["agentId"] == "py-1"

    missing = await cli("agents", "show", "nobody")
    assert missing.code == Exit.NOT_FOUND
    assert missing.err.startswith("agentcoord: NOT_FOUND: ") and not missing.out


# --- tasks --------------------------------------------------------------------------------------


async def test_tasks_analyze_takes_the_description_three_ways(cli: Cli, tmp_path: Path) -> None:
    analysed = await cli("tasks", "analyze", "--description", DAG)
    assert analysed.code == Exit.OK, analysed.err
    assert "parallel     yes" in analysed.out
    rows = table(analysed.out.split("\n\n")[1])
    assert rows[0] == ["SUBTASK", "DEPENDS ON", "CAPABILITIES", "SKILLS", "TITLE"]
    assert rows[-1][:2] == ["step-5", "step-2,step-3,step-4"]

    plan = tmp_path / "plan.md"
    plan.write_text("- lint\n- test\n")
    from_file = await cli("--json", "tasks", "analyze", "--file", str(plan))
    from_stdin = await cli("--json", "tasks", "analyze", "-", stdin=plan.read_text())
    assert from_file.json == from_stdin.json
    assert [s["title"] for s in from_file.json["subtasks"]] == ["lint", "test"]

    assert (await cli("tasks", "analyze", "--file", str(tmp_path / "nope"))).code == Exit.USAGE
    assert (await cli("tasks", "analyze", "-", stdin="  \n")).code == Exit.USAGE


@pytest.mark.usefixtures("worker")
async def test_tasks_submit_watch_show_and_list(cli: Cli, tmp_path: Path) -> None:
    submitted = await cli("tasks", "submit", "-q", "--title", "Release", "--description", DAG)
    assert submitted.code == Exit.OK, submitted.err
    task_id = submitted.out.strip()

    watched = await cli("tasks", "watch", task_id)
    assert watched.code == Exit.OK, watched.err
    lines = watched.out.splitlines()
    assert lines[0].startswith(f"task {task_id} ")  # where it stood when the watch began
    # one line per batch of transitions (one commit or several), with the progress after it
    assert lines[-3].startswith("[##########] 5/5 succeeded | ")
    assert lines[-3].endswith("step-5 succeeded by worker-1; task succeeded")
    assert lines[-2:] == [
        f"task {task_id} succeeded",
        'result: {"step-1":"done: Build the wheel","step-2":"done: Test it for linux",'
        '"step-3":"done: Test it for mac","step-4":"done: Test it for windows",'
        '"step-5":"done: Publish it"}',
    ]

    shown = await cli("tasks", "show", task_id)
    assert "progress      [##########] 5/5 succeeded" in shown.out
    subtasks = table(shown.out.split("\n\n")[1])
    assert subtasks[-1] == [
        "step-5", "succeeded", "worker-1", "1/3", "step-2,step-3,step-4", "Publish it",
    ]  # fmt: skip

    spec = {
        "title": "Explicit",
        "splitPolicy": "SPLIT_POLICY_EXPLICIT",
        "subtasks": [{"localId": "a", "title": "A"}, {"localId": "b", "title": "B"}],
    }
    (tmp_path / "task.json").write_text(json.dumps(spec))
    waited = await cli("--json", "tasks", "submit", "--spec", str(tmp_path / "task.json"), "--wait")
    assert waited.code == Exit.OK, waited.err
    task = waited.json["task"]
    assert task["state"] == "STATE_SUCCEEDED" and task["result"] == {"a": "done: A", "b": "done: B"}

    lines_mode = await cli("tasks", "submit", "--description", "Lint", "--wait")
    assert lines_mode.out.splitlines()[0].startswith("submitted task ")
    assert lines_mode.out.splitlines()[-1] == 'result: {"main":"done: Lint"}'

    listed = await cli("tasks", "ls", "--state", "succeeded", "--limit", "2")
    rows = table(listed.out)
    assert rows[0] == ["TASK", "STATE", "DONE", "SUBMITTED", "TITLE"]
    assert [row[4] for row in rows[1:]] == ["Lint", "Explicit"]  # newest first
    assert (await cli("tasks", "ls", "--state", "failed")).out.count("\n") == 1  # header only

    watch_json = await cli("--json", "tasks", "watch", task_id)  # already ended: one message
    (message,) = watch_json.json_lines
    assert message["task"]["state"] == "STATE_SUCCEEDED" and len(message["task"]["subtasks"]) == 5


async def test_tasks_show_and_watch_a_task_too_large_for_one_message(
    cli: Cli, tmp_path: Path
) -> None:
    # 6,000 sub-tasks of 400-character descriptions: about 3 MB, more than a response holds.
    subtasks = [
        {"localId": f"s{i:04d}", "title": "T", "description": "d" * 400} for i in range(6000)
    ]
    spec = {"title": "Big", "splitPolicy": "SPLIT_POLICY_EXPLICIT", "subtasks": subtasks}
    (tmp_path / "big.json").write_text(json.dumps(spec))
    submitted = await cli("tasks", "submit", "-q", "--spec", str(tmp_path / "big.json"))
    assert submitted.code == Exit.OK, submitted.err
    task_id = submitted.out.strip()

    shown = await cli("--json", "tasks", "show", task_id)
    assert [s["localId"] for s in shown.json["task"]["subtasks"]] == [
        s["localId"] for s in subtasks
    ]
    assert shown.json["nextSubtasksPageToken"] == ""
    assert len(table((await cli("tasks", "show", task_id)).out.split("\n\n")[1])) == 6001

    await cli("tasks", "cancel", task_id)
    (message,) = (await cli("--json", "tasks", "watch", task_id)).json_lines
    assert len(message["task"]["subtasks"]) == 6000


@pytest.mark.usefixtures("worker")
async def test_failed_and_cancelled_tasks_exit_1(cli: Cli) -> None:
    failed = await cli("tasks", "submit", "--description", "Fail on purpose", "--wait")
    assert failed.code == Exit.NEGATIVE
    assert "main failed by worker-1 (asked to fail)" in failed.out
    assert failed.out.splitlines()[-1].endswith(" failed: sub-task 'main' failed: asked to fail")

    gpu = await cli(
        "tasks",
        "submit",
        "-q",
        "--capability",
        "gpu",
        "--skill",
        "vision",
        "--description",
        "Train",
    )
    task_id = gpu.out.strip()
    shown = (await cli("tasks", "show", task_id)).out
    assert "capabilities  gpu\n" in shown and "skills        vision\n" in shown
    cancelled = await cli("tasks", "cancel", task_id, "--reason", "no GPU")
    assert cancelled.out == f"task {task_id} cancelled: no GPU\n"
    watched = await cli("tasks", "watch", task_id)
    assert watched.code == Exit.NEGATIVE
    assert watched.out.splitlines()[-1] == f"task {task_id} cancelled: no GPU"

    assert (await cli("tasks", "show", "no-such-task")).code == Exit.NOT_FOUND
    assert (await cli("tasks", "watch", "no-such-task")).code == Exit.NOT_FOUND


async def test_progress_board_redraws_in_place_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    board = Board(Output(json_mode=False, stream=screen))
    task = distribution_pb.Task(
        task_id="t-1", title="Release", state=distribution_pb.Task.STATE_RUNNING
    )
    task.counts.total, task.counts.succeeded, task.counts.leased = 4, 1, 2
    for local_id, agent in (("a", "worker-2"), ("b", "worker-1"), ("c", "worker-1")):
        task.subtasks.add(
            local_id=local_id, agent_id=agent, state=distribution_pb.Subtask.STATE_LEASED
        )
    board.update(distribution_pb.WatchTaskResponse(task=task))
    task.counts.succeeded, task.counts.leased = 3, 0
    del task.subtasks[:]
    board.update(distribution_pb.WatchTaskResponse(task=task))
    first, second = screen.getvalue().split("\x1b[4F\x1b[J")  # up over the first block's 4 lines
    assert first.splitlines() == [
        "task t-1 running: Release",
        "[##........] 1/4 succeeded, 2 leased",
        "  worker-1: b, c",
        "  worker-2: a",
    ]
    assert second.splitlines() == ["task t-1 running: Release", "[#######...] 3/4 succeeded"]


# --- state --------------------------------------------------------------------------------------


async def test_state_put_get_ls_watch_rm(cli: Cli) -> None:
    anonymous = await cli("state", "put", "shared/plan", "1")
    assert anonymous.code == Exit.AUTH and anonymous.err.startswith("agentcoord: UNAUTHENTICATED")
    assert (await cli("--token", "wrong", "state", "put", "shared/plan", "1")).code == Exit.AUTH

    admin = ("--token", ADMIN_TOKEN)
    put = await cli(*admin, "state", "put", "shared/plan", '{"steps": [1, 2.5, "three"]}')
    assert put.code == Exit.OK, put.err
    assert put.out.startswith("shared/plan: version 1, revision ")
    conflict = await cli(*admin, "state", "put", "shared/plan", "{}", "--expected-version", "7")
    assert conflict.code == Exit.CONFLICT
    assert "expected version 7, current version 1" in conflict.err
    assert (await cli(*admin, "state", "put", "shared/x", "not json")).code == Exit.USAGE
    stdin = await cli(*admin, "--json", "state", "put", "shared/status", "-", stdin='"green"\n')
    assert stdin.json["state"]["json"] == "green"

    got = await cli("state", "get", "shared/plan")
    assert 'value     {"steps":[1,2.5,"three"]}' in got.out and "agent     (admin)" in got.out
    read = await cli("--json", "state", "get", "shared/plan")
    assert read.json["state"]["version"] == "1"  # int64 in proto JSON: a string
    revision = int(read.json["revision"])

    listed = await cli("state", "ls", "shared/")
    assert [row[0] for row in table(listed.out)] == ["KEY", "shared/plan", "shared/status"]
    assert (await cli("--json", "state", "ls")).json["states"][1]["key"] == "shared/status"

    await cli(*admin, "state", "put", "shared/status", '"amber"')
    await cli(*admin, "state", "rm", "shared/status")
    watched = await cli("state", "watch", "shared/", "--since", str(revision), "--count", "2")
    assert [line.split()[2:5] for line in watched.out.splitlines()] == [
        ["put", "shared/status", "-"],
        ["delete", "shared/status", "-"],
    ]
    assert watched.out.splitlines()[0].endswith('v2  "amber"')
    changes = await cli(
        "--json", "state", "watch", "shared/", "--since", str(revision), "--count", "1"
    )
    assert [c["type"] for c in changes.json_lines] == ["TYPE_PUT"]

    assert (await cli(*admin, "state", "rm", "shared/status")).code == Exit.NOT_FOUND
    assert (await cli("state", "get", "shared/status")).code == Exit.NOT_FOUND


async def test_state_modifications(cli: Cli) -> None:
    admin = ("--token", ADMIN_TOKEN)
    assert (await cli(*admin, "state", "incr", "shared/n")).out == (
        "shared/n: 1 (version 1, revision 1)\n"
    )
    assert (await cli(*admin, "state", "incr", "shared/n", "-0.5")).out.startswith("shared/n: 0.5")
    await cli(*admin, "state", "append", "shared/l", '"a"', "1")
    added = await cli(*admin, "--json", "state", "add", "shared/l", "1", "true")
    assert added.json["state"]["json"] == ["a", 1, True]
    assert (await cli(*admin, "state", "discard", "shared/l", '"a"')).out.startswith(
        "shared/l: [1,true]"
    )
    merged = await cli(*admin, "state", "merge", "shared/m", "-", stdin='{"a": {"b": 1}}')
    assert merged.out.startswith('shared/m: {"a":{"b":1}}')
    mismatch = await cli(*admin, "state", "incr", "shared/l")
    assert mismatch.code == Exit.CONFLICT and "holds an array, not a number" in mismatch.err
    with pytest.raises(SystemExit) as usage:  # refused by argparse, before sending
        await cli(*admin, "state", "incr", "shared/n", "NaN")
    assert usage.value.code == Exit.USAGE


async def test_non_finite_numbers_are_refused_before_sending(cli: Cli, tmp_path: Path) -> None:
    admin = ("--token", ADMIN_TOKEN)
    spec = tmp_path / "nan.json"
    spec.write_text('{"title": "t", "splitPolicy": "SPLIT_POLICY_NONE", "input": {"x": NaN}}')
    refusals = [
        (("state", "put", "shared/x", "NaN"), "VALUE: NaN"),
        (("state", "put", "shared/x", "[1, -Infinity]"), "VALUE: -Infinity"),
        (("state", "put", "shared/x", '{"big": 1e999}'), "VALUE: 1e999"),
        (("tasks", "submit", "--spec", str(spec)), "--spec: NaN"),
    ]
    for argv, message in refusals:
        refused = await cli(*admin, *argv)
        assert refused.code == Exit.USAGE, refused.err
        assert refused.err == f"agentcoord: {message} is not a finite JSON number\n", refused.err
    assert (await cli("state", "get", "shared/x")).code == Exit.NOT_FOUND  # nothing was sent
    assert (await cli(*admin, "state", "put", "shared/x", '"NaN"')).code == Exit.OK  # a string


# --- events -------------------------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
async def test_events_ls_and_tail(cli: Cli) -> None:
    await cli("--token", ADMIN_TOKEN, "state", "put", "shared/a", "1")
    await cli("tasks", "submit", "--description", "Lint", "--wait")

    everything = await cli("--json", "events", "ls", "--limit", "0")
    events = everything.json["events"]
    assert events[0]["kind"] == "agent.joined" and events[0]["agentId"] == "worker-1"
    assert {"state.put", "task.submitted", "subtask.succeeded"} <= {e["kind"] for e in events}

    limited = await cli("events", "ls", "--limit", "2")
    rows = table(limited.out)
    assert rows[0] == ["REVISION", "TIME", "SERVICE", "KIND", "SUBJECT", "AGENT", "DETAILS"]
    assert [row[0] for row in rows[1:]] == [events[0]["revision"], events[1]["revision"]]

    state_only = await cli("--json", "events", "ls", "--service", "statesync")
    assert [e["subject"] for e in state_only.json["events"]] == ["shared/a"]
    by_worker = await cli("--json", "events", "ls", "--agent", "worker-1", "--kind", "subtask.")
    assert {e["kind"] for e in by_worker.json["events"]} == {"subtask.leased", "subtask.succeeded"}
    since = await cli("--json", "events", "ls", "--since", events[-2]["revision"])
    assert since.json["events"] == events[-1:]

    tail = await cli("events", "tail", "--since", events[0]["revision"], "--count", "2")
    assert [line.split()[0] for line in tail.out.splitlines()] == [
        events[1]["revision"],
        events[2]["revision"],
    ]
    tail_json = await cli(
        "--json", "events", "tail", "--kind", "state.", "--since", "1", "--count", "1"
    )
    assert [e["subject"] for e in tail_json.json_lines] == ["shared/a"]


# --- health, credentials, failures --------------------------------------------------------------


async def test_health_of_each_service(
    start_server: StartServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state_only = cli_for(await start_server(services=("statesync",)), capsys, monkeypatch)
    partial = await state_only("health")
    assert partial.code == Exit.NEGATIVE
    assert [row[1:] for row in table(partial.out)[1:]] == [
        ["discovery", "SERVICE_UNKNOWN"],
        ["distribution", "SERVICE_UNKNOWN"],
        ["statesync", "SERVING"],
    ]
    served = await state_only("--json", "health", "statesync", "--wait")
    assert served.code == Exit.OK
    assert served.json == {"servers": {state_only.address: {"statesync": "SERVING"}}}

    everything = cli_for(await start_server(), capsys, monkeypatch)
    both = f"{everything.address},{state_only.address}"
    checked = await everything("--server", both, "--json", "health", "discovery")
    assert checked.code == Exit.NEGATIVE
    assert checked.json["servers"] == {
        everything.address: {"discovery": "SERVING"},
        state_only.address: {"discovery": "SERVICE_UNKNOWN"},
    }


async def test_join_token_and_unreachable_server(
    start_server: StartServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = cli_for(await start_server(join_token="let-me-in"), capsys, monkeypatch)
    refused = await cli("agents", "ls")
    assert refused.code == Exit.AUTH
    assert (await cli("--join-token", "let-me-in", "agents", "ls")).code == Exit.OK

    down = await cli("--server", "127.0.0.1:1", "--timeout", "0.5", "state", "ls")
    assert down.code == Exit.UNAVAILABLE
    assert down.err.startswith("agentcoord: 127.0.0.1:1: UNAVAILABLE: ")
    waited = await cli("--server", "127.0.0.1:1", "--timeout", "300ms", "health", "--wait")
    assert waited.code == Exit.UNAVAILABLE
    assert waited.err == (
        "agentcoord: 127.0.0.1:1: no server answered within 0.3 s (--wait --timeout 0.3); "
        "is it running, on this address?\n"
    )


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["tasks", "ls", "--state", "lost"], "--state"),
        (["tasks", "analyze"], "--description"),  # no description
        (["tasks", "submit", "--description", "x", "--spec", "y.json"], "--spec"),  # two sources
        (["health", "billing"], "billing"),
        (["--timeout", "0", "agents", "ls"], "--timeout"),
        (["--timeout", "soon", "agents", "ls"], "--timeout"),
        (["tasks", "ls", "--limit", "-1"], "--limit"),
        (["events", "ls", "--since", "x"], "--since"),
        (["state", "watch", "shared/", "--count", "-2"], "--count"),
        (["tasks", "submit", "--description", "x", "--priority", "5000"], "--priority"),
        (["agents", "ls", "--colour"], "--colour"),
    ],
)
def test_usage_errors_are_one_line_naming_the_flag_and_exit_2(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == Exit.USAGE, argv
    err = capsys.readouterr().err
    assert err.startswith("agentcoord") and err.count("\n") == 1, err
    assert named in err


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--server", "127.0.0.1:99999"], {}, "--server: '127.0.0.1:99999' is not a server"),
        (["--server", "nowhere"], {}, "--server: 'nowhere' is not a server address"),
        ([], {"AGENTCOORD_SERVER": "127.0.0.1:99999"}, "AGENTCOORD_SERVER: '127.0.0.1:99999'"),
    ],
)
def test_bad_server_addresses_are_refused(
    argv: list[str],
    env: dict[str, str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main([*argv, "health"]) == Exit.USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"agentcoord: {message}") and err.count("\n") == 1, err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == "agentcoord 0.1.0\n"


async def test_the_installed_script_reads_the_environment(server: App) -> None:
    env = {
        **os.environ,
        "AGENTCOORD_SERVER": f"127.0.0.1:{server.port}",
        "AGENTCOORD_TOKEN": ADMIN_TOKEN,
    }
    process = await asyncio.create_subprocess_exec(
        str(SCRIPT), "--json", "state", "put", "shared/from-env", '{"ok": true}',
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == Exit.OK, stderr.decode()
    assert json.loads(stdout)["state"]["json"] == {"ok": True}
