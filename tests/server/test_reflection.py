"""Server reflection answers every client: v1 and v1alpha, every symbol kind, json_name set.

Clients know nothing but the address: grpcio-reflection's standard client
(``ProtoReflectionDescriptorDatabase``, v1alpha), raw ``grpc.reflection.v1`` requests whose
message classes are built from the v1 descriptors the server itself serves, and grpcurl (the
real binary where installed, see ``grpcurl_path`` in tests/conftest.py). The sync clients run
in a thread, since the server shares the test's event loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from agentcoord.server.app import App, start_app
from agentcoord.server.config import ServerConfig
from tests.conftest import Grpcurl
from tests.helpers import SERVED_SERVICES
from tests.test_docs import run_shell

DISCOVERY_FILE = "agentcoord/discovery/v1/discovery_service.proto"
STATESYNC_FILE = "agentcoord/statesync/v1/statesync_service.proto"
DISTRIBUTION_FILE = "agentcoord/distribution/v1/distribution_service.proto"
SYMBOLS = {
    # symbol: the file declaring it
    "agentcoord.discovery.v1.DiscoveryService": DISCOVERY_FILE,  # service
    "agentcoord.discovery.v1.DiscoveryService.Register": DISCOVERY_FILE,  # method
    "agentcoord.statesync.v1.StateSyncService.WatchStates": STATESYNC_FILE,  # streaming method
    "agentcoord.discovery.v1.RegisterRequest": DISCOVERY_FILE,  # message
    "agentcoord.discovery.v1.Agent.LabelsEntry": DISCOVERY_FILE,  # nested (map entry) message
    "agentcoord.discovery.v1.RegisterRequest.agent_id": DISCOVERY_FILE,  # field
    "agentcoord.statesync.v1.State.value": STATESYNC_FILE,  # oneof
    "agentcoord.distribution.v1.SplitPolicy": DISTRIBUTION_FILE,  # top-level enum
    "agentcoord.discovery.v1.Agent.State": DISCOVERY_FILE,  # nested enum
    "agentcoord.distribution.v1.SPLIT_POLICY_AUTO": DISTRIBUTION_FILE,  # enum value
    "agentcoord.discovery.v1.Agent.STATE_LIVE": DISCOVERY_FILE,  # nested enum value
    "agentcoord.discovery.v1.Agent.State.STATE_LIVE": DISCOVERY_FILE,  # as grpcurl names it
    "grpc.health.v1.Health.Check": "grpc_health/v1/health.proto",
    "grpc.reflection.v1alpha.ServerReflection": "grpc_reflection/v1alpha/reflection.proto",
    "grpc.reflection.v1.ServerReflection.ServerReflectionInfo": (
        "grpc/reflection/v1/reflection.proto"
    ),
    "google.rpc.ErrorInfo": "google/rpc/error_details.proto",  # error details decode
}
V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    app = await start_app(ServerConfig(listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/t.db"))
    yield app
    await app.stop(0)


def address(app: App) -> str:
    return f"127.0.0.1:{app.port}"


def lower_camel(name: str) -> str:
    """protoc's json_name for a field named ``name``: drop each ``_``, capitalise what follows."""
    parts = name.split("_")
    return parts[0] + "".join(part[:1].upper() + part[1:] for part in parts[1:])


def v1alpha_lookups(target: str, symbols: list[str]) -> dict[str, str]:
    """The file name the standard (v1alpha) client finds for each symbol."""
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        return {symbol: database.FindFileContainingSymbol(symbol).name for symbol in symbols}


async def test_every_symbol_kind_resolves_through_the_standard_client(app: App) -> None:
    found = await asyncio.to_thread(v1alpha_lookups, address(app), list(SYMBOLS))
    assert found == SYMBOLS


def standard_pool_lookups(target: str) -> tuple[list[str], Any, Any]:
    """Services, and a method and an enum value looked up in a pool over the standard client."""
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindMethodByName("agentcoord.discovery.v1.DiscoveryService.Register")
        enum = pool.FindEnumTypeByName("agentcoord.discovery.v1.Agent.State")
        return list(database.get_services()), method.input_type.full_name, enum.values[1].name


async def test_the_standard_client_lists_services_and_builds_a_pool(app: App) -> None:
    services, request_type, value = await asyncio.to_thread(standard_pool_lookups, address(app))
    assert set(services) == SERVED_SERVICES
    assert request_type == "agentcoord.discovery.v1.RegisterRequest"
    assert value == "STATE_LIVE"


def v1_exchange(target: str, requests: list[dict[str, Any]]) -> list[Any]:
    """Send raw grpc.reflection.v1 requests, with classes built from the served v1 descriptor."""
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)  # only to fetch the v1 file
        pool = descriptor_pool.DescriptorPool(database)
        request_type = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")
        )
        response_type = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
        )
        call = channel.stream_stream(
            V1_METHOD, request_type.SerializeToString, response_type.FromString
        )
        return list(call(iter([request_type(**fields) for fields in requests]), timeout=10))


