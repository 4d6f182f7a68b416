"""PostgreSQL back end, on an asyncpg connection pool.

Writes go through group commit: the batch writer holds one pooled connection for a batch
and runs its batch script (:mod:`agentcoord.store.unit_of_work`), committing once with the
server's default ``synchronous_commit=on``. Every batch first locks the single
``revision_counter`` row, so writers of all replicas take turns and commit in revision
order; rows read after that lock cannot change before the commit, so they need no row
locks of their own. A batch costs four round trips however many operations it holds:
BEGIN with the lock, one Load (one statement returning every row the operations need,
as arrays of table rows), one Flush (one statement of data-modifying CTEs over ``unnest``
arrays, which also NOTIFYs the batch's last revision), and COMMIT. Reads use any other
pooled connection; a dedicated one LISTENs for the commits of other processes
(:mod:`agentcoord.store.postgres.follow`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

import asyncpg

from agentcoord.core.errors import InvalidInput, Unavailable, store_unavailable
from agentcoord.store import unit_of_work
from agentcoord.store.batching import EarlyAnswer, Outcome
from agentcoord.store.migrations import load_migrations, pending_migrations
from agentcoord.store.postgres.follow import Follower, channel_name
from agentcoord.store.postgres.leader import Leadership, leader_key
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

CODEC = Codec(encode_time=to_utc, decode_time=to_utc)
"""Timestamps are timestamptz; asyncpg exchanges them as aware datetimes."""

MIGRATION_LOCK = 0x61676E74636F6F72
"""Key of the advisory lock that serialises migrations of replicas starting together."""

_MIGRATIONS_PACKAGE = "agentcoord.store.postgres"
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_CONNECTION_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError)


def _typed(columns: Sequence[str], types: str) -> dict[str, str]:
    """Pair each column with its SQL type, from a space-separated list of types."""
    return dict(zip(columns, types.split(" "), strict=True))


_STATE_TYPES = _typed(
    STATE_COLUMNS,
    "text text bytea jsonb bigint bigint bigint text timestamptz timestamptz timestamptz bigint",
)
_AGENT_TYPES = _typed(
    AGENT_COLUMNS,
    "text text text jsonb integer jsonb jsonb float8 text bigint text integer jsonb"
    " timestamptz timestamptz bigint text jsonb",
)
_REQUEST_TYPES = _typed(REQUEST_COLUMNS, "text text jsonb timestamptz")
_CHANGE_TYPES = _typed(CHANGE_COLUMNS, "bigint timestamptz text text text text jsonb")
_TASK_TYPES = _typed(TASK_COLUMNS, "text text text text text timestamptz jsonb")
_SUBTASK_PROGRESS_TYPES = _typed(
    SUBTASK_PROGRESS_COLUMNS,
    "text text text integer integer integer bigint text text jsonb timestamptz timestamptz"
    " timestamptz timestamptz bigint bigint bigint integer timestamptz float8 text",
)
_SUBTASK_TYPES = _typed(
    SUBTASK_COLUMNS,
    " ".join(["text text integer jsonb", *list(_SUBTASK_PROGRESS_TYPES.values())[1:]]),
)


class _Numbers:
    """Hands out ``$n`` placeholders in order."""

    def __init__(self) -> None:
        self.count = 0

    def next(self, cast_to: str = "") -> str:
        self.count += 1
        return f"${self.count}::{cast_to}" if cast_to else f"${self.count}"


def _insert_unnest(numbers: _Numbers, table: str, types: dict[str, str], conflict: str = "") -> str:
    """Return an INSERT of one row per element of one array parameter per column."""
    columns = ", ".join(types)
    arrays = ", ".join(numbers.next(f"{kind}[]") for kind in types.values())
    sql = f"INSERT INTO {table} ({columns}) SELECT * FROM unnest({arrays})"
    if conflict:
        rest = [column for column in types if column != conflict]
        sql += (
            f" ON CONFLICT ({conflict}) DO UPDATE SET ({', '.join(rest)})"
            f" = ({', '.join(f'excluded.{column}' for column in rest)})"
        )
    return sql


def _update_unnest(numbers: _Numbers, table: str, types: dict[str, str]) -> str:
    """Return an UPDATE of the rows keyed by the first column, one per array element."""
    key, *rest = types
    arrays = ", ".join(numbers.next(f"{kind}[]") for kind in types.values())
    return (
        f"UPDATE {table} AS r SET ({', '.join(rest)})"
        f" = ({', '.join(f'u.{column}' for column in rest)})"
        f" FROM unnest({arrays}) AS u({', '.join(types)}) WHERE r.{key} = u.{key}"
    )


def _flush_statement() -> str:
    """The Flush statement; its last three parameters are the counter, channel and payload.

    The NOTIFY is sent only with a payload (a run that appended changes), and PostgreSQL
    delivers it only if the batch commits.
    """
    numbers = _Numbers()
    ctes = (
        f"WITH deleted AS (DELETE FROM states WHERE key = ANY({numbers.next('text[]')})),"
        f" put AS ({_insert_unnest(numbers, 'states', _STATE_TYPES, 'key')}),"
        f" saved AS ({_insert_unnest(numbers, 'agents', _AGENT_TYPES, 'agent_id')}),"
        f" remembered AS ({_insert_unnest(numbers, 'write_requests', _REQUEST_TYPES)}),"
        f" logged AS ({_insert_unnest(numbers, 'changes', _CHANGE_TYPES)}),"
        f" tasked AS ({_insert_unnest(numbers, 'tasks', _TASK_TYPES, 'task_id')}),"
        f" subtasked AS ({_insert_unnest(numbers, 'subtasks', _SUBTASK_TYPES)}),"
        f" progressed AS ({_update_unnest(numbers, 'subtasks', _SUBTASK_PROGRESS_TYPES)}),"
        f" counted AS (UPDATE revision_counter SET value = {numbers.next()} WHERE id = 1)"
    )
    channel, payload = numbers.next("text"), numbers.next("text")
    return f"{ctes} SELECT pg_notify({channel}, {payload}) WHERE {payload} IS NOT NULL"


_FLUSH = _flush_statement()
_BEGIN = """
    BEGIN;
    SET LOCAL plan_cache_mode = force_generic_plan;
    SET LOCAL enable_seqscan = off;
    SELECT 1 FROM revision_counter WHERE id = 1 FOR UPDATE;
