"""Distribution's write operations: each loads what it needs and applies the task rules.

Every operation runs inside a batch's transaction (:mod:`agentcoord.store.unit_of_work`): it
reads the task and sub-tasks it declared, applies :mod:`agentcoord.core.task_rules`, and
stores the changed records with their change log entries. A rule that refuses (a stale
fencing token, a sub-task no longer READY) raises, and the operation changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from agentcoord.core.errors import FailedPrecondition, NotFound, ResourceExhausted
from agentcoord.core.session_rules import check_session_live
from agentcoord.core.task_rules import (
    Completion,
    Journal,
    LeaseRenewal,
    RetryPolicy,
    TaskTransitions,
    TaskUpdate,
    cancel_task,
    check_capacity,
    check_claim_new,
    check_unexpired,
    complete_subtask,
    fail_subtask,
    lease_subtask,
    renew_lease,
)
from agentcoord.core.tasks import Failure, FailureClass, Subtask, SubtaskState, Task
from agentcoord.store.rows import to_utc
from agentcoord.store.unit_of_work import Needs, ViewOp, WorkingSet


def _transact(
    ws: WorkingSet,
    task_id: str,
    now: datetime,
    actor: str,
    apply: Callable[[TaskTransitions], Subtask | None],
) -> TaskUpdate:
    """Run ``apply`` on a task and its loaded sub-tasks, and store what it changed."""
    task = ws.task(task_id)
    if task is None:
        raise NotFound(f"task_id: task {task_id!r} does not exist", reason="TASK_NOT_FOUND")
    journal = Journal(ws.revision + 1)
    tx = TaskTransitions(task, ws.subtasks_of(task_id), journal, to_utc(now), actor)
    primary = apply(tx)
    for planned in journal.entries:
        ws.append(planned.revision, now, planned.change)
    for subtask in tx.changed.values():
        ws.put_subtask(subtask)
    if tx.task != task:
        ws.put_task(tx.task)
    return TaskUpdate(tx.task, primary, tuple(tx.changed.values()), tuple(tx.revocations))


def _check_unexpired(ws: WorkingSet, subtask_id: str, fencing_token: int, now: datetime) -> None:
    """Refuse a holder's report on a lease past its stored expire time (``LEASE_EXPIRED``).

    The stored expire time is the one every process renews: the holder's heartbeats may
    reach another replica than its report.
    """
    subtask = ws.subtask(subtask_id)
    if subtask is not None:
        check_unexpired(subtask, fencing_token, to_utc(now))


def _on_subtask(
    ws: WorkingSet,
    subtask_id: str,
    now: datetime,
    actor: str,
    apply: Callable[[TaskTransitions], Subtask | None],
) -> TaskUpdate:
    """Run ``apply`` on the task of a loaded sub-task (see :func:`_transact`)."""
    subtask = ws.subtask(subtask_id)
    if subtask is None:
        raise NotFound(
            f"subtask_id: sub-task {subtask_id!r} does not exist", reason="SUBTASK_NOT_FOUND"
        )
    return _transact(ws, subtask.task_id, now, actor, apply)


@dataclass(frozen=True, slots=True)
class SubmitTask(ViewOp):
    """``Store.submit_task``: a new task and its sub-tasks, or the one of the same request."""

    task: Task
    subtasks: tuple[Subtask, ...]

    def needs(self) -> Needs:
        """The task of the same submitter and idempotency key, if any."""
        key = (self.task.submitter, self.task.request_id)
        return Needs(task_request_ids=frozenset((key,)) if key[1] else frozenset())

    def apply(self, ws: WorkingSet) -> tuple[Task, tuple[Subtask, ...], bool]:
        """Store the task; return it and its sub-tasks as stored, in task order.

        False, with no sub-tasks: the submitter's earlier task of the request is returned.
        """
        if self.task.request_id:
            earlier = ws.task_by_request(self.task.submitter, self.task.request_id)
            if earlier is not None:
                return earlier, (), False
        journal = Journal(ws.revision + 1)
        now = to_utc(self.task.create_time)
        task = replace(self.task, create_time=now, update_time=now)
        tx = TaskTransitions(task, {}, journal, now, task.submitter_agent_id)
        tx.record_submission()
        for subtask in self.subtasks:
            tx.create(replace(subtask, create_time=now, update_time=now))
        for planned in journal.entries:
            ws.append(planned.revision, now, planned.change)
        ws.put_task(tx.task)
        for subtask in tx.changed.values():
            ws.put_subtask(subtask)
        return tx.task, tuple(sorted(tx.changed.values(), key=lambda s: s.seq)), True


@dataclass(frozen=True, slots=True)
class LeaseSubtask(ViewOp):
    """``Store.lease_subtask``."""

    subtask_id: str
    agent_id: str
    epoch: int
    now: datetime
    capacity: int
    """Leases the session may hold at once, counted across every task and process."""
    claim_request_id: str = ""
    """The claim's request id: refused (``CLAIM_REPEATED``) if the session holds its lease."""

    def needs(self) -> Needs:
        """The sub-task, its task, the agent, and its leases (counted; loaded for a claim)."""
        needs = Needs(subtask_ids=frozenset((self.subtask_id,))) | _lessee(self.agent_id)
        if self.claim_request_id:
            needs |= Needs(leased_by=frozenset((self.agent_id,)))
        return needs

    def apply(self, ws: WorkingSet) -> TaskUpdate:
        """Lease the sub-task to the session (see :func:`_lease`)."""
        return _lease(
            ws,
            self.subtask_id,
            self.agent_id,
            self.epoch,
            self.now,
            self.capacity,
            claim_request_id=self.claim_request_id,
        )


