"""Sub-tasks that require skills go only to live agents advertising them, on both stores."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.distribution.v1 import distribution_service_pb2 as pb
from tests.helpers import field_violations
from tests.server.test_distribution import Stub, explicit, get, join, stream, sub, submit

TRANSLATE = discovery_pb.Skill(id="translate", name="Translate")
FRENCH = discovery_pb.Skill(id="fr-en", name="French to English", tags=["translate", "fr"])


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> Stub:
    return Stub(channel)


async def test_only_agents_with_the_skill_by_id_or_tag_claim_it(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    plain = await join(channel, "plain", capacity=5)
    by_id = await join(channel, "by-id", skills=(TRANSLATE,), capacity=5)
    by_tag = await join(channel, "by-tag", skills=(FRENCH,), capacity=5)
    task = await submit(
        stub,
        explicit(
            sub("any-translator"),
            sub("french", required_skills=["fr"]),
            required_skills=["translate"],
        ),
    )
    assert [list(s.required_skills) for s in task.subtasks] == [["translate"], ["fr", "translate"]]
    assert list(task.required_skills) == ["translate"]

    assert await plain.claim() is None  # no skill at all
    first = await by_id.claim()
    assert first is not None and first.subtask.local_id == "any-translator"
    assert await by_id.claim() is None  # "translate" is its id, but it has no "fr" skill
    second = await by_tag.claim()  # "translate" and "fr" are tags of its skill
    assert second is not None and second.subtask.local_id == "french"
    assert list(second.subtask.required_skills) == ["fr", "translate"]


async def test_pushed_work_goes_to_the_least_loaded_agent_with_the_skill(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    plain = await join(channel, "plain", capacity=4)
    busy = await join(channel, "busy", skills=(TRANSLATE,), capacity=4)
    plain_call, busy_call = await stream(plain), await stream(busy)
    await submit(stub, explicit(sub("a"), sub("b"), required_skills=["translate"]))
    for _ in range(2):
        response = await asyncio.wait_for(busy_call.read(), 5)
        assert response.assignment.lease.agent_id == "busy"

    # Two skilled agents: "busy" holds 2 of 4, "idle" none; "plain" holds none but lacks it.
    idle = await join(channel, "idle", skills=(FRENCH,), capacity=4)
    idle_call = await stream(idle)
    task = await submit(stub, explicit(sub("c"), sub("d"), required_skills=["translate"]))
    for _ in range(2):
        response = await asyncio.wait_for(idle_call.read(), 5)
        assert response.assignment.lease.agent_id == "idle"
    assert {s.agent_id for s in (await get(stub, task.task_id)).subtasks} == {"idle"}

    # Work without a skill requirement goes to "plain", the least loaded of all.
    await submit(stub, explicit(sub("e")))
    response = await asyncio.wait_for(plain_call.read(), 5)
    assert response.assignment.subtask.local_id == "e"
    for call in (plain_call, busy_call, idle_call):
        call.cancel()


async def test_a_skill_nobody_has_leaves_the_subtask_ready_until_an_agent_offers_it(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    plain = await join(channel, "plain", capacity=2)
    translator = await join(channel, "translator", skills=(TRANSLATE,), capacity=2)
    task = await submit(stub, explicit(sub("orbit", required_skills=["astrophysics"])))
    assert await plain.claim() is None and await translator.claim() is None
    listed = await stub.ListSubtasks(pb.ListSubtasksRequest(task_id=task.task_id))
    (waiting,) = listed.subtasks
    assert waiting.state == pb.Subtask.STATE_READY and not waiting.agent_id
    assert list(waiting.required_skills) == ["astrophysics"]
    summary = await translator.discovery.GetSummary(discovery_pb.GetSummaryRequest())
    assert "astrophysics" not in summary.live_agents_by_skill
    assert "astrophysics" not in summary.live_agents_by_skill_tag

    astronomer = discovery_pb.Skill(id="orbits", name="Orbits", tags=["astrophysics"])
    claimed = await (await join(channel, "astronomer", skills=(astronomer,))).claim()
    assert claimed is not None and claimed.subtask.local_id == "orbit"


async def test_bad_skill_requirements_name_the_field(stub: Stub) -> None:
    cases = [
        (explicit(sub("a", required_skills=[""])), "task.subtasks[0].required_skills[0]"),
        (explicit(sub("a"), required_skills=["x" * 129]), "task.required_skills[0]"),
        (
            explicit(sub("a"), required_skills=[f"s{i}" for i in range(33)]),
            "task.required_skills",
        ),
    ]
    for spec, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await submit(stub, spec)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(caught.value) == [field]
        assert field in (caught.value.details() or "")
