"""The store contract: one suite, run on SQLite and on PostgreSQL through ``store_url``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest

from agentcoord.core.errors import InvalidInput, Unavailable
from agentcoord.core.models import (
    Agent,
    AgentCard,
    AgentState,
    AgentStatus,
    Change,
    ChangeFilter,
    HeartbeatRecord,
    Service,
    Skill,
)
from agentcoord.core.store import Store
from agentcoord.store.factory import open_store
from tests.store.helpers import all_changes, opened, raw_postgres

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def make_agent(agent_id: str = "a1", **fields: Any) -> Agent:
    values: dict[str, Any] = {
        "agent_id": agent_id,
        "name": f"Agent {agent_id}",
        "role": "worker",
        "capabilities": ("python", "review"),
        "capacity": 4,
        "labels": {"zone": "eu", "team": "x"},
        "skills": (Skill("s1", "Summarise", "Summarises text", ("nlp", "text")),),
        "ttl": 3.0,
        "status": AgentStatus.READY,
    }
    values.update(fields)
    return Agent(**values)


# Registration and sessions


async def test_get_agents_reads_many_at_once_by_id(store: Store) -> None:
    ids = [f"a{n:04d}" for n in range(600)]  # more than one IN list (MAX_IDS)
    for agent_id in ids:
        await store.register_agent(make_agent(agent_id), f"h-{agent_id}", NOW)
    found = await store.get_agents([*reversed(ids), "missing"])
    assert [agent.agent_id for agent in found] == ids
    assert found[550] == await store.get_agent(ids[550])
    assert [a.agent_id for a in await store.get_agents(ids[::7])] == ids[::7]
    assert await store.get_agents([]) == []


async def test_register_new_agent_starts_epoch_one(store: Store) -> None:
    agent = make_agent()
    stored = await store.register_agent(agent, "hash-1", NOW)

    assert stored == dataclasses.replace(
        agent, state=AgentState.LIVE, epoch=1, register_time=NOW, revision=1
    )
    assert await store.get_agent("a1") == stored
    [change] = await all_changes(store)
    assert change == Change(
        revision=1,
        time=NOW,
        service=Service.DISCOVERY,
        kind="agent.joined",
        subject="a1",
        agent_id="a1",
        details={"agent": stored.to_snapshot()},
    )
    assert Agent.from_snapshot(change.details["agent"]) == stored


async def test_reregister_starts_next_epoch_and_replaces_token(store: Store) -> None:
    first = await store.register_agent(make_agent(), "old", NOW)
    later = NOW + timedelta(seconds=5)
    second = await store.register_agent(make_agent(capacity=8), "new", later)

    assert (first.epoch, second.epoch) == (1, 2)
    assert second.capacity == 8
    assert second.register_time == later
    assert second.revision == 2
    assert await store.find_agent_by_token_hash("old") is None
    assert await store.find_agent_by_token_hash("new") == second
    changes = await all_changes(store)
    assert [c.kind for c in changes] == ["agent.joined", "agent.joined"]
    assert changes[1].details["agent"]["epoch"] == 2


async def test_reregister_after_end_is_live_again(store: Store) -> None:
    await store.register_agent(make_agent(), "h1", NOW)
    await store.end_agent_session("a1", 1, AgentState.EXPIRED, NOW)
    again = await store.register_agent(make_agent(), "h2", NOW)
    assert (again.state, again.epoch) == (AgentState.LIVE, 2)


async def test_end_agent_session_with_the_right_epoch(store: Store) -> None:
    await store.register_agent(make_agent(), "h", NOW)
    later = NOW + timedelta(seconds=1)

    ended = await store.end_agent_session("a1", 1, AgentState.LEFT, later)

    assert ended is not None
    assert (ended.state, ended.epoch, ended.revision) == (AgentState.LEFT, 1, 2)
    assert await store.get_agent("a1") == ended
    change = (await all_changes(store))[-1]
    assert (change.kind, change.revision, change.time) == ("agent.left", 2, later)
    assert change.details == {"agent": ended.to_snapshot()}
    # The token hash stays with the row: the session is found, and is seen to be over.
    found = await store.find_agent_by_token_hash("h")
    assert found is not None and found.state is AgentState.LEFT


async def test_end_agent_session_as_expired(store: Store) -> None:
    await store.register_agent(make_agent(), "h", NOW)
    ended = await store.end_agent_session("a1", 1, AgentState.EXPIRED, NOW)
    assert ended is not None and ended.state is AgentState.EXPIRED
    assert (await all_changes(store))[-1].kind == "agent.expired"


async def test_an_expiry_is_refused_if_a_later_heartbeat_was_flushed(store: Store) -> None:
    """The leader judged the agent by a heartbeat time; another process flushed a later one
    before the expiry was written: the agent stays live (and expires if nothing newer came)."""
    await store.register_agent(make_agent(), "h", NOW)
    judged = NOW + timedelta(seconds=1)
    flushed = NOW + timedelta(seconds=2)
    await store.record_heartbeats([HeartbeatRecord("a1", 1, flushed, AgentStatus.READY, 0, ())])
    before = await store.current_revision()

    refused = await store.end_agent_session(
        "a1", 1, AgentState.EXPIRED, NOW + timedelta(seconds=5), heartbeat_at_most=judged
    )
    assert refused is None
    agent = await store.get_agent("a1")
    assert agent is not None and agent.state is AgentState.LIVE
    assert await store.current_revision() == before
    ended = await store.end_agent_session(
        "a1", 1, AgentState.EXPIRED, NOW + timedelta(seconds=5), heartbeat_at_most=flushed
    )
    assert ended is not None and ended.state is AgentState.EXPIRED


async def test_end_agent_session_changes_nothing_when_it_does_not_apply(store: Store) -> None:
    await store.register_agent(make_agent(), "h", NOW)
    await store.register_agent(make_agent(), "h2", NOW)  # epoch 2

    assert await store.end_agent_session("a1", 1, AgentState.LEFT, NOW) is None  # old epoch
    assert await store.end_agent_session("nobody", 1, AgentState.LEFT, NOW) is None
    assert await store.end_agent_session("a1", 2, AgentState.LEFT, NOW) is not None
    assert await store.end_agent_session("a1", 2, AgentState.EXPIRED, NOW) is None  # not live
    assert await store.current_revision() == 3
    agent = await store.get_agent("a1")
    assert agent is not None and agent.state is AgentState.LEFT


async def test_end_agent_session_refuses_live_as_an_end(store: Store) -> None:
    await store.register_agent(make_agent(), "h", NOW)
    with pytest.raises(InvalidInput) as raised:
        await store.end_agent_session("a1", 1, AgentState.LIVE, NOW)
    assert raised.value.field == "state"


async def test_update_agent_status(store: Store) -> None:
    await store.register_agent(make_agent(), "h", NOW)

    updated = await store.update_agent_status("a1", 1, AgentStatus.DRAINING, NOW)

    assert updated is not None
    assert (updated.status, updated.revision, updated.state) == (
        AgentStatus.DRAINING,
        2,
        AgentState.LIVE,
    )
    assert await store.get_agent("a1") == updated
    change = (await all_changes(store))[-1]
    assert change.kind == "agent.updated"
    assert change.details == {"agent": updated.to_snapshot()}
    assert await store.update_agent_status("a1", 2, AgentStatus.BUSY, NOW) is None
    assert await store.update_agent_status("nobody", 1, AgentStatus.BUSY, NOW) is None
    await store.end_agent_session("a1", 1, AgentState.LEFT, NOW)
    assert await store.update_agent_status("a1", 1, AgentStatus.BUSY, NOW) is None
    assert await store.current_revision() == 3


# Heartbeats


async def test_record_heartbeats_in_a_batch(store_url: str) -> None:
    beat = NOW + timedelta(seconds=2)
    async with opened(store_url) as store:
        await store.register_agent(make_agent("a"), "ha", NOW)
        await store.register_agent(make_agent("b"), "hb", NOW)
        await store.register_agent(make_agent("c"), "hc", NOW)
        await store.register_agent(make_agent("c"), "hc2", NOW)  # c is at epoch 2
        revision = await store.current_revision()
        await store.record_heartbeats(
            [
                HeartbeatRecord("a", 1, beat, AgentStatus.BUSY, 2, ("t1", "t2")),
                HeartbeatRecord("b", 1, beat, AgentStatus.READY, 0, ()),
                HeartbeatRecord("c", 1, beat, AgentStatus.BUSY, 9, ("stale",)),
                HeartbeatRecord("missing", 1, beat, AgentStatus.BUSY, 1, ()),
            ]
        )
        await store.record_heartbeats([])
        assert await store.current_revision() == revision  # no change entries

    async with opened(store_url) as store:  # the facts survive a restart
        a = await store.get_agent("a")
        b = await store.get_agent("b")
        c = await store.get_agent("c")
        assert await store.get_agent("missing") is None
    assert a is not None and b is not None and c is not None
    assert (a.last_heartbeat_time, a.status, a.active_subtasks, a.held_subtask_ids) == (
        beat,
        AgentStatus.BUSY,
        2,
        ("t1", "t2"),
    )
    assert a.revision == 1  # heartbeats do not move an agent's revision
    assert (b.last_heartbeat_time, b.status) == (beat, AgentStatus.READY)
    # The record of an older epoch was ignored.
    assert (c.last_heartbeat_time, c.active_subtasks, c.held_subtask_ids) == (None, 0, ())


# Reads


async def test_reads(store: Store) -> None:
    ids = ["b", "a", "Z", "é", "a-2", "A"]
    for agent_id in ids:
        await store.register_agent(make_agent(agent_id), f"hash-{agent_id}", NOW)

    loaded = await store.load_agents()

    assert [agent.agent_id for agent, _ in loaded] == sorted(ids)  # code point order
    assert all(token_hash == f"hash-{agent.agent_id}" for agent, token_hash in loaded)
    assert await store.get_agent("é") == dict((a.agent_id, a) for a, _ in loaded)["é"]
    assert await store.get_agent("nobody") is None
    found = await store.find_agent_by_token_hash("hash-Z")
    assert found is not None and found.agent_id == "Z"
    assert await store.find_agent_by_token_hash("unknown") is None


async def test_empty_store(store: Store) -> None:
    assert await store.current_revision() == 0
    assert await store.list_changes(0, 10) == []
    assert await store.load_agents() == []


async def test_fields_round_trip(store: Store) -> None:
    agent = make_agent(
        "x",
        role="",
        capabilities=(),
        labels={},
        skills=(Skill("k", "K"), Skill("ü", "Ünicode", "dé", ("a", "b"))),
        ttl=0.25,
        held_subtask_ids=("h1",),
        active_subtasks=1,
        last_heartbeat_time=NOW,
    )
    stored = await store.register_agent(agent, "h", NOW)
    assert await store.get_agent("x") == stored
    assert (stored.skills, stored.ttl, stored.held_subtask_ids) == (
        agent.skills,
        0.25,
        ("h1",),
    )


async def test_times_are_stored_and_returned_in_utc(store: Store) -> None:
    local = NOW.astimezone(timezone(timedelta(hours=2)))
    stored = await store.register_agent(make_agent(), "h", local)
    agent = await store.get_agent("a1")
    [change] = await all_changes(store)

    for value in (stored.register_time, agent and agent.register_time, change.time):
        assert isinstance(value, datetime)
        assert value.utcoffset() == timedelta(0)
        assert value == NOW
    assert change.details["agent"]["register_time"] == NOW.isoformat()


# The change log


async def test_revisions_are_gap_free_in_commit_order(store: Store) -> None:
    results: list[Agent | None] = []
    for n in range(5):
        results.append(await store.register_agent(make_agent(f"a{n}"), f"h{n}", NOW))
    results.append(await store.update_agent_status("a1", 1, AgentStatus.BUSY, NOW))
    results.append(await store.end_agent_session("a2", 1, AgentState.LEFT, NOW))
    results.append(await store.end_agent_session("a2", 1, AgentState.LEFT, NOW))  # no-op
    results.append(await store.register_agent(make_agent("a2"), "h", NOW))

    revisions = [r.revision for r in results if r is not None]
    assert revisions == list(range(1, 9))
    assert [c.revision for c in await all_changes(store)] == revisions
    assert await store.current_revision() == 8


async def test_list_changes_pages_and_filters(store: Store) -> None:
    for n in range(7):
        await store.register_agent(make_agent(f"a{n}"), f"h{n}", NOW)

    assert [c.revision for c in await store.list_changes(0, 3)] == [1, 2, 3]
    assert [c.revision for c in await store.list_changes(3, 3)] == [4, 5, 6]
    assert [c.revision for c in await store.list_changes(6, 3)] == [7]
    assert await store.list_changes(7, 3) == []
    assert [c.subject for c in await store.list_changes(2, 2)] == ["a2", "a3"]
    discovery = ChangeFilter(service=Service.DISCOVERY)
    assert len(await store.list_changes(0, 100, discovery)) == 7
    assert [c.revision for c in await store.list_changes(5, 100, discovery)] == [6, 7]
    assert await store.list_changes(0, 100, ChangeFilter(service=Service.STATESYNC)) == []
    with pytest.raises(InvalidInput):
        await store.list_changes(0, 0)


# Listeners and group commit


async def test_listeners_get_each_commit_in_revision_order_on_the_loop(store: Store) -> None:
    calls: list[list[int]] = []
    threads: set[int] = set()

    def listener(changes: Sequence[Change]) -> None:
        threads.add(threading.get_ident())
        calls.append([change.revision for change in changes])

    remove = store.add_listener(listener)
    await asyncio.gather(
        *(store.register_agent(make_agent(f"a{n}"), f"h{n}", NOW) for n in range(50))
    )
    agent = await store.register_agent(make_agent("last"), "h", NOW)
    await store.record_heartbeats([HeartbeatRecord("last", 1, NOW, AgentStatus.BUSY, 0, ())])

    # Announced before the writer returned, once per commit, all in revision order.
    assert calls[-1] == [agent.revision]
    assert [r for call in calls for r in call] == list(range(1, 52))
    assert len(calls) < 51  # concurrent writes shared commits
    assert threads == {threading.get_ident()}
    announced = [r for call in calls for r in call]
    assert [c.revision for c in await all_changes(store)] == announced

    remove()
    remove()  # removing twice is harmless
    await store.register_agent(make_agent("after"), "h", NOW)
    assert [r for call in calls for r in call] == list(range(1, 52))


async def test_a_failing_listener_does_not_break_the_store(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[int] = []

    def broken(changes: Sequence[Change]) -> None:
        raise RuntimeError("listener bug")

    store.add_listener(broken)
    store.add_listener(lambda changes: seen.extend(c.revision for c in changes))
    with caplog.at_level(logging.ERROR):
        first = await store.register_agent(make_agent("a"), "h", NOW)
        second = await store.register_agent(make_agent("b"), "h", NOW)

    assert (first.revision, second.revision) == (1, 2)
    assert seen == [1, 2]
    assert "listener bug" in caplog.text


async def test_a_failing_write_rolls_back_alone(store_url: str, store: Store) -> None:
    calls: list[list[Change]] = []
    store.add_listener(lambda changes: calls.append(list(changes)))
    await store.register_agent(make_agent("warm-up"), "h", NOW)
    calls.clear()
    # Fails in the database (NOT NULL) and in the driver (integer out of range).
    null_name = make_agent("null-name", name=cast(str, None))
    huge = make_agent("huge", capacity=2**70)
    agents = [make_agent(f"a{n}") for n in range(3)] + [null_name, huge]
    agents += [make_agent(f"b{n}") for n in range(3)]

    results = await asyncio.gather(
        *(store.register_agent(agent, "h", NOW) for agent in agents), return_exceptions=True
    )

    database_errors = (sqlite3.IntegrityError, asyncpg.NotNullViolationError)
    assert isinstance(results[3], database_errors)
    assert isinstance(results[4], (OverflowError, asyncpg.DataError))
    stored = [r for r in results if isinstance(r, Agent)]
    assert [a.agent_id for a in stored] == ["a0", "a1", "a2", "b0", "b1", "b2"]
    # One commit for the whole batch; the failed writes left no revision behind.
    assert [[c.subject for c in call] for call in calls] == [[a.agent_id for a in stored]]
    assert [a.revision for a in stored] == list(range(2, 8))
    assert await store.current_revision() == 7
    assert await store.get_agent("null-name") is None
    assert await store.get_agent("huge") is None
    # The store goes on working.
    assert (await store.register_agent(make_agent("c"), "h", NOW)).revision == 8


# Concurrency


async def test_concurrent_registrations(store: Store) -> None:
    agents = await asyncio.gather(
        *(store.register_agent(make_agent(f"agent-{n:03}"), f"h{n}", NOW) for n in range(200))
    )

    assert sorted(a.revision for a in agents) == list(range(1, 201))
    assert {a.epoch for a in agents} == {1}
    assert [c.revision for c in await all_changes(store)] == list(range(1, 201))
    assert len(await store.load_agents()) == 200


async def test_concurrent_reregistrations_of_one_id(store: Store) -> None:
    agents = await asyncio.gather(
        *(store.register_agent(make_agent(), f"h{n}", NOW) for n in range(50))
    )

    assert sorted(a.epoch for a in agents) == list(range(1, 51))
    latest = max(agents, key=lambda a: a.epoch)
    assert latest.revision == 50
    assert await store.get_agent("a1") == latest


async def test_replicas_share_one_revision_sequence(store_url: str, store: Store) -> None:
    async with opened(store_url) as other:

        async def register(replica: Store, prefix: str) -> list[Agent]:
            agents = []
            for n in range(40):
                agents.append(await replica.register_agent(make_agent(f"{prefix}{n}"), "h", NOW))
            return agents

        mine, theirs = await asyncio.gather(register(store, "m"), register(other, "t"))
        assert sorted(a.revision for a in mine + theirs) == list(range(1, 81))
        assert await other.current_revision() == 80
        assert len(await store.load_agents()) == 80


# Lifecycle, durability, migrations


async def test_close_commits_queued_writes_then_refuses(store_url: str) -> None:
    store = open_store(store_url)
    await store.open()
    writes = [
        asyncio.ensure_future(store.register_agent(make_agent(f"a{n}"), "h", NOW))
        for n in range(50)
    ]
    await asyncio.sleep(0)  # the writes are queued
    await store.close()
    assert len(await asyncio.gather(*writes)) == 50

    with pytest.raises(Unavailable):
        await store.register_agent(make_agent("late"), "h", NOW)
    with pytest.raises(Unavailable):
        await store.get_agent("a1")
    with pytest.raises(Unavailable):
        await store.current_revision()
    await store.close()  # closing twice is harmless

    async with opened(store_url) as reopened:
        assert len(await reopened.load_agents()) == 50


async def test_operations_before_open_are_unavailable(store_url: str) -> None:
    store = open_store(store_url)
    with pytest.raises(Unavailable):
        await store.register_agent(make_agent(), "h", NOW)
    with pytest.raises(Unavailable):
        await store.list_changes(0, 10)
    await store.close()


async def test_data_survives_a_restart(store_url: str) -> None:
    async with opened(store_url) as store:
        registered = await store.register_agent(make_agent(), "h", NOW)
        ended = await store.end_agent_session("a1", 1, AgentState.LEFT, NOW)
        before = await all_changes(store)

    async with opened(store_url) as store:
        assert await store.get_agent("a1") == ended
        assert await store.find_agent_by_token_hash("h") == ended
        assert await all_changes(store) == before
        assert await store.current_revision() == 2
        again = await store.register_agent(make_agent(), "h2", NOW)
    assert (registered.epoch, again.epoch, again.revision) == (1, 2, 3)


EXPECTED_TABLES = {
    "schema_migrations",
    "revision_counter",
    "changes",
    "agents",
    "states",
    "write_requests",
}
EXPECTED_INDEXES = {
    "changes_service_revision": ["service", "revision"],
    "changes_agent_id_revision": ["agent_id", "revision"],
    "changes_subject_revision": ["subject", "revision"],
    "changes_kind_revision": ["kind", "revision"],
    "changes_time": ["time"],
    "agents_token_hash": ["token_hash"],
    "states_expire_time": ["expire_time"],
    "states_agent_session": ["agent_id", "session_epoch"],
    "write_requests_time": ["time"],
}
EXPECTED_MIGRATIONS = [
    (1, "init"),
    (2, "statesync"),
    (3, "distribution"),
    (4, "session_identity"),
    (5, "agent_card"),
    (6, "required_skills"),
    (7, "subtask_columns"),
]


@dataclasses.dataclass
class Schema:
    tables: set[str]
    indexes: dict[str, list[str]]
    migrations: list[tuple[int, str, str]]


async def inspect_schema(url: str) -> Schema:
    """Read tables, indexes and applied migrations with the driver, not the store."""
    if url.startswith("sqlite:"):
        return inspect_sqlite(url.removeprefix("sqlite:///"))
    async with raw_postgres(url) as (conn, schema):
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
        definitions = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1", schema
        )
        migrations = await conn.fetch(
            f'SELECT version, name, applied_at FROM "{schema}".schema_migrations ORDER BY version'
        )
    return Schema(
        tables={r["tablename"] for r in tables},
        # indexdef reads "CREATE INDEX name ON schema.table USING btree (a, b) [WHERE ...]".
        indexes={r["indexname"]: index_columns(r["indexdef"]) for r in definitions},
        migrations=[(r["version"], r["name"], str(r["applied_at"])) for r in migrations],
    )


def index_columns(definition: str) -> list[str]:
    """Columns of ``CREATE INDEX name ON schema.table USING btree (a, "b") [WHERE ...]``."""
    columns = definition.partition(" USING btree (")[2].partition(")")[0]
    return [column.strip('"') for column in columns.split(", ")]


def inspect_sqlite(path: str) -> Schema:
    conn = sqlite3.connect(path)
    try:
        objects = conn.execute("SELECT type, name FROM sqlite_master").fetchall()
        indexes = {
            name: [r[2] for r in conn.execute(f"PRAGMA index_info('{name}')")]
            for kind, name in objects
            if kind == "index"
        }
        migrations = conn.execute(
            "SELECT version, name, applied_at FROM schema_migrations ORDER BY version"
        ).fetchall()
    finally:
        conn.close()
    return Schema(
        tables={name for kind, name in objects if kind == "table"},
        indexes=indexes,
        migrations=[(r[0], r[1], str(r[2])) for r in migrations],
    )


async def test_migrations_build_the_schema_once(store_url: str) -> None:
    async with opened(store_url):
        pass
    first = await inspect_schema(store_url)

    assert first.tables >= EXPECTED_TABLES
    for name, columns in EXPECTED_INDEXES.items():
        assert first.indexes.get(name) == columns, name
    assert [(version, name) for version, name, _ in first.migrations] == EXPECTED_MIGRATIONS

    async with opened(store_url) as store:  # reopening applies nothing again
        await store.register_agent(make_agent(), "h", NOW)
    assert (await inspect_schema(store_url)).migrations == first.migrations


async def test_the_card_migration_keeps_agents_and_their_skills(tmp_path: Path) -> None:
    """An agent written before 0005 reads back with its skills and an empty card."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    async with opened(url) as store:
        await store.register_agent(make_agent(), "h", NOW)
    # Back to the schema of migration 0004, skills as they were stored then.
    with contextlib.closing(sqlite3.connect(tmp_path / "old.db")) as conn, conn:
        conn.executescript(
            """
            ALTER TABLE agents DROP COLUMN card;
            UPDATE agents SET skills = '[{"id":"s1","name":"Summarise",'
                || '"description":"Summarises text","tags":["nlp","text"]}]';
            DELETE FROM schema_migrations WHERE version = 5;
            """
        )
    async with opened(url) as store:
        ((agent, _),) = await store.load_agents()
    assert agent.card == AgentCard()
    assert agent.skills == make_agent().skills
    card = AgentCard(description="d", version="2", provider_organization="o", a2a_url="https://a")
    skill = Skill("s2", "S", examples=("e",), input_modes=("text/plain",))
    async with opened(url) as store:
        await store.register_agent(make_agent(card=card, skills=(skill,)), "h2", NOW)
    async with opened(url) as store:
        ((agent, _),) = await store.load_agents()
    assert (agent.card, agent.skills) == (card, (skill,))


async def test_replicas_starting_together_migrate_once(store_url: str) -> None:
    stores = [open_store(store_url) for _ in range(4)]
    await asyncio.gather(*(store.open() for store in stores))
    try:
        agents = await asyncio.gather(
            *(store.register_agent(make_agent(f"a{n}"), "h", NOW) for n, store in enumerate(stores))
        )
        assert sorted(a.revision for a in agents) == [1, 2, 3, 4]
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    assert len((await inspect_schema(store_url)).migrations) == len(EXPECTED_MIGRATIONS)
