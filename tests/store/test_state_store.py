"""The StateSync part of the store contract, run on SQLite and PostgreSQL (``store_url``)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

import pytest

from agentcoord.core.errors import Conflict, FailedPrecondition, InvalidInput, NotFound
from agentcoord.core.models import (
    Agent,
    AgentState,
    Change,
    ChangeFilter,
    Compare,
    DeleteCommand,
    Fencing,
    OperationResult,
    PutCommand,
    Service,
    StateEntry,
    StateValue,
    StateWrite,
    StateWriteResult,
    ValueKind,
)
from agentcoord.core.state_rules import entry_to_snapshot
from agentcoord.core.store import Store
from agentcoord.store.rows import prefix_end
from tests.store.helpers import all_changes, opened

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def value(data: Any) -> StateValue:
    return StateValue(
        ValueKind.JSON, json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    )


def put(key: str, data: Any = 1, **fields: Any) -> PutCommand:
    return PutCommand(key, value(data), **fields)


def write(
    *operations: PutCommand | DeleteCommand,
    compares: Sequence[Compare] = (),
    agent_id: str = "",
    request_id: str = "",
    now: datetime = NOW,
    fencing: Fencing | None = None,
) -> StateWrite:
    return StateWrite(agent_id, tuple(compares), operations, now, fencing, request_id)


def make_agent(agent_id: str) -> Agent:
    return Agent(agent_id, agent_id, "worker", ("python",), 1, {}, (), 3.0)


async def keys(store: Store, prefix: str = "") -> list[str]:
    entries, _ = await store.list_states(prefix, "", 1000)
    return [entry.key for entry in entries]


# Puts, versions and compares


async def test_put_then_get(store: Store) -> None:
    result = await store.write_states(
        write(put("shared/plan", {"step": 1}, metadata={"by": "planner"}), agent_id="alice")
    )

    entry = StateEntry(
        key="shared/plan",
        value=value({"step": 1}),
        metadata={"by": "planner"},
        version=1,
        create_revision=1,
        mod_revision=1,
        agent_id="alice",
        create_time=NOW,
        update_time=NOW,
    )
    assert result == StateWriteResult(1, (OperationResult(entry, None),))
    assert await store.get_state("shared/plan") == entry
    assert await store.get_state("shared/other") is None
    assert await store.current_revision() == 1
    assert await all_changes(store) == [
        Change(
            revision=1,
            time=NOW,
            service=Service.STATESYNC,
            kind="state.put",
            subject="shared/plan",
            agent_id="alice",
            details={"state": entry_to_snapshot(entry), "previous": None},
        )
    ]


async def test_every_put_increments_the_version(store: Store) -> None:
    later = NOW + timedelta(seconds=5)
    first = await store.write_states(write(put("k", 1)))
    await store.register_agent(make_agent("x"), "h", NOW)  # revision 2 belongs to another key
    second = await store.write_states(write(put("k", 2), now=later, agent_id="bob"))

    before, after = first.results[0].state, second.results[0].state
    assert before is not None and after is not None
    assert (after.version, after.create_revision, after.mod_revision) == (2, 1, 3)
    assert (after.create_time, after.update_time, after.agent_id) == (NOW, later, "bob")
    assert second.results[0].previous == before
    assert second.revision == 3


async def test_values_metadata_and_times_round_trip(store: Store) -> None:
    binary = StateValue(ValueKind.BINARY, bytes(range(256)))
    local_now = NOW.astimezone(timezone(timedelta(hours=-5)))
    expires = NOW + timedelta(hours=1)
    result = await store.write_states(
        write(
            PutCommand("bin", binary, {"ü": "é", "empty": ""}, expire_time=expires),
            now=local_now,
        )
    )

    stored = await store.get_state("bin")
    assert stored == result.results[0].state
    assert stored is not None and stored.value == binary
    assert stored.metadata == {"ü": "é", "empty": ""}
    for moment in (stored.create_time, stored.update_time, stored.expire_time):
        assert moment is not None and moment.utcoffset() == timedelta(0)
    assert (stored.create_time, stored.expire_time) == (NOW, expires)


async def test_expected_version(store: Store) -> None:
    created = await store.write_states(write(put("k"), compares=[Compare("k", version=0)]))
    assert created.results[0].state is not None

    with pytest.raises(Conflict) as raised:
        await store.write_states(write(put("k", 2), compares=[Compare("k", version=0)]))
    assert raised.value.reason == "VERSION_MISMATCH"
    assert raised.value.metadata == {"key": "k", "current_version": "1", "failed_compare": "0"}

    with pytest.raises(Conflict) as raised:
        await store.write_states(write(put("k", 2), compares=[Compare("k", version=7)]))
    assert raised.value.metadata["current_version"] == "1"

    updated = await store.write_states(write(put("k", 2), compares=[Compare("k", version=1)]))
    assert updated.results[0].state is not None and updated.results[0].state.version == 2
    assert await store.current_revision() == 2


async def test_existence_and_value_compares(store: Store) -> None:
    with pytest.raises(Conflict) as raised:
        await store.write_states(write(put("k"), compares=[Compare("k", exists=True)]))
    assert raised.value.reason == "COMPARE_FAILED"
    assert raised.value.metadata["current_version"] == "0"

    await store.write_states(write(put("k", "a"), compares=[Compare("k", exists=False)]))
    with pytest.raises(Conflict):
        await store.write_states(write(put("k", "b"), compares=[Compare("k", exists=False)]))
    with pytest.raises(Conflict):
        await store.write_states(write(put("k", "b"), compares=[Compare("k", value=value("x"))]))
    with pytest.raises(Conflict):  # a value compare needs the key to exist
        await store.write_states(write(put("j"), compares=[Compare("j", value=value(1))]))

    result = await store.write_states(
        write(put("k", "b"), compares=[Compare("k", exists=True), Compare("k", value=value("a"))])
    )
    assert result.results[0].state is not None and result.results[0].state.version == 2


async def test_delete(store: Store) -> None:
    with pytest.raises(NotFound) as raised:
        await store.write_states(write(DeleteCommand("k")))
    assert raised.value.reason == "STATE_NOT_FOUND"

    missing = await store.write_states(write(DeleteCommand("k", allow_missing=True)))
    assert missing == StateWriteResult(0, (OperationResult(None, None),))
    assert await store.current_revision() == 0

    created = (await store.write_states(write(put("k")))).results[0].state
    deleted = await store.write_states(
        write(DeleteCommand("k"), compares=[Compare("k", version=1)], agent_id="bob")
    )
    assert deleted == StateWriteResult(2, (OperationResult(None, created),))
    assert await store.get_state("k") is None
    change = (await all_changes(store))[-1]
    assert (change.kind, change.subject, change.agent_id) == ("state.delete", "k", "bob")
    assert change.details == {
        "state": None,
        "previous": entry_to_snapshot(cast(StateEntry, created)),
    }

    recreated = (await store.write_states(write(put("k")))).results[0].state
    assert recreated is not None and (recreated.version, recreated.create_revision) == (1, 3)


# Transactions


async def test_a_write_of_several_keys_takes_consecutive_revisions(store: Store) -> None:
    await store.write_states(write(put("c", "old")))
    result = await store.write_states(
        write(put("a", 1), DeleteCommand("c"), put("b", 2), compares=[Compare("c", exists=True)])
    )

    assert result.revision == 4
    assert [(r.state.key if r.state else None) for r in result.results] == ["a", None, "b"]
    assert [(r.state.mod_revision if r.state else None) for r in result.results] == [2, None, 4]
    assert [(c.revision, c.kind, c.subject) for c in (await all_changes(store))[1:]] == [
        (2, "state.put", "a"),
        (3, "state.delete", "c"),
        (4, "state.put", "b"),
    ]
    assert await keys(store) == ["a", "b"]


@pytest.mark.parametrize(
    ("failing", "error"),
    [
        (
            write(
                put("a", 9),
                put("b", 9),
                compares=[Compare("a", exists=True), Compare("b", version=5)],
            ),
            Conflict,
        ),
        (write(put("a", 9), DeleteCommand("missing"), put("b", 9)), NotFound),
        (write(put("a", 9), fencing=Fencing("sub-1", 3)), FailedPrecondition),
    ],
)
async def test_a_write_applies_all_or_nothing(
    store: Store, failing: StateWrite, error: type[Exception]
) -> None:
    await store.write_states(write(put("a", 1), put("b", 1)))
    before = (await store.list_states("", "", 100), await all_changes(store))

    with pytest.raises(error):
        await store.write_states(failing)

    assert (await store.list_states("", "", 100), await all_changes(store)) == before
    assert await store.current_revision() == 2


async def test_fencing_is_refused_until_leases_exist(store: Store) -> None:
    with pytest.raises(FailedPrecondition) as raised:
        await store.write_states(write(put("k"), fencing=Fencing("subtask-1", 7), agent_id="a"))

    assert raised.value.reason == "LEASE_NOT_HELD"
    assert raised.value.message.startswith("fencing:")
    assert raised.value.metadata["field"] == "fencing"
    assert await store.get_state("k") is None
    assert await store.current_revision() == 0


async def test_writes_in_one_batch_see_each_other(store: Store) -> None:
    calls: list[list[int]] = []
    store.add_listener(lambda changes: calls.append([c.revision for c in changes]))
    results = await asyncio.gather(
        store.write_states(write(put("k", 1), compares=[Compare("k", version=0)])),
        store.write_states(write(put("k", 2), compares=[Compare("k", version=1)])),
        store.write_states(write(put("k", 3), compares=[Compare("k", version=1)])),
        store.write_states(write(put("k", 4), compares=[Compare("k", version=2)])),
        return_exceptions=True,
    )

    assert calls == [[1, 2, 3]]  # one commit for the batch
    assert [r.revision if isinstance(r, StateWriteResult) else type(r) for r in results] == [
        1,
        2,
        Conflict,
        3,
    ]
    entry = await store.get_state("k")
    assert entry is not None and (entry.version, entry.value) == (3, value(4))


async def test_a_conflict_carries_the_entry_its_batch_leaves(store: Store) -> None:
    """A write that lost to a write of its own batch is told the version a retry must name."""
    await store.write_states(write(put("k", 1)))
    stale, won, lost = await asyncio.gather(
        store.write_states(write(put("k", 2), compares=[Compare("k", version=7)])),
        store.write_states(write(put("k", 3), compares=[Compare("k", version=1)])),
        store.write_states(write(put("k", 4), compares=[Compare("k", version=1)])),
        return_exceptions=True,
    )

    assert isinstance(won, StateWriteResult)
    for conflict in (stale, lost):
        assert isinstance(conflict, Conflict)
        assert conflict.current == won.results[0].state
        assert conflict.metadata["current_version"] == "2"


async def test_a_conflict_with_committed_entries_is_answered_before_the_commit(
    store: Store,
) -> None:
    """A compare that fails against committed entries does not wait for the batch's commit."""
    await store.write_states(write(put("a", 1)))
    heard: list[object] = []
    store.add_listener(lambda changes: heard.append("committed"))

    async def losing() -> None:
        try:
            await store.write_states(write(put("a", 2), compares=[Compare("a", version=7)]))
        except Conflict as conflict:
            heard.append(conflict)

    await asyncio.gather(losing(), store.write_states(write(put("b", 1))))

    assert [type(h) for h in heard] == [Conflict, str]
    conflict = heard[0]
    assert isinstance(conflict, Conflict) and conflict.current == await store.get_state("a")
    assert await store.current_revision() == 2


