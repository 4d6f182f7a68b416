"""Hostile and clumsy input on real servers, both stores: INVALID_ARGUMENT naming the field.

Each class of bad input of issue 9 ("No input ends in INTERNAL or UNKNOWN") has a test that
asserts the code and the BadRequest field path, and every test checks that the server logged
no traceback. The last test builds bad variants of every field of every request from the
descriptors and checks that each path the servers report names a field of that request.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from agentcoord.distribution.v1 import distribution_service_pb2 as distribution_pb
from agentcoord.distribution.v1 import distribution_service_pb2_grpc as distribution_grpc
from agentcoord.server.app import App
from agentcoord.statesync.v1 import statesync_service_pb2 as statesync_pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as statesync_grpc
from tests.helpers import bearer, field_violations, resolves
from tests.server.conftest import StartServer

ADMIN = "admin-secret"
AGENT = "prober"
NAN, INF = math.nan, math.inf


@pytest.fixture(autouse=True)
def no_traceback_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail the test if anything logged a traceback (grpc's own logger included)."""
    caplog.set_level(logging.WARNING)
    yield
    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


@pytest.fixture
async def server(start_server: StartServer) -> App:
    """The server of every test here (conftest's ``channel`` connects to it)."""
    return await start_server(admin_token=ADMIN, max_ttl=600.0)


@pytest.fixture
def agents(channel: grpc.aio.Channel) -> discovery_grpc.DiscoveryServiceStub:
    return discovery_grpc.DiscoveryServiceStub(channel)


@pytest.fixture
def tasks(channel: grpc.aio.Channel) -> distribution_grpc.DistributionServiceStub:
    return distribution_grpc.DistributionServiceStub(channel)


@pytest.fixture
def state(channel: grpc.aio.Channel) -> statesync_grpc.StateSyncServiceStub:
    return statesync_grpc.StateSyncServiceStub(channel)


@pytest.fixture
async def token(channel: grpc.aio.Channel) -> str:
    """The session token of the agent ``prober``, registered for 10 minutes."""
    response = await discovery_grpc.DiscoveryServiceStub(channel).Register(
        discovery_pb.RegisterRequest(
            agent_id=AGENT, name="Prober", ttl=duration_pb2.Duration(seconds=600)
        )
    )
    return response.session_token


ADMIN_METADATA = bearer(ADMIN)


