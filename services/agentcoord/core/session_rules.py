"""The rules of agent sessions: pure functions, no I/O, no clock.

A registration opens the next session (epoch) of an agent; only the current live session
may be resumed, updated or ended, and a key may be bound only to the writer's live
session. The store applies these rules inside its transactions
(:mod:`agentcoord.store.agent_writes`, :mod:`agentcoord.store.state_writes`).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from agentcoord.core.errors import FailedPrecondition, InvalidInput
from agentcoord.core.models import (
    Agent,
    AgentEventKind,
    AgentState,
    NewChange,
    PutCommand,
    Service,
    StateWrite,
    agent_session_live,
)

_ENDED_KINDS = {AgentState.LEFT: AgentEventKind.LEFT, AgentState.EXPIRED: AgentEventKind.EXPIRED}


def new_session(agent: Agent, previous: Agent | None, now: datetime) -> Agent:
    """Return ``agent`` as a registration stores it: LIVE, next epoch, registered ``now``."""
    epoch = 1 if previous is None else previous.epoch + 1
    return replace(agent, state=AgentState.LIVE, epoch=epoch, register_time=now)


def is_current_session(agent: Agent | None, epoch: int) -> bool:
    """Return whether ``agent`` exists, is live, and is in session ``epoch``."""
    return agent is not None and agent.state is AgentState.LIVE and agent.epoch == epoch


def check_session_live(agent: Agent | None, agent_id: str, epoch: int) -> None:
    """Refuse an act of session ``epoch`` of ``agent_id`` unless it is the live one.

    Raises:
        FailedPrecondition: reason ``SESSION_ENDED``.
    """
    if not is_current_session(agent, epoch):
        raise FailedPrecondition(
            f"agent_id: session {epoch} of agent {agent_id!r} has ended",
            reason="SESSION_ENDED",
            metadata={"agent_id": agent_id, "epoch": str(epoch)},
        )


def ended_kind(state: AgentState) -> AgentEventKind:
    """Return the change kind that ends a session in ``state``.

    Raises:
        InvalidInput: ``state`` does not end a session (it is LIVE).
    """
    kind = _ENDED_KINDS.get(state)
    if kind is None:
        raise InvalidInput("state", f"a session ends as LEFT or EXPIRED, not {state.name}")
    return kind


def agent_change(agent: Agent, kind: AgentEventKind) -> NewChange:
    """Return the change log entry recording ``agent`` (stored, revision included)."""
    return NewChange(
        service=Service.DISCOVERY,
        kind=kind.change_kind,
        subject=agent.agent_id,
        agent_id=agent.agent_id,
        details={"agent": agent.to_snapshot()},
    )


def check_replaceable(stored: Agent, replacing_epoch: int) -> None:
    """Refuse to open a session over a live one other than session ``replacing_epoch``.

    Raises:
        AlreadyExists: reason ``AGENT_ALREADY_REGISTERED`` (see ``agent_session_live``).
    """
    if stored.state is AgentState.LIVE and stored.epoch != replacing_epoch:
        raise agent_session_live(stored.agent_id, stored.ttl)  # at most its TTL


def bound_epochs(write: StateWrite) -> set[int]:
    """Return the session epochs the write's puts bind keys to."""
    return {
        op.session_epoch
        for op in write.operations
        if isinstance(op, PutCommand) and op.session_epoch > 0
    }


def check_session(write: StateWrite, writer: Agent | None) -> None:
    """Refuse to bind keys to a session that is not the writer's live one.

    Checked in the write's transaction: a key bound to a session that ended meanwhile
    would outlive it, since the end of a session deletes only the keys bound by then.

    Raises:
        FailedPrecondition: reason ``SESSION_ENDED``.
    """
    for epoch in sorted(bound_epochs(write)):
        if not is_current_session(writer, epoch):
            raise FailedPrecondition(
                f"bind_to_session: session {epoch} of agent {write.agent_id!r} is not live",
                reason="SESSION_ENDED",
                metadata={"field": "bind_to_session", "agent_id": write.agent_id},
            )
