"""The server process: tokens, TLS, configuration, service subsets, signals."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentcoord.core.errors import InvalidInput
from agentcoord.discovery.v1 import discovery_service_pb2 as pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as pb_grpc
from agentcoord.server import config as server_config
from agentcoord.server.config import ServerConfig
from agentcoord.statesync.v1 import statesync_service_pb2 as statesync_pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as statesync_grpc
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


def _serve_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "agentcoord.cli", "serve", *argv]


async def _start_serve(
    *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[asyncio.subprocess.Process, int, str]:
    """Start ``agentcoord serve``; return it, its port and its first stderr line."""
    process = await asyncio.create_subprocess_exec(
        *_serve_command(*argv), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env, cwd=cwd,
    )  # fmt: skip
    assert process.stderr is not None
    line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
    found = re.search(r"agentcoord listening on 127\.0\.0\.1:(\d+)", line)
    assert found, line
    return process, int(found[1]), line


async def _stop(process: asyncio.subprocess.Process) -> tuple[str, str]:
    """SIGTERM the process; return what it printed on stdout and stderr after that."""
    process.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    return out.decode(), err.decode()


async def test_serve_command_runs_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "AGENTCOORD_LISTEN": "127.0.0.1:0",
        "AGENTCOORD_STORE": f"sqlite:///{tmp_path}/cli.db",
    }
    process, port, line = await _start_serve(env=env, cwd=tmp_path)
    assert " INFO agentcoord.server.app: agentcoord listening on 127.0.0.1:" in line
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.DiscoveryServiceStub(channel)
        await stub.Register(pb.RegisterRequest(agent_id="cli", name="cli"))
    out, err = await _stop(process)
    assert out == "", "the start-up line is logged once, not also printed on stdout"
    assert "listening on" not in err
    assert (tmp_path / "cli.db").exists()


async def test_a_second_server_on_a_busy_port_fails_at_start(tmp_path: Path) -> None:
    first, port, _ = await _start_serve(
        "--listen", "127.0.0.1:0", "--store", f"sqlite:///{tmp_path}/first.db"
    )
    try:
        second = await asyncio.create_subprocess_exec(
            *_serve_command(
                "--listen", f"127.0.0.1:{port}", "--store", f"sqlite:///{tmp_path}/second.db"
            ),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(second.communicate(), 60)
        assert second.returncode == 69, err.decode()
        assert out == b""
        assert err.decode() == (
            f"agentcoord: cannot listen on 127.0.0.1:{port}: the port is in use (another "
            "server?) or the address is not this machine's\n"
        )
        # The first server still answers, alone: every call reaches its store.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.DiscoveryServiceStub(channel)
            await stub.Register(pb.RegisterRequest(agent_id="first", name="first"))
            for _ in range(5):
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as fresh:
                    listed = await pb_grpc.DiscoveryServiceStub(fresh).ListAgents(
                        pb.ListAgentsRequest()
                    )
                    assert [agent.agent_id for agent in listed.agents] == ["first"]
    finally:
        await _stop(first)


async def test_json_logs_are_one_object_per_line_with_the_call_facts(tmp_path: Path) -> None:
    process, port, first_line = await _start_serve(
        "--listen", "127.0.0.1:0", "--store", f"sqlite:///{tmp_path}/json.db",
        "--log-format", "json", "--log-level", "DEBUG",
    )  # fmt: skip
    started = json.loads(first_line)
    assert started["address"] == f"127.0.0.1:{port}" and started["level"] == "INFO"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        registered = await pb_grpc.DiscoveryServiceStub(channel).Register(
            pb.RegisterRequest(agent_id="logged", name="logged")
        )
        await statesync_grpc.StateSyncServiceStub(channel).PutState(
            statesync_pb.PutStateRequest(
                key="shared/logged", json=struct_pb2.Value(number_value=1)
            ),
            metadata=bearer(registered.session_token),
        )
    out, err = await _stop(process)
    assert out == ""
    entries = [json.loads(line) for line in err.splitlines()]  # every line is one object
    assert sum("listening on" in entry["message"] for entry in entries) == 0  # read above
    calls = {entry["rpc"].rsplit("/", 1)[1]: entry for entry in entries if "rpc" in entry}
    put = calls["PutState"]
    assert put["code"] == "OK" and put["key"] == "shared/logged" and put["agent_id"] == "logged"
    assert put["peer"].startswith("ipv4:127.0.0.1:") and isinstance(put["ms"], float)
    assert calls["Register"]["agent_id"] == "logged"
    # grpc's own DEBUG chatter has its own level (--grpc-log-level, WARNING by default).
    assert not [e for e in entries if e["logger"].startswith("grpc") and e["level"] == "DEBUG"]


def test_serve_help_shows_description_default_and_unit() -> None:
    result = subprocess.run(
        _serve_command("--help"), capture_output=True, text=True, timeout=60, check=True
    )
    text = " ".join(result.stdout.split())
    assert "--default-ttl DURATION Agent TTL when an agent asks for none." in text
    assert "(default 10s; env AGENTCOORD_DEFAULT_TTL)" in text
    assert "(default 7d; env AGENTCOORD_CHANGE_RETENTION)" in text
    assert "--max-message-bytes BYTES Largest request or response message; at least 4 MiB" in text
    assert "(default 4194304 bytes; env AGENTCOORD_MAX_MESSAGE_BYTES)" in text
    assert "--grpc-log-level" in text and "(default WARNING; env AGENTCOORD_GRPC_LOG_LEVEL)" in text
    for spec in dataclasses.fields(ServerConfig):
        if spec.name != "services":
            assert server_config.field_docs()[spec.name] in text, spec.name


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--log-level", "chatty"], {}, "--log-level (AGENTCOORD_LOG_LEVEL): 'CHATTY'"),
        ([], {"AGENTCOORD_LOG_LEVEL": "loud"}, "--log-level (AGENTCOORD_LOG_LEVEL)"),
        (["--grpc-log-level", "x"], {}, "--grpc-log-level"),
        (["--log-format", "xml"], {}, "--log-format"),
        (["--default-ttl", "5x"], {}, "--default-ttl (AGENTCOORD_DEFAULT_TTL): '5x' is not a"),
        ([], {"AGENTCOORD_MAX_TTL": "forever"}, "--max-ttl (AGENTCOORD_MAX_TTL)"),
        ([], {"AGENTCOORD_INSECURE": "maybe"}, "--insecure (AGENTCOORD_INSECURE)"),
        (["--max-pending-requests", "many"], {}, "--max-pending-requests"),
        (["--max-pending-requests", "0"], {}, "--max-pending-requests"),
        (["--grace", "-1"], {}, "--grace"),
        (["--listen", "127.0.0.1:99999"], {}, "--listen (AGENTCOORD_LISTEN)"),
        ([], {"AGENTCOORD_SERVICES": "gossip"}, "SERVICES (AGENTCOORD_SERVICES)"),
        (["--no-such-flag"], {}, "--no-such-flag"),
    ],
)
def test_every_bad_setting_ends_in_one_line_and_exit_2(
    argv: list[str], env: dict[str, str], named: str
) -> None:
    result = subprocess.run(
        _serve_command("--store", "sqlite:///never-opened.db", *argv),
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("agentcoord") and result.stderr.count("\n") == 1
    assert named in result.stderr


def test_durations_take_a_unit_in_flags_and_variables() -> None:
    config = _parse(
        ["--default-ttl", "1m", "--change-retention", "7d", "--grace", "500ms",
         "--retry-backoff", "0.5"],
        {"AGENTCOORD_MAX_TTL": "1h", "AGENTCOORD_DEFAULT_LEASE_TTL": "90s"},
    )  # fmt: skip
    assert (config.default_ttl, config.max_ttl, config.grace) == (60.0, 3600.0, 0.5)
    assert (config.change_retention, config.default_lease_ttl) == (7 * 86400.0, 90.0)
    assert config.retry_backoff == 0.5


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


async def test_health_watch_reports_serving_then_not_serving_while_draining(
    start_server: StartServer,
) -> None:
    app = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        stream = aiter(watch)
        assert (await anext(stream)).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(app.stop(drain=1.0))
        # During the drain the server still serves: health says so before anything ends.
        assert (await anext(stream)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        summary = await pb_grpc.DiscoveryServiceStub(channel).GetSummary(pb.GetSummaryRequest())
        assert summary.live_agents == 0
        await stopping