async def refused(call: Any) -> grpc.aio.AioRpcError:
    """Await ``call`` and return its error."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


def assert_names(error: grpc.aio.AioRpcError, field: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert field_violations(error) == [field], error.details()


def number(value: float) -> struct_pb2.Value:
    return struct_pb2.Value(number_value=value)


def nested(depth: int) -> struct_pb2.Value:
    """A JSON value of ``depth`` nested arrays around a string."""
    value = struct_pb2.Value(string_value="deep")
    for _ in range(depth):
        outer = struct_pb2.Value()
        outer.list_value.values.add().CopyFrom(value)
        value = outer
    return value


def task(**fields: Any) -> distribution_pb.TaskSpec:
    return distribution_pb.TaskSpec(
        **{"title": "t", "split_policy": distribution_pb.SPLIT_POLICY_NONE, **fields}
    )


# --- NaN and Infinity in JSON values ------------------------------------------------------------


async def test_non_finite_numbers_in_json_values_name_the_field(
    token: str,
    tasks: distribution_grpc.DistributionServiceStub,
    state: statesync_grpc.StateSyncServiceStub,
) -> None:
    agent = bearer(token)
    in_list = struct_pb2.Value()
    in_list.list_value.values.extend([number(1), number(-INF)])
    in_object = struct_pb2.Value()
    in_object.struct_value.fields["a b"].CopyFrom(number(NAN))
    put = statesync_pb.PutOperation(key="shared/b", json=in_list)
    cases: list[tuple[Any, str, str]] = [
        (state.PutState(statesync_pb.PutStateRequest(key="shared/a", json=number(NAN)),
                        metadata=agent), "json", "NaN at $;"),
        (state.Transact(statesync_pb.TransactRequest(
            compares=[statesync_pb.Compare(key="shared/a", json=in_object)],
            operations=[statesync_pb.Operation(put=put)]), metadata=agent),
         "compares[0].json", 'NaN at $["a b"]'),
        (state.Transact(statesync_pb.TransactRequest(operations=[
            statesync_pb.Operation(delete=statesync_pb.DeleteOperation(key="shared/c")),
            statesync_pb.Operation(put=put)]), metadata=agent),
         "operations[1].put.json", "-Infinity at $[1]"),
        (tasks.SubmitTask(distribution_pb.SubmitTaskRequest(task=task(input=number(INF))),
                          metadata=agent), "task.input", "Infinity at $;"),
        (tasks.AnalyzeTask(distribution_pb.AnalyzeTaskRequest(task=distribution_pb.TaskSpec(
            title="t", split_policy=distribution_pb.SPLIT_POLICY_EXPLICIT,
            subtasks=[distribution_pb.SubtaskSpec(local_id="a", title="A"),
                      distribution_pb.SubtaskSpec(local_id="b", title="B", input=in_list)]))),
         "task.subtasks[1].input", "-Infinity at $[1]"),
        (tasks.CompleteSubtask(distribution_pb.CompleteSubtaskRequest(
            subtask_id="s", fencing_token=1, result=in_object), metadata=agent),
         "result", 'NaN at $["a b"]'),
        (tasks.FailSubtask(distribution_pb.FailSubtaskRequest(
            subtask_id="s", fencing_token=1, error_message="boom",
            failure_class=distribution_pb.FAILURE_CLASS_TASK_ERROR, details=number(NAN)),
            metadata=agent), "details", "NaN at $;"),
    ]  # fmt: skip
    for call, field, where in cases:
        error = await refused(call)
        assert_names(error, field)
        assert where in error.details() + ";", error.details()


async def test_json_nested_deeper_than_the_limit_names_the_field(
    token: str, state: statesync_grpc.StateSyncServiceStub
) -> None:
    await state.PutState(
        statesync_pb.PutStateRequest(key="shared/deep", json=nested(30)), metadata=bearer(token)
    )
    read = await state.GetState(statesync_pb.GetStateRequest(key="shared/deep"))
    assert read.state.json == nested(30)
    error = await refused(
        state.PutState(
            statesync_pb.PutStateRequest(key="shared/deep", json=nested(31)),
            metadata=bearer(token),
        )
    )
    assert_names(error, "json")
    assert "deeper than 30 levels" in error.details()


# --- page tokens --------------------------------------------------------------------------------


def token_payload(token: str) -> dict[str, Any]:
    """The JSON inside a page token (the format docs/errors.md documents)."""
    payload: dict[str, Any] = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    return payload


def forge(payload: dict[str, Any], **changes: Any) -> str:
    raw = json.dumps({**payload, **changes}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


GARBLED = [
    "not a token!",
    "////",
    base64.urlsafe_b64encode(b"\xff\xfe not json").decode(),
    base64.urlsafe_b64encode(b"[" * 3000).decode(),
    base64.urlsafe_b64encode(json.dumps({"after": "x", "query": {}}).encode()).decode(),
    "²",
    "A" * 10_000,
]
"""Tokens no server issued, for every listing."""


async def test_forged_and_garbled_page_tokens_name_page_token(
    token: str,
    agents: discovery_grpc.DiscoveryServiceStub,
    tasks: distribution_grpc.DistributionServiceStub,
    state: statesync_grpc.StateSyncServiceStub,
) -> None:
    for name in ("other-1", "other-2"):
        await agents.Register(discovery_pb.RegisterRequest(agent_id=name, name=name))
    for key in ("shared/a", "shared/b", "shared/c"):
        await state.PutState(
            statesync_pb.PutStateRequest(key=key, json=number(1)), metadata=bearer(token)
        )
    for title in ("one", "two"):
        await tasks.SubmitTask(
            distribution_pb.SubmitTaskRequest(task=task(title=title)), metadata=bearer(token)
        )
    split = await tasks.SubmitTask(
        distribution_pb.SubmitTaskRequest(
            task=task(
                split_policy=distribution_pb.SPLIT_POLICY_EXPLICIT,
                subtasks=[distribution_pb.SubtaskSpec(local_id=n, title=n) for n in "abc"],
            )
        ),
        metadata=bearer(token),
    )
    listings: dict[str, tuple[Callable[[str], Any], list[list[Any]]]] = {
        "ListAgents": (
            lambda t: agents.ListAgents(discovery_pb.ListAgentsRequest(page_size=1, page_token=t)),
            [["bad id!"], [7], ["a", "b"]],
        ),
        "ListStates": (
            lambda t: state.ListStates(
                statesync_pb.ListStatesRequest(prefix="shared/", page_size=1, page_token=t)
            ),
            [
                ["shared/a", "²"],
                ["shared/a", "1"],
                ["shared/a", -1],
                ["../x", 1],
                ["shared/a", True],
                ["shared/\u0000", 1],
            ],
        ),
        "ListEvents": (
            lambda t: state.ListEvents(statesync_pb.ListEventsRequest(page_size=1, page_token=t)),
            [["abc"], [1 << 63], [-1], [1.5], ["7"]],
        ),
        "ListTasks": (
            lambda t: tasks.ListTasks(distribution_pb.ListTasksRequest(page_size=1, page_token=t)),
            [
                ["yesterday", "t"],
                ["2024-01-01T00:00:00", "t"],
                [17, "t"],
                ["2024-01-01T00:00:00+00:00", ""],
                ["2024-01-01T00:00:00+00:00", "\u0000"],
            ],
        ),
        "ListSubtasks": (
            lambda t: tasks.ListSubtasks(
                distribution_pb.ListSubtasksRequest(
                    task_id=split.task.task_id, page_size=1, page_token=t
                )
            ),
            # Positions past what a sub-task's place in its task can be (an int32 column in
            # PostgreSQL): once INTERNAL there.
            [[(1 << 63) - 1], [1 << 31], [0], [-1], ["1"]],
        ),
    }
    for name, (list_page, positions) in listings.items():
        first = await list_page("")
        issued = first.next_page_token
        assert issued, name
        second = await list_page(issued)  # a real token goes on
        assert second.next_page_token != issued, name
        payload = token_payload(issued)
        assert payload["v"] == 1 and payload["l"] == name, payload
        forged = [forge(payload, p=position) for position in positions]
        forged += [forge(payload, v=2), forge(payload, v=True), forge(payload, v=1.0)]
        forged += [forge(payload, l="ListOther"), forge(payload, q={})]
        for bad in GARBLED + forged:
            error = await refused(list_page(bad))
            assert_names(error, "page_token")


# --- Timestamps and Durations -------------------------------------------------------------------


FAR_FUTURE = timestamp_pb2.Timestamp(seconds=253_402_300_800)
"""10000-01-01T00:00:00Z: one second past the last valid Timestamp."""


async def test_out_of_range_timestamps_and_durations_name_the_field(
    token: str,
    agents: discovery_grpc.DiscoveryServiceStub,
    tasks: distribution_grpc.DistributionServiceStub,
    state: statesync_grpc.StateSyncServiceStub,
) -> None:
    agent = bearer(token)
    too_long = duration_pb2.Duration(seconds=315_576_000_001)
    mixed_signs = duration_pb2.Duration(seconds=1, nanos=-5)
    put_op = statesync_pb.PutOperation(key="shared/a", json=number(1), ttl=too_long)
    watch_events = state.WatchEvents(statesync_pb.WatchEventsRequest(progress_interval=mixed_signs))
    watch_states = state.WatchStates(
        statesync_pb.WatchStatesRequest(progress_interval=duration_pb2.Duration(seconds=-1))
    )
    watch_task = tasks.WatchTask(
        distribution_pb.WatchTaskRequest(task_id="t", progress_interval=too_long)
    )
    cases: list[tuple[Any, str]] = [
        (state.ListEvents(statesync_pb.ListEventsRequest(start_time=FAR_FUTURE)), "start_time"),
        (state.ListEvents(statesync_pb.ListEventsRequest(
            end_time=timestamp_pb2.Timestamp(seconds=1, nanos=-1))), "end_time"),
        (state.ListEvents(statesync_pb.ListEventsRequest(
            start_time=timestamp_pb2.Timestamp(seconds=-62_135_596_801))), "start_time"),
        (agents.Register(discovery_pb.RegisterRequest(name="n", ttl=too_long)), "ttl"),
        (agents.Register(discovery_pb.RegisterRequest(name="n", ttl=mixed_signs)), "ttl"),
        (state.PutState(statesync_pb.PutStateRequest(
            key="shared/a", json=number(1), ttl=too_long), metadata=agent), "ttl"),
        (state.Transact(statesync_pb.TransactRequest(
            operations=[statesync_pb.Operation(put=put_op)]), metadata=agent),
         "operations[0].put.ttl"),
        (tasks.SubmitTask(distribution_pb.SubmitTaskRequest(task=task(lease_ttl=too_long))),
         "task.lease_ttl"),
        (tasks.ClaimSubtask(distribution_pb.ClaimSubtaskRequest(wait=mixed_signs),
                            metadata=agent), "wait"),
        (watch_events.read(), "progress_interval"),
        (watch_states.read(), "progress_interval"),
        (watch_task.read(), "progress_interval"),
    ]  # fmt: skip
    for call, field in cases:
        assert_names(await refused(call), field)


# --- bytes that do not decode -------------------------------------------------------------------


DISCOVERY = "/agentcoord.discovery.v1.DiscoveryService/"
DISTRIBUTION = "/agentcoord.distribution.v1.DistributionService/"
STATESYNC = "/agentcoord.statesync.v1.StateSyncService/"


def bad_utf8(message: Message, marker: str) -> bytes:
    """``message``'s bytes with ``marker`` (a unique ASCII string) turned into invalid UTF-8."""
    raw = message.SerializeToString()
    assert raw.count(marker.encode()) == 1
    return raw.replace(marker.encode(), b"\xff" * len(marker))


