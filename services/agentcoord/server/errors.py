"""THE table from domain errors to gRPC status codes, with AIP-193 rich details.

Every status carries a ``google.rpc.ErrorInfo`` (reason, domain ``agentcoord``,
metadata); invalid input also carries a ``google.rpc.BadRequest`` naming the field, and a
conflict over a state key carries the key's current entry (``agentcoord.statesync.v1.State``)
so that the caller can retry without reading it.
Anything that is not a domain error becomes INTERNAL with a generic message; the
traceback is logged here and never sent.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from agentcoord.core import errors
from agentcoord.core.models import StateEntry
from agentcoord.server.convert.statesync import state_to_proto

log = logging.getLogger(__name__)

ERROR_DOMAIN = "agentcoord"
"""The ErrorInfo domain of every error this server raises."""

STATUS_BY_ERROR: dict[type[errors.AgentcoordError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Conflict: grpc.StatusCode.ABORTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}
"""Status code of each domain error class."""


def status_code_of(error: errors.AgentcoordError) -> grpc.StatusCode:
    """Return the status code for a domain error (nearest class in the table)."""
    for cls in type(error).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def to_rpc_status(error: errors.AgentcoordError) -> status_pb2.Status:
    """Build the ``google.rpc.Status`` for a domain error."""
    code = status_code_of(error)
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
    )
    details: list[message.Message] = [info]
    if isinstance(error, errors.Conflict) and isinstance(error.current, StateEntry):
        details.append(state_to_proto(error.current))
    if isinstance(error, errors.InvalidInput):
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=error.field, description=error.description, reason=error.reason
                    )
                ]
            )
        )
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return status_pb2.Status(code=code.value[0], message=error.message, details=packed)


def internal_status() -> status_pb2.Status:
    """Return the status sent for an unexpected failure: no detail leaks."""
    return status_pb2.Status(code=code_pb2.INTERNAL, message="internal error; see server log")


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: BaseException) -> NoReturn:
    """Abort the call with the status for ``error``."""
    if isinstance(error, errors.AgentcoordError):
        status = to_rpc_status(error)
    else:
        log.error("unexpected error", exc_info=error)
        status = internal_status()
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")  # pragma: no cover
