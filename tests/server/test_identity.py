"""Identity on a real server, on both stores: a live agent cannot be taken over.

A session (agent id + epoch) owns its leases; Register of a live id needs that session's
token (a resume) or the admin token (a takeover); under mutual TLS agent ids can be bound
to client certificates; tasks are cancelled only by their submitter, and request ids are
scoped to the submitter.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import pytest

from agentcoord.client import Agent, WorkItem
from agentcoord.core.errors import InvalidInput
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from agentcoord.distribution.v1 import distribution_service_pb2 as pb
from agentcoord.distribution.v1 import distribution_service_pb2_grpc as pb_grpc
from agentcoord.server.app import App
from agentcoord.server.config import ServerConfig
from tests.helpers import bearer, error_info, eventually, make_cert
from tests.server.conftest import StartServer
from tests.server.test_distribution import Worker, explicit, join, seconds, sub, value

ADMIN = "admin-secret"
Metadata = tuple[tuple[str, str], ...]


@pytest.fixture
async def app(start_server: StartServer) -> App:
    return await start_server(admin_token=ADMIN, retry_backoff=0.0)


@pytest.fixture
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield channel


def register_request(agent_id: str, **fields: object) -> discovery_pb.RegisterRequest:
    return discovery_pb.RegisterRequest(agent_id=agent_id, name=agent_id, **fields)  # type: ignore[arg-type]


async def refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    """Await a call that must fail; return its error."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def leased(
    worker: Worker, stub: pb_grpc.DistributionServiceStub, **task: object
) -> pb.Assignment:
    """Submit a one sub-task task and claim it as ``worker``."""
    await stub.SubmitTask(pb.SubmitTaskRequest(task=explicit(sub("a"), **task)))
    assignment = await worker.claim(wait=5)
    assert assignment is not None
    return assignment


async def subtask_of(
    stub: pb_grpc.DistributionServiceStub, assignment: pb.Assignment
) -> pb.Subtask:
    task = (
        await stub.GetTask(
            pb.GetTaskRequest(task_id=assignment.subtask.task_id, view=pb.TASK_VIEW_FULL)
        )
    ).task
    [found] = [s for s in task.subtasks if s.subtask_id == assignment.lease.subtask_id]
    return found


# Register of a live id