async def test_a_failing_statement_rolls_back_only_its_own_write(store: Store) -> None:
    """A database error in a batch re-runs the batch in isolation; the others commit."""
    calls: list[list[str]] = []
    store.add_listener(lambda changes: calls.append([c.subject for c in changes]))
    broken = make_agent("broken")
    broken = dataclasses.replace(broken, name=cast(str, None))  # NOT NULL in the database

    results = await asyncio.gather(
        store.write_states(write(put("a"))),
        store.register_agent(broken, "h", NOW),
        store.write_states(write(put("b"), compares=[Compare("a", version=1)])),
        store.write_states(write(put("c"), compares=[Compare("zz", exists=True)])),
        return_exceptions=True,
    )

    assert isinstance(results[0], StateWriteResult) and isinstance(results[2], StateWriteResult)
    assert isinstance(results[1], Exception) and not isinstance(results[1], Conflict)
    assert isinstance(results[3], Conflict)
    assert calls == [["a", "b"]]
    assert (results[0].revision, results[2].revision) == (1, 2)
    assert await keys(store) == ["a", "b"]
    assert await store.get_agent("broken") is None


async def test_concurrent_read_modify_write_loses_no_update(store: Store) -> None:
    hot_keys = [f"shared/counter{n}" for n in range(3)]
    successes = 0
    conflicts = 0

    async def increment(task: int) -> None:
        nonlocal successes, conflicts
        for round_ in range(4):
            key = hot_keys[(task + round_) % len(hot_keys)]
            while True:
                entry = await store.get_state(key)
                count = json.loads(entry.value.data) if entry else 0
                version = entry.version if entry else 0
                try:
                    await store.write_states(
                        write(put(key, count + 1), compares=[Compare(key, version=version)])
                    )
                except Conflict:
                    conflicts += 1
                    continue
                successes += 1
                break

    await asyncio.gather(*(increment(task) for task in range(50)))

    totals = []
    for key in hot_keys:
        entry = await store.get_state(key)
        assert entry is not None
        totals.append(json.loads(entry.value.data))
        assert entry.version == totals[-1]
    assert successes == sum(totals) == 200
    assert conflicts > 0
    assert await store.current_revision() == 200