def _lessee(agent_id: str) -> Needs:
    """What leasing to ``agent_id`` reads besides the sub-task: the agent, its lease counts.

    Counted in SQL rather than loaded: the capacity check needs how many leases the
    session holds, not the sub-tasks (a claim also loads them, see :func:`_lease`).
    """
    agent = frozenset((agent_id,))
    return Needs(agent_ids=agent, lease_counts=agent)


def _lease(
    ws: WorkingSet,
    subtask_id: str,
    agent_id: str,
    epoch: int,
    now: datetime,
    capacity: int,
    *,
    claim_request_id: str = "",
) -> TaskUpdate:
    """Lease a sub-task to a session if it is live, the sub-task READY and room left.

    The capacity counts every lease the session holds in the store (across tasks and
    processes), as counted in the transaction and moved by the batch's earlier operations
    (:meth:`WorkingSet.lease_count`). The session is checked against the stored agent:
    a lease granted to a session that a registration (through any process) ended
    meanwhile would be recorded under the dead epoch, released by no one, and end only
    when it expires. A claim whose request
    id a lease the session holds already carries is refused: it is a repeat (a retry,
    perhaps through another process after the first one's answer was lost). A refusal
    raises before anything is written to ``ws``.

    Raises:
        FailedPrecondition: ``CLAIM_REPEATED``, its metadata naming the held ``subtask_id``.
    """
    stored = ws.agent(agent_id)
    check_session_live(None if stored is None else stored[0], agent_id, epoch)
    if claim_request_id:
        held = (
            s.lease
            for s in ws.leased_by(agent_id)
            if s.state is SubtaskState.LEASED and s.lease is not None and s.lease.epoch == epoch
        )
        check_claim_new(agent_id, claim_request_id, held)
    check_capacity(agent_id, ws.lease_count(agent_id, epoch), capacity)
    return _on_subtask(
        ws,
        subtask_id,
        now,
        agent_id,
        lambda tx: lease_subtask(
            tx, subtask_id, agent_id, to_utc(now), epoch=epoch, claim_request_id=claim_request_id
        ),
    )


@dataclass(frozen=True, slots=True)
class CompleteSubtask(ViewOp):
    """``Store.complete_subtask``, and ``Store.complete_and_lease`` with ``candidates``."""

    subtask_id: str
    agent_id: str
    epoch: int
    fencing_token: int
    result: str
    now: datetime
    candidates: tuple[str, ...] = ()
    """READY sub-tasks to lease to the session after the completion, best first."""
    capacity: int = 0
    """Leases the session may hold at once (with ``candidates``)."""

    def needs(self) -> Needs:
        """The sub-task, its task and its dependents; the candidates, the agent's lease count."""
        ids = frozenset((self.subtask_id,))
        needs = Needs(subtask_ids=ids | frozenset(self.candidates), dependents_of=ids)
        return needs | _lessee(self.agent_id) if self.candidates else needs

    def apply(self, ws: WorkingSet) -> Completion:
        """Record the result of the caller's current lease, not expired; lease the candidates.

        Each candidate still READY is leased while the session is live and has room. One
        refused as not READY (leased through another process, cancelled) is skipped; a
        refused session (ended, at capacity) ends the leasing. The completion stands either
        way.
        """
        _check_unexpired(ws, self.subtask_id, self.fencing_token, self.now)
        completion = _on_subtask(
            ws,
            self.subtask_id,
            self.now,
            self.agent_id,
            lambda tx: complete_subtask(
                tx,
                self.subtask_id,
                self.agent_id,
                self.fencing_token,
                self.result,
                epoch=self.epoch,
            ),
        )
        if not completion.changed:  # a repeat: its slot was refilled by the first call
            return Completion(completion, (), self.candidates)
        leases: list[TaskUpdate] = []
        for index, candidate in enumerate(self.candidates):
            try:
                leases.append(
                    _lease(ws, candidate, self.agent_id, self.epoch, self.now, self.capacity)
                )
            except ResourceExhausted:
                return Completion(completion, tuple(leases), self.candidates[index:])
            except FailedPrecondition as refused:
                if refused.reason == "SESSION_ENDED":
                    return Completion(completion, tuple(leases), self.candidates[index:])
            except NotFound:
                pass
        return Completion(completion, tuple(leases), ())