"""
"""One round trip: start the batch's transaction and lock the revision counter.

A generic plan is made once per connection and statement: planning Load and Flush anew for
every batch (what PostgreSQL does for the first executions, and whenever it guesses a custom
plan is cheaper) cost more than running them. Every statement of a batch is an index
lookup, so sequential scans are off: a generic plan made while a table was small must not
stay a sequential scan once the table has grown."""
_LOAD = """
    WITH loaded AS MATERIALIZED (
        SELECT s FROM subtasks AS s
        WHERE s.subtask_id = ANY(ARRAY(
            SELECT unnest($7::text[])
            UNION ALL
            SELECT jsonb_array_elements_text(d.body -> 'dependents')
            FROM subtasks AS d WHERE d.subtask_id = ANY($8::text[])
            UNION ALL
            SELECT f.subtask_id FROM subtasks AS f
            WHERE f.task_id = ANY(ARRAY(
                SELECT o.task_id FROM subtasks AS o WHERE o.subtask_id = ANY($9::text[])
            ))
            UNION ALL
            SELECT t.subtask_id FROM subtasks AS t WHERE t.task_id = ANY($10::text[])
            UNION ALL
            SELECT l.subtask_id FROM subtasks AS l
            WHERE l.state = 'leased' AND l.lease_agent_id = ANY($11::text[])
        ))
    ),
    held AS MATERIALIZED (
        SELECT h.lease_agent_id AS agent_id, h.lease_epoch AS epoch, count(*)::bigint AS n
        FROM subtasks AS h
        WHERE h.state = 'leased' AND h.lease_agent_id = ANY($15::text[])
        GROUP BY h.lease_agent_id, h.lease_epoch
    )
    SELECT
        (SELECT value FROM revision_counter WHERE id = 1) AS revision,
        ARRAY(SELECT s FROM states AS s WHERE s.key = ANY($1::text[])) AS keyed,
        ARRAY(
            SELECT s FROM states AS s
            WHERE s.agent_id = ANY($2::text[]) AND s.session_epoch > 0
        ) AS bound,
        ARRAY(SELECT s FROM states AS s WHERE s.expire_time <= $3) AS expired,
        ARRAY(SELECT a FROM agents AS a WHERE a.agent_id = ANY($4::text[])) AS agents,
        ARRAY(
            SELECT w FROM write_requests AS w
            WHERE (w.agent_id, w.request_id) IN (SELECT * FROM unnest($5::text[], $6::text[]))
        ) AS requests,
        ARRAY(SELECT loaded.s FROM loaded) AS subtasks,
        ARRAY(
            SELECT t FROM tasks AS t
            WHERE t.task_id = ANY(ARRAY(
                SELECT unnest($12::text[]) UNION ALL SELECT (loaded.s).task_id FROM loaded
            ))
        ) AS tasks,
        ARRAY(
            SELECT t FROM tasks AS t
            WHERE (t.submitter, t.request_id) IN (SELECT * FROM unnest($13::text[], $14::text[]))
            AND t.request_id <> ''
        ) AS requested_tasks,
        ARRAY(SELECT held.agent_id FROM held ORDER BY held.agent_id, held.epoch) AS held_agents,
        ARRAY(SELECT held.epoch FROM held ORDER BY held.agent_id, held.epoch) AS held_epochs,
        ARRAY(SELECT held.n FROM held ORDER BY held.agent_id, held.epoch) AS held_counts