def length_delimited(number: int, data: bytes) -> bytes:
    """One length-delimited field on the wire (``data`` shorter than 2 MiB)."""
    size, encoded = len(data), bytearray()
    while True:
        encoded.append((size & 0x7F) | (0x80 if size > 0x7F else 0))
        size >>= 7
        if not size:
            break
    return bytes([number << 3 | 2]) + bytes(encoded) + data


def wrap(outer: type[Message], name: str, inner: Message, **deep: Message) -> bytes:
    """Bytes of ``outer`` whose field ``name`` is ``inner`` plus the fields ``deep``.

    Built on the wire: protobuf itself will not copy a value nested past its limit.
    """
    extra = b"".join(
        length_delimited(inner.DESCRIPTOR.fields_by_name[field].number, value.SerializeToString())
        for field, value in deep.items()
    )
    number = outer.DESCRIPTOR.fields_by_name[name].number
    return length_delimited(number, inner.SerializeToString() + extra)


async def test_undecodable_unary_requests_name_the_field(channel: grpc.aio.Channel) -> None:
    skills = [discovery_pb.Skill(id="s", name="S", tags=["ok", "XX"])]
    register = discovery_pb.RegisterRequest(name="n", skills=skills)
    put = statesync_pb.PutStateRequest(key="shared/k", json=struct_pb2.Value(string_value="XX"))
    submit = wrap(distribution_pb.SubmitTaskRequest, "task", task(), input=nested(50))
    labelled = discovery_pb.RegisterRequest(name="n", labels={"key": "XX"})
    cases: list[tuple[str, bytes, str]] = [
        (DISCOVERY + "GetAgent", b"\x0a\x02\xff\xfe", "agent_id"),
        (DISCOVERY + "GetAgent", b"\x0a\x05ab", "agent_id"),
        (DISCOVERY + "GetAgent", b"\x0a", "agent_id"),
        (DISCOVERY + "Register", bad_utf8(register, "XX"), "skills[0].tags[1]"),
        (DISCOVERY + "Register", bad_utf8(labelled, "XX"), "labels"),
        (STATESYNC + "PutState", bad_utf8(put, "XX"), "json"),
        (STATESYNC + "PutState", put.SerializeToString()[:-1], "json"),
        (DISTRIBUTION + "SubmitTask", submit, "task.input"),
        (DISTRIBUTION + "GetTask", b"\x9a\x05\x02ab\x12", "view"),  # field 83 unknown, then cut
        (DISTRIBUTION + "GetTask", b"\x9b\x05", ""),  # an unknown group that never ends
    ]
    for method, data, field in cases:
        call = channel.unary_unary(method)(data, metadata=ADMIN_METADATA)
        error = await refused(call)
        assert_names(error, field)


