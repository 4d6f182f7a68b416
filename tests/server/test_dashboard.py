"""The dashboard in a real headless browser (Debian's chromium driven by Playwright)."""

from __future__ import annotations

import os
import shutil
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

CHROMIUM = os.environ.get("AGENTCOORD_TEST_CHROMIUM", "/usr/bin/chromium")
"""The browser: Debian's chromium package (.ci/run installs it where it is missing)."""
SCREENSHOT = os.environ.get("AGENTCOORD_TEST_SCREENSHOT", "")
"""Where to save a screenshot of the page at the end (docs/dashboard.png is one)."""

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
        if SCREENSHOT:
            await page.screenshot(path=str(Path(SCREENSHOT)), full_page=True)


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
