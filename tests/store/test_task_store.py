"""The Distribution part of the store contract, run on SQLite and PostgreSQL (``store_url``)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import pytest

from agentcoord.core.errors import FailedPrecondition, InvalidInput, NotFound, ResourceExhausted
from agentcoord.core.models import (
    Agent,
    AgentState,
    Change,
    ChangeFilter,
    Fencing,
    PutCommand,
    Service,
    StateValue,
    StateWrite,
    ValueKind,
)
from agentcoord.core.store import Store
from agentcoord.core.task_rules import (
    LeaseRenewal,
    RetryPolicy,
    Revocation,
    TaskDefaults,
    TaskUpdate,
    build_task,
    plan_of,
)
from agentcoord.core.tasks import (
    Caller,
    Failure,
    FailureClass,
    SplitPolicy,
    Subtask,
    SubtaskCounts,
    SubtaskSpec,
    SubtaskState,
    Task,
    TaskCursor,
    TaskFilter,
    TaskSpec,
    TaskState,
    canonical_json,
)
from agentcoord.store.rows import SUBTASK_PROGRESS_COLUMNS
from tests.store.helpers import all_changes, opened, raw_postgres
from tests.store.test_store_contract import inspect_schema

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(seconds=10)

DIAMOND = (
    SubtaskSpec("a", "Fetch"),
    SubtaskSpec("b", "Left", depends_on=("a",)),
    SubtaskSpec("c", "Right", depends_on=("a",)),
    SubtaskSpec("d", "Join", depends_on=("b", "c")),
)
"""a, then b and c, then d."""

INDEPENDENT = (
    SubtaskSpec("a", "First"),
    SubtaskSpec("b", "Second"),
    SubtaskSpec("c", "After the first", depends_on=("a",)),
)
"""a and b at once, c after a."""


def make_task(
    task_id: str,
    subtasks: tuple[SubtaskSpec, ...] = DIAMOND,
    *,
    submitter: str = "alice",
    request_id: str = "",
    now: datetime = NOW,
    **spec_fields: Any,
) -> tuple[Task, list[Subtask]]:
    """Build an EXPLICIT task ``task_id`` whose sub-tasks are ``<task_id>-<local id>``."""
    spec = TaskSpec(
        title=f"Task {task_id}",
        split_policy=SplitPolicy.EXPLICIT,
        input='{"doc":"naïve","n":[1,2]}',
        subtasks=subtasks,
        **spec_fields,
    )
    plan = plan_of(spec)
    # build_task names the task first, then the sub-tasks in (topological) plan order.
    names = iter([task_id, *(f"{task_id}-{sub.local_id}" for sub in subtasks)])
    return build_task(
        spec,
        plan,
        new_id=lambda: next(names),
        submitter_agent_id=submitter,
        submitter=Caller(submitter).principal,
        request_id=request_id,
        now=now,
        defaults=TaskDefaults(),
    )


async def submit(store: Store, task_id: str = "t1", **fields: Any) -> Task:
    task, subtasks = make_task(task_id, **fields)
    stored, _, created = await store.submit_task(task, subtasks)
    assert created
    return stored


async def subtask(store: Store, subtask_id: str) -> Subtask:
    found = await store.get_subtask(subtask_id)
    assert found is not None
    return found


async def task_of(store: Store, task_id: str = "t1") -> Task:
    found = await store.get_task(task_id)
    assert found is not None
    return found


async def registered(store: Store, agent_id: str, epoch: int = 1) -> None:
    """Register ``agent_id`` until session ``epoch`` is its live one (none if it is)."""
    stored = await store.get_agent(agent_id)
    while stored is None or stored.epoch < epoch:
        agent = Agent(agent_id, agent_id, "worker", (), 8, {}, (), 30.0)
        replacing = 0 if stored is None else stored.epoch
        stored = await store.register_agent(agent, "h", NOW, replacing_epoch=replacing)


async def leased(
    store: Store, subtask_id: str, agent_id: str = "bob", now: datetime = NOW, epoch: int = 1
) -> TaskUpdate:
    """Lease a sub-task to session ``epoch`` of ``agent_id`` (registered so far as needed)."""
    await registered(store, agent_id, epoch)
    return await store.lease_subtask(subtask_id, agent_id, now, epoch=epoch, capacity=8)


async def lease(
    store: Store, subtask_id: str, agent_id: str = "bob", now: datetime = NOW, epoch: int = 1
) -> int:
    """Lease a sub-task to session ``epoch`` of ``agent_id`` and return the fencing token."""
    update = await leased(store, subtask_id, agent_id, now, epoch)
    assert update.subtask is not None and update.subtask.lease is not None
    return update.subtask.lease.fencing_token


async def run(
    store: Store, subtask_id: str, agent_id: str = "bob", result: str = "1"
) -> TaskUpdate:
    """Lease a sub-task and complete it."""
    token = await lease(store, subtask_id, agent_id)
    return await store.complete_subtask(subtask_id, agent_id, token, result, NOW, epoch=1)


def failure(
    subtask_id: str,
    agent_id: str = "bob",
    *,
    retryable: bool = False,
    failure_class: FailureClass = FailureClass.TASK_ERROR,
    time: datetime = NOW,
) -> Failure:
    return Failure(failure_class, "it broke", retryable, subtask_id, agent_id, 0, time)


async def states(store: Store, task_id: str = "t1") -> dict[str, SubtaskState]:
    return {s.local_id: s.state for s in await store.list_subtasks(task_id)}


async def distribution_changes(store: Store, after: int = 0) -> list[Change]:
    where = ChangeFilter(service=Service.DISTRIBUTION)
    return await store.list_changes(after, 100_000, where)


def put(key: str) -> PutCommand:
    return PutCommand(key, StateValue(ValueKind.JSON, b"1"))


# Schema


async def test_the_distribution_migration_builds_its_tables(store_url: str) -> None:
    async with opened(store_url):
        pass
    schema = await inspect_schema(store_url)

    assert {"tasks", "subtasks"} <= schema.tables
    applied = [(version, name) for version, name, _ in schema.migrations]
    assert (3, "distribution") in applied and (4, "session_identity") in applied
    expected = {
        "tasks_submitter_request_id": ["submitter", "request_id"],
        "tasks_create_time": ["create_time", "task_id"],
        "tasks_state_create_time": ["state", "create_time", "task_id"],
        "tasks_submitter_create_time": ["submitter_agent_id", "create_time", "task_id"],
        "subtasks_task_seq": ["task_id", "seq"],
        "subtasks_open": ["state"],
        "subtasks_lease_agent": ["lease_agent_id"],
    }
    assert {name: schema.indexes.get(name) for name in expected} == expected


# Submission


async def test_submit_stores_the_task_and_its_subtasks(store: Store) -> None:
    task, subtasks = make_task("t1")
    stored, written, created = await store.submit_task(task, subtasks)

    assert created
    assert stored == dataclasses.replace(
        task, counts=SubtaskCounts(blocked=3, ready=1), revision=5, update_time=NOW
    )
    assert await store.get_task("t1") == stored
    assert await store.get_task("t2") is None

    listed = await store.list_subtasks("t1")
    assert [s.subtask_id for s in listed] == ["t1-a", "t1-b", "t1-c", "t1-d"]
    assert [s.seq for s in listed] == [0, 1, 2, 3]
    assert [s.state for s in listed] == [SubtaskState.READY] + [SubtaskState.BLOCKED] * 3
    assert [s.revision for s in listed] == [2, 3, 4, 5]
    assert [s.waiting_on for s in listed] == [0, 1, 1, 2]
    revisions = range(2, 6)
    assert listed == [
        dataclasses.replace(s, revision=r) for s, r in zip(subtasks, revisions, strict=True)
    ]
    assert list(written) == listed  # the answer is what a read gives
    assert listed[0].dependents == ("t1-b", "t1-c")
    assert listed[3].depends_on == ("t1-b", "t1-c")
    assert listed[0].input == '{"doc":"naïve","n":[1,2]}'  # JSON text kept as it is
    assert await store.get_subtask("t1-b") == listed[1]
    assert await store.get_subtask("t1-x") is None
    assert await store.list_subtasks("t2") == []

    assert await store.list_subtasks_page("t1", -1, 2) == listed[:2]
    assert await store.list_subtasks_page("t1", 1, 10) == listed[2:]
    assert await store.list_subtasks_page("t1", 3, 10) == []
    assert await store.get_subtasks({"t1-d", "t1-b", "t1-x"}) == [listed[1], listed[3]]
    assert await store.get_subtasks(set()) == []

    changes = await all_changes(store)
    assert [(c.revision, c.kind) for c in changes] == [
        (1, "task.submitted"),
        (2, "subtask.ready"),
        (3, "subtask.blocked"),
        (4, "subtask.blocked"),
        (5, "subtask.blocked"),
    ]
    assert {(c.service, c.subject, c.agent_id, c.time) for c in changes} == {
        (Service.DISTRIBUTION, "t1", "alice", NOW)
    }
    assert changes[1].details["subtask_id"] == "t1-a"
    assert changes[1].details["from"] is None and changes[1].details["to"] == "ready"
    assert await store.current_revision() == 5


async def test_times_are_stored_in_utc(store: Store) -> None:
    local = NOW.astimezone(timezone(timedelta(hours=2)))
    stored = await submit(store, now=local)

    assert stored.create_time == NOW and stored.create_time.utcoffset() == timedelta(0)
    got = await task_of(store)
    assert got.create_time.utcoffset() == timedelta(0) and got == stored
    assert all(s.create_time.utcoffset() == timedelta(0) for s in await store.list_subtasks("t1"))


async def test_the_same_request_id_returns_the_first_task(store: Store) -> None:
    first = await submit(store, "t1", request_id="r1")
    changes = await all_changes(store)

    again, written, created = await store.submit_task(*make_task("t2", request_id="r1"))

    assert (again, written, created) == (first, (), False)
    assert await store.get_task("t2") is None
    assert await store.list_subtasks("t2") == []
    assert await all_changes(store) == changes

    # Request ids are scoped to the submitter: another one's equal id is its own task.
    other, _, created = await store.submit_task(*make_task("t2", request_id="r1", submitter="x"))
    assert created and other.task_id == "t2" and other.submitter == "agent:x"

    # Another request id, or none at all, is another task.
    await submit(store, "t3", request_id="r2")
    await submit(store, "t4")
    await submit(store, "t5")
    assert [t.task_id for t in await store.list_tasks(TaskFilter(), None, 10)] == [
        "t5",
        "t4",
        "t3",
        "t2",
        "t1",
    ]


def commits(store: Store) -> list[list[int]]:
    """Record the revisions of each commit from now on."""
    calls: list[list[int]] = []
    store.add_listener(lambda changes: calls.append([c.revision for c in changes]))
    return calls


async def test_submissions_of_one_request_in_one_batch_store_one_task(store: Store) -> None:
    calls = commits(store)
    results = await asyncio.gather(
        store.submit_task(*make_task("t1", request_id="r1")),
        store.submit_task(*make_task("t2", request_id="r1")),
    )

    assert sorted(created for _, _, created in results) == [False, True]
    assert results[0][0] == results[1][0]
    winner = results[0][0].task_id
    assert await store.get_task(winner) == results[0][0]
    assert len(await store.list_tasks(TaskFilter(), None, 10)) == 1
    assert await store.current_revision() == 5
    assert calls == [[1, 2, 3, 4, 5]]  # one batch


async def test_a_failing_statement_rolls_back_only_its_own_operation(store: Store) -> None:
    """A database error re-runs the batch in isolation: each operation loads what the
    ones before it wrote, and only the failing one is rolled back."""
    await registered(store, "bob")  # revision 1
    calls = commits(store)
    broken = make_task("t2", subtasks=(SubtaskSpec("a", "Only"),))
    broken_task = dataclasses.replace(broken[0], submitter_agent_id=cast(str, None))

    results = await asyncio.gather(
        store.submit_task(*make_task("t1")),
        store.submit_task(broken_task, broken[1]),  # NOT NULL in the database
        store.lease_subtask("t1-a", "bob", NOW, epoch=1, capacity=8),
        return_exceptions=True,
    )

    assert isinstance(results[0], tuple) and results[0][2] is True
    assert isinstance(results[1], Exception) and not isinstance(results[1], NotFound)
    assert isinstance(results[2], TaskUpdate) and results[2].task.state is TaskState.RUNNING
    assert calls == [[2, 3, 4, 5, 6, 7, 8]]
    assert await store.get_task("t2") is None and await store.get_subtask("t2-a") is None
    assert await task_of(store) == results[2].task


# Leases


async def test_lease_grants_a_token_that_is_the_revision_of_its_change(store: Store) -> None:
    await submit(store)

    update = await leased(store, "t1-a", "bob")  # registers bob first (revision 6)

    granted = update.subtask
    assert granted is not None and granted.lease is not None
    assert granted.state is SubtaskState.LEASED
    assert (granted.lease.agent_id, granted.lease.attempt, granted.attempt) == ("bob", 1, 1)
    assert granted.lease.expire_time == NOW + timedelta(seconds=TaskDefaults().lease_ttl)
    assert granted.fencing_token == granted.lease.fencing_token == granted.revision == 7
    assert (granted.agent_id, granted.start_time) == ("bob", NOW)
    assert update.task.state is TaskState.RUNNING
    assert update.task.counts == SubtaskCounts(blocked=3, leased=1)
    assert update.changed == (granted,)
    assert update.revocations == ()
    assert await store.get_subtask("t1-a") == granted
    assert await store.get_task("t1") == update.task

    changes = await distribution_changes(store, after=6)
    assert [(c.revision, c.kind, c.agent_id) for c in changes] == [
        (7, "subtask.leased", "bob"),
        (8, "task.running", "bob"),
    ]
    assert changes[0].details["fencing_token"] == 7
    assert update.task.revision == 8


async def test_only_a_ready_subtask_is_leased(store: Store) -> None:
    await submit(store)
    await lease(store, "t1-a", "bob")
    await registered(store, "carol")
    before = (await store.current_revision(), await store.list_subtasks("t1"))

    for subtask_id in ("t1-a", "t1-b"):  # leased already; blocked
        with pytest.raises(FailedPrecondition) as raised:
            await store.lease_subtask(subtask_id, "carol", NOW, epoch=1, capacity=8)
        assert raised.value.reason == "SUBTASK_NOT_READY"
    with pytest.raises(NotFound):
        await store.lease_subtask("t1-x", "carol", NOW, epoch=1, capacity=8)

    assert (await store.current_revision(), await store.list_subtasks("t1")) == before


async def test_a_repeated_claim_is_refused_naming_the_lease_it_took(store: Store) -> None:
    await submit(store, "t1")
    await submit(store, "t2")
    await registered(store, "bob")
    first = await store.lease_subtask(
        "t1-a", "bob", NOW, epoch=1, capacity=8, claim_request_id="claim-1"
    )
    assert first.subtask is not None and first.subtask.lease is not None
    assert first.subtask.lease.claim_request_id == "claim-1"
    stored = await store.get_subtask("t1-a")  # kept with the lease, for any process
    assert stored is not None and stored.lease == first.subtask.lease
    before = (await store.current_revision(), await store.list_subtasks("t2"))

    with pytest.raises(FailedPrecondition) as raised:
        await store.lease_subtask(
            "t2-a", "bob", NOW, epoch=1, capacity=8, claim_request_id="claim-1"
        )
    assert raised.value.reason == "CLAIM_REPEATED"
    assert raised.value.metadata == {"subtask_id": "t1-a"}
    assert (await store.current_revision(), await store.list_subtasks("t2")) == before
    other = await store.lease_subtask(
        "t2-a", "bob", NOW, epoch=1, capacity=8, claim_request_id="claim-2"
    )
    assert other.subtask is not None and other.subtask.state is SubtaskState.LEASED


async def test_concurrent_leases_of_one_subtask_grant_one(store: Store) -> None:
    await submit(store)
    await registered(store, "bob")
    await registered(store, "carol")
    calls = commits(store)

    results = await asyncio.gather(
        store.lease_subtask("t1-a", "bob", NOW, epoch=1, capacity=8),
        store.lease_subtask("t1-a", "carol", NOW, epoch=1, capacity=8),
        return_exceptions=True,
    )

    granted = [r for r in results if isinstance(r, TaskUpdate)]
    refused = [r for r in results if isinstance(r, FailedPrecondition)]
    assert len(granted) == 1 and len(refused) == 1
    assert refused[0].reason == "SUBTASK_NOT_READY"
    assert await store.get_subtask("t1-a") == granted[0].subtask
    assert calls == [[8, 9]]  # one batch: the second lease saw the first


async def test_capacity_counts_the_sessions_leases_across_tasks_and_within_a_batch(
    store: Store,
) -> None:
    """AGENT_AT_CAPACITY counts every lease the session holds in the store (of any task),
    with those that earlier operations of the same batch granted or freed; a lease of the
    agent's ended session does not count."""
    for task_id in ("t1", "t2", "t3"):
        await submit(store, task_id, subtasks=INDEPENDENT)
    await lease(store, "t1-a", "bob", epoch=1)  # stays LEASED to the ended session 1
    token = await lease(store, "t1-b", "bob", epoch=2)
    calls = commits(store)

    results = await asyncio.gather(
        *(
            store.lease_subtask(subtask_id, "bob", NOW, epoch=2, capacity=2)
            for subtask_id in ("t2-a", "t2-b", "t3-a")
        ),
        return_exceptions=True,
    )

    assert len(calls) == 1  # one batch: each lease saw the ones before it
    granted = [r.subtask.subtask_id for r in results if isinstance(r, TaskUpdate) and r.subtask]
    assert granted == ["t2-a"]
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    assert [r.reason for r in refused] == ["AGENT_AT_CAPACITY"] * 2
    assert (await subtask(store, "t2-b")).state is SubtaskState.READY

    done, freed = await asyncio.gather(  # the completion frees a place for the next lease
        store.complete_subtask("t1-b", "bob", token, "1", NOW, epoch=2),
        store.lease_subtask("t2-b", "bob", NOW, epoch=2, capacity=2),
    )
    assert done.subtask is not None and done.subtask.state is SubtaskState.SUCCEEDED
    assert freed.subtask is not None and freed.subtask.state is SubtaskState.LEASED
    with pytest.raises(ResourceExhausted):
        await store.lease_subtask("t3-a", "bob", NOW, epoch=2, capacity=2)
    assert await lease(store, "t3-a", "bob", epoch=2)  # capacity 8