"""
"""One statement reads every row a run of operations needs.

Sub-tasks (``loaded``) are the union of what each field of Needs covers: the dependents
come from the ``dependents`` array of the named sub-tasks' bodies, the families and a
task's sub-tasks by the (task_id, seq) index, the leases of agents by the partial index
on ``lease_agent_id`` (hence ``state = 'leased'`` written out); ``held`` counts the leases
of each session of the agents whose leases are counted, by the same index, in three
arrays of one order. Tasks are those named,
those of the loaded sub-tasks, and those of the request ids asked for; a task found both
ways comes twice, and :func:`_load` keeps it once."""
_RECORD_HEARTBEAT = """
    UPDATE agents
    SET last_heartbeat_time = $3, status = $4, active_subtasks = $5, held_subtask_ids = $6
    WHERE agent_id = $1 AND epoch = $2
"""
_COMPACT = """
    WITH cut AS (
        UPDATE revision_counter
        SET compact_revision = GREATEST(
            compact_revision,
            coalesce(
                (SELECT revision FROM changes WHERE time >= $1 ORDER BY revision LIMIT 1) - 1,
                value
            )
        )
        WHERE id = 1
        RETURNING compact_revision
    ),
    dropped AS (DELETE FROM changes WHERE revision <= (SELECT compact_revision FROM cut)),
    forgotten AS (DELETE FROM write_requests WHERE time < $1)
    SELECT compact_revision FROM cut
"""
_STEPS = {
    unit_of_work.Step.BEGIN: _BEGIN,
    unit_of_work.Step.COMMIT: "COMMIT",
    unit_of_work.Step.ROLLBACK: "ROLLBACK",
    unit_of_work.Step.SAVEPOINT: "SAVEPOINT op",
    unit_of_work.Step.RELEASE: "RELEASE SAVEPOINT op",
    unit_of_work.Step.ROLLBACK_TO: "ROLLBACK TO SAVEPOINT op",
}
_CREATE_SCHEMA_MIGRATIONS = """
    CREATE TABLE IF NOT EXISTS schema_migrations (
        version integer PRIMARY KEY,
        name text NOT NULL,
        applied_at timestamptz NOT NULL DEFAULT now()
    )
