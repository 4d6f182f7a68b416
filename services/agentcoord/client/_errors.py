"""The client's errors: keep the gRPC status and its rich details, one type per common code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from agentcoord.client._wire import Entry
from agentcoord.statesync.v1 import statesync_service_pb2 as pb


class RPCError(Exception):
    """A failed call, with the status code, message and the server's rich details.

    Attributes:
        code: The gRPC status code.
        message: The status message.
        reason: ``ErrorInfo.reason`` (for example ``AGENT_NOT_FOUND``), or "".
        metadata: ``ErrorInfo.metadata`` (for example ``current_version`` on a conflict).
        field_violations: Field paths named by a ``BadRequest`` detail.
        status: The full ``google.rpc.Status``, when the server sent one.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: tuple[str, ...] = (),
        status: status_pb2.Status | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}
        self.field_violations = field_violations
        self.status = status

    @classmethod
    def from_call_error(cls, error: grpc.aio.AioRpcError) -> RPCError:
        """Build from a failed grpc.aio call, unpacking ErrorInfo and BadRequest."""
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        reason = ""
        metadata: dict[str, str] = {}
        fields: list[str] = []
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                fields.extend(v.field for v in bad_request.field_violations)
        return cls(
            error.code(),
            error.details() or "",
            reason=reason,
            metadata=metadata,
            field_violations=tuple(fields),
            status=status,
        )


class ConflictError(RPCError):
    """ABORTED: a version or compare did not hold; re-read and retry."""

    @property
    def current_version(self) -> int:
        """The key's version when the write was refused; 0 when it did not exist."""
        return int(self.metadata.get("current_version", "0"))

    @property
    def current(self) -> Entry | None:
        """The key's entry when the write was refused, as the server sent it.

        None when the key did not exist (``current_version`` 0), or when the server sent
        no entry (re-read the key then).
        """
        return entry_in(self)

    @property
    def failed_compare(self) -> int | None:
        """Index of the compare of a transaction that failed, if the server named one."""
        index = self.metadata.get("failed_compare")
        return int(index) if index is not None else None


class NotFoundError(RPCError):
    """NOT_FOUND: the key does not exist."""


class InvalidArgumentError(RPCError):
    """INVALID_ARGUMENT: a field is malformed; ``field_violations`` names it."""


class UnauthenticatedError(RPCError):
    """UNAUTHENTICATED: no session or admin token, or an unknown one."""


class PermissionDeniedError(RPCError):
    """PERMISSION_DENIED: the caller may not write this key."""


class FailedPreconditionError(RPCError):
    """FAILED_PRECONDITION: for example a stale fencing token (reason in ``reason``)."""


class OutOfRangeError(RPCError):
    """OUT_OF_RANGE: a compacted revision, or a listing that changed between pages."""


class ResourceExhaustedError(RPCError):
    """RESOURCE_EXHAUSTED: a limit was reached, or a watcher fell too far behind."""


class UnavailableError(RPCError):
    """UNAVAILABLE: the server or its store is briefly unreachable; retry."""


_ERROR_TYPES: dict[grpc.StatusCode, type[RPCError]] = {
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}


def typed_error(error: RPCError) -> RPCError:
    """Return ``error`` as the RPCError subclass of its status code (itself if none)."""
    kind = _ERROR_TYPES.get(error.code)
    if kind is None or isinstance(error, kind):
        return error
    return kind(
        error.code,
        error.message,
        reason=error.reason,
        metadata=error.metadata,
        field_violations=error.field_violations,
        status=error.status,
    )


def entry_in(error: RPCError) -> Entry | None:
    """Return the ``State`` an error's status details carry (a conflict's current entry)."""
    for detail in error.status.details if error.status is not None else ():
        if detail.Is(pb.State.DESCRIPTOR):
            state = pb.State()
            detail.Unpack(state)
            return Entry.from_proto(state)
    return None


@contextlib.contextmanager
def typed_errors() -> Iterator[None]:
    try:
        yield
    except RPCError as error:
        raise typed_error(error) from None
