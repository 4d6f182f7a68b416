"""StateSync's write operations: a state write (Put, Delete, Transact) and the TTL sweep.

Each runs inside a batch's transaction (:mod:`agentcoord.store.unit_of_work`). A write is
checked (its fencing token by :func:`agentcoord.core.task_rules.check_fencing`, its session
binding by :func:`agentcoord.core.session_rules.check_session`) and planned by
:func:`agentcoord.core.state_rules.plan_write` against the entries its batch loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from agentcoord.core.errors import Conflict
from agentcoord.core.models import PutCommand, StateEntry, StateWrite, StateWriteResult
from agentcoord.core.session_rules import bound_epochs, check_session
from agentcoord.core.state_rules import check_compares, keys_of, plan_write
from agentcoord.core.task_rules import check_fencing
from agentcoord.store.rows import WriteRequest, to_utc
from agentcoord.store.unit_of_work import Needs, ViewOp, WorkingSet


def _in_utc(write: StateWrite) -> StateWrite:
    """Return ``write`` with its times in UTC, as the store returns them."""
    operations = tuple(
        replace(op, expire_time=to_utc(op.expire_time))
        if isinstance(op, PutCommand) and op.expire_time is not None
        else op
        for op in write.operations
    )
    return replace(write, now=to_utc(write.now), operations=operations)


@dataclass(frozen=True, slots=True)
class WriteStates(ViewOp):
    """``Store.write_states``: the rules of :func:`~agentcoord.core.state_rules.plan_write`."""

    write: StateWrite

    def needs(self) -> Needs:
        """The write's keys, its remembered result, and the writer if it binds keys."""
        write = self.write
        return Needs(
            state_keys=frozenset(keys_of(write)),
            requests=(
                frozenset(((write.agent_id, write.request_id),))
                if write.request_id
                else frozenset()
            ),
            agent_ids=frozenset((write.agent_id,)) if bound_epochs(write) else frozenset(),
            subtask_ids=(
                frozenset((write.fencing.subtask_id,)) if write.fencing is not None else frozenset()
            ),
        )

    def apply(self, ws: WorkingSet) -> StateWriteResult:
        """Return a repeat's first result, or check, plan and apply the write."""
        write = _in_utc(self.write)
        if write.request_id:
            repeat = ws.request(write.agent_id, write.request_id)
            if repeat is not None:
                return repeat.result
        check_fencing(
            write, None if write.fencing is None else ws.subtask(write.fencing.subtask_id)
        )
        if bound_epochs(write):
            writer = ws.agent(write.agent_id)
            check_session(write, None if writer is None else writer[0])
        current = {key: entry for key in keys_of(write) if (entry := ws.state(key)) is not None}
        plan = plan_write(write, current, ws.revision + 1)
        for planned in plan.changes:
            ws.append(planned.revision, write.now, planned.change)
        for key in sorted(plan.deletes):
            ws.delete_state(key)
        for entry in plan.upserts.values():
            ws.put_state(entry)
        if write.request_id:
            ws.remember(WriteRequest(write.agent_id, write.request_id, plan.result, write.now))
        return plan.result

    def settle(self, ws: WorkingSet, error: Exception) -> tuple[Exception, bool]:
        """Answer a conflict with committed entries early; restate the others after the batch.

        A compare that failed against entries no operation of the batch changed has an
        outcome the commit cannot change: its caller hears it at once. One that failed
        against a write of the batch waits for the commit (the entry it saw is not durable
        yet) and, if its compares still fail against the keys' entries as the batch leaves
        them, carries those: the version a retry must name, not the one being replaced.
        """
        if not isinstance(error, Conflict):
            return error, False
        keys = keys_of(self.write)
        if not any(ws.state_changed(key) for key in keys):
            return error, True
        final = {key: entry for key in keys if (entry := ws.state(key)) is not None}
        try:
            check_compares(self.write, final)
        except Conflict as restated:
            return restated, False
        return error, False  # the batch left the compares holding: report what was seen


@dataclass(frozen=True, slots=True)
class ExpireStates(ViewOp):
    """``Store.expire_states``."""

    now: datetime

    def needs(self) -> Needs:
        """Every entry expired at ``now``."""
        return Needs(expired_at=to_utc(self.now))

    def apply(self, ws: WorkingSet) -> list[StateEntry]:
        """Delete the expired entries, each with a ``state.expire`` change."""
        entries = ws.expired_entries(to_utc(self.now))
        ws.expire(entries, self.now)
        return entries
