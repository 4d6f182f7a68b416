"""A2A agent cards in Discovery: Register keeps them, ListAgents and GetSummary use skills.

Real servers and stubs on both stores; a restart reads the card back from the store.
"""

from __future__ import annotations

import grpc
import pytest

from agentcoord.discovery.v1 import discovery_service_pb2 as pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as pb_grpc
from agentcoord.server.app import App
from tests.helpers import field_violations
from tests.server.conftest import StartServer

REVIEW = pb.Skill(
    id="code-review",
    name="Code review",
    description="Reviews a diff for bugs and style.",
    tags=["python", "review"],
    examples=["Review this patch", "Is this function thread-safe?"],
    input_modes=["text/x-diff", "text/plain"],
    output_modes=["text/markdown"],
)
TRANSLATE = pb.Skill(id="translate", name="Translate", tags=["language"])


def card_request(agent_id: str, *skills: pb.Skill) -> pb.RegisterRequest:
    return pb.RegisterRequest(
        agent_id=agent_id,
        name=f"Agent {agent_id}",
        description=f"{agent_id} does what its skills say.",
        version="1.2.0",
        provider=pb.Provider(organization="Example Labs", url="https://example.org"),
        a2a_url=f"https://agents.example.org/{agent_id}/a2a",
        skills=skills,
    )


def stub(app: App) -> pb_grpc.DiscoveryServiceStub:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return pb_grpc.DiscoveryServiceStub(channel)


async def ids(discovery: pb_grpc.DiscoveryServiceStub, **filters: object) -> list[str]:
    response = await discovery.ListAgents(pb.ListAgentsRequest(**filters))  # type: ignore[arg-type]
    return [agent.agent_id for agent in response.agents]


async def test_the_card_is_kept_listed_by_skill_counted_and_survives_a_restart(
    start_server: StartServer,
) -> None:
    app = await start_server()
    discovery = stub(app)
    await discovery.Register(card_request("reviewer", REVIEW))
    await discovery.Register(card_request("polyglot", REVIEW, TRANSLATE))
    await discovery.Register(pb.RegisterRequest(agent_id="plain", name="no card"))

    agent = (await discovery.GetAgent(pb.GetAgentRequest(agent_id="reviewer"))).agent
    assert agent.description == "reviewer does what its skills say."
    assert agent.version == "1.2.0"
    assert agent.provider == pb.Provider(organization="Example Labs", url="https://example.org")
    assert agent.a2a_url == "https://agents.example.org/reviewer/a2a"
    assert list(agent.skills) == [REVIEW]
    plain = (await discovery.GetAgent(pb.GetAgentRequest(agent_id="plain"))).agent
    assert not plain.HasField("provider") and plain.description == ""

    assert await ids(discovery, skills=["code-review"]) == ["polyglot", "reviewer"]
    assert await ids(discovery, skills=["language"]) == ["polyglot"]  # a tag
    assert await ids(discovery, skills=["review", "translate"]) == ["polyglot"]  # each of
    assert await ids(discovery, skills=["cooking"]) == []
    page = await discovery.ListAgents(pb.ListAgentsRequest(skills=["python"], page_size=1))
    rest = await discovery.ListAgents(
        pb.ListAgentsRequest(skills=["python"], page_token=page.next_page_token)
    )
    assert [a.agent_id for a in [*page.agents, *rest.agents]] == ["polyglot", "reviewer"]

    summary = await discovery.GetSummary(pb.GetSummaryRequest())
    assert dict(summary.live_agents_by_skill) == {"code-review": 2, "translate": 1}
    assert dict(summary.live_agents_by_skill_tag) == {"python": 2, "review": 2, "language": 1}

    await app.stop(0)
    again = stub(await start_server())
    restored = (await again.GetAgent(pb.GetAgentRequest(agent_id="reviewer"))).agent
    assert (restored.description, restored.version, restored.a2a_url) == (
        agent.description,
        agent.version,
        agent.a2a_url,
    )
    assert restored.provider == agent.provider
    assert list(restored.skills) == [REVIEW]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"a2a_url": "ftp://x.example/a2a"}, "a2a_url"),
        ({"a2a_url": "/relative"}, "a2a_url"),
        ({"provider": pb.Provider(organization="")}, "provider.organization"),
        ({"provider": pb.Provider(organization="o", url="nope")}, "provider.url"),
        ({"version": "v" * 65}, "version"),
        ({"description": "d" * 4097}, "description"),
        ({"skills": [pb.Skill(id="s", name="S", examples=[""])]}, "skills[0].examples[0]"),
        ({"skills": [pb.Skill(id="s", name="S", input_modes=["m"] * 17)]}, "skills[0].input_modes"),
        ({"skills": [pb.Skill(id="s", name="S", output_modes=[""])]}, "skills[0].output_modes[0]"),
    ],
)
async def test_a_bad_card_field_is_named(
    start_server: StartServer, change: dict[str, object], field: str
) -> None:
    discovery = stub(await start_server())
    request = card_request("bad")
    for name, value in change.items():
        if name == "skills":
            request.skills.extend(value)  # type: ignore[arg-type]
        elif name == "provider":
            request.provider.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(request, name, value)
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await discovery.Register(request)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(invalid.value) == [field]


async def test_a_bad_skill_filter_is_named(start_server: StartServer) -> None:
    discovery = stub(await start_server())
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await discovery.ListAgents(pb.ListAgentsRequest(skills=["ok", ""]))
    assert field_violations(invalid.value) == ["skills[1]"]
