"""StateSync rules: who may write which key, TTLs and session binding, listings, watches.

The atomic part of a write (compare, apply, log) is in :mod:`agentcoord.core.state_rules`
and runs inside the store's transaction; this module decides what the write is and
whether the caller may make it. Keys expire on a timer here; keys bound to a session
are removed by the store in the transaction that ends the session.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from agentcoord.core.changes import ChangeFeed, WatchBatch, check_retained
from agentcoord.core.clock import Clock
from agentcoord.core.errors import InvalidInput, OutOfRange, PermissionDenied
from agentcoord.core.loops import run_periodically
from agentcoord.core.models import (
    Change,
    ChangeFilter,
    Compare,
    DeleteCommand,
    Fencing,
    ModifyCommand,
    PutCommand,
    Service,
    StateEntry,
    StateWrite,
    StateWriteResult,
)
from agentcoord.core.store import Store

AGENTS_PREFIX = "agents/"
"""Keys ``agents/<id>/...`` belong to agent ``<id>``."""
SHARED_PREFIX = "shared/"
"""Keys ``shared/...`` are writable by any registered agent."""


@dataclass(frozen=True, slots=True)
class StateSyncConfig:
    """Limits and timers of StateSync."""

    max_operations: int = 128
    """Compares plus operations in one write at most."""
    expiry_interval: float = 0.25
    """Seconds between sweeps for keys whose TTL ran out."""
    change_retention: float = 7 * 24 * 3600.0
    """Seconds the change log (and idempotency records) are kept."""
    compaction_interval: float = 60.0
    """Seconds between compactions of the change log."""


@dataclass(frozen=True, slots=True)
class Writer:
    """Who makes a write."""

    agent_id: str = ""
    """The agent whose session token was presented; empty for the admin."""
    epoch: int = 0
    """The session's epoch."""
    admin: bool = False
    """Whether the admin token was presented."""


@dataclass(frozen=True, slots=True)
class PutRequest:
    """One key to write, before the rules turn it into a command."""

    command: PutCommand
    """Key, value and metadata (expire time and binding are filled in here)."""
    ttl: float = 0.0
    """Seconds the key lives unless written again; 0 for no TTL."""
    bind_to_session: bool = False
    """Delete the key when the writer's session ends."""


Liveness = Callable[[str], Awaitable[bool]]
"""Tells whether an agent is live."""


def owner_of(key: str) -> str:
    """Return the agent id owning ``agents/<id>/...`` keys, or "" for other keys."""
    if not key.startswith(AGENTS_PREFIX):
        return ""
    return key[len(AGENTS_PREFIX) :].partition("/")[0]


