"""Row codecs both back ends share below the SQL: records to query parameters and back.

JSON columns hold text in both back ends (SQLite TEXT, PostgreSQL jsonb exchanged as
text); state values are bytes (SQLite BLOB, PostgreSQL bytea). Timestamps differ: ISO 8601
text in SQLite, timestamptz in PostgreSQL; a :class:`Codec` carries that one difference.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

from agentcoord.core.models import (
    Agent,
    AgentCard,
    AgentState,
    AgentStatus,
    Change,
    HeartbeatRecord,
    Service,
    Skill,
    StateEntry,
    StateValue,
    StateWriteResult,
    ValueKind,
)
from agentcoord.core.state_rules import result_from_json, result_to_json
from agentcoord.core.tasks import Failure, Lease, Subtask, SubtaskState, Task, canonical_json

T = TypeVar("T")

AGENT_COLUMNS = (
    "agent_id",
    "name",
    "role",
    "capabilities",
    "capacity",
    "labels",
    "skills",
    "ttl",
    "state",
    "epoch",
    "status",
    "active_subtasks",
    "held_subtask_ids",
    "register_time",
    "last_heartbeat_time",
    "revision",
    "token_hash",
    "card",
)
"""Columns of the ``agents`` table, in the order of :meth:`Codec.agent_params`."""

CHANGE_COLUMNS = ("revision", "time", "service", "kind", "subject", "agent_id", "details")
"""Columns of the ``changes`` table, in the order of :meth:`Codec.change_params`."""

STATE_COLUMNS = (
    "key",
    "kind",
    "data",
    "metadata",
    "version",
    "create_revision",
    "mod_revision",
    "agent_id",
    "create_time",
    "update_time",
    "expire_time",
    "session_epoch",
)
"""Columns of the ``states`` table, in the order of :meth:`Codec.state_params`."""

REQUEST_COLUMNS = ("agent_id", "request_id", "result", "time")
"""Columns of the ``write_requests`` table, in the order of :meth:`Codec.request_params`."""

TASK_COLUMNS = (
    "task_id",
    "state",
    "submitter_agent_id",
    "submitter",
    "request_id",
    "create_time",
    "body",
)
"""Columns of the ``tasks`` table, in the order of :meth:`Codec.task_params`."""

SUBTASK_PROGRESS_COLUMNS = (
    "subtask_id",
    "state",
    "lease_agent_id",
    "waiting_on",
    "attempt",
    "burned_attempts",
    "fencing_token",
    "agent_id",
    "result",
    "last_failure",
    "next_attempt_time",
    "start_time",
    "end_time",
    "update_time",
    "revision",
    "lease_fencing_token",
    "lease_epoch",
    "lease_attempt",
    "lease_expire_time",
    "lease_ttl",
    "lease_claim_request_id",
)
"""The key and the columns of a sub-task that its transitions change, in the order of
:meth:`Codec.subtask_progress_params`: a transition updates these and nothing else."""

SUBTASK_COLUMNS = ("subtask_id", "task_id", "seq", "body", *SUBTASK_PROGRESS_COLUMNS[1:])
"""Columns of the ``subtasks`` table, in the order of :meth:`Codec.subtask_params`.

