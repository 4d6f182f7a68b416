"""Distribution's pure rules, driven the way the store drives them (no store, no gRPC).

Each operation builds a fresh :class:`TaskTransitions` from the records the previous one
returned, with a journal that carries on the revisions, exactly like
``agentcoord.store.task_writes``; a refused operation persists nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest

from agentcoord.core.errors import FailedPrecondition, InvalidInput
from agentcoord.core.models import Change, Service
from agentcoord.core.state_rules import PlannedChange
from agentcoord.core.task_rules import (
    Journal,
    RetryPolicy,
    Revocation,
    TaskDefaults,
    TaskTransitions,
    aggregate_result,
    build_task,
    cancel_task,
    check_holder,
    check_plan,
    complete_subtask,
    fail_subtask,
    lease_subtask,
    plan_of,
    retry_delay,
    task_after,
    topological_order,
)
from agentcoord.core.tasks import (
    Failure,
    FailureClass,
    Plan,
    SplitPolicy,
    Subtask,
    SubtaskCounts,
    SubtaskSpec,
    SubtaskState,
    Task,
    TaskSpec,
    TaskState,
    canonical_json,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
RETRY = RetryPolicy(base=2.0, cap=60.0)
T = TypeVar("T")


def sub(local_id: str, *depends_on: str, **fields: Any) -> SubtaskSpec:
    return SubtaskSpec(local_id=local_id, title=f"do {local_id}", depends_on=depends_on, **fields)


def explicit(*subtasks: SubtaskSpec, **fields: Any) -> TaskSpec:
    return TaskSpec(title="job", split_policy=SplitPolicy.EXPLICIT, subtasks=subtasks, **fields)


def plan(*subtasks: SubtaskSpec, aggregation: str = "") -> Plan:
    return Plan(False, "test", subtasks, aggregation_local_id=aggregation)


def counter_ids() -> Callable[[], str]:
    count = 0

    def new_id() -> str:
        nonlocal count
        count += 1
        return f"id-{count}"

    return new_id


def build(spec: TaskSpec, defaults: TaskDefaults | None = None) -> tuple[Task, list[Subtask]]:
    return build_task(
        spec,
        plan_of(spec),
        new_id=counter_ids(),
        submitter_agent_id="planner",
        submitter="agent:planner",
        request_id="",
        now=NOW,
        defaults=defaults or TaskDefaults(),
    )


@dataclass
class Step:
    """What one operation returned and journaled."""

    tx: TaskTransitions
    entries: list[PlannedChange]

    @property
    def kinds(self) -> list[str]:
        return [e.change.kind for e in self.entries]

    def entry(self, kind: str) -> PlannedChange:
        (found,) = [e for e in self.entries if e.change.kind == kind]
        return found


@dataclass
class World:
    """The records a store would hold for one task, and its change log."""

    task: Task
    subtasks: dict[str, Subtask]
    log: list[PlannedChange] = field(default_factory=list)

    @property
    def next_revision(self) -> int:
        return self.log[-1].revision + 1 if self.log else 1

    def by_local(self, local_id: str) -> Subtask:
        (found,) = [s for s in self.subtasks.values() if s.local_id == local_id]
        return found

    def id_of(self, local_id: str) -> str:
        return self.by_local(local_id).subtask_id

    def run(
        self, op: Callable[[TaskTransitions], T], *, now: datetime = NOW, actor: str = ""
    ) -> tuple[T, Step]:
        """Apply ``op`` like the store: fresh transitions, persist only if it returns."""
        journal = Journal(next_revision=self.next_revision)
        tx = TaskTransitions(self.task, self.subtasks, journal, now, actor)
        value = op(tx)
        self.task = tx.task
        self.subtasks.update(tx.changed)
        self.log.extend(journal.entries)
        return value, Step(tx, list(journal.entries))

    def lease(self, local_id: str, agent: str = "agent-a", now: datetime = NOW) -> Subtask:
        subtask_id = self.id_of(local_id)
        leased, _ = self.run(
            lambda tx: lease_subtask(tx, subtask_id, agent, now, epoch=1), actor=agent
        )
        return leased

    def complete(self, local_id: str, result: Any = None, agent: str = "agent-a") -> Step:
        subtask = self.by_local(local_id)
        token = subtask.lease.fencing_token if subtask.lease else subtask.fencing_token
        _, step = self.run(
            lambda tx: complete_subtask(
                tx, subtask.subtask_id, agent, token, canonical_json(result), epoch=1
            ),
            actor=agent,
        )
        return step

    def fail(
        self,
        local_id: str,
        failure_class: FailureClass = FailureClass.TASK_ERROR,
        *,
        retryable: bool = True,
        agent: str = "agent-a",
        time: datetime = NOW,
        token: int | None = None,
    ) -> tuple[Subtask, Step]:
        subtask = self.by_local(local_id)
        if token is None:
            assert subtask.lease is not None
            token = subtask.lease.fencing_token
        failure = Failure(
            failure_class=failure_class,
            message=f"{local_id} broke",
            retryable=retryable,
            subtask_id=subtask.subtask_id,
            agent_id=agent,
            attempt=0,
            time=time,
        )
        fencing_token = token
        return self.run(
            lambda tx: fail_subtask(tx, failure, fencing_token, RETRY, epoch=1),
            now=time,
            actor=agent,
        )

    def cancel(self, reason: str = "no longer needed") -> tuple[bool, Step]:
        return self.run(lambda tx: cancel_task(tx, reason, canceller="admin"), actor="planner")

    def result(self) -> Any:
        text = aggregate_result(self.task, list(self.subtasks.values()))
        return None if text is None else json.loads(text)

    def check(self) -> None:
        """Invariants the store relies on after every operation."""
        states = [s.state for s in self.subtasks.values()]
        expected = SubtaskCounts(**{st.value: states.count(st) for st in SubtaskState})
        assert self.task.counts == expected
        assert self.task.counts.total == len(self.subtasks)
        assert [e.revision for e in self.log] == list(range(1, len(self.log) + 1))
        assert self.task.revision == self.log[-1].revision
        for entry in self.log:
            assert entry.change.service is Service.DISTRIBUTION
            assert entry.change.subject == self.task.task_id
        for subtask in self.subtasks.values():
            assert subtask.revision == max(
                e.revision
                for e in self.log
                if e.change.kind.startswith("subtask.")
                and e.change.details["subtask_id"] == subtask.subtask_id
            )
            assert (subtask.lease is not None) == (subtask.state is SubtaskState.LEASED)
            assert (subtask.end_time is not None) == subtask.state.is_final


def submit(spec: TaskSpec, defaults: TaskDefaults | None = None) -> World:
    """Build the task and store it the way ``SubmitTask`` does."""
    task, subtasks = build(spec, defaults)
    world = World(task, {})

    def store(tx: TaskTransitions) -> None:
        tx.record_submission()
        for subtask in subtasks:
            tx.create(subtask)

    world.run(store, actor="planner")
    world.check()
    return world


def diamond(**fields: Any) -> World:
    """``a`` first, then ``b`` and ``c``, then ``d``."""
    return submit(explicit(sub("a"), sub("b", "a"), sub("c", "a"), sub("d", "b", "c"), **fields))


def state_of(world: World, *local_ids: str) -> list[SubtaskState]:
    return [world.by_local(local_id).state for local_id in local_ids]


# DAG validation


def test_a_valid_dag_passes() -> None:
    check_plan(plan(sub("a"), sub("b", "a"), sub("c", "a", "b"), aggregation="c"))


@pytest.mark.parametrize(
    ("subtasks", "field_name", "words"),
    [
        ((sub("a"), sub("b"), sub("a")), "task.subtasks[2].local_id", "duplicate"),
        ((sub("a"), sub("b", "a"), sub("c", "a", "nope")), "task.subtasks[2].depends_on", "nope"),
        ((sub("a"), sub("b", "b")), "task.subtasks[1].depends_on", "itself"),
        ((sub("a", "c"), sub("b", "a"), sub("c", "b"), sub("d")), "task.subtasks", "cycle"),
    ],
    ids=["duplicate", "unknown", "self", "cycle"],
)
def test_invalid_dags_name_the_offending_field(
    subtasks: tuple[SubtaskSpec, ...], field_name: str, words: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_plan(plan(*subtasks))
    assert caught.value.field == field_name
    assert words in caught.value.description
    assert caught.value.reason == "INVALID_ARGUMENT"


def test_check_plan_reports_under_the_given_field_name() -> None:
    with pytest.raises(InvalidInput) as caught:
        check_plan(plan(sub("a"), sub("b", "x")), "plan.subtasks")
    assert caught.value.field == "plan.subtasks[1].depends_on"


def test_aggregation_must_depend_on_every_other_subtask() -> None:
    with pytest.raises(InvalidInput) as caught:
        check_plan(plan(sub("a"), sub("b"), sub("c"), sub("agg", "a", "c"), aggregation="agg"))
    assert caught.value.field == "task.aggregation_local_id"
    assert "'b'" in caught.value.description


def test_aggregation_may_depend_on_the_others_transitively() -> None:
    check_plan(plan(sub("a"), sub("b"), sub("m", "a", "b"), sub("agg", "m"), aggregation="agg"))


def test_aggregation_of_an_unknown_local_id_is_refused() -> None:
    with pytest.raises(InvalidInput) as caught:
        check_plan(plan(sub("a"), aggregation="zzz"))
    assert caught.value.field == "task.aggregation_local_id"


def test_build_task_refuses_an_invalid_plan() -> None:
    spec = explicit(sub("a", "b"), sub("b", "a"))
    with pytest.raises(InvalidInput):
        build_task(
            spec,
            plan(*spec.subtasks),
            new_id=counter_ids(),
            submitter_agent_id="planner",
            submitter="agent:planner",
            request_id="",
            now=NOW,
            defaults=TaskDefaults(),
        )


# Topological order


def test_topological_order_keeps_a_given_topological_order() -> None:
    given = plan(sub("a"), sub("b"), sub("c", "b"), sub("d", "a"), sub("e", "c", "d"))
    assert topological_order(given) == [0, 1, 2, 3, 4]


def test_topological_order_is_stable_earliest_ready_first() -> None:
    # Whenever several are ready, the earliest in the plan goes first: a (not b), then c
    # (ready now, and before b), then d (ready now, and before b), then b.
    given = plan(sub("c", "a"), sub("a"), sub("d", "c"), sub("b"))
    assert topological_order(given) == [1, 0, 2, 3]


def test_topological_order_is_none_for_a_cycle() -> None:
    assert topological_order(plan(sub("a", "b"), sub("b", "a"), sub("c"))) is None


def test_repeated_dependencies_count_once() -> None:
    assert topological_order(plan(sub("b", "a", "a"), sub("a"))) == [1, 0]


# Plans


def test_policy_none_runs_the_task_as_one_subtask() -> None:
    spec = TaskSpec(title="whole", split_policy=SplitPolicy.NONE, description="all of it")
    result = plan_of(spec)
    assert [(s.local_id, s.title, s.description) for s in result.subtasks] == [
        ("main", "whole", "all of it")
    ]
    assert result.parallelizable is False
    assert result.splitter == "none"


def test_explicit_plan_is_in_topological_order() -> None:
    result = plan_of(explicit(sub("report", "fetch"), sub("fetch"), aggregation_local_id="report"))
    assert [s.local_id for s in result.subtasks] == ["fetch", "report"]
    assert result.aggregation_local_id == "report"
    assert result.splitter == "explicit"


def test_explicit_plan_errors_name_positions_in_the_spec() -> None:
    with pytest.raises(InvalidInput) as caught:
        plan_of(explicit(sub("b", "a"), sub("a"), sub("c", "zz")))
    assert caught.value.field == "task.subtasks[2].depends_on"


@pytest.mark.parametrize(
    ("subtasks", "parallelizable"),
    [
        ((sub("a"),), False),
        ((sub("a"), sub("b", "a"), sub("c", "b")), False),
        ((sub("a"), sub("b")), True),
        ((sub("a"), sub("b", "a"), sub("c", "a")), True),
        ((sub("a"), sub("b", "a"), sub("c", "a"), sub("d", "b", "c")), True),
    ],
    ids=["single", "chain", "independent", "fan-out", "diamond"],
)
def test_explicit_plan_says_whether_two_subtasks_can_run_at_once(
    subtasks: tuple[SubtaskSpec, ...], parallelizable: bool
) -> None:
    assert plan_of(explicit(*subtasks)).parallelizable is parallelizable


# Building a task


def test_build_task_orders_subtasks_and_links_the_dag() -> None:
    task, subtasks = build(explicit(sub("d", "b", "c"), sub("a"), sub("b", "a"), sub("c", "a")))
    assert task.task_id == "id-1"
    assert [(s.local_id, s.seq) for s in subtasks] == [("a", 0), ("b", 1), ("c", 2), ("d", 3)]
    ids = {s.local_id: s.subtask_id for s in subtasks}
    assert len(set(ids.values()) | {task.task_id}) == 5
    by_local = {s.local_id: s for s in subtasks}
    assert by_local["a"].state is SubtaskState.READY
    assert by_local["a"].waiting_on == 0
    assert by_local["a"].dependents == (ids["b"], ids["c"])
    assert by_local["d"].state is SubtaskState.BLOCKED
    assert by_local["d"].waiting_on == 2
    assert by_local["d"].depends_on == (ids["b"], ids["c"])
    assert by_local["d"].dependents == ()
    assert all(s.task_id == task.task_id for s in subtasks)
    assert all(s.revision == 0 and s.attempt == 0 and s.lease is None for s in subtasks)
    assert task.state is TaskState.PENDING
    assert task.submitter_agent_id == "planner"


def test_build_task_merges_repeated_dependencies() -> None:
    _, subtasks = build(explicit(sub("a"), sub("b", "a", "a")))
    a, b = subtasks
    assert b.waiting_on == 1
    assert b.depends_on == (a.subtask_id,)
    assert a.dependents == (b.subtask_id,)


def test_build_task_copies_task_settings_into_subtasks() -> None:
    spec = explicit(
        sub("a", required_capabilities=("gpu", "python")),
        sub("b", input='{"own":1}', max_attempts=7),
        required_capabilities=("python", "linux"),
        input='{"shared":true}',
        priority=5,
        max_attempts=4,
    )
    _, (a, b) = build(spec)
    assert a.required_capabilities == ("gpu", "linux", "python")
    assert b.required_capabilities == ("linux", "python")
    assert a.input == '{"shared":true}'
    assert b.input == '{"own":1}'
    assert (a.max_attempts, b.max_attempts) == (4, 7)
    assert a.priority == b.priority == 5


def test_build_task_applies_server_defaults() -> None:
    defaults = TaskDefaults(max_attempts=6, lease_ttl=45.0)
    task, (only,) = build(explicit(sub("a")), defaults)
    assert task.max_attempts == only.max_attempts == 6
    assert task.lease_ttl == only.lease_ttl == 45.0
    assert task.aggregation_subtask_id == ""


@pytest.mark.parametrize(
    ("requested", "granted"), [(0.0, 30.0), (12.5, 12.5), (0.2, 1.0), (86400.0, 3600.0)]
)
def test_lease_ttl_is_defaulted_and_clamped(requested: float, granted: float) -> None:
    task, (only,) = build(explicit(sub("a"), lease_ttl=requested))
    assert task.lease_ttl == only.lease_ttl == granted


def test_build_task_names_the_aggregation_subtask() -> None:
    task, subtasks = build(
        explicit(sub("x"), sub("y"), sub("agg", "x", "y"), aggregation_local_id="agg")
    )
    assert task.aggregation_subtask_id == subtasks[-1].subtask_id
    assert subtasks[-1].local_id == "agg"


def test_submission_journals_the_task_then_each_subtask() -> None:
    world = diamond()
    assert [(e.revision, e.change.kind) for e in world.log] == [
        (1, "task.submitted"),
        (2, "subtask.ready"),
        (3, "subtask.blocked"),
        (4, "subtask.blocked"),
        (5, "subtask.blocked"),
    ]
    submitted = world.log[0].change
    assert submitted.agent_id == "planner"
    assert submitted.details["from"] is None
    assert submitted.details["to"] == "pending"
    created = world.log[1].change.details
    assert created["from"] is None
    assert created["to"] == "ready"
    assert created["local_id"] == "a"
    assert world.task.counts == SubtaskCounts(ready=1, blocked=3)


# Leasing


def test_lease_token_is_the_revision_of_its_journal_entry() -> None:
    world = diamond()
    subtask_id = world.id_of("a")
    leased, step = world.run(
        lambda tx: lease_subtask(tx, subtask_id, "agent-a", NOW, epoch=1), actor="agent-a"
    )
    assert step.kinds == ["subtask.leased", "task.running"]
    entry = step.entry("subtask.leased")
    assert leased.lease is not None
    assert leased.lease.fencing_token == entry.revision == 6
    assert leased.fencing_token == 6
    assert leased.lease.attempt == leased.attempt == 1
    assert leased.lease.agent_id == leased.agent_id == "agent-a"
    assert leased.lease.expire_time == NOW + timedelta(seconds=30)
    assert leased.state is SubtaskState.LEASED
    assert leased.start_time == NOW
    assert entry.change.agent_id == "agent-a"
    assert entry.change.details["from"] == "ready"
    assert entry.change.details["to"] == "leased"
    assert entry.change.details["attempt"] == 1
    assert entry.change.details["fencing_token"] == 6
    assert entry.change.details["failure"] is None
    running = step.entry("task.running").change.details
    assert (running["from"], running["to"]) == ("pending", "running")
    assert world.task.state is TaskState.RUNNING
    world.check()


def test_leases_of_a_running_task_get_growing_tokens_and_no_task_entry() -> None:
    world = submit(explicit(sub("a"), sub("b")))
    first = world.lease("a")
    subtask_id = world.id_of("b")
    second, step = world.run(lambda tx: lease_subtask(tx, subtask_id, "agent-b", NOW, epoch=1))
    assert step.kinds == ["subtask.leased"]
    assert first.lease is not None and second.lease is not None
    assert second.lease.fencing_token > first.lease.fencing_token
    world.check()


@pytest.mark.parametrize("local_id", ["b", "a"], ids=["blocked", "leased"])
def test_only_ready_subtasks_can_be_leased(local_id: str) -> None:
    world = submit(explicit(sub("a"), sub("b", "a")))
    world.lease("a")
    before = (world.task, dict(world.subtasks), len(world.log))
    with pytest.raises(FailedPrecondition) as caught:
        world.lease(local_id, agent="agent-b")
    assert caught.value.reason == "SUBTASK_NOT_READY"
    assert caught.value.metadata["subtask_id"] == world.id_of(local_id)
    assert (world.task, dict(world.subtasks), len(world.log)) == before


def test_a_subtask_backing_off_cannot_be_leased_until_its_next_attempt_time() -> None:
    world = submit(explicit(sub("a")))
    world.lease("a")
    failed, _ = world.fail("a")
    assert failed.next_attempt_time == NOW + timedelta(seconds=2)
    with pytest.raises(FailedPrecondition) as caught:
        world.lease("a", now=NOW + timedelta(seconds=1))
    assert caught.value.reason == "SUBTASK_NOT_READY"
    assert "back" in caught.value.message
    again = world.lease("a", agent="agent-b", now=NOW + timedelta(seconds=2))
    assert again.attempt == 2
    assert again.next_attempt_time is None
    assert again.start_time == NOW  # the first lease's
    world.check()


# Lease holders


def test_check_holder_accepts_the_current_holder_and_token() -> None:
    world = submit(explicit(sub("a")))
    leased = world.lease("a")
    assert leased.lease is not None
    check_holder(leased, "agent-a", leased.lease.fencing_token, epoch=1)


def test_check_holder_refuses_a_stale_token() -> None:
    world = submit(explicit(sub("a")))
    leased = world.lease("a")
    assert leased.lease is not None
    with pytest.raises(FailedPrecondition) as caught:
        check_holder(leased, "agent-a", leased.lease.fencing_token - 1, epoch=1)
    assert caught.value.reason == "STALE_FENCING_TOKEN"
    assert caught.value.metadata["current_fencing_token"] == str(leased.lease.fencing_token)


def test_check_holder_refuses_another_agent_with_the_right_token() -> None:
    world = submit(explicit(sub("a")))
    leased = world.lease("a")
    assert leased.lease is not None
    with pytest.raises(FailedPrecondition) as caught:
        check_holder(leased, "agent-b", leased.lease.fencing_token, epoch=1)
    assert caught.value.reason == "LEASE_NOT_HELD"


def test_a_token_of_an_ended_lease_is_stale() -> None:
    world = submit(explicit(sub("a")))
    first = world.lease("a")
    assert first.lease is not None
    world.fail("a", FailureClass.AGENT_DIED)
    with pytest.raises(FailedPrecondition) as ready:
        check_holder(world.by_local("a"), "agent-a", first.lease.fencing_token, epoch=1)
    assert ready.value.reason == "STALE_FENCING_TOKEN"
    world.lease("a", agent="agent-b")
    subtask_id = world.id_of("a")
    token = first.lease.fencing_token
    with pytest.raises(FailedPrecondition) as released:
        world.run(lambda tx: complete_subtask(tx, subtask_id, "agent-a", token, "1", epoch=1))
    assert released.value.reason == "STALE_FENCING_TOKEN"
    assert world.by_local("a").state is SubtaskState.LEASED
    assert world.by_local("a").agent_id == "agent-b"


# Completion


def test_completion_unblocks_dependents_only_when_all_prerequisites_succeeded() -> None:
    world = diamond()
    world.lease("a")
    step = world.complete("a", {"n": 1})
    assert step.kinds == ["subtask.succeeded", "subtask.ready", "subtask.ready"]
    assert state_of(world, "a", "b", "c", "d") == [
        SubtaskState.SUCCEEDED,
        SubtaskState.READY,
        SubtaskState.READY,
        SubtaskState.BLOCKED,
    ]
    world.lease("b")
    world.lease("c", agent="agent-b")
    step = world.complete("b")
    assert step.kinds == ["subtask.succeeded"]
    assert world.by_local("d").state is SubtaskState.BLOCKED
    assert world.by_local("d").waiting_on == 1
    world.check()
    step = world.complete("c", agent="agent-b")
    assert step.kinds == ["subtask.succeeded", "subtask.ready"]
    ready = step.entries[1].change.details
    assert (ready["local_id"], ready["from"], ready["to"]) == ("d", "blocked", "ready")
    assert world.by_local("d").waiting_on == 0
    assert world.task.state is TaskState.RUNNING
    world.check()


def test_a_retried_prerequisite_keeps_its_dependent_blocked() -> None:
    world = diamond()
    world.lease("a")
    world.complete("a")
    world.lease("b")
    world.lease("c", agent="agent-b")
    world.complete("b")
    world.fail("c", agent="agent-b")
    assert world.by_local("d").state is SubtaskState.BLOCKED
    assert world.by_local("d").waiting_on == 1
    world.check()


def test_the_last_completion_ends_the_task() -> None:
    world = submit(explicit(sub("a"), sub("b", "a")))
    world.lease("a")
    world.complete("a", "first")
    world.lease("b", agent="agent-b")
    step = world.complete("b", "second", agent="agent-b")
    assert step.kinds == ["subtask.succeeded", "task.succeeded"]
    done = world.by_local("b")
    assert done.result == '"second"'
    assert done.lease is None
    assert done.agent_id == "agent-b"
    assert done.end_time == NOW
    succeeded = step.entry("subtask.succeeded").change
    assert succeeded.agent_id == "agent-b"
    assert succeeded.details["fencing_token"] == done.fencing_token
    assert succeeded.details["attempt"] == 1
    assert world.task.state is TaskState.SUCCEEDED
    assert world.task.end_time == NOW
    assert world.task.failure is None
    assert world.task.counts == SubtaskCounts(succeeded=2)
    world.check()


def test_a_repeated_completion_changes_nothing() -> None:
    world = submit(explicit(sub("a"), sub("b")))
    world.lease("a")
    world.complete("a", 1)
    records = (world.task, dict(world.subtasks))
    step = world.complete("a", 1)
    assert step.entries == []
    assert step.tx.changed == {}
    assert (world.task, dict(world.subtasks)) == records
    with pytest.raises(FailedPrecondition) as caught:
        world.complete("a", 1, agent="agent-b")
    assert caught.value.reason == "STALE_FENCING_TOKEN"


def test_completing_a_subtask_not_leased_is_refused() -> None:
    world = submit(explicit(sub("a")))
    with pytest.raises(FailedPrecondition) as caught:
        world.complete("a")
    assert caught.value.reason == "STALE_FENCING_TOKEN"
    assert len(world.log) == 2


# Failures


def test_a_task_error_with_attempts_left_is_retried_after_a_back_off() -> None:
    world = submit(explicit(sub("a"), max_attempts=3))
    leased = world.lease("a")
    assert leased.lease is not None
    later = NOW + timedelta(seconds=5)
    failed, step = world.fail("a", time=later)
    assert failed.state is SubtaskState.READY
    assert failed.burned_attempts == 1
    assert failed.lease is None
    assert failed.next_attempt_time == later + timedelta(seconds=retry_delay(1, 2.0, 60.0))
    assert failed.last_failure is not None
    assert failed.last_failure.attempt == 1
    assert failed.last_failure.fencing_token == leased.lease.fencing_token
    assert step.kinds == ["subtask.ready"]
    details = step.entries[0].change.details
    assert (details["from"], details["to"]) == ("leased", "ready")
    assert details["fencing_token"] == leased.lease.fencing_token
    assert details["failure"]["failure_class"] == "task_error"
    assert details["failure"]["message"] == "a broke"
    assert world.task.state is TaskState.RUNNING

    world.lease("a", now=failed.next_attempt_time)
    again, _ = world.fail("a", time=later)
    assert again.burned_attempts == 2
    assert again.next_attempt_time == later + timedelta(seconds=4)  # doubled
    world.check()


def test_a_timeout_burns_an_attempt_and_backs_off() -> None:
    world = submit(explicit(sub("a")))
    world.lease("a")
    failed, _ = world.fail("a", FailureClass.TIMEOUT)
    assert failed.burned_attempts == 1
    assert failed.next_attempt_time == NOW + timedelta(seconds=2)


def test_an_agent_death_neither_burns_an_attempt_nor_backs_off() -> None:
    world = submit(explicit(sub("a"), max_attempts=1))
    for attempt in (1, 2, 3):
        leased = world.lease("a", agent=f"agent-{attempt}")
        assert leased.attempt == attempt
        failed, step = world.fail("a", FailureClass.AGENT_DIED, agent=f"agent-{attempt}")
        assert failed.state is SubtaskState.READY
        assert failed.burned_attempts == 0
        assert failed.next_attempt_time is None
        assert step.entries[0].change.details["failure"]["failure_class"] == "agent_died"
    world.check()


def test_a_lost_lease_burns_an_attempt_without_back_off() -> None:
    world = submit(explicit(sub("a"), max_attempts=2))
    world.lease("a")
    expired = NOW + timedelta(hours=1)
    failed, _ = world.fail("a", FailureClass.LEASE_LOST, time=expired)
    assert failed.state is SubtaskState.READY
    assert failed.burned_attempts == 1
    assert failed.next_attempt_time is None
    world.lease("a")
    failed, _ = world.fail("a", FailureClass.LEASE_LOST, time=expired)
    assert failed.state is SubtaskState.FAILED


def test_a_lease_is_lost_only_past_its_stored_expire_time() -> None:
    """A replica whose deadline passed may not fail a lease renewed through another one."""
    world = submit(explicit(sub("a")))
    leased = world.lease("a")
    assert leased.lease is not None
    with pytest.raises(FailedPrecondition) as refused:
        world.fail(
            "a", FailureClass.LEASE_LOST, time=leased.lease.expire_time - timedelta(seconds=1)
        )
    assert refused.value.reason == "LEASE_RENEWED"
    assert world.by_local("a").state is SubtaskState.LEASED
    failed, _ = world.fail("a", FailureClass.LEASE_LOST, time=leased.lease.expire_time)
    assert failed.state is SubtaskState.READY


def test_exhausted_attempts_fail_the_task_and_cancel_the_rest() -> None:
    world = submit(
        explicit(sub("a"), sub("b"), sub("c"), sub("d", "a"), sub("e", "b"), max_attempts=2)
    )
    world.lease("a")
    sibling = world.lease("b", agent="agent-b")
    assert sibling.lease is not None
    world.fail("a")
    world.lease("a", now=NOW + timedelta(minutes=1))
    end = NOW + timedelta(minutes=2)
    failed, step = world.fail("a", time=end)
    assert failed.state is SubtaskState.FAILED
    assert failed.burned_attempts == 2
    assert failed.end_time == end
    assert step.kinds == [
        "subtask.failed",
        "subtask.cancelled",
        "subtask.cancelled",
        "subtask.cancelled",
        "subtask.cancelled",
        "task.failed",
    ]
    assert [e.change.details["local_id"] for e in step.entries[1:5]] == ["b", "c", "d", "e"]
    assert step.entries[0].change.details["failure"]["attempt"] == 2
    assert all(e.change.details["failure"] is None for e in step.entries[1:5])
    assert step.entries[1].change.details["fencing_token"] == sibling.lease.fencing_token
    assert step.tx.revocations == [Revocation(sibling.lease, "task_failed")]
    assert state_of(world, "b", "c", "d", "e") == [SubtaskState.CANCELLED] * 4
    assert world.by_local("b").lease is None
    task = world.task
    assert task.state is TaskState.FAILED
    assert task.failure == failed.last_failure
    assert task.failure is not None and task.failure.attempt == 2
    assert "'a' failed: a broke" in task.state_reason
    assert task.end_time == end
    assert task.counts == SubtaskCounts(failed=1, cancelled=4)
    ended = step.entry("task.failed").change.details
    assert (ended["from"], ended["to"]) == ("running", "failed")
    assert aggregate_result(task, list(world.subtasks.values())) is None
    world.check()


def test_a_non_retryable_failure_fails_at_once() -> None:
    world = submit(explicit(sub("a"), sub("b"), max_attempts=5))
    world.lease("a")
    failed, step = world.fail("a", retryable=False)
    assert failed.state is SubtaskState.FAILED
    assert failed.burned_attempts == 1
    assert step.kinds == ["subtask.failed", "subtask.cancelled", "task.failed"]
    assert step.tx.revocations == []
    assert world.task.state is TaskState.FAILED
    world.check()


def test_a_non_retryable_agent_death_fails_too() -> None:
    world = submit(explicit(sub("a")))
    world.lease("a")
    failed, _ = world.fail("a", FailureClass.AGENT_DIED, retryable=False)
    assert failed.state is SubtaskState.FAILED
    assert failed.burned_attempts == 0
    assert world.task.state is TaskState.FAILED


def test_a_repeated_failure_changes_nothing() -> None:
    world = submit(explicit(sub("a"), max_attempts=2))
    leased = world.lease("a")
    assert leased.lease is not None
    token = leased.lease.fencing_token
    first, _ = world.fail("a")
    records = (world.task, dict(world.subtasks))
    repeat, step = world.fail("a", token=token)
    assert step.entries == []
    assert repeat == first
    assert (world.task, dict(world.subtasks)) == records
    world.lease("a", now=NOW + timedelta(minutes=1))
    with pytest.raises(FailedPrecondition) as caught:
        world.fail("a", token=token)
    assert caught.value.reason == "STALE_FENCING_TOKEN"


def test_a_failure_by_another_agent_is_refused() -> None:
    world = submit(explicit(sub("a")))
    leased = world.lease("a")
    assert leased.lease is not None
    with pytest.raises(FailedPrecondition) as caught:
        world.fail("a", agent="agent-b", token=leased.lease.fencing_token)
    assert caught.value.reason == "LEASE_NOT_HELD"
    assert world.by_local("a") == leased


def test_partial_results_cancel_only_the_descendants() -> None:
    world = submit(
        explicit(sub("a"), sub("b", "a"), sub("c", "b"), sub("x"), allow_partial_results=True)
    )
    world.lease("a")
    world.lease("x", agent="agent-b")
    _, step = world.fail("a", retryable=False)
    assert step.kinds == ["subtask.failed", "subtask.cancelled", "subtask.cancelled"]
    assert step.tx.revocations == []
    assert state_of(world, "a", "b", "c", "x") == [
        SubtaskState.FAILED,
        SubtaskState.CANCELLED,
        SubtaskState.CANCELLED,
        SubtaskState.LEASED,
    ]
    running = world.task
    assert running.state is TaskState.RUNNING
    assert running.failure is None
    world.check()
    step = world.complete("x", {"ok": True}, agent="agent-b")
    assert step.kinds == ["subtask.succeeded", "task.succeeded"]
    assert world.task.state is TaskState.SUCCEEDED
    assert world.task.state_reason == "1 sub-task(s) failed; partial results"
    assert world.result() == {"x": {"ok": True}}
    world.check()


def test_partial_results_with_every_subtask_failed_fail_the_task() -> None:
    world = submit(explicit(sub("a"), sub("b"), allow_partial_results=True))
    world.lease("a")
    world.lease("b", agent="agent-b")
    world.fail("a", retryable=False)
    running = world.task
    assert running.state is TaskState.RUNNING
    failed, step = world.fail("b", retryable=False, agent="agent-b")
    assert step.kinds == ["subtask.failed", "task.failed"]
    assert world.task.state is TaskState.FAILED
    assert world.task.failure == failed.last_failure
    assert world.task.state_reason == "every sub-task failed"
    assert world.result() is None
    world.check()


def test_partial_results_without_the_aggregation_subtask_merge_what_succeeded() -> None:
    world = submit(
        explicit(
            sub("x"),
            sub("y"),
            sub("agg", "x", "y"),
            allow_partial_results=True,
            aggregation_local_id="agg",
        )
    )
    world.lease("x")
    world.lease("y", agent="agent-b")
    world.complete("x", [1, 2])
    world.fail("y", retryable=False, agent="agent-b")
    assert world.by_local("agg").state is SubtaskState.CANCELLED
    assert world.task.state is TaskState.SUCCEEDED
    assert world.result() == {"x": [1, 2]}


# Cancellation


def test_cancel_revokes_leases_and_cancels_unfinished_subtasks() -> None:
    world = diamond()
    world.lease("a")
    world.complete("a")
    b = world.lease("b")
    c = world.lease("c", agent="agent-b")
    assert b.lease is not None and c.lease is not None
    later = NOW + timedelta(seconds=9)
    cancelled, step = world.run(
        lambda tx: cancel_task(tx, "changed my mind", canceller="admin"), now=later
    )
    assert cancelled is True
    assert step.kinds == [
        "subtask.cancelled",
        "subtask.cancelled",
        "subtask.cancelled",
        "task.cancelled",
    ]
    assert [e.change.details["local_id"] for e in step.entries[:3]] == ["b", "c", "d"]
    assert step.tx.revocations == [
        Revocation(b.lease, "task_cancelled"),
        Revocation(c.lease, "task_cancelled"),
    ]
    assert state_of(world, "a", "b", "c", "d") == [
        SubtaskState.SUCCEEDED,
        SubtaskState.CANCELLED,
        SubtaskState.CANCELLED,
        SubtaskState.CANCELLED,
    ]
    assert world.by_local("b").end_time == later
    assert world.task.state is TaskState.CANCELLED
    assert world.task.state_reason == "changed my mind"
    assert world.task.end_time == later
    ended = step.entry("task.cancelled").change.details
    assert (ended["from"], ended["to"], ended["reason"]) == (
        "running",
        "cancelled",
        "changed my mind",
    )
    world.check()

    again, repeat = world.cancel()
    assert again is False
    assert repeat.entries == []
    with pytest.raises(FailedPrecondition) as caught:
        world.complete("b")
    assert caught.value.reason == "STALE_FENCING_TOKEN"


def test_cancel_of_a_pending_task_has_a_default_reason() -> None:
    world = submit(explicit(sub("a"), sub("b", "a")))
    cancelled, step = world.cancel("")
    assert cancelled is True
    assert step.kinds == ["subtask.cancelled", "subtask.cancelled", "task.cancelled"]
    assert step.tx.revocations == []
    assert step.entries[-1].change.details["from"] == "pending"
    assert world.task.state_reason == "cancelled"
    assert world.task.counts == SubtaskCounts(cancelled=2)
    with pytest.raises(FailedPrecondition):
        world.lease("a")
    world.check()


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_an_ended_task_cannot_be_cancelled(outcome: str) -> None:
    world = submit(explicit(sub("a")))
    world.lease("a")
    if outcome == "succeeded":
        world.complete("a")
    else:
        world.fail("a", retryable=False)
    records = (world.task, dict(world.subtasks))
    with pytest.raises(FailedPrecondition) as caught:
        world.cancel()
    assert caught.value.reason == "TASK_ENDED"
    assert caught.value.metadata["state"] == outcome.upper()
    assert (world.task, dict(world.subtasks)) == records


# Results


def test_merged_result_is_keyed_by_local_id_in_task_order() -> None:
    world = submit(explicit(sub("zeta"), sub("alpha"), sub("mid", "zeta")))
    world.lease("zeta")
    world.lease("alpha", agent="agent-b")
    world.complete("alpha", {"b": 2, "a": 1}, agent="agent-b")
    assert aggregate_result(world.task, list(world.subtasks.values())) is None
    world.complete("zeta")
    world.lease("mid")
    world.complete("mid", "m")
    text = aggregate_result(world.task, list(world.subtasks.values()))
    assert text == '{"zeta":null,"alpha":{"a":1,"b":2},"mid":"m"}'


def test_result_of_the_aggregation_subtask_is_the_tasks() -> None:
    world = submit(explicit(sub("x"), sub("agg", "x"), aggregation_local_id="agg"))
    world.lease("x")
    world.complete("x", "part")
    world.lease("agg")
    world.complete("agg", {"total": 3})
    assert world.result() == {"total": 3}


def test_single_subtask_task_result_is_keyed_by_main() -> None:
    world = submit(TaskSpec(title="one", split_policy=SplitPolicy.NONE, input="[1]"))
    leased = world.lease("main")
    assert leased.input == "[1]"
    world.complete("main", 42)
    assert world.result() == {"main": 42}


# Back-off


@pytest.mark.parametrize(
    ("burned", "base", "cap", "delay"),
    [
        (0, 1.0, 60.0, 0.0),
        (1, 1.0, 60.0, 1.0),
        (2, 1.0, 60.0, 2.0),
        (3, 1.0, 60.0, 4.0),
        (6, 1.0, 60.0, 32.0),
        (7, 1.0, 60.0, 60.0),
        (100, 1.0, 60.0, 60.0),
        (3, 0.5, 60.0, 2.0),
        (4, 0.0, 60.0, 0.0),
    ],
)
def test_retry_delay_doubles_up_to_the_cap(
    burned: int, base: float, cap: float, delay: float
) -> None:
    assert retry_delay(burned, base, cap) == delay


# The change log across a lifecycle


def test_a_lifecycle_journals_every_transition_at_consecutive_revisions() -> None:
    world = diamond(max_attempts=2)
    world.lease("a")
    world.complete("a")
    world.check()
    world.lease("b")
    world.lease("c", agent="agent-b")
    world.fail("c", FailureClass.AGENT_DIED, agent="agent-b")
    world.check()
    world.lease("c", agent="agent-c")
    world.complete("c", agent="agent-c")
    world.complete("b")
    world.check()
    world.lease("d")
    world.complete("d")
    world.check()
    assert [e.change.kind for e in world.log] == [
        "task.submitted",
        *["subtask.ready"] + ["subtask.blocked"] * 3,
        "subtask.leased",
        "task.running",
        "subtask.succeeded",
        "subtask.ready",
        "subtask.ready",
        "subtask.leased",
        "subtask.leased",
        "subtask.ready",
        "subtask.leased",
        "subtask.succeeded",
        "subtask.succeeded",
        "subtask.ready",
        "subtask.leased",
        "subtask.succeeded",
        "task.succeeded",
    ]
    c_entries = [
        e.change
        for e in world.log
        if e.change.kind.startswith("subtask.")
        and e.change.details["subtask_id"] == world.id_of("c")
    ]
    assert [(c.details["to"], c.details["attempt"], c.agent_id) for c in c_entries] == [
        ("blocked", 0, "planner"),
        ("ready", 0, "agent-a"),
        ("leased", 1, "agent-b"),
        ("ready", 1, "agent-b"),
        ("leased", 2, "agent-c"),
        ("succeeded", 2, "agent-c"),
    ]
    tokens = [c.details["fencing_token"] for c in c_entries]
    assert tokens[0] == tokens[1] == 0
    assert tokens[2] == tokens[3] < tokens[4] == tokens[5]
    assert world.result() == {"a": None, "b": None, "c": None, "d": None}
    assert world.task.counts == SubtaskCounts(succeeded=4)


def test_a_watched_task_is_moved_by_the_transitions_it_does_not_reflect_yet() -> None:
    world = diamond()
    seen = [world.task]
    for local_id in "abcd":
        world.lease(local_id)
        seen.append(world.task)
        world.complete(local_id)
        seen.append(world.task)
    log = [
        Change(
            e.revision, NOW, e.change.service, e.change.kind, e.change.subject, "", e.change.details
        )
        for e in world.log
    ]
    assert world.task.state is TaskState.SUCCEEDED
    for earlier in seen:  # from the task as read at any step, the whole log leads to the end
        assert task_after(earlier, log) == world.task
    b_leased = seen[3]
    halfway = [change for change in log if change.revision <= b_leased.revision]
    assert task_after(seen[0], halfway) == b_leased
    assert (b_leased.counts.succeeded, b_leased.counts.leased, b_leased.counts.ready) == (1, 1, 1)
    assert b_leased.state is TaskState.RUNNING
