"""The store interface every back end implements.

Operations reveal intention (``register_agent``, ``end_agent_session``) rather than
exposing SQL. Each mutating operation is atomic: it commits its row changes and its
change log entries in one transaction, and concurrent operations may share one
transaction and one fsync (group commit). After a commit the store calls its change
listeners with the new change log entries, in revision order, on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

from agentcoord.core.models import Agent, AgentState, AgentStatus, Change, HeartbeatRecord, Service

ChangeListener = Callable[[Sequence[Change]], None]
"""Receives committed change log entries, in revision order."""


class Store(Protocol):
    """Durable state of all services, shared by every process of a deployment."""

    async def open(self) -> None:
        """Connect and apply pending schema migrations (idempotent, safe with several replicas)."""
        ...

    async def close(self) -> None:
        """Finish pending writes and release connections."""
        ...

    def add_listener(self, listener: ChangeListener) -> Callable[[], None]:
        """Call ``listener`` after each commit; returns a function that removes it."""
        ...

    async def current_revision(self) -> int:
        """Return the revision of the latest committed change (0 when there is none)."""
        ...

    async def list_changes(
        self, after_revision: int, limit: int, service: Service | None = None
    ) -> list[Change]:
        """Return up to ``limit`` changes with revision > ``after_revision``, oldest first."""
        ...

    async def register_agent(self, agent: Agent, token_hash: str, now: datetime) -> Agent:
        """Insert or replace an agent and open a new session.

        The stored epoch becomes the previous epoch plus one (1 for a new id), the state
        LIVE, ``register_time`` ``now``; an ``agent.joined`` change is appended (service
        DISCOVERY, subject and agent_id the agent id, details ``{"agent": snapshot}`` where
        snapshot is ``Agent.to_snapshot()`` of the stored agent, revision included).
        Returns the agent as stored, with epoch and revision.
        """
        ...

    async def end_agent_session(
        self, agent_id: str, epoch: int, state: AgentState, now: datetime
    ) -> Agent | None:
        """Mark a live agent LEFT or EXPIRED if its stored epoch is ``epoch``.

        Appends ``agent.left`` or ``agent.expired`` (details as for ``register_agent``).
        Returns the updated agent, or None when the agent is missing, not live, or has a
        different epoch (nothing changes then).
        """
        ...

    async def update_agent_status(
        self, agent_id: str, epoch: int, status: AgentStatus, now: datetime
    ) -> Agent | None:
        """Record a new working status of a live agent of that epoch, appending ``agent.updated``.

        Returns the updated agent, or None when the agent is missing, not live or of
        another epoch.
        """
        ...

    async def record_heartbeats(self, records: Sequence[HeartbeatRecord]) -> None:
        """Store the latest liveness facts of many agents in one transaction; no change entry.

        A record whose epoch differs from the stored epoch is ignored.
        """
        ...

    async def get_agent(self, agent_id: str) -> Agent | None:
        """Return one agent, or None."""
        ...

    async def load_agents(self) -> list[tuple[Agent, str]]:
        """Return every agent with its session token hash, ordered by agent id."""
        ...

    async def find_agent_by_token_hash(self, token_hash: str) -> Agent | None:
        """Return the agent whose current session has this token hash, or None."""
        ...