"""


_FAILURE_CLASSES = {
    "08": "CONNECTION_LOST",  # connection exception
    "53": "INSUFFICIENT_RESOURCES",  # disk full, out of memory, too many connections
    "57": "CONNECTION_LOST",  # operator intervention: shutdown, terminated backend
    "58": "IO_ERROR",  # system error
}
"""Kind of store failure of each SQLSTATE class that means "cannot serve now"."""
_FAILURE_STATES = {"53100": "DISK_FULL", "25006": "READ_ONLY"}
"""Kinds of single SQLSTATEs, ahead of their classes."""


def classify(error: BaseException) -> Unavailable | None:
    """Return the Unavailable a driver error means (connection lost, disk full...), else None."""
    if isinstance(error, _CONNECTION_ERRORS) or (
        isinstance(error, asyncpg.InterfaceError) and "connection" in str(error)
    ):
        return store_unavailable("CONNECTION_LOST", f"PostgreSQL is unreachable: {error}")
    if not isinstance(error, asyncpg.PostgresError):
        return None
    state = str(getattr(error, "sqlstate", "") or "")
    failure = _FAILURE_STATES.get(state) or _FAILURE_CLASSES.get(state[:2])
    return store_unavailable(failure, f"PostgreSQL: {error}") if failure else None


@contextmanager
def _unavailable_on_disconnect() -> Iterator[None]:
    """Report a lost or refused connection (or a full disk...) as :class:`Unavailable`."""
    try:
        yield
    except Exception as exc:
        unavailable = classify(exc)
        if unavailable is None:
            raise
        raise unavailable from exc


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Return the columns of ``rows`` (each a list), for ``unnest`` parameters."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width


async def _load(conn: asyncpg.Connection, needs: unit_of_work.Needs) -> unit_of_work.Loaded:
    """Read the revision counter and the rows ``needs`` covers, in one statement."""
    requests = sorted(needs.requests)
    requested_tasks = sorted(needs.task_request_ids)
    row = await conn.fetchrow(
        _LOAD,
        sorted(needs.state_keys),
        sorted(needs.bound_to),
        needs.expired_at,
        sorted(needs.agent_ids),
        [agent_id for agent_id, _ in requests],
        [request_id for _, request_id in requests],
        sorted(needs.subtask_ids),
        sorted(needs.dependents_of),
        sorted(needs.families_of),
        sorted(needs.task_subtasks),
        sorted(needs.leased_by),
        sorted(needs.task_ids),
        [submitter for submitter, _ in requested_tasks],
        [request_id for _, request_id in requested_tasks],
        sorted(needs.lease_counts),
    )
    states = {s["key"]: s for part in ("keyed", "bound", "expired") for s in row[part]}
    tasks = {t["task_id"]: t for part in ("tasks", "requested_tasks") for t in row[part]}
    return unit_of_work.Loaded(
        revision=row["revision"],
        states=[CODEC.state_from_row(state) for state in states.values()],
        agents=[(CODEC.agent_from_row(a), a["token_hash"]) for a in row["agents"]],
        requests=[CODEC.request_from_row(r) for r in row["requests"]],
        subtasks=[CODEC.subtask_from_row(s) for s in row["subtasks"]],
        tasks=[CODEC.task_from_row(t) for t in tasks.values()],
        lease_counts=list(
            zip(row["held_agents"], row["held_epochs"], row["held_counts"], strict=True)
        ),
    )


async def _flush(
    conn: asyncpg.Connection, m: unit_of_work.Mutations, *, follower: Follower
) -> None:
    """Write what a run of operations changed, and NOTIFY its last revision, in one statement."""
    await conn.execute(
        _FLUSH,
        list(m.deleted_keys),
        *_columns([CODEC.state_params(e) for e in m.states], len(STATE_COLUMNS)),
        *_columns([CODEC.agent_params(a, t) for a, t in m.agents], len(AGENT_COLUMNS)),
        *_columns([CODEC.request_params(r) for r in m.requests], len(REQUEST_COLUMNS)),
        *_columns([CODEC.change_params(c) for c in m.changes], len(CHANGE_COLUMNS)),
        *_columns([CODEC.task_params(t) for t in m.tasks], len(TASK_COLUMNS)),
        *_columns([CODEC.subtask_params(s) for s in m.new_subtasks], len(SUBTASK_COLUMNS)),
        *_columns(
            [CODEC.subtask_progress_params(s) for s in m.subtasks], len(SUBTASK_PROGRESS_COLUMNS)
        ),
        m.revision,
        follower.channel,
        follower.notice(m.changes[-1].revision) if m.changes else None,
    )


async def _execute(conn: asyncpg.Connection, op: unit_of_work.DirectOp) -> object:
    """Run a direct operation."""
    if isinstance(op, unit_of_work.RecordHeartbeats):
        await conn.executemany(_RECORD_HEARTBEAT, [CODEC.heartbeat_params(r) for r in op.records])
        return None
    return int(await conn.fetchval(_COMPACT, op.before))


async def _step(conn: asyncpg.Connection, step: unit_of_work.Step) -> None:
    """Run a transaction control statement."""
    await conn.execute(_STEPS[step])


async def _reset(conn: asyncpg.Connection) -> None:
    """Make a connection returned to the pool reusable, without a round trip if it is.

    asyncpg's default reset runs a query on every release (unlocking advisory locks,
    closing cursors, UNLISTEN, RESET ALL), one more round trip per read and per batch.
    Pooled connections here take no session-level locks, cursors, listeners or
    settings (SET LOCAL ends with its transaction), so only an open transaction needs
    undoing.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def _abandon(conn: asyncpg.Connection) -> None:
    """Roll back what a failed batch left open, or drop the connection if that fails."""
    if conn.is_closed() or not conn.is_in_transaction():
        return
    try:
        await conn.execute("ROLLBACK")
    except Exception:  # the caller re-raises the batch's own error; this one would hide it
        conn.terminate()


