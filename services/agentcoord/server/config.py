"""Server configuration: flags override ``AGENTCOORD_*`` environment variables override defaults."""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

from agentcoord.core.errors import InvalidInput
from agentcoord.server.sizes import MIN_MAX_MESSAGE_BYTES

SERVICE_NAMES = ("discovery", "distribution", "statesync")
"""Services one process can host."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything a server process needs to start."""

    listen: str = "127.0.0.1:50051"
    """Address to listen on, ``host:port``; port 0 picks a free port."""
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
    join_token: str = field(default="", repr=False)
    """Secret that Register requires (``x-agentcoord-join-token`` metadata); empty: none."""
    admin_token: str = field(default="", repr=False)
    """Secret that grants operator rights as ``authorization: Bearer <token>``; empty: none."""
    default_ttl: float = 10.0
    """Agent TTL in seconds when an agent asks for none."""
    min_ttl: float = 1.0
    """Smallest agent TTL granted, seconds."""
    max_ttl: float = 300.0
    """Largest agent TTL granted, seconds."""
    grace: float = 5.0
    """Seconds in-flight calls get to finish on shutdown."""
    max_pending_requests: int = 20_000
    """Calls grpc core queues before the server accepts them; past it new calls are refused."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest request or response message; at least 4 MiB (the largest task or sub-task)."""
    max_value_bytes: int = 1024 * 1024
    """Largest StateSync value, encoded; at most a quarter of ``max_message_bytes``."""
    max_transaction_operations: int = 128
    """Compares plus operations in one StateSync write at most."""
    change_retention: float = 7 * 24 * 3600.0
    """Seconds the change log and idempotency records are kept."""
    default_lease_ttl: float = 30.0
    """Lease TTL in seconds of tasks that ask for none."""
    default_max_attempts: int = 3
    """Attempts per sub-task of tasks that ask for none."""
    retry_backoff: float = 1.0
    """Seconds before the first retry of a failed sub-task; doubles per failure, up to 60 s."""
    splitter: str = "builtin"
    """AUTO splitter: ``builtin`` or ``module:attribute`` naming a Splitter class or factory."""
    log_level: str = "INFO"
    """Logging level name."""
    log_format: str = "text"
    """``text`` or ``json`` (one JSON object per line)."""

    def validate(self) -> None:
        """Check the combination of settings.

        Raises:
            InvalidInput: a setting is malformed or the combination is unsafe.
        """
        host, port = split_host_port(self.listen)
        unknown = set(self.services) - set(SERVICE_NAMES)
        if unknown or not self.services:
            raise InvalidInput("services", f"choose from {', '.join(SERVICE_NAMES)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidInput("tls_cert", "TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca and not self.tls_cert:
            raise InvalidInput("tls_client_ca", "mutual TLS needs --tls-cert and --tls-key")
        if not (0 < self.min_ttl <= self.default_ttl <= self.max_ttl):
            raise InvalidInput("default_ttl", "need 0 < min_ttl <= default_ttl <= max_ttl")
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
            raise InvalidInput("log_format", "choose text or json")
        if not is_loopback(host) and not self.insecure and not (self.tls_cert and self.join_token):
            raise InvalidInput(
                "listen",
                f"refusing to listen on {host}:{port} beyond loopback without TLS and a join "
                "token; pass --tls-cert/--tls-key and --join-token, or --insecure",
            )


def split_host_port(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too).

    Raises:
        InvalidInput: not a ``host:port`` address.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidInput("listen", f"{address!r} is not host:port")
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
    """Add one flag per :class:`ServerConfig` field (defaults come from the environment)."""
    parser.add_argument(
        "services",
        nargs="*",
        help=f"services to host: any of {', '.join(SERVICE_NAMES)} (default: all)",
    )
    for spec in fields(ServerConfig):
        if spec.name == "services":
            continue
        flag = "--" + spec.name.replace("_", "-")
        if spec.type == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=_doc(spec.name))
        else:
            parser.add_argument(flag, default=None, help=_doc(spec.name))


def _doc(name: str) -> str:
    env = _ENV_PREFIX + name.upper()
    return f"(env {env})"


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
            chosen = [name for name in chosen if name]
            if chosen:
                values["services"] = tuple(dict.fromkeys(chosen))
            continue
        raw = getattr(args, spec.name, None)
        if raw is None:
            raw = environ.get(_ENV_PREFIX + spec.name.upper())
        if raw is None:
            continue
        values[spec.name] = _parse(spec.name, spec.type, raw)
    config = ServerConfig(**values)  # type: ignore[arg-type]
    config.validate()
    return config


def _parse(name: str, type_name: object, raw: object) -> object:
    if isinstance(raw, bool):
        return raw
    text = str(raw)
    try:
        if type_name == "bool":
            return text.lower() in ("1", "true", "yes", "on")
        if type_name == "int":
            return int(text)
        if type_name == "float":
            return float(text)
    except ValueError:
        raise InvalidInput(name, f"{text!r} is not a valid {type_name}") from None
    return text
