"""CompleteSubtask's ``lease_next``: the completion and the next leases in one transaction."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from agentcoord.distribution.v1 import distribution_service_pb2 as pb
from tests.helpers import field_violations
from tests.server.test_distribution import (
    Stub,
    Worker,
    explicit,
    get,
    join,
    stream,
    sub,
    submit,
    value,
)


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> Stub:
    return Stub(channel)


async def complete(
    worker: Worker, assignment: pb.Assignment, lease_next: int
) -> pb.CompleteSubtaskResponse:
    return await worker.stub.CompleteSubtask(
        pb.CompleteSubtaskRequest(
            subtask_id=assignment.lease.subtask_id,
            agent_id=worker.agent_id,
            fencing_token=assignment.lease.fencing_token,
            result=value(assignment.subtask.local_id),
            lease_next=lease_next,
        ),
        metadata=worker.metadata,
    )


async def test_a_completion_leases_the_next_subtask_until_none_is_ready(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    worker = await join(channel, "w1", capacity=1)
    task = await submit(stub, explicit(sub("a"), sub("b"), sub("c")))
    assignment = await worker.claim()
    assert assignment is not None
    done = []
    while True:
        response = await complete(worker, assignment, lease_next=1)
        assert response.subtask.state == pb.Subtask.STATE_SUCCEEDED
        done.append(response.subtask.local_id)
        if not response.next_assignments:
            break
        [assignment] = response.next_assignments
        assert assignment.subtask.state == pb.Subtask.STATE_LEASED
        assert assignment.lease.agent_id == "w1"
        assert assignment.lease.fencing_token == assignment.subtask.lease.fencing_token
    assert done == ["a", "b", "c"]
    assert response.task_state == pb.Task.STATE_SUCCEEDED
    final = await get(stub, task.task_id)
    assert [s.agent_id for s in final.subtasks] == ["w1"] * 3


async def test_the_next_leases_never_exceed_the_capacity_the_completion_frees(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    worker = await join(channel, "w1", capacity=2)
    await submit(stub, explicit(*(sub(f"s{i}") for i in range(5))))
    first, second = await worker.claim(), await worker.claim()
    assert first is not None and second is not None

    response = await complete(worker, first, lease_next=3)

    assert [a.subtask.local_id for a in response.next_assignments] == ["s2"]
    third = await complete(worker, second, lease_next=0)
    assert not third.next_assignments  # 0 asks for none: s3 and s4 stay READY
    assert (await worker.claim()) is not None


async def test_an_agent_at_capacity_gets_no_next_lease_and_a_repeat_no_second_one(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    worker = await join(channel, "w1", capacity=1)
    await submit(stub, explicit(sub("a"), sub("b"), sub("c")))
    a = await worker.claim()
    assert a is not None
    await complete(worker, a, lease_next=0)
    b = await worker.claim()
    assert b is not None

    again = await complete(worker, a, lease_next=1)  # a repeat: w1 holds b, its capacity

    assert again.subtask.state == pb.Subtask.STATE_SUCCEEDED
    assert not again.next_assignments
    response = await complete(worker, b, lease_next=1)
    [c] = response.next_assignments
    repeated = await complete(worker, b, lease_next=1)  # the first response was "lost"
    assert [n.lease.fencing_token for n in repeated.next_assignments] == [c.lease.fencing_token]
    assert (await complete(worker, c, lease_next=1)).task_state == pb.Task.STATE_SUCCEEDED


async def test_blocked_dependents_are_not_leased_next(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    worker = await join(channel, "w1", capacity=1)
    await submit(stub, explicit(sub("a"), sub("b", "a")))
    a = await worker.claim()
    assert a is not None

    response = await complete(worker, a, lease_next=1)  # b was BLOCKED when the call came

    assert not response.next_assignments
    b = await worker.claim()
    assert b is not None and b.subtask.local_id == "b"


async def test_a_pushed_agent_gets_its_refill_on_the_stream_not_in_the_response(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    worker = await join(channel, "w1", capacity=1)
    call = await stream(worker)
    await submit(stub, explicit(sub("a"), sub("b")))
    a = (await asyncio.wait_for(call.read(), 5)).assignment

    response = await complete(worker, a, lease_next=0)

    assert not response.next_assignments
    b = (await asyncio.wait_for(call.read(), 5)).assignment
    assert b.subtask.local_id == "b" and b.lease.agent_id == "w1"
    # Leased in the completion's transaction: the next revision after the completion's.
    assert b.lease.fencing_token == response.subtask.revision + 1
    call.cancel()


@pytest.mark.parametrize("lease_next", [-1, 1025])
async def test_a_bad_lease_next_is_invalid_argument_naming_it(
    channel: grpc.aio.Channel, stub: Stub, lease_next: int
) -> None:
    worker = await join(channel, "w1")
    await submit(stub, explicit(sub("a")))
    a = await worker.claim()
    assert a is not None
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await complete(worker, a, lease_next=lease_next)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == ["lease_next"]
    assert (await complete(worker, a, lease_next=0)).subtask.state == pb.Subtask.STATE_SUCCEEDED
