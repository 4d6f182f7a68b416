"""Frozen records of Discovery, StateSync and the change log, shared by the core and the stores.

Distribution's records are in :mod:`agentcoord.core.tasks`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agentcoord.core.errors import AlreadyExists


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
    examples: tuple[str, ...] = ()
    """Example requests the skill handles."""
    input_modes: tuple[str, ...] = ()
    """Media types it accepts."""
    output_modes: tuple[str, ...] = ()
    """Media types it produces."""

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form kept by the stores and the change log."""
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "tags": list(self.tags),
            "examples": list(self.examples),
            "input_modes": list(self.input_modes),
            "output_modes": list(self.output_modes),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Skill:
        """Rebuild a skill from :meth:`to_json` output (older records lack the later fields)."""
        return cls(
            data["id"],
            data["name"],
            data.get("description", ""),
            tuple(data.get("tags", ())),
            tuple(data.get("examples", ())),
            tuple(data.get("input_modes", ())),
            tuple(data.get("output_modes", ())),
        )


@dataclass(frozen=True, slots=True)
class AgentCard:
    """What an agent's A2A agent card says about it beyond its name and skills."""

    description: str = ""
    """What the agent does."""
    version: str = ""
    """The agent's version."""
    provider_organization: str = ""
    """Organisation providing the agent; empty when not given."""
    provider_url: str = ""
    """The provider's web site."""
    a2a_url: str = ""
    """The agent's own A2A endpoint; empty when it serves none."""

    def to_json(self) -> dict[str, str]:
        """Return the JSON form kept by the stores and the change log."""
        return {
            "description": self.description,
            "version": self.version,
            "provider_organization": self.provider_organization,
            "provider_url": self.provider_url,
            "a2a_url": self.a2a_url,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AgentCard:
        """Rebuild a card from :meth:`to_json` output (empty for older records)."""
        return cls(
            description=data.get("description", ""),
            version=data.get("version", ""),
            provider_organization=data.get("provider_organization", ""),
            provider_url=data.get("provider_url", ""),
            a2a_url=data.get("a2a_url", ""),
        )


def agent_session_live(agent_id: str, ttl_remaining: float) -> AlreadyExists:
    """Return the refusal of a registration over the live session of ``agent_id``.

    The details carry ``ttl_remaining``: seconds before that session expires unless it
    heartbeats (a restarted agent may register once it has).
    """
    return AlreadyExists(
        f"agent_id: agent {agent_id!r} has a live session that expires in "
        f"{ttl_remaining:.1f} s unless renewed; present its session token to resume it, or "
        "the admin token to take it over",
        reason="AGENT_ALREADY_REGISTERED",
        metadata={
            "field": "agent_id",
            "agent_id": agent_id,
            "ttl_remaining": f"{max(ttl_remaining, 0.0):.3f}",
        },
    )


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
    card: AgentCard = field(default_factory=AgentCard)
    """The rest of its A2A agent card."""

    def skill_names(self) -> frozenset[str]:
        """Return the ids and tags of its skills: the names a wanted skill is matched by."""
        return frozenset(name for skill in self.skills for name in (skill.id, *skill.tags))

    def has_skills(self, wanted: Iterable[str]) -> bool:
        """Return whether, for each of ``wanted``, a skill has that id or tag."""
        return self.skill_names().issuperset(wanted)

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
            "skills": [skill.to_json() for skill in self.skills],
            "card": self.card.to_json(),
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
            skills=tuple(Skill.from_json(skill) for skill in data["skills"]),
            ttl=float(data["ttl"]),
            state=AgentState(data["state"]),
            epoch=int(data["epoch"]),
            status=AgentStatus(data["status"]),
            active_subtasks=int(data["active_subtasks"]),
            held_subtask_ids=tuple(data["held_subtask_ids"]),
            register_time=_parse_iso(data["register_time"]),
            last_heartbeat_time=_parse_iso(data["last_heartbeat_time"]),
            revision=int(data["revision"]),
            card=AgentCard.from_json(data.get("card", {})),
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


class ValueKind(enum.Enum):
    """How a state value is encoded."""

    JSON = "json"
    """Canonical JSON text (sorted keys, no spaces), UTF-8."""
    BINARY = "binary"
    """Opaque bytes."""


@dataclass(frozen=True, slots=True)
class StateValue:
    """A state value: canonical JSON text or opaque bytes."""

    kind: ValueKind
    """Encoding of ``data``."""
    data: bytes
    """The encoded value."""


@dataclass(frozen=True, slots=True)
class StateEntry:
    """The current entry of one key."""

    key: str
    """The key, a UTF-8 path."""
    value: StateValue
    """The value."""
    metadata: Mapping[str, str]
    """Free-form metadata written with the value."""
    version: int
    """Per-key version: 1 on creation, +1 on every put."""
    create_revision: int
    """Revision of the put that created the key."""
    mod_revision: int
    """Revision of the latest put."""
    agent_id: str
    """Agent that wrote last; empty for the admin."""
    create_time: datetime
    """Time of creation."""
    update_time: datetime
    """Time of the latest put."""
    expire_time: datetime | None = None
    """Time the key is deleted unless written again; None for no TTL."""
    session_epoch: int = 0
    """Epoch of ``agent_id``'s session the key is bound to; 0 when not bound."""

    @property
    def bound_to_session(self) -> bool:
        """Whether the key is deleted when its writer's session ends."""
        return self.session_epoch > 0


class StateChangeType(enum.Enum):
    """What happened to a key (``state.<value>`` in the change log)."""

    PUT = "put"
    DELETE = "delete"
    EXPIRE = "expire"

    @property
    def change_kind(self) -> str:
        """Name of this type in the change log."""
        return f"state.{self.value}"


@dataclass(frozen=True, slots=True)
class Fencing:
    """A sub-task lease a write claims to hold."""

    subtask_id: str
    """The sub-task."""
    fencing_token: int
    """The lease's fencing token; a stale one is refused."""


@dataclass(frozen=True, slots=True)
class PutCommand:
    """Write one key."""

    key: str
    """The key."""
    value: StateValue
    """The new value."""
    metadata: Mapping[str, str] = field(default_factory=dict)
    """Metadata stored with the value."""
    expire_time: datetime | None = None
    """When the key expires; None for never."""
    session_epoch: int = 0
    """Bind the key to the writer's session of this epoch; 0 for no binding."""


@dataclass(frozen=True, slots=True)
class DeleteCommand:
    """Delete one key."""

    key: str
    """The key."""
    allow_missing: bool = False
    """Succeed without a change when the key does not exist."""


class ModificationKind(enum.Enum):
    """How a modification changes a JSON value (``Modification`` in the proto)."""

    INCREMENT = "increment"
    """Add a number to a number; a missing key counts as 0."""
    APPEND = "append"
    """Append items to an array; a missing key counts as []."""
    ADD_TO_SET = "add_to_set"
    """Append the members an array does not hold yet; a missing key counts as []."""
    REMOVE_FROM_SET = "remove_from_set"
    """Remove every item equal to a member; a missing key counts as []."""
    MERGE_PATCH = "merge_patch"
    """Apply an RFC 7396 JSON merge patch; a missing key counts as null."""


@dataclass(frozen=True, slots=True)
class ModifyCommand:
    """Change one key's value from the value it holds when the write commits."""

    key: str
    """The key."""
    kind: ModificationKind
    """The operation."""
    operand: Any
    """A float for INCREMENT, a list of JSON values for the array operations, any JSON
    value for MERGE_PATCH (as ``json.loads`` returns them)."""
    max_bytes: int
    """Largest value the result may be, encoded."""
    field: str = "modification"
    """Request path of the modification, for error messages."""


@dataclass(frozen=True, slots=True)
class Compare:
    """A condition on one key that a write requires.

    Exactly one of ``version``, ``exists`` and ``value`` is set.
    """

    key: str
    """The key."""
    version: int | None = None
    """Required version; 0 means the key must not exist."""
    exists: bool | None = None
    """Required existence."""
    value: StateValue | None = None
    """Required value (the key must exist)."""
    field: str = ""
    """The request field of a single-key write it comes from (``expected_version``); empty
    for a compare of a transaction, which is named by its index."""


@dataclass(frozen=True, slots=True)
class StateWrite:
    """An all-or-nothing write of several keys, if every comparison holds."""

    agent_id: str
    """The writer; empty for the admin."""
    compares: tuple[Compare, ...]
    """Conditions checked first, in order."""
    operations: tuple[PutCommand | DeleteCommand | ModifyCommand, ...]
    """Operations applied in order, each at its own consecutive revision."""
    now: datetime
    """Time of the write."""
    fencing: Fencing | None = None
    """A lease the writer must hold."""
    request_id: str = ""
    """Idempotency key: a repeat returns the first result and writes nothing."""
    epoch: int = 0
    """The writer's session epoch (0 for the admin); a fenced write needs the lease's."""


@dataclass(frozen=True, slots=True)
class OperationResult:
    """The effect of one operation of a write."""

    state: StateEntry | None
    """The entry after a put; None after a delete."""
    previous: StateEntry | None
    """The entry before the operation; None if the key did not exist."""


@dataclass(frozen=True, slots=True)
class StateWriteResult:
    """The outcome of a committed write."""

    revision: int
    """Store revision after the write (unchanged if it changed nothing)."""
    results: tuple[OperationResult, ...]
    """One result per operation, in order."""


@dataclass(frozen=True, slots=True)
class ChangeFilter:
    """Which change log entries a listing or watch wants; empty fields match anything."""

    service: Service | None = None
    """Only this service's changes."""
    kind: str = ""
    """Only this kind; a value ending in ``.`` matches the family (``agent.``)."""
    subject: str = ""
    """Only this exact subject."""
    subject_prefix: str = ""
    """Only subjects starting with this."""
    agent_id: str = ""
    """Only changes made by this agent."""
    start_time: datetime | None = None
    """Only changes at or after this time."""
    end_time: datetime | None = None
    """Only changes before this time."""

    def matches(self, change: Change) -> bool:
        """Return whether ``change`` passes the filter."""
        if self.service is not None and change.service is not self.service:
            return False
        if self.kind and not (
            change.kind.startswith(self.kind)
            if self.kind.endswith(".")
            else change.kind == self.kind
        ):
            return False
        return (
            (not self.subject or change.subject == self.subject)
            and change.subject.startswith(self.subject_prefix)
            and (not self.agent_id or change.agent_id == self.agent_id)
            and (self.start_time is None or change.time >= self.start_time)
            and (self.end_time is None or change.time < self.end_time)
        )
