"""SQLite back end: the embedded default.

One writer thread owns the write connection and commits batches of operations
(:mod:`agentcoord.store.batching`) with ``BEGIN IMMEDIATE`` and one savepoint per
operation. One reader thread owns a second connection; WAL lets it read while the
writer commits. Durability: WAL with ``synchronous=FULL``, so a commit is on disk
before its callers hear of it. ``BEGIN IMMEDIATE`` and the busy timeout also make
several processes sharing one file take turns.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

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

BUSY_TIMEOUT = 30.0
"""Seconds a connection waits for another process's write lock before giving up."""

CODEC = Codec(
    encode_time=lambda value: to_utc(value).isoformat(),
    decode_time=datetime.fromisoformat,
)
"""Timestamps are ISO 8601 text in UTC."""

_MIGRATIONS_PACKAGE = "agentcoord.store.sqlite"

_AGENT_COLUMNS = ", ".join(AGENT_COLUMNS)
_CHANGE_COLUMNS = ", ".join(CHANGE_COLUMNS)

_SELECT_AGENT = f"SELECT {_AGENT_COLUMNS} FROM agents WHERE agent_id = ?"
_SELECT_AGENTS = f"SELECT {_AGENT_COLUMNS} FROM agents ORDER BY agent_id"
_SELECT_AGENT_BY_TOKEN = (
    f"SELECT {_AGENT_COLUMNS} FROM agents WHERE token_hash = ? ORDER BY agent_id LIMIT 1"
)
_SAVE_AGENT = (
    f"INSERT OR REPLACE INTO agents ({_AGENT_COLUMNS})"
    f" VALUES ({', '.join('?' * len(AGENT_COLUMNS))})"
)
_RECORD_HEARTBEAT = """
    UPDATE agents
    SET last_heartbeat_time = ?3, status = ?4, active_subtasks = ?5, held_subtask_ids = ?6
    WHERE agent_id = ?1 AND epoch = ?2
"""
_INSERT_CHANGE = (
    f"INSERT INTO changes ({_CHANGE_COLUMNS}) VALUES ({', '.join('?' * len(CHANGE_COLUMNS))})"
)
_SELECT_CHANGES = (
    f"SELECT {_CHANGE_COLUMNS} FROM changes WHERE revision > ?1 ORDER BY revision LIMIT ?2"
)
_SELECT_SERVICE_CHANGES = (
    f"SELECT {_CHANGE_COLUMNS} FROM changes WHERE revision > ?1 AND service = ?3"
    " ORDER BY revision LIMIT ?2"
)
_NEXT_REVISION = "UPDATE revision_counter SET value = value + 1 WHERE id = 1 RETURNING value"
_CURRENT_REVISION = "SELECT value FROM revision_counter WHERE id = 1"
_CREATE_SCHEMA_MIGRATIONS = """
    CREATE TABLE IF NOT EXISTS schema_migrations (
        version INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        applied_at TEXT NOT NULL
    )
"""

_Op = Callable[["_Tx"], T]


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: the store issues BEGIN/COMMIT itself.
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


def _connect_writer(path: Path) -> sqlite3.Connection:
    """Connect, switch the file to WAL (it stays so) and make commits wait for fsync."""
    conn = _connect(path)
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            break
        except sqlite3.OperationalError as exc:
            # Another process is switching a new file too; SQLite does not wait here itself.
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(0.01)
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def _statements(script: str) -> Iterator[str]:
    """Split a migration into statements (``execute`` runs one at a time)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""
    if statement.strip():
        yield statement


def _migrate(conn: sqlite3.Connection) -> None:
    """Apply pending migrations in one transaction; other processes wait for the lock."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_CREATE_SCHEMA_MIGRATIONS)
        applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for migration in pending_migrations(load_migrations(_MIGRATIONS_PACKAGE), applied):
            for statement in _statements(migration.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, datetime.now(UTC).isoformat()),
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.rollback()
        raise


