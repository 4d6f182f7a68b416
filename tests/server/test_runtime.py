"""The server process: tokens, TLS, configuration, service subsets, signals."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentcoord.core.errors import InvalidInput
from agentcoord.discovery.v1 import discovery_service_pb2 as pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as pb_grpc
from agentcoord.server import config as server_config
from agentcoord.server.config import ServerConfig
from tests.helpers import bearer, make_cert
from tests.server.conftest import StartServer

JOIN = (("x-agentcoord-join-token", "let-me-in"),)


async def test_join_and_admin_tokens(start_server: StartServer) -> None:
    app = await start_server(join_token="let-me-in", admin_token="root-secret")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb_grpc.DiscoveryServiceStub(channel)
        request = pb.RegisterRequest(agent_id="a", name="a")
        for metadata in [(), (("x-agentcoord-join-token", "wrong"),)]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Register(request, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        registered = await stub.Register(request, metadata=JOIN)
        # Reads need some credential on a server with a join token.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListAgents(pb.ListAgentsRequest())
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        listed = await stub.ListAgents(
            pb.ListAgentsRequest(), metadata=bearer(registered.session_token)
        )
        assert [agent.agent_id for agent in listed.agents] == ["a"]
        # The admin may end any agent's session; it must name the agent.
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.Deregister(pb.DeregisterRequest(), metadata=bearer("root-secret"))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        left = await stub.Deregister(
            pb.DeregisterRequest(agent_id="a"), metadata=bearer("root-secret")
        )
        assert left.agent.state == pb.Agent.STATE_LEFT


def test_distribution_is_refused_without_discovery() -> None:
    config = ServerConfig(listen="127.0.0.1:0", services=("distribution",))
    with pytest.raises(InvalidInput) as refused:
        config.validate()
    assert refused.value.field == "services" and "discovery" in refused.value.message


async def test_one_service_per_process(start_server: StartServer) -> None:
    app = await start_server(services=("statesync",))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        served = await health.Check(
            health_pb2.HealthCheckRequest(service="agentcoord.statesync.v1.StateSyncService")
        )
        assert served.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health.Check(
                health_pb2.HealthCheckRequest(service="agentcoord.discovery.v1.DiscoveryService")
            )
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as absent:
            await pb_grpc.DiscoveryServiceStub(channel).GetSummary(pb.GetSummaryRequest())
        assert absent.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _parse(argv: list[str], env: dict[str, str]) -> ServerConfig:
    parser = argparse.ArgumentParser()
    server_config.add_arguments(parser)
    return server_config.from_sources(parser.parse_args(argv), env)


def test_config_precedence_flags_over_env_over_defaults() -> None:
    assert _parse([], {}) == ServerConfig()
    env = {"AGENTCOORD_LISTEN": "127.0.0.1:6000", "AGENTCOORD_DEFAULT_TTL": "20"}
    assert _parse([], env).listen == "127.0.0.1:6000"
    assert _parse([], env).default_ttl == 20.0
    assert _parse(["--listen", "127.0.0.1:7000"], env).listen == "127.0.0.1:7000"
    assert _parse(["discovery", "statesync"], {}).services == ("discovery", "statesync")


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--listen", "0.0.0.0:50051"], "listen"),
        (["--listen", "nonsense"], "listen"),
        (["gossip"], "services"),
        (["--tls-cert", "a.pem"], "tls_cert"),
        (["--default-ttl", "abc"], "default_ttl"),
        (["--min-ttl", "5", "--default-ttl", "2"], "default_ttl"),
    ],
)
def test_config_refuses_bad_or_unsafe_settings(argv: list[str], field: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        _parse(argv, {})
    assert refused.value.field == field


def test_insecure_flag_allows_listening_beyond_loopback() -> None:
    assert _parse(["--listen", "0.0.0.0:50051", "--insecure"], {}).insecure


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_tls_and_mutual_tls(start_server: StartServer, tmp_path: Path) -> None:
    server_key, server_cert = make_cert(
        tmp_path, "localhost", "-addext", "subjectAltName=IP:127.0.0.1"
    )
    client_key, client_cert = make_cert(tmp_path, "agent")
    app = await start_server(
        tls_cert=str(server_cert), tls_key=str(server_key), tls_client_ca=str(client_cert)
    )
    target = f"127.0.0.1:{app.port}"
    trusted = grpc.ssl_channel_credentials(
        root_certificates=server_cert.read_bytes(),
        private_key=client_key.read_bytes(),
        certificate_chain=client_cert.read_bytes(),
    )
    async with grpc.aio.secure_channel(target, trusted) as channel:
        summary = await pb_grpc.DiscoveryServiceStub(channel).GetSummary(pb.GetSummaryRequest())
        assert summary.live_agents == 0
    anonymous = grpc.ssl_channel_credentials(root_certificates=server_cert.read_bytes())
    async with grpc.aio.secure_channel(target, anonymous) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.DiscoveryServiceStub(channel).GetSummary(
                pb.GetSummaryRequest(), timeout=5
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_serve_command_runs_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "AGENTCOORD_LISTEN": "127.0.0.1:0",
        "AGENTCOORD_STORE": f"sqlite:///{tmp_path}/cli.db",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentcoord.cli", "serve",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    assert line.startswith("agentcoord listening on 127.0.0.1:")
    port = int(line.rsplit(":", 1)[1])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.DiscoveryServiceStub(channel)
        await stub.Register(pb.RegisterRequest(agent_id="cli", name="cli"))
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 30) == 0
    assert (tmp_path / "cli.db").exists()


def test_serve_command_rejects_bad_configuration() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agentcoord.cli", "serve", "--listen", "0.0.0.0:1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "beyond loopback" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("store", "code", "message"),
    [
        ("mysql://nowhere/db", 2, "unknown store URL scheme"),
        ("postgresql://nobody@127.0.0.1:1/none", 69, "unreachable"),
    ],
)
def test_serve_command_reports_store_problems_without_traceback(
    store: str, code: int, message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agentcoord.cli", "serve", "--listen", "127.0.0.1:0",
         "--store", store],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