class StateSync:
    """The StateSync domain service."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        feed: ChangeFeed,
        config: StateSyncConfig,
        is_live: Liveness,
    ) -> None:
        """Wire the service."""
        self._store = store
        self._clock = clock
        self._feed = feed
        self.config = config
        self._is_live = is_live

    def _authorize(self, writer: Writer, field: str, key: str) -> None:
        if writer.admin:
            return
        owner = owner_of(key)
        if owner == writer.agent_id or (not owner and key.startswith(SHARED_PREFIX)):
            return
        where = f"agents/{writer.agent_id}/ or shared/"
        raise PermissionDenied(
            f"{field}: agent {writer.agent_id!r} may write only under {where}, not {key!r}",
            reason="KEY_NOT_WRITABLE",
        )

    async def write(
        self,
        writer: Writer,
        compares: Sequence[Compare],
        operations: Sequence[PutRequest | DeleteCommand | ModifyCommand],
        *,
        fencing: Fencing | None = None,
        request_id: str = "",
        fields: Sequence[str] | None = None,
    ) -> StateWriteResult:
        """Apply puts, deletes and modifications all or none, if every comparison holds.

        Args:
            writer: The caller.
            compares: Conditions checked first.
            operations: Puts, deletes and modifications, applied in order at consecutive
                revisions.
            fencing: A sub-task lease the write requires.
            request_id: Idempotency key of the write.
            fields: The request path of each operation (``operations[2].put``), for error
                messages; None for a lone put or delete whose fields are the request's own
                (PutState, DeleteState).

        Raises:
            InvalidInput: too many parts, a key named twice, or a session binding
                without a session.
            PermissionDenied: a key outside what the writer may change.
            Conflict: a comparison does not hold.
        """
        if len(compares) + len(operations) > self.config.max_operations:
            raise InvalidInput(
                "operations" if fields is not None else "expected_version",
                f"{len(compares)} compares and {len(operations)} operations; "
                f"at most {self.config.max_operations} in all",
            )
        now = self._clock.now()
        commands: list[PutCommand | DeleteCommand | ModifyCommand] = []
        seen: set[str] = set()
        for index, operation in enumerate(operations):
            prefix = f"{fields[index]}." if fields is not None else ""
            command = operation.command if isinstance(operation, PutRequest) else operation
            if command.key in seen:
                raise InvalidInput(
                    f"{prefix}key", f"key {command.key!r} is named by two operations"
                )
            seen.add(command.key)
            self._authorize(writer, f"{prefix}key", command.key)
            if isinstance(operation, PutRequest):
                command = self._put_command(writer, operation, f"{prefix}bind_to_session", now)
            commands.append(command)
        return await self._store.write_states(
            StateWrite(
                agent_id=writer.agent_id,
                compares=tuple(compares),
                operations=tuple(commands),
                now=now,
                fencing=fencing,
                request_id=request_id,
                epoch=writer.epoch,
            )
        )

    @staticmethod
    def _put_command(writer: Writer, put: PutRequest, field: str, now: datetime) -> PutCommand:
        if put.bind_to_session and writer.admin:
            raise InvalidInput(field, "needs an agent session, not the admin token")
        return PutCommand(
            key=put.command.key,
            value=put.command.value,
            metadata=put.command.metadata,
            expire_time=now + timedelta(seconds=put.ttl) if put.ttl > 0 else None,
            session_epoch=writer.epoch if put.bind_to_session else 0,
        )

    async def get(self, key: str) -> tuple[StateEntry | None, int]:
        """Return the entry of ``key`` (None if missing) and the current revision."""
        return await self._store.read_state(key)

    async def list_states(
        self,
        prefix: str,
        *,
        after_key: str,
        at_revision: int,
        limit: int,
        live_agents_only: bool,
    ) -> tuple[list[StateEntry], str, int]:
        """Return a page of entries under ``prefix``, all at one revision.

        A continued listing (``at_revision`` > 0) is served only if nothing under the
        prefix changed since its first page.

        Returns:
            The entries, the key to continue after ("" at the end), and the revision.

        Raises:
            OutOfRange: the prefix changed since the first page; list again.
        """
        if at_revision and await self._store.state_changed_since(prefix, at_revision):
            raise OutOfRange(
                f"page_token: keys under {prefix!r} changed after revision {at_revision}; "
                "list again from the first page",
                reason="LISTING_CHANGED",
            )
        entries, revision = await self._store.list_states(prefix, after_key, limit + 1)
        more = len(entries) > limit
        entries = entries[:limit]
        next_key = entries[-1].key if more and entries else ""
        if live_agents_only:
            entries = [
                e for e in entries if not owner_of(e.key) or await self._is_live(owner_of(e.key))
            ]
        return entries, next_key, at_revision or revision

    async def list_events(
        self, where: ChangeFilter, *, after_revision: int, limit: int
    ) -> tuple[list[Change], int]:
        """Return a page of the change log and the revision to continue after (0 at the end)."""
        await check_retained(self._store, "page_token", after_revision)
        changes = await self._store.list_changes(after_revision, limit + 1, where)
        more = len(changes) > limit
        changes = changes[:limit]
        return changes, changes[-1].revision if more else 0

    async def watch(self, start_revision: int, where: ChangeFilter) -> AsyncIterator[WatchBatch]:
        """Yield the changes passing ``where`` after ``start_revision`` (0: from now on).

        Raises:
            OutOfRange: ``start_revision`` is compacted.
        """
        await check_retained(self._store, "start_revision", start_revision)
        async for batch in self._feed.watch(start_revision, where.matches):
            yield batch

    def watch_states(self, prefix: str, start_revision: int) -> AsyncIterator[WatchBatch]:
        """Yield the changes of keys under ``prefix`` after ``start_revision``."""
        return self.watch(
            start_revision, ChangeFilter(service=Service.STATESYNC, subject_prefix=prefix)
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Expire keys and compact the change log until ``stop`` is set.

        Only the leader of the processes sharing the store (:meth:`Store.is_leader`) does
        either; the others skip their turns, so a key's TTL is swept by one process and an
        expiry never races another replica's for the same rows.
        """
        next_compaction = self._clock.monotonic()

        async def step() -> None:
            nonlocal next_compaction
            if not self._store.is_leader():
                return
            await self._store.expire_states(self._clock.now())
            if self._clock.monotonic() >= next_compaction:
                next_compaction = self._clock.monotonic() + self.config.compaction_interval
                cutoff = self._clock.now() - timedelta(seconds=self.config.change_retention)
                await self._store.compact_changes(cutoff)

        await run_periodically(stop, self.config.expiry_interval, step, "statesync expiry")
