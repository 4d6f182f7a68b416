"""Server configuration: flags override ``AGENTCOORD_*`` environment variables override defaults."""

from __future__ import annotations

import argparse
import ast
import ipaddress
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import Field, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

from agentcoord.core.errors import InvalidInput
from agentcoord.server.sizes import MIN_MAX_MESSAGE_BYTES

SERVICE_NAMES = ("discovery", "distribution", "statesync")
"""Services one process can host."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""Logging level names a setting accepts (any case)."""

DURATION: Mapping[str, str] = {"unit": "duration"}
"""Field metadata of a setting in seconds: it is given as ``30s``, ``5m``, ``1h`` or seconds."""
BYTES: Mapping[str, str] = {"unit": "bytes"}
"""Field metadata of a setting in bytes."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything a server process needs to start."""

    listen: str = "127.0.0.1:50051"
    """Address to listen on, ``host:port``; port 0 picks a free port."""
    http_listen: str = ""
    """Address of the HTTP listener (dashboard, ``/metrics``), ``host:port``; empty: none."""
    store: str = "sqlite:///var/agentcoord.db"
    """Store URL: ``sqlite:///relative.db``, ``sqlite:////abs.db`` or ``postgresql://...``."""
    services: tuple[str, ...] = SERVICE_NAMES
    """Services this process hosts."""
    insecure: bool = False
    """Allow listening beyond loopback without TLS and a join token."""
    tls_cert: str = ""
    """PEM certificate chain file; enables TLS with ``tls_key``."""
    tls_key: str = ""
    """PEM private key file."""
    tls_client_ca: str = ""
    """PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."""
    mtls_agent_id_pattern: str = ""
    """Bind agent ids to client certificates (needs ``tls_client_ca``): a caller acts only as
    an id for which its certificate's DNS or URI SAN, or its CN, equals this pattern with
    ``{agent_id}`` replaced by the id (``{agent_id}`` alone: the name is the id; e.g.
    ``spiffe://example.org/agent/{agent_id}``); the admin token is exempt; empty: unbound."""
    join_token: str = field(default="", repr=False)
    """Secret that Register requires (``x-agentcoord-join-token`` metadata); empty: none."""
    admin_token: str = field(default="", repr=False)
    """Secret that grants operator rights as ``authorization: Bearer <token>``; empty: none."""
    default_ttl: float = field(default=10.0, metadata=DURATION)
    """Agent TTL when an agent asks for none."""
    min_ttl: float = field(default=1.0, metadata=DURATION)
    """Shortest agent TTL granted; shorter requests are raised to it."""
    max_ttl: float = field(default=300.0, metadata=DURATION)
    """Longest agent TTL granted; longer requests are lowered to it."""
    heartbeat_flush_interval: float = field(default=1.0, metadata=DURATION)
    """Time between batched writes of the heartbeat facts (load, last heartbeat time) a
    replica receives; other replicas show them this much later at most, plus half the
    agent's TTL and this interval again."""
    leader_interval: float = field(default=1.0, metadata=DURATION)
    """Time between a PostgreSQL replica's tries to become the one replica that sweeps
    agent and lease expiries (and between the leader's checks of its lock connection):
    when the leader dies, another replica takes over within this time of PostgreSQL
    noticing the closed connection."""
    grace: float = field(default=5.0, metadata=DURATION)
    """Time in-flight calls get to finish on shutdown."""
    drain: float = field(default=1.0, metadata=DURATION)
    """Time the server keeps serving on SIGTERM after health turns NOT_SERVING, before it
    ends the streams: load balancers see the drain and send new calls elsewhere."""
    max_pending_requests: int = 20_000
    """Calls grpc core queues before the server accepts them; past it new calls are refused."""
    max_message_bytes: int = field(default=4 * 1024 * 1024, metadata=BYTES)
    """Largest request or response message; at least 4 MiB (the largest task or sub-task)."""
    max_value_bytes: int = field(default=1024 * 1024, metadata=BYTES)
    """Largest StateSync value, encoded; at most a quarter of ``max_message_bytes``."""
    max_transaction_operations: int = 128
    """Compares plus operations in one StateSync write at most."""
    max_streams_per_connection: int = 1000
    """Calls one client connection may have open at once (HTTP/2 concurrent streams)."""
    request_timeout: float = field(default=60.0, metadata=DURATION)
    """Time a call may take from its headers to its request message (DEADLINE_EXCEEDED)."""
    max_streams_per_session: int = 64
    """Streams (Heartbeat, StreamAssignments, watches) one agent session may have open."""
    watch_buffer_bytes: int = field(default=8 * 1024 * 1024, metadata=BYTES)
    """Changes held for one watcher not keeping up; past it, it re-reads the store."""
    change_retention: float = field(default=7 * 24 * 3600.0, metadata=DURATION)
    """How long the change log and idempotency records are kept."""
    default_lease_ttl: float = field(default=30.0, metadata=DURATION)
    """Lease TTL of tasks that ask for none (1 s to 1 h)."""
    default_max_attempts: int = 3
    """Attempts per sub-task of tasks that ask for none (1-100)."""
    retry_backoff: float = field(default=1.0, metadata=DURATION)
    """Wait before the first retry of a failed sub-task; doubles per failure, up to 60 s."""
    splitter: str = "builtin"
    """AUTO splitter: ``builtin`` or ``module:attribute`` naming a Splitter class or factory."""
    log_level: str = "INFO"
    """Logging level: DEBUG (one line per call), INFO, WARNING, ERROR or CRITICAL."""
    grpc_log_level: str = "WARNING"
    """Logging level of grpc's and uvicorn's internals (``grpc.*``, ``uvicorn.*``,
    ``asyncio``), apart from ours."""
    log_format: str = "text"
    """``text`` or ``json`` (one JSON object per line, the call's facts as fields)."""

    def validate(self) -> None:
        """Check the combination of settings.

        Raises:
            InvalidInput: a setting is malformed or the combination is unsafe.
        """
        host, port = split_host_port(self.listen)
        if self.http_listen:
            http_host, http_port = split_host_port(self.http_listen, "http_listen")
        unknown = set(self.services) - set(SERVICE_NAMES)
        if unknown or not self.services:
            raise InvalidInput("services", f"choose from {', '.join(SERVICE_NAMES)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidInput("tls_cert", "TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca and not self.tls_cert:
            raise InvalidInput("tls_client_ca", "mutual TLS needs --tls-cert and --tls-key")
        if self.mtls_agent_id_pattern:
            if not self.tls_client_ca:
                raise InvalidInput(
                    "mtls_agent_id_pattern", "binding agent ids to certificates needs mutual TLS"
                )
            if self.mtls_agent_id_pattern.count("{agent_id}") != 1:
                raise InvalidInput("mtls_agent_id_pattern", "must contain {agent_id} exactly once")
        if not (0 < self.min_ttl <= self.default_ttl <= self.max_ttl):
            raise InvalidInput("default_ttl", "need 0 < min_ttl <= default_ttl <= max_ttl")
        if self.heartbeat_flush_interval <= 0:
            raise InvalidInput("heartbeat_flush_interval", "must be positive")
        if self.leader_interval <= 0:
            raise InvalidInput("leader_interval", "must be positive")
        if self.max_message_bytes < MIN_MAX_MESSAGE_BYTES:
            raise InvalidInput(
                "max_message_bytes",
                f"must be at least {MIN_MAX_MESSAGE_BYTES} (4 MiB): a task or sub-task at its "
                "field limits must fit one message",
            )
        if not 0 < self.max_value_bytes <= self.max_message_bytes // 4:
            raise InvalidInput(
                "max_value_bytes",
                "must be positive and at most max_message_bytes/4: a change carries the value "
                "and the previous one, base64-encoded in ListEvents",
            )
        if self.max_transaction_operations < 1:
            raise InvalidInput("max_transaction_operations", "must be at least 1")
        if self.max_streams_per_connection < 1:
            raise InvalidInput("max_streams_per_connection", "must be at least 1")
        if not 0 < self.request_timeout <= 3600:
            raise InvalidInput("request_timeout", "must be between 0 and 3600 seconds")
        if self.max_streams_per_session < 1:
            raise InvalidInput("max_streams_per_session", "must be at least 1")
        if self.watch_buffer_bytes < 64 * 1024:
            raise InvalidInput("watch_buffer_bytes", "must be at least 65536")
        if self.change_retention <= 0:
            raise InvalidInput("change_retention", "must be positive")
        if "distribution" in self.services and "discovery" not in self.services:
            raise InvalidInput(
                "services",
                "distribution needs discovery in the same process: it judges agent liveness "
                "and renews leases from heartbeats",
            )
        if not 1.0 <= self.default_lease_ttl <= 3600.0:
            raise InvalidInput("default_lease_ttl", "must be between 1 and 3600 seconds")
        if not 1 <= self.default_max_attempts <= 100:
            raise InvalidInput("default_max_attempts", "must be between 1 and 100")
        if not 0.0 <= self.retry_backoff <= 60.0:
            raise InvalidInput("retry_backoff", "must be between 0 and 60 seconds")
        if self.log_format not in ("text", "json"):
            raise InvalidInput("log_format", f"{self.log_format!r}: choose text or json")
        for name in ("log_level", "grpc_log_level"):
            level = getattr(self, name)
            if level.upper() not in LOG_LEVELS:
                raise InvalidInput(name, f"{level!r}: choose one of {', '.join(LOG_LEVELS)}")
        for name in ("grace", "drain"):
            if getattr(self, name) < 0:
                raise InvalidInput(name, "must not be negative")
        for name in ("max_pending_requests", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise InvalidInput(name, "must be at least 1")
        if not is_loopback(host) and not self.insecure and not (self.tls_cert and self.join_token):
            raise InvalidInput(
                "listen",
                f"refusing to listen on {host}:{port} beyond loopback without TLS and a join "
                "token; pass --tls-cert/--tls-key and --join-token, or --insecure",
            )
        if (
            self.http_listen
            and not is_loopback(http_host)
            and not self.insecure
            and not (self.tls_cert and self.join_token)
        ):
            raise InvalidInput(
                "http_listen",
                f"refusing to serve HTTP on {http_host}:{http_port} beyond loopback without "
                "TLS and a join token; pass --tls-cert/--tls-key and --join-token, or --insecure",
            )


def split_host_port(address: str, setting: str = "listen") -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too).

    Raises:
        InvalidInput: not a ``host:port`` address, naming ``setting``.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidInput(setting, f"{address!r} is not host:port (port 0-65535)")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Return whether ``host`` names only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_ENV_PREFIX = "AGENTCOORD_"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`ServerConfig` field (defaults come from the environment).

    The help of each flag is the field's docstring, its default, unit and variable.
    """
    parser.add_argument(
        "services",
        nargs="*",
        help=f"services to host: any of {', '.join(SERVICE_NAMES)} (default: all; "
        "env AGENTCOORD_SERVICES, comma-separated)",
    )
    docs = field_docs()
    defaults = ServerConfig()
    for spec in fields(ServerConfig):
        if spec.name == "services":
            continue
        flag = "--" + spec.name.replace("_", "-")
        help = f"{docs.get(spec.name, '')} {_default_text(spec, getattr(defaults, spec.name))}"
        if spec.type == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=help)
        else:
            metavar = {"duration": "DURATION", "bytes": "BYTES"}.get(spec.metadata.get("unit", ""))
            parser.add_argument(flag, default=None, metavar=metavar, help=help)


def _default_text(spec: Field[Any], default: object) -> str:
    env = _ENV_PREFIX + spec.name.upper()
    unit = spec.metadata.get("unit")
    if unit == "duration":
        assert isinstance(default, float)
        shown = format_duration(default)
    elif isinstance(default, bool):
        shown = str(default).lower()
    else:
        shown = repr(default) if default == "" else str(default)
    suffix = " bytes" if unit == "bytes" else ""
    return f"(default {shown}{suffix}; env {env})".replace("%", "%%")


@cache
def field_docs() -> dict[str, str]:
    """Return the docstring of each :class:`ServerConfig` field, read from this module."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    (config,) = (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ServerConfig")
    docs: dict[str, str] = {}
    for node, after in zip(config.body, config.body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.replace("``", "").split())
    return docs


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Return the seconds of ``text``: ``500ms``, ``30s``, ``5m``, ``1h``, ``7d`` or ``1.5``.

    Raises:
        ValueError: not a non-negative number with an optional unit.
    """
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"{text!r} is not a duration (such as 500ms, 30s, 5m, 1h, or seconds)")
    return float(match[1]) * _UNIT_SECONDS[match[2]]


def format_duration(seconds: float) -> str:
    """Return ``seconds`` in the largest unit that shows it whole: ``10s``, ``5m``, ``7d``."""
    for unit in ("d", "h", "m", "s"):
        count = seconds / _UNIT_SECONDS[unit]
        if count >= 1 and math.isclose(count, round(count)):
            return f"{round(count)}{unit}"
    return f"{seconds * 1000:g}ms"


def from_sources(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """Build a config: flags first, then ``AGENTCOORD_*`` variables, then defaults.

    Raises:
        InvalidInput: a value does not parse, naming the setting.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for spec in fields(ServerConfig):
        if spec.name == "services":
            chosen: Sequence[str] = args.services or environ.get("AGENTCOORD_SERVICES", "").split(
                ","
            )
            chosen = [name.strip() for name in chosen if name.strip()]
            if chosen:
                values["services"] = tuple(dict.fromkeys(chosen))
            continue
        raw = getattr(args, spec.name, None)
        if raw is None:
            raw = environ.get(_ENV_PREFIX + spec.name.upper())
        if raw is None:
            continue
        values[spec.name] = _parse(spec, raw)
    config = ServerConfig(**values)  # type: ignore[arg-type]
    config.validate()
    return config


