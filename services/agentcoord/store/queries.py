"""Read queries whose SQL is the same on both back ends, built with numbered placeholders.

SQLite writes a numbered parameter ``?1``, PostgreSQL ``$1``; everything else in these
statements is standard SQL that both run verbatim. Building them here keeps the logic
that turns a filter into conditions in one place. Prefixes become index ranges
(:func:`~agentcoord.store.rows.prefix_end`), which relies on code point order: SQLite's
default BINARY collation, and ``COLLATE "C"`` on PostgreSQL's ``states.key``,
``changes.kind`` and ``changes.subject``. Task ids (``COLLATE "C"`` too) break ties of
ListTasks' order in the same code point order on both back ends.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agentcoord.core.models import ChangeFilter, Service
from agentcoord.core.tasks import TaskCursor, TaskFilter
from agentcoord.store.rows import (
    AGENT_COLUMNS,
    CHANGE_COLUMNS,
    STATE_COLUMNS,
    SUBTASK_COLUMNS,
    TASK_COLUMNS,
    prefix_end,
)

_AGENTS = ", ".join(AGENT_COLUMNS)
_CHANGES = ", ".join(CHANGE_COLUMNS)
_STATES = ", ".join(STATE_COLUMNS)
_TASKS = ", ".join(TASK_COLUMNS)
_SUBTASKS = ", ".join(SUBTASK_COLUMNS)


@dataclass(frozen=True, slots=True)
class Statements:
    """Fixed read statements, with the back end's placeholders."""

    select_agent: str = f"SELECT {_AGENTS} FROM agents WHERE agent_id = $1"
    select_agents: str = f"SELECT {_AGENTS} FROM agents ORDER BY agent_id"
    select_agent_by_token: str = (
        f"SELECT {_AGENTS} FROM agents WHERE token_hash = $1 ORDER BY agent_id LIMIT 1"
    )
    select_state: str = (
        "SELECT counter.value AS revision, entry.* FROM revision_counter AS counter"
        f" LEFT JOIN (SELECT {_STATES} FROM states WHERE key = $1) AS entry ON true"
        " WHERE counter.id = 1"
    )
    revisions: str = "SELECT value, compact_revision FROM revision_counter WHERE id = 1"
    select_task: str = f"SELECT {_TASKS} FROM tasks WHERE task_id = $1"
    select_subtask: str = f"SELECT {_SUBTASKS} FROM subtasks WHERE subtask_id = $1"
    select_subtasks_of_task: str = (
        f"SELECT {_SUBTASKS} FROM subtasks WHERE task_id = $1 ORDER BY seq"
    )
    select_subtasks_page: str = (
        f"SELECT {_SUBTASKS} FROM subtasks WHERE task_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
    )
    select_open_subtasks: str = (
        # The condition is the one of the partial index subtasks_open, word for word.
        f"SELECT {_SUBTASKS} FROM subtasks WHERE state IN ('ready', 'leased') ORDER BY task_id, seq"
    )
    count_subtasks: str = "SELECT state, count(*) AS count FROM subtasks GROUP BY state"

    @classmethod
    def numbered(cls, marker: str) -> Statements:
        """Return the statements with ``$n`` placeholders written ``<marker>n``."""
        defaults = cls()
        return cls(
            **{
                name: re.sub(r"\$(\d+)", lambda m: marker + m[1], getattr(defaults, name))
                for name in cls.__dataclass_fields__
            }
        )


@dataclass(slots=True)
class Query:
    """A statement and its parameters."""

    marker: str
    """Placeholder prefix of the back end: ``?`` (SQLite) or ``$`` (PostgreSQL)."""
    params: list[Any] = field(default_factory=list)
    """Parameter values, in placeholder order."""
    sql: str = ""
    """The statement."""

    def param(self, value: Any) -> str:
        """Add ``value`` and return its placeholder."""
        self.params.append(value)
        return f"{self.marker}{len(self.params)}"

    def prefix(self, column: str, prefix: str, conditions: list[str]) -> None:
        """Add the conditions of ``column`` starting with ``prefix`` (an index range)."""
        if not prefix:
            return
        conditions.append(f"{column} >= {self.param(prefix)}")
        end = prefix_end(prefix)
        if end is not None:
            conditions.append(f"{column} < {self.param(end)}")