async def test_concurrent_transfers_keep_the_total(store: Store) -> None:
    """Transactions over two keys each, all or none, under concurrent conflicts."""
    accounts = [f"acct/{n}" for n in range(4)]
    await store.write_states(write(*(put(key, 100) for key in accounts)))

    async def transfer(task: int) -> None:
        source, target = accounts[task % 4], accounts[(task + 1) % 4]
        while True:
            a, b = await store.get_state(source), await store.get_state(target)
            assert a is not None and b is not None
            try:
                await store.write_states(
                    write(
                        put(source, json.loads(a.value.data) - 1),
                        put(target, json.loads(b.value.data) + 1),
                        compares=[
                            Compare(source, version=a.version),
                            Compare(target, version=b.version),
                        ],
                    )
                )
                return
            except Conflict:
                continue

    await asyncio.gather(*(transfer(task) for task in range(40)))

    entries, revision = await store.list_states("acct/", "", 10)
    assert sum(json.loads(e.value.data) for e in entries) == 400
    assert [json.loads(e.value.data) for e in entries] == [100, 100, 100, 100]
    assert revision == 4 + 40 * 2


# Idempotent repeats


async def test_a_repeated_request_returns_the_first_result(store_url: str) -> None:
    first_write = write(
        put("k", 1), compares=[Compare("k", version=0)], agent_id="a", request_id="r1"
    )
    async with opened(store_url) as store:
        first = await store.write_states(first_write)
        # A repeat with other contents still returns the first result: the id decides.
        again = await store.write_states(
            dataclasses.replace(first_write, operations=(put("k", 2),))
        )
        assert again == first
        assert await store.current_revision() == 1
        # Another agent's request with the same id is another request.
        other = await store.write_states(write(put("k", 5), agent_id="b", request_id="r1"))
        assert other.revision == 2
        # Repeats queued in one batch: applied once.
        both = await asyncio.gather(
            store.write_states(write(put("j"), agent_id="a", request_id="r2")),
            store.write_states(write(put("j"), agent_id="a", request_id="r2")),
        )
        assert both[0] == both[1] and both[0].revision == 3
        assert await store.current_revision() == 3

    async with opened(store_url) as store:  # remembered across a restart
        assert await store.write_states(first_write) == first
        assert await store.current_revision() == 3


