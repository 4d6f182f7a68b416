"""The live registry as A2A agent cards, on the HTTP listener (``--http-listen``).

A2A leaves registries to others; Discovery already knows who is live, how loaded and what
they can do, so it serves each live agent's card for A2A clients that discover peers:

- ``GET /a2a/agents``: ``{"agents": [card, ...]}``, every live agent by agent id;
- ``GET /a2a/agents/{agent_id}`` and ``.../{agent_id}/.well-known/agent-card.json`` (the
  path A2A clients resolve under a base URL): one live agent's card, 404 otherwise.

A card says what the agent registered (name, description, version, provider, skills, its
own A2A URL as ``supportedInterfaces`` when it serves one) and carries the registry's
facts, liveness and load, as the extension :data:`LIVENESS_EXTENSION` in
``capabilities.extensions``.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from agentcoord.core.discovery import AgentQuery, AgentView, Discovery
from agentcoord.core.errors import NotFound
from agentcoord.core.models import AgentState

LIVENESS_EXTENSION = "urn:agentcoord:a2a:liveness:v1"
"""URI of the card extension that carries an agent's liveness and load."""
DEFAULT_MODES = ["text/plain"]
"""Media types a card declares when its skills name none (A2A requires some)."""
PAGE = 1000
"""Agents read from Discovery at a time for the listing."""


def routes(discovery: Discovery) -> list[BaseRoute]:
    """Return the A2A routes reading ``discovery``'s live registry."""

    async def listing(request: Request) -> Response:
        cards: list[dict[str, Any]] = []
        after = ""
        while True:
            views, after = discovery.list_agents(AgentQuery(), after_agent_id=after, limit=PAGE)
            cards.extend(agent_card(view) for view in views)
            if not after:
                return JSONResponse({"agents": cards})

    async def one(request: Request) -> Response:
        agent_id = request.path_params["agent_id"]
        try:
            view = await discovery.get_agent(agent_id)
        except NotFound as error:
            return _error(404, error.reason, error.message)
        if view.agent.state is not AgentState.LIVE:
            return _error(404, "AGENT_NOT_LIVE", f"agent {agent_id!r} is not live: it has no card")
        return JSONResponse(agent_card(view))

    return [
        Route("/a2a/agents", listing, methods=["GET"]),
        Route("/a2a/agents/{agent_id}", one, methods=["GET"]),
        Route("/a2a/agents/{agent_id}/.well-known/agent-card.json", one, methods=["GET"]),
    ]


def agent_card(view: AgentView) -> dict[str, Any]:
    """Return the A2A AgentCard (JSON, camelCase as A2A writes it) of a registered agent."""
    agent, card = view.agent, view.agent.card
    skills = [
        {
            "id": skill.id,
            "name": skill.name,
            "description": skill.description or skill.name,
            "tags": list(skill.tags),
            "examples": list(skill.examples),
            "inputModes": list(skill.input_modes),
            "outputModes": list(skill.output_modes),
        }
        for skill in agent.skills
    ]
    result: dict[str, Any] = {
        "name": agent.name,
        "description": card.description or agent.name,
        "version": card.version or "0",
        "capabilities": {
            "extensions": [
                {
                    "uri": LIVENESS_EXTENSION,
                    "description": "Liveness and load of the agent in the agentcoord registry.",
                    "params": {
                        "agentId": agent.agent_id,
                        "state": agent.state.name,
                        "status": agent.status.name,
                        "role": agent.role,
                        "capabilities": list(agent.capabilities),
                        "capacity": agent.capacity,
                        "activeSubtasks": agent.active_subtasks,
                        "load": agent.active_subtasks / agent.capacity,
                        "ttlRemainingSeconds": round(view.ttl_remaining, 3),
                        "epoch": agent.epoch,
                        "lastHeartbeatTime": _iso(agent.last_heartbeat_time),
                    },
                }
            ]
        },
        "defaultInputModes": DEFAULT_MODES,
        "defaultOutputModes": DEFAULT_MODES,
        "skills": skills,
    }
    if card.provider_organization:
        result["provider"] = {"organization": card.provider_organization, "url": card.provider_url}
    if card.a2a_url:
        result["supportedInterfaces"] = [
            {"url": card.a2a_url, "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}
        ]
    return result


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def _error(status: int, reason: str, message: str) -> Response:
    return JSONResponse(
        {"error": {"status": status, "reason": reason, "message": message}}, status_code=status
    )