async def test_undecodable_stream_requests_name_the_field(
    channel: grpc.aio.Channel, token: str
) -> None:
    heartbeat = channel.stream_stream(DISCOVERY + "Heartbeat")(metadata=bearer(token))
    await heartbeat.write(discovery_pb.HeartbeatRequest(agent_id=AGENT).SerializeToString())
    assert await heartbeat.read()  # an ack: the stream is up
    held = discovery_pb.HeartbeatRequest(
        agent_id=AGENT, load=discovery_pb.Load(held_subtask_ids=["XX"])
    )
    await heartbeat.write(bad_utf8(held, "XX"))
    assert_names(await refused(heartbeat.read()), "load.held_subtask_ids[0]")

    fresh = channel.stream_stream(DISCOVERY + "Heartbeat")(metadata=bearer(token))
    await fresh.write(b"\x0a\x09pro")  # agent_id cut short
    assert_names(await refused(fresh.read()), "agent_id")

    watch = channel.unary_stream(STATESYNC + "WatchStates")(
        bad_utf8(statesync_pb.WatchStatesRequest(prefix="shared/XX"), "XX"),
        metadata=ADMIN_METADATA,
    )
    assert_names(await refused(watch.read()), "prefix")
    assignments = channel.unary_stream(DISTRIBUTION + "StreamAssignments")(
        b"\x0a\x7f", metadata=bearer(token)
    )
    assert_names(await refused(assignments.read()), "agent_id")