class PostgresStore(SqlStore):
    """The :class:`~agentcoord.core.store.Store` on a PostgreSQL database."""

    shared = True
    """Replicas share one database; their commits reach the listeners through NOTIFY."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        min_size: int = 2,
        max_size: int = 10,
        leader_interval: float = 1.0,
    ) -> None:
        """Connect with ``dsn`` to the tables in ``schema`` (created if missing).

        Args:
            dsn: A ``postgresql://`` connection URL for asyncpg.
            schema: Schema holding the tables; None for the server's default search path.
            min_size: Connections the pool keeps open.
            max_size: Connections the pool opens at most.
            leader_interval: Seconds between a follower's tries to take the leadership
                (:mod:`agentcoord.store.postgres.leader`), and between the leader's checks
                of its lock connection.

        Raises:
            InvalidInput: ``schema`` is not a plain SQL identifier (field ``store``).
        """
        if schema is not None and not _SCHEMA_NAME.fullmatch(schema):
            raise InvalidInput("store", f"schema {schema!r} is not a plain SQL identifier")
        super().__init__("$", CODEC, classify)
        self._dsn = dsn
        self._schema = None if schema is None else f'"{schema}"'
        self._min_size = min_size
        self._max_size = max_size
        self._settings = {} if self._schema is None else {"search_path": self._schema}
        self._pool: asyncpg.Pool | None = None
        self._follower = Follower(
            self._dedicated_connection, self.list_changes, self._writes.announce
        )
        self._leadership = Leadership(self._dedicated_connection, leader_interval)
        self._closed = False

    def hears_every_commit(self) -> bool:
        """Whether the follower listens for the other stores' commits right now."""
        return self._follower.listening

    def is_leader(self) -> bool:
        """Whether this store holds the leader's advisory lock of its schema."""
        return self._leadership.is_leader()

    async def open(self) -> None:
        """Connect the pool, apply migrations, follow other processes' commits, try to lead."""
        if self._pool is not None or self._closed:
            raise RuntimeError("a store is opened once")
        with _unavailable_on_disconnect():
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                server_settings=self._settings,
                reset=_reset,
            )
            try:
                async with self._pool.acquire() as conn:
                    await self._migrate(conn)
                    schema = await conn.fetchval("SELECT current_schema()")
                    revision = await conn.fetchval(self._sql.revisions)
            except BaseException:
                await self._pool.close()
                raise
        self._writes.add_listener(self._follower.saw)
        self._follower.start(channel_name(schema), revision)
        await self._leadership.start(leader_key(schema))
        self._writes.start()

    async def _dedicated_connection(self) -> asyncpg.Connection:
        return await asyncpg.connect(self._dsn, server_settings=self._settings)

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
        await self._leadership.close()
        await self._follower.close()
        await self._writes.close()
        if self._pool is not None:
            await self._pool.close()

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[asyncpg.Record]:
        if self._pool is None or self._closed:
            raise Unavailable("the store is not open")
        with _unavailable_on_disconnect():
            return cast(list[asyncpg.Record], await self._pool.fetch(sql, *params))

    async def _run_batch(self, ops: list[unit_of_work.Op], answer: EarlyAnswer) -> list[Outcome]:
        """Run the batch script of ``ops`` on one pooled connection."""
        assert self._pool is not None

        async def answer_now(outcomes: Mapping[int, Outcome]) -> None:
            answer(outcomes)

        with _unavailable_on_disconnect():
            async with self._pool.acquire() as conn:
                try:
                    flush = functools.partial(_flush, follower=self._follower)
                    performer = unit_of_work.Performer.on(
                        conn, _step, _load, flush, _execute, answer_now
                    )
                    return await unit_of_work.drive_async(unit_of_work.batch_script(ops), performer)
                except BaseException:
                    await _abandon(conn)
                    raise
