"""Discovery's write operations: sessions opened, resumed, updated and ended.

Each runs inside a batch's transaction (:mod:`agentcoord.store.unit_of_work`) and applies
the session rules of :mod:`agentcoord.core.session_rules` to the agents it loaded; ending
a session also expires the state keys bound to it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from agentcoord.core.models import Agent, AgentEventKind, AgentState, AgentStatus
from agentcoord.core.session_rules import (
    check_replaceable,
    ended_kind,
    is_current_session,
    new_session,
)
from agentcoord.store.rows import to_utc
from agentcoord.store.unit_of_work import Needs, ViewOp, WorkingSet


@dataclass(frozen=True, slots=True)
class RegisterAgent(ViewOp):
    """``Store.register_agent``: a new session, ending the earlier one's bound keys."""

    agent: Agent
    token_hash: str
    now: datetime
    replacing_epoch: int | None = None
    """The live session it may replace (0: none); None replaces whatever is stored."""

    def needs(self) -> Needs:
        """The agent and the entries bound to its sessions."""
        ids = frozenset((self.agent.agent_id,))
        return Needs(agent_ids=ids, bound_to=ids)

    def apply(self, ws: WorkingSet) -> Agent:
        """Store the next session, then expire keys bound to the earlier ones."""
        previous = ws.agent(self.agent.agent_id)
        if previous is not None and self.replacing_epoch is not None:
            check_replaceable(previous[0], self.replacing_epoch)
        session = new_session(self.agent, None if previous is None else previous[0], self.now)
        stored = ws.save_agent(session, self.token_hash, AgentEventKind.JOINED, self.now)
        ws.expire(ws.bound_entries(stored.agent_id, stored.epoch - 1), self.now)
        return stored


def _current_session(ws: WorkingSet, agent_id: str, epoch: int) -> tuple[Agent, str] | None:
    """Return the agent and its token hash if it is live in session ``epoch``, else None."""
    current = ws.agent(agent_id)
    return current if current is not None and is_current_session(current[0], epoch) else None


@dataclass(frozen=True, slots=True)
class EndAgentSession(ViewOp):
    """``Store.end_agent_session``: LEFT or EXPIRED, and its bound keys expire."""

    agent_id: str
    epoch: int
    state: AgentState
    now: datetime
    heartbeat_at_most: datetime | None = None
    """Ends nothing if the stored last heartbeat is later (flushed after it was judged)."""

    def __post_init__(self) -> None:
        """Refuse a state that does not end a session before the operation is queued."""
        ended_kind(self.state)

    def needs(self) -> Needs:
        """The agent and the entries bound to its sessions."""
        ids = frozenset((self.agent_id,))
        return Needs(agent_ids=ids, bound_to=ids)

    def apply(self, ws: WorkingSet) -> Agent | None:
        """End the session if it is the current one."""
        current = _current_session(ws, self.agent_id, self.epoch)
        if current is None:
            return None
        last, judged = current[0].last_heartbeat_time, self.heartbeat_at_most
        if last is not None and judged is not None and last > to_utc(judged):
            return None
        ended = replace(current[0], state=self.state)
        stored = ws.save_agent(ended, current[1], ended_kind(self.state), self.now)
        ws.expire(ws.bound_entries(self.agent_id, self.epoch), self.now)
        return stored


@dataclass(frozen=True, slots=True)
class UpdateAgentStatus(ViewOp):
    """``Store.update_agent_status``."""

    agent_id: str
    epoch: int
    status: AgentStatus
    now: datetime

    def needs(self) -> Needs:
        """The agent."""
        return Needs(agent_ids=frozenset((self.agent_id,)))

    def apply(self, ws: WorkingSet) -> Agent | None:
        """Record the status if the session is the current one."""
        current = _current_session(ws, self.agent_id, self.epoch)
        if current is None:
            return None
        updated = replace(current[0], status=self.status)
        return ws.save_agent(updated, current[1], AgentEventKind.UPDATED, self.now)


@dataclass(frozen=True, slots=True)
class ResumeSession(ViewOp):
    """``Store.resume_session``: new registration fields of a live session, same epoch."""

    agent: Agent
    """The registration; its ``epoch`` names the session."""
    now: datetime

    def needs(self) -> Needs:
        """The agent."""
        return Needs(agent_ids=frozenset((self.agent.agent_id,)))

    def apply(self, ws: WorkingSet) -> Agent | None:
        """Record the fields if the session is the current one."""
        agent = self.agent
        current = _current_session(ws, agent.agent_id, agent.epoch)
        if current is None:
            return None
        updated = replace(
            current[0],
            name=agent.name,
            role=agent.role,
            capabilities=agent.capabilities,
            capacity=agent.capacity,
            labels=agent.labels,
            skills=agent.skills,
            card=agent.card,
            ttl=agent.ttl,
        )
        return ws.save_agent(updated, current[1], AgentEventKind.UPDATED, self.now)