# --- unknown enum values ------------------------------------------------------------------------


async def test_unknown_enum_values_name_the_field(
    token: str,
    agents: discovery_grpc.DiscoveryServiceStub,
    tasks: distribution_grpc.DistributionServiceStub,
    state: statesync_grpc.StateSyncServiceStub,
) -> None:
    heartbeat = agents.Heartbeat(metadata=bearer(token))
    await heartbeat.write(discovery_pb.HeartbeatRequest(agent_id=AGENT, status=99))
    fail = distribution_pb.FailSubtaskRequest(
        subtask_id="s", fencing_token=1, error_message="boom", failure_class=99
    )
    cases: list[tuple[Any, str]] = [
        (tasks.GetTask(distribution_pb.GetTaskRequest(task_id="t", view=99)), "view"),
        (tasks.ListTasks(distribution_pb.ListTasksRequest(view=99)), "view"),
        (tasks.ListTasks(distribution_pb.ListTasksRequest(states=[1, 99])), "states[1]"),
        (tasks.WatchTask(distribution_pb.WatchTaskRequest(task_id="t", view=-3)).read(), "view"),
        (tasks.SubmitTask(distribution_pb.SubmitTaskRequest(task=distribution_pb.TaskSpec(
            title="t", split_policy=99))), "task.split_policy"),
        (tasks.FailSubtask(fail, metadata=bearer(token)), "failure_class"),
        (agents.ListAgents(discovery_pb.ListAgentsRequest(states=[99])), "states[0]"),
        (heartbeat.read(), "status"),
        (state.ListEvents(statesync_pb.ListEventsRequest(service=99)), "service"),
        (state.WatchEvents(statesync_pb.WatchEventsRequest(service=99)).read(), "service"),
    ]  # fmt: skip
    for call, field in cases:
        assert_names(await refused(call), field)
    # Each view the contract names still works.
    await tasks.ListTasks(distribution_pb.ListTasksRequest(view=distribution_pb.TASK_VIEW_FULL))


# --- every field path names a field of the request ----------------------------------------------


def _seconds(value: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=value)