class _Tx:
    """What one write operation may do inside its savepoint of a batch."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.changes: list[Change] = []
        """Change log entries appended so far, in revision order."""

    def load_agent(self, agent_id: str) -> tuple[Agent, str] | None:
        """Return an agent and its token hash, or None."""
        rows = self._conn.execute(_SELECT_AGENT, (agent_id,)).fetchall()
        return (CODEC.agent_from_row(rows[0]), rows[0]["token_hash"]) if rows else None

    def save_agent(
        self, agent: Agent, token_hash: str, kind: AgentEventKind, now: datetime
    ) -> Agent:
        """Store ``agent`` at the next revision with its change entry; return it as stored."""
        stored = stored_at(agent, self._next_revision())
        self._conn.execute(_SAVE_AGENT, CODEC.agent_params(stored, token_hash))
        self._insert_change(stored.revision, now, agent_change(stored, kind))
        return stored

    def record_heartbeats(self, records: Sequence[HeartbeatRecord]) -> None:
        """Update the liveness columns of agents whose epoch matches."""
        self._conn.executemany(_RECORD_HEARTBEAT, [CODEC.heartbeat_params(r) for r in records])

    def _next_revision(self) -> int:
        # fetchall: a RETURNING statement must run to completion before RELEASE/COMMIT.
        return int(self._conn.execute(_NEXT_REVISION).fetchall()[0][0])

    def _insert_change(self, revision: int, now: datetime, new: NewChange) -> None:
        change = Change(
            revision, to_utc(now), new.service, new.kind, new.subject, new.agent_id, new.details
        )
        self._conn.execute(_INSERT_CHANGE, CODEC.change_params(change))
        self.changes.append(change)


class SqliteStore:
    """The :class:`~agentcoord.store.base.Store` on one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        """Use the database file at ``path`` (relative to the working directory)."""
        self.path = Path(path).absolute()
        """The database file."""
        self._writes: GroupCommitter[_Op[object]] = GroupCommitter(self._run_batch)
        self._writer: ThreadPoolExecutor | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._write_conn: sqlite3.Connection | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._closed = False

    async def open(self) -> None:
        """Create the file and its folder if needed, and apply pending migrations."""
        if self._writer is not None or self._closed:
            raise RuntimeError("a store is opened once")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="agentcoord-sqlite-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="agentcoord-sqlite-reader")
        try:
            self._write_conn = await self._on(self._writer, _connect_writer, self.path)
            await self._on(self._writer, _migrate, self._write_conn)
            self._read_conn = await self._on(self._reader, _connect, self.path)
        except BaseException:
            await self._release()
            raise
        self._writes.start()

    async def close(self) -> None:
        """Commit the queued writes, then close both connections and threads."""
        if self._closed:
            return
        self._closed = True
        await self._writes.close()
        await self._release()

    async def _release(self) -> None:
        for executor, conn in ((self._writer, self._write_conn), (self._reader, self._read_conn)):
            if executor is not None:
                if conn is not None:
                    await self._on(executor, conn.close)
                executor.shutdown()
        self._write_conn = self._read_conn = None

    def add_listener(self, listener: ChangeListener) -> Callable[[], None]:
        """Call ``listener`` after each commit; returns a function that removes it."""
        return self._writes.add_listener(listener)

    async def current_revision(self) -> int:
        """Return the revision of the latest committed change (0 when there is none)."""
        rows = await self._read(_CURRENT_REVISION, ())
        return int(rows[0][0])

    async def list_changes(
        self, after_revision: int, limit: int, service: Service | None = None
    ) -> list[Change]:
        """Return up to ``limit`` changes with revision > ``after_revision``, oldest first."""
        if limit <= 0:
            raise InvalidInput("limit", "must be positive")
        if service is None:
            rows = await self._read(_SELECT_CHANGES, (after_revision, limit))
        else:
            rows = await self._read(_SELECT_SERVICE_CHANGES, (after_revision, limit, service.value))
        return [CODEC.change_from_row(row) for row in rows]

    async def register_agent(self, agent: Agent, token_hash: str, now: datetime) -> Agent:
        """Insert or replace an agent and open a new session (see the protocol)."""

        def op(tx: _Tx) -> Agent:
            previous = tx.load_agent(agent.agent_id)
            session = new_session(agent, None if previous is None else previous[0], now)
            return tx.save_agent(session, token_hash, AgentEventKind.JOINED, now)

        return await self._write(op)

    async def end_agent_session(
        self, agent_id: str, epoch: int, state: AgentState, now: datetime
    ) -> Agent | None:
        """Mark a live agent LEFT or EXPIRED if its stored epoch is ``epoch``."""
        kind = ended_kind(state)

        def op(tx: _Tx) -> Agent | None:
            current = tx.load_agent(agent_id)
            if current is None or not is_current_session(current[0], epoch):
                return None
            return tx.save_agent(replace(current[0], state=state), current[1], kind, now)

        return await self._write(op)

    async def update_agent_status(
        self, agent_id: str, epoch: int, status: AgentStatus, now: datetime
    ) -> Agent | None:
        """Record a new working status of a live agent of that epoch."""

        def op(tx: _Tx) -> Agent | None:
            current = tx.load_agent(agent_id)
            if current is None or not is_current_session(current[0], epoch):
                return None
            updated = replace(current[0], status=status)
            return tx.save_agent(updated, current[1], AgentEventKind.UPDATED, now)

        return await self._write(op)

    async def record_heartbeats(self, records: Sequence[HeartbeatRecord]) -> None:
        """Store the latest liveness facts of many agents in one transaction."""
        if records:
            await self._write(lambda tx: tx.record_heartbeats(records))

    async def get_agent(self, agent_id: str) -> Agent | None:
        """Return one agent, or None."""
        rows = await self._read(_SELECT_AGENT, (agent_id,))
        return CODEC.agent_from_row(rows[0]) if rows else None

    async def load_agents(self) -> list[tuple[Agent, str]]:
        """Return every agent with its session token hash, ordered by agent id."""
        rows = await self._read(_SELECT_AGENTS, ())
        return [(CODEC.agent_from_row(row), row["token_hash"]) for row in rows]

    async def find_agent_by_token_hash(self, token_hash: str) -> Agent | None:
        """Return the agent whose current session has this token hash, or None."""
        rows = await self._read(_SELECT_AGENT_BY_TOKEN, (token_hash,))
        return CODEC.agent_from_row(rows[0]) if rows else None

    async def _write(self, op: _Op[T]) -> T:
        return cast(T, await self._writes.submit(op))

    async def _read(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        if self._read_conn is None or self._reader is None or self._closed:
            raise Unavailable("the store is not open")
        conn = self._read_conn
        return await self._on(self._reader, lambda: conn.execute(sql, params).fetchall())

    async def _run_batch(self, ops: list[_Op[object]]) -> list[Outcome]:
        assert self._writer is not None
        return await self._on(self._writer, self._commit_batch, ops)

    def _commit_batch(self, ops: list[_Op[object]]) -> list[Outcome]:
        """Run ``ops`` in one transaction, one savepoint each, and commit (writer thread)."""
        conn = self._write_conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:  # another process held the lock too long
            raise Unavailable(f"the SQLite database is busy: {exc}") from exc
        try:
            outcomes = [self._run_op(conn, op) for op in ops]
            conn.execute("COMMIT")
        except BaseException:
            conn.rollback()
            raise
        return outcomes

    @staticmethod
    def _run_op(conn: sqlite3.Connection, op: _Op[object]) -> Outcome:
        tx = _Tx(conn)
        conn.execute("SAVEPOINT op")
        try:
            value = op(tx)
        except Exception as exc:
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            return Outcome(error=exc)
        conn.execute("RELEASE op")
        return Outcome(value, changes=tx.changes)

    @staticmethod
    async def _on(executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
