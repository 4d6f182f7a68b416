"""The live registry served as A2A agent cards on the HTTP listener, read by a2a-sdk.

Real servers on both stores; cards are parsed strictly into a2a-sdk's AgentCard type (an
unknown or mistyped field fails) and fetched with its own A2ACardResolver.
"""

from __future__ import annotations

import grpc
import httpx
from a2a.client import A2ACardResolver
from a2a.types import AgentCard
from google.protobuf import json_format

from agentcoord.discovery.v1 import discovery_service_pb2 as pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as pb_grpc
from agentcoord.server.a2a import LIVENESS_EXTENSION
from tests.helpers import bearer
from tests.server.conftest import StartServer
from tests.server.test_agent_cards import REVIEW, TRANSLATE, card_request


def parsed(card: dict[str, object]) -> AgentCard:
    return json_format.ParseDict(card, AgentCard())


async def test_live_agents_are_served_as_a2a_cards_with_liveness_and_load(
    start_server: StartServer,
) -> None:
    app = await start_server(http_listen="127.0.0.1:0")
    assert app.http is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        discovery = pb_grpc.DiscoveryServiceStub(channel)
        reviewer = await discovery.Register(card_request("reviewer", REVIEW))
        await discovery.Register(card_request("polyglot", REVIEW, TRANSLATE))
        await discovery.Register(pb.RegisterRequest(agent_id="plain", name="Plain", capacity=2))
        gone = await discovery.Register(pb.RegisterRequest(agent_id="gone", name="Gone"))
        await discovery.Deregister(
            pb.DeregisterRequest(agent_id="gone"), metadata=bearer(gone.session_token)
        )
        beat = discovery.Heartbeat(metadata=bearer(reviewer.session_token))
        await beat.write(pb.HeartbeatRequest(agent_id="reviewer", load=pb.Load(active_subtasks=1)))
        await beat.read()
        beat.cancel()

        async with httpx.AsyncClient(base_url=app.http.url) as http:
            listing = (await http.get("/a2a/agents")).json()["agents"]
            cards = [parsed(card) for card in listing]
            # Live agents only, by agent id; "gone" left.
            assert [card.name for card in cards] == ["Plain", "Agent polyglot", "Agent reviewer"]

            resolver = A2ACardResolver(http, f"{app.http.url}a2a/agents/reviewer")
            card = await resolver.get_agent_card()
            assert card.name == "Agent reviewer"
            assert card.description == "reviewer does what its skills say."
            assert card.version == "1.2.0"
            assert (card.provider.organization, card.provider.url) == (
                "Example Labs",
                "https://example.org",
            )
            assert [i.url for i in card.supported_interfaces] == [
                "https://agents.example.org/reviewer/a2a"
            ]
            (skill,) = card.skills
            assert (skill.id, list(skill.tags), list(skill.examples)) == (
                "code-review",
                ["python", "review"],
                ["Review this patch", "Is this function thread-safe?"],
            )
            assert list(skill.input_modes) == ["text/x-diff", "text/plain"]
            assert list(skill.output_modes) == ["text/markdown"]
            (extension,) = card.capabilities.extensions
            assert extension.uri == LIVENESS_EXTENSION
            facts = json_format.MessageToDict(extension.params)
            assert facts["state"] == "LIVE" and facts["agentId"] == "reviewer"
            assert facts["activeSubtasks"] == 1 and facts["load"] == 1.0
            assert facts["ttlRemainingSeconds"] > 0

            assert (await http.get("/a2a/agents/plain")).status_code == 200
            for missing, reason in [("gone", "AGENT_NOT_LIVE"), ("nobody", "AGENT_NOT_FOUND")]:
                answer = await http.get(f"/a2a/agents/{missing}")
                assert answer.status_code == 404
                assert answer.json()["error"]["reason"] == reason