``body`` holds what never changes after the submission (:func:`subtask_spec_json`)."""

HEARTBEAT_PARAMS = (
    "agent_id",
    "epoch",
    "last_heartbeat_time",
    "status",
    "active_subtasks",
    "held_subtask_ids",
)
"""Order of :meth:`Codec.heartbeat_params`."""


class Row(Protocol):
    """A result row addressable by column name (``sqlite3.Row``, ``asyncpg.Record``)."""

    def __getitem__(self, key: str, /) -> Any:
        """Return the value of column ``key``."""
        ...


def to_utc(value: datetime) -> datetime:
    """Return an aware datetime in UTC.

    Raises:
        ValueError: ``value`` is naive; the store never guesses a time zone.
    """
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: the store needs timezone-aware times")
    return value.astimezone(UTC)


_dumps: Callable[[object], str] = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
"""Compact JSON text: ``json.dumps`` with these options, without a new encoder per call."""


@dataclass(frozen=True, slots=True)
class Codec:
    """Translates records to query parameters and rows back to records."""

    encode_time: Callable[[datetime], Any]
    """Turns an aware datetime into the back end's timestamp value."""
    decode_time: Callable[[Any], datetime]
    """Turns a stored timestamp back into an aware UTC datetime."""

    def _time_or_none(self, value: datetime | None) -> Any:
        return None if value is None else self.encode_time(value)

    def agent_params(self, agent: Agent, token_hash: str) -> tuple[Any, ...]:
        """Return the values of :data:`AGENT_COLUMNS` for ``agent``."""
        return (
            agent.agent_id,
            agent.name,
            agent.role,
            _dumps(list(agent.capabilities)),
            agent.capacity,
            _dumps(dict(agent.labels)),
            _dumps([skill.to_json() for skill in agent.skills]),
            agent.ttl,
            agent.state.value,
            agent.epoch,
            agent.status.value,
            agent.active_subtasks,
            _dumps(list(agent.held_subtask_ids)),
            self._time_or_none(agent.register_time),
            self._time_or_none(agent.last_heartbeat_time),
            agent.revision,
            token_hash,
            _dumps(agent.card.to_json()),
        )

    def agent_from_row(self, row: Row) -> Agent:
        """Rebuild an agent from a row holding :data:`AGENT_COLUMNS`."""
        register_time = row["register_time"]
        last_heartbeat_time = row["last_heartbeat_time"]
        return Agent(
            agent_id=row["agent_id"],
            name=row["name"],
            role=row["role"],
            capabilities=tuple(json.loads(row["capabilities"])),
            capacity=row["capacity"],
            labels=json.loads(row["labels"]),
            skills=tuple(Skill.from_json(skill) for skill in json.loads(row["skills"])),
            ttl=row["ttl"],
            state=AgentState(row["state"]),
            epoch=row["epoch"],
            status=AgentStatus(row["status"]),
            active_subtasks=row["active_subtasks"],
            held_subtask_ids=tuple(json.loads(row["held_subtask_ids"])),
            register_time=None if register_time is None else self.decode_time(register_time),
            last_heartbeat_time=(
                None if last_heartbeat_time is None else self.decode_time(last_heartbeat_time)
            ),
            revision=row["revision"],
            card=AgentCard.from_json(json.loads(row["card"])),
        )

    def change_params(self, change: Change) -> tuple[Any, ...]:
        """Return the values of :data:`CHANGE_COLUMNS` for ``change``."""
        return (
            change.revision,
            self.encode_time(change.time),
            change.service.value,
            change.kind,
            change.subject,
            change.agent_id,
            _dumps(change.details),
        )

    def change_from_row(self, row: Row) -> Change:
        """Rebuild a change from a row holding :data:`CHANGE_COLUMNS`."""
        return Change(
            revision=row["revision"],
            time=self.decode_time(row["time"]),
            service=Service(row["service"]),
            kind=row["kind"],
            subject=row["subject"],
            agent_id=row["agent_id"],
            details=json.loads(row["details"]),
        )

    def heartbeat_params(self, record: HeartbeatRecord) -> tuple[Any, ...]:
        """Return the values of :data:`HEARTBEAT_PARAMS` for ``record``."""
        return (
            record.agent_id,
            record.epoch,
            self.encode_time(record.last_heartbeat_time),
            record.status.value,
            record.active_subtasks,
            _dumps(list(record.held_subtask_ids)),
        )

    def state_params(self, entry: StateEntry) -> tuple[Any, ...]:
        """Return the values of :data:`STATE_COLUMNS` for ``entry``."""
        return (
            entry.key,
            entry.value.kind.value,
            entry.value.data,
            _dumps(dict(entry.metadata)),
            entry.version,
            entry.create_revision,
            entry.mod_revision,
            entry.agent_id,
            self.encode_time(entry.create_time),
            self.encode_time(entry.update_time),
            self._time_or_none(entry.expire_time),
            entry.session_epoch,
        )

    def state_from_row(self, row: Row) -> StateEntry:
        """Rebuild a state entry from a row holding :data:`STATE_COLUMNS`."""
        expire_time = row["expire_time"]
        return StateEntry(
            key=row["key"],
            value=StateValue(ValueKind(row["kind"]), bytes(row["data"])),
            metadata=json.loads(row["metadata"]),
            version=row["version"],
            create_revision=row["create_revision"],
            mod_revision=row["mod_revision"],
            agent_id=row["agent_id"],
            create_time=self.decode_time(row["create_time"]),
            update_time=self.decode_time(row["update_time"]),
            expire_time=None if expire_time is None else self.decode_time(expire_time),
            session_epoch=row["session_epoch"],
        )

    def request_params(self, request: WriteRequest) -> tuple[Any, ...]:
        """Return the values of :data:`REQUEST_COLUMNS` for a remembered write."""
        return (
            request.agent_id,
            request.request_id,
            _dumps(result_to_json(request.result)),
            self.encode_time(request.time),
        )

    def request_from_row(self, row: Row) -> WriteRequest:
        """Rebuild a remembered write from a row holding :data:`REQUEST_COLUMNS`."""
        return WriteRequest(
            row["agent_id"],
            row["request_id"],
            result_from_json(json.loads(row["result"])),
            self.decode_time(row["time"]),
        )

    def task_params(self, task: Task) -> tuple[Any, ...]:
        """Return the values of :data:`TASK_COLUMNS` for ``task``.

        ``body`` is the whole record (canonical JSON of its snapshot); the other columns
        copy fields of it for indexes and filters.
        """
        body = canonical_json(task.to_snapshot())
        _TASKS.keep(body, task)
        return (
            task.task_id,
            task.state.value,
            task.submitter_agent_id,
            task.submitter,
            task.request_id,
            self.encode_time(task.create_time),
            body,
        )

    def task_from_row(self, row: Row) -> Task:
        """Rebuild a task from the ``body`` of a row holding :data:`TASK_COLUMNS`."""
        return _TASKS.decoded(row["body"])

    def subtask_params(self, subtask: Subtask) -> tuple[Any, ...]:
        """Return the values of :data:`SUBTASK_COLUMNS` for ``subtask`` (a new row)."""
        progress = self.subtask_progress_params(subtask)
        return (
            subtask.subtask_id,
            subtask.task_id,
            subtask.seq,
            subtask_spec_json(subtask),
            *progress[1:],
        )

    def subtask_progress_params(self, subtask: Subtask) -> tuple[Any, ...]:
        """Return the values of :data:`SUBTASK_PROGRESS_COLUMNS` for ``subtask``.

        No JSON is encoded but a failure's: the result is canonical JSON text already.
        ``lease_agent_id`` is the lease holder while there is a lease, else empty; the
        ``lease_*`` columns are NULL without a lease.
        """
        lease = subtask.lease
        failure = subtask.last_failure
        encode_time = self.encode_time
        return (
            subtask.subtask_id,
            subtask.state.value,
            "" if lease is None else lease.agent_id,
            subtask.waiting_on,
            subtask.attempt,
            subtask.burned_attempts,
            subtask.fencing_token,
            subtask.agent_id,
            subtask.result,
            None if failure is None else _dumps(failure.to_snapshot()),
            None if subtask.next_attempt_time is None else encode_time(subtask.next_attempt_time),
            None if subtask.start_time is None else encode_time(subtask.start_time),
            None if subtask.end_time is None else encode_time(subtask.end_time),
            encode_time(subtask.update_time),
            subtask.revision,
            *(
                _NO_LEASE
                if lease is None
                else (
                    lease.fencing_token,
                    lease.epoch,
                    lease.attempt,
                    encode_time(lease.expire_time),
                    lease.ttl,
                    lease.claim_request_id,
                )
            ),
        )

    def subtask_from_row(self, row: Row) -> Subtask:
        """Rebuild a sub-task from a row holding :data:`SUBTASK_COLUMNS`."""
        decode_time = self.decode_time
        lease_epoch = row["lease_epoch"]
        failure = row["last_failure"]
        next_attempt_time = row["next_attempt_time"]
        start_time = row["start_time"]
        end_time = row["end_time"]
        return Subtask(
            subtask_id=row["subtask_id"],
            task_id=row["task_id"],
            seq=row["seq"],
            **_subtask_spec(row["body"]),
            waiting_on=row["waiting_on"],
            state=_SUBTASK_STATES[row["state"]],
            update_time=decode_time(row["update_time"]),
            attempt=row["attempt"],
            burned_attempts=row["burned_attempts"],
            lease=(
                None
                if lease_epoch is None
                else Lease(
                    subtask_id=row["subtask_id"],
                    fencing_token=row["lease_fencing_token"],
                    agent_id=row["lease_agent_id"],
                    epoch=lease_epoch,
                    attempt=row["lease_attempt"],
                    expire_time=decode_time(row["lease_expire_time"]),
                    ttl=row["lease_ttl"],
                    claim_request_id=row["lease_claim_request_id"],
                )
            ),
            fencing_token=row["fencing_token"],
            agent_id=row["agent_id"],
            result=row["result"],
            last_failure=None if failure is None else Failure.from_snapshot(json.loads(failure)),
            next_attempt_time=None if next_attempt_time is None else decode_time(next_attempt_time),
            start_time=None if start_time is None else decode_time(start_time),
            end_time=None if end_time is None else decode_time(end_time),
            revision=row["revision"],
        )


