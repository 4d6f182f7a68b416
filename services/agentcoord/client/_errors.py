"""The client's error type: keeps the gRPC status and its rich details."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


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
