"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

DetailT = TypeVar("DetailT", bound=Message)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Return call metadata that authenticates with ``token``."""
    return (("authorization", f"Bearer {token}"),)


def details_of(error: grpc.RpcError, kind: type[DetailT]) -> list[DetailT]:
    """Return the rich-status details of a failed call that are ``kind`` messages."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no rich status on {error!r}"
    found = []
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            found.append(message)
    return found


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """Return the ErrorInfo detail of a failed call."""
    infos = details_of(error, error_details_pb2.ErrorInfo)
    assert infos, "no ErrorInfo detail"
    return infos[0]


def field_violations(error: grpc.RpcError) -> list[str]:
    """Return the fields a BadRequest detail of a failed call names."""
    return [
        violation.field
        for request in details_of(error, error_details_pb2.BadRequest)
        for violation in request.field_violations
    ]


PATH_SEGMENT = re.compile(r"([a-z_][a-z0-9_]*)(?:\[([^\]]*)\])?(?:\.|$)")
"""One ``name`` or ``name[index or map key]`` of a field path, with its trailing dot."""


def resolves(descriptor: Descriptor, path: str) -> bool:
    """Whether ``path`` (``a.b[2].c``, ``labels[a.b/c]``; empty: the request) names a field."""
    current: Descriptor | None = descriptor
    position = 0
    while position < len(path):
        match = PATH_SEGMENT.match(path, position)
        if match is None or current is None or match[1] not in current.fields_by_name:
            return False
        position = match.end()
        field = current.fields_by_name[match[1]]
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if match[2] is not None and not (field.is_repeated and (is_map or match[2].isdigit())):
            return False
        opaque = field.message_type is None or is_map
        if opaque or field.message_type.full_name.startswith("google.protobuf."):
            current = None
        else:
            current = field.message_type
    return not path.endswith(".")


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
