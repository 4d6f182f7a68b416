"""The dashboard in a real headless browser (Debian's chromium driven by Playwright)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from playwright.async_api import Page, async_playwright

from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from tests.server.conftest import StartServer
from tests.server.test_distribution import Stub, Worker, explicit, sub, submit

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo" / "run_demo.py"
AGENTS = ("ada", "bob", "cy", "dee")
"""The demo's agents (examples/demo/run_demo.py)."""

CHROMIUM = os.environ.get("AGENTCOORD_TEST_CHROMIUM", "/usr/bin/chromium")
"""The browser: Debian's chromium package (.ci/run installs it where it is missing)."""
SCREENSHOT = os.environ.get("AGENTCOORD_TEST_SCREENSHOT", "")
"""Where the demo test saves a screenshot of the page mid-run (docs/dashboard.png is one)."""

pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None,
    reason=f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run does it in CI)",
)


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    async with async_playwright() as driver:
        browser = await driver.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield await browser.new_page(viewport={"width": 1400, "height": 900})
        finally:
            await browser.close()


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_agents_and_subtasks_appear_live(start_server: StartServer, page: Page) -> None:
    app = await start_server(http_listen="127.0.0.1:0")
    assert app.http is not None
    await page.goto(app.http.url)
    await page.wait_for_selector("#live.on")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        registered = await discovery_grpc.DiscoveryServiceStub(channel).Register(
            discovery_pb.RegisterRequest(
                agent_id="writer-1", name="writer-1", role="writer", capabilities=["prose"]
            )
        )
        # It appears without a reload.
        await page.wait_for_selector("#agents td:text-is('writer-1')")
        worker = Worker(channel, "writer-1", registered.session_token)
        task = await submit(Stub(channel), explicit(sub("draft"), title="write the report"))
        await page.click(f"#tasks td:text-is('{task.task_id}')")
        node = "#dag .node[data-local-id='draft']"
        await page.wait_for_selector(f"{node}[data-state='ready']")
        assignment = await worker.claim()
        assert assignment is not None
        await page.wait_for_selector(f"{node}[data-state='leased']")
        assert "holder writer-1" in await page.inner_text(node)
        await worker.complete(assignment, {"pages": 3})
        await page.wait_for_selector(f"{node}[data-state='succeeded']")
        assert '"pages":3' in await page.inner_text(node)
        await page.wait_for_selector("#log td:text-is('subtask.succeeded')")


async def test_the_api_filters_the_change_log(start_server: StartServer) -> None:
    app = await start_server(http_listen="127.0.0.1:0")
    assert app.http is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = discovery_grpc.DiscoveryServiceStub(channel)
        for agent_id in ("a", "b"):
            await stub.Register(discovery_pb.RegisterRequest(agent_id=agent_id, name=agent_id))
    async with httpx.AsyncClient(base_url=app.http.url) as client:
        page = (await client.get("/")).text
        assert "assets/app.js" in page and "//" not in page.replace("https://", "")
        changes = (await client.get("/api/events", params={"agent": "b"})).json()["changes"]
        assert [(c["kind"], c["subject"]) for c in changes] == [("agent.joined", "b")]
        by_service = await client.get("/api/events", params={"service": "statesync"})
        assert by_service.json()["changes"] == []
        refused = await client.get("/api/events", params={"service": "nope"})
        assert refused.status_code == 400
        assert "service" in refused.json()["error"]["message"]
        agents = (await client.get("/api/agents")).json()["agents"]
        assert [a["agent_id"] for a in agents] == ["a", "b"]
        assert (await client.get("/api/tasks/nope")).status_code == 404


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_make_demo_against_a_running_server_shows_live(
    start_server: StartServer, page: Page
) -> None:
    """`make run` in one terminal, `AGENTCOORD_SERVER=... make demo` in another, the page open."""
    app = await start_server(http_listen="127.0.0.1:0")
    assert app.http is not None
    await page.goto(app.http.url)
    await page.wait_for_selector("#live.on")
    demo = await asyncio.create_subprocess_exec(
        sys.executable,
        str(DEMO),
        env={**os.environ, "AGENTCOORD_SERVER": f"127.0.0.1:{app.port}"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await page.click("#tasks td:text-is('release notes')", timeout=60_000)
        # Live, without a reload: the agents at work, then every sub-task done.
        await page.wait_for_selector("#dag .node[data-state='leased']", timeout=30_000)
        for agent_id in AGENTS:
            await page.wait_for_selector(f"#agents td:text-is('{agent_id}')")
        if SCREENSHOT:  # docs/dashboard.png: the killed agent's sub-task at work elsewhere
            again = "#dag .node[data-local-id='step-1'][data-state='leased']"
            await page.wait_for_selector(f"{again}:has-text('attempts 2/')", timeout=30_000)
            await page.screenshot(path=str(Path(SCREENSHOT)), full_page=True)
        done = "#dag .node[data-state='succeeded']"
        await page.wait_for_function(
            f'document.querySelectorAll("{done}").length == 4', timeout=60_000
        )
        retried = await page.inner_text("#dag .node[data-local-id='step-1']")
        assert "attempts 2/" in retried  # its first agent was killed mid-work
        output, _ = await asyncio.wait_for(demo.communicate(), 60)
    finally:
        if demo.returncode is None:
            demo.kill()
            await demo.wait()
    assert demo.returncode == 0, output.decode()
    assert "using the server at" in output.decode()
    assert "demo OK" in output.decode()
