"""Composition root: config → store → core → servicers → one grpc.aio server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import resource
import signal
import urllib.parse
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import grpc
from google.protobuf import descriptor_pool as pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from starlette.routing import BaseRoute

from agentcoord.core.changes import ChangeFeed
from agentcoord.core.clock import Clock, SystemClock
from agentcoord.core.discovery import Discovery, DiscoveryConfig, session_from_store
from agentcoord.core.distribution import Distribution, DistributionConfig
from agentcoord.core.errors import Unavailable
from agentcoord.core.models import AgentState
from agentcoord.core.statesync import Liveness, StateSync, StateSyncConfig
from agentcoord.core.store import Store
from agentcoord.core.task_rules import RetryPolicy, TaskDefaults
from agentcoord.discovery.v1 import discovery_service_pb2_grpc
from agentcoord.distribution.v1 import distribution_service_pb2_grpc
from agentcoord.server import a2a
from agentcoord.server import discovery as discovery_server
from agentcoord.server import distribution as distribution_server
from agentcoord.server import statesync as statesync_server
from agentcoord.server.auth import Access, Authenticator, CertificateBinding, SessionLookup
from agentcoord.server.config import ServerConfig
from agentcoord.server.dashboard import Dashboard
from agentcoord.server.decoding import GuardedRegistration
from agentcoord.server.http import HttpListener
from agentcoord.server.interceptors import CallInterceptor
from agentcoord.server.metrics import Metrics, Present
from agentcoord.server.reflection import enable_reflection
from agentcoord.server.splitter_loader import load_splitter
from agentcoord.server.streams import StreamTracker
from agentcoord.server.tls import server_credentials
from agentcoord.statesync.v1 import statesync_service_pb2_grpc
from agentcoord.store.factory import open_store
from agentcoord.telemetry import tracing as tracing_from

if TYPE_CHECKING:
    from agentcoord.telemetry.spans import Tracing

log = logging.getLogger(__name__)

KEEPALIVE_OPTIONS = [
    # Ping idle connections so dead agents' connections are noticed by the C core,
    # and allow clients to ping every 10 s without being told to calm down.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
BIND_OPTIONS = [
    # grpc sets SO_REUSEPORT by default: a second server on a busy port would start and
    # share the connections with the first. Off, binding a port in use fails at start.
    ("grpc.so_reuseport", 0),
]


@dataclass
class App:
    """A running server with everything it owns."""

    config: ServerConfig
    """The configuration it was built from."""
    store: Store
    """The open store."""
    server: grpc.aio.Server
    """The gRPC server (started)."""
    port: int
    """The bound port (useful when the config asked for port 0)."""
    health: health.aio.HealthServicer
    """The health service."""
    streams: StreamTracker
    """Long-lived streams, ended at shutdown."""
    feed: ChangeFeed
    """The change feed."""
    http: HttpListener | None = None
    """The HTTP listener (dashboard, ``/metrics``), when ``config.http_listen`` is set."""
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stop_loops: asyncio.Event = field(default_factory=asyncio.Event)

    async def stop(self, grace: float | None = None, *, drain: float = 0.0) -> None:
        """Shut down in order: health NOT_SERVING, end streams and loops, stop, close store.

        Args:
            grace: Seconds in-flight calls get to finish; ``config.grace`` when None.
            drain: Seconds to go on serving everything once health says NOT_SERVING.
        """
        if self._stop_loops.is_set():
            return
        await self.health.enter_graceful_shutdown()
        if drain:
            await asyncio.sleep(drain)
        self.streams.close_all()
        if self.http is not None:
            await self.http.stop()
        self._stop_loops.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.stop(self.config.grace if grace is None else grace)
        self.feed.close()
        await self.store.close()


def _store_liveness(store: Store) -> Liveness:
    async def is_live(agent_id: str) -> bool:
        agent = await store.get_agent(agent_id)
        return agent is not None and agent.state is AgentState.LIVE

    return is_live


@dataclass(frozen=True, slots=True)
class _Hosted:
    """One service this process serves."""

    name: str
    """Fully-qualified service name."""
    access: dict[str, Access]
    """Access of each RPC, by method name."""
    add_to_server: Callable[[grpc.aio.Server], None]
    """Registers the servicer."""
    loop: Callable[[asyncio.Event], Coroutine[Any, Any, None]] | None = None
    """Background work until the event is set."""
    http_routes: Sequence[BaseRoute] = ()
    """Routes the service serves on the HTTP listener, when there is one."""


@dataclass(slots=True)
class _Cores:
    """The domain cores built for the configured services."""

    discovery: Discovery | None = None
    distribution: Distribution | None = None


async def _host_services(
    config: ServerConfig,
    store: Store,
    clock: Clock,
    feed: ChangeFeed,
    streams: StreamTracker,
    cores: _Cores,
    tracing: Tracing | None,
) -> tuple[list[_Hosted], SessionLookup]:
    """Build the cores (into ``cores``) and servicers of the configured services."""
    hosted: list[_Hosted] = []
    lookup: SessionLookup = functools.partial(session_from_store, store)
    is_live = _store_liveness(store)
    discovery: Discovery | None = None
    if "discovery" in config.services:
        discovery = Discovery(
            store,
            clock,
            feed,
            DiscoveryConfig(
                default_ttl=config.default_ttl,
                min_ttl=config.min_ttl,
                max_ttl=config.max_ttl,
                flush_interval=config.heartbeat_flush_interval,
            ),
        )
        await discovery.start()
        cores.discovery = discovery
        lookup, is_live = discovery.authenticate, discovery.is_live
        servicer = discovery_server.DiscoveryServicer(discovery, streams, config.max_message_bytes)
        hosted.append(
            _Hosted(
                discovery_server.SERVICE.full_name,
                discovery_server.ACCESS,
                lambda server: discovery_service_pb2_grpc.add_DiscoveryServiceServicer_to_server(
                    servicer, server
                ),
                discovery.run,
                a2a.routes(discovery),
            )
        )
    if "statesync" in config.services:
        statesync = StateSync(
            store,
            clock,
            feed,
            StateSyncConfig(
                max_operations=config.max_transaction_operations,
                change_retention=config.change_retention,
            ),
            is_live,
        )
        state_servicer = statesync_server.StateSyncServicer(
            statesync, streams, config.max_message_bytes, config.max_value_bytes
        )
        hosted.append(
            _Hosted(
                statesync_server.SERVICE.full_name,
                statesync_server.ACCESS,
                lambda server: statesync_service_pb2_grpc.add_StateSyncServiceServicer_to_server(
                    state_servicer, server
                ),
                statesync.run,
            )
        )
    if "distribution" in config.services:
        assert discovery is not None  # ServerConfig.validate requires it
        distribution = Distribution(
            store,
            clock,
            feed,
            DistributionConfig(
                defaults=TaskDefaults(
                    max_attempts=config.default_max_attempts, lease_ttl=config.default_lease_ttl
                ),
                retry=RetryPolicy(base=config.retry_backoff),
            ),
            load_splitter(config.splitter),
            is_live,
        )
        await distribution.start()
        cores.distribution = distribution
        discovery.heartbeat_listeners.append(distribution.renew_leases)
        distribution_servicer = distribution_server.DistributionServicer(
            distribution, streams, config.max_message_bytes, tracing
        )
        hosted.append(
            _Hosted(
                distribution_server.SERVICE.full_name,
                distribution_server.ACCESS,
                lambda server: (
                    distribution_service_pb2_grpc.add_DistributionServiceServicer_to_server(
                        distribution_servicer, server
                    )
                ),
                distribution.run,
            )
        )
    return hosted, lookup


async def start_app(
    config: ServerConfig,
    *,
    store: Store | None = None,
    clock: Clock | None = None,
    tracer_provider: Any = None,
) -> App:
    """Open the store, build and start the server with the configured services.

    Args:
        config: Validated configuration.
        store: An un-opened store to use instead of ``config.store``.
        clock: Clock for the core; the system clock by default.
        tracer_provider: OpenTelemetry tracer provider to trace with; when None, traces
            are on only with an OTLP endpoint in the environment (:mod:`agentcoord.telemetry`).
    """
    config.validate()
    credentials = server_credentials(config)  # before anything starts: bad files fail fast
    store = store or open_store(config.store, leader_interval=config.leader_interval)
    await store.open()
    clock = clock or SystemClock()
    streams = StreamTracker(config.max_streams_per_session)
    feed = ChangeFeed(store, max_pending_bytes=config.watch_buffer_bytes)
    cores = _Cores()
    tracing = tracing_from("agentcoord", tracer_provider)
    hosted, lookup = await _host_services(config, store, clock, feed, streams, cores, tracing)
    metrics = _metrics(store, feed, cores) if config.http_listen else None
    authenticator = Authenticator(
        lookup=lookup,
        join_token=config.join_token,
        admin_token=config.admin_token,
        binding=(
            CertificateBinding(config.mtls_agent_id_pattern)
            if config.mtls_agent_id_pattern
            else None
        ),
    )
    access = {
        f"/{service.name}/{method}": need
        for service in hosted
        for method, need in service.access.items()
    }
    server = grpc.aio.server(
        interceptors=[
            CallInterceptor(authenticator, access, metrics, config.request_timeout, tracing)
        ],
        options=[
            ("grpc.max_concurrent_streams", config.max_streams_per_connection),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.server.max_pending_requests", config.max_pending_requests),
            ("grpc.server.max_pending_requests_hard_limit", config.max_pending_requests),
            # Queued stream opens wait instead of being cancelled after grpc's 30 s default.
            ("grpc.server_max_unrequested_time_in_server", int(max(600, 2 * config.max_ttl))),
            *KEEPALIVE_OPTIONS,
            *BIND_OPTIONS,
        ],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in hosted:
        # Generated code registers on what it is given: the stand-in guards the decoding.
        registration = GuardedRegistration(server, pool.Default().FindServiceByName(service.name))
        service.add_to_server(cast(grpc.aio.Server, registration))
    names = [service.name for service in hosted]
    enable_reflection(server, [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name])
    http = HttpListener(config, authenticator) if config.http_listen else None
    if http is not None:
        if metrics is not None:
            http.add_routes(metrics.routes())
            http.add_routes(Dashboard(store, feed, clock, cores.discovery, http.closing).routes())
        for service in hosted:
            http.add_routes(service.http_routes)
    try:
        port = _bind(server, config, credentials)
        if http is not None:
            http.bind()
    except BaseException:
        await server.stop(None)
        await store.close()
        raise
    await server.start()
    if http is not None:
        await http.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    app = App(config, store, server, port, health_servicer, streams, feed, http)
    for service in hosted:
        if service.loop is not None:
            app._tasks.append(asyncio.create_task(service.loop(app._stop_loops)))
    return app


def _metrics(store: Store, feed: ChangeFeed, cores: _Cores) -> Metrics:
    """Metrics fed by the store's commits and read from the cores at each scrape."""

    async def sample() -> Present:
        summary = cores.discovery.summary() if cores.discovery is not None else None
        ready, backing_off = (
            cores.distribution.queue_depth() if cores.distribution is not None else (0, 0)
        )
        revision = await store.current_revision()
        return Present(
            live_agents_by_role=summary.by_role if summary is not None else {},
            live_agents_by_capability=summary.by_capability if summary is not None else {},
            subtasks=await store.count_subtasks() if cores.distribution is not None else None,
            queue_ready=ready,
            queue_backing_off=backing_off,
            watcher_lags=[max(revision - at, 0) for at in feed.watcher_positions()],
            watch_overflows=feed.overflows,
            leader=store.is_leader(),
        )

    metrics = Metrics(sample)
    store.observe_commits(metrics.commit)
    if cores.distribution is not None:  # the process that commits sub-task transitions
        store.add_listener(metrics.changes)
    return metrics