def select_changes(
    marker: str,
    after_revision: int,
    limit: int,
    where: ChangeFilter | None,
    encode_time: Callable[[datetime], Any],
    max_bytes: int = 0,
) -> Query:
    """Return the page of the change log after ``after_revision`` that passes ``where``.

    With ``max_bytes``, the page also ends before the change whose ``details`` would take
    the page's total text past ``max_bytes`` (it holds at least one change).
    """
    query = Query(marker)
    conditions = [f"revision > {query.param(after_revision)}"]
    if where is not None:
        if where.service is not None:
            conditions.append(f"service = {query.param(where.service.value)}")
        if where.kind.endswith("."):
            query.prefix("kind", where.kind, conditions)
        elif where.kind:
            conditions.append(f"kind = {query.param(where.kind)}")
        if where.subject:
            conditions.append(f"subject = {query.param(where.subject)}")
        query.prefix("subject", where.subject_prefix, conditions)
        if where.agent_id:
            conditions.append(f"agent_id = {query.param(where.agent_id)}")
        if where.start_time is not None:
            conditions.append(f"time >= {query.param(encode_time(where.start_time))}")
        if where.end_time is not None:
            conditions.append(f"time < {query.param(encode_time(where.end_time))}")
    query.sql = (
        f"SELECT {_CHANGES} FROM changes WHERE {' AND '.join(conditions)}"
        f" ORDER BY revision LIMIT {query.param(limit)}"
    )
    if max_bytes > 0:
        # The running total covers only the page's rows (the inner LIMIT runs first).
        size = "LENGTH(CAST(details AS TEXT))"
        query.sql = (
            f"SELECT {_CHANGES} FROM (SELECT {_CHANGES}, {size} AS size,"
            f" SUM({size}) OVER (ORDER BY revision) AS running FROM ({query.sql}) AS page)"
            f" AS sized WHERE running - size < {query.param(max_bytes)} ORDER BY revision"
        )
    return query


def select_states_page(marker: str, prefix: str, after_key: str, limit: int) -> Query:
    """Return a page of entries under ``prefix`` and the current revision, in one statement.

    One statement reads one snapshot, so the entries are exactly those at the returned
    revision. Each row carries ``revision``; with no entry, one row of NULL columns
    carries it.
    """
    query = Query(marker)
    conditions: list[str] = []
    if after_key:
        conditions.append(f"key > {query.param(after_key)}")
    query.prefix("key", prefix, conditions)
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    query.sql = (
        f"SELECT counter.value AS revision, page.* FROM revision_counter AS counter"
        f" LEFT JOIN (SELECT {_STATES} FROM states {where}"
        f" ORDER BY key LIMIT {query.param(limit)}) AS page ON true"
        " WHERE counter.id = 1 ORDER BY page.key"
    )
    return query


def state_changed_since(marker: str, prefix: str, revision: int) -> Query:
    """Return whether a key under ``prefix`` changed after ``revision`` (column ``changed``).

    True as well when the change log was compacted past ``revision``: what it dropped
    can no longer be checked.
    """
    query = Query(marker)
    after = query.param(revision)
    conditions = [f"revision > {after}", f"service = {query.param(Service.STATESYNC.value)}"]
    query.prefix("subject", prefix, conditions)
    query.sql = (
        f"SELECT (counter.compact_revision > {after} OR EXISTS (SELECT 1 FROM changes"
        f" WHERE {' AND '.join(conditions)})) AS changed"
        " FROM revision_counter AS counter WHERE counter.id = 1"
    )
    return query


def select_agents_by_id(marker: str, agent_ids: Sequence[str]) -> Query:
    """Return the agents with these ids (at most :data:`MAX_IDS` of them), by agent id."""
    query = Query(marker)
    ids = ", ".join(query.param(agent_id) for agent_id in agent_ids)
    query.sql = f"SELECT {_AGENTS} FROM agents WHERE agent_id IN ({ids}) ORDER BY agent_id"
    return query


def select_subtasks(marker: str, subtask_ids: Sequence[str]) -> Query:
    """Return the sub-tasks with these ids (at most :data:`MAX_IDS` of them), in task order."""
    query = Query(marker)
    ids = ", ".join(query.param(subtask_id) for subtask_id in subtask_ids)
    query.sql = f"SELECT {_SUBTASKS} FROM subtasks WHERE subtask_id IN ({ids}) ORDER BY seq"
    return query


MAX_IDS = 500
"""Ids one ``IN`` list holds at most (SQLite allows 32,766 parameters)."""


def select_tasks_page(
    marker: str,
    where: TaskFilter,
    after: TaskCursor | None,
    limit: int,
    encode_time: Callable[[datetime], Any],
) -> Query:
    """Return the page of tasks passing ``where`` after ``after``, newest first.

    Order: ``create_time`` descending, then ``task_id`` descending; the cursor is the
    last task of the previous page, so the page starts strictly after it.
    """
    query = Query(marker)
    conditions: list[str] = []
    if where.states:
        values = sorted(state.value for state in where.states)
        states = ", ".join(query.param(value) for value in values)
        conditions.append(f"state IN ({states})")
    if where.submitter_agent_id:
        conditions.append(f"submitter_agent_id = {query.param(where.submitter_agent_id)}")
    if after is not None:
        conditions.append(
            f"(create_time, task_id) < ({query.param(encode_time(after.create_time))},"
            f" {query.param(after.task_id)})"
        )
    filtered = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    query.sql = (
        f"SELECT {_TASKS} FROM tasks {filtered}"
        f" ORDER BY create_time DESC, task_id DESC LIMIT {query.param(limit)}"
    )
    return query
