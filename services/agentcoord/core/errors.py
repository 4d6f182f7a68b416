"""Domain errors: each carries a semantic kind and a stable reason, never a gRPC code."""

from __future__ import annotations

from collections.abc import Mapping


class AgentcoordError(Exception):
    """Base of every error the core raises on purpose.

    Attributes:
        message: Human-readable description, safe to show to callers.
        reason: Stable UPPER_SNAKE identifier of the cause, such as ``AGENT_NOT_FOUND``.
        metadata: Extra machine-readable facts, such as the current version on a conflict.
    """

    default_reason = "AGENTCOORD_ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})


class NotFound(AgentcoordError):
    """A named resource does not exist."""

    default_reason = "NOT_FOUND"


class AlreadyExists(AgentcoordError):
    """A resource with that identity exists already."""

    default_reason = "ALREADY_EXISTS"


class Conflict(AgentcoordError):
    """A concurrent change won; retry from ``current``, or re-read and retry.

    Attributes:
        current: What the caller lost to (such as the key's current entry), sent with the
            error so that a retry needs no read; None when there is nothing (a missing key).
    """

    default_reason = "CONFLICT"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        current: object = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.current = current


class FailedPrecondition(AgentcoordError):
    """The system is not in a state that allows the operation; retrying will not help."""

    default_reason = "FAILED_PRECONDITION"


class InvalidInput(AgentcoordError):
    """A request field is malformed; ``field`` names it (dotted path; empty: the whole request)."""

    default_reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, description: str, *, reason: str | None = None) -> None:
        message = f"{field}: {description}" if field else description
        super().__init__(message, reason=reason, metadata={"field": field})
        self.field = field
        self.description = description


class OutOfRange(AgentcoordError):
    """A revision or position is outside what is retained."""

    default_reason = "OUT_OF_RANGE"


class ResourceExhausted(AgentcoordError):
    """A capacity, quota or limit is reached."""

    default_reason = "RESOURCE_EXHAUSTED"


class Unauthenticated(AgentcoordError):
    """The caller presented no credentials, or credentials that are not valid."""

    default_reason = "UNAUTHENTICATED"


class PermissionDenied(AgentcoordError):
    """The caller is known but may not do this."""

    default_reason = "PERMISSION_DENIED"


class Unavailable(AgentcoordError):
    """A transient outage (the store is unreachable, the server is shutting down)."""

    default_reason = "UNAVAILABLE"


def store_unavailable(failure: str, detail: str) -> Unavailable:
    """Return the error a call gets when the database cannot serve it now.

    Args:
        failure: Kind of failure, UPPER_SNAKE (``DISK_FULL``, ``READ_ONLY``, ``IO_ERROR``,
            ``CONNECTION_LOST``); in the metadata as ``failure``.
        detail: What the driver said.
    """
    return Unavailable(
        f"the store is unavailable ({failure.lower().replace('_', ' ')}): {detail}; "
        "nothing was recorded, retry later",
        reason="STORE_UNAVAILABLE",
        metadata={"failure": failure},
    )
