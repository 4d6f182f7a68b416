"""The shared write path without a database: the batch script and the working set."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from agentcoord.core.errors import Conflict
from agentcoord.core.models import (
    AgentStatus,
    Compare,
    HeartbeatRecord,
    PutCommand,
    StateEntry,
    StateValue,
    StateWrite,
    StateWriteResult,
    ValueKind,
)
from agentcoord.store.batching import Outcome
from agentcoord.store.state_writes import WriteStates
from agentcoord.store.unit_of_work import (
    Answer,
    Execute,
    Flush,
    Load,
    Loaded,
    Mutations,
    Needs,
    RecordHeartbeats,
    Request,
    Step,
    ViewOp,
    WorkingSet,
    batch_script,
    drive,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def put(key: str, version: int | None = None) -> WriteStates:
    compares = () if version is None else (Compare(key, version=version),)
    command = PutCommand(key, StateValue(ValueKind.JSON, b"1"))
    return WriteStates(StateWrite("", compares, (command,), NOW))


def entry(key: str, version: int) -> StateEntry:
    """A committed entry of ``key`` at ``version``."""
    return StateEntry(key, StateValue(ValueKind.JSON, b"0"), {}, version, 1, version, "", NOW, NOW)


@dataclass
class FakeDatabase:
    """Performs requests, records them, and fails the flushes it is told to."""

    fail_flush_of: frozenset[str] = frozenset()
    revision: int = 0
    states: tuple[StateEntry, ...] = ()

    def __post_init__(self) -> None:
        self.requests: list[str] = []
        self.answered: dict[int, Outcome] = {}

    def __call__(self, request: Request) -> object:
        if isinstance(request, Step):
            self.requests.append(request.name)
            return None
        if isinstance(request, Answer):
            self.requests.append("ANSWER")
            self.answered.update(request.outcomes)
            return None
        if isinstance(request, Load):
            self.requests.append("LOAD")
            return Loaded(self.revision, self.states)
        if isinstance(request, Flush):
            self.requests.append("FLUSH")
            keys = {entry.key for entry in request.mutations.states}
            if keys & self.fail_flush_of:
                raise RuntimeError(f"constraint on {sorted(keys & self.fail_flush_of)}")
            self.revision = request.mutations.revision
            return None
        assert isinstance(request, Execute)
        self.requests.append("EXECUTE")
        return "executed"


def test_a_batch_loads_once_and_flushes_once() -> None:
    database = FakeDatabase()
    outcomes = drive(batch_script([put("a"), put("b"), put("a", version=5)]), database)

    assert database.requests == ["BEGIN", "LOAD", "FLUSH", "COMMIT"]
    assert [o.error is None for o in outcomes] == [True, True, False]
    assert isinstance(outcomes[2].error, Conflict)
    assert [[c.revision for c in o.changes] for o in outcomes] == [[1], [2], []]


def test_a_conflict_with_committed_entries_is_answered_before_the_commit() -> None:
    database = FakeDatabase(states=(entry("a", 3), entry("b", 1)))
    outcomes = drive(batch_script([put("a", version=2), put("b", version=1)]), database)

    assert database.requests == ["BEGIN", "LOAD", "FLUSH", "ANSWER", "COMMIT"]
    assert list(database.answered) == [0]
    assert database.answered[0] is outcomes[0]
    assert isinstance(outcomes[0].error, Conflict) and outcomes[0].error.current == entry("a", 3)
    assert outcomes[1].error is None


def test_a_conflict_with_a_write_of_its_batch_waits_and_carries_what_the_batch_leaves() -> None:
    database = FakeDatabase(states=(entry("a", 3),))
    # The stale write is checked first, against the committed entry; the next one wins.
    outcomes = drive(
        batch_script([put("a", version=2), put("a", version=3), put("a", version=3)]), database
    )

    assert "ANSWER" not in database.requests
    won = outcomes[1].value
    assert isinstance(won, StateWriteResult) and won.results[0].state is not None
    for lost in (outcomes[0].error, outcomes[2].error):
        assert isinstance(lost, Conflict)
        assert lost.current == won.results[0].state
        assert lost.metadata["current_version"] == "4"


def test_a_batch_of_several_runs_answers_after_its_commit() -> None:
    database = FakeDatabase(states=(entry("a", 3),))
    heartbeats = RecordHeartbeats((HeartbeatRecord("x", 1, NOW, AgentStatus.READY, 0, ()),))
    outcomes = drive(batch_script([put("a", version=2), heartbeats, put("a")]), database)

    assert "ANSWER" not in database.requests
    assert isinstance(outcomes[0].error, Conflict)


def test_direct_operations_split_the_batch_into_runs() -> None:
    database = FakeDatabase()
    heartbeats = RecordHeartbeats((HeartbeatRecord("a", 1, NOW, AgentStatus.READY, 0, ()),))
    outcomes = drive(batch_script([put("a"), heartbeats, put("b")]), database)

    assert database.requests == [
        "BEGIN",
        "LOAD",
        "FLUSH",
        "EXECUTE",
        "LOAD",
        "FLUSH",
        "COMMIT",
    ]
    assert outcomes[1].value == "executed"


def test_a_failed_statement_reruns_the_batch_in_isolation() -> None:
    database = FakeDatabase(fail_flush_of=frozenset({"bad"}))
    outcomes = drive(batch_script([put("a"), put("bad"), put("c")]), database)

    assert database.requests == [
        "BEGIN",
        "LOAD",
        "FLUSH",  # fails: everything is rolled back
        "ROLLBACK",
        "BEGIN",
        *("SAVEPOINT", "LOAD", "FLUSH", "RELEASE"),
        *("SAVEPOINT", "LOAD", "FLUSH", "ROLLBACK_TO", "RELEASE"),
        *("SAVEPOINT", "LOAD", "FLUSH", "RELEASE"),
        "COMMIT",
    ]
    assert isinstance(outcomes[1].error, RuntimeError)
    assert [[c.revision for c in o.changes] for o in outcomes] == [[1], [], [2]]


def test_a_failed_begin_or_commit_fails_the_batch() -> None:
    class FailingCommit(FakeDatabase):
        def __call__(self, request: Request) -> object:
            if request is Step.COMMIT:
                raise OSError("disk full")
            return super().__call__(request)

    with pytest.raises(OSError, match="disk full"):
        drive(batch_script([put("a")]), FailingCommit())


class Half(ViewOp):
    """Puts one key, then raises: a bug half-way through an operation."""

    def needs(self) -> Needs:
        return Needs(state_keys=frozenset({"x"}))

    def apply(self, ws: WorkingSet) -> object:
        put("x").apply(ws)
        raise ValueError("half-way")


def test_an_operation_that_raises_half_way_changes_nothing() -> None:
    ws = WorkingSet(Needs(state_keys=frozenset({"x", "y"})), Loaded(revision=7))
    assert ws.apply(put("y")).error is None

    outcome = ws.apply(Half())

    assert isinstance(outcome.error, ValueError)
    assert ws.state("x") is None
    assert ws.revision == 8
    mutations = ws.mutations()
    assert isinstance(mutations, Mutations)
    assert [e.key for e in mutations.states] == ["y"]
    assert [c.revision for c in mutations.changes] == [8]


def test_reading_what_was_not_loaded_is_a_bug() -> None:
    ws = WorkingSet(Needs(state_keys=frozenset({"x"})), Loaded(revision=0))
    with pytest.raises(LookupError):
        ws.state("y")
    with pytest.raises(LookupError):
        ws.agent("a")
    with pytest.raises(LookupError):
        ws.expired_entries(NOW)
