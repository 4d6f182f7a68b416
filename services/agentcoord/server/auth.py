"""Who is calling: session tokens, the join token and the admin token.

Calls that act as an agent carry ``authorization: Bearer <session token>``; operators
carry the admin token the same way; Register carries the join token as
``x-agentcoord-join-token`` when the server has one. Each RPC declares the access it
needs; the interceptor resolves the caller once per call into a context variable.

Under mutual TLS, agent ids may be bound to client certificates
(``--mtls-agent-id-pattern``): a caller then acts only as the agent ids its certificate
names (:class:`CertificateBinding`), whatever token it presents, unless it is the admin.
"""

from __future__ import annotations

import contextvars
import enum
import hmac
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from agentcoord.core.discovery import Session
from agentcoord.core.errors import PermissionDenied, Unauthenticated

AGENT_ID_PLACEHOLDER = "{agent_id}"
"""Where the agent id goes in a certificate name pattern."""

JOIN_TOKEN_HEADER = "x-agentcoord-join-token"
"""Metadata key of the join token."""


class Access(enum.Enum):
    """What an RPC requires of its caller."""

    READ = "read"
    """Anyone; when the server has a join token, any valid credential."""
    JOIN = "join"
    """The join token when the server has one, or a live session's token (Register)."""
    AGENT = "agent"
    """An agent's live session, or the admin token."""


@dataclass(frozen=True, slots=True)
class Identity:
    """The resolved caller of one call."""

    session: Session | None = None
    """The agent session, when the caller presented a session token."""
    admin: bool = False
    """Whether the caller presented the admin token."""
    token: str = field(default="", repr=False)
    """The session token presented, when ``session`` is set."""
    certificate_agent_ids: frozenset[str] | None = None
    """Agent ids the client certificate may act as; None when ids are not bound to certs."""

    def check_may_act_as(self, agent_id: str) -> None:
        """Check the client certificate allows acting as ``agent_id`` (always, for the admin).

        Raises:
            PermissionDenied: reason ``CERTIFICATE_AGENT_MISMATCH``.
        """
        allowed = self.certificate_agent_ids
        if self.admin or allowed is None or agent_id in allowed:
            return
        names = ", ".join(repr(name) for name in sorted(allowed)) or "no agent id"
        raise PermissionDenied(
            f"agent_id: the client certificate may act as {names}, not {agent_id!r}",
            reason="CERTIFICATE_AGENT_MISMATCH",
            metadata={"field": "agent_id", "agent_id": agent_id},
        )


@dataclass(frozen=True, slots=True)
class CertificateBinding:
    """Binds agent ids to the names of client certificates (mutual TLS).

    A certificate name (a DNS or URI subject alternative name, or the common name) that
    equals ``pattern`` with :data:`AGENT_ID_PLACEHOLDER` replaced by an id lets the caller
    act as that id: ``{agent_id}`` binds an id to the name itself,
    ``spiffe://example.org/agent/{agent_id}`` to a SPIFFE id.
    """

    pattern: str
    """The name pattern, holding the placeholder once (``ServerConfig.validate`` checks)."""

    def agent_ids(self, names: Iterable[str]) -> frozenset[str]:
        """Return the agent ids certificate names bind to."""
        prefix, _, suffix = self.pattern.partition(AGENT_ID_PLACEHOLDER)
        return frozenset(
            name[len(prefix) : len(name) - len(suffix)]
            for name in names
            if len(name) > len(prefix) + len(suffix)
            and name.startswith(prefix)
            and name.endswith(suffix)
        )


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

    def __init__(
        self,
        *,
        lookup: SessionLookup,
        join_token: str,
        admin_token: str,
        binding: CertificateBinding | None = None,
    ) -> None:
        """Configure the secrets (empty tokens are disabled) and the certificate binding."""
        self._lookup = lookup
        self._join_token = join_token
        self._admin_token = admin_token
        self._binding = binding

    @property
    def binds_certificates(self) -> bool:
        """Whether agent ids are bound to client certificates (only then are names read)."""
        return self._binding is not None

    async def identify(
        self, metadata: Mapping[str, str], access: Access, certificate_names: Iterable[str] = ()
    ) -> Identity:
        """Return the caller, checking it may make a call needing ``access``.

        ``certificate_names`` are the client certificate's DNS and URI subject alternative
        names and common name (none without mutual TLS).

        Raises:
            Unauthenticated: a presented token is invalid, or a required one is missing.
            PermissionDenied: the session token is of an agent the certificate is not
                bound to.
        """
        bearer = _bearer(metadata.get("authorization", ""))
        join = metadata.get(JOIN_TOKEN_HEADER, "")
        if join and not _equal(join, self._join_token):
            raise Unauthenticated(f"{JOIN_TOKEN_HEADER}: join token is not valid")
        bound = None if self._binding is None else self._binding.agent_ids(certificate_names)
        identity = Identity(certificate_agent_ids=bound)
        if bearer and self._admin_token and _equal(bearer, self._admin_token):
            identity = Identity(admin=True)
        elif bearer:
            session = await self._lookup(bearer)
            identity = Identity(session=session, token=bearer, certificate_agent_ids=bound)
            identity.check_may_act_as(session.agent_id)
        credentialed = identity.admin or identity.session is not None or bool(join)
        if access is Access.AGENT and not (identity.admin or identity.session):
            raise Unauthenticated(
                "authorization: this call needs 'authorization: Bearer <session token>'"
            )
        if access is Access.JOIN and self._join_token and not credentialed:
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
