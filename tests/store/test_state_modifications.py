"""Server-side modifications of state values, run on SQLite and PostgreSQL (``store_url``).

A modification (increment, append, set add/remove, JSON merge patch) is computed from the
value stored when its write commits, so concurrent writers never conflict and none is lost.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest

from agentcoord.core.errors import Conflict, FailedPrecondition
from agentcoord.core.models import (
    Compare,
    ModificationKind,
    ModifyCommand,
    PutCommand,
    StateValue,
    ValueKind,
)
from agentcoord.core.state_rules import entry_to_snapshot
from agentcoord.core.store import Store
from tests.store.helpers import all_changes
from tests.store.test_state_store import NOW, put, value, write

LIMIT = 1024 * 1024


def modify(key: str, kind: str, operand: Any, max_bytes: int = LIMIT) -> ModifyCommand:
    return ModifyCommand(key, ModificationKind(kind), operand, max_bytes, f"modification.{kind}")


async def json_of(store: Store, key: str) -> Any:
    entry = await store.get_state(key)
    assert entry is not None and entry.value.kind is ValueKind.JSON
    return json.loads(entry.value.data)


async def test_increment_starts_from_zero_and_adds(store: Store) -> None:
    first = await store.write_states(write(modify("shared/n", "increment", 2.0), agent_id="a"))
    second = await store.write_states(write(modify("shared/n", "increment", -0.5), agent_id="b"))

    created, updated = first.results[0].state, second.results[0].state
    assert created is not None and updated is not None
    assert (created.version, created.value) == (1, value(2.0))
    assert (updated.version, updated.value, updated.agent_id) == (2, value(1.5), "b")
    assert second.results[0].previous == created
    # Logged like any put: a state.put with the entries before and after.
    assert [(c.kind, c.details["state"]) for c in await all_changes(store)] == [
        ("state.put", entry_to_snapshot(created)),
        ("state.put", entry_to_snapshot(updated)),
    ]


async def test_array_operations(store: Store) -> None:
    await store.write_states(write(modify("l", "append", [1.0, "a"])))
    await store.write_states(write(modify("l", "append", [1.0])))
    assert await json_of(store, "l") == [1.0, "a", 1.0]

    # Sets compare as JSON: true is not 1, and key order does not matter.
    await store.write_states(write(put("s", [1.0, {"a": 1.0, "b": 2.0}])))
    await store.write_states(
        write(modify("s", "add_to_set", [True, 1.0, {"b": 2.0, "a": 1.0}, "x", "x"]))
    )
    assert await json_of(store, "s") == [1.0, {"a": 1.0, "b": 2.0}, True, "x"]
    await store.write_states(write(modify("s", "remove_from_set", [1.0, "absent", "x"])))
    assert await json_of(store, "s") == [{"a": 1.0, "b": 2.0}, True]

    await store.write_states(write(modify("new-set", "remove_from_set", ["x"])))
    assert await json_of(store, "new-set") == []


async def test_merge_patch_follows_rfc_7396(store: Store) -> None:
    # The example of RFC 7396, section 3.
    target = {
        "title": "Goodbye!",
        "author": {"givenName": "John", "familyName": "Doe"},
        "tags": ["example", "sample"],
        "content": "This will be unchanged",
    }
    patch = {
        "title": "Hello!",
        "phoneNumber": "+01-555-555-5555",
        "author": {"familyName": None},
        "tags": ["example"],
    }
    await store.write_states(write(put("doc", target)))
    await store.write_states(write(modify("doc", "merge_patch", patch)))
    assert await json_of(store, "doc") == {
        "title": "Hello!",
        "author": {"givenName": "John"},
        "tags": ["example"],
        "content": "This will be unchanged",
        "phoneNumber": "+01-555-555-5555",
    }
    # A missing key counts as null; a non-object patch replaces the value.
    await store.write_states(write(modify("fresh", "merge_patch", {"a": {"b": None, "c": 1.0}})))
    assert await json_of(store, "fresh") == {"a": {"c": 1.0}}
    await store.write_states(write(modify("fresh", "merge_patch", [1.0])))
    assert await json_of(store, "fresh") == [1.0]


async def test_a_modification_keeps_metadata_and_expiry(store: Store) -> None:
    expires = NOW + timedelta(minutes=5)
    await store.write_states(
        write(put("shared/n", 1.0, metadata={"unit": "items"}, expire_time=expires))
    )
    result = await store.write_states(write(modify("shared/n", "increment", 1.0)))
    entry = result.results[0].state
    assert entry is not None
    assert (entry.metadata, entry.expire_time, entry.value) == (
        {"unit": "items"},
        expires,
        value(2.0),
    )


@pytest.mark.parametrize(
    ("stored", "kind", "operand", "held"),
    [
        ("three", "increment", 1.0, "a string"),
        (True, "increment", 1.0, "a boolean"),
        (None, "increment", 1.0, "null"),
        ({"a": 1.0}, "append", [1.0], "an object"),
        (3.0, "add_to_set", [1.0], "a number"),
        ("x", "remove_from_set", ["x"], "a string"),
    ],
)
async def test_a_value_of_another_type_is_refused(
    store: Store, stored: Any, kind: str, operand: Any, held: str
) -> None:
    await store.write_states(write(put("k", stored)))
    with pytest.raises(FailedPrecondition) as refused:
        await store.write_states(write(modify("k", kind, operand)))
    assert refused.value.reason == "VALUE_TYPE_MISMATCH"
    assert refused.value.metadata == {"field": f"modification.{kind}", "key": "k", "held": held}
    assert str(refused.value).startswith(f"modification.{kind}: key 'k' holds {held}, not ")
    assert (await store.get_state("k")) is not None
    assert await json_of(store, "k") == stored  # unchanged


async def test_bytes_are_refused_and_too_large_results_too(store: Store) -> None:
    await store.write_states(write(PutCommand("b", StateValue(ValueKind.BINARY, b"\x00"))))
    with pytest.raises(FailedPrecondition) as refused:
        await store.write_states(write(modify("b", "merge_patch", {"a": 1.0})))
    assert refused.value.metadata["held"] == "bytes"

    await store.write_states(write(modify("l", "append", ["x" * 40])))
    with pytest.raises(FailedPrecondition) as too_large:
        await store.write_states(write(modify("l", "append", ["y" * 40], max_bytes=64)))
    assert too_large.value.reason == "VALUE_TOO_LARGE"
    assert await json_of(store, "l") == ["x" * 40]


async def test_modifications_inside_a_transaction(store: Store) -> None:
    await store.write_states(write(put("shared/count", 1.0)))
    result = await store.write_states(
        write(
            put("shared/plan", "go"),
            modify("shared/count", "increment", 1.0),
            modify("shared/log", "append", ["planned"]),
            compares=[Compare("shared/plan", exists=False)],
        )
    )
    assert [r.state.version for r in result.results if r.state] == [1, 2, 1]
    assert await json_of(store, "shared/count") == 2.0

    # All or none: a failing modification writes nothing of the transaction.
    with pytest.raises(FailedPrecondition):
        await store.write_states(
            write(modify("shared/count", "increment", 1.0), modify("shared/plan", "append", [1]))
        )
    assert await json_of(store, "shared/count") == 2.0


async def test_a_conflict_carries_the_current_entry(store: Store) -> None:
    written = await store.write_states(write(put("k", 1.0)))
    with pytest.raises(Conflict) as conflict:
        await store.write_states(write(put("k", 2.0), compares=[Compare("k", version=7)]))
    assert conflict.value.current == written.results[0].state
    with pytest.raises(Conflict) as missing:
        await store.write_states(write(put("m", 2.0), compares=[Compare("m", version=1)]))
    assert missing.value.current is None


async def test_concurrent_increments_lose_nothing(store: Store) -> None:
    """32 writers, 4 hot keys, 20 increments each: every one counted, no conflict."""
    writers, rounds, keys = 32, 20, [f"shared/hot/{n}" for n in range(4)]

    async def writer(number: int) -> None:
        for _ in range(rounds):
            key = keys[number % len(keys)]
            await store.write_states(write(modify(key, "increment", 1.0), agent_id=f"w{number}"))

    await asyncio.gather(*(writer(n) for n in range(writers)))

    per_key = writers // len(keys) * rounds
    for key in keys:
        entry = await store.get_state(key)
        assert entry is not None
        assert (json.loads(entry.value.data), entry.version) == (per_key, per_key)
    assert len(await all_changes(store)) == writers * rounds