# Completion


async def test_completion_with_a_stale_token_or_by_another_agent_changes_nothing(
    store: Store,
) -> None:
    await submit(store)
    token = await lease(store, "t1-a", "bob")
    before = (await store.current_revision(), await store.list_subtasks("t1"))

    with pytest.raises(FailedPrecondition) as stale:
        await store.complete_subtask("t1-a", "bob", token - 1, "1", NOW, epoch=1)
    with pytest.raises(FailedPrecondition) as other:
        await store.complete_subtask("t1-a", "carol", token, "1", NOW, epoch=1)
    with pytest.raises(FailedPrecondition) as not_leased:
        await store.complete_subtask("t1-b", "bob", token, "1", NOW, epoch=1)
    with pytest.raises(NotFound):
        await store.complete_subtask("t1-x", "bob", token, "1", NOW, epoch=1)

    assert stale.value.reason == "STALE_FENCING_TOKEN"
    assert other.value.reason == "LEASE_NOT_HELD"
    assert not_leased.value.reason == "STALE_FENCING_TOKEN"
    assert (await store.current_revision(), await store.list_subtasks("t1")) == before
    assert (await task_of(store)).revision == before[0]


async def test_complete_and_lease_completes_and_leases_the_ready_candidates_in_one_commit(
    store: Store,
) -> None:
    await submit(store, subtasks=INDEPENDENT)
    await submit(store, "t2", subtasks=INDEPENDENT)
    token = await lease(store, "t1-a", "bob")
    await lease(store, "t2-a", "carol")
    calls = commits(store)

    done = await store.complete_and_lease(
        "t1-a",
        "bob",
        token,
        "1",
        NOW,
        epoch=1,
        candidates=["t2-a", "t1-x", "t1-b", "t2-b"],  # leased to carol; missing; two READY
        capacity=2,
    )

    assert done.completion.subtask is not None
    assert done.completion.subtask.state is SubtaskState.SUCCEEDED
    leased = [u.subtask for u in done.leases]
    assert [s.subtask_id for s in leased if s is not None] == ["t1-b", "t2-b"]
    for update in done.leases:
        assert update.subtask is not None and update.subtask.lease is not None
        assert update.subtask.lease.agent_id == "bob"
        assert await store.get_subtask(update.subtask.subtask_id) == update.subtask
    assert done.untried == ()
    assert len(calls) == 1  # one transaction, one commit
    assert (await subtask(store, "t2-a")).agent_id == "carol"


