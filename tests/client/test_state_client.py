"""The typed StateSync client (``client.state``) against real servers, on both stores."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from agentcoord.client import (
    AddToSet,
    AgentcoordClient,
    Change,
    ChangeType,
    ConflictError,
    Delete,
    Exists,
    FailedPreconditionError,
    Fencing,
    Increment,
    InvalidArgumentError,
    MergePatch,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    Put,
    ResourceExhaustedError,
    RetryPolicy,
    UnauthenticatedError,
    UpdatePolicy,
    ValueIs,
    VersionIs,
)
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.server.app import App
from agentcoord.statesync.v1 import statesync_service_pb2 as pb
from tests.helpers import eventually
from tests.server import conftest as server_fixtures
from tests.server.conftest import StartServer

start_server = server_fixtures.start_server
ADMIN = "admin-secret"
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
]
"""Channel options so a client finds a restarted server quickly."""


@pytest.fixture
async def app(start_server: StartServer) -> App:
    return await start_server(admin_token=ADMIN)


def connect(app: App, **options: Any) -> AgentcoordClient:
    return AgentcoordClient(f"127.0.0.1:{app.port}", options=FAST_RECONNECT, **options)


async def agent(app: App, agent_id: str, ttl: float = 30) -> AgentcoordClient:
    """An entered client registered as ``agent_id``; the caller exits it."""
    client = await connect(app).__aenter__()
    request = discovery_pb.RegisterRequest(agent_id=agent_id, name=agent_id)
    request.ttl.FromMilliseconds(int(ttl * 1000))
    await client.discovery.register(request)
    return client


@pytest.fixture
async def alice(app: App) -> AsyncIterator[AgentcoordClient]:
    client = await agent(app, "alice")
    yield client
    await client.__aexit__(None, None, None)


@pytest.fixture
async def admin(app: App) -> AsyncIterator[AgentcoordClient]:
    async with connect(app, token=ADMIN) as client:
        yield client


async def test_put_get_delete(alice: AgentcoordClient) -> None:
    state = alice.state
    plan: dict[str, Any] = {"steps": ["a", "b"], "done": 0, "ratio": 0.5, "owner": None}
    first = await state.put("shared/plan", plan, metadata={"kind": "plan"})
    assert (first.key, first.value, first.version) == ("shared/plan", plan, 1)
    assert first.create_revision == first.mod_revision and first.agent_id == "alice"
    assert first.metadata == {"kind": "plan"} and first.expire_time is None
    second = await state.put("shared/plan", [1, 2], expected_version=1)
    assert second.version == 2 and second.create_revision == first.create_revision
    assert await state.get("shared/plan") == second
    blob = await state.put("agents/alice/blob", b"\x00\xff")
    assert blob.value == b"\x00\xff" and (await state.get("agents/alice/blob")) == blob
    assert await state.get("shared/missing") is None

    with pytest.raises(ConflictError) as exists:
        await state.put("shared/plan", 0, expected_version=0)
    assert exists.value.current_version == 2 and exists.value.code is grpc.StatusCode.ABORTED
    with pytest.raises(ConflictError) as stale:
        await state.delete("shared/plan", expected_version=1)
    assert stale.value.current_version == 2
    previous = await state.delete("shared/plan", expected_version=2)
    assert previous is not None and previous.value == [1, 2]
    with pytest.raises(NotFoundError):
        await state.delete("shared/plan")
    assert await state.delete("shared/plan", allow_missing=True) is None
    recreated = await state.put("shared/plan", "again", expected_version=0)
    assert recreated.version == 1


async def test_ttl_and_session_binding_are_sent(alice: AgentcoordClient) -> None:
    brief = await alice.state.put("shared/brief", 1, ttl=60)
    assert brief.expire_time is not None and not brief.bound_to_session
    bound = await alice.state.put("agents/alice/lock", 1, bind_to_session=True)
    assert bound.bound_to_session and bound.expire_time is None


async def test_errors_are_typed(app: App, alice: AgentcoordClient) -> None:
    with pytest.raises(PermissionDeniedError) as denied:
        await alice.state.put("agents/bob/x", 1)
    assert denied.value.reason == "KEY_NOT_WRITABLE"
    with pytest.raises(InvalidArgumentError) as invalid:
        await alice.state.put("shared//x", 1)
    assert invalid.value.field_violations == ("key",)
    with pytest.raises(FailedPreconditionError) as fenced:
        await alice.state.put("shared/x", 1, fencing=Fencing("subtask-1", 3))
    assert fenced.value.reason == "LEASE_NOT_HELD"
    async with connect(app) as anonymous:
        with pytest.raises(UnauthenticatedError):
            await anonymous.state.put("shared/x", 1)
    with pytest.raises(TypeError):
        await alice.state.put("shared/x", {1: "not a str key"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="not a JSON number"):
        await alice.state.put("shared/x", float("nan"))


async def test_transact_all_or_none(alice: AgentcoordClient) -> None:
    state = alice.state
    await state.put("shared/a", {"n": 1})
    with pytest.raises(ConflictError) as refused:
        await state.transact(
            [VersionIs("shared/a", 1), Exists("shared/b")],
            [Put("shared/a", {"n": 2}), Put("shared/c", 1)],
        )
    assert refused.value.failed_compare == 1 and refused.value.current_version == 0
    assert await state.get("shared/c") is None
    result = await state.transact(
        [VersionIs("shared/a", 1), Exists("shared/b", exists=False)],
        [
            Put("shared/a", {"n": 2}, metadata={"by": "tx"}),
            Put("shared/b", b"x"),
            Delete("shared/zzz"),
        ],
    )
    a, b, gone = result.entries
    assert a is not None and a.value == {"n": 2} and a.metadata == {"by": "tx"}
    assert b is not None and b.value == b"x" and gone is None and result.deleted == ()
    assert result.revision == b.mod_revision
    removed = await state.transact([VersionIs("shared/b", 1)], [Delete("shared/b")])
    assert removed.deleted == ("shared/b",) and await state.get("shared/b") is None


async def test_transact_compares_values(alice: AgentcoordClient) -> None:
    await alice.state.put("shared/v", {"n": 1, "m": [True]})
    await alice.state.put("shared/bin", b"\x01")
    with pytest.raises(ConflictError):
        await alice.state.transact([ValueIs("shared/v", {"n": 2})], [Put("shared/v", 0)])
    result = await alice.state.transact(
        [ValueIs("shared/v", {"m": [True], "n": 1}), ValueIs("shared/bin", b"\x01")],
        [Put("shared/v", 0)],
    )
    assert result.entries[0] is not None and result.entries[0].version == 2


async def test_list_follows_pages_in_key_order(alice: AgentcoordClient) -> None:
    keys = [f"shared/many/{index:03}" for index in range(230)]  # three pages of 100
    for start in range(0, len(keys), 100):
        await alice.state.transact([], [Put(key, 0) for key in keys[start : start + 100]])
    listed = await alice.state.list("shared/many/")
    assert [entry.key for entry in listed] == keys
    assert await alice.state.list("shared/none/") == []


async def test_list_starts_again_once_when_the_keys_change_between_pages(
    alice: AgentcoordClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await alice.state.transact([], [Put(f"shared/l/{i:03}", i) for i in range(120)])
    raw_list = alice.statesync.list_states
    writes = {"done": 0, "budget": 1}

    async def list_and_write(request: pb.ListStatesRequest) -> pb.ListStatesResponse:
        response = await raw_list(request)
        if response.next_page_token and writes["done"] < writes["budget"]:
            writes["done"] += 1
            await alice.state.put(f"shared/l/new-{writes['done']}", 0)  # invalidates the listing
        return response

    monkeypatch.setattr(alice.statesync, "list_states", list_and_write)
    listed = await alice.state.list("shared/l/")
    assert len(listed) == 121 and listed[-1].key == "shared/l/new-1"
    writes["budget"] = 3  # a listing that changes every time fails after the second try
    with pytest.raises(OutOfRangeError):
        await alice.state.list("shared/l/")


async def test_parity_own_state_all_agents_live_agents_and_clear(
    app: App, alice: AgentcoordClient
) -> None:
    bob = await agent(app, "bob")
    try:
        await bob.state.put(bob.state.own_key("status"), "idle")
        status = await alice.state.put(
            alice.state.own_key("status"), {"step": 3}, metadata={"model": "m1"}
        )
        assert status.key == "agents/alice/status"
        assert await alice.state.get(alice.state.own_key("status")) == status
        await alice.state.transact(
            [], [Put(alice.state.own_key(f"notes/{i:03}"), i) for i in range(127)]
        )
        assert len(await alice.state.list_own()) == 128
        everyone = {entry.key for entry in await alice.state.list_agent_states()}
        assert "agents/bob/status" in everyone and len(everyone) == 129
        await bob.discovery.deregister(discovery_pb.DeregisterRequest())
    finally:
        await bob.__aexit__(None, None, None)
    live = await alice.state.list_agent_states(live_only=True)
    assert {entry.key.split("/")[1] for entry in live} == {"alice"}
    assert await alice.state.clear_own(chunk_size=50) == 128
    assert await alice.state.list_own() == []
    assert [e.key for e in await alice.state.list_agent_states()] == ["agents/bob/status"]
    async with connect(app) as nameless:  # no agent id
        with pytest.raises(ValueError, match="no agent id"):
            nameless.state.own_key("x")


async def watch_into(
    changes: AsyncGenerator[Change, None], into: list[Change], count: int
) -> list[Change]:
    async with contextlib.aclosing(changes):
        async for change in changes:
            into.append(change)
            if len(into) == count:
                break
    return into


async def test_watch_yields_every_change_once_in_order(alice: AgentcoordClient) -> None:
    start = (await alice.state.put("shared/w/start", 0)).mod_revision
    seen: list[Change] = []
    watcher = asyncio.create_task(
        watch_into(
            alice.state.watch("shared/w/", start_revision=start, include_previous=True), seen, 4
        )
    )
    await alice.state.put("shared/w/x", 1)
    await alice.state.put("agents/alice/elsewhere", 1)
    await alice.state.put("shared/w/x", 2)
    await alice.state.delete("shared/w/x")
    await alice.state.put("shared/w/y", 3, ttl=1)
    changes = await asyncio.wait_for(watcher, 10)
    assert [(c.type, c.key) for c in changes] == [
        (ChangeType.PUT, "shared/w/x"),
        (ChangeType.PUT, "shared/w/x"),
        (ChangeType.DELETE, "shared/w/x"),
        (ChangeType.PUT, "shared/w/y"),
    ]
    assert changes[1].entry is not None and changes[1].entry.value == 2
    assert changes[1].previous is not None and changes[1].previous.value == 1
    assert changes[2].entry is None and changes[0].agent_id == "alice"
    revisions = [c.revision for c in changes]
    assert revisions == sorted(set(revisions)) and revisions[0] > start
    after = alice.state.watch("shared/w/", start_revision=revisions[-1])
    expired = await asyncio.wait_for(anext(after), 10)
    await after.aclose()
    assert (expired.type, expired.key, expired.agent_id) == (ChangeType.EXPIRE, "shared/w/y", "")


async def test_watch_resumes_across_a_server_restart(
    start_server: StartServer, app: App, admin: AgentcoordClient
) -> None:
    start = (await admin.state.put("shared/r/start", 0)).mod_revision
    seen: list[Change] = []
    watch = admin.state.watch("shared/r/", start_revision=start, retry=RetryPolicy(max_delay=20))
    watcher = asyncio.create_task(watch_into(watch, seen, 60))
    for value in range(30):
        await admin.state.put(f"shared/r/{value % 4}", value)
    await eventually(lambda: has(seen))
    await app.stop(0)  # the watch ends with UNAVAILABLE; the watcher reconnects by itself
    await start_server(admin_token=ADMIN, listen=f"127.0.0.1:{app.port}")
    for value in range(30, 60):  # while the watcher is still backing off: replayed on resume
        await admin.state.put(f"shared/r/{value % 4}", value)
    changes = await asyncio.wait_for(watcher, 30)
    assert [c.entry.value for c in changes if c.entry is not None] == list(range(60))
    revisions = [c.revision for c in changes]
    assert revisions == sorted(set(revisions))


async def has(items: list[Any]) -> bool:
    return bool(items)


class CutOffCall:
    """A WatchStates call that fails with ``code`` after ``deliver`` messages."""

    def __init__(self, call: Any, deliver: int, code: grpc.StatusCode) -> None:
        self._call = call
        self._deliver = deliver
        self._code = code

    def cancel(self) -> bool:
        return bool(self._call.cancel())

    async def __aiter__(self) -> AsyncIterator[Any]:
        async for response in self._call:
            if not self._deliver:
                empty = grpc.aio.Metadata()
                raise grpc.aio.AioRpcError(self._code, empty, empty, "cut off")
            self._deliver -= 1
            yield response


async def test_watch_resumes_after_being_cut_off_as_a_slow_watcher(
    alice: AgentcoordClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = (await alice.state.put("shared/s/start", 0)).mod_revision
    for value in range(5):  # replayed in the second message; the third one fails
        await alice.state.put(f"shared/s/{value}", value)
    stub = alice.statesync._stub
    real_watch = stub.WatchStates
    opened: list[pb.WatchStatesRequest] = []

    def watch_states(request: pb.WatchStatesRequest, **kwargs: Any) -> Any:
        opened.append(request)
        call = real_watch(request, **kwargs)
        return CutOffCall(call, 2, grpc.StatusCode.RESOURCE_EXHAUSTED) if len(opened) == 1 else call

    monkeypatch.setattr(stub, "WatchStates", watch_states)
    seen: list[Change] = []
    watch = alice.state.watch("shared/s/", start_revision=start)
    watcher = asyncio.create_task(watch_into(watch, seen, 10))
    await eventually(lambda: has(seen[4:]))
    for value in range(5, 10):
        await alice.state.put(f"shared/s/{value}", value)
    await asyncio.wait_for(watcher, 10)
    assert [c.entry.value for c in seen if c.entry is not None] == list(range(10))
    assert len(opened) == 2 and opened[1].start_revision == seen[4].revision


async def test_watch_raises_a_message_too_large_instead_of_looping(
    app: App, alice: AgentcoordClient
) -> None:
    start = (await alice.state.put("shared/big/start", 0)).mod_revision
    await alice.state.put("shared/big/blob", b"x" * 100_000)
    small = [*FAST_RECONNECT, ("grpc.max_receive_message_length", 50_000)]
    async with AgentcoordClient(f"127.0.0.1:{app.port}", options=small) as client:
        with pytest.raises(ResourceExhaustedError):
            await asyncio.wait_for(
                anext(client.state.watch("shared/big/", start_revision=start)), 10
            )


async def test_update_loses_no_update_under_contention(alice: AgentcoordClient) -> None:
    hot = ["shared/hot/0", "shared/hot/1"]
    committed = dict.fromkeys(hot, 0)

    async def writer(index: int) -> None:
        for round_ in range(20):
            key = hot[(index + round_) % 2]
            entry = await alice.state.update(key, lambda n: n + 1, default=0)
            assert entry.key == key
            committed[key] += 1

    await asyncio.gather(*(writer(index) for index in range(16)))
    for key in hot:
        final = await alice.state.get(key)
        assert final is not None and final.value == committed[key] == final.version
    assert sum(committed.values()) == 16 * 20 == alice.state.stats.committed
    assert alice.state.stats.conflicts > 0  # the writers really collided


Hook = Callable[[int], Awaitable[None]]
"""Runs around the n-th PutState (1-based)."""


async def nothing(attempt: int) -> None:
    return None


class FlakyStub:
    """Wraps a StateSync stub: hooks run before and after each PutState to inject trouble."""

    def __init__(self, stub: Any, *, before: Hook = nothing, after: Hook = nothing) -> None:
        self._stub = stub
        self._before = before
        self._after = after
        self.puts: list[pb.PutStateRequest] = []
        self.gets = 0

    async def GetState(self, request: pb.GetStateRequest, **kwargs: Any) -> Any:
        self.gets += 1
        return await self._stub.GetState(request, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    async def PutState(self, request: pb.PutStateRequest, **kwargs: Any) -> Any:
        self.puts.append(request)
        await self._before(len(self.puts))
        response = await self._stub.PutState(request, **kwargs)
        await self._after(len(self.puts))
        return response

    @classmethod
    def install(cls, client: AgentcoordClient, **hooks: Hook) -> FlakyStub:
        flaky = cls(client.statesync._stub, **hooks)
        client.statesync._stub = flaky
        return flaky


async def test_update_resends_the_same_request_id_after_unavailable(
    alice: AgentcoordClient,
) -> None:
    await alice.state.put("shared/count", 10)

    async def lose_first_response(attempt: int) -> None:
        if attempt == 1:  # the write committed, but the client never hears of it
            empty = grpc.aio.Metadata()
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, empty, empty, "lost")

    flaky = FlakyStub.install(alice, after=lose_first_response)
    entry = await alice.state.update("shared/count", lambda n: n + 1)
    assert (entry.value, entry.version) == (11, 2)  # applied once, not twice
    assert [p.request_id for p in flaky.puts] == [flaky.puts[0].request_id] * 2
    assert alice.state.stats.unavailable == 1 and alice.state.stats.conflicts == 0
    assert (await alice.state.get("shared/count")) == entry


async def test_update_uses_a_fresh_request_id_after_a_conflict(
    alice: AgentcoordClient, admin: AgentcoordClient
) -> None:
    await alice.state.put("shared/count", 0)

    async def interfere_once(attempt: int) -> None:
        if attempt == 1:
            await admin.state.put("shared/count", 100)  # another writer gets in between

    flaky = FlakyStub.install(alice, before=interfere_once)
    entry = await alice.state.update("shared/count", lambda n: n + 1)
    assert (entry.value, entry.version) == (101, 3)
    first, second = flaky.puts
    assert first.request_id != second.request_id
    assert (first.expected_version, second.expected_version) == (1, 2)
    assert alice.state.stats.conflicts == 1


async def test_update_retries_its_first_conflict_at_once_from_the_entry_it_carries(
    alice: AgentcoordClient, admin: AgentcoordClient
) -> None:
    await alice.state.put("shared/count", 0)

    async def interfere_once(attempt: int) -> None:
        if attempt == 1:
            await admin.state.put("shared/count", 100)

    flaky = FlakyStub.install(alice, before=interfere_once)
    # A back-off of an hour: the update finishes only if the first conflict is retried at once.
    slow = UpdatePolicy(initial_backoff=3600, max_backoff=3600, jitter=0, max_delay=7200)
    entry = await alice.state.update("shared/count", lambda n: n + 1, policy=slow)
    assert (entry.value, entry.version) == (101, 3)
    assert flaky.gets == 1  # the retry started from the conflict's entry, with no read


async def test_a_conflict_error_carries_the_current_entry(alice: AgentcoordClient) -> None:
    written = await alice.state.put("shared/cas", {"a": 1}, metadata={"m": "1"})
    with pytest.raises(ConflictError) as conflict:
        await alice.state.put("shared/cas", {"a": 2}, expected_version=9)
    assert conflict.value.current == written
    with pytest.raises(ConflictError) as missing:
        await alice.state.put("shared/none", 1, expected_version=3)
    assert missing.value.current is None and missing.value.current_version == 0


async def test_modifications_from_the_sdk(alice: AgentcoordClient) -> None:
    state = alice.state
    assert (await state.increment("shared/n")).value == 1
    assert (await state.increment("shared/n", 2.5)).value == 3.5
    assert (await state.append("shared/log", "a", {"b": 1})).value == ["a", {"b": 1}]
    assert (await state.add_to_set("shared/tags", "x", "y", "x")).value == ["x", "y"]
    assert (await state.remove_from_set("shared/tags", "x")).value == ["y"]
    merged = await state.merge("shared/doc", {"a": {"b": 1}, "c": None})
    assert merged.value == {"a": {"b": 1}}
    done = await state.transact(
        [VersionIs("shared/n", 2)],
        [Increment("shared/n", -0.5), AddToSet("shared/tags", ["z"]), MergePatch("shared/doc", 1)],
    )
    assert [e.value for e in done.entries if e] == [3, ["y", "z"], 1]
    with pytest.raises(TypeError, match="members must be a sequence"):
        AddToSet("shared/tags", "xyz")  # a lone string is not taken for its characters
    with pytest.raises(FailedPreconditionError) as refused:
        await state.increment("shared/tags")
    assert refused.value.reason == "VALUE_TYPE_MISMATCH"
    assert refused.value.metadata["field"] == "modification.increment"


async def test_concurrent_sdk_increments_lose_nothing(alice: AgentcoordClient) -> None:
    keys = [f"shared/hot/{n}" for n in range(4)]

    async def writer(index: int) -> None:
        for _ in range(10):
            await alice.state.increment(keys[index % 4])

    await asyncio.gather(*(writer(index) for index in range(32)))
    assert [(await alice.state.get(key)).value for key in keys] == [80] * 4  # type: ignore[union-attr]


async def test_update_gives_up_within_its_bounds(
    alice: AgentcoordClient, admin: AgentcoordClient
) -> None:
    await alice.state.put("shared/contended", 0)

    async def interfere(attempt: int) -> None:
        await admin.state.put("shared/contended", -attempt)

    flaky = FlakyStub.install(alice, before=interfere)
    policy = UpdatePolicy(max_attempts=3, initial_backoff=0.01, jitter=0)
    with pytest.raises(ConflictError) as conflict:
        await alice.state.update("shared/contended", lambda n: n + 1, policy=policy)
    assert len(flaky.puts) == 3 and conflict.value.current_version == 4  # 1 + 3 interferences


async def test_a_repeated_request_id_is_applied_once(alice: AgentcoordClient) -> None:
    first = await alice.state.put("shared/once", 1, request_id="req-1")
    again = await alice.state.put("shared/once", 2, request_id="req-1")
    assert again == first and (await alice.state.get("shared/once")) == first
    raw = pb.PutStateRequest(key="shared/once-raw", request_id="req-2")
    raw.json.number_value = 1
    responses = [await alice.statesync.put_state(raw) for _ in range(2)]
    assert responses[0] == responses[1] and responses[0].state.version == 1
