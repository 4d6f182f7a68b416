"""SQLite back end: the embedded default.

One writer thread owns the write connection and runs the batch scripts of group commit
(:mod:`agentcoord.store.unit_of_work`) with ``BEGIN IMMEDIATE``. A second connection reads,
on the event loop itself; WAL lets it read while the writer commits. Durability: WAL with
``synchronous=FULL``, so a commit is on disk before its callers hear of it. Single-key
reads (``read_state``) of recently read keys are served from memory while no batch is in
flight (:mod:`agentcoord.store.sqlite.cache`).

SQLite is the embedded, single-process store: a process holds an exclusive ``flock`` on
``<file>.lock`` for as long as its store is open, and a second process is refused at open
(:class:`~agentcoord.core.errors.Unavailable`). The kernel releases the lock when the
holder exits, however it exits, so a server killed with SIGKILL does not block the next.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from agentcoord.core.errors import Unavailable, store_unavailable
from agentcoord.core.models import StateEntry
from agentcoord.store import unit_of_work
from agentcoord.store.batching import EarlyAnswer, Outcome
from agentcoord.store.migrations import load_migrations, pending_migrations
from agentcoord.store.rows import (
    AGENT_COLUMNS,
    CHANGE_COLUMNS,
    REQUEST_COLUMNS,
    STATE_COLUMNS,
    SUBTASK_COLUMNS,
    SUBTASK_PROGRESS_COLUMNS,
    TASK_COLUMNS,
    Codec,
    to_utc,
)
from agentcoord.store.sql_store import SqlStore
from agentcoord.store.sqlite.cache import StateCache, Written

T = TypeVar("T")

BUSY_TIMEOUT = 30.0
"""Seconds a connection waits for another process's write lock before giving up."""
READ_BUSY_TIMEOUT = 0.2
"""Seconds a read waits when the file is locked (rare in WAL mode); it runs on the loop."""

CODEC = Codec(
    encode_time=lambda value: to_utc(value).isoformat(timespec="microseconds"),
    decode_time=datetime.fromisoformat,
)
"""Timestamps are ISO 8601 text in UTC, of one width so that text order is time order."""

_MIGRATIONS_PACKAGE = "agentcoord.store.sqlite"