async def test_complete_and_lease_stops_at_capacity_and_a_repeat_leases_nothing(
    store: Store,
) -> None:
    await submit(store, subtasks=INDEPENDENT)
    await submit(store, "t2", subtasks=INDEPENDENT)
    token = await lease(store, "t1-a", "bob")
    await lease(store, "t2-a", "bob")

    done = await store.complete_and_lease(
        "t1-a", "bob", token, "1", NOW, epoch=1, candidates=["t1-b", "t2-b"], capacity=2
    )
    assert [u.subtask.subtask_id for u in done.leases if u.subtask] == ["t1-b"]
    assert done.untried == ("t2-b",)  # bob holds t2-a and t1-b: his capacity
    assert (await subtask(store, "t2-b")).state is SubtaskState.READY

    before = await store.current_revision()
    again = await store.complete_and_lease(
        "t1-a", "bob", token, "1", NOW, epoch=1, candidates=["t2-b"], capacity=8
    )
    assert again.leases == () and again.untried == ("t2-b",)
    assert again.completion.changed == ()
    assert await store.current_revision() == before

    with pytest.raises(FailedPrecondition):  # a refused completion leases nothing either
        await store.complete_and_lease(
            "t1-a", "bob", token + 100, "1", NOW, epoch=1, candidates=["t2-b"], capacity=8
        )
    assert (await subtask(store, "t2-b")).state is SubtaskState.READY