def base_requests(agent: str) -> dict[str, Message]:
    """A valid-looking request of every RPC, so a bad field is the only thing wrong."""
    stamp = timestamp_pb2.Timestamp(seconds=1_700_000_000)
    spec = distribution_pb.TaskSpec(
        title="t",
        description="d",
        split_policy=distribution_pb.SPLIT_POLICY_EXPLICIT,
        input=number(1),
        required_capabilities=["c"],
        priority=1,
        max_attempts=2,
        lease_ttl=_seconds(10),
        subtasks=[
            distribution_pb.SubtaskSpec(local_id="a", title="A", input=number(1)),
            distribution_pb.SubtaskSpec(
                local_id="b", title="B", depends_on=["a"], required_capabilities=["c"]
            ),
        ],
        aggregation_local_id="b",
    )
    put = statesync_pb.PutOperation(key="shared/k", json=number(1), metadata={"m": "v"})
    fencing = statesync_pb.Fencing(subtask_id="s", fencing_token=1)
    return {
        "GetAgent": discovery_pb.GetAgentRequest(agent_id=agent),
        "ListAgents": discovery_pb.ListAgentsRequest(
            page_size=5, capabilities=["c"], role="r", states=[discovery_pb.Agent.STATE_LIVE]
        ),
        "Register": discovery_pb.RegisterRequest(
            agent_id="fresh",
            name="n",
            role="r",
            capabilities=["c"],
            capacity=1,
            labels={"k": "v"},
            ttl=_seconds(10),
            skills=[discovery_pb.Skill(id="s", name="S", description="d", tags=["t"])],
        ),
        "Heartbeat": discovery_pb.HeartbeatRequest(
            agent_id=agent,
            status=discovery_pb.Agent.STATUS_READY,
            load=discovery_pb.Load(active_subtasks=0, held_subtask_ids=["s"]),
        ),
        "Deregister": discovery_pb.DeregisterRequest(agent_id="ghost"),
        "WatchAgents": discovery_pb.WatchAgentsRequest(capabilities=["c"], role="r"),
        "GetSummary": discovery_pb.GetSummaryRequest(),
        "GetTask": distribution_pb.GetTaskRequest(task_id="t", view=distribution_pb.TASK_VIEW_FULL),
        "ListSubtasks": distribution_pb.ListSubtasksRequest(task_id="t", page_size=10),
        "ListTasks": distribution_pb.ListTasksRequest(
            page_size=5,
            states=[distribution_pb.Task.STATE_PENDING],
            submitter_agent_id=agent,
            view=distribution_pb.TASK_VIEW_BASIC,
        ),
        "AnalyzeTask": distribution_pb.AnalyzeTaskRequest(task=spec),
        "SubmitTask": distribution_pb.SubmitTaskRequest(task=spec, request_id="r"),
        "CancelTask": distribution_pb.CancelTaskRequest(task_id="t", reason="r"),
        "WatchTask": distribution_pb.WatchTaskRequest(
            task_id="t", view=distribution_pb.TASK_VIEW_BASIC, progress_interval=_seconds(1)
        ),
        "StreamAssignments": distribution_pb.StreamAssignmentsRequest(agent_id=agent),
        "ClaimSubtask": distribution_pb.ClaimSubtaskRequest(
            agent_id=agent, wait=_seconds(0), request_id="c"
        ),
        "CompleteSubtask": distribution_pb.CompleteSubtaskRequest(
            subtask_id="s", agent_id=agent, fencing_token=1, result=number(1), request_id="r"
        ),
        "FailSubtask": distribution_pb.FailSubtaskRequest(
            subtask_id="s",
            agent_id=agent,
            fencing_token=1,
            error_message="e",
            retryable=True,
            failure_class=distribution_pb.FAILURE_CLASS_TASK_ERROR,
            details=number(1),
            request_id="r",
        ),
        "GetState": statesync_pb.GetStateRequest(key="shared/k"),
        "ListStates": statesync_pb.ListStatesRequest(page_size=5, prefix="shared/"),
        "ListEvents": statesync_pb.ListEventsRequest(
            page_size=5,
            agent_id=agent,
            service=statesync_pb.SERVICE_STATESYNC,
            kind="state.put",
            subject="shared/k",
            start_time=stamp,
            end_time=stamp,
        ),
        "PutState": statesync_pb.PutStateRequest(
            agent_id=agent,
            key="shared/k",
            json=number(1),
            metadata={"m": "v"},
            ttl=_seconds(10),
            fencing=fencing,
            request_id="r",
        ),
        "DeleteState": statesync_pb.DeleteStateRequest(
            agent_id=agent, key="shared/k", allow_missing=True, fencing=fencing, request_id="r"
        ),
        "ModifyState": statesync_pb.ModifyStateRequest(
            agent_id=agent,
            key="shared/n",
            modification=statesync_pb.Modification(increment=1),
            fencing=fencing,
            request_id="r",
        ),
        "Transact": statesync_pb.TransactRequest(
            agent_id=agent,
            compares=[statesync_pb.Compare(key="shared/k", version=0)],
            operations=[
                statesync_pb.Operation(put=put),
                statesync_pb.Operation(delete=statesync_pb.DeleteOperation(key="shared/j")),
                statesync_pb.Operation(
                    modify=statesync_pb.ModifyOperation(
                        key="shared/i",
                        modification=statesync_pb.Modification(merge_patch=number(1)),
                    )
                ),
            ],
            fencing=fencing,
            request_id="r",
        ),
        "WatchStates": statesync_pb.WatchStatesRequest(
            prefix="shared/", progress_interval=_seconds(1)
        ),
        "WatchEvents": statesync_pb.WatchEventsRequest(
            agent_id=agent,
            service=statesync_pb.SERVICE_STATESYNC,
            kind="state.put",
            subject="shared/k",
            progress_interval=_seconds(1),
        ),
    }


def _bad_values(field: FieldDescriptor) -> tuple[list[Any], bool]:
    """Bad values for a scalar or well-known field, and whether each must be refused by path."""
    message = field.message_type.full_name if field.message_type is not None else ""
    if message == "google.protobuf.Value":
        return [number(NAN), struct_pb2.Value(list_value=struct_pb2.ListValue(
            values=[number(INF)])), nested(31)], True  # fmt: skip
    if message == "google.protobuf.ListValue":
        return [struct_pb2.ListValue(values=[number(NAN)]),
                struct_pb2.ListValue(values=[nested(30)])], True  # fmt: skip
    if message == "google.protobuf.Duration":
        return [_seconds(-1), _seconds(315_576_000_001),
                duration_pb2.Duration(seconds=1, nanos=-1)], True  # fmt: skip
    if message == "google.protobuf.Timestamp":
        return [FAR_FUTURE, timestamp_pb2.Timestamp(nanos=-1)], True
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return [NAN, INF], True
    if field.type == FieldDescriptor.TYPE_ENUM:
        return [99, -7], True
    if field.type == FieldDescriptor.TYPE_STRING:
        return ["\x00", "x" * 70_000, "²", "", " / "], False
    if field.type == FieldDescriptor.TYPE_BYTES:
        return [b"\xff" * 8], False
    if field.type == FieldDescriptor.TYPE_BOOL:
        return [True, False], False
    if field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32):
        return [-1, (1 << 31) - 1, -(1 << 31)], False
    return [-1, (1 << 63) - 1, 0], False