def describe(error: InvalidInput) -> str:
    """Return a refused setting as one line naming its flag and variable."""
    name = error.field
    if name in {spec.name for spec in fields(ServerConfig)}:
        flag = "SERVICES" if name == "services" else "--" + name.replace("_", "-")
        return f"{flag} ({_ENV_PREFIX}{name.upper()}): {error.description}"
    return error.message


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLEANS |= {"0": False, "false": False, "no": False, "off": False, "": False}


def _parse(spec: Field[Any], raw: object) -> object:
    """Turn a flag's or variable's text into the field's type.

    Raises:
        InvalidInput: naming the field.
    """
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip()
    try:
        if spec.type == "bool":
            return _BOOLEANS[text.lower()]
        if spec.metadata.get("unit") == "duration":
            return parse_duration(text)
        if spec.type == "int":
            return int(text.replace("_", ""))
        if spec.type == "float":
            return float(text)
    except KeyError:
        raise InvalidInput(
            spec.name, f"{text!r} is not a boolean (true/false, yes/no, on/off, 1/0)"
        ) from None
    except ValueError as error:
        detail = str(error) if "duration" in str(error) else f"{text!r} is not a {spec.type}"
        raise InvalidInput(spec.name, detail) from None
    if spec.name in ("log_level", "grpc_log_level"):
        return text.upper()
    return text