async def test_completions_unblock_dependents_and_the_last_ends_the_task(store: Store) -> None:
    await submit(store)

    first = await run(store, "t1-a", result='{"z":1,"a":["é"]}')
    assert first.subtask is not None and first.subtask.state is SubtaskState.SUCCEEDED
    assert first.subtask.lease is None and first.subtask.end_time == NOW
    assert [s.local_id for s in first.changed] == ["a", "b", "c"]
    assert await states(store) == {
        "a": SubtaskState.SUCCEEDED,
        "b": SubtaskState.READY,
        "c": SubtaskState.READY,
        "d": SubtaskState.BLOCKED,
    }
    # The result is kept as given: JSON text, not re-encoded.
    assert (await subtask(store, "t1-a")).result == '{"z":1,"a":["é"]}'

    await run(store, "t1-b", "carol")
    joined = await subtask(store, "t1-d")
    assert (joined.state, joined.waiting_on) == (SubtaskState.BLOCKED, 1)
    assert (await task_of(store)).state is TaskState.RUNNING

    await run(store, "t1-c")
    assert (await subtask(store, "t1-d")).state is SubtaskState.READY

    token = await lease(store, "t1-d")
    last = await store.complete_subtask("t1-d", "bob", token, '"done"', LATER, epoch=1)
    assert last.task.state is TaskState.SUCCEEDED
    assert last.task.end_time == LATER
    assert last.task.counts == SubtaskCounts(succeeded=4)
    assert await task_of(store) == last.task
    assert await store.load_open_subtasks() == []
    tail = await distribution_changes(store, after=last.task.revision - 2)
    assert [c.kind for c in tail] == ["subtask.succeeded", "task.succeeded"]

    # A repeat of the completion returns the sub-task unchanged and writes nothing.
    revision = await store.current_revision()
    again = await store.complete_subtask("t1-d", "bob", token, '"other"', LATER, epoch=1)
    assert again.subtask == last.subtask
    assert again.changed == ()
    assert again.task == last.task
    assert await store.current_revision() == revision
    # ... but a repeat by another agent is refused.
    with pytest.raises(FailedPrecondition):
        await store.complete_subtask("t1-d", "carol", token, '"done"', LATER, epoch=1)


async def test_completions_of_siblings_in_one_batch_see_each_other(store: Store) -> None:
    await submit(store)
    await run(store, "t1-a")
    left, right = await lease(store, "t1-b", "bob"), await lease(store, "t1-c", "carol")
    calls = commits(store)

    await asyncio.gather(
        store.complete_subtask("t1-b", "bob", left, "1", NOW, epoch=1),
        store.complete_subtask("t1-c", "carol", right, "2", NOW, epoch=1),
    )

    joined = await subtask(store, "t1-d")
    assert (joined.state, joined.waiting_on) == (SubtaskState.READY, 0)
    assert (await task_of(store)).counts == SubtaskCounts(ready=1, succeeded=3)
    assert len(calls) == 1  # one batch


# Failures


