"""The dashboard at ``/``: static assets from this package and a small read-only JSON API.

The page (``dashboard/index.html``, ``app.js``, ``style.css``: plain HTML, CSS and JS, no
library, nothing fetched from elsewhere) reads ``/api/*`` and follows ``/api/stream``, a
server-sent event stream fed by the server's own change feed, so it updates without a
reload. Everything here reads; the HTTP listener's token rules guard it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from agentcoord.core.changes import ChangeFeed, WatchBatch
from agentcoord.core.clock import Clock
from agentcoord.core.discovery import AgentQuery, Discovery
from agentcoord.core.errors import InvalidInput
from agentcoord.core.models import AgentState, Change, ChangeFilter, Service
from agentcoord.core.store import Store
from agentcoord.core.tasks import TaskFilter

ASSETS = Path(__file__).resolve().parent / "dashboard"
"""The page's files."""
RECENT = timedelta(hours=1)
"""Agents that expired or left are shown this long after their last heartbeat."""
PAGE = 200
"""Agents, tasks or changes one API call returns at most."""


def change_json(change: Change) -> dict[str, Any]:
    """Return a change as the page reads it."""
    return {
        "revision": change.revision,
        "time": change.time.isoformat(),
        "service": change.service.value,
        "kind": change.kind,
        "subject": change.subject,
        "agent_id": change.agent_id,
        "details": change.details,
    }


class Dashboard:
    """The page's routes over one server's cores, store and change feed."""

    def __init__(
        self,
        store: Store,
        feed: ChangeFeed,
        clock: Clock,
        discovery: Discovery | None,
        closing: asyncio.Event,
    ) -> None:
        """Read from these; event streams end when ``closing`` is set."""
        self._store = store
        self._feed = feed
        self._clock = clock
        self._discovery = discovery
        self._closing = closing

    def routes(self) -> list[BaseRoute]:
        """``/``, its assets and ``/api/*``."""
        return [
            Route("/", self._index, methods=["GET"]),
            Mount("/assets", StaticFiles(directory=ASSETS)),
            Route("/api/agents", self._agents, methods=["GET"]),
            Route("/api/tasks", self._tasks, methods=["GET"]),
            Route("/api/tasks/{task_id}", self._task, methods=["GET"]),
            Route("/api/events", self._events, methods=["GET"]),
            Route("/api/stream", self._stream, methods=["GET"]),
        ]

    async def _index(self, request: Request) -> Response:
        return FileResponse(ASSETS / "index.html")

    async def _agents(self, request: Request) -> Response:
        if self._discovery is None:
            return JSONResponse({"agents": []})
        views, _ = self._discovery.list_agents(
            AgentQuery(states=frozenset(AgentState)), after_agent_id="", limit=10 * PAGE
        )
        since = self._clock.now() - RECENT
        agents = [
            {**view.agent.to_snapshot(), "ttl_remaining": view.ttl_remaining}
            for view in views
            if view.agent.state is AgentState.LIVE
            or (view.agent.last_heartbeat_time or since) >= since
        ]
        return JSONResponse({"agents": agents[:PAGE]})

    async def _tasks(self, request: Request) -> Response:
        tasks = await self._store.list_tasks(TaskFilter(), None, PAGE)
        return JSONResponse({"tasks": [task.to_snapshot() for task in tasks]})

    async def _task(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        task = await self._store.get_task(task_id)
        if task is None:
            return JSONResponse({"error": {"message": f"no task {task_id!r}"}}, status_code=404)
        subtasks = await self._store.list_subtasks(task_id)
        return JSONResponse(
            {"task": task.to_snapshot(), "subtasks": [s.to_snapshot() for s in subtasks]}
        )

    async def _events(self, request: Request) -> Response:
        try:
            where, after = _change_filter(request)
        except InvalidInput as error:
            return JSONResponse({"error": {"message": error.message}}, status_code=400)
        # Newest last: read forward from far enough back for one page.
        current = await self._store.current_revision()
        start = after if after else max(current - 20 * PAGE, 0)
        changes = await self._store.list_changes(start, 20 * PAGE, where)
        return JSONResponse({"changes": [change_json(c) for c in changes[-PAGE:]]})

    async def _stream(self, request: Request) -> Response:
        return StreamingResponse(self._sse(), media_type="text/event-stream")

    async def _sse(self) -> AsyncIterator[str]:
        closing = asyncio.ensure_future(self._closing.wait())
        # ChangeFeed.watch is an async generator: closing it unregisters the watcher.
        watch = cast(AsyncGenerator[WatchBatch, None], self._feed.watch(0, lambda change: True))
        try:
            while True:
                batch = asyncio.ensure_future(watch.__anext__())
                done, _ = await asyncio.wait({batch, closing}, return_when="FIRST_COMPLETED")
                if batch not in done:
                    batch.cancel()
                    return
                changes = [change_json(change) for change in batch.result().changes]
                yield f"data: {json.dumps(changes, default=str)}\n\n"
        finally:
            closing.cancel()
            await watch.aclose()


def _change_filter(request: Request) -> tuple[ChangeFilter, int]:
    """The ``agent``, ``service``, ``kind``, ``subject``, ``since`` and ``after`` parameters.

    Raises:
        InvalidInput: naming the parameter that does not parse.
    """
    query = request.query_params
    service = None
    if query.get("service"):
        try:
            service = Service(query["service"])
        except ValueError:
            raise InvalidInput("service", "choose discovery, distribution or statesync") from None
    since = None
    if query.get("since"):
        try:
            since = datetime.fromisoformat(query["since"])
        except ValueError:
            raise InvalidInput("since", "not an ISO 8601 time") from None
        if since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
    after = query.get("after", "0")
    if not after.isdigit():
        raise InvalidInput("after", "not a revision")
    where = ChangeFilter(
        service=service,
        kind=query.get("kind", ""),
        subject=query.get("subject", ""),
        agent_id=query.get("agent", ""),
        start_time=since,
    )
    return where, int(after)
