"""Every RPC has a servicer method and a client method, driven by the generated descriptors.

This is Temporal's ``test_all_grpc_calls_present`` for agentcoord.

Every service's servicer, in ``agentcoord.server.<service>``, overrides every RPC and
declares its access; an RPC added to a proto and forgotten in a servicer, its ACCESS map
or the client fails these tests, and no RPC answers UNIMPLEMENTED on the wire.
"""

from __future__ import annotations

import asyncio
import importlib
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor

from agentcoord.client import DiscoveryClient, DistributionClient, StateSyncClient
from agentcoord.server import discovery as discovery_server
from agentcoord.server import distribution as distribution_server
from agentcoord.server import statesync as statesync_server
from agentcoord.server.app import start_app
from agentcoord.server.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "generated"

SERVICERS: dict[str, type] = {
    "agentcoord.discovery.v1.DiscoveryService": discovery_server.DiscoveryServicer,
    "agentcoord.statesync.v1.StateSyncService": statesync_server.StateSyncServicer,
    "agentcoord.distribution.v1.DistributionService": distribution_server.DistributionServicer,
}
"""Every service and its servicer class."""

CLIENTS: dict[str, type] = {
    "agentcoord.discovery.v1.DiscoveryService": DiscoveryClient,
    "agentcoord.distribution.v1.DistributionService": DistributionClient,
    "agentcoord.statesync.v1.StateSyncService": StateSyncClient,
}
"""The client class of each service."""


def generated_modules(suffix: str) -> list[str]:
    """Import names of the generated modules whose file name ends with ``suffix``."""
    return sorted(
        ".".join(path.relative_to(GENERATED).with_suffix("").parts)
        for path in GENERATED.rglob(f"*{suffix}.py")
    )


def services() -> dict[str, descriptor.ServiceDescriptor]:
    found = {}
    for name in generated_modules("_pb2"):
        for service in importlib.import_module(name).DESCRIPTOR.services_by_name.values():
            found[service.full_name] = service
    return found


SERVICES = services()


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def generated_base(service: descriptor.ServiceDescriptor) -> type:
    """The generated ``<Service>Servicer`` base class, whose methods answer UNIMPLEMENTED."""
    module_name = service.file.name.removesuffix(".proto").replace("/", ".") + "_pb2_grpc"
    module = importlib.import_module(module_name)
    return getattr(module, f"{service.name}Servicer")  # type: ignore[no-any-return]


def overridden(servicer: type, base: type, method: str) -> bool:
    return getattr(servicer, method) is not getattr(base, method)


def test_there_are_three_services() -> None:
    assert set(SERVICES) == set(CLIENTS)


def test_every_service_has_a_servicer() -> None:
    unaccounted = set(SERVICES) - set(SERVICERS)
    assert not unaccounted, f"add {sorted(unaccounted)} to SERVICERS"
    stale = set(SERVICERS) - set(SERVICES)
    assert not stale, f"{sorted(stale)} are in no proto any more"


@pytest.mark.parametrize("name", sorted(SERVICERS))
def test_implemented_servicer_overrides_every_rpc(name: str) -> None:
    service, servicer = SERVICES[name], SERVICERS[name]
    base = generated_base(service)
    assert issubclass(servicer, base)
    missing = [m.name for m in service.methods if not overridden(servicer, base, m.name)]
    assert not missing, f"{servicer.__qualname__} does not implement {missing} of {name}"


@pytest.mark.parametrize("name", sorted(SERVICERS))
def test_implemented_service_declares_the_access_of_every_rpc(name: str) -> None:
    """The interceptor wraps (authenticates, maps errors for) only the methods in ACCESS."""
    module = importlib.import_module(SERVICERS[name].__module__)
    access = getattr(module, "ACCESS", {})
    methods = {m.name for m in SERVICES[name].methods}
    assert set(access) == methods, (
        f"{module.__name__}.ACCESS: missing {sorted(methods - set(access))}, "
        f"unknown {sorted(set(access) - methods)}"
    )


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_client_has_a_method_per_rpc(name: str) -> None:
    client = CLIENTS[name]
    missing = [
        f"{client.__name__}.{snake_case(m.name)}"
        for m in SERVICES[name].methods
        if not callable(getattr(client, snake_case(m.name), None))
    ]
    assert not missing, f"no client method for {missing}"


def test_snake_case() -> None:
    assert snake_case("GetAgent") == "get_agent"
    assert snake_case("ListAgents") == "list_agents"
    assert snake_case("StreamAssignments") == "stream_assignments"


@pytest.mark.parametrize("name", generated_modules("_pb2_grpc"))
def test_generated_grpc_module_imports_from_the_installed_package(name: str) -> None:
    module = importlib.import_module(name)
    assert Path(module.__file__ or "").resolve().is_relative_to(GENERATED)
    stubs = [attr for attr in vars(module) if attr.endswith("Stub")]
    assert stubs, f"{name} defines no stub"


def test_generated_modules_import_from_another_directory(tmp_path: Path) -> None:
    """The editable install maps generated/ into agentcoord.*, whatever the working directory."""
    names = generated_modules("_pb2_grpc")
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run(
        [sys.executable, "-c", script, *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


async def _code_of(channel: grpc.aio.Channel, method: descriptor.MethodDescriptor) -> str:
    """Call ``method`` with an empty request; return its status code, or "STREAMING".

    Zero bytes are a valid message of any type (every field at its default).
    """
    path = f"/{method.containing_service.full_name}/{method.name}"
    identity = bytes
    if method.client_streaming:
        call = channel.stream_stream(path, identity, identity)(iter([b""]))
    elif method.server_streaming:
        call = channel.unary_stream(path, identity, identity)(b"")
    else:
        call = channel.unary_unary(path, identity, identity)(b"")
    try:
        code = await asyncio.wait_for(call.code(), timeout=2)
    except TimeoutError:
        call.cancel()
        return "STREAMING"  # a live stream: the method exists
    return code.name  # type: ignore[no-any-return]


async def test_on_the_wire_no_rpc_is_unimplemented(
    tmp_path: Path,
) -> None:
    app = await start_app(ServerConfig(listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/c.db"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            wrong = []
            for name, service in sorted(SERVICES.items()):
                for method in service.methods:
                    code = await _code_of(channel, method)
                    if code == "UNIMPLEMENTED":
                        wrong.append(f"{name}/{method.name} answered {code}")
            assert not wrong, "\n".join(wrong)
    finally:
        await app.stop(0)
