"""PostgreSQL back end, on an asyncpg connection pool.

Writes go through group commit (:mod:`agentcoord.store.batching`): the batch writer
holds one pooled connection for a batch, runs each operation in a nested transaction
(a savepoint) and commits once, with the server's default ``synchronous_commit=on``.
Every batch first locks the single ``revision_counter`` row, so writers of all
replicas take turns and commit in revision order, and no two batches can deadlock
on agent rows. Reads use any other pooled connection.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from typing import Any, TypeVar, cast

import asyncpg

from agentcoord.core.errors import InvalidInput, Unavailable
from agentcoord.core.models import (
    Agent,
    AgentEventKind,
    AgentState,
    AgentStatus,
    Change,
    HeartbeatRecord,
    NewChange,
    Service,
)
from agentcoord.store.base import ChangeListener
from agentcoord.store.batching import GroupCommitter, Outcome
from agentcoord.store.migrations import load_migrations, pending_migrations
from agentcoord.store.rows import (
    AGENT_COLUMNS,
    CHANGE_COLUMNS,
    Codec,
    agent_change,
    ended_kind,
    is_current_session,
    new_session,
    stored_at,
    to_utc,
)

T = TypeVar("T")

CODEC = Codec(encode_time=to_utc, decode_time=to_utc)
"""Timestamps are timestamptz; asyncpg exchanges them as aware datetimes."""

MIGRATION_LOCK = 0x61676E74636F6F72
"""Key of the advisory lock that serialises migrations of replicas starting together."""

_MIGRATIONS_PACKAGE = "agentcoord.store.postgres"
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_CONNECTION_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError)


def _placeholders(count: int) -> str:
    return ", ".join(f"${number}" for number in range(1, count + 1))


_AGENT_COLUMNS = ", ".join(AGENT_COLUMNS)
_CHANGE_COLUMNS = ", ".join(CHANGE_COLUMNS)

_SELECT_AGENT = f"SELECT {_AGENT_COLUMNS} FROM agents WHERE agent_id = $1"
_SELECT_AGENTS = f"SELECT {_AGENT_COLUMNS} FROM agents ORDER BY agent_id"
_SELECT_AGENT_BY_TOKEN = (
    f"SELECT {_AGENT_COLUMNS} FROM agents WHERE token_hash = $1 ORDER BY agent_id LIMIT 1"
)
_SAVE_AGENT = (
    f"INSERT INTO agents ({_AGENT_COLUMNS}) VALUES ({_placeholders(len(AGENT_COLUMNS))})"
    f" ON CONFLICT (agent_id) DO UPDATE SET ({_AGENT_COLUMNS})"
    f" = ({', '.join(f'excluded.{column}' for column in AGENT_COLUMNS)})"
)
_RECORD_HEARTBEAT = """
    UPDATE agents
    SET last_heartbeat_time = $3, status = $4, active_subtasks = $5, held_subtask_ids = $6
    WHERE agent_id = $1 AND epoch = $2
"""
_INSERT_CHANGE = (
    f"INSERT INTO changes ({_CHANGE_COLUMNS}) VALUES ({_placeholders(len(CHANGE_COLUMNS))})"
)
_SELECT_CHANGES = (
    f"SELECT {_CHANGE_COLUMNS} FROM changes WHERE revision > $1 ORDER BY revision LIMIT $2"
)
_SELECT_SERVICE_CHANGES = (
    f"SELECT {_CHANGE_COLUMNS} FROM changes WHERE revision > $1 AND service = $3"
    " ORDER BY revision LIMIT $2"
)
_LOCK_REVISIONS = "SELECT value FROM revision_counter WHERE id = 1 FOR UPDATE"
_NEXT_REVISION = "UPDATE revision_counter SET value = value + 1 WHERE id = 1 RETURNING value"
_CURRENT_REVISION = "SELECT value FROM revision_counter WHERE id = 1"
_CREATE_SCHEMA_MIGRATIONS = """
    CREATE TABLE IF NOT EXISTS schema_migrations (
        version integer PRIMARY KEY,
        name text NOT NULL,
        applied_at timestamptz NOT NULL DEFAULT now()
    )
