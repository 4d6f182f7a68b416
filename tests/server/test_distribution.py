"""DistributionService through real stubs against a real server, on both stores."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Mapping

import grpc
import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2

from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from agentcoord.distribution.v1 import distribution_service_pb2 as pb
from agentcoord.distribution.v1 import distribution_service_pb2_grpc as pb_grpc
from agentcoord.server.app import App
from tests.helpers import bearer, error_info, eventually, field_violations
from tests.server.conftest import StartServer

Stub = pb_grpc.DistributionServiceStub


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def value(data: object) -> struct_pb2.Value:
    return json_format.Parse(json.dumps(data), struct_pb2.Value())


def plain(message: struct_pb2.Value) -> object:
    return json_format.MessageToDict(message)


class Worker:
    """A registered agent that claims, completes and fails through real stubs."""

    def __init__(self, channel: grpc.aio.Channel, agent_id: str, token: str) -> None:
        self.agent_id = agent_id
        self.metadata = bearer(token)
        self.stub = Stub(channel)
        self.discovery = discovery_grpc.DiscoveryServiceStub(channel)
        self.token = token

    async def claim(self, wait: float = 0.0, request_id: str = "") -> pb.Assignment | None:
        response = await self.stub.ClaimSubtask(
            pb.ClaimSubtaskRequest(
                agent_id=self.agent_id, wait=seconds(wait), request_id=request_id
            ),
            metadata=self.metadata,
        )
        return response.assignment if response.HasField("assignment") else None

    async def complete(
        self, assignment: pb.Assignment, result: object
    ) -> pb.CompleteSubtaskResponse:
        return await self.stub.CompleteSubtask(
            pb.CompleteSubtaskRequest(
                subtask_id=assignment.lease.subtask_id,
                agent_id=self.agent_id,
                fencing_token=assignment.lease.fencing_token,
                result=value(result),
            ),
            metadata=self.metadata,
        )

    async def fail(
        self, assignment: pb.Assignment, message: str, *, retryable: bool
    ) -> pb.FailSubtaskResponse:
        return await self.stub.FailSubtask(
            pb.FailSubtaskRequest(
                subtask_id=assignment.lease.subtask_id,
                agent_id=self.agent_id,
                fencing_token=assignment.lease.fencing_token,
                error_message=message,
                retryable=retryable,
                failure_class=pb.FAILURE_CLASS_TASK_ERROR,
            ),
            metadata=self.metadata,
        )


async def join(
    channel: grpc.aio.Channel,
    agent_id: str,
    capabilities: tuple[str, ...] = (),
    capacity: int = 1,
    ttl: float = 10.0,
    skills: tuple[discovery_pb.Skill, ...] = (),
) -> Worker:
    response = await discovery_grpc.DiscoveryServiceStub(channel).Register(
        discovery_pb.RegisterRequest(
            agent_id=agent_id,
            name=agent_id,
            capabilities=list(capabilities),
            capacity=capacity,
            ttl=seconds(ttl),
            skills=list(skills),
        )
    )
    return Worker(channel, agent_id, response.session_token)


def explicit(*subtasks: pb.SubtaskSpec, **fields: object) -> pb.TaskSpec:
    return pb.TaskSpec(
        title=str(fields.pop("title", "a task")),
        split_policy=pb.SPLIT_POLICY_EXPLICIT,
        subtasks=list(subtasks),
        **fields,  # type: ignore[arg-type]
    )


def sub(local_id: str, *depends_on: str, **fields: object) -> pb.SubtaskSpec:
    return pb.SubtaskSpec(
        local_id=local_id,
        title=f"do {local_id}",
        depends_on=list(depends_on),
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> Stub:
    return Stub(channel)


async def submit(stub: Stub, spec: pb.TaskSpec, request_id: str = "") -> pb.Task:
    response = await stub.SubmitTask(pb.SubmitTaskRequest(task=spec, request_id=request_id))
    return response.task


async def get(stub: Stub, task_id: str) -> pb.Task:
    return (await stub.GetTask(pb.GetTaskRequest(task_id=task_id))).task


async def test_dag_runs_in_order_and_results_are_aggregated(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    worker = await join(channel, "w1")
    task = await submit(stub, explicit(sub("a"), sub("b", "a"), sub("c", "a"), sub("d", "b", "c")))
    assert task.state == pb.Task.STATE_PENDING
    assert [s.state for s in task.subtasks] == [
        pb.Subtask.STATE_READY,
        pb.Subtask.STATE_BLOCKED,
        pb.Subtask.STATE_BLOCKED,
        pb.Subtask.STATE_BLOCKED,
    ]
    order = []
    while True:
        assignment = await worker.claim()
        if assignment is None:
            break
        order.append(assignment.subtask.local_id)
        response = await worker.complete(assignment, {"from": assignment.subtask.local_id})
    assert order[0] == "a" and set(order[1:3]) == {"b", "c"} and order[3] == "d"
    assert response.task_state == pb.Task.STATE_SUCCEEDED
    done = await get(stub, task.task_id)
    assert done.state == pb.Task.STATE_SUCCEEDED
    assert plain(done.result) == {
        "a": {"from": "a"},
        "b": {"from": "b"},
        "c": {"from": "c"},
        "d": {"from": "d"},
    }
    assert done.counts.succeeded == 4 and done.counts.total == 4


async def test_stale_token_is_refused_and_changes_nothing(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    worker = await join(channel, "w1")
    task = await submit(stub, explicit(sub("a")))
    assignment = await worker.claim()
    assert assignment is not None
    stale = pb.Assignment()
    stale.CopyFrom(assignment)
    stale.lease.fencing_token -= 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await worker.complete(stale, "late")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "STALE_FENCING_TOKEN"
    assert (await get(stub, task.task_id)).subtasks[0].state == pb.Subtask.STATE_LEASED
    await worker.complete(assignment, "ok")
    assert (await get(stub, task.task_id)).state == pb.Task.STATE_SUCCEEDED


async def test_streamed_assignments_respect_capacity_and_capabilities(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    gpu = await join(channel, "gpu", ("gpu",), capacity=2)
    cpu = await join(channel, "cpu", (), capacity=5)
    call = gpu.stub.StreamAssignments(
        pb.StreamAssignmentsRequest(agent_id="gpu"), metadata=gpu.metadata
    )
    task = await submit(
        stub,
        explicit(*(sub(f"g{i}", required_capabilities=["gpu"]) for i in range(4))),
    )
    first = await call.read()
    second = await call.read()
    assert first.assignment.subtask.local_id and second.assignment.subtask.local_id
    assert await cpu.claim() is None  # cpu lacks the capability
    current = await get(stub, task.task_id)
    assert current.counts.leased == 2 and current.counts.ready == 2  # capacity 2, never more
    await gpu.complete(first.assignment, 1)
    third = await asyncio.wait_for(call.read(), 5)
    assert third.assignment.lease.agent_id == "gpu"
    call.cancel()


async def test_dead_agents_lease_returns_to_ready_without_burning_an_attempt(
    start_server: StartServer,
) -> None:
    app: App = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = Stub(channel)
        doomed = await join(channel, "doomed", ttl=1.0)
        task = await submit(stub, explicit(sub("a"), max_attempts=1))
        assignment = await doomed.claim()
        assert assignment is not None
        # No heartbeats: the agent expires and its lease comes back at once.
        survivor = await join(channel, "survivor")
        again = await survivor.claim(wait=5)
        assert again is not None and again.subtask.local_id == "a"
        assert again.lease.attempt == 2
        assert again.subtask.last_failure.failure_class == pb.FAILURE_CLASS_AGENT_DIED
        await survivor.complete(again, "done")
        assert (await get(stub, task.task_id)).state == pb.Task.STATE_SUCCEEDED
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await doomed.complete(assignment, "too late")
        assert caught.value.code() in (
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.UNAUTHENTICATED,
        )


async def test_retryable_failures_retry_until_max_attempts_then_fail_the_task(
    start_server: StartServer,
) -> None:
    app: App = await start_server(retry_backoff=0.0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = Stub(channel)
        worker = await join(channel, "w1")
        task = await submit(stub, explicit(sub("a"), sub("b"), max_attempts=2))
        attempts = []
        while True:
            assignment = await worker.claim(wait=1)
            if assignment is None:
                break
            if assignment.subtask.local_id == "b":
                await worker.complete(assignment, "b")
                continue
            attempts.append(assignment.lease.attempt)
            await worker.fail(assignment, "boom", retryable=True)
        assert attempts == [1, 2]
        failed = await get(stub, task.task_id)
        assert failed.state == pb.Task.STATE_FAILED
        assert failed.failure.message == "boom"
        assert failed.failure.failure_class == pb.FAILURE_CLASS_TASK_ERROR


async def test_cancel_revokes_leases_on_the_stream(channel: grpc.aio.Channel, stub: Stub) -> None:
    worker = await join(channel, "w1")
    call = worker.stub.StreamAssignments(
        pb.StreamAssignmentsRequest(agent_id="w1"), metadata=worker.metadata
    )
    task = await submit(stub, explicit(sub("a"), sub("b", "a")))
    leased = (await call.read()).assignment
    cancelled = await stub.CancelTask(pb.CancelTaskRequest(task_id=task.task_id, reason="no"))
    assert cancelled.task.state == pb.Task.STATE_CANCELLED
    revoked = (await asyncio.wait_for(call.read(), 5)).revocation
    assert revoked.subtask_id == leased.lease.subtask_id
    assert revoked.reason == pb.Revocation.REASON_TASK_CANCELLED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await worker.complete(leased, "late")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    call.cancel()


async def test_a_repeated_claim_returns_the_lease_of_the_first(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    worker = await join(channel, "w1", capacity=2)
    await submit(stub, explicit(sub("a"), sub("b"), sub("c")))
    first = await worker.claim(request_id="claim-1")
    again = await worker.claim(request_id="claim-1")
    other = await worker.claim(request_id="claim-2")
    assert first is not None and again is not None and other is not None
    assert again.lease.subtask_id == first.lease.subtask_id
    assert again.lease.fencing_token == first.lease.fencing_token
    assert other.lease.subtask_id != first.lease.subtask_id


async def test_submit_is_idempotent_by_request_id(stub: Stub) -> None:
    first = await submit(stub, explicit(sub("a")), request_id="req-1")
    again = await submit(stub, explicit(sub("x"), sub("y")), request_id="req-1")
    assert again.task_id == first.task_id and len(again.subtasks) == 1


async def test_watch_task_streams_every_transition_until_the_end(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    worker = await join(channel, "w1")
    task = await submit(stub, explicit(sub("a")))
    call = stub.WatchTask(pb.WatchTaskRequest(task_id=task.task_id, start_revision=1))
    assignment = await worker.claim()
    assert assignment is not None
    await worker.complete(assignment, "ok")
    kinds = []
    async for response in call:
        for event in response.events:
            kinds.append(event.WhichOneof("transition"))
    assert kinds.count("subtask") >= 3 and kinds[-1] == "task"


async def test_each_watch_message_shows_the_task_as_it_stood_after_its_transitions(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    workers = [await join(channel, f"w{n}", capacity=3) for n in range(4)]
    task = await submit(stub, explicit(*(sub(f"s{n}") for n in range(12))))
    call = stub.WatchTask(pb.WatchTaskRequest(task_id=task.task_id))
    first = await call.read()
    # Commits in quick succession: the store is ahead of the change being sent.
    claimants = [worker for worker in workers for _ in range(3)]
    claims = await asyncio.gather(*(worker.claim() for worker in claimants))
    leases = zip(claimants, claims, strict=True)
    await asyncio.gather(*(worker.complete(claim, "ok") for worker, claim in leases if claim))
    counts = Counter(json_format.MessageToDict(first.task.counts))
    while (response := await call.read()) is not grpc.aio.EOF:  # as a progress display does
        for event in response.events:
            if event.WhichOneof("transition") == "subtask":
                moved = event.subtask
                if moved.from_state:
                    counts[_state_name(moved.from_state)] -= 1
                counts[_state_name(moved.to_state)] += 1
        assert _nonzero(counts) == _nonzero(json_format.MessageToDict(response.task.counts))
    assert counts["succeeded"] == 12


def _state_name(state: int) -> str:
    return pb.Subtask.State.Name(state).removeprefix("STATE_").lower()


def _nonzero(counts: Mapping[str, int]) -> dict[str, int]:
    return {name: number for name, number in counts.items() if number}


async def test_bad_input_names_the_field(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await submit(stub, explicit(sub("a", "b"), sub("b", "a")))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cycle" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetTask(pb.GetTaskRequest(task_id="nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_agents_cannot_report_the_failure_classes_the_server_records(
    channel: grpc.aio.Channel,
) -> None:
    worker = await join(channel, "w1")
    for failure_class in (pb.FAILURE_CLASS_AGENT_DIED, pb.FAILURE_CLASS_UNSPECIFIED):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await worker.stub.FailSubtask(
                pb.FailSubtaskRequest(
                    subtask_id="s",
                    agent_id="w1",
                    fencing_token=1,
                    error_message="x",
                    failure_class=failure_class,
                ),
                metadata=worker.metadata,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(caught.value) == ["failure_class"]


async def stream(
    worker: Worker,
) -> grpc.aio.UnaryStreamCall[pb.StreamAssignmentsRequest, pb.StreamAssignmentsResponse]:
    call = worker.stub.StreamAssignments(
        pb.StreamAssignmentsRequest(agent_id=worker.agent_id), metadata=worker.metadata
    )
    await asyncio.wait_for(call.initial_metadata(), 5)  # the server has registered the stream
    return call


async def test_work_spreads_to_the_least_loaded_agents(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    workers = [await join(channel, f"w{i}", capacity=4) for i in range(3)]
    calls = [await stream(worker) for worker in workers]
    await submit(stub, explicit(*(sub(f"s{i}") for i in range(6))))
    for call in calls:  # six sub-tasks over three agents of capacity 4: two each
        for _ in range(2):
            response = await asyncio.wait_for(call.read(), 5)
            assert response.assignment.lease.agent_id in {w.agent_id for w in workers}
    for call in calls:
        call.cancel()


async def test_claim_waits_for_work_and_refuses_beyond_capacity(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    worker = await join(channel, "w1", capacity=1)
    waiting = asyncio.create_task(worker.claim(wait=5))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await submit(stub, explicit(sub("a"), sub("b")))
    assignment = await asyncio.wait_for(waiting, 5)
    assert assignment is not None and assignment.subtask.local_id == "a"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await worker.claim()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(caught.value).reason == "AGENT_AT_CAPACITY"


async def test_higher_priority_runs_first(channel: grpc.aio.Channel, stub: Stub) -> None:
    worker = await join(channel, "w1")
    await submit(stub, explicit(sub("low"), title="low", priority=-5))
    await submit(stub, explicit(sub("high"), title="high", priority=7))
    first = await worker.claim()
    assert first is not None and first.subtask.local_id == "high"


async def test_unrenewed_lease_expires_and_is_reassigned(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    slow = await join(channel, "slow")
    task = await submit(stub, explicit(sub("a"), lease_ttl=seconds(1), max_attempts=3))
    first = await slow.claim()
    assert first is not None
    call = await stream(slow)
    resent = await asyncio.wait_for(call.read(), 5)  # a new stream first re-sends held leases
    assert resent.assignment.lease.fencing_token == first.lease.fencing_token
    revoked = await asyncio.wait_for(call.read(), 5)  # nothing renews it: the lease expires
    assert revoked.revocation.reason == pb.Revocation.REASON_LEASE_EXPIRED
    again = (await asyncio.wait_for(call.read(), 5)).assignment  # READY again at once
    assert again.lease.attempt == 2
    assert again.lease.fencing_token > first.lease.fencing_token
    assert again.subtask.last_failure.failure_class == pb.FAILURE_CLASS_LEASE_LOST
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await slow.complete(first, "stale")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    call.cancel()
    assert (await get(stub, task.task_id)).subtasks[0].attempt == 2


async def test_heartbeats_naming_the_subtask_renew_its_lease(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    worker = await join(channel, "w1")
    task = await submit(stub, explicit(sub("a"), lease_ttl=seconds(1)))
    assignment = await worker.claim()
    assert assignment is not None
    beats = worker.discovery.Heartbeat(metadata=worker.metadata)
    for _ in range(8):  # 2 s of heartbeats, twice the lease TTL
        await beats.write(
            discovery_pb.HeartbeatRequest(
                agent_id="w1",
                load=discovery_pb.Load(held_subtask_ids=[assignment.lease.subtask_id]),
            )
        )
        await beats.read()
        await asyncio.sleep(0.25)
    beats.cancel()
    await worker.complete(assignment, "kept")
    assert (await get(stub, task.task_id)).state == pb.Task.STATE_SUCCEEDED


async def test_a_retry_prefers_another_capable_agent(
    start_server: StartServer,
) -> None:
    app: App = await start_server(retry_backoff=0.0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = Stub(channel)
        first, second = await join(channel, "first"), await join(channel, "second")
        first_call, second_call = await stream(first), await stream(second)
        await submit(stub, explicit(sub("a")))
        reads = [asyncio.ensure_future(c.read()) for c in (first_call, second_call)]
        done, _ = await asyncio.wait(reads, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        holder, other = (first, second) if reads[0] in done else (second, first)
        assignment = next(iter(done)).result().assignment
        await holder.fail(assignment, "flaky", retryable=True)
        retried = await asyncio.wait_for(reads[1 if holder is first else 0], 5)
        assert retried.assignment.lease.agent_id == other.agent_id
        for call in (first_call, second_call):
            call.cancel()


async def test_partial_results_keep_the_successes(channel: grpc.aio.Channel, stub: Stub) -> None:
    worker = await join(channel, "w1")
    task = await submit(
        stub,
        explicit(sub("ok"), sub("bad"), sub("after-bad", "bad"), allow_partial_results=True),
    )
    while (assignment := await worker.claim()) is not None:
        if assignment.subtask.local_id == "bad":
            await worker.fail(assignment, "no", retryable=False)
        else:
            await worker.complete(assignment, assignment.subtask.local_id)
    done = await get(stub, task.task_id)
    assert done.state == pb.Task.STATE_SUCCEEDED
    assert plain(done.result) == {"ok": "ok"}
    assert done.counts.failed == 1 and done.counts.cancelled == 1


async def test_aggregation_subtask_result_is_the_tasks(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    worker = await join(channel, "w1")
    task = await submit(
        stub,
        explicit(sub("x"), sub("y"), sub("merge", "x", "y"), aggregation_local_id="merge"),
    )
    while (assignment := await worker.claim()) is not None:
        await worker.complete(assignment, {"merged": assignment.subtask.local_id == "merge"})
    assert plain((await get(stub, task.task_id)).result) == {"merged": True}


async def test_auto_split_runs_the_proposed_dag(channel: grpc.aio.Channel, stub: Stub) -> None:
    description = "1. Fetch the data\n2. Clean it\n3. Train the model\n"
    spec = pb.TaskSpec(title="pipeline", description=description, split_policy=pb.SPLIT_POLICY_AUTO)
    plan = await stub.AnalyzeTask(pb.AnalyzeTaskRequest(task=spec))
    assert len(plan.subtasks) == 3 and not plan.parallelizable and plan.reason
    task = await submit(stub, spec)
    assert [s.local_id for s in task.subtasks] == [s.local_id for s in plan.subtasks]
    assert task.counts.ready == 1 and task.counts.blocked == 2


async def test_a_new_stream_replaces_the_old_one(channel: grpc.aio.Channel) -> None:
    worker = await join(channel, "w1")
    old = await stream(worker)
    new = await stream(worker)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(old.read(), 5)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "STREAM_REPLACED"
    new.cancel()


async def test_watch_resumes_from_a_revision_without_gaps(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    worker = await join(channel, "w1")
    task = await submit(stub, explicit(sub("a"), sub("b", "a")))
    seen: list[int] = []
    call = stub.WatchTask(pb.WatchTaskRequest(task_id=task.task_id, start_revision=1))
    first = await call.read()
    assignment = await worker.claim()
    assert assignment is not None
    await worker.complete(assignment, 1)
    while True:
        response = await asyncio.wait_for(call.read(), 5)
        seen.extend(e.revision for e in response.events)
        if any(
            e.subtask.local_id == "a" and e.subtask.to_state == pb.Subtask.STATE_SUCCEEDED
            for e in response.events
        ):
            break
    call.cancel()
    resumed = stub.WatchTask(pb.WatchTaskRequest(task_id=task.task_id, start_revision=seen[-1]))
    await resumed.read()
    assignment = await worker.claim()
    assert assignment is not None
    await worker.complete(assignment, 2)
    while (response := await asyncio.wait_for(resumed.read(), 5)) is not grpc.aio.EOF:
        seen.extend(e.revision for e in response.events)
    assert first.revision >= 1 and seen == sorted(set(seen))
    assert seen[-1] == (await get(stub, task.task_id)).revision


async def test_concurrent_claims_never_exceed_capacity(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    worker = await join(channel, "w1", capacity=1)
    call = await stream(worker)
    waiting = [asyncio.create_task(worker.claim(wait=2)) for _ in range(2)]
    await asyncio.sleep(0.2)
    task = await submit(stub, explicit(sub("a"), sub("b"), sub("c")))
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    claimed = [o for o in outcomes if isinstance(o, pb.Assignment)]
    await asyncio.sleep(0.2)
    current = await get(stub, task.task_id)
    assert current.counts.leased == 1  # stream and claims together: never above capacity 1
    assert len(claimed) <= 1
    call.cancel()


async def test_a_failure_after_the_lease_was_lost_is_refused(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    worker = await join(channel, "w1")
    task = await submit(stub, explicit(sub("a"), lease_ttl=seconds(1), max_attempts=5))
    assignment = await worker.claim()
    assert assignment is not None

    async def lost() -> bool:
        current = (await get(stub, task.task_id)).subtasks[0]
        return current.last_failure.failure_class == pb.FAILURE_CLASS_LEASE_LOST

    await eventually(lost)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await worker.fail(assignment, "late", retryable=True)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_watch_resumed_after_the_end_ends_at_once(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    worker = await join(channel, "w1")
    task = await submit(stub, explicit(sub("a")))
    assignment = await worker.claim()
    assert assignment is not None
    await worker.complete(assignment, 1)
    final = await get(stub, task.task_id)
    call = stub.WatchTask(pb.WatchTaskRequest(task_id=task.task_id, start_revision=final.revision))
    responses = [response async for response in call]
    assert len(responses) == 1 and responses[0].task.state == pb.Task.STATE_SUCCEEDED


async def test_a_deregistered_agent_is_told_its_leases_are_revoked(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    worker = await join(channel, "w1", capacity=2)
    call = await stream(worker)
    await submit(stub, explicit(sub("a"), sub("b")))
    held = {(await asyncio.wait_for(call.read(), 5)).assignment.lease.subtask_id for _ in "ab"}
    await worker.discovery.Deregister(
        discovery_pb.DeregisterRequest(agent_id="w1"), metadata=worker.metadata
    )
    revoked = set()
    for _ in held:
        revocation = (await asyncio.wait_for(call.read(), 5)).revocation
        assert revocation.reason == pb.Revocation.REASON_SESSION_ENDED
        revoked.add(revocation.subtask_id)
    assert revoked == held
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), 5)
    assert error_info(caught.value).reason == "SESSION_ENDED"
