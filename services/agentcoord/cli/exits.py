"""Exit codes of the ``agentcoord`` command (the table in docs/cli.md) and the errors behind."""

from __future__ import annotations

import enum

import grpc


class Exit(enum.IntEnum):
    """What the exit status of a command means."""

    OK = 0
    """Done; the task asked about succeeded, the services are serving."""
    NEGATIVE = 1
    """Done, and the answer is no: the task failed or was cancelled, a service is not serving."""
    USAGE = 2
    """Bad flags, unreadable input, or INVALID_ARGUMENT / OUT_OF_RANGE from the server."""
    NOT_FOUND = 3
    """NOT_FOUND: no such agent, task or key."""
    CONFLICT = 4
    """ABORTED, FAILED_PRECONDITION or ALREADY_EXISTS: a version or state did not allow it."""
    AUTH = 5
    """UNAUTHENTICATED or PERMISSION_DENIED: a token is missing, wrong, or not allowed."""
    UNAVAILABLE = 69
    """UNAVAILABLE or DEADLINE_EXCEEDED: the server or its store did not answer (EX_UNAVAILABLE)."""
    SERVER_ERROR = 70
    """Any other status, such as INTERNAL or RESOURCE_EXHAUSTED (EX_SOFTWARE)."""
    INTERRUPTED = 130
    """Stopped with Ctrl-C (128 + SIGINT)."""


EXIT_BY_STATUS: dict[grpc.StatusCode, Exit] = {
    grpc.StatusCode.INVALID_ARGUMENT: Exit.USAGE,
    grpc.StatusCode.OUT_OF_RANGE: Exit.USAGE,
    grpc.StatusCode.NOT_FOUND: Exit.NOT_FOUND,
    grpc.StatusCode.ABORTED: Exit.CONFLICT,
    grpc.StatusCode.FAILED_PRECONDITION: Exit.CONFLICT,
    grpc.StatusCode.ALREADY_EXISTS: Exit.CONFLICT,
    grpc.StatusCode.UNAUTHENTICATED: Exit.AUTH,
    grpc.StatusCode.PERMISSION_DENIED: Exit.AUTH,
    grpc.StatusCode.UNAVAILABLE: Exit.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Exit.UNAVAILABLE,
}
"""Exit status of a command that failed with a gRPC status; others give SERVER_ERROR."""


def exit_for_status(code: grpc.StatusCode) -> Exit:
    """Return the exit status of a command whose call failed with ``code``."""
    return EXIT_BY_STATUS.get(code, Exit.SERVER_ERROR)


class CliError(Exception):
    """A command cannot go on; ``agentcoord: <message>`` is printed and ``status`` returned."""

    def __init__(self, message: str, status: Exit = Exit.USAGE) -> None:
        """Fail with ``message`` and exit status ``status`` (a usage error by default)."""
        super().__init__(message)
        self.message = message
        self.status = status
