"""Who is calling: session tokens, the join token and the admin token.

Calls that act as an agent carry ``authorization: Bearer <session token>``; operators
carry the admin token the same way; Register carries the join token as
``x-agentcoord-join-token`` when the server has one. Each RPC declares the access it
needs; the interceptor resolves the caller once per call into a context variable.
"""

from __future__ import annotations

import contextvars
import enum
import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from agentcoord.core.discovery import Session
from agentcoord.core.errors import Unauthenticated

JOIN_TOKEN_HEADER = "x-agentcoord-join-token"
"""Metadata key of the join token."""


class Access(enum.Enum):
    """What an RPC requires of its caller."""

    READ = "read"
    """Anyone; when the server has a join token, any valid credential."""
    JOIN = "join"
    """The join token, when the server has one (Register)."""
    AGENT = "agent"
    """An agent's live session, or the admin token."""


@dataclass(frozen=True, slots=True)
class Identity:
    """The resolved caller of one call."""

    session: Session | None = None
    """The agent session, when the caller presented a session token."""
    admin: bool = False
    """Whether the caller presented the admin token."""


_ANONYMOUS = Identity()
_identity: contextvars.ContextVar[Identity] = contextvars.ContextVar(
    "agentcoord_identity",
    default=_ANONYMOUS,
)


def current_identity() -> Identity:
    """Return the caller of the call being handled."""
    return _identity.get()


def bind_identity(identity: Identity) -> None:
    """Make ``identity`` the caller for the rest of the current task."""
    _identity.set(identity)


SessionLookup = Callable[[str], Awaitable[Session]]
"""Resolves a session token to its live session, raising Unauthenticated otherwise."""


class Authenticator:
    """Resolves call metadata into an :class:`Identity` and enforces an :class:`Access`."""

    def __init__(self, *, lookup: SessionLookup, join_token: str, admin_token: str) -> None:
        """Configure the secrets; empty tokens are disabled."""
        self._lookup = lookup
        self._join_token = join_token
        self._admin_token = admin_token

    async def identify(self, metadata: Mapping[str, str], access: Access) -> Identity:
        """Return the caller, checking it may make a call needing ``access``.

        Raises:
            Unauthenticated: a presented token is invalid, or a required one is missing.
        """
        bearer = _bearer(metadata.get("authorization", ""))
        join = metadata.get(JOIN_TOKEN_HEADER, "")
        if join and not _equal(join, self._join_token):
            raise Unauthenticated(f"{JOIN_TOKEN_HEADER}: join token is not valid")
        identity = Identity()
        if bearer and self._admin_token and _equal(bearer, self._admin_token):
            identity = Identity(admin=True)
        elif bearer:
            identity = Identity(session=await self._lookup(bearer))
        credentialed = identity.admin or identity.session is not None or bool(join)
        if access is Access.AGENT and not (identity.admin or identity.session):
            raise Unauthenticated(
                "authorization: this call needs 'authorization: Bearer <session token>'"
            )
        if access is Access.JOIN and self._join_token and not (join or identity.admin):
            raise Unauthenticated(f"{JOIN_TOKEN_HEADER}: this server requires a join token")
        if access is Access.READ and self._join_token and not credentialed:
            raise Unauthenticated(
                "authorization: this server requires a join, session or admin token"
            )
        return identity


def _bearer(header: str) -> str:
    scheme, _, token = header.partition(" ")
    if not header:
        return ""
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization: expected 'Bearer <token>'")
    return token.strip()


def _equal(presented: str, secret: str) -> bool:
    return bool(secret) and hmac.compare_digest(presented.encode(), secret.encode())
