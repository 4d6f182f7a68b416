"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Return call metadata that authenticates with ``token``."""
    return (("authorization", f"Bearer {token}"),)


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """Return the ErrorInfo detail of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no rich status on {error.code()}: {error.details()}"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo detail")


def field_violations(error: grpc.aio.AioRpcError) -> list[str]:
    """Return the fields a BadRequest detail of a failed call names."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            fields.extend(violation.field for violation in request.field_violations)
    return fields


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, interval: float = 0.05
) -> None:
    """Poll ``check`` until it returns True, failing after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def make_cert(folder: Path, name: str, *extra: str) -> tuple[Path, Path]:
    """Make a self-signed certificate with CN ``name`` (``extra``: openssl req options).

    Returns the key and certificate files; needs the ``openssl`` command.
    """
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", key, "-out", cert, "-subj", f"/CN={name}", *extra],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


SERVED_SERVICES = frozenset(
    {
        "agentcoord.discovery.v1.DiscoveryService",
        "agentcoord.distribution.v1.DistributionService",
        "agentcoord.statesync.v1.StateSyncService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
)
"""Every service a full server lists through reflection."""