"""

_Op = Callable[["_Tx"], Awaitable[T]]


@contextmanager
def _unavailable_on_disconnect() -> Iterator[None]:
    """Report a lost or refused connection as :class:`Unavailable`."""
    try:
        yield
    except _CONNECTION_ERRORS as exc:
        raise Unavailable(f"PostgreSQL is unreachable: {exc}") from exc


class _Tx:
    """What one write operation may do inside its savepoint of a batch."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self.changes: list[Change] = []
        """Change log entries appended so far, in revision order."""

    async def load_agent(self, agent_id: str) -> tuple[Agent, str] | None:
        """Return an agent and its token hash, or None."""
        row = await self._conn.fetchrow(f"{_SELECT_AGENT} FOR UPDATE", agent_id)
        return None if row is None else (CODEC.agent_from_row(row), row["token_hash"])

    async def save_agent(
        self, agent: Agent, token_hash: str, kind: AgentEventKind, now: datetime
    ) -> Agent:
        """Store ``agent`` at the next revision with its change entry; return it as stored."""
        stored = stored_at(agent, await self._conn.fetchval(_NEXT_REVISION))
        await self._conn.execute(_SAVE_AGENT, *CODEC.agent_params(stored, token_hash))
        await self._insert_change(stored.revision, now, agent_change(stored, kind))
        return stored

    async def record_heartbeats(self, records: Sequence[HeartbeatRecord]) -> None:
        """Update the liveness columns of agents whose epoch matches."""
        await self._conn.executemany(
            _RECORD_HEARTBEAT, [CODEC.heartbeat_params(r) for r in records]
        )

    async def _insert_change(self, revision: int, now: datetime, new: NewChange) -> None:
        change = Change(
            revision, to_utc(now), new.service, new.kind, new.subject, new.agent_id, new.details
        )
        await self._conn.execute(_INSERT_CHANGE, *CODEC.change_params(change))
        self.changes.append(change)