_NO_LEASE = (None,) * 6
"""The ``lease_*`` columns of a sub-task without a lease."""

_SUBTASK_STATES = {state.value: state for state in SubtaskState}


def subtask_spec_json(subtask: Subtask) -> str:
    """Return the ``body`` of a sub-task's row: JSON of the fields no transition changes."""
    return _dumps(subtask.spec_snapshot())


class _Decoded(Generic[T]):
    """Records decoded from stored JSON text, kept by that text (at most ``size``).

    Decoding is a function of the text alone, so a text met again (read again, or read
    back after this process wrote it) needs no decoding. Once full, it starts again empty.
    """

    def __init__(self, decode: Callable[[Any], T], size: int) -> None:
        self._decode = decode
        self._size = size
        self._records: dict[str, T] = {}

    def decoded(self, text: str) -> T:
        """Return the record of ``text``, decoding it if it is not kept."""
        record = self._records.get(text)
        if record is None:
            record = self._decode(json.loads(text))
            self.keep(text, record)
        return record

    def keep(self, text: str, record: T) -> None:
        """Keep ``record`` as the decoding of ``text`` (which it was encoded to)."""
        if len(self._records) >= self._size:
            self._records.clear()
        self._records[text] = record


_SPECS = _Decoded(Subtask.spec_fields, 16_384)
"""Decoded sub-task bodies: a body never changes, so a sub-task read again (its lease,
then its completion) is not decoded again."""
_TASKS = _Decoded(Task.from_snapshot, 1_024)
"""Decoded task bodies, with those this process wrote: a task is read and written by
every batch that moves one of its sub-tasks, and decoded at most once a version."""


def _subtask_spec(body: str) -> dict[str, Any]:
    """Decode a sub-task's ``body`` into its fields, or return them decoded before."""
    return _SPECS.decoded(body)


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """The result of a committed state write, kept so that a repeat returns it."""

    agent_id: str
    """The writer; empty for the admin."""
    request_id: str
    """The writer's idempotency key."""
    result: StateWriteResult
    """What the write returned."""
    time: datetime
    """Time of the write; compaction forgets requests older than its cut-off."""


def prefix_end(prefix: str) -> str | None:
    """Return the least string above every string that starts with ``prefix``.

    Keys starting with ``prefix`` are exactly those with ``prefix <= key < prefix_end``
    in code point order (which is UTF-8 byte order: SQLite's BINARY collation and
    PostgreSQL's "C"), so a prefix becomes an index range. None when there is no upper
    bound (empty prefix, or only U+10FFFF characters).
    """
    stripped = prefix.rstrip(chr(0x10FFFF))
    if not stripped:
        return None
    following = ord(stripped[-1]) + 1
    if 0xD800 <= following <= 0xDFFF:  # surrogates are not characters: skip them
        following = 0xE000
    return stripped[:-1] + chr(following)