async def test_a_retryable_failure_makes_the_subtask_ready_after_a_back_off(store: Store) -> None:
    await submit(store)
    token = await lease(store, "t1-a")

    update = await store.fail_subtask(
        failure("t1-a", retryable=True), token, RetryPolicy(base=1.0), epoch=1
    )

    failed = update.subtask
    assert failed is not None and failed.state is SubtaskState.READY
    assert (failed.attempt, failed.burned_attempts, failed.lease) == (1, 1, None)
    assert failed.next_attempt_time == NOW + timedelta(seconds=1)
    assert failed.last_failure is not None
    assert failed.last_failure.failure_class is FailureClass.TASK_ERROR
    assert (failed.last_failure.attempt, failed.last_failure.fencing_token) == (1, token)
    assert update.task.state is TaskState.RUNNING
    assert await subtask(store, "t1-a") == failed
    [change] = await distribution_changes(store, after=update.task.revision - 1)
    assert change.kind == "subtask.ready"
    assert change.details["failure"]["message"] == "it broke"

    # A repeat of the report changes nothing.
    revision = await store.current_revision()
    again = await store.fail_subtask(failure("t1-a", retryable=True), token, RetryPolicy(), epoch=1)
    assert again.subtask == failed and await store.current_revision() == revision

    with pytest.raises(FailedPrecondition) as early:
        await leased(store, "t1-a", "carol")
    assert early.value.reason == "SUBTASK_NOT_READY"
    retried = await store.lease_subtask(
        "t1-a", "carol", NOW + timedelta(seconds=1), epoch=1, capacity=8
    )
    assert retried.subtask is not None and retried.subtask.lease is not None
    assert (retried.subtask.attempt, retried.subtask.lease.attempt) == (2, 2)
    assert retried.subtask.fencing_token > token


async def test_a_final_failure_fails_the_task_and_revokes_the_other_leases(store: Store) -> None:
    await submit(store, subtasks=INDEPENDENT)
    token = await lease(store, "t1-a", "bob")
    sibling = await leased(store, "t1-b", "carol")
    assert sibling.subtask is not None and sibling.subtask.lease is not None

    update = await store.fail_subtask(failure("t1-a"), token, RetryPolicy(base=1.0), epoch=1)

    assert update.task.state is TaskState.FAILED
    assert update.task.failure is not None and update.task.failure.subtask_id == "t1-a"
    assert update.task.end_time == NOW
    assert update.revocations == (Revocation(sibling.subtask.lease, "task_failed"),)
    assert await states(store) == {
        "a": SubtaskState.FAILED,
        "b": SubtaskState.CANCELLED,
        "c": SubtaskState.CANCELLED,
    }
    assert await task_of(store) == update.task
    assert update.task.counts == SubtaskCounts(failed=1, cancelled=2)
    assert await store.load_open_subtasks() == []

    # The revoked holder can no longer complete.
    with pytest.raises(FailedPrecondition) as revoked:
        await store.complete_subtask(
            "t1-b", "carol", sibling.subtask.lease.fencing_token, "1", NOW, epoch=1
        )
    assert revoked.value.reason == "STALE_FENCING_TOKEN"


async def test_a_failure_of_the_last_attempt_is_final(store: Store) -> None:
    await submit(store, subtasks=(SubtaskSpec("a", "Only", max_attempts=1),))
    token = await lease(store, "t1-a")

    update = await store.fail_subtask(
        failure("t1-a", retryable=True), token, RetryPolicy(), epoch=1
    )

    assert update.subtask is not None and update.subtask.state is SubtaskState.FAILED
    assert update.task.state is TaskState.FAILED


async def test_with_partial_results_a_failure_cancels_only_its_dependents(store: Store) -> None:
    await submit(store, subtasks=INDEPENDENT, allow_partial_results=True)
    token = await lease(store, "t1-a")

    update = await store.fail_subtask(failure("t1-a"), token, RetryPolicy(), epoch=1)

    assert update.task.state is TaskState.RUNNING
    assert await states(store) == {
        "a": SubtaskState.FAILED,
        "b": SubtaskState.READY,
        "c": SubtaskState.CANCELLED,
    }
    last = await run(store, "t1-b")
    assert last.task.state is TaskState.SUCCEEDED
    assert last.task.counts == SubtaskCounts(succeeded=1, failed=1, cancelled=1)
    assert "partial" in last.task.state_reason
    assert await task_of(store) == last.task


# Released leases (the holder died)


async def test_a_lease_belongs_to_a_session_and_only_ended_sessions_are_released(
    store: Store,
) -> None:
    await submit(store, subtasks=INDEPENDENT)
    old = await lease(store, "t1-a", "bob", epoch=1)
    new = await lease(store, "t1-b", "bob", epoch=2)

    # The later session does not hold the earlier one's lease, nor the other way round.
    with pytest.raises(FailedPrecondition) as inherited:
        await store.complete_subtask("t1-a", "bob", old, "1", NOW, epoch=2)
    assert inherited.value.reason == "LEASE_NOT_HELD"
    assert inherited.value.metadata["holder_epoch"] == "1"
    with pytest.raises(FailedPrecondition):
        await store.fail_subtask(failure("t1-b"), new, RetryPolicy(), epoch=1)

    updates = await store.release_leases("bob", LATER, through_epoch=1)

    assert [u.subtask.subtask_id for u in updates if u.subtask is not None] == ["t1-a"]
    released = await subtask(store, "t1-a")
    assert released.state is SubtaskState.READY and released.burned_attempts == 0
    kept = await subtask(store, "t1-b")
    assert kept.state is SubtaskState.LEASED and kept.lease is not None and kept.lease.epoch == 2
    done = await store.complete_subtask("t1-b", "bob", new, "2", NOW, epoch=2)
    assert done.subtask is not None and done.subtask.state is SubtaskState.SUCCEEDED


async def test_a_lease_to_a_session_that_has_ended_is_refused(store: Store) -> None:
    """The lease transaction checks the stored session: a grant racing with the session's
    replacement (through another replica, say) is refused, not recorded under the dead
    epoch where no release would find it."""
    await submit(store, subtasks=INDEPENDENT)
    await registered(store, "bob", epoch=2)  # session 1 was replaced
    await registered(store, "carol")
    await store.end_agent_session("carol", 1, AgentState.LEFT, NOW)
    revision = await store.current_revision()

    for agent_id, epoch in (("bob", 1), ("carol", 1), ("dave", 1)):  # dave: never registered
        with pytest.raises(FailedPrecondition) as refused:
            await store.lease_subtask("t1-a", agent_id, NOW, epoch=epoch, capacity=8)
        assert refused.value.reason == "SESSION_ENDED"
        assert refused.value.metadata == {"agent_id": agent_id, "epoch": "1"}

    assert await store.current_revision() == revision
    assert (await subtask(store, "t1-a")).state is SubtaskState.READY
    assert await lease(store, "t1-a", "bob", epoch=2) > revision


