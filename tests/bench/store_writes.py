"""Write throughput of the stores alone (no gRPC), at several numbers of concurrent writers.

.venv/bin/python -m tests.bench.store_writes [--store sqlite|postgresql://...]
    [--writers 1,16,64] [--duration 3] [--ops register,put,update,modify]

- ``register``: ``register_agent`` of distinct agents.
- ``put``: ``write_states`` of one key per writer, no compare, a request id each.
- ``update``: 4 hot keys; each writer reads a key and writes it back with a version
  compare and a request id, retrying conflicts (the store's share of ``update()``);
  reports committed increments/s and checks that none was lost.
- ``modify``: the same 4 hot keys incremented inside the write (the store's share of
  ModifyState): no read and no conflict; checked for lost increments like ``update``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from agentcoord.core.errors import Conflict
from agentcoord.core.models import (
    Agent,
    Compare,
    ModificationKind,
    ModifyCommand,
    PutCommand,
    StateValue,
    StateWrite,
    ValueKind,
)
from agentcoord.core.store import Store
from agentcoord.store.factory import open_store

HOT_KEYS = 4


def _agent(agent_id: str) -> Agent:
    return Agent(agent_id, agent_id, "worker", ("python",), 1, {}, (), 3.0)


def _value(number: int) -> StateValue:
    return StateValue(ValueKind.JSON, json.dumps(number).encode())


async def _register(store: Store, writer: int, seq: int) -> int:
    await store.register_agent(_agent(f"a{writer}-{seq}"), "h", datetime.now(UTC))
    return 1


async def _put(store: Store, writer: int, seq: int) -> int:
    put = PutCommand(f"shared/w{writer}", _value(seq))
    await store.write_states(
        StateWrite("", (), (put,), datetime.now(UTC), request_id=uuid.uuid4().hex)
    )
    return 1


async def _update(store: Store, writer: int, seq: int) -> int:
    key = f"shared/hot{(writer + seq) % HOT_KEYS}"
    request_id = uuid.uuid4().hex
    while True:
        entry = await store.get_state(key)
        version = entry.version if entry else 0
        count = json.loads(entry.value.data) if entry else 0
        write = StateWrite(
            "",
            (Compare(key, version=version),),
            (PutCommand(key, _value(count + 1)),),
            datetime.now(UTC),
            request_id=request_id,
        )
        try:
            await store.write_states(write)
            return 1
        except Conflict:
            continue


async def _modify(store: Store, writer: int, seq: int) -> int:
    key = f"shared/hot{(writer + seq) % HOT_KEYS}"
    increment = ModifyCommand(key, ModificationKind.INCREMENT, 1.0, max_bytes=1 << 20)
    await store.write_states(
        StateWrite("", (), (increment,), datetime.now(UTC), request_id=uuid.uuid4().hex)
    )
    return 1


OPS: dict[str, Callable[[Store, int, int], Awaitable[int]]] = {
    "register": _register,
    "put": _put,
    "update": _update,
    "modify": _modify,
}


async def measure(url: str, op: str, writers: int, duration: float) -> tuple[float, str]:
    """Run ``op`` from ``writers`` concurrent writers on a fresh store at ``url``.

    Returns:
        Operations committed per second, and a note (lost increments of update/modify).
    """
    store = open_store(url)
    await store.open()
    try:
        done = 0
        deadline = time.perf_counter() + duration

        async def writer(number: int) -> None:
            nonlocal done
            for seq in itertools.count():
                if time.perf_counter() >= deadline:
                    return
                committed = await OPS[op](store, number, seq)
                done += committed  # not `done += await`: that reads `done` before awaiting

        started = time.perf_counter()
        await asyncio.gather(*(writer(n) for n in range(writers)))
        rate = done / (time.perf_counter() - started)
        note = ""
        if op in ("update", "modify"):
            total = 0
            for n in range(HOT_KEYS):
                entry = await store.get_state(f"shared/hot{n}")
                total += json.loads(entry.value.data) if entry else 0
            note = f"lost {done - total:g}"
        return rate, note
    finally:
        await store.close()


async def _fresh_url(store: str, directory: Path) -> str:
    if store == "sqlite":
        return f"sqlite:///{directory / f'{uuid.uuid4().hex}.db'}"
    separator = "&" if "?" in store else "?"
    return f"{store}{separator}schema=bench_{uuid.uuid4().hex}"


async def _drop_schema(url: str) -> None:
    if url.startswith("sqlite"):
        return
    import asyncpg

    dsn, _, query = url.partition("?")
    schema = dict(part.split("=", 1) for part in query.split("&"))["schema"]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def main() -> None:
    """Print one markdown row per operation and back end."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--store",
        action="append",
        help="sqlite or a postgresql:// URL (repeatable; default sqlite and "
        "$AGENTCOORD_TEST_POSTGRES_DSN if set)",
    )
    parser.add_argument("--writers", default="1,16,64")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--ops", default="register,put,update,modify")
    args = parser.parse_args()
    stores = args.store or ["sqlite"] + (
        [os.environ["AGENTCOORD_TEST_POSTGRES_DSN"]]
        if os.environ.get("AGENTCOORD_TEST_POSTGRES_DSN")
        else []
    )
    writers = [int(n) for n in args.writers.split(",")]
    print(f"| store | op | {' | '.join(f'{n} writers' for n in writers)} |")
    print(f"|---|---|{'---|' * len(writers)}")
    with tempfile.TemporaryDirectory() as directory:
        for store, op in itertools.product(stores, args.ops.split(",")):
            cells = []
            for count in writers:
                url = await _fresh_url(store, Path(directory))
                try:
                    rate, note = await measure(url, op, count, args.duration)
                finally:
                    await _drop_schema(url)
                cells.append(f"{rate:,.0f}/s" + (f" ({note})" if note else ""))
            name = "sqlite" if store == "sqlite" else "postgresql"
            print(f"| {name} | {op} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
