"""`agentcoord mcp` driven by the mcp SDK's own client over stdio, against a real server.

Each MCP agent is a real `python -m agentcoord.cli mcp` process; a real agentcoord server
(SQLite) runs in the test's loop. One test speaks streamable HTTP (`--http`) instead. The
tests act as the model: they call the tools by name and read the structured results.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from agentcoord.cli.main import build_parser
from agentcoord.client import AgentcoordClient, TaskSpec
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.server.app import App
from tests.helpers import eventually
from tests.server import conftest as server_fixtures
from tests.server.conftest import StartServer

start_server = server_fixtures.start_server
pytestmark = pytest.mark.timeout(120)
ADMIN = "admin-secret"
"""The server's admin token: the test cancels tasks it did not submit."""

TOOLS = {
    "list_agents",
    "get_summary",
    "analyze_task",
    "submit_task",
    "get_task",
    "wait_task",
    "claim_subtask",
    "complete_subtask",
    "fail_subtask",
    "get_state",
    "put_state",
    "update_state",
    "list_state",
    "list_events",
}
"""The tool names issue 13 fixes."""


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """SQLite only: the MCP server is a client; the stores are tested elsewhere."""
    return f"sqlite:///{tmp_path / 'agentcoord.db'}"


@pytest.fixture
async def app(start_server: StartServer) -> App:
    return await start_server(admin_token=ADMIN)


@pytest.fixture
def address(app: App) -> str:
    return f"127.0.0.1:{app.port}"