async def test_a_failed_request_is_not_remembered(store: Store) -> None:
    conflicting = write(put("k"), compares=[Compare("k", exists=True)], request_id="r1")
    with pytest.raises(Conflict):
        await store.write_states(conflicting)
    await store.write_states(write(put("k")))

    result = await store.write_states(conflicting)

    assert result.results[0].state is not None and result.results[0].state.version == 2


# Listing


async def test_list_states_by_prefix_in_code_point_order(store: Store) -> None:
    names = ["a/b", "a/a", "a", "a0", "ab", "a/é", "a/Z", "a/b/c", "b/x", "a.b"]
    await store.write_states(write(*(put(name, name) for name in names)))

    assert await keys(store) == sorted(names)
    assert await keys(store, "a/") == ["a/Z", "a/a", "a/b", "a/b/c", "a/é"]
    assert await keys(store, "a/b") == ["a/b", "a/b/c"]
    assert await keys(store, "b/") == ["b/x"]
    assert await keys(store, "c") == []


async def test_list_states_pages_at_one_revision(store: Store) -> None:
    await store.write_states(write(*(put(f"p/{n:02}", n) for n in range(7))))
    await store.write_states(write(put("q/after", 0)))

    page, revision = await store.list_states("p/", "", 3)
    assert [e.key for e in page] == ["p/00", "p/01", "p/02"]
    assert revision == 8
    page, _ = await store.list_states("p/", "p/02", 3)
    assert [e.key for e in page] == ["p/03", "p/04", "p/05"]
    page, _ = await store.list_states("p/", "p/05", 3)
    assert [e.key for e in page] == ["p/06"]
    assert await store.list_states("p/", "p/06", 3) == ([], 8)
    assert await store.list_states("none/", "", 3) == ([], 8)
    with pytest.raises(InvalidInput):
        await store.list_states("p/", "", 0)