async def test_release_leases_makes_the_agents_subtasks_ready_without_burning(
    store: Store,
) -> None:
    await submit(store, subtasks=INDEPENDENT)
    await submit(store, "t2", subtasks=INDEPENDENT)
    await lease(store, "t1-a", "bob")
    await lease(store, "t1-b", "bob")
    await lease(store, "t2-a", "bob")
    kept = await lease(store, "t2-b", "carol")

    updates = await store.release_leases("bob", LATER, through_epoch=1)

    assert sorted(u.subtask.subtask_id for u in updates if u.subtask is not None) == [
        "t1-a",
        "t1-b",
        "t2-a",
    ]
    assert all(u.revocations == () for u in updates)
    for subtask_id in ("t1-a", "t1-b", "t2-a"):
        released = await subtask(store, subtask_id)
        assert released.state is SubtaskState.READY
        assert (released.lease, released.next_attempt_time) == (None, None)
        assert (released.attempt, released.burned_attempts) == (1, 0)
        assert released.last_failure is not None
        assert released.last_failure.failure_class is FailureClass.AGENT_DIED
        assert released.last_failure.agent_id == "bob"
    carols = await subtask(store, "t2-b")
    assert carols.state is SubtaskState.LEASED and carols.fencing_token == kept
    assert (await task_of(store, "t1")).counts == SubtaskCounts(blocked=1, ready=2)
    assert (await task_of(store, "t2")).counts == SubtaskCounts(blocked=1, ready=1, leased=1)

    revision = await store.current_revision()
    assert await store.release_leases("bob", LATER, through_epoch=1) == []
    assert await store.current_revision() == revision

    # Retried at once, as the next attempt.
    again = await leased(store, "t1-a", "carol", LATER)
    assert again.subtask is not None and again.subtask.attempt == 2


# Cancellation


async def test_cancel_task_cancels_the_unfinished_subtasks_and_revokes_leases(
    store: Store,
) -> None:
    await submit(store)
    await run(store, "t1-a")
    held = await leased(store, "t1-b", "bob")
    assert held.subtask is not None and held.subtask.lease is not None

    update = await store.cancel_task("t1", "not needed", "alice", LATER, canceller="admin")

    assert update.task.state is TaskState.CANCELLED
    assert (update.task.state_reason, update.task.end_time) == ("not needed", LATER)
    assert update.subtask is None
    assert update.revocations == (Revocation(held.subtask.lease, "task_cancelled"),)
    assert [s.local_id for s in update.changed] == ["b", "c", "d"]
    assert await states(store) == {
        "a": SubtaskState.SUCCEEDED,
        "b": SubtaskState.CANCELLED,
        "c": SubtaskState.CANCELLED,
        "d": SubtaskState.CANCELLED,
    }
    assert await task_of(store) == update.task
    tail = await distribution_changes(store, after=update.task.revision - 1)
    assert [(c.kind, c.agent_id) for c in tail] == [("task.cancelled", "alice")]

    revision = await store.current_revision()
    again = await store.cancel_task("t1", "again", "alice", LATER, canceller="admin")
    assert again == TaskUpdate(update.task, None, (), ())
    assert await store.current_revision() == revision

    with pytest.raises(NotFound):
        await store.cancel_task("t9", "", "alice", NOW, canceller="admin")


async def test_an_ended_task_cannot_be_cancelled(store: Store) -> None:
    await submit(store, subtasks=(SubtaskSpec("a", "Only"),))
    await run(store, "t1-a")
    revision = await store.current_revision()

    with pytest.raises(FailedPrecondition) as raised:
        await store.cancel_task("t1", "", "alice", NOW, canceller="admin")

    assert raised.value.reason == "TASK_ENDED"
    assert (await task_of(store)).state is TaskState.SUCCEEDED
    assert await store.current_revision() == revision


# Reads


async def test_list_tasks_newest_first_with_filters_and_pages(store: Store) -> None:
    times = {
        "t1": NOW,
        "t2": NOW + timedelta(seconds=1),
        "t3": NOW + timedelta(seconds=1),  # a tie: task_id decides
        "t4": NOW + timedelta(seconds=2, microseconds=1),
        "t5": NOW + timedelta(seconds=3),
        "t6": NOW - timedelta(days=400),
    }
    for task_id, time in times.items():
        submitter = "bob" if task_id in ("t2", "t5") else "alice"
        await submit(
            store, task_id, subtasks=(SubtaskSpec("a", "Only"),), submitter=submitter, now=time
        )
    await lease(store, "t3-a")
    await lease(store, "t5-a")
    await store.cancel_task("t6", "", "alice", NOW, canceller="admin")

    everything = await store.list_tasks(TaskFilter(), None, 100)
    assert [t.task_id for t in everything] == ["t5", "t4", "t3", "t2", "t1", "t6"]
    assert everything == [await task_of(store, t.task_id) for t in everything]

    for size in (1, 2, 4):
        paged: list[Task] = []
        cursor: TaskCursor | None = None
        while True:
            page = await store.list_tasks(TaskFilter(), cursor, size)
            assert len(page) <= size
            paged.extend(page)
            if len(page) < size:
                break
            cursor = TaskCursor(page[-1].create_time, page[-1].task_id)
        assert paged == everything

    async def ids(where: TaskFilter, after: TaskCursor | None = None) -> list[str]:
        return [t.task_id for t in await store.list_tasks(where, after, 100)]

    running = frozenset({TaskState.RUNNING})
    assert await ids(TaskFilter(states=running)) == ["t5", "t3"]
    assert await ids(TaskFilter(states=running | {TaskState.CANCELLED})) == ["t5", "t3", "t6"]
    assert await ids(TaskFilter(states=frozenset({TaskState.SUCCEEDED}))) == []
    assert await ids(TaskFilter(submitter_agent_id="bob")) == ["t5", "t2"]
    assert await ids(TaskFilter(running, "bob")) == ["t5"]
    assert await ids(TaskFilter(submitter_agent_id="nobody")) == []
    after_t3 = TaskCursor(times["t3"], "t3")
    assert await ids(TaskFilter(), after_t3) == ["t2", "t1", "t6"]
    assert await ids(TaskFilter(submitter_agent_id="alice"), after_t3) == ["t1", "t6"]
    # A cursor in another time zone is the same instant.
    local = TaskCursor(times["t3"].astimezone(timezone(timedelta(hours=-5))), "t3")
    assert await ids(TaskFilter(), local) == ["t2", "t1", "t6"]

    with pytest.raises(InvalidInput):
        await store.list_tasks(TaskFilter(), None, 0)