async def test_v1_answers_every_request_kind(app: App) -> None:
    requests: list[dict[str, Any]] = [
        {"list_services": ""},
        *({"file_containing_symbol": symbol} for symbol in SYMBOLS),
        {"file_by_filename": DISCOVERY_FILE},
        {"file_containing_symbol": "agentcoord.discovery.v1.NoSuchThing"},
    ]
    responses = await asyncio.to_thread(v1_exchange, address(app), requests)

    assert len(responses) == len(requests)
    listed, *files, by_name, missing = responses
    assert {service.name for service in listed.list_services_response.service} == SERVED_SERVICES
    for (symbol, file_name), response in zip(SYMBOLS.items(), files, strict=True):
        assert response.original_request.file_containing_symbol == symbol
        first = descriptor_pb2.FileDescriptorProto.FromString(
            response.file_descriptor_response.file_descriptor_proto[0]
        )
        assert first.name == file_name, symbol
    assert by_name.file_descriptor_response.file_descriptor_proto
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def every_field(messages: Iterator[descriptor_pb2.DescriptorProto] | Any) -> Iterator[Any]:
    for message in messages:
        yield from message.field
        yield from every_field(message.nested_type)


def served_files(target: str) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """Every file the server sends for its services (their imports included), by name."""
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        names = [database.FindFileContainingSymbol(s).name for s in database.get_services()]
        while names:
            name = names.pop()
            if name not in files:
                files[name] = database.FindFileByName(name)
                names.extend(files[name].dependency)
        return files


async def test_every_served_field_has_its_lower_camel_case_json_name(app: App) -> None:
    files = await asyncio.to_thread(served_files, address(app))

    assert {DISCOVERY_FILE, "google/protobuf/timestamp.proto", "google/protobuf/struct.proto"} <= (
        set(files)
    )
    fields = [field for file in files.values() for field in every_field(file.message_type)]
    assert len(fields) > 200
    wrong = [(f.name, f.json_name) for f in fields if f.json_name != lower_camel(f.name)]
    assert not wrong


@pytest.mark.parametrize(
    ("symbol", "kind", "shown"),
    [
        ("agentcoord.discovery.v1.DiscoveryService.Register", "method", "rpc Register ("),
        ("agentcoord.discovery.v1.DiscoveryService", "service", "rpc Heartbeat ("),
        ("agentcoord.discovery.v1.RegisterRequest", "message", "agent_id = 1;"),
        ("agentcoord.discovery.v1.Agent.State", "enum", "STATE_LIVE = 1;"),
        ("grpc.reflection.v1.ServerReflection", "service", "rpc ServerReflectionInfo ("),
        ("agentcoord.discovery.v1.RegisterRequest.agent_id", "field", "string agent_id = 1;"),
        ("agentcoord.discovery.v1.Agent.State.STATE_LIVE", "enum value", "STATE_LIVE = 1;"),
    ],
)
async def test_grpcurl_describes_every_symbol_kind(
    app: App, grpcurl: Grpcurl, grpcurl_path: str, symbol: str, kind: str, shown: str
) -> None:
    if grpcurl.executable is None and kind in ("field", "enum value"):
        pytest.skip(f"the grpcurl stand-in (see the report header) does not describe {kind}s")
    command = f"grpcurl -plaintext {address(app)} describe {symbol}"
    code, stdout, stderr = await run_shell(command, {**os.environ, "PATH": grpcurl_path})
    assert code == 0, f"{command!r} exited {code}:\n{stdout}{stderr}"
    article = "an" if kind[0] in "aeiou" else "a"
    assert stdout.startswith(f"{symbol} is {article} {kind}:"), stdout
    assert shown in stdout, stdout


async def test_grpcurl_decodes_error_details(app: App, grpcurl: Grpcurl, grpcurl_path: str) -> None:
    if grpcurl.executable is None:
        pytest.skip("the grpcurl stand-in (see the report header) prints no error details")
    command = (
        f'grpcurl -plaintext -d \'{{"agent_id": "a-1"}}\' {address(app)} '
        "agentcoord.discovery.v1.DiscoveryService/Register"
    )
    code, stdout, stderr = await run_shell(command, {**os.environ, "PATH": grpcurl_path})
    assert code == 64 + grpc.StatusCode.INVALID_ARGUMENT.value[0], stdout + stderr
    assert "Message: name: is required" in stderr, stderr
    assert '"reason":"INVALID_ARGUMENT"' in stderr, stderr  # ErrorInfo, decoded
    assert '"fieldViolations":[{"field":"name"' in stderr, stderr  # BadRequest, decoded
