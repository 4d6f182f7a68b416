"""Store URL to store implementation."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from agentcoord.core.errors import InvalidInput
from agentcoord.core.store import Store
from agentcoord.store.postgres import PostgresStore
from agentcoord.store.sqlite import SqliteStore

_SQLITE_PREFIX = "sqlite:///"


def open_store(url: str, *, leader_interval: float = 1.0) -> Store:
    """Return an un-opened store for ``url``; the caller awaits its ``open()``.

    Args:
        url: ``sqlite:///relative/path.db`` (relative to the working directory),
            ``sqlite:////absolute/path.db``, or ``postgresql://...`` (also
            ``postgres://...``) with an optional ``schema=<name>`` query parameter naming
            the schema that holds the tables.
        leader_interval: Seconds between a PostgreSQL replica's tries to take the sweeping
            leadership (see :class:`~agentcoord.store.postgres.PostgresStore`).

    Raises:
        InvalidInput: the URL has an unknown scheme or no path (field ``store``).
    """
    scheme = url.partition("://")[0].lower()
    if scheme == "sqlite":
        if not url.startswith(_SQLITE_PREFIX) or len(url) == len(_SQLITE_PREFIX):
            raise InvalidInput("store", f"expected sqlite:///<path>, got {url!r}")
        return SqliteStore(url[len(_SQLITE_PREFIX) :])
    if scheme in ("postgresql", "postgres"):
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        schemas = [value for key, value in query if key == "schema"]
        rest = [(key, value) for key, value in query if key != "schema"]
        dsn = urlunsplit(parts._replace(query=urlencode(rest)))
        return PostgresStore(
            dsn, schema=schemas[-1] if schemas else None, leader_interval=leader_interval
        )
    raise InvalidInput(
        "store", f"unknown store URL scheme {scheme!r}: use sqlite:/// or postgresql://"
    )
