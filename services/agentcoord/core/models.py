"""Frozen domain records shared by the core and the stores."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class Service(enum.Enum):
    """The service a change belongs to."""

    DISCOVERY = "discovery"
    DISTRIBUTION = "distribution"
    STATESYNC = "statesync"


class AgentState(enum.Enum):
    """Liveness of an agent."""

    LIVE = "live"
    LEFT = "left"
    EXPIRED = "expired"


class AgentStatus(enum.Enum):
    """Working status an agent reports with its heartbeats."""

    UNSPECIFIED = "unspecified"
    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"


class AgentEventKind(enum.Enum):
    """Kinds of agent change, as recorded in the change log (``agent.<value>``)."""

    JOINED = "joined"
    UPDATED = "updated"
    LEFT = "left"
    EXPIRED = "expired"

    @property
    def change_kind(self) -> str:
        """Name of this kind in the change log."""
        return f"agent.{self.value}"


@dataclass(frozen=True, slots=True)
class Skill:
    """A skill an agent offers, shaped like an A2A agent card's skill."""

    id: str
    """Identifier, unique within the agent."""
    name: str
    """Human-readable name."""
    description: str = ""
    """What the skill does."""
    tags: tuple[str, ...] = ()
    """Keywords."""


@dataclass(frozen=True, slots=True)
class Agent:
    """An agent as Discovery knows it."""

    agent_id: str
    """Identifier, unique per store."""
    name: str
    """Human-readable name."""
    role: str
    """Role such as ``planner``; empty for none."""
    capabilities: tuple[str, ...]
    """Sorted, unique capabilities."""
    capacity: int
    """Sub-tasks the agent runs in parallel."""
    labels: Mapping[str, str]
    """Free-form labels."""
    skills: tuple[Skill, ...]
    """Skills in A2A agent-card shape."""
    ttl: float
    """Seconds without a heartbeat after which the agent expires."""
    state: AgentState = AgentState.LIVE
    """Liveness."""
    epoch: int = 0
    """Session generation; grows on every registration of the id."""
    status: AgentStatus = AgentStatus.UNSPECIFIED
    """Last reported working status."""
    active_subtasks: int = 0
    """Last reported number of sub-tasks in progress."""
    held_subtask_ids: tuple[str, ...] = ()
    """Last reported held sub-task ids."""
    register_time: datetime | None = None
    """Wall-clock time of the latest registration."""
    last_heartbeat_time: datetime | None = None
    """Wall-clock time of the latest heartbeat flushed to the store."""
    revision: int = 0
    """Revision of the latest change log entry about this agent."""

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats the server asks for: a third of the TTL."""
        return self.ttl / 3

    def to_snapshot(self) -> dict[str, Any]:
        """Return the JSON-able form recorded in change log entries."""
        return {
            "agent_id": self.agent_id,
            "name": self.name,
            "role": self.role,
            "capabilities": list(self.capabilities),
            "capacity": self.capacity,
            "labels": dict(self.labels),
            "skills": [
                {"id": s.id, "name": s.name, "description": s.description, "tags": list(s.tags)}
                for s in self.skills
            ],
            "ttl": self.ttl,
            "state": self.state.value,
            "epoch": self.epoch,
            "status": self.status.value,
            "active_subtasks": self.active_subtasks,
            "held_subtask_ids": list(self.held_subtask_ids),
            "register_time": _iso(self.register_time),
            "last_heartbeat_time": _iso(self.last_heartbeat_time),
            "revision": self.revision,
        }

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any]) -> Agent:
        """Rebuild an agent from :meth:`to_snapshot` output."""
        return cls(
            agent_id=data["agent_id"],
            name=data["name"],
            role=data["role"],
            capabilities=tuple(data["capabilities"]),
            capacity=int(data["capacity"]),
            labels=dict(data["labels"]),
            skills=tuple(
                Skill(s["id"], s["name"], s.get("description", ""), tuple(s.get("tags", ())))
                for s in data["skills"]
            ),
            ttl=float(data["ttl"]),
            state=AgentState(data["state"]),
            epoch=int(data["epoch"]),
            status=AgentStatus(data["status"]),
            active_subtasks=int(data["active_subtasks"]),
            held_subtask_ids=tuple(data["held_subtask_ids"]),
            register_time=_parse_iso(data["register_time"]),
            last_heartbeat_time=_parse_iso(data["last_heartbeat_time"]),
            revision=int(data["revision"]),
        )


@dataclass(frozen=True, slots=True)
class HeartbeatRecord:
    """Liveness facts flushed to the store in batches (no change log entry)."""

    agent_id: str
    """The agent."""
    epoch: int
    """Session the heartbeat belongs to; older epochs are ignored by the store."""
    last_heartbeat_time: datetime
    """Wall-clock time of the heartbeat."""
    status: AgentStatus
    """Reported status."""
    active_subtasks: int
    """Reported number of sub-tasks in progress."""
    held_subtask_ids: tuple[str, ...]
    """Reported held sub-task ids."""


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the change log: who changed what, when, at which revision."""

    revision: int
    """Store-wide revision; strictly increasing in commit order."""
    time: datetime
    """Wall-clock time of the commit."""
    service: Service
    """Service that made the change."""
    kind: str
    """What happened, such as ``agent.joined``."""
    subject: str
    """Identifier of what changed, such as an agent id or a state key."""
    agent_id: str
    """Agent that made the change; empty for the server itself."""
    details: Mapping[str, Any] = field(default_factory=dict)
    """JSON-able facts about the change (for agent changes, the agent snapshot)."""


@dataclass(frozen=True, slots=True)
class NewChange:
    """A change to append; the store assigns revision and time."""

    service: Service
    """Service that makes the change."""
    kind: str
    """What happens."""
    subject: str
    """Identifier of what changes."""
    agent_id: str
    """Agent that makes the change; empty for the server itself."""
    details: Mapping[str, Any] = field(default_factory=dict)
    """JSON-able facts about the change."""


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _parse_iso(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None