async def test_load_open_subtasks_returns_the_ready_and_leased_ones(store: Store) -> None:
    assert await store.load_open_subtasks() == []
    await submit(store)
    await submit(store, "t2", subtasks=INDEPENDENT)
    await submit(store, "t3", subtasks=INDEPENDENT)
    await run(store, "t1-a")  # b, c ready; d blocked
    await lease(store, "t1-b")
    await lease(store, "t2-a")
    await store.cancel_task("t3", "", "alice", NOW, canceller="admin")

    open_subtasks = await store.load_open_subtasks()

    assert sorted(s.subtask_id for s in open_subtasks) == ["t1-b", "t1-c", "t2-a", "t2-b"]
    assert open_subtasks == [await subtask(store, s.subtask_id) for s in open_subtasks]
    assert {s.state for s in open_subtasks} == {SubtaskState.READY, SubtaskState.LEASED}


# StateSync writes fenced by a lease


async def test_a_fenced_state_write_needs_the_current_lease(store: Store) -> None:
    await submit(store)
    token = await lease(store, "t1-a", "bob")

    def fenced(agent_id: str, fencing_token: int, key: str = "k", epoch: int = 1) -> StateWrite:
        fencing = Fencing("t1-a", fencing_token)
        return StateWrite(agent_id, (), (put(key),), NOW, fencing, epoch=epoch)

    result = await store.write_states(fenced("bob", token))
    assert result.results[0].state is not None
    assert result.results[0].state.agent_id == "bob"

    revision = await store.current_revision()
    with pytest.raises(FailedPrecondition) as stale:
        await store.write_states(fenced("bob", token - 1, "other"))
    with pytest.raises(FailedPrecondition) as other:
        await store.write_states(fenced("carol", token, "other"))
    with pytest.raises(FailedPrecondition) as later_session:
        await store.write_states(fenced("bob", token, "other", epoch=2))
    assert stale.value.reason == "STALE_FENCING_TOKEN"
    assert other.value.reason == "LEASE_NOT_HELD"
    assert later_session.value.reason == "LEASE_NOT_HELD"
    assert await store.get_state("other") is None
    assert await store.current_revision() == revision

    await store.complete_subtask("t1-a", "bob", token, "1", NOW, epoch=1)
    with pytest.raises(FailedPrecondition) as ended:
        await store.write_states(fenced("bob", token, "other"))
    assert ended.value.reason == "STALE_FENCING_TOKEN"
    assert await store.get_state("other") is None


async def test_a_fenced_write_at_or_after_the_leases_expire_time_is_refused(store: Store) -> None:
    # Checked in the write's own transaction against the lease's record: no window between
    # the expiry and Distribution's sweep in which a late write of a lost lease lands.
    await submit(store)
    token = await lease(store, "t1-a", "bob")
    expire = (await subtask(store, "t1-a")).lease.expire_time  # type: ignore[union-attr]

    def fenced(at: datetime, key: str) -> StateWrite:
        return StateWrite("bob", (), (put(key),), at, Fencing("t1-a", token), epoch=1)

    await store.write_states(fenced(expire - timedelta(milliseconds=1), "before"))
    revision = await store.current_revision()
    with pytest.raises(FailedPrecondition) as late:
        await store.write_states(fenced(expire, "late"))
    assert late.value.reason == "LEASE_EXPIRED"
    assert late.value.metadata == {"subtask_id": "t1-a", "fencing_token": str(token)}
    assert await store.get_state("late") is None
    assert await store.current_revision() == revision

    # A heartbeat's renewal moves the record's expire time (no change log entry); a renewal
    # of an older lease, or to an earlier time, changes nothing.
    later = expire + timedelta(seconds=30)
    assert await store.renew_leases([LeaseRenewal("t1-a", token, later)]) == 1
    assert (
        await store.renew_leases([LeaseRenewal("t1-a", token - 1, later + timedelta(days=1))]) == 0
    )
    assert await store.renew_leases([LeaseRenewal("t1-a", token, expire)]) == 0
    assert await store.current_revision() == revision
    assert (await subtask(store, "t1-a")).lease.expire_time == later  # type: ignore[union-attr]
    await store.write_states(fenced(expire + timedelta(seconds=1), "renewed"))
    with pytest.raises(FailedPrecondition) as again:
        await store.write_states(fenced(later, "late"))
    assert again.value.reason == "LEASE_EXPIRED"


# Durability


async def test_tasks_survive_a_restart(store_url: str) -> None:
    async with opened(store_url) as store:
        await submit(store, request_id="r1")
        await run(store, "t1-a")
        token = await lease(store, "t1-b", "carol")
        before = (
            await store.get_task("t1"),
            await store.list_subtasks("t1"),
            await all_changes(store),
            await store.load_open_subtasks(),
        )

    async with opened(store_url) as store:
        after = (
            await store.get_task("t1"),
            await store.list_subtasks("t1"),
            await all_changes(store),
            await store.load_open_subtasks(),
        )
        assert after == before
        # The idempotency key, the lease and the DAG carry on.
        again, _, created = await store.submit_task(*make_task("t2", request_id="r1"))
        assert (again, created) == (before[0], False)
        await store.complete_subtask("t1-b", "carol", token, "2", NOW, epoch=1)
        await run(store, "t1-c")
        last = await run(store, "t1-d")
        assert last.task.state is TaskState.SUCCEEDED


PROGRESS_COLUMNS = SUBTASK_PROGRESS_COLUMNS[1:]
"""The sub-task columns of migration 0007 (``state`` and ``lease_agent_id`` are older)."""


async def back_to_bodies(store_url: str, subtasks: list[Subtask]) -> None:
    """Return a store to the sub-task rows of migrations 0003-0006: the record in ``body``.

    ``subtasks`` are the records as stored; each row's body becomes their snapshot, as the
    code before 0007 wrote it, and the columns of 0007 go.
    """
    added = [c for c in PROGRESS_COLUMNS if c not in ("state", "lease_agent_id")]
    rows = [
        (
            canonical_json(s.to_snapshot()),
            s.lease.agent_id if s.state is SubtaskState.LEASED and s.lease else "",
            s.subtask_id,
        )
        for s in subtasks
    ]
    if store_url.startswith("sqlite:"):
        path = store_url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.executemany(
                "UPDATE subtasks SET body = ?, lease_agent_id = ? WHERE subtask_id = ?", rows
            )
            for column in added:
                conn.execute(f"ALTER TABLE subtasks DROP COLUMN {column}")
            conn.execute("DELETE FROM schema_migrations WHERE version = 7")
        return
    async with raw_postgres(store_url) as (conn, schema):
        await conn.execute(f'SET search_path TO "{schema}"')
        await conn.executemany(
            "UPDATE subtasks SET body = $1::jsonb, lease_agent_id = $2 WHERE subtask_id = $3",
            rows,
        )
        drops = ", ".join(f"DROP COLUMN {column}" for column in added)
        await conn.execute(f"ALTER TABLE subtasks {drops}")
        await conn.execute("DELETE FROM schema_migrations WHERE version = 7")