async def test_an_empty_store_lists_nothing_at_revision_zero(store: Store) -> None:
    assert await store.list_states("", "", 10) == ([], 0)
    assert await store.state_changed_since("", 0) is False


async def test_state_changed_since(store: Store) -> None:
    await store.write_states(write(put("a/1"), put("b/1")))
    assert await store.state_changed_since("a/", 0) is True
    assert await store.state_changed_since("a/", 2) is False

    await store.write_states(write(put("b/2")))
    await store.register_agent(make_agent("a"), "h", NOW)  # subject "a", not a state change
    assert await store.state_changed_since("a/", 2) is False
    assert await store.state_changed_since("b/", 2) is True
    assert await store.state_changed_since("", 2) is True

    await store.write_states(write(DeleteCommand("a/1")))  # deletions count
    assert await store.state_changed_since("a/", 4) is True
    assert await store.state_changed_since("a/1", 4) is True
    assert await store.state_changed_since("a/10", 4) is False


def test_prefix_end() -> None:
    assert prefix_end("") is None
    assert prefix_end("a/") == "a0"
    assert prefix_end("ab") == "ac"
    assert prefix_end("a" + chr(0x10FFFF)) == "b"
    assert prefix_end(chr(0x10FFFF)) is None
    assert prefix_end("x" + chr(0xD7FF)) == "x" + chr(0xE000)


async def test_reads_follow_every_kind_of_write(store: Store) -> None:
    """Reads repeated between writes (served from memory on SQLite) follow each write."""
    assert await store.read_state("k") == (None, 0)
    assert await store.read_state("k") == (None, 0)
    first = await store.write_states(write(put("k", 1, expire_time=NOW + timedelta(seconds=1))))
    assert await store.read_state("k") == (first.results[0].state, 1)
    await store.write_states(write(put("other", 1)))
    assert await store.read_state("k") == (first.results[0].state, 2)  # the revision moved
    with pytest.raises(Conflict):
        await store.write_states(write(put("k", 2), compares=[Compare("k", version=7)]))
    assert await store.read_state("k") == (first.results[0].state, 2)
    assert [e.key for e in await store.expire_states(NOW + timedelta(seconds=1))] == ["k"]
    assert await store.read_state("k") == (None, 3)
    await store.register_agent(make_agent("a"), "h", NOW)
    assert (await store.read_state("k"))[1] == 4


async def test_reads_see_the_writes_of_another_store_of_the_process(store_url: str) -> None:
    """Two stores of one process on one SQLite file (as tests do): neither reads stale entries."""
    async with opened(store_url) as first:
        await first.write_states(write(put("k", 1)))
        assert (await first.get_state("k")) is not None
        async with opened(store_url) as second:
            await second.write_states(write(put("k", 2)))
            entry = await first.get_state("k")
            assert entry is not None and entry.value == value(2)
        entry = await first.get_state("k")
        assert entry is not None and entry.value == value(2)


# Expiry and sessions


async def test_expire_states(store: Store) -> None:
    soon, later = NOW + timedelta(seconds=1), NOW + timedelta(seconds=5)
    await store.write_states(
        write(put("ttl/a", expire_time=soon), put("ttl/b", expire_time=later), put("keep"))
    )
    await store.write_states(write(put("ttl/c", expire_time=soon)))
    await store.write_states(write(put("ttl/c", "renewed")))  # written again without a TTL

    assert await store.expire_states(NOW) == []
    expired = await store.expire_states(soon)

    assert [e.key for e in expired] == ["ttl/a"]
    assert await keys(store) == ["keep", "ttl/b", "ttl/c"]
    change = (await all_changes(store))[-1]
    assert (change.revision, change.kind, change.subject, change.agent_id) == (
        6,
        "state.expire",
        "ttl/a",
        "",
    )
    assert change.details["previous"] == entry_to_snapshot(expired[0])
    assert [e.key for e in await store.expire_states(later + timedelta(hours=1))] == ["ttl/b"]
    assert await store.expire_states(later + timedelta(hours=1)) == []