class PostgresStore:
    """The :class:`~agentcoord.store.base.Store` on a PostgreSQL database."""

    def __init__(
        self, dsn: str, *, schema: str | None = None, min_size: int = 2, max_size: int = 10
    ) -> None:
        """Connect with ``dsn`` to the tables in ``schema`` (created if missing).

        Args:
            dsn: A ``postgresql://`` connection URL for asyncpg.
            schema: Schema holding the tables; None for the server's default search path.
            min_size: Connections the pool keeps open.
            max_size: Connections the pool opens at most.

        Raises:
            InvalidInput: ``schema`` is not a plain SQL identifier (field ``store``).
        """
        if schema is not None and not _SCHEMA_NAME.fullmatch(schema):
            raise InvalidInput("store", f"schema {schema!r} is not a plain SQL identifier")
        self._dsn = dsn
        self._schema = None if schema is None else f'"{schema}"'
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._writes: GroupCommitter[_Op[object]] = GroupCommitter(self._run_batch)
        self._closed = False

    async def open(self) -> None:
        """Connect the pool and apply pending migrations."""
        if self._pool is not None or self._closed:
            raise RuntimeError("a store is opened once")
        settings = {} if self._schema is None else {"search_path": self._schema}
        with _unavailable_on_disconnect():
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                server_settings=settings,
            )
            try:
                async with self._pool.acquire() as conn:
                    await self._migrate(conn)
            except BaseException:
                await self._pool.close()
                raise
        self._writes.start()

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            if self._schema is not None:
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self._schema}")
            await conn.execute(_CREATE_SCHEMA_MIGRATIONS)
            rows = await conn.fetch("SELECT version FROM schema_migrations")
            applied = {row["version"] for row in rows}
            for migration in pending_migrations(load_migrations(_MIGRATIONS_PACKAGE), applied):
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )

    async def close(self) -> None:
        """Commit the queued writes, then close the pool."""
        if self._closed:
            return
        self._closed = True
        await self._writes.close()
        if self._pool is not None:
            await self._pool.close()

    def add_listener(self, listener: ChangeListener) -> Callable[[], None]:
        """Call ``listener`` after each commit; returns a function that removes it."""
        return self._writes.add_listener(listener)

    async def current_revision(self) -> int:
        """Return the revision of the latest committed change (0 when there is none)."""
        rows = await self._fetch(_CURRENT_REVISION)
        return int(rows[0]["value"])

    async def list_changes(
        self, after_revision: int, limit: int, service: Service | None = None
    ) -> list[Change]:
        """Return up to ``limit`` changes with revision > ``after_revision``, oldest first."""
        if limit <= 0:
            raise InvalidInput("limit", "must be positive")
        if service is None:
            rows = await self._fetch(_SELECT_CHANGES, after_revision, limit)
        else:
            rows = await self._fetch(_SELECT_SERVICE_CHANGES, after_revision, limit, service.value)
        return [CODEC.change_from_row(row) for row in rows]

    async def register_agent(self, agent: Agent, token_hash: str, now: datetime) -> Agent:
        """Insert or replace an agent and open a new session (see the protocol)."""

        async def op(tx: _Tx) -> Agent:
            previous = await tx.load_agent(agent.agent_id)
            session = new_session(agent, None if previous is None else previous[0], now)
            return await tx.save_agent(session, token_hash, AgentEventKind.JOINED, now)

        return await self._write(op)

    async def end_agent_session(
        self, agent_id: str, epoch: int, state: AgentState, now: datetime
    ) -> Agent | None:
        """Mark a live agent LEFT or EXPIRED if its stored epoch is ``epoch``."""
        kind = ended_kind(state)

        async def op(tx: _Tx) -> Agent | None:
            current = await tx.load_agent(agent_id)
            if current is None or not is_current_session(current[0], epoch):
                return None
            return await tx.save_agent(replace(current[0], state=state), current[1], kind, now)

        return await self._write(op)

    async def update_agent_status(
        self, agent_id: str, epoch: int, status: AgentStatus, now: datetime
    ) -> Agent | None:
        """Record a new working status of a live agent of that epoch."""

        async def op(tx: _Tx) -> Agent | None:
            current = await tx.load_agent(agent_id)
            if current is None or not is_current_session(current[0], epoch):
                return None
            updated = replace(current[0], status=status)
            return await tx.save_agent(updated, current[1], AgentEventKind.UPDATED, now)

        return await self._write(op)

    async def record_heartbeats(self, records: Sequence[HeartbeatRecord]) -> None:
        """Store the latest liveness facts of many agents in one transaction."""
        if records:
            await self._write(lambda tx: tx.record_heartbeats(records))

    async def get_agent(self, agent_id: str) -> Agent | None:
        """Return one agent, or None."""
        rows = await self._fetch(_SELECT_AGENT, agent_id)
        return CODEC.agent_from_row(rows[0]) if rows else None

    async def load_agents(self) -> list[tuple[Agent, str]]:
        """Return every agent with its session token hash, ordered by agent id."""
        rows = await self._fetch(_SELECT_AGENTS)
        return [(CODEC.agent_from_row(row), row["token_hash"]) for row in rows]

    async def find_agent_by_token_hash(self, token_hash: str) -> Agent | None:
        """Return the agent whose current session has this token hash, or None."""
        rows = await self._fetch(_SELECT_AGENT_BY_TOKEN, token_hash)
        return CODEC.agent_from_row(rows[0]) if rows else None

    async def _write(self, op: _Op[T]) -> T:
        return cast(T, await self._writes.submit(op))

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        if self._pool is None or self._closed:
            raise Unavailable("the store is not open")
        with _unavailable_on_disconnect():
            return cast(list[asyncpg.Record], await self._pool.fetch(sql, *args))

    async def _run_batch(self, ops: list[_Op[object]]) -> list[Outcome]:
        """Run ``ops`` in one transaction, one savepoint each, and commit."""
        assert self._pool is not None
        with _unavailable_on_disconnect():
            async with self._pool.acquire() as conn, conn.transaction():
                # Lock first: batches of all replicas then lock agent rows one at a time.
                await conn.execute(_LOCK_REVISIONS)
                return [await self._run_op(conn, op) for op in ops]

    @staticmethod
    async def _run_op(conn: asyncpg.Connection, op: _Op[object]) -> Outcome:
        tx = _Tx(conn)
        try:
            async with conn.transaction():  # nested: a savepoint
                value = await op(tx)
        except Exception as exc:
            return Outcome(error=exc)
        return Outcome(value, changes=tx.changes)
