"""StateSyncService through real stubs against a real server, on both stores."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2

from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from agentcoord.server.app import App
from agentcoord.statesync.v1 import statesync_service_pb2 as pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as pb_grpc
from tests.helpers import bearer, details_of, error_info, eventually, field_violations
from tests.server.conftest import StartServer

Stub = pb_grpc.StateSyncServiceStub
ADMIN = "admin-secret"


def number(value: float) -> struct_pb2.Value:
    return struct_pb2.Value(number_value=value)


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


@pytest.fixture
async def app(start_server: StartServer) -> App:
    return await start_server(admin_token=ADMIN)


@pytest.fixture
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield channel


@pytest.fixture
def state(channel: grpc.aio.Channel) -> Stub:
    return Stub(channel)


async def register(channel: grpc.aio.Channel, agent_id: str, ttl: float = 10) -> str:
    stub = discovery_grpc.DiscoveryServiceStub(channel)
    response = await stub.Register(
        discovery_pb.RegisterRequest(agent_id=agent_id, name=agent_id, ttl=seconds(ttl))
    )
    return response.session_token


@pytest.fixture
async def token(channel: grpc.aio.Channel) -> str:
    return await register(channel, "alice")


async def put(
    stub: Stub, token: str, key: str, value: float, **fields: object
) -> pb.PutStateResponse:
    return await stub.PutState(
        pb.PutStateRequest(key=key, json=number(value), **fields),  # type: ignore[arg-type]
        metadata=bearer(token),
    )


async def failure(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return raised.value


async def test_put_get_and_versions(state: Stub, token: str) -> None:
    first = await put(state, token, "shared/plan", 1, metadata={"step": "a"})
    assert first.state.version == 1 and first.state.create_revision == first.revision
    second = await put(state, token, "shared/plan", 2)
    assert second.state.version == 2
    assert second.state.create_revision == first.revision
    assert second.state.mod_revision == second.revision > first.revision
    got = await state.GetState(pb.GetStateRequest(key="shared/plan"))
    assert got.state.json.number_value == 2 and got.state.agent_id == "alice"
    assert got.revision >= second.revision
    binary = await state.PutState(
        pb.PutStateRequest(key="agents/alice/blob", binary=b"\x00\xff"), metadata=bearer(token)
    )
    assert binary.state.binary == b"\x00\xff"
    missing = await failure(state.GetState(pb.GetStateRequest(key="shared/none")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND


async def test_compare_and_set(state: Stub, token: str) -> None:
    created = await put(state, token, "shared/counter", 1, expected_version=0)
    exists = await failure(put(state, token, "shared/counter", 5, expected_version=0))
    assert exists.code() == grpc.StatusCode.ABORTED
    assert error_info(exists).metadata["current_version"] == "1"
    stale = await failure(put(state, token, "shared/counter", 5, expected_version=7))
    assert stale.code() == grpc.StatusCode.ABORTED
    assert error_info(stale).reason == "VERSION_MISMATCH"
    updated = await put(state, token, "shared/counter", 2, expected_version=created.state.version)
    assert updated.state.version == 2
    got = await state.GetState(pb.GetStateRequest(key="shared/counter"))
    assert got.state.json.number_value == 2


async def test_a_single_key_conflict_speaks_of_the_expected_version(
    state: Stub, token: str
) -> None:
    await put(state, token, "shared/once", 1)
    taken = await failure(put(state, token, "shared/once", 2, expected_version=0))
    assert taken.code() == grpc.StatusCode.ABORTED
    assert taken.details() == (
        "key 'shared/once': expected version 0 (must not exist), current version 1"
    )
    info = error_info(taken)
    assert info.reason == "VERSION_MISMATCH"
    assert dict(info.metadata) == {
        "key": "shared/once",
        "current_version": "1",
        "field": "expected_version",
    }  # no failed_compare: a single write has no list of compares


async def test_delete(state: Stub, token: str) -> None:
    await put(state, token, "shared/tmp", 1)
    stale = await failure(
        state.DeleteState(
            pb.DeleteStateRequest(key="shared/tmp", expected_version=3), metadata=bearer(token)
        )
    )
    assert stale.code() == grpc.StatusCode.ABORTED
    assert stale.details() == "key 'shared/tmp': expected version 3, current version 1"
    deleted = await state.DeleteState(
        pb.DeleteStateRequest(key="shared/tmp", expected_version=1), metadata=bearer(token)
    )
    assert deleted.previous.json.number_value == 1
    gone = await failure(
        state.DeleteState(pb.DeleteStateRequest(key="shared/tmp"), metadata=bearer(token))
    )
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    allowed = await state.DeleteState(
        pb.DeleteStateRequest(key="shared/tmp", allow_missing=True), metadata=bearer(token)
    )
    assert not allowed.HasField("previous")
    recreated = await put(state, token, "shared/tmp", 9, expected_version=0)
    assert recreated.state.version == 1


def put_op(key: str, value: float) -> pb.Operation:
    return pb.Operation(put=pb.PutOperation(key=key, json=number(value)))


async def test_transact_is_all_or_none(state: Stub, token: str) -> None:
    await put(state, token, "shared/a", 1)
    before = await state.GetState(pb.GetStateRequest(key="shared/a"))
    refused = await failure(
        state.Transact(
            pb.TransactRequest(
                compares=[
                    pb.Compare(key="shared/a", version=1),
                    pb.Compare(key="shared/b", exists=True),
                ],
                operations=[put_op("shared/a", 10), put_op("shared/c", 10)],
            ),
            metadata=bearer(token),
        )
    )
    assert refused.code() == grpc.StatusCode.ABORTED
    assert error_info(refused).metadata["failed_compare"] == "1"
    after = await state.GetState(pb.GetStateRequest(key="shared/a"))
    assert after.state == before.state
    assert (await failure(state.GetState(pb.GetStateRequest(key="shared/c")))).code() == (
        grpc.StatusCode.NOT_FOUND
    )
    applied = await state.Transact(
        pb.TransactRequest(
            compares=[pb.Compare(key="shared/a", json=number(1))],
            operations=[
                put_op("shared/a", 2),
                put_op("shared/b", 3),
                pb.Operation(delete=pb.DeleteOperation(key="shared/zzz")),
            ],
        ),
        metadata=bearer(token),
    )
    assert [r.state.key for r in applied.results[:2]] == ["shared/a", "shared/b"]
    revisions = [r.state.mod_revision for r in applied.results[:2]]
    assert revisions[1] == revisions[0] + 1 and applied.revision == revisions[1]


async def test_concurrent_conflicting_transactions_never_half_apply(
    state: Stub, token: str
) -> None:
    await put(state, token, "shared/x", 0)
    await put(state, token, "shared/y", 0)

    async def move(amount: int) -> bool:
        current = await state.GetState(pb.GetStateRequest(key="shared/x"))
        value = current.state.json.number_value
        try:
            await state.Transact(
                pb.TransactRequest(
                    compares=[pb.Compare(key="shared/x", version=current.state.version)],
                    operations=[
                        put_op("shared/x", value + amount),
                        put_op("shared/y", value + amount),
                    ],
                ),
                metadata=bearer(token),
            )
            return True
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.ABORTED
            return False

    outcomes = await asyncio.gather(*(move(1) for _ in range(40)))
    x = await state.GetState(pb.GetStateRequest(key="shared/x"))
    y = await state.GetState(pb.GetStateRequest(key="shared/y"))
    assert x.state.json.number_value == y.state.json.number_value == sum(outcomes)
    assert x.state.version == sum(outcomes) + 1


async def test_no_lost_updates_with_retrying_writers(state: Stub, token: str) -> None:
    await put(state, token, "shared/hits", 0)

    async def increment() -> int:
        for attempt in range(200):
            current = await state.GetState(pb.GetStateRequest(key="shared/hits"))
            try:
                await put(
                    state,
                    token,
                    "shared/hits",
                    current.state.json.number_value + 1,
                    expected_version=current.state.version,
                )
                return attempt
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.ABORTED
        raise AssertionError("too many conflicts")

    retries = await asyncio.gather(*(increment() for _ in range(40)))
    final = await state.GetState(pb.GetStateRequest(key="shared/hits"))
    assert final.state.json.number_value == 40
    assert sum(retries) > 0  # the writers really did collide


async def test_request_id_makes_a_retried_write_idempotent(state: Stub, token: str) -> None:
    first = await put(state, token, "shared/once", 1, request_id="req-1")
    again = await put(state, token, "shared/once", 1, request_id="req-1")
    assert again == first
    got = await state.GetState(pb.GetStateRequest(key="shared/once"))
    assert got.state.version == 1


async def test_permissions(state: Stub, channel: grpc.aio.Channel, token: str) -> None:
    await register(channel, "bob")
    await put(state, token, "agents/alice/progress", 1)
    denied = await failure(put(state, token, "agents/bob/progress", 1))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    outside = await failure(put(state, token, "config/global", 1))
    assert outside.code() == grpc.StatusCode.PERMISSION_DENIED
    anonymous = await failure(state.PutState(pb.PutStateRequest(key="shared/x", json=number(1))))
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED
    mismatch = await failure(put(state, token, "shared/x", 1, agent_id="bob"))
    assert mismatch.code() == grpc.StatusCode.PERMISSION_DENIED
    by_admin = await put(state, ADMIN, "agents/bob/progress", 5)
    assert by_admin.state.agent_id == ""
    await put(state, ADMIN, "config/global", 1)


async def test_fencing_is_refused_without_a_lease(state: Stub, token: str) -> None:
    refused = await failure(
        put(state, token, "shared/x", 1, fencing=pb.Fencing(subtask_id="s1", fencing_token=3))
    )
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(refused).reason == "LEASE_NOT_HELD"
    missing = await failure(state.GetState(pb.GetStateRequest(key="shared/x")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND


async def test_ttl_and_session_bound_keys_vanish(state: Stub, channel: grpc.aio.Channel) -> None:
    short = await register(channel, "short", ttl=0.5)
    await put(state, short, "agents/short/lock", 1, bind_to_session=True)
    await put(state, short, "shared/kept", 1)
    await put(state, short, "shared/brief", 1, ttl=seconds(1))

    async def gone(key: str) -> bool:
        try:
            await state.GetState(pb.GetStateRequest(key=key))
        except grpc.aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.NOT_FOUND
        return False

    await eventually(lambda: gone("shared/brief"), timeout=5)
    await eventually(lambda: gone("agents/short/lock"), timeout=5)  # the session expired
    assert not await gone("shared/kept")
    events = await state.ListEvents(pb.ListEventsRequest(kind="state.expire"))
    assert {event.subject for event in events.events} == {"shared/brief", "agents/short/lock"}


async def test_list_states(state: Stub, channel: grpc.aio.Channel, token: str) -> None:
    gone = await register(channel, "gone")
    for index in range(5):
        await put(state, token, f"agents/alice/item-{index}", index)
    await put(state, gone, "agents/gone/item", 1)
    await discovery_grpc.DiscoveryServiceStub(channel).Deregister(
        discovery_pb.DeregisterRequest(), metadata=bearer(gone)
    )
    first = await state.ListStates(pb.ListStatesRequest(prefix="agents/alice/", page_size=3))
    assert [s.key for s in first.states] == [f"agents/alice/item-{i}" for i in range(3)]
    second = await state.ListStates(
        pb.ListStatesRequest(prefix="agents/alice/", page_size=3, page_token=first.next_page_token)
    )
    assert [s.key for s in second.states] == ["agents/alice/item-3", "agents/alice/item-4"]
    assert not second.next_page_token and second.revision == first.revision
    all_agents = await state.ListStates(pb.ListStatesRequest(prefix="agents/", keys_only=True))
    assert len(all_agents.states) == 6 and not all_agents.states[0].HasField("json")
    live = await state.ListStates(pb.ListStatesRequest(prefix="agents/", live_agents_only=True))
    assert "agents/gone/item" not in [s.key for s in live.states] and len(live.states) == 5
    # A page token is served only while nothing under the prefix changed.
    await put(state, token, "agents/alice/item-9", 9)
    changed = await failure(
        state.ListStates(
            pb.ListStatesRequest(
                prefix="agents/alice/", page_size=3, page_token=first.next_page_token
            )
        )
    )
    assert changed.code() == grpc.StatusCode.OUT_OF_RANGE


async def collect(call: AsyncIterator[pb.WatchStatesResponse], count: int) -> list[pb.StateChange]:
    changes: list[pb.StateChange] = []
    async for response in call:
        changes.extend(response.changes)
        if len(changes) >= count:
            break
    return changes


async def test_watch_states_in_order_and_resume(state: Stub, token: str) -> None:
    watch = state.WatchStates(pb.WatchStatesRequest(prefix="shared/", include_previous=True))
    registered = await anext(aiter(watch))
    assert not registered.changes
    await put(state, token, "shared/w", 1)
    await put(state, token, "agents/alice/ignored", 1)
    await put(state, token, "shared/w", 2)
    await state.DeleteState(pb.DeleteStateRequest(key="shared/w"), metadata=bearer(token))
    changes = await asyncio.wait_for(collect(watch, 3), 5)
    watch.cancel()
    assert [c.type for c in changes] == [
        pb.StateChange.TYPE_PUT,
        pb.StateChange.TYPE_PUT,
        pb.StateChange.TYPE_DELETE,
    ]
    assert changes[1].previous.json.number_value == 1
    assert [c.revision for c in changes] == sorted({c.revision for c in changes})
    # Resume after the first change: the rest again, exactly once.
    resumed = state.WatchStates(
        pb.WatchStatesRequest(prefix="shared/", start_revision=changes[0].revision)
    )
    again = await asyncio.wait_for(collect(resumed, 2), 5)
    resumed.cancel()
    assert [c.revision for c in again] == [c.revision for c in changes[1:]]


async def test_slow_watcher_misses_nothing(state: Stub, token: str) -> None:
    watch = state.WatchStates(pb.WatchStatesRequest(prefix="shared/slow/"))
    await anext(aiter(watch))
    count = 1500  # more than a watcher's buffer of commit announcements
    for start in range(0, count, 100):
        await asyncio.gather(
            *(put(state, token, f"shared/slow/{i % 7}", i) for i in range(start, start + 100))
        )
    changes = await asyncio.wait_for(collect(watch, count), 30)
    watch.cancel()
    revisions = [c.revision for c in changes]
    assert len(revisions) == count and revisions == sorted(set(revisions))


async def test_events_log_who_did_what(state: Stub, channel: grpc.aio.Channel, token: str) -> None:
    watch = state.WatchEvents(pb.WatchEventsRequest(agent_id="alice"))
    await anext(aiter(watch))
    await put(state, token, "shared/e", 1)
    await register(channel, "carol")
    events = await state.ListEvents(pb.ListEventsRequest(agent_id="alice"))
    assert [(e.kind, e.subject) for e in events.events] == [
        ("agent.joined", "alice"),
        ("state.put", "shared/e"),
    ]
    assert events.events[1].service == pb.SERVICE_STATESYNC
    discovery_only = await state.ListEvents(
        pb.ListEventsRequest(service=pb.SERVICE_DISCOVERY, kind="agent.")
    )
    assert [e.subject for e in discovery_only.events] == ["alice", "carol"]
    paged = await state.ListEvents(pb.ListEventsRequest(page_size=1))
    rest = await state.ListEvents(
        pb.ListEventsRequest(page_size=10, page_token=paged.next_page_token)
    )
    assert paged.events[0].revision < rest.events[0].revision
    streamed = []
    async for response in watch:
        streamed.extend(response.events)
        if streamed:
            break
    watch.cancel()
    assert [(e.kind, e.subject) for e in streamed] == [("state.put", "shared/e")]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.PutStateRequest(key="", json=number(1)), "key"),
        (pb.PutStateRequest(key="/abs", json=number(1)), "key"),
        (pb.PutStateRequest(key="shared//x", json=number(1)), "key"),
        (pb.PutStateRequest(key="shared/../x", json=number(1)), "key"),
        (pb.PutStateRequest(key="shared/sp ace", json=number(1)), "key"),
        (pb.PutStateRequest(key="shared/" + "x" * 600, json=number(1)), "key"),
        (pb.PutStateRequest(key="shared/x"), "json"),  # the oneof `value` has no path
        (pb.PutStateRequest(key="shared/x", json=struct_pb2.Value()), "json"),
        (pb.PutStateRequest(key="shared/x", binary=b"x" * (1024 * 1024 + 1)), "binary"),
        (
            pb.PutStateRequest(key="shared/x", json=number(1), expected_version=-1),
            "expected_version",
        ),
        (
            pb.PutStateRequest(
                key="shared/x", json=number(1), ttl=duration_pb2.Duration(seconds=-1)
            ),
            "ttl",
        ),
        (pb.PutStateRequest(key="shared/x", json=number(1), metadata={"bad key": "v"}), "metadata"),
        (pb.PutStateRequest(key="shared/x", json=number(1), ttl=seconds(0.5)), "ttl"),
        (pb.PutStateRequest(key="shared/x", json=number(1), ttl=seconds(31 * 86400)), "ttl"),
        (
            pb.PutStateRequest(
                key="shared/x", json=number(1), ttl=seconds(5), bind_to_session=True
            ),
            "bind_to_session",
        ),
        (pb.PutStateRequest(key="shared/x", json=number(1), request_id="r" * 200), "request_id"),
        (
            pb.PutStateRequest(
                key="shared/x", json=number(1), fencing=pb.Fencing(subtask_id="s", fencing_token=0)
            ),
            "fencing.fencing_token",
        ),
    ],
)
async def test_put_validation_names_the_field(
    state: Stub, token: str, request_: pb.PutStateRequest, field: str
) -> None:
    invalid = await failure(state.PutState(request_, metadata=bearer(token)))
    assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(invalid) == [field]


async def test_transact_validation(state: Stub, token: str) -> None:
    cases = [
        (pb.TransactRequest(), "operations"),
        (pb.TransactRequest(operations=[pb.Operation()]), "operations[0]"),
        (
            pb.TransactRequest(operations=[put_op("shared/a", 1), put_op("shared/a", 2)]),
            "operations[1].put.key",
        ),
        (pb.TransactRequest(operations=[put_op("shared/a", 1)] * 129), "operations"),
        (
            pb.TransactRequest(
                compares=[pb.Compare(key="shared/a")], operations=[put_op("shared/a", 1)]
            ),
            "compares[0]",
        ),
    ]
    for request, field in cases:
        invalid = await failure(state.Transact(request, metadata=bearer(token)))
        assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field_violations(invalid) == [field]


async def test_read_validation(state: Stub) -> None:
    for call, field in [
        (state.ListStates(pb.ListStatesRequest(prefix="bad//")), "prefix"),
        (state.ListStates(pb.ListStatesRequest(page_token="junk")), "page_token"),
        (state.ListEvents(pb.ListEventsRequest(service=99)), "service"),
        (state.ListEvents(pb.ListEventsRequest(agent_id="no spaces")), "agent_id"),
        (state.ListEvents(pb.ListEventsRequest(start_revision=-1)), "start_revision"),
        (state.GetState(pb.GetStateRequest(key="..")), "key"),
    ]:
        invalid = await failure(call)
        assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field_violations(invalid) == [field]


async def test_large_values_are_split_across_messages(state: Stub, token: str) -> None:
    big = b"x" * (1024 * 1024 - 100)
    first = None
    for index in range(6):  # 6 MiB in all: more than one 4 MiB message
        response = await state.PutState(
            pb.PutStateRequest(key=f"shared/big/{index}", binary=big), metadata=bearer(token)
        )
        first = first or response.revision
    assert first is not None
    keys: list[str] = []
    token_ = ""
    while True:
        page = await state.ListStates(pb.ListStatesRequest(prefix="shared/big/", page_token=token_))
        keys.extend(s.key for s in page.states)
        token_ = page.next_page_token
        if not token_:
            break
    assert keys == [f"shared/big/{i}" for i in range(6)]
    watch = state.WatchStates(pb.WatchStatesRequest(prefix="shared/big/", start_revision=first - 1))
    changes = await asyncio.wait_for(collect(watch, 6), 30)
    watch.cancel()
    assert [c.key for c in changes] == keys


# ModifyState, Transact's modify, and the current entry a conflict carries


def items(*values: float | str) -> struct_pb2.ListValue:
    listed = struct_pb2.ListValue()
    listed.extend(values)
    return listed


def modify(key: str, **modification: object) -> pb.ModifyStateRequest:
    return pb.ModifyStateRequest(
        key=key,
        modification=pb.Modification(**modification),  # type: ignore[arg-type]
    )


async def test_modify_state_increments_appends_and_merges(state: Stub, token: str) -> None:
    auth = bearer(token)
    first = await state.ModifyState(modify("shared/n", increment=2), metadata=auth)
    second = await state.ModifyState(modify("shared/n", increment=3), metadata=auth)
    assert (first.state.version, first.state.json.number_value) == (1, 2)
    assert (second.state.version, second.state.json.number_value) == (2, 5)
    assert second.revision == second.state.mod_revision

    await state.ModifyState(modify("shared/l", append=items("a", "b")), metadata=auth)
    await state.ModifyState(modify("shared/l", add_to_set=items("b", "c")), metadata=auth)
    listed = await state.ModifyState(modify("shared/l", remove_from_set=items("a")), metadata=auth)
    assert [v.string_value for v in listed.state.json.list_value.values] == ["b", "c"]

    patch = struct_pb2.Value()
    patch.struct_value.update({"done": True, "left": None})
    await put(state, token, "shared/doc", 1)
    merged = await state.ModifyState(modify("shared/doc", merge_patch=patch), metadata=auth)
    assert dict(merged.state.json.struct_value) == {"done": True}


async def test_type_mismatch_is_failed_precondition_naming_the_field(
    state: Stub, token: str
) -> None:
    await state.PutState(
        pb.PutStateRequest(key="shared/s", json=struct_pb2.Value(string_value="x")),
        metadata=bearer(token),
    )
    refused = await failure(
        state.ModifyState(modify("shared/s", increment=1), metadata=bearer(token))
    )
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (
        refused.details() == "modification.increment: key 'shared/s' holds a string, not a number"
    )
    info = error_info(refused)
    assert info.reason == "VALUE_TYPE_MISMATCH"
    assert info.metadata["field"] == "modification.increment"

    in_transaction = await failure(
        state.Transact(
            pb.TransactRequest(
                operations=[
                    pb.Operation(
                        modify=pb.ModifyOperation(
                            key="shared/s", modification=pb.Modification(append=items(1))
                        )
                    )
                ]
            ),
            metadata=bearer(token),
        )
    )
    assert in_transaction.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (
        error_info(in_transaction).metadata["field"] == "operations[0].modify.modification.append"
    )


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ModifyStateRequest(key="shared/x"), "modification"),
        (modify("shared/x", increment=float("nan")), "modification.increment"),
        (modify("shared/x", merge_patch=struct_pb2.Value()), "modification.merge_patch"),
        (
            pb.ModifyStateRequest(
                key="shared/x",
                modification=pb.Modification(
                    append=struct_pb2.ListValue(values=[number(float("inf"))])
                ),
            ),
            "modification.append",
        ),
        (modify("bad//key", increment=1), "key"),
        (
            pb.ModifyStateRequest(
                key="shared/x",
                modification=pb.Modification(increment=1),
                fencing=pb.Fencing(subtask_id="s", fencing_token=0),
            ),
            "fencing.fencing_token",
        ),
    ],
)
async def test_modify_validation_names_the_field(
    state: Stub, token: str, request_: pb.ModifyStateRequest, field: str
) -> None:
    invalid = await failure(state.ModifyState(request_, metadata=bearer(token)))
    assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(invalid) == [field]


async def test_modify_honours_permissions_fencing_and_request_ids(
    state: Stub, channel: grpc.aio.Channel, token: str
) -> None:
    denied = await failure(
        state.ModifyState(modify("agents/bob/n", increment=1), metadata=bearer(token))
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    fenced = modify("shared/n", increment=1)
    fenced.fencing.CopyFrom(pb.Fencing(subtask_id="nope", fencing_token=3))
    stale = await failure(state.ModifyState(fenced, metadata=bearer(token)))
    assert stale.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(stale).reason == "LEASE_NOT_HELD"

    once = modify("shared/n", increment=1)
    once.request_id = "incr-1"
    first = await state.ModifyState(once, metadata=bearer(token))
    again = await state.ModifyState(once, metadata=bearer(token))
    assert again == first and first.state.json.number_value == 1  # applied once


async def test_concurrent_modify_state_loses_nothing(state: Stub, token: str) -> None:
    keys = [f"shared/hot/{n}" for n in range(4)]

    async def writer(number_: int) -> None:
        for _ in range(10):
            request = modify(keys[number_ % 4], increment=1)
            await state.ModifyState(request, metadata=bearer(token))

    await asyncio.gather(*(writer(n) for n in range(32)))
    for key in keys:
        got = await state.GetState(pb.GetStateRequest(key=key))
        assert (got.state.json.number_value, got.state.version) == (80, 80)


async def test_a_conflict_carries_the_current_entry(state: Stub, token: str) -> None:
    written = await put(state, token, "shared/c", 1, metadata={"a": "b"})
    stale = await failure(put(state, token, "shared/c", 2, expected_version=5))
    assert details_of(stale, pb.State) == [written.state]
    absent = await failure(put(state, token, "shared/none", 2, expected_version=1))
    assert details_of(absent, pb.State) == []