async def test_keys_bound_to_a_session_expire_with_it(store: Store) -> None:
    seen: list[Change] = []
    store.add_listener(seen.extend)
    await store.register_agent(make_agent("a1"), "h", NOW)
    await store.register_agent(make_agent("a2"), "h", NOW)
    await store.write_states(
        write(
            put("agents/a1/bound", session_epoch=1),
            put("agents/a1/z-bound", session_epoch=1),
            put("agents/a1/kept"),
            agent_id="a1",
        )
    )
    await store.write_states(write(put("agents/a2/bound", session_epoch=1), agent_id="a2"))

    ended = await store.end_agent_session("a1", 1, AgentState.EXPIRED, NOW)

    assert ended is not None and ended.revision == 7
    assert [(c.revision, c.kind, c.subject) for c in seen[-3:]] == [
        (7, "agent.expired", "a1"),
        (8, "state.expire", "agents/a1/bound"),
        (9, "state.expire", "agents/a1/z-bound"),
    ]
    assert await keys(store) == ["agents/a1/kept", "agents/a2/bound"]
    assert await store.current_revision() == 9
    assert [c.revision for c in seen] == list(range(1, 10))


async def test_registering_again_expires_the_earlier_sessions_keys(store: Store) -> None:
    await store.register_agent(make_agent("a1"), "h", NOW)
    await store.write_states(write(put("agents/a1/x", session_epoch=1), agent_id="a1"))

    again = await store.register_agent(make_agent("a1"), "h2", NOW)

    assert again.epoch == 2
    assert [(c.kind, c.subject) for c in (await all_changes(store))[-2:]] == [
        ("agent.joined", "a1"),
        ("state.expire", "agents/a1/x"),
    ]
    assert await keys(store) == []
    # Keys bound to the new session stay until it ends.
    await store.write_states(write(put("agents/a1/y", session_epoch=2), agent_id="a1"))
    assert await store.end_agent_session("a1", 1, AgentState.LEFT, NOW) is None
    assert await keys(store) == ["agents/a1/y"]
    await store.end_agent_session("a1", 2, AgentState.LEFT, NOW)
    assert await keys(store) == []


async def test_binding_to_a_session_that_is_not_live_is_refused(store: Store) -> None:
    await store.register_agent(make_agent("a1"), "h", NOW)
    await store.end_agent_session("a1", 1, AgentState.EXPIRED, NOW)

    for agent_id, epoch in (("a1", 1), ("a1", 2), ("nobody", 1)):
        with pytest.raises(FailedPrecondition) as raised:
            await store.write_states(
                write(put(f"agents/{agent_id}/k", session_epoch=epoch), agent_id=agent_id)
            )
        assert raised.value.reason == "SESSION_ENDED"
    assert await keys(store) == []


async def test_a_write_and_the_end_of_its_session_in_one_batch(store: Store) -> None:
    await store.register_agent(make_agent("a1"), "h", NOW)
    bound = write(put("agents/a1/k", session_epoch=1), agent_id="a1")

    results = await asyncio.gather(
        store.write_states(bound),
        store.end_agent_session("a1", 1, AgentState.EXPIRED, NOW),
        store.write_states(bound),
        return_exceptions=True,
    )

    assert isinstance(results[0], StateWriteResult)
    assert isinstance(results[2], FailedPrecondition)
    assert await keys(store) == []


# The change log