def variants(message: Message, path: str = "") -> Iterator[tuple[str, Message, bool]]:
    """Copies of ``message`` with one field made bad: (path, request, must be refused by path)."""
    for field in message.DESCRIPTOR.fields:
        here = f"{path}.{field.name}" if path else field.name
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        wkt = field.message_type is not None and field.message_type.full_name.startswith(
            "google.protobuf."
        )
        if is_map:
            for key, value in (("\x00", "v"), ("k", "\x00" * 300), ("a.b/c", "\x01")):
                copy = type(message)()
                copy.CopyFrom(message)
                getattr(copy, field.name)[key] = value
                yield here, copy, False
        elif field.message_type is not None and not wkt:
            child = getattr(message, field.name)
            if field.is_repeated:
                element = child[0] if child else GetMessageClass(field.message_type)()
                for child_path, bad, strict in variants(element, f"{here}[0]"):
                    copy = type(message)()
                    copy.CopyFrom(message)
                    target = getattr(copy, field.name)
                    if not target:
                        target.add()
                    target[0].CopyFrom(bad)
                    yield child_path, copy, strict
            else:
                for child_path, bad, strict in variants(child, here):
                    copy = type(message)()
                    copy.CopyFrom(message)
                    getattr(copy, field.name).CopyFrom(bad)
                    yield child_path, copy, strict
        else:
            values, strict = _bad_values(field)
            for value in values:
                copy = type(message)()
                copy.CopyFrom(message)
                target_path = here
                if field.is_repeated:
                    target = getattr(copy, field.name)
                    if target:
                        del target[:]
                    if wkt:
                        target.add().CopyFrom(value)
                    else:
                        target.append(value)
                    target_path = f"{here}[0]"
                elif wkt:
                    getattr(copy, field.name).CopyFrom(value)
                else:
                    setattr(copy, field.name, value)
                yield target_path, copy, strict


async def _outcome(
    channel: grpc.aio.Channel, method: MethodDescriptor, request: Message, metadata: Any
) -> grpc.aio.AioRpcError | None:
    """Send ``request``; return the error, or None when the call was accepted."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    serialize = type(request).SerializeToString
    try:
        if method.client_streaming:
            call = channel.stream_stream(path, request_serializer=serialize)(metadata=metadata)
            await call.write(request)
            await call.read()
            call.cancel()
        elif method.server_streaming:
            # A valid watch answers at once; a valid StreamAssignments waits for work.
            timeout = 2 if method.name == "StreamAssignments" else 30
            stream = channel.unary_stream(path, request_serializer=serialize)(
                request, metadata=metadata, timeout=timeout
            )
            await stream.read()
            stream.cancel()
        else:
            await channel.unary_unary(path, request_serializer=serialize)(
                request, metadata=metadata
            )
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return None
        return error
    return None


AGENT_ONLY = {"Heartbeat", "StreamAssignments", "ClaimSubtask", "CompleteSubtask", "FailSubtask"}
"""RPCs only an agent's session may call; the others are called with the admin token."""


async def test_every_field_path_resolves_against_the_request(
    channel: grpc.aio.Channel, token: str
) -> None:
    services = [
        discovery_pb.DESCRIPTOR.services_by_name["DiscoveryService"],
        distribution_pb.DESCRIPTOR.services_by_name["DistributionService"],
        statesync_pb.DESCRIPTOR.services_by_name["StateSyncService"],
    ]
    bases = base_requests(AGENT)
    checked = strict_checked = 0
    for service in services:
        for method in service.methods:
            base = bases[method.name]
            assert base.DESCRIPTOR is method.input_type, method.name
            metadata = bearer(token) if method.name in AGENT_ONLY else ADMIN_METADATA
            if method.name in ("PutState", "DeleteState", "ModifyState", "Transact"):
                metadata = bearer(token)
            for path, request, strict in variants(base):
                error = await _outcome(channel, method, request, metadata)
                checked += 1
                label = f"{method.name} {path}"
                if error is None:
                    assert not strict, f"{label}: accepted"
                    continue
                code = error.code()
                assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (
                    label,
                    error.details(),
                )
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    for reported in field_violations(error):
                        assert resolves(method.input_type, reported), (label, reported)
                if strict:
                    strict_checked += 1
                    assert code == grpc.StatusCode.INVALID_ARGUMENT, (label, error.details())
                    assert field_violations(error) == [path], (label, error.details())
    assert checked > 300 and strict_checked > 40, (checked, strict_checked)


