"""PostgreSQL back end of the store."""

from agentcoord.store.postgres.store import PostgresStore

__all__ = ["PostgresStore"]