async def test_the_forged_completion_attack_fails(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.DistributionServiceStub(channel)
    discovery = discovery_grpc.DiscoveryServiceStub(channel)
    victim = await join(channel, "victim", ttl=30)
    assignment = await leased(victim, stub)
    # The fencing token is public: GetTask shows it to everyone.
    shown = await subtask_of(stub, assignment)
    assert shown.lease.fencing_token == assignment.lease.fencing_token

    # Registering the live id without its token is refused, naming agent_id and the TTL left.
    error = await refused(discovery.Register(register_request("victim")))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error.details().startswith("agent_id:")
    info = error_info(error)
    assert info.reason == "AGENT_ALREADY_REGISTERED"
    assert info.metadata["field"] == "agent_id" and info.metadata["agent_id"] == "victim"
    assert 0 < float(info.metadata["ttl_remaining"]) <= 30

    # Without a session, the forged completion is not even authenticated.
    forged = pb.CompleteSubtaskRequest(
        subtask_id=shown.subtask_id,
        agent_id="victim",
        fencing_token=shown.lease.fencing_token,
        result=value("forged"),
    )
    error = await refused(stub.CompleteSubtask(forged))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    # Another agent's session holding the public token is not the holder either.
    intruder = await join(channel, "intruder")
    error = await refused(stub.CompleteSubtask(forged, metadata=intruder.metadata))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED

    done = await victim.complete(assignment, "real")
    assert done.subtask.state == pb.Subtask.STATE_SUCCEEDED
    assert (await subtask_of(stub, assignment)).result == value("real")


async def test_resuming_with_the_current_token_keeps_the_session_and_its_leases(
    channel: grpc.aio.Channel,
) -> None:
    stub = pb_grpc.DistributionServiceStub(channel)
    discovery = discovery_grpc.DiscoveryServiceStub(channel)
    worker = await join(channel, "resumer", capacity=1)
    first = (await discovery.GetAgent(discovery_pb.GetAgentRequest(agent_id="resumer"))).agent
    assignment = await leased(worker, stub)

    resumed = await discovery.Register(
        register_request("resumer", capacity=2, ttl=seconds(10)), metadata=worker.metadata
    )

    assert resumed.epoch == first.epoch and resumed.session_token == worker.token
    assert resumed.agent.capacity == 2  # the registration's fields are recorded
    done = await worker.complete(assignment, "kept")
    assert done.subtask.state == pb.Subtask.STATE_SUCCEEDED
    # An empty agent_id with the token means the session's own.
    again = await discovery.Register(
        discovery_pb.RegisterRequest(name="r"), metadata=worker.metadata
    )
    assert again.agent.agent_id == "resumer" and again.epoch == first.epoch
    # A session token may not register another id.
    error = await refused(discovery.Register(register_request("other"), metadata=worker.metadata))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(error).reason == "AGENT_MISMATCH"


async def test_an_admin_takeover_ends_the_old_session_and_re_offers_its_leases(
    channel: grpc.aio.Channel,
) -> None:
    stub = pb_grpc.DistributionServiceStub(channel)
    discovery = discovery_grpc.DiscoveryServiceStub(channel)
    old = await join(channel, "taken", ttl=30)
    stream = old.stub.StreamAssignments(
        pb.StreamAssignmentsRequest(agent_id="taken"), metadata=old.metadata
    )
    # max_attempts 1: burning an attempt would fail the task for good.
    await stub.SubmitTask(pb.SubmitTaskRequest(task=explicit(sub("a"), max_attempts=1)))
    assignment = (await asyncio.wait_for(stream.read(), 5)).assignment
    beats = discovery.Heartbeat(metadata=old.metadata)

    new = await discovery.Register(register_request("taken"), metadata=bearer(ADMIN))

    assert new.epoch == 2
    revocation = (await asyncio.wait_for(stream.read(), 5)).revocation
    assert revocation.subtask_id == assignment.lease.subtask_id
    assert revocation.reason == pb.Revocation.REASON_SESSION_ENDED
    ended = await refused(stream.read())
    assert ended.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(ended).reason == "SESSION_ENDED"
    await beats.write(discovery_pb.HeartbeatRequest(agent_id="taken"))
    assert (await beats.read()).command == discovery_pb.HeartbeatResponse.COMMAND_REREGISTER
    error = await refused(old.complete(assignment, "stale"))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED

    # Offered again without burning an attempt; the new session does not inherit the lease.
    successor = Worker(channel, "taken", new.session_token)
    error = await refused(successor.complete(assignment, "inherited"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    again = await successor.claim(wait=5)
    assert again is not None and again.lease.subtask_id == assignment.lease.subtask_id
    assert again.lease.fencing_token > assignment.lease.fencing_token
    assert again.subtask.last_failure.failure_class == pb.FAILURE_CLASS_AGENT_DIED
    done = await successor.complete(again, "by the new session")
    assert done.task_state == pb.Task.STATE_SUCCEEDED


async def test_a_new_epoch_after_expiry_gets_the_leases_offered_again(
    channel: grpc.aio.Channel,
) -> None:
    stub = pb_grpc.DistributionServiceStub(channel)
    discovery = discovery_grpc.DiscoveryServiceStub(channel)
    old = await join(channel, "phoenix", ttl=0.5)
    assignment = await leased(old, stub, max_attempts=1, lease_ttl=seconds(60))

    async def registered() -> bool:
        try:
            await discovery.Register(register_request("phoenix"))
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.ALREADY_EXISTS
            return False
        return True

    await eventually(registered)

    async def offered_again() -> bool:
        subtask = await subtask_of(stub, assignment)
        return (
            subtask.state == pb.Subtask.STATE_READY
            and subtask.last_failure.failure_class == pb.FAILURE_CLASS_AGENT_DIED
        )

    await eventually(offered_again)


async def test_a_restarted_sdk_agent_without_its_token_waits_for_the_old_session(
    app: App, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    discovery = discovery_grpc.DiscoveryServiceStub(channel)
    # The process that crashed: registered, then silent.
    crashed = await discovery.Register(register_request("restarter", ttl=seconds(1.0)))

    async def handle(item: WorkItem) -> str:
        return "ok"

    caplog.set_level(logging.INFO, logger="agentcoord.client.agent")
    restarted = Agent(
        f"127.0.0.1:{app.port}", name="restarter", agent_id="restarter", handler=handle, ttl=1.0
    )
    async with restarted:
        assert restarted.epoch == crashed.epoch + 1
    assert "another session of this id is live" in caplog.text


async def test_the_sdk_re_registers_by_resuming_a_live_session(app: App) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def handle(item: WorkItem) -> str:
        started.set()
        await release.wait()
        return "done"

    async with Agent(
        f"127.0.0.1:{app.port}", name="sdk", agent_id="sdk", handler=handle, ttl=5.0
    ) as worker:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = pb_grpc.DistributionServiceStub(channel)
            task = (await stub.SubmitTask(pb.SubmitTaskRequest(task=explicit(sub("a"))))).task
            await asyncio.wait_for(started.wait(), 10)
            epoch = worker.epoch
            # What the streams do when the server asks to register again (private).
            await worker._register_again(worker._generation)
            assert worker.epoch == epoch and worker.stats.registrations == 2
            release.set()

            async def succeeded() -> bool:
                got = await stub.GetTask(pb.GetTaskRequest(task_id=task.task_id))
                return got.task.state == pb.Task.STATE_SUCCEEDED

            await eventually(succeeded)
        assert worker.stats.refused == 0


# Mutual TLS: agent ids bound to client certificates


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_mtls_binds_agent_ids_to_client_certificates(
    start_server: StartServer, tmp_path: Path
) -> None:
    server_key, server_cert = make_cert(
        tmp_path, "localhost", "-addext", "subjectAltName=IP:127.0.0.1"
    )
    a_key, a_cert = make_cert(tmp_path, "agent-a")
    b_key, b_cert = make_cert(
        tmp_path, "client-b", "-addext", "subjectAltName=URI:spiffe://example.org/agent/agent-b"
    )
    bundle = tmp_path / "clients.pem"
    bundle.write_bytes(a_cert.read_bytes() + b_cert.read_bytes())

    def credentials(key: Path, cert: Path) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=server_cert.read_bytes(),
            private_key=key.read_bytes(),
            certificate_chain=cert.read_bytes(),
        )

    async def check(pattern: str, key: Path, cert: Path, own: str) -> None:
        app = await start_server(
            tls_cert=str(server_cert),
            tls_key=str(server_key),
            tls_client_ca=str(bundle),
            mtls_agent_id_pattern=pattern,
            admin_token=ADMIN,
        )
        target = f"127.0.0.1:{app.port}"
        async with grpc.aio.secure_channel(target, credentials(key, cert)) as channel:
            discovery = discovery_grpc.DiscoveryServiceStub(channel)
            mine = await discovery.Register(register_request(own))
            assert mine.agent.agent_id == own
            error = await refused(discovery.Register(register_request("agent-zzz")))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert error.details().startswith("agent_id:")
            assert error_info(error).reason == "CERTIFICATE_AGENT_MISMATCH"
            assert error_info(error).metadata["field"] == "agent_id"
            error = await refused(discovery.Register(discovery_pb.RegisterRequest(name="x")))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            # The admin is not bound.
            other = await discovery.Register(register_request("agent-zzz"), metadata=bearer(ADMIN))
        # Another certificate cannot use the session token either.
        stranger = (b_key, b_cert) if key == a_key else (a_key, a_cert)
        async with grpc.aio.secure_channel(target, credentials(*stranger)) as channel:
            stub = pb_grpc.DistributionServiceStub(channel)
            error = await refused(
                stub.ClaimSubtask(pb.ClaimSubtaskRequest(), metadata=bearer(other.session_token))
            )
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        await app.stop(0)

    await check("{agent_id}", a_key, a_cert, "agent-a")
    await check("spiffe://example.org/agent/{agent_id}", b_key, b_cert, "agent-b")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"mtls_agent_id_pattern": "{agent_id}"}, "mtls_agent_id_pattern"),
        (
            {
                "tls_cert": "c.pem",
                "tls_key": "k.pem",
                "tls_client_ca": "ca.pem",
                "mtls_agent_id_pattern": "agent",
            },
            "mtls_agent_id_pattern",
        ),
    ],
)
def test_the_certificate_binding_needs_mtls_and_one_placeholder(
    overrides: dict[str, str], field: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        ServerConfig(**overrides).validate()  # type: ignore[arg-type]
    assert caught.value.field == field


# Tasks: cancelled by their submitter; request ids scoped to it


async def test_only_the_submitter_or_the_admin_cancels_a_task(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.DistributionServiceStub(channel)
    owner = await join(channel, "owner")
    other = await join(channel, "other")

    async def submit(metadata: Metadata = ()) -> str:
        request = pb.SubmitTaskRequest(task=explicit(sub("a"), required_capabilities=["none"]))
        return (await stub.SubmitTask(request, metadata=metadata)).task.task_id

    async def cancel(task_id: str, metadata: Metadata = ()) -> int:
        request = pb.CancelTaskRequest(task_id=task_id)
        return (await stub.CancelTask(request, metadata=metadata)).task.state

    owned = await submit(owner.metadata)
    for intruder in (other.metadata, ()):
        error = await refused(cancel(owned, intruder))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(error).reason == "NOT_TASK_SUBMITTER"
        assert error_info(error).metadata["field"] == "task_id"
    assert await cancel(owned, owner.metadata) == pb.Task.STATE_CANCELLED
    by_admin = await submit(owner.metadata)
    assert await cancel(by_admin, bearer(ADMIN)) == pb.Task.STATE_CANCELLED

    # Callers without an identity share one: they may cancel what such a caller submitted.
    anonymous = await submit()
    error = await refused(cancel(anonymous, other.metadata))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await cancel(anonymous) == pb.Task.STATE_CANCELLED


async def test_request_ids_are_scoped_to_the_submitter(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.DistributionServiceStub(channel)
    alice = await join(channel, "alice")
    bob = await join(channel, "bob")

    async def submit(title: str, metadata: Metadata = ()) -> pb.Task:
        request = pb.SubmitTaskRequest(task=explicit(sub("a"), title=title), request_id="r1")
        return (await stub.SubmitTask(request, metadata=metadata)).task

    first = await submit("alice's", alice.metadata)
    bobs = await submit("bob's", bob.metadata)
    anonymous = await submit("anonymous")
    admins = await submit("admin's", bearer(ADMIN))

    assert len({first.task_id, bobs.task_id, anonymous.task_id, admins.task_id}) == 4
    assert bobs.title == "bob's" and bobs.submitter_agent_id == "bob"
    assert (await submit("again", alice.metadata)).task_id == first.task_id
    assert (await submit("again")).task_id == anonymous.task_id


async def test_a_session_token_alone_resumes_on_a_server_with_a_join_token(
    start_server: StartServer,
) -> None:
    app = await start_server(join_token="let-me-in")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        discovery = discovery_grpc.DiscoveryServiceStub(channel)
        error = await refused(discovery.Register(register_request("joiner")))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        first = await discovery.Register(
            register_request("joiner"), metadata=(("x-agentcoord-join-token", "let-me-in"),)
        )
        resumed = await discovery.Register(
            register_request("joiner"), metadata=bearer(first.session_token)
        )
        assert resumed.epoch == first.epoch
