"""Pure rules of a state write: compare, apply, and the change log entries it makes.

The store loads the current entries of the keys a write names (locked, inside its
transaction), asks :func:`plan_write` what to do, and persists the plan in the same
transaction. Keeping the rules here, free of SQL, lets both back ends share them.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agentcoord.core.errors import Conflict, FailedPrecondition, NotFound
from agentcoord.core.models import (
    Compare,
    DeleteCommand,
    ModificationKind,
    ModifyCommand,
    NewChange,
    OperationResult,
    PutCommand,
    Service,
    StateChangeType,
    StateEntry,
    StateValue,
    StateWrite,
    StateWriteResult,
    ValueKind,
)


@dataclass(frozen=True, slots=True)
class PlannedChange:
    """A change log entry at a known revision."""

    revision: int
    """Its revision."""
    change: NewChange
    """What to append."""


@dataclass(slots=True)
class WritePlan:
    """What a store persists for one write."""

    upserts: dict[str, StateEntry] = field(default_factory=dict)
    """Entries to insert or replace, by key (the last state of each key)."""
    deletes: set[str] = field(default_factory=set)
    """Keys to delete."""
    changes: list[PlannedChange] = field(default_factory=list)
    """Change log entries, at consecutive revisions."""
    result: StateWriteResult = field(default_factory=lambda: StateWriteResult(0, ()))
    """What the caller receives."""


def keys_of(write: StateWrite) -> list[str]:
    """Return every key a write reads or changes, sorted (lock in this order)."""
    keys = {compare.key for compare in write.compares}
    keys.update(operation.key for operation in write.operations)
    return sorted(keys)


def _check(compare: Compare, index: int, entry: StateEntry | None) -> None:
    current_version = entry.version if entry is not None else 0
    if compare.version is not None:
        holds = current_version == compare.version
        wanted = f"version {compare.version}"
    elif compare.exists is not None:
        holds = (entry is not None) == compare.exists
        wanted = "existence" if compare.exists else "absence"
    else:
        holds = entry is not None and entry.value == compare.value
        wanted = "value"
    if holds:
        return
    metadata = {"key": compare.key, "current_version": str(current_version)}
    if compare.field:  # the expected_version of a PutState or DeleteState
        absent = " (must not exist)" if compare.version == 0 else ""
        message = (
            f"key {compare.key!r}: expected {wanted}{absent}, current version {current_version}"
        )
        metadata["field"] = compare.field
    else:
        message = (
            f"key {compare.key!r}: compare {index} wanted {wanted}, "
            f"current version is {current_version}"
        )
        metadata["failed_compare"] = str(index)
    raise Conflict(
        message,
        reason="VERSION_MISMATCH" if compare.version is not None else "COMPARE_FAILED",
        metadata=metadata,
        current=entry,
    )


def check_compares(write: StateWrite, current: Mapping[str, StateEntry]) -> None:
    """Check the comparisons of ``write`` against the ``current`` entries of its keys.

    Raises:
        Conflict: the first comparison that does not hold, carrying its key's entry.
    """
    for index, compare in enumerate(write.compares):
        _check(compare, index, current.get(compare.key))


def plan_write(
    write: StateWrite, current: Mapping[str, StateEntry], first_revision: int
) -> WritePlan:
    """Decide the effect of ``write`` on the ``current`` entries of its keys.

    Args:
        write: The write.
        current: The current entry of each key of the write that exists.
        first_revision: Revision of the first change; later changes follow it.

    Raises:
        Conflict: a comparison does not hold (nothing is written).
        NotFound: a delete names a missing key without ``allow_missing``.
    """
    check_compares(write, current)
    entries = dict(current)
    plan = WritePlan()
    results: list[OperationResult] = []
    revision = first_revision - 1
    for operation in write.operations:
        previous = entries.get(operation.key)
        if isinstance(operation, DeleteCommand):
            if previous is None:
                if not operation.allow_missing:
                    raise NotFound(
                        f"key: {operation.key!r} does not exist", reason="STATE_NOT_FOUND"
                    )
                results.append(OperationResult(None, None))
                continue
            revision += 1
            del entries[operation.key]
            plan.upserts.pop(operation.key, None)
            plan.deletes.add(operation.key)
            plan.changes.append(
                PlannedChange(
                    revision,
                    state_change(
                        StateChangeType.DELETE, operation.key, write.agent_id, None, previous
                    ),
                )
            )
            results.append(OperationResult(None, previous))
            continue
        revision += 1
        if isinstance(operation, ModifyCommand):
            entry = _modified(operation, previous, write.agent_id, revision, write.now)
        else:
            entry = _next_entry(previous, operation, write.agent_id, revision, write.now)
        entries[operation.key] = entry
        plan.upserts[operation.key] = entry
        plan.deletes.discard(operation.key)
        plan.changes.append(
            PlannedChange(
                revision,
                state_change(StateChangeType.PUT, operation.key, write.agent_id, entry, previous),
            )
        )
        results.append(OperationResult(entry, previous))
    last = revision if plan.changes else first_revision - 1
    plan.result = StateWriteResult(last, tuple(results))
    return plan


def _modified(
    operation: ModifyCommand,
    previous: StateEntry | None,
    agent_id: str,
    revision: int,
    now: datetime,
) -> StateEntry:
    """Return the entry after a modification.

    The value is new; metadata and expiry are kept, and the session binding too when the
    same agent wrote last (another agent's write ends it, as a put does).
    """
    value = modify_value(operation, previous)
    if previous is None:
        return _next_entry(None, PutCommand(operation.key, value), agent_id, revision, now)
    same_writer = previous.agent_id == agent_id
    kept = PutCommand(
        operation.key,
        value,
        previous.metadata,
        previous.expire_time,
        previous.session_epoch if same_writer else 0,
    )
    return _next_entry(previous, kept, agent_id, revision, now)


def _next_entry(
    previous: StateEntry | None, put: PutCommand, agent_id: str, revision: int, now: datetime
) -> StateEntry:
    return StateEntry(
        key=put.key,
        value=put.value,
        metadata=dict(put.metadata),
        version=previous.version + 1 if previous is not None else 1,
        create_revision=previous.create_revision if previous is not None else revision,
        mod_revision=revision,
        agent_id=agent_id,
        create_time=previous.create_time if previous is not None else now,
        update_time=now,
        expire_time=put.expire_time,
        session_epoch=put.session_epoch,
    )


# Modifications: values computed from the stored one


def canonical_json(value: Any) -> bytes:
    """Return the canonical JSON text of a plain value: sorted keys, no spaces, finite numbers.

    Raises:
        ValueError: a number is NaN or infinite.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


_MISSING_VALUE: dict[ModificationKind, Any] = {
    ModificationKind.INCREMENT: 0.0,
    ModificationKind.APPEND: [],
    ModificationKind.ADD_TO_SET: [],
    ModificationKind.REMOVE_FROM_SET: [],
    ModificationKind.MERGE_PATCH: None,
}
"""What each modification starts from when the key does not exist."""


def modify_value(operation: ModifyCommand, previous: StateEntry | None) -> StateValue:
    """Return the value ``operation`` makes of the ``previous`` entry's (None: missing key).

    Raises:
        FailedPrecondition: reason ``VALUE_TYPE_MISMATCH`` when the stored value is not of
            the type the operation works on (bytes, or a JSON string to increment...), or
            ``VALUE_TOO_LARGE`` when the result exceeds ``operation.max_bytes``; metadata
            ``field`` names the operation.
    """
    kind = operation.kind
    if previous is None:
        current = _MISSING_VALUE[kind]
    elif previous.value.kind is not ValueKind.JSON:
        raise _mismatch(operation, "bytes")
    else:
        current = json.loads(previous.value.data)
    if kind is ModificationKind.MERGE_PATCH:
        result = merge_patch(current, operation.operand)
    elif kind is ModificationKind.INCREMENT:
        if isinstance(current, bool) or not isinstance(current, int | float):
            raise _mismatch(operation, _json_type(current))
        result = float(current) + operation.operand
        if not math.isfinite(result):
            raise FailedPrecondition(
                f"{operation.field}: key {operation.key!r} would hold {result}, not a JSON number",
                reason="VALUE_TOO_LARGE",
                metadata={"field": operation.field, "key": operation.key},
            )
    elif not isinstance(current, list):
        raise _mismatch(operation, _json_type(current))
    elif kind is ModificationKind.APPEND:
        result = [*current, *operation.operand]
    elif kind is ModificationKind.ADD_TO_SET:
        result = list(current)
        held = {canonical_json(item) for item in current}
        for member in operation.operand:
            text = canonical_json(member)
            if text not in held:
                held.add(text)
                result.append(member)
    else:
        removed = {canonical_json(member) for member in operation.operand}
        result = [item for item in current if canonical_json(item) not in removed]
    data = canonical_json(result)
    if len(data) > operation.max_bytes:
        raise FailedPrecondition(
            f"{operation.field}: the value of key {operation.key!r} would be {len(data)} "
            f"bytes; at most {operation.max_bytes}",
            reason="VALUE_TOO_LARGE",
            metadata={"field": operation.field, "key": operation.key},
        )
    return StateValue(ValueKind.JSON, data)


_WORKS_ON = {
    ModificationKind.INCREMENT: "a number",
    ModificationKind.APPEND: "an array",
    ModificationKind.ADD_TO_SET: "an array",
    ModificationKind.REMOVE_FROM_SET: "an array",
    ModificationKind.MERGE_PATCH: "JSON",
}


def _mismatch(operation: ModifyCommand, held: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"{operation.field}: key {operation.key!r} holds {held}, not {_WORKS_ON[operation.kind]}",
        reason="VALUE_TYPE_MISMATCH",
        metadata={"field": operation.field, "key": operation.key, "held": held},
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def merge_patch(target: Any, patch: Any) -> Any:
    """Return ``target`` with the JSON merge ``patch`` applied (RFC 7396, section 2)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result


def plan_expiry(entries: Iterable[StateEntry], first_revision: int) -> list[PlannedChange]:
    """Return the change entries that delete expired or session-bound ``entries``."""
    return [
        PlannedChange(
            first_revision + offset,
            state_change(StateChangeType.EXPIRE, entry.key, "", None, entry),
        )
        for offset, entry in enumerate(entries)
    ]


def state_change(
    change_type: StateChangeType,
    key: str,
    agent_id: str,
    state: StateEntry | None,
    previous: StateEntry | None,
) -> NewChange:
    """Return the change log entry of one key change."""
    return NewChange(
        service=Service.STATESYNC,
        kind=change_type.change_kind,
        subject=key,
        agent_id=agent_id,
        details={
            "state": entry_to_snapshot(state) if state is not None else None,
            "previous": entry_to_snapshot(previous) if previous is not None else None,
        },
    )


def entry_to_snapshot(entry: StateEntry) -> dict[str, Any]:
    """Return the JSON-able form of an entry (binary values in base64)."""
    return {
        "key": entry.key,
        "kind": entry.value.kind.value,
        "data": base64.b64encode(entry.value.data).decode(),
        "metadata": dict(entry.metadata),
        "version": entry.version,
        "create_revision": entry.create_revision,
        "mod_revision": entry.mod_revision,
        "agent_id": entry.agent_id,
        "create_time": entry.create_time.isoformat(),
        "update_time": entry.update_time.isoformat(),
        "expire_time": entry.expire_time.isoformat() if entry.expire_time else None,
        "session_epoch": entry.session_epoch,
    }


def entry_from_snapshot(data: Mapping[str, Any]) -> StateEntry:
    """Rebuild an entry from :func:`entry_to_snapshot` output."""
    return StateEntry(
        key=data["key"],
        value=StateValue(ValueKind(data["kind"]), base64.b64decode(data["data"])),
        metadata=dict(data["metadata"]),
        version=int(data["version"]),
        create_revision=int(data["create_revision"]),
        mod_revision=int(data["mod_revision"]),
        agent_id=data["agent_id"],
        create_time=datetime.fromisoformat(data["create_time"]),
        update_time=datetime.fromisoformat(data["update_time"]),
        expire_time=datetime.fromisoformat(data["expire_time"]) if data["expire_time"] else None,
        session_epoch=int(data["session_epoch"]),
    )


def result_to_json(result: StateWriteResult) -> dict[str, Any]:
    """Return the JSON-able form of a write result, kept for idempotent repeats."""
    return {
        "revision": result.revision,
        "results": [
            {
                "state": entry_to_snapshot(r.state) if r.state else None,
                "previous": entry_to_snapshot(r.previous) if r.previous else None,
            }
            for r in result.results
        ],
    }


def result_from_json(data: Mapping[str, Any]) -> StateWriteResult:
    """Rebuild a write result from :func:`result_to_json` output."""
    return StateWriteResult(
        int(data["revision"]),
        tuple(
            OperationResult(
                entry_from_snapshot(r["state"]) if r["state"] else None,
                entry_from_snapshot(r["previous"]) if r["previous"] else None,
            )
            for r in data["results"]
        ),
    )
