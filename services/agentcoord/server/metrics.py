"""Prometheus metrics, served at ``/metrics`` on the HTTP listener.

Three sources, each cheap where it runs often:

- the call interceptor observes each finished RPC in a histogram child it keeps per
  (method, code), and counts open streams (:meth:`Metrics.rpc`, :meth:`Metrics.stream`);
- the store tells each commit's duration and size, and its committed changes feed the
  sub-task counters (retries and failures by class, lease expiries, ready to leased time);
- gauges of the present (live agents, sub-tasks by state, queue depth, watchers and their
  lag) are read when Prometheus scrapes, from the cores' memory and one store query.

Each server has its own registry, so servers in one process (tests) do not mix.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agentcoord.core.models import Change
from agentcoord.core.tasks import SubtaskCounts

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
"""Seconds: RPCs and commits take from a fraction of a millisecond (loopback) to seconds."""
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
"""Seconds a sub-task waits from READY to LEASED: up to an hour when agents are busy."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Operations per commit (group commit caps a batch at 256)."""


@dataclass(frozen=True, slots=True)
class Present:
    """Figures of the present, read at each scrape."""

    live_agents_by_role: Mapping[str, int] = field(default_factory=dict)
    live_agents_by_capability: Mapping[str, int] = field(default_factory=dict)
    subtasks: SubtaskCounts | None = None
    queue_ready: int = 0
    queue_backing_off: int = 0
    watcher_lags: Sequence[int] = ()
    watch_overflows: int = 0
    leader: bool = False


Sampler = Callable[[], Awaitable[Present]]
"""Reads the present figures (the composition root knows where from)."""


class _PresentCollector(Collector):
    """Turns the latest :class:`Present` into gauges."""

    def __init__(self) -> None:
        self.present = Present()

    def collect(self) -> Iterator[Metric]:
        present = self.present
        yield _labelled(
            "agentcoord_live_agents",
            "Live agents, by role.",
            "role",
            present.live_agents_by_role,
        )
        yield _labelled(
            "agentcoord_live_agents_by_capability",
            "Live agents, by capability (an agent counts once per capability).",
            "capability",
            present.live_agents_by_capability,
        )
        if present.subtasks is not None:
            counts = present.subtasks
            yield _labelled(
                "agentcoord_subtasks",
                "Sub-tasks of all tasks, by state.",
                "state",
                {spec.name: getattr(counts, spec.name) for spec in fields(counts)},
            )
            yield _labelled(
                "agentcoord_queue_depth",
                "READY sub-tasks not leased: waiting for an agent, or backing off after a failure.",
                "waiting_for",
                {"agent": present.queue_ready, "backoff": present.queue_backing_off},
            )
        yield GaugeMetricFamily(
            "agentcoord_watchers", "Open watches of the change log.", len(present.watcher_lags)
        )
        yield GaugeMetricFamily(
            "agentcoord_watcher_lag_revisions",
            "Revisions the furthest-behind watch has yet to reach.",
            max(present.watcher_lags, default=0),
        )
        yield CounterMetricFamily(
            "agentcoord_watch_overflows",
            "Times a watcher fell so far behind that it re-read the store.",
            present.watch_overflows,
        )
        yield GaugeMetricFamily(
            "agentcoord_replica_leader",
            "1 on the replica that sweeps agent and lease expiries (SQLite: always), else 0.",
            int(present.leader),
        )


def _labelled(name: str, text: str, label: str, values: Mapping[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, text, labels=[label])
    for value, count in sorted(values.items()):
        family.add_metric([value], count)
    return family


class Metrics:
    """The server's metrics and their registry."""

    def __init__(self, sampler: Sampler) -> None:
        """Register every metric; ``sampler`` reads the present figures at each scrape."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._sampler = sampler
        self._present = _PresentCollector()
        self.registry.register(self._present)
        self._rpc_seconds = Histogram(
            "agentcoord_rpc_duration_seconds",
            "Time from an RPC's start to its status (a stream's whole life), by status code; "
            "the _count is the number of RPCs.",
            ["service", "method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._rpc_children: dict[tuple[str, str], Histogram] = {}
        self._open_streams = Gauge(
            "agentcoord_open_streams",
            "Streams open now, by kind (service and method).",
            ["service", "method"],
            registry=self.registry,
        )
        self._commit_seconds = Histogram(
            "agentcoord_store_commit_duration_seconds",
            "Time a group commit (one transaction) took.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._commit_size = Histogram(
            "agentcoord_store_commit_operations",
            "Write operations committed together in one transaction.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._retries = Counter(
            "agentcoord_subtask_retries_total",
            "Failed attempts put back to READY for another attempt, by failure class.",
            ["failure_class"],
            registry=self.registry,
        )
        self._failures = Counter(
            "agentcoord_subtask_failures_total",
            "Sub-tasks that FAILED for good, by the class of their last failure.",
            ["failure_class"],
            registry=self.registry,
        )
        self._expiries = Counter(
            "agentcoord_lease_expiries_total",
            "Leases that expired without a renewal (failure class lease_lost).",
            registry=self.registry,
        )
        self._queue_wait = Histogram(
            "agentcoord_subtask_queue_wait_seconds",
            "Time from a sub-task turning READY (or its back-off starting) to its lease.",
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self._ready_since: dict[str, datetime] = {}
        self._revision = 0
        """Latest revision counted: a listener may hear a change twice (replicas)."""

    # Calls (the interceptor)

    def rpc(self, method: str, code: str, seconds: float) -> None:
        """Count a finished call of ``method`` (its full name) with status ``code``."""
        child = self._rpc_children.get((method, code))
        if child is None:
            service, _, name = method.strip("/").partition("/")
            child = self._rpc_seconds.labels(service, name, code)
            self._rpc_children[(method, code)] = child
        child.observe(seconds)

    def stream(self, method: str) -> Gauge:
        """Return the open-streams gauge of ``method`` (inc at open, dec at end)."""
        service, _, name = method.strip("/").partition("/")
        return self._open_streams.labels(service, name)

    # The store

    def commit(self, seconds: float, operations: int) -> None:
        """Observe one group commit."""
        self._commit_seconds.observe(seconds)
        self._commit_size.observe(operations)

    def changes(self, changes: Iterable[Change]) -> None:
        """Count what committed sub-task transitions say."""
        for change in changes:
            if change.revision <= self._revision:
                continue
            self._revision = change.revision
            if not change.kind.startswith("subtask."):
                continue
            details = change.details
            subtask_id = details.get("subtask_id", "")
            failure = details.get("failure")
            to = details.get("to")
            if failure is not None:
                failure_class = str(failure.get("failure_class", ""))
                if failure_class == "lease_lost":
                    self._expiries.inc()
                if to == "ready":
                    self._retries.labels(failure_class).inc()
                elif to == "failed":
                    self._failures.labels(failure_class).inc()
            if to == "ready":
                self._ready_since[subtask_id] = change.time
            else:
                since = self._ready_since.pop(subtask_id, None)
                if since is not None and to == "leased":
                    self._queue_wait.observe(max((change.time - since).total_seconds(), 0.0))

    # The endpoint

    async def scrape(self, request: Request) -> Response:
        """Answer a Prometheus scrape in the text format."""
        self._present.present = await self._sampler()
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def routes(self) -> list[Route]:
        """The ``/metrics`` route."""
        return [Route("/metrics", self.scrape, methods=["GET"])]