async def test_the_progress_columns_migration_keeps_every_subtask(store_url: str) -> None:
    """Sub-tasks written before 0007 (the whole record in body) read and move on as before."""
    async with opened(store_url) as store:
        await submit(store)
        await submit(store, "t2", subtasks=INDEPENDENT)
        await run(store, "t1-a", result='{"pages":[1,2]}')
        held = await lease(store, "t1-b")
        await leased(store, "t2-a")
        await store.lease_subtask("t2-b", "bob", NOW, epoch=1, capacity=8, claim_request_id="c1")
        failed = (await subtask(store, "t2-a")).lease
        assert failed is not None
        await store.fail_subtask(
            failure("t2-a", retryable=True), failed.fencing_token, RetryPolicy(), epoch=1
        )
        before = [*await store.list_subtasks("t1"), *await store.list_subtasks("t2")]
    assert {s.state for s in before} == {
        SubtaskState.SUCCEEDED,
        SubtaskState.LEASED,
        SubtaskState.READY,
        SubtaskState.BLOCKED,
    }
    await back_to_bodies(store_url, before)

    async with opened(store_url) as store:
        after = [*await store.list_subtasks("t1"), *await store.list_subtasks("t2")]
        assert after == before
        assert [s.subtask_id for s in await store.load_open_subtasks()] == [
            s.subtask_id for s in before if s.state in (SubtaskState.READY, SubtaskState.LEASED)
        ]
        done = await store.complete_subtask("t1-b", "bob", held, "2", NOW, epoch=1)
        assert done.subtask is not None and done.subtask.result == "2"
        again = await store.lease_subtask("t2-a", "bob", LATER, epoch=1, capacity=8)
        assert again.subtask is not None and again.subtask.attempt == 2
    async with opened(store_url) as store:
        assert (await subtask(store, "t1-a")).result == '{"pages":[1,2]}'
        assert (await subtask(store, "t1-b")).state is SubtaskState.SUCCEEDED
        claimed = (await subtask(store, "t2-b")).lease
        assert claimed is not None and claimed.claim_request_id == "c1"


async def test_the_identity_migration_keeps_tasks_and_leases(tmp_path: Path) -> None:
    """Data written before 0004 gets its submitter and its lease's session."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    async with opened(url) as store:
        agent = await store.register_agent(
            Agent("bob", "Bob", "", (), 1, {}, (), 10.0), "hash", NOW
        )
        await submit(store, submitter="alice", request_id="r1")
        token = await lease(store, "t1-a", "bob", epoch=agent.epoch)
        subtasks = await store.list_subtasks("t1")
    # Back to the schema and bodies of migration 0003 (0007 runs again after 0004).
    await back_to_bodies(url, subtasks)
    with contextlib.closing(sqlite3.connect(tmp_path / "old.db")) as conn, conn:
        conn.executescript(
            """
            DROP INDEX tasks_submitter_request_id;
            ALTER TABLE tasks DROP COLUMN submitter;
            CREATE UNIQUE INDEX tasks_request_id ON tasks (request_id) WHERE request_id <> '';
            UPDATE tasks SET body = json_remove(body, '$.submitter');
            UPDATE subtasks SET body = json_remove(body, '$.lease.epoch');
            DELETE FROM schema_migrations WHERE version = 4;
            """
        )

    async with opened(url) as store:
        task = await task_of(store)
        assert task.submitter == "agent:alice"
        again, _, created = await store.submit_task(*make_task("t2", request_id="r1"))
        assert (again.task_id, created) == ("t1", False)
        held = await subtask(store, "t1-a")
        assert held.lease is not None and held.lease.epoch == agent.epoch
        done = await store.complete_subtask("t1-a", "bob", token, "1", NOW, epoch=agent.epoch)
        assert done.subtask is not None and done.subtask.state is SubtaskState.SUCCEEDED


async def test_skill_requirements_are_stored_and_the_migration_keeps_older_tasks(
    store_url: str,
) -> None:
    """Tasks written before 0006 require no skills and carry on; new ones keep theirs."""
    async with opened(store_url) as store:
        await submit(store)
        token = await lease(store, "t1-a")
    # Back to the bodies of migration 0005, which had no skill requirements.
    if store_url.startswith("sqlite:"):
        path = store_url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.executescript(
                """
                UPDATE tasks SET body = json_remove(body, '$.required_skills');
                UPDATE subtasks SET body = json_remove(body, '$.required_skills');
                DELETE FROM schema_migrations WHERE version = 6;
                """
            )
    else:
        async with raw_postgres(store_url) as (conn, schema):
            await conn.execute(
                f"""
                SET search_path TO "{schema}";
                UPDATE tasks SET body = body - 'required_skills';
                UPDATE subtasks SET body = body - 'required_skills';
                DELETE FROM schema_migrations WHERE version = 6;
                """
            )

    async with opened(store_url) as store:
        assert (await task_of(store)).required_skills == ()
        assert {s.required_skills for s in await store.list_subtasks("t1")} == {()}
        done = await store.complete_subtask("t1-a", "bob", token, "1", NOW, epoch=1)
        assert done.subtask is not None and done.subtask.state is SubtaskState.SUCCEEDED
        subtasks = (
            SubtaskSpec("a", "Translate", required_skills=("translate", "fr")),
            SubtaskSpec("b", "Review", depends_on=("a",)),
        )
        await submit(store, "t2", subtasks=subtasks, required_skills=("fr",))
    async with opened(store_url) as store:
        assert (await task_of(store, "t2")).required_skills == ("fr",)
        needs = {s.local_id: s.required_skills for s in await store.list_subtasks("t2")}
        assert needs == {"a": ("fr", "translate"), "b": ("fr",)}
        ready = [s for s in await store.load_open_subtasks() if s.task_id == "t2"]
        assert [s.required_skills for s in ready] == [("fr", "translate")]


async def test_subtasks_are_counted_by_state_and_commits_are_observed(store: Store) -> None:
    await registered(store, "bob")
    observed: list[tuple[float, int]] = []
    store.observe_commits(lambda seconds, operations: observed.append((seconds, operations)))
    assert await store.count_subtasks() == SubtaskCounts()
    await asyncio.gather(store.submit_task(*make_task("t1")), store.submit_task(*make_task("t2")))
    await store.lease_subtask("t1-a", "bob", NOW, epoch=1, capacity=8)

    assert await store.count_subtasks() == SubtaskCounts(blocked=6, ready=1, leased=1)
    assert sum(operations for _, operations in observed) == 3
    assert all(seconds >= 0 for seconds, _ in observed)