async def test_paths_the_cores_report_name_fields_of_the_request(
    token: str,
    tasks: distribution_grpc.DistributionServiceStub,
    state: statesync_grpc.StateSyncServiceStub,
) -> None:
    def put(key: str, **fields: Any) -> statesync_pb.Operation:
        return statesync_pb.Operation(
            put=statesync_pb.PutOperation(key=key, json=number(1), **fields)
        )

    def dag(*subtasks: distribution_pb.SubtaskSpec, **fields: Any) -> Any:
        spec = distribution_pb.TaskSpec(
            title="t", split_policy=distribution_pb.SPLIT_POLICY_EXPLICIT, subtasks=subtasks
        )
        return distribution_pb.SubmitTaskRequest(task=spec, **fields)

    a = distribution_pb.SubtaskSpec(local_id="a", title="A", depends_on=["b"])
    b = distribution_pb.SubtaskSpec(local_id="b", title="B", depends_on=["a"])
    lone = distribution_pb.SubtaskSpec(local_id="c", title="C", depends_on=["zzz"])
    died = distribution_pb.FailSubtaskRequest(
        subtask_id="s",
        fencing_token=1,
        error_message="e",
        failure_class=distribution_pb.FAILURE_CLASS_AGENT_DIED,
    )
    agent, admin = bearer(token), ADMIN_METADATA
    cases: list[tuple[Any, Message, str]] = [
        (state.Transact, statesync_pb.TransactRequest(
            operations=[put("shared/a"), put("shared/a")]), "operations[1].put.key"),
        (state.Transact, statesync_pb.TransactRequest(
            operations=[put("shared/a", bind_to_session=True)]),
         "operations[0].put.bind_to_session"),
        (state.PutState, statesync_pb.PutStateRequest(
            key="shared/a", json=number(1), bind_to_session=True), "bind_to_session"),
        (state.PutState, statesync_pb.PutStateRequest(key="shared/a"), "json"),
        (tasks.SubmitTask, dag(a, b), "task.subtasks"),
        (tasks.SubmitTask, dag(lone), "task.subtasks[0].depends_on"),
        (tasks.FailSubtask, died, "failure_class"),
    ]  # fmt: skip
    for method, request, field in cases:
        metadata = admin if "bind_to_session" in field else agent
        error = await refused(method(request, metadata=metadata))
        assert_names(error, field)
        assert resolves(request.DESCRIPTOR, field), field


# --- TLS files at start-up ----------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_bad_tls_files_stop_serve_with_one_line_naming_the_flag(tmp_path: Path) -> None:
    def make_pair(name: str) -> tuple[Path, Path]:
        key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-keyout", key, "-out", cert, "-subj", f"/CN={name}"],
            check=True, capture_output=True,
        )  # fmt: skip
        return key, cert

    key, cert = make_pair("server")
    other_key, _ = make_pair("other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
    )
    missing = tmp_path / "missing.pem"
    cases: list[tuple[list[Path], str, str]] = [
        ([missing, key], "--tls-cert", "cannot be read"),
        ([cert, missing], "--tls-key", "cannot be read"),
        ([garbage, key], "--tls-cert", "is not a PEM certificate"),
        ([key, key], "--tls-cert", "is not a PEM certificate"),
        ([cert, garbage], "--tls-key", "is not an unencrypted PEM private key"),
        ([cert, other_key], "--tls-key", "does not match the certificate"),
        ([cert, key, garbage], "--tls-client-ca", "is not a PEM certificate"),
        ([cert, key, missing], "--tls-client-ca", "cannot be read"),
    ]
    store = tmp_path / "never-created.db"
    for files, flag, problem in cases:
        flags = ["--tls-cert", files[0], "--tls-key", files[1]]
        if len(files) > 2:
            flags += ["--tls-client-ca", files[2]]
        served = subprocess.run(
            [sys.executable, "-m", "agentcoord.cli", "serve", "--listen", "127.0.0.1:0",
             "--store", f"sqlite:///{store}", *flags],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        lines = served.stderr.splitlines()
        assert served.returncode == 2, (flag, served.stderr)
        assert len(lines) == 1 and flag in lines[0] and problem in lines[0], (flag, lines)
        assert lines[0].startswith("agentcoord: ") and "Traceback" not in served.stderr
        assert not store.exists()  # refused before anything started
