"""``agentcoord health``: the standard ``grpc.health.v1`` Check of each service."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentcoord.cli.exits import CliError, Exit, exit_for_status
from agentcoord.cli.output import Output
from agentcoord.cli.rpc import Commands, add_command
from agentcoord.client import AgentcoordClient, RPCError
from agentcoord.discovery.v1 import discovery_service_pb2
from agentcoord.distribution.v1 import distribution_service_pb2
from agentcoord.statesync.v1 import statesync_service_pb2

SERVICES = {
    "discovery": discovery_service_pb2.DESCRIPTOR.services_by_name["DiscoveryService"],
    "distribution": distribution_service_pb2.DESCRIPTOR.services_by_name["DistributionService"],
    "statesync": statesync_service_pb2.DESCRIPTOR.services_by_name["StateSyncService"],
}
"""The services ``health`` checks, by the short name it takes."""
UNKNOWN = "SERVICE_UNKNOWN"
"""What a service the server does not host reports."""
POLL_INTERVAL = 0.1
"""Seconds between checks while ``--wait`` waits."""


def register(commands: Commands) -> None:
    """Add ``agentcoord health``."""
    parser = add_command(
        commands, "health", _health, "check the services; exit 1 unless all are serving"
    )
    parser.add_argument(
        "services",
        nargs="*",
        type=_service,
        metavar="SERVICE",
        help=f"any of {', '.join(SERVICES)} (default: all)",
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="wait up to --timeout for the servers to start and every service to serve",
    )


def _service(name: str) -> str:
    if name not in SERVICES:
        raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(SERVICES)}")
    return name


async def _health(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    names = args.services or list(SERVICES)
    deadline = asyncio.get_running_loop().time() + client.timeout
    found: dict[str, dict[str, str]] = {}
    for target in client.targets:
        # Health is none of the client's services: a channel of its own, plaintext as connect().
        async with grpc.aio.insecure_channel(target) as channel:
            try:
                found[target] = await _statuses(channel, names, deadline, wait=args.wait)
            except RPCError as error:
                if args.wait and error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise CliError(
                        f"{target}: no server answered within {client.timeout:g} s "
                        f"(--wait --timeout {client.timeout:g}); is it running, on this address?",
                        Exit.UNAVAILABLE,
                    ) from None
                raise CliError(f"{target}: {error}", exit_for_status(error.code)) from None
    if out.json:
        out.document({"servers": found})
    else:
        rows = (
            [target, name, status]
            for target, by_name in found.items()
            for name, status in by_name.items()
        )
        out.table(["SERVER", "SERVICE", "STATUS"], rows)
    return Exit.NEGATIVE if any(map(_unhealthy, found.values())) else Exit.OK


async def _statuses(
    channel: grpc.aio.Channel, names: list[str], deadline: float, *, wait: bool
) -> dict[str, str]:
    """Return the status of each service; with ``wait``, once all serve or at ``deadline``."""
    # types-grpcio-health-checking declares no methods on HealthStub.
    stub: Any = health_pb2_grpc.HealthStub(channel)
    loop = asyncio.get_running_loop()
    while True:
        timeout = max(POLL_INTERVAL, deadline - loop.time())
        found = {
            name: await _check(stub, SERVICES[name].full_name, timeout, wait) for name in names
        }
        if not (wait and _unhealthy(found) and loop.time() < deadline):
            return found
        await asyncio.sleep(POLL_INTERVAL)


async def _check(stub: Any, service: str, timeout: float, wait: bool) -> str:
    """Return the status name of ``service``: SERVING, NOT_SERVING or SERVICE_UNKNOWN.

    With ``wait`` the call waits for the server to accept connections, up to ``timeout``.

    Raises:
        RPCError: the server did not answer (or answered another error).
    """
    request = health_pb2.HealthCheckRequest(service=service)
    try:
        response = await stub.Check(request, timeout=timeout, wait_for_ready=wait)
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return UNKNOWN
        raise RPCError.from_call_error(error) from None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _unhealthy(found: dict[str, str]) -> bool:
    return any(status != "SERVING" for status in found.values())