async def test_list_changes_filters(store: Store) -> None:
    times = [NOW + timedelta(minutes=n) for n in range(6)]
    await store.register_agent(make_agent("a/1"), "h", times[0])  # 1 agent.joined
    await store.write_states(write(put("a/1/x"), agent_id="a/1", now=times[1]))  # 2
    await store.write_states(write(put("a0"), agent_id="b", now=times[2]))  # 3
    await store.write_states(write(DeleteCommand("a/1/x"), agent_id="b", now=times[3]))  # 4
    await store.end_agent_session("a/1", 1, AgentState.LEFT, times[4])  # 5 agent.left
    await store.write_states(write(put("ab"), now=times[5]))  # 6

    async def revisions(**fields: Any) -> list[int]:
        return [c.revision for c in await all_changes(store, ChangeFilter(**fields))]

    assert await revisions() == [1, 2, 3, 4, 5, 6]
    assert await revisions(service=Service.DISCOVERY) == [1, 5]
    assert await revisions(kind="state.put") == [2, 3, 6]
    assert await revisions(kind="state.") == [2, 3, 4, 6]
    assert await revisions(kind="agent.") == [1, 5]
    assert await revisions(kind="state") == []  # an exact kind, not a family
    assert await revisions(subject="a/1") == [1, 5]
    assert await revisions(subject_prefix="a/") == [1, 2, 4, 5]
    assert await revisions(subject_prefix="a/1/") == [2, 4]
    assert await revisions(subject_prefix="a") == [1, 2, 3, 4, 5, 6]
    assert await revisions(agent_id="b") == [3, 4]
    assert await revisions(agent_id="") == [1, 2, 3, 4, 5, 6]  # empty matches anything
    assert await revisions(start_time=times[2]) == [3, 4, 5, 6]
    assert await revisions(end_time=times[2]) == [1, 2]
    assert await revisions(start_time=times[1], end_time=times[4]) == [2, 3, 4]
    assert await revisions(
        service=Service.STATESYNC, agent_id="b", subject_prefix="a/", kind="state."
    ) == [4]
    where = ChangeFilter(kind="state.")
    assert [c.revision for c in await store.list_changes(2, 2, where)] == [3, 4]
    # The filter agrees with ChangeFilter.matches, which watches use in memory.
    for fields in ({"kind": "state."}, {"subject_prefix": "a/"}, {"end_time": times[3]}):
        where = ChangeFilter(**fields)
        assert await all_changes(store, where) == [
            c for c in await all_changes(store) if where.matches(c)
        ]


async def test_compact_changes(store: Store) -> None:
    times = [NOW + timedelta(minutes=n) for n in range(4)]
    for n, moment in enumerate(times):
        await store.write_states(write(put(f"k{n}"), agent_id="a", request_id=f"r{n}", now=moment))
    assert await store.compact_revision() == 0

    assert await store.compact_changes(NOW - timedelta(days=1)) == 0  # nothing that old
    assert await store.compact_changes(times[2]) == 2

    assert await store.compact_revision() == 2
    assert [c.revision for c in await all_changes(store)] == [3, 4]
    assert await store.current_revision() == 4
    assert await store.state_changed_since("", 1) is True  # cannot tell any more
    assert await store.state_changed_since("", 3) is True
    assert await store.state_changed_since("", 4) is False
    # An earlier cut-off keeps the compact revision.
    assert await store.compact_changes(times[1]) == 2
    # Requests older than the cut-off are forgotten: a repeat applies again.
    repeat = await store.write_states(write(put("k0"), agent_id="a", request_id="r0"))
    assert repeat.revision == 5
    kept = await store.write_states(write(put("k2"), agent_id="a", request_id="r2"))
    assert kept.revision == 3
    # Everything older than a later cut-off.
    assert await store.compact_changes(NOW + timedelta(days=1)) == 5
    assert await all_changes(store) == []
    assert (await store.write_states(write(put("k9")))).revision == 6


# Listeners and durability


async def test_listeners_get_state_changes_in_revision_order(store: Store) -> None:
    seen: list[Change] = []
    store.add_listener(seen.extend)

    results = await asyncio.gather(
        *(store.write_states(write(put(f"k{n % 5}", n), put(f"x{n}"))) for n in range(40))
    )

    assert [c.revision for c in seen] == list(range(1, 81))
    assert sorted(r.revision for r in results) == list(range(2, 81, 2))
    assert seen == await all_changes(store)


async def test_state_survives_a_restart(store_url: str) -> None:
    async with opened(store_url) as store:
        await store.register_agent(make_agent("a1"), "h", NOW)
        await store.write_states(
            write(put("k", {"x": [1, 2]}), put("bound", session_epoch=1), agent_id="a1")
        )
        await store.write_states(write(put("ttl", expire_time=NOW + timedelta(seconds=1))))
        before = (await store.list_states("", "", 10), await all_changes(store))

    async with opened(store_url) as store:
        assert (await store.list_states("", "", 10), await all_changes(store)) == before
        # What was stored still drives expiry and session ends.
        assert [e.key for e in await store.expire_states(NOW + timedelta(seconds=1))] == ["ttl"]
        await store.end_agent_session("a1", 1, AgentState.LEFT, NOW)
        assert await keys(store) == ["k"]
