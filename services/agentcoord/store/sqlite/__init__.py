"""SQLite back end of the store."""

from agentcoord.store.sqlite.store import SqliteStore

__all__ = ["SqliteStore"]