def _bind(
    server: grpc.aio.Server, config: ServerConfig, credentials: grpc.ServerCredentials | None
) -> int:
    """Listen on ``config.listen`` (with TLS when ``credentials`` are given); return the port.

    Raises:
        Unavailable: the address is in use (another server?) or cannot be bound.
    """
    try:
        if credentials is None:
            return server.add_insecure_port(config.listen)
        return server.add_secure_port(config.listen, credentials)
    except RuntimeError:  # grpc's "Failed to bind to address"
        raise Unavailable(
            f"cannot listen on {config.listen}: the port is in use (another server?) or the "
            "address is not this machine's"
        ) from None


def raise_open_file_limit() -> None:
    """Raise the soft file-descriptor limit to the hard limit: each stream's connection is a fd."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def redact_password(url: str) -> str:
    """Return a store URL with its password, if any, replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = urllib.parse.quote(parts.username or "")
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


GC_YOUNG_THRESHOLD = 20_000
"""Allocations of tracked objects between two collections of the youngest generation."""


def settle_garbage_collector() -> None:
    """Keep the cycle collector off what start-up built, and run it less often.

    Every message of a stream allocates tracked objects (futures, frames, messages) that
    reference counting frees at once, yet each 700 of them (the default threshold) cost a
    collection, and every tenth of those walked the older generations too. What start-up
    allocated (modules, the store, the services) lives as long as the process: frozen, no
    collection walks it again.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def serve(config: ServerConfig) -> None:
    """Run a server until SIGTERM or SIGINT, then shut it down gracefully."""
    raise_open_file_limit()
    app = await start_app(config)
    settle_garbage_collector()
    address = f"{config.listen.rpartition(':')[0]}:{app.port}"
    store = redact_password(config.store)
    url = app.http.url if app.http is not None else ""
    log.info(
        "agentcoord listening on %s (services: %s; store: %s)%s",
        address,
        ", ".join(config.services),
        store,
        f"; dashboard and metrics at {url}" if url else "",
        extra={
            "address": address,
            "services": list(config.services),
            "store": store,
            "http": url,
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down (drain %.1fs, grace %.1fs)", config.drain, config.grace)
    await app.stop(drain=config.drain)
    log.info("stopped")