class Model:
    """One MCP session, used the way a model uses it: tools by name, structured results."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session

    async def call(self, tool: str, **arguments: Any) -> Any:
        result = await self.session.call_tool(tool, arguments)
        assert not result.is_error, f"{tool} failed: {result.content}"
        return result.structured_content

    async def refused(self, tool: str, **arguments: Any) -> str:
        result = await self.session.call_tool(tool, arguments)
        assert result.is_error, f"{tool} succeeded: {result.structured_content}"
        text = result.content[0]
        assert text.type == "text"
        return text.text


@contextlib.asynccontextmanager
async def mcp_agent(address: str, log: Path, agent_id: str, *flags: str) -> AsyncIterator[Model]:
    """Start `agentcoord mcp` as ``agent_id`` and connect to it over stdio."""
    command = ["-m", "agentcoord.cli", "mcp", "--server", address, "--agent-id", agent_id]
    params = StdioServerParameters(command=sys.executable, args=[*command, *flags])
    with log.open("a") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            yield Model(session)


@pytest.fixture
async def admin(address: str) -> AsyncIterator[AgentcoordClient]:
    async with AgentcoordClient(address, token=ADMIN) as client:
        yield client


async def agent_state(client: AgentcoordClient, agent_id: str) -> discovery_pb.Agent:
    response = await client.discovery.get_agent(discovery_pb.GetAgentRequest(agent_id=agent_id))
    return response.agent


async def work_until_done(model: Model, planner: Model, task_id: str) -> list[dict[str, Any]]:
    """Claim and complete sub-tasks until the task has ended; return what was claimed."""
    claimed = []
    while True:
        offer = (await model.call("claim_subtask", wait_seconds=1))["subtask"]
        if offer is None:
            task = await planner.call("get_task", task_id=task_id)
            if task["state"] not in ("PENDING", "RUNNING"):
                return claimed
            continue
        claimed.append(offer)
        deps = offer["dependency_results"]
        result = {"done": offer["local_id"], "from": sorted(deps)}
        report = await model.call("complete_subtask", subtask_id=offer["subtask_id"], result=result)
        assert report["subtask_state"] == "SUCCEEDED"


async def test_the_tools_have_the_agreed_names_descriptions_and_schemas(
    address: str, tmp_path: Path
) -> None:
    async with mcp_agent(address, tmp_path / "mcp.log", "lister") as model:
        tools = (await model.session.list_tools()).tools
        assert {tool.name for tool in tools} == TOOLS
        for tool in tools:
            assert tool.description and "\n" not in tool.description, tool.name
            assert tool.input_schema["type"] == "object", tool.name
            assert tool.output_schema is not None, tool.name
        templates = (await model.session.list_resource_templates()).resource_templates
        assert {t.uri_template for t in templates} == {
            "agentcoord://tasks/{task_id}",
            "agentcoord://state/{+key}",
        }
        resources = (await model.session.list_resources()).resources
        assert [str(r.uri) for r in resources] == ["agentcoord://agents"]


async def test_two_agents_and_a_planner_finish_a_task_with_a_dependency(
    address: str, admin: AgentcoordClient, tmp_path: Path
) -> None:
    log = tmp_path / "mcp.log"
    async with (
        mcp_agent(address, log, "ada", "--capabilities", "code", "--role", "worker") as ada,
        mcp_agent(address, log, "bob", "--capabilities", "code", "--role", "worker") as bob,
        mcp_agent(address, log, "pat", "--role", "planner") as planner,
    ):
        summary = await planner.call("get_summary")
        assert summary["live_agents"] == 3
        assert summary["live_agents_by_capability"] == {"code": 2}
        workers = await planner.call("list_agents", capabilities=["code"])
        assert sorted(a["agent_id"] for a in workers["agents"]) == ["ada", "bob"]

        spec = {
            "title": "ship it",
            "capabilities": ["code"],
            "subtasks": [
                {"local_id": "api", "input": {"part": "api"}},
                {"local_id": "ui", "input": {"part": "ui"}},
                {"local_id": "release", "depends_on": ["api", "ui"]},
            ],
        }
        plan = await planner.call("analyze_task", task=spec)
        assert plan["parallelizable"] is True
        task = await planner.call("submit_task", task=spec)
        task_id = task["task_id"]

        done = await asyncio.gather(
            work_until_done(ada, planner, task_id), work_until_done(bob, planner, task_id)
        )
        finished = await planner.call("wait_task", task_id=task_id, timeout_seconds=30)

    assert finished["finished"] is True
    assert finished["task"]["state"] == "SUCCEEDED"
    assert finished["task"]["result"] == {
        "api": {"done": "api", "from": []},
        "ui": {"done": "ui", "from": []},
        "release": {"done": "release", "from": ["api", "ui"]},
    }
    claims = {offer["local_id"]: offer for offer in [*done[0], *done[1]]}
    assert set(claims) == {"api", "ui", "release"}
    release = claims["release"]
    assert release["depends_on"] == ["api", "ui"]
    assert release["dependency_results"] == {
        "api": {"done": "api", "from": []},
        "ui": {"done": "ui", "from": []},
    }
    assert claims["api"]["input"] == {"part": "api"}
    # Leaving deregistered every agent.
    for agent_id in ("ada", "bob", "pat"):
        assert (await agent_state(admin, agent_id)).state == discovery_pb.Agent.STATE_LEFT


async def test_a_completion_after_the_lease_was_lost_is_a_tool_error(
    address: str, admin: AgentcoordClient, tmp_path: Path
) -> None:
    async with mcp_agent(address, tmp_path / "mcp.log", "late") as model:
        task = await model.call("submit_task", task={"title": "doomed"})
        offer = (await model.call("claim_subtask", wait_seconds=10))["subtask"]
        assert offer is not None
        await admin.tasks.cancel(task["task_id"], "changed my mind")

        message = await model.refused(
            "complete_subtask", subtask_id=offer["subtask_id"], result="too late"
        )
        assert "lease" in message and "was lost" in message
        current = await model.call("get_task", task_id=task["task_id"])
        assert current["subtasks"][0]["state"] == "CANCELLED"
        assert current["subtasks"][0]["result"] is None

        unknown = await model.refused("complete_subtask", subtask_id="nope", result=1)
        assert "claim_subtask first" in unknown


async def test_state_written_by_one_agent_is_read_by_the_other(
    address: str, tmp_path: Path
) -> None:
    log = tmp_path / "mcp.log"
    async with (
        mcp_agent(address, log, "writer") as writer,
        mcp_agent(address, log, "reader") as reader,
    ):
        written = await writer.call("put_state", key="shared/plan", value={"step": 1})
        assert written["version"] == 1
        read = await reader.call("get_state", key="shared/plan")
        assert read["entry"]["value"] == {"step": 1}
        assert read["entry"]["agent_id"] == "writer"

        updated = await reader.call(
            "put_state", key="shared/plan", value={"step": 2}, expected_version=1
        )
        assert updated["version"] == 2
        conflict = await writer.refused(  # the writer still thinks it is at version 1
            "put_state", key="shared/plan", value={"step": 3}, expected_version=1
        )
        assert conflict == (  # as docs/mcp.md shows it
            "Error executing tool put_state: ABORTED: key 'shared/plan': expected version 1, "
            "current version 2 (reason VERSION_MISMATCH)"
        )

        listed = await writer.call("list_state", prefix="shared/")
        assert [e["key"] for e in listed["entries"]] == ["shared/plan"]
        assert (await reader.call("get_state", key="shared/none"))["entry"] is None
        events = await reader.call("list_events", agent_id="writer")
        assert [e["kind"] for e in events["events"]][-1] == "state.put"
        resource = await reader.session.read_resource("agentcoord://state/shared/plan")
        assert '"step": 2' in resource.contents[0].text  # type: ignore[union-attr]

        denied = await writer.refused("put_state", key="agents/reader/x", value=1)
        assert "PERMISSION_DENIED" in denied
        missing = await writer.refused("get_task", task_id="no-such-task")
        assert "NOT_FOUND" in missing or "INVALID_ARGUMENT" in missing


async def test_update_state_changes_a_key_atomically_for_agents_writing_at_once(
    address: str, tmp_path: Path
) -> None:
    log = tmp_path / "mcp.log"
    async with (
        mcp_agent(address, log, "ann") as ann,
        mcp_agent(address, log, "ben") as ben,
    ):

        async def count(model: Model, name: str) -> None:
            for _ in range(5):
                await model.call("update_state", key="shared/done", operation="increment")
                await model.call("update_state", key="shared/log", operation="append", items=[name])

        await asyncio.gather(count(ann, "ann"), count(ben, "ben"))  # no update is lost
        done = (await ann.call("get_state", key="shared/done"))["entry"]
        assert (done["value"], done["version"]) == (10, 10)
        log_value = (await ben.call("get_state", key="shared/log"))["entry"]["value"]
        assert sorted(log_value) == ["ann"] * 5 + ["ben"] * 5

        halved = await ann.call("update_state", key="shared/done", operation="increment", by=-5)
        assert (halved["value"], halved["agent_id"]) == (5, "ann")
        tags = await ann.call(
            "update_state", key="shared/tags", operation="add_to_set", items=["a", "b", "a"]
        )
        assert tags["value"] == ["a", "b"]
        tags = await ben.call(
            "update_state", key="shared/tags", operation="remove_from_set", items=["a"]
        )
        assert tags["value"] == ["b"]
        await ann.call("put_state", key="shared/plan", value={"step": 1, "owner": "ann"})
        merged = await ben.call(
            "update_state",
            key="shared/plan",
            operation="merge_patch",
            patch={"step": 2, "owner": None, "notes": {"ben": "ok"}},
        )
        assert merged["value"] == {"step": 2, "notes": {"ben": "ok"}}

        await ann.call("put_state", key="shared/name", value="not a number")
        mismatch = await ann.refused("update_state", key="shared/name", operation="increment")
        assert mismatch.startswith("Error executing tool update_state: FAILED_PRECONDITION: ")
        assert "(reason VALUE_TYPE_MISMATCH)" in mismatch
        denied = await ben.refused(
            "update_state", key="agents/ann/x", operation="append", items=[1]
        )
        assert "PERMISSION_DENIED" in denied
        assert "append needs items" in await ann.refused(
            "update_state", key="shared/log", operation="append"
        )
        assert "increment does not take items" in await ann.refused(
            "update_state", key="shared/done", operation="increment", items=[1]
        )


async def test_heartbeats_keep_the_agent_and_its_lease_through_a_long_pause(
    address: str, admin: AgentcoordClient, tmp_path: Path
) -> None:
    async with mcp_agent(address, tmp_path / "mcp.log", "thinker", "--ttl", "3") as model:
        task = await model.call("submit_task", task={"title": "think", "lease_ttl_seconds": 3})
        offer = (await model.call("claim_subtask", wait_seconds=10))["subtask"]
        epoch = (await agent_state(admin, "thinker")).epoch

        await asyncio.sleep(10)  # the model thinks: no tool call for over three TTLs

        agent = await agent_state(admin, "thinker")
        assert agent.state == discovery_pb.Agent.STATE_LIVE
        assert agent.epoch == epoch  # the same session, not a re-registration
        report = await model.call("complete_subtask", subtask_id=offer["subtask_id"], result=42)
        assert report["task_state"] == "SUCCEEDED"
        done = await model.call("wait_task", task_id=task["task_id"], timeout_seconds=10)
        assert done["task"]["result"] == {offer["local_id"]: 42}


async def test_the_agent_deregisters_when_the_host_hangs_up(
    address: str, admin: AgentcoordClient, tmp_path: Path
) -> None:
    async with mcp_agent(address, tmp_path / "mcp.log", "brief") as model:
        agents = await model.call("list_agents")
        assert [a["agent_id"] for a in agents["agents"]] == ["brief"]

    async def left() -> bool:
        return (await agent_state(admin, "brief")).state == discovery_pb.Agent.STATE_LEFT

    await eventually(left)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_streamable_http_serves_the_same_tools_to_the_sdk_client(
    address: str, admin: AgentcoordClient, tmp_path: Path
) -> None:
    port = free_port()
    command = ["-m", "agentcoord.cli", "mcp", "--server", address, "--agent-id", "web"]
    with (tmp_path / "mcp.log").open("a") as errlog:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *command, "--http", f"127.0.0.1:{port}", stderr=errlog
        )
        try:

            async def listening() -> bool:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    return False
                writer.close()
                return True

            await eventually(listening, timeout=30)
            async with (
                streamable_http_client(f"http://127.0.0.1:{port}/mcp") as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                model = Model(session)
                assert {t.name for t in (await session.list_tools()).tools} == TOOLS
                task = await model.call("submit_task", task={"title": "over http"})
                offer = (await model.call("claim_subtask", wait_seconds=10))["subtask"]
                assert offer["task_id"] == task["task_id"]
                report = await model.call(
                    "complete_subtask", subtask_id=offer["subtask_id"], result="web"
                )
                assert report["task_state"] == "SUCCEEDED"
            assert (await agent_state(admin, "web")).state == discovery_pb.Agent.STATE_LIVE
        finally:
            process.terminate()  # SIGTERM: the server deregisters and exits cleanly
            assert await process.wait() == 0
    assert (await agent_state(admin, "web")).state == discovery_pb.Agent.STATE_LEFT


MCP_MD = Path(__file__).resolve().parents[2] / "docs" / "mcp.md"


def host_entry() -> dict[str, Any]:
    """Return the one server entry of the host configuration (``mcpServers``) in docs/mcp.md."""
    text = MCP_MD.read_text()
    config = json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))  # type: ignore[union-attr]
    (server,) = config["mcpServers"].values()
    return cast(dict[str, Any], server)


async def test_the_host_configuration_of_docs_mcp_md_runs_an_agent_that_completes_work(
    start_server: StartServer, tmp_path: Path
) -> None:
    """What an MCP host does with the documented entry; only the server address differs."""
    entry = host_entry()
    app = await start_server(admin_token=ADMIN, join_token=entry["env"]["AGENTCOORD_JOIN_TOKEN"])
    args = list(entry["args"])
    args[args.index("--server") + 1] = f"127.0.0.1:{app.port}"  # the docs' is `make run`'s
    # The host finds the command on its PATH: the console script of this environment.
    command = shutil.which(entry["command"], path=str(Path(sys.executable).parent))
    assert command is not None
    params = StdioServerParameters(command=command, args=args, env=entry["env"])
    async with AgentcoordClient(f"127.0.0.1:{app.port}", token=ADMIN) as admin:
        with (tmp_path / "mcp.log").open("a") as errlog:
            async with (
                stdio_client(params, errlog=errlog) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                model = Model(session)
                task = await admin.tasks.submit(
                    TaskSpec("review", capabilities=["review"], input={"diff": "+x"})
                )
                offer = (await model.call("claim_subtask", wait_seconds=10))["subtask"]
                assert offer is not None and offer["input"] == {"diff": "+x"}
                await model.call(
                    "complete_subtask", subtask_id=offer["subtask_id"], result={"ok": True}
                )
                assert await admin.tasks.result(task.task_id, timeout=10) == {"main": {"ok": True}}
        assert (await agent_state(admin, "assistant-1")).state == discovery_pb.Agent.STATE_LEFT


def test_docs_mcp_md_shows_a_host_configuration_that_parses_and_every_tool() -> None:
    text = MCP_MD.read_text()
    server = host_entry()
    assert server["command"] == "agentcoord"
    args = build_parser().parse_args(server["args"])
    assert (args.command, args.agent_id, args.capabilities) == (
        "mcp",
        "assistant-1",
        "python,review",
    )
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", text, re.M))
    assert documented == TOOLS
    uris = set(re.findall(r"^\| `(agentcoord://[^`]+)` \|", text, re.M))
    assert uris == {
        "agentcoord://agents",
        "agentcoord://tasks/{task_id}",
        "agentcoord://state/{key}",
    }


async def test_the_agent_registers_the_a2a_card_given_with_card(
    address: str, admin: AgentcoordClient, tmp_path: Path
) -> None:
    card = {
        "name": "Reviewer",
        "description": "Reviews diffs.",
        "version": "0.3.1",
        "provider": {"organization": "Example Labs", "url": "https://example.org"},
        "supportedInterfaces": [{"url": "https://example.org/a2a", "protocolBinding": "JSONRPC"}],
        "skills": [
            {
                "id": "code-review",
                "name": "Code review",
                "description": "Finds bugs in a diff.",
                "tags": ["python"],
                "examples": ["Review this patch"],
                "inputModes": ["text/x-diff"],
                "outputModes": ["text/markdown"],
            }
        ],
    }
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card))
    async with mcp_agent(address, tmp_path / "mcp.log", "carded", "--card", str(path)) as model:
        found = await model.call("list_agents", skills=["python"])
        assert [(a["agent_id"], a["name"], a["skills"]) for a in found["agents"]] == [
            ("carded", "Reviewer", ["code-review"])
        ]
        assert (await model.call("list_agents", skills=["cooking"]))["agents"] == []
        summary = await model.call("get_summary")
        assert summary["live_agents_by_skill"] == {"code-review": 1}
        assert summary["live_agents_by_skill_tag"] == {"python": 1}
        agent = await agent_state(admin, "carded")
    assert (agent.description, agent.version, agent.a2a_url) == (
        "Reviews diffs.",
        "0.3.1",
        "https://example.org/a2a",
    )
    assert agent.provider.organization == "Example Labs"
    (skill,) = agent.skills
    assert (list(skill.examples), list(skill.input_modes), list(skill.output_modes)) == (
        ["Review this patch"],
        ["text/x-diff"],
        ["text/markdown"],
    )


async def test_a_task_requiring_a_skill_goes_to_the_agent_whose_card_has_it(
    address: str, tmp_path: Path
) -> None:
    card = {"name": "Reviewer", "skills": [{"id": "code-review", "name": "Review", "tags": ["py"]}]}
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card))
    log = tmp_path / "mcp.log"
    async with (
        mcp_agent(address, log, "plain") as plain,
        mcp_agent(address, log, "reviewer", "--card", str(path)) as reviewer,
    ):
        spec = {"title": "review", "skills": ["py"], "subtasks": [{"local_id": "diff"}]}
        task = await plain.call("submit_task", task=spec)
        (waiting,) = task["subtasks"]
        assert (waiting["state"], waiting["skills"]) == ("READY", ["py"])
        assert (await plain.call("claim_subtask", wait_seconds=0))["subtask"] is None
        offer = (await reviewer.call("claim_subtask", wait_seconds=10))["subtask"]
        assert offer is not None and offer["local_id"] == "diff"