@dataclass(frozen=True, slots=True)
class FailSubtask(ViewOp):
    """``Store.fail_subtask``: an agent's report, or the server's (lease lost, agent died)."""

    failure: Failure
    epoch: int
    """The session of ``failure.agent_id`` that held the lease."""
    fencing_token: int
    retry: RetryPolicy

    def needs(self) -> Needs:
        """Every sub-task of the task: a final failure may cancel them all."""
        return Needs(families_of=frozenset((self.failure.subtask_id,)))

    def apply(self, ws: WorkingSet) -> TaskUpdate:
        """Record the failure if the lease ``fencing_token`` is the current one.

        An agent's report also needs the lease unexpired; the server's own (lease lost,
        agent died) do not.
        """
        if not self.failure.failure_class.set_by_server:
            _check_unexpired(ws, self.failure.subtask_id, self.fencing_token, self.failure.time)
        return _on_subtask(
            ws,
            self.failure.subtask_id,
            self.failure.time,
            self.failure.agent_id,
            lambda tx: fail_subtask(
                tx, self.failure, self.fencing_token, self.retry, epoch=self.epoch
            ),
        )


@dataclass(frozen=True, slots=True)
class ReleaseLeases(ViewOp):
    """``Store.release_leases``: sessions ended; their sub-tasks are READY again at once."""

    agent_id: str
    through_epoch: int
    """Leases of the agent's sessions 1..``through_epoch`` are released."""
    now: datetime

    def needs(self) -> Needs:
        """The agent's leased sub-tasks and their tasks."""
        return Needs(leased_by=frozenset((self.agent_id,)))

    def apply(self, ws: WorkingSet) -> list[TaskUpdate]:
        """Fail each such lease with AGENT_DIED (retried at once, no attempt burned)."""
        updates = []
        for subtask in ws.leased_by(self.agent_id):
            assert subtask.lease is not None
            if subtask.lease.epoch <= self.through_epoch:
                updates.append(
                    _on_subtask(
                        ws, subtask.subtask_id, self.now, "", self._died(subtask.subtask_id)
                    )
                )
        return updates

    def _died(self, subtask_id: str) -> Callable[[TaskTransitions], Subtask]:
        def fail(tx: TaskTransitions) -> Subtask:
            subtask = tx.subtask(subtask_id)
            assert subtask.lease is not None
            failure = Failure(
                failure_class=FailureClass.AGENT_DIED,
                message=(
                    f"session {subtask.lease.epoch} of agent {self.agent_id!r} ended "
                    "(expired, left or replaced) while holding the lease"
                ),
                retryable=True,
                subtask_id=subtask_id,
                agent_id=self.agent_id,
                attempt=subtask.attempt,
                time=to_utc(self.now),
            )
            lease = subtask.lease
            return fail_subtask(tx, failure, lease.fencing_token, RetryPolicy(), epoch=lease.epoch)

        return fail


@dataclass(frozen=True, slots=True)
class CancelTask(ViewOp):
    """``Store.cancel_task``."""

    task_id: str
    reason: str
    agent_id: str
    canceller: str
    """The caller's principal (:attr:`~agentcoord.core.tasks.Caller.principal`)."""
    now: datetime

    def needs(self) -> Needs:
        """The task and all its sub-tasks."""
        ids = frozenset((self.task_id,))
        return Needs(task_ids=ids, task_subtasks=ids)

    def apply(self, ws: WorkingSet) -> TaskUpdate:
        """Cancel the task and its unfinished sub-tasks, revoking their leases."""

        def cancel(tx: TaskTransitions) -> None:
            cancel_task(tx, self.reason, canceller=self.canceller)

        return _transact(ws, self.task_id, self.now, self.agent_id, cancel)


@dataclass(frozen=True, slots=True)
class RenewLeases(ViewOp):
    """``Store.renew_leases``: move leases' expire times; no change log entry."""

    renewals: Sequence[LeaseRenewal]

    def needs(self) -> Needs:
        """The sub-tasks."""
        return Needs(subtask_ids=frozenset(r.subtask_id for r in self.renewals))

    def apply(self, ws: WorkingSet) -> int:
        """Renew each lease still held under its token; return how many were renewed."""
        renewed = 0
        for renewal in self.renewals:
            subtask = ws.subtask(renewal.subtask_id)
            moved = None if subtask is None else renew_lease(subtask, _utc_renewal(renewal))
            if moved is not None:
                ws.put_subtask(moved)
                renewed += 1
        return renewed


def _utc_renewal(renewal: LeaseRenewal) -> LeaseRenewal:
    return replace(renewal, expire_time=to_utc(renewal.expire_time))