class _ProcessLock:
    """The exclusive ``flock`` of one process on a database's ``<file>.lock``.

    Stores of one process on the same file share it (the tests run several servers in one
    process); it is released when the last of them closes, or when the process ends.
    """

    _held: ClassVar[dict[Path, _ProcessLock]] = {}

    def __init__(self, path: Path, fd: int) -> None:
        self._path = path
        self._fd = fd
        self._holders = 1
        self.opened = 1
        """Stores of this process that have shared the lock so far, the first included."""

    @property
    def alone(self) -> bool:
        """Whether one store holds the lock and no other has shared it since it took it."""
        return self._holders == 1 and self.opened == 1

    @classmethod
    def acquire(cls, database: Path) -> _ProcessLock:
        """Lock ``database`` for this process.

        Raises:
            Unavailable: another process holds the lock (its pid is in the message).
        """
        real = Path(os.path.realpath(database))
        path = real.with_name(real.name + ".lock")
        held = cls._held.get(path)
        if held is not None:
            held._holders += 1
            held.opened += 1
            return held
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise Unavailable(
                f"{database} is in use by another agentcoord process (pid {holder}): an SQLite "
                "store serves one process; stop that one, or use a postgresql:// store to run "
                "several"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        cls._held[path] = lock = cls(path, fd)
        return lock

    def release(self) -> None:
        """Let go of this holder's share; the last one unlocks the file."""
        self._holders -= 1
        if self._holders == 0:
            del self._held[self._path]
            os.close(self._fd)  # closing the only descriptor releases the flock


def _insert(table: str, columns: Sequence[str], verb: str = "INSERT") -> str:
    return f"{verb} INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def _upsert(table: str, columns: Sequence[str]) -> str:
    """Return an insert that replaces the row of the same key (the first column).

    Unlike INSERT OR REPLACE, a conflict on another unique index (a task's request id)
    fails instead of deleting the row that holds it.
    """
    key, *rest = columns
    updates = ", ".join(f"{column} = excluded.{column}" for column in rest)
    return f"{_insert(table, columns)} ON CONFLICT ({key}) DO UPDATE SET {updates}"


def _select(table: str, columns: Sequence[str], where: str) -> str:
    return f"SELECT {', '.join(columns)} FROM {table} WHERE {where}"


_IN_JSON = "IN (SELECT value FROM json_each(?))"
_LOAD_STATES = _select("states", STATE_COLUMNS, f"key {_IN_JSON}")
_LOAD_BOUND_STATES = _select("states", STATE_COLUMNS, f"agent_id {_IN_JSON} AND session_epoch > 0")
_LOAD_EXPIRED_STATES = _select("states", STATE_COLUMNS, "expire_time <= ?")
_LOAD_AGENTS = _select("agents", AGENT_COLUMNS, f"agent_id {_IN_JSON}")
_LOAD_REQUESTS = _select(
    "write_requests",
    REQUEST_COLUMNS,
    "(agent_id, request_id) IN"
    " (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))",
)
_IDS_IN_JSON = f"subtask_id {_IN_JSON}"
_LOAD_SUBTASKS = _select("subtasks", SUBTASK_COLUMNS, _IDS_IN_JSON)
_LOAD_DEPENDENTS = _select(
    "subtasks",
    SUBTASK_COLUMNS,
    "subtask_id IN (SELECT dependent.value FROM subtasks AS s,"
    f" json_each(s.body, '$.dependents') AS dependent WHERE s.{_IDS_IN_JSON})",
)
_LOAD_FAMILIES = _select(
    "subtasks",
    SUBTASK_COLUMNS,
    f"task_id IN (SELECT task_id FROM subtasks WHERE {_IDS_IN_JSON})",
)
_LOAD_TASK_SUBTASKS = _select("subtasks", SUBTASK_COLUMNS, f"task_id {_IN_JSON}")
# state = 'leased' as in the partial index subtasks_lease_agent, so that it is usable.
_LOAD_LEASED = _select(
    "subtasks", SUBTASK_COLUMNS, f"state = 'leased' AND lease_agent_id {_IN_JSON}"
)
_COUNT_LEASES = (
    "SELECT lease_agent_id, lease_epoch, count(*) FROM subtasks"
    f" WHERE state = 'leased' AND lease_agent_id {_IN_JSON} GROUP BY lease_agent_id, lease_epoch"
)
_LOAD_TASKS = _select("tasks", TASK_COLUMNS, f"task_id {_IN_JSON}")
# request_id <> '' as in the partial index tasks_submitter_request_id, so that it is usable.
_LOAD_TASKS_BY_REQUEST = _select(
    "tasks",
    TASK_COLUMNS,
    "(submitter, request_id) IN"
    " (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))"
    " AND request_id <> ''",
)
_LOAD_REVISION = "SELECT value FROM revision_counter WHERE id = 1"
_DELETE_STATE = "DELETE FROM states WHERE key = ?"
_SAVE_STATE = _insert("states", STATE_COLUMNS, "INSERT OR REPLACE")
_SAVE_AGENT = _insert("agents", AGENT_COLUMNS, "INSERT OR REPLACE")
_INSERT_REQUEST = _insert("write_requests", REQUEST_COLUMNS)
_INSERT_CHANGE = _insert("changes", CHANGE_COLUMNS)
_SAVE_TASK = _upsert("tasks", TASK_COLUMNS)
_INSERT_SUBTASK = _insert("subtasks", SUBTASK_COLUMNS)
_UPDATE_SUBTASK = (
    "UPDATE subtasks SET "
    + ", ".join(f"{column} = ?{n}" for n, column in enumerate(SUBTASK_PROGRESS_COLUMNS, 1) if n > 1)
    + " WHERE subtask_id = ?1"
)
_SET_REVISION = "UPDATE revision_counter SET value = ? WHERE id = 1"
_RECORD_HEARTBEAT = """
    UPDATE agents
    SET last_heartbeat_time = ?3, status = ?4, active_subtasks = ?5, held_subtask_ids = ?6
    WHERE agent_id = ?1 AND epoch = ?2
"""
_COMPACT = """
    UPDATE revision_counter
    SET compact_revision = max(
        compact_revision,
        -- In revision order (+time: not by the time index), so that it reads only what
        -- it drops, and stops at the first change it keeps.
        coalesce(
            (SELECT revision FROM changes WHERE +time >= ?1 ORDER BY revision LIMIT 1) - 1,
            value
        )
    )
    WHERE id = 1
    RETURNING compact_revision
"""
_DROP_CHANGES = "DELETE FROM changes WHERE revision <= ?"
_FORGET_REQUESTS = "DELETE FROM write_requests WHERE time < ?"
_STEPS = {
    unit_of_work.Step.BEGIN: "BEGIN IMMEDIATE",
    unit_of_work.Step.COMMIT: "COMMIT",
    unit_of_work.Step.ROLLBACK: "ROLLBACK",
    unit_of_work.Step.SAVEPOINT: "SAVEPOINT op",
    unit_of_work.Step.RELEASE: "RELEASE op",
    unit_of_work.Step.ROLLBACK_TO: "ROLLBACK TO op",
}
_CREATE_SCHEMA_MIGRATIONS = """
    CREATE TABLE IF NOT EXISTS schema_migrations (
        version INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        applied_at TEXT NOT NULL
    )
"""


def _connect(path: Path, timeout: float = BUSY_TIMEOUT) -> sqlite3.Connection:
    # isolation_level=None: the store issues BEGIN/COMMIT itself.
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
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


def _load(conn: sqlite3.Connection, needs: unit_of_work.Needs) -> unit_of_work.Loaded:
    """Read the revision counter and the rows ``needs`` covers."""
    states: dict[str, sqlite3.Row] = {}
    queries = (
        (_LOAD_STATES, sorted(needs.state_keys)),
        (_LOAD_BOUND_STATES, sorted(needs.bound_to)),
    )
    for sql, values in queries:
        if values:
            states.update((row["key"], row) for row in conn.execute(sql, (json.dumps(values),)))
    if needs.expired_at is not None:
        expired = conn.execute(_LOAD_EXPIRED_STATES, (CODEC.encode_time(needs.expired_at),))
        states.update((row["key"], row) for row in expired)
    agents = (
        conn.execute(_LOAD_AGENTS, (json.dumps(sorted(needs.agent_ids)),)).fetchall()
        if needs.agent_ids
        else []
    )
    requests = (
        conn.execute(_LOAD_REQUESTS, (json.dumps(sorted(needs.requests)),)).fetchall()
        if needs.requests
        else []
    )
    subtasks = _subtask_rows(conn, needs)
    of_subtasks = {row["task_id"] for row in subtasks}
    lease_counts = (
        conn.execute(_COUNT_LEASES, (json.dumps(sorted(needs.lease_counts)),)).fetchall()
        if needs.lease_counts
        else []
    )
    return unit_of_work.Loaded(
        revision=int(conn.execute(_LOAD_REVISION).fetchone()[0]),
        states=[CODEC.state_from_row(row) for row in states.values()],
        agents=[(CODEC.agent_from_row(row), row["token_hash"]) for row in agents],
        requests=[CODEC.request_from_row(row) for row in requests],
        subtasks=[CODEC.subtask_from_row(row) for row in subtasks],
        tasks=[CODEC.task_from_row(row) for row in _task_rows(conn, needs, of_subtasks)],
        lease_counts=[(agent_id, epoch, n) for agent_id, epoch, n in lease_counts],
    )


def _subtask_rows(conn: sqlite3.Connection, needs: unit_of_work.Needs) -> list[sqlite3.Row]:
    """Read every sub-task ``needs`` covers, each once."""
    rows: dict[str, sqlite3.Row] = {}
    queries = (
        (_LOAD_SUBTASKS, needs.subtask_ids),
        (_LOAD_DEPENDENTS, needs.dependents_of),
        (_LOAD_FAMILIES, needs.families_of),
        (_LOAD_TASK_SUBTASKS, needs.task_subtasks),
        (_LOAD_LEASED, needs.leased_by),
    )
    for sql, values in queries:
        if values:
            found = conn.execute(sql, (json.dumps(sorted(values)),))
            rows.update((row["subtask_id"], row) for row in found)
    return list(rows.values())


def _task_rows(
    conn: sqlite3.Connection, needs: unit_of_work.Needs, of_subtasks: set[str]
) -> list[sqlite3.Row]:
    """Read the tasks ``needs`` names and those of the loaded sub-tasks, each once."""
    rows: dict[str, sqlite3.Row] = {}
    queries = (
        (_LOAD_TASKS, needs.task_ids | of_subtasks),
        (_LOAD_TASKS_BY_REQUEST, needs.task_request_ids),
    )
    for sql, values in queries:
        if values:
            found = conn.execute(sql, (json.dumps(sorted(values)),))
            rows.update((row["task_id"], row) for row in found)
    return list(rows.values())


def _flush(conn: sqlite3.Connection, m: unit_of_work.Mutations) -> None:
    """Write what a run of operations changed."""
    conn.executemany(_DELETE_STATE, [(key,) for key in m.deleted_keys])
    conn.executemany(_SAVE_STATE, [CODEC.state_params(entry) for entry in m.states])
    conn.executemany(_SAVE_AGENT, [CODEC.agent_params(a, token) for a, token in m.agents])
    conn.executemany(_INSERT_REQUEST, [CODEC.request_params(r) for r in m.requests])
    conn.executemany(_INSERT_CHANGE, [CODEC.change_params(c) for c in m.changes])
    conn.executemany(_SAVE_TASK, [CODEC.task_params(task) for task in m.tasks])
    conn.executemany(_INSERT_SUBTASK, [CODEC.subtask_params(s) for s in m.new_subtasks])
    conn.executemany(_UPDATE_SUBTASK, [CODEC.subtask_progress_params(s) for s in m.subtasks])
    conn.execute(_SET_REVISION, (m.revision,))


def _execute(conn: sqlite3.Connection, op: unit_of_work.DirectOp) -> object:
    """Run a direct operation."""
    if isinstance(op, unit_of_work.RecordHeartbeats):
        conn.executemany(_RECORD_HEARTBEAT, [CODEC.heartbeat_params(r) for r in op.records])
        return None
    before = CODEC.encode_time(op.before)
    # fetchall: a RETURNING statement must run to completion before the next one.
    compact_revision = int(conn.execute(_COMPACT, (before,)).fetchall()[0][0])
    conn.execute(_DROP_CHANGES, (compact_revision,))
    conn.execute(_FORGET_REQUESTS, (before,))
    return compact_revision


_ROLLBACKS = frozenset({unit_of_work.Step.ROLLBACK, unit_of_work.Step.ROLLBACK_TO})


def _note(written: Written, request: unit_of_work.Request) -> None:
    """Note what ``request`` changes of the states, before it runs (writer thread)."""
    if isinstance(request, unit_of_work.Flush):
        written.keys.update(request.mutations.deleted_keys)
        written.keys.update(entry.key for entry in request.mutations.states)
        written.revision = request.mutations.revision
    elif isinstance(request, unit_of_work.Step) and request in _ROLLBACKS:
        written.rolled_back = True


def _step(conn: sqlite3.Connection, step: unit_of_work.Step) -> None:
    """Run a transaction control statement."""
    try:
        conn.execute(_STEPS[step])
    except sqlite3.OperationalError as exc:
        if step is not unit_of_work.Step.BEGIN:
            raise
        # Another process held the write lock longer than the busy timeout.
        raise Unavailable(f"the SQLite database is busy: {exc}") from exc


_FAILURES = {
    sqlite3.SQLITE_FULL: "DISK_FULL",
    sqlite3.SQLITE_READONLY: "READ_ONLY",
    sqlite3.SQLITE_PERM: "READ_ONLY",
    sqlite3.SQLITE_IOERR: "IO_ERROR",
    sqlite3.SQLITE_CANTOPEN: "IO_ERROR",
}
"""Kind of store failure of each primary SQLite result code that means "cannot write now"."""


def classify(error: BaseException) -> Unavailable | None:
    """Return the Unavailable a SQLite error means (disk full, read-only, I/O), else None."""
    code = getattr(error, "sqlite_errorcode", None)
    if not isinstance(error, sqlite3.Error) or code is None:
        return None
    failure = _FAILURES.get(code & 0xFF)
    return store_unavailable(failure, str(error)) if failure else None


class SqliteStore(SqlStore):
    """The :class:`~agentcoord.core.store.Store` on one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        """Use the database file at ``path`` (relative to the working directory)."""
        super().__init__("?", CODEC, classify)
        self.path = Path(path).absolute()
        """The database file."""
        self._writer: ThreadPoolExecutor | None = None
        self._write_conn: sqlite3.Connection | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._lock: _ProcessLock | None = None
        self._closed = False
        self._cache = StateCache()
        self._committing = False
        """Set by the writer thread just before a COMMIT, cleared on the loop once the
        cache has forgotten what that batch wrote: while set, reads bypass the cache."""

    def writes_alone(self) -> bool:
        """Whether this is the only store on the file since it was opened (see ``Store``)."""
        return self._lock is not None and self._lock.alone and not self._closed

    async def open(self) -> None:
        """Create the file and its folder if needed, lock it, and apply pending migrations.

        Raises:
            Unavailable: another process has the file open.
        """
        if self._writer is not None or self._closed:
            raise RuntimeError("a store is opened once")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _ProcessLock.acquire(self.path)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="agentcoord-sqlite-writer")
        try:
            self._write_conn = await self._on(self._writer, _connect_writer, self.path)
            await self._on(self._writer, _migrate, self._write_conn)
            self._read_conn = _connect(self.path, READ_BUSY_TIMEOUT)
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
        if self._read_conn is not None:
            self._read_conn.close()
        if self._writer is not None:
            if self._write_conn is not None:
                await self._on(self._writer, self._write_conn.close)
            self._writer.shutdown()
        self._write_conn = self._read_conn = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        # Reads run on the event loop: in WAL mode a read never waits for the writer, and
        # an indexed read costs less than handing it to a thread and back.
        if self._read_conn is None or self._closed:
            raise Unavailable("the store is not open")
        try:
            return self._read_conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as error:
            raise Unavailable(f"SQLite read failed: {error}") from error

    async def read_state(self, key: str) -> tuple[StateEntry | None, int]:
        """Return the current entry of ``key`` (or None) and the revision, in one read.

        Served from the cache of recently read entries unless a batch is committing
        (:mod:`agentcoord.store.sqlite.cache` says why that is exact).
        """
        cacheable = not self._committing and self.writes_alone()
        if cacheable:
            cached = self._cache.get(key)
            if cached is not None:
                return cached
        entry, revision = await super().read_state(key)
        if cacheable and not self._committing:  # no COMMIT began before the read ended
            self._cache.put(key, entry, revision)
        return entry, revision

    async def _run_batch(self, ops: list[unit_of_work.Op], answer: EarlyAnswer) -> list[Outcome]:
        assert self._writer is not None
        loop = asyncio.get_running_loop()

        def answer_on_loop(outcomes: Mapping[int, Outcome]) -> None:
            loop.call_soon_threadsafe(answer, outcomes)

        try:
            outcomes, written = await self._on(
                self._writer, self._commit_batch, ops, answer_on_loop
            )
            self._cache.written(written)
        except BaseException:
            self._cache.clear()
            raise
        finally:
            self._committing = False
        return outcomes

    def _commit_batch(
        self, ops: list[unit_of_work.Op], answer: EarlyAnswer
    ) -> tuple[list[Outcome], Written]:
        """Run the batch script of ``ops`` (writer thread); ``answer`` hands early outcomes over.

        Also returns what the batch wrote to the states, for the cache.
        """
        conn = self._write_conn
        assert conn is not None
        written = Written()
        performer = unit_of_work.Performer.on(conn, _step, _load, _flush, _execute, answer)

        def perform(request: unit_of_work.Request) -> object:
            _note(written, request)
            if request is unit_of_work.Step.COMMIT:
                self._committing = True  # from here on, readers may see the batch
            return performer(request)

        try:
            return unit_of_work.drive(unit_of_work.batch_script(ops), perform), written
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise

    @staticmethod
    async def _on(executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
