"""Discovery rules driven directly, with a manual clock, against the real stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from agentcoord.core.changes import ChangeFeed
from agentcoord.core.discovery import (
    AgentQuery,
    AgentSpec,
    Discovery,
    DiscoveryConfig,
    HeartbeatCommand,
)
from agentcoord.core.errors import AlreadyExists, NotFound, PermissionDenied, Unauthenticated
from agentcoord.core.models import AgentState, AgentStatus
from agentcoord.core.store import Store
from agentcoord.store.factory import open_store


class ManualClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.seconds = 1000.0
        self.wall = datetime(2026, 1, 1, tzinfo=UTC)

    def monotonic(self) -> float:
        return self.seconds

    def now(self) -> datetime:
        return self.wall + timedelta(seconds=self.seconds - 1000.0)

    def advance(self, seconds: float) -> None:
        self.seconds += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


async def start_discovery(store: Store, clock: ManualClock) -> Discovery:
    discovery = Discovery(store, clock, ChangeFeed(store), DiscoveryConfig(min_ttl=0.1))
    await discovery.start()
    return discovery


async def beat(discovery: Discovery, session, active: int = 0):  # type: ignore[no-untyped-def]
    return await discovery.heartbeat(
        session, "", active_subtasks=active, held_subtask_ids=(), status=AgentStatus.UNSPECIFIED
    )


async def test_expiry_is_judged_on_the_monotonic_clock(store: Store, clock: ManualClock) -> None:
    discovery = await start_discovery(store, clock)
    registration = await discovery.register(AgentSpec("a", "A", ttl=3))
    session = await discovery.authenticate(registration.session_token)
    clock.advance(2.9)
    assert await discovery.sweep() == []
    ack = await beat(discovery, session)
    assert ack.command is HeartbeatCommand.NONE and ack.ttl_remaining == 3
    clock.advance(2.9)
    assert await discovery.sweep() == []
    clock.advance(0.2)
    expired = await discovery.sweep()
    assert [agent.agent_id for agent in expired] == ["a"]
    assert (await discovery.get_agent("a")).agent.state is AgentState.EXPIRED
    stored = await store.get_agent("a")
    assert stored is not None and stored.state is AgentState.EXPIRED
    # The ended session can neither heartbeat nor authenticate again.
    assert (await beat(discovery, session)).command is HeartbeatCommand.REREGISTER
    with pytest.raises(Unauthenticated):
        await discovery.authenticate(registration.session_token)


async def test_a_passed_deadline_reads_as_expired_before_the_sweep(
    store: Store, clock: ManualClock
) -> None:
    discovery = await start_discovery(store, clock)
    await discovery.register(AgentSpec("a", "A", ttl=1))
    clock.advance(1.5)
    view = await discovery.get_agent("a")
    assert view.agent.state is AgentState.EXPIRED and view.ttl_remaining == 0
    assert discovery.list_agents(AgentQuery(), after_agent_id="", limit=10)[0] == []
    assert discovery.summary().live_agents == 0


async def test_heartbeats_are_flushed_in_batches(store: Store, clock: ManualClock) -> None:
    discovery = await start_discovery(store, clock)
    sessions = []
    for name in ("a", "b", "c"):
        registration = await discovery.register(AgentSpec(name, name, ttl=10))
        sessions.append(await discovery.authenticate(registration.session_token))
    revision = await store.current_revision()
    clock.advance(1)
    for session in sessions:
        await beat(discovery, session, active=1)
    before = await store.get_agent("a")
    assert before is not None and before.active_subtasks == 0  # not written yet
    await discovery.flush()
    for name in ("a", "b", "c"):
        stored = await store.get_agent(name)
        assert stored is not None and stored.active_subtasks == 1
        assert stored.last_heartbeat_time == clock.now()
    assert await store.current_revision() == revision  # heartbeats add no change log entries


async def test_restart_grants_live_agents_a_full_ttl(store: Store, clock: ManualClock) -> None:
    first = await start_discovery(store, clock)
    registration = await first.register(AgentSpec("a", "A", ttl=2))
    clock.advance(1.9)  # nearly expired when the "process" restarts
    second = await start_discovery(store, clock)
    session = await second.authenticate(registration.session_token)
    clock.advance(1.0)
    assert await second.sweep() == []
    assert (await beat(second, session)).command is HeartbeatCommand.NONE


async def test_status_change_is_a_change_log_entry(store: Store, clock: ManualClock) -> None:
    discovery = await start_discovery(store, clock)
    registration = await discovery.register(AgentSpec("a", "A"))
    session = await discovery.authenticate(registration.session_token)
    revision = await store.current_revision()
    await discovery.heartbeat(
        session, "a", active_subtasks=0, held_subtask_ids=(), status=AgentStatus.DRAINING
    )
    changes = await store.list_changes(revision, 10)
    assert [change.kind for change in changes] == ["agent.updated"]
    assert (await discovery.get_agent("a")).agent.status is AgentStatus.DRAINING


async def test_sessions_cannot_act_for_other_agents(store: Store, clock: ManualClock) -> None:
    discovery = await start_discovery(store, clock)
    mine = await discovery.register(AgentSpec("mine", "M"))
    await discovery.register(AgentSpec("other", "O"))
    session = await discovery.authenticate(mine.session_token)
    with pytest.raises(PermissionDenied):
        await discovery.deregister(session, "other")
    with pytest.raises(NotFound):
        await discovery.deregister(None, "ghost")
    left = await discovery.deregister(session, "")
    assert left.agent_id == "mine" and left.state is AgentState.LEFT


async def test_ttl_is_clamped_to_the_configured_range(store: Store, clock: ManualClock) -> None:
    discovery = Discovery(
        store, clock, ChangeFeed(store), DiscoveryConfig(min_ttl=1, default_ttl=5, max_ttl=60)
    )
    await discovery.start()
    assert (await discovery.register(AgentSpec("a", "A", ttl=0.01))).agent.ttl == 1
    assert (await discovery.register(AgentSpec("b", "B", ttl=0))).agent.ttl == 5
    assert (await discovery.register(AgentSpec("c", "C", ttl=1e6))).agent.ttl == 60


async def test_sessions_opened_by_another_process_authenticate(
    store_url: str, clock: ManualClock
) -> None:
    one, two = open_store(store_url), open_store(store_url)
    await one.open()
    await two.open()
    try:
        elsewhere = await start_discovery(two, clock)  # started before the registration
        registering = await start_discovery(one, clock)
        registration = await registering.register(AgentSpec("a", "A"))
        session = await elsewhere.authenticate(registration.session_token)
        assert session.agent_id == "a" and session.epoch == registration.agent.epoch
    finally:
        await one.close()
        await two.close()


async def test_an_agent_registered_through_another_store_of_the_database_is_found(
    store_url: str, clock: ManualClock
) -> None:
    # A store opened once hears every write, so Discovery looks up no agent it has not
    # heard of; once another store opened the same database, it looks in the store again.
    one = open_store(store_url)
    await one.open()
    try:
        elsewhere = await start_discovery(one, clock)
        assert one.writes_alone() is store_url.startswith("sqlite")
        two = open_store(store_url)
        await two.open()
        try:
            assert not one.writes_alone() and not two.writes_alone()
            registering = await start_discovery(two, clock)
            await registering.register(AgentSpec("a", "A", ttl=60))
            assert (await elsewhere.get_agent("a")).agent.state is AgentState.LIVE
            with pytest.raises(AlreadyExists):
                await elsewhere.register(AgentSpec("a", "A", ttl=60))
        finally:
            await two.close()
    finally:
        await one.close()


async def test_an_ended_session_cannot_deregister_the_session_that_replaced_it(
    store: Store, clock: ManualClock
) -> None:
    # The old session's Deregister was authenticated before the admin took the id over
    # (the call was in flight): it must not end the new session.
    discovery = await start_discovery(store, clock)
    first = await discovery.register(AgentSpec("a", "A", ttl=60))
    old = await discovery.authenticate(first.session_token)
    second = await discovery.register(AgentSpec("a", "A", ttl=60), admin=True)
    agent = await discovery.deregister(old, "")
    assert agent.epoch == second.agent.epoch and agent.state is AgentState.LIVE
    assert (await discovery.get_agent("a")).agent.state is AgentState.LIVE
    stored = await store.get_agent("a")
    assert stored is not None and stored.state is AgentState.LIVE
    assert stored.epoch == second.agent.epoch
    new = await discovery.authenticate(second.session_token)
    assert (await beat(discovery, new)).command is HeartbeatCommand.NONE


async def test_a_resume_that_changes_fields_keeps_the_load_of_the_last_heartbeat(
    store: Store, clock: ManualClock
) -> None:
    discovery = await start_discovery(store, clock)
    registration = await discovery.register(AgentSpec("a", "A", ttl=60))
    session = await discovery.authenticate(registration.session_token)
    clock.advance(1)
    await beat(discovery, session, active=3)
    heartbeat_time = clock.now()
    clock.advance(1)
    resumed = await discovery.register(
        AgentSpec("a", "A", capacity=4, ttl=60),
        current=session,
        token=registration.session_token,
    )
    assert resumed.agent.epoch == registration.agent.epoch and resumed.agent.capacity == 4
    agent = (await discovery.get_agent("a")).agent
    assert (agent.active_subtasks, agent.last_heartbeat_time) == (3, heartbeat_time)
    await discovery.flush()  # the heartbeat's facts were not flushed before the resume
    stored = await store.get_agent("a")
    assert stored is not None and stored.capacity == 4
    assert (stored.active_subtasks, stored.last_heartbeat_time) == (3, heartbeat_time)


async def test_resumes_keep_one_deadline_per_agent_and_the_agent_live(
    store: Store, clock: ManualClock
) -> None:
    """An agent that resumes its session often (an SDK reconnecting, say) costs the
    sweep one deadline, not one more per resume for as long as the process runs."""
    discovery = await start_discovery(store, clock)
    registration = await discovery.register(AgentSpec("a", "A", ttl=2))
    session = await discovery.authenticate(registration.session_token)
    for n in range(40):
        clock.advance(0.5)
        capacity = 1 + n % 2  # every other resume changes a field, stored anew
        await discovery.register(
            AgentSpec("a", "A", capacity=capacity, ttl=2),
            current=session,
            token=registration.session_token,
        )
        assert await discovery.sweep() == []
    deadlines = discovery._deadlines  # the sweep's heap: its size is the leak
    assert len(deadlines) == 1, deadlines
    clock.advance(2.1)
    assert [agent.agent_id for agent in await discovery.sweep()] == ["a"]
    assert discovery._deadlines == []
