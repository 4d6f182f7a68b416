"""``make bench``: Discovery, StateSync and Distribution beside a bare grpc.aio echo service.

.venv/bin/python -m tests.bench [--quick] [--agents 1000,10000] [--channels 16,agent]
    [--duration 20] [--calls 2000] [--store sqlite|postgresql://...] [--output FILE]
    [--only discovery|statesync|distribution|replicas|watchers] [--rmw-duration 10]
    [--rmw-writers 32] [--rmw-keys 4] [--subtasks 10000] [--dist-agents 16,100] [--capacity 4]
    [--cycles 500]
    [--replica-store postgresql://...] [--watch-writes 1000]
    [--replay-changes 51000] [--replayers 8] [--fanout-watchers 500] [--watch-writers 8]
    [--watch-duration 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tests.bench import (
    distribution,
    failover,
    procs,
    replicas,
    report,
    statesync,
    store_writes,
    unary,
    watchers,
)
from tests.bench.collector import Collector
from tests.bench.expiry import ExpiryResult, measure_expiry
from tests.bench.load import LoadResult, LoadSpec, OpenStats, agents_by_server, run_load
from tests.bench.report import Table, ms, percentile, ratio

LIMITED_PENDING = 1000
"""grpc core's default ``grpc.server.max_pending_requests``, for the demonstration run."""
RMW_NAMES = {
    "statesync": "contended update()",
    "cas": "contended read + compare-and-set",
    "modify": "atomic increments (ModifyState)",
}
"""Row names of the contended increment loads by mode (echo is their baseline)."""
REPLICA_BACKGROUND_WRITERS = 8
"""Writers on replica B during the second cross-replica watch measurement."""
REPLICA_COUNTS = (1, 2, 3)
"""Replicas of the throughput and heartbeat capacity runs (1 and 3 with --quick)."""
REPLICA_FLEET = 1000
"""Agents of the heartbeat capacity runs on replicas (at --ttl, spread over them)."""
REPLICA_FLEET_CONNECTIONS = 16
"""Their client connections, spread over the replicas too."""
REPLICA_COMMIT_WRITERS = (1, 32, 128)
"""Concurrent writers of the PostgreSQL store's own write rate."""
FAILOVER_AGENTS = 8
"""SDK agents moving off a killed replica."""
TAKEOVER_ROUNDS = 3
"""Kills of the sweeping leader (1 with --quick)."""
FLEET_UP_SECONDS = 15.0
"""Issue 12: a 10,000-agent fleet registered and streaming within this many seconds."""
HEARTBEAT_CPU_TARGET = 100e-6
"""Issue 12: server CPU seconds per heartbeat message at most."""
PER_AGENT_CONNECTIONS_MAX = 2000
"""Beyond this many agents, one connection per agent makes the load generator the bottleneck."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags; ``--quick`` changes the defaults of the others to a smoke run."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short smoke run (< 1 min)")
    parser.add_argument("--agents", help="heartbeat fleet sizes (default 1000,10000; quick 1000)")
    parser.add_argument(
        "--channels",
        help="client connections per fleet; 'agent' = one per agent, for fleets up to "
        f"{PER_AGENT_CONNECTIONS_MAX:,} (default 16,agent; quick 16)",
    )
    parser.add_argument("--duration", type=float, help="seconds measured per load (20; quick 5)")
    parser.add_argument("--calls", type=int, help="sequential calls per unary figure (2000; 200)")
    parser.add_argument("--workers", type=int, default=4, help="load generator processes")
    parser.add_argument("--ttl", type=float, default=3.0, help="heartbeat fleet TTL, seconds")
    parser.add_argument("--expiry-agents", type=int, help="agents killed for expiry (50; 20)")
    parser.add_argument("--expiry-ttl", type=float, default=1.0, help="their TTL, seconds")
    parser.add_argument(
        "--long-ttl",
        type=float,
        help="also run every fleet at this TTL, on the first --channels value "
        "(default 10, the server's default; quick 0: no)",
    )
    parser.add_argument(
        "--no-pending-demo",
        action="store_true",
        help=f"skip the largest fleet (at --long-ttl) against --max-pending-requests "
        f"{LIMITED_PENDING}",
    )
    parser.add_argument(
        "--answer-every",
        action="store_true",
        help="heartbeat fleets also with every message answered and awaited (the SDK before "
        "ack_interval), beside the default shape (as the SDK: answers only when news)",
    )
    parser.add_argument("--store", default="sqlite", help="sqlite (default) or postgresql://...")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the servers under load (Discovery, StateSync, Distribution)",
    )
    parser.add_argument(
        "--only",
        choices=["discovery", "statesync", "distribution", "replicas", "watchers"],
        help="run one service's workloads, or the replicas or watchers section",
    )
    parser.add_argument(
        "--replica-store",
        default=os.environ.get("AGENTCOORD_TEST_POSTGRES_DSN", ""),
        help="PostgreSQL URL of the replicas section when --store is sqlite (default "
        "$AGENTCOORD_TEST_POSTGRES_DSN; without one the section is skipped)",
    )
    parser.add_argument(
        "--watch-writes", type=int, help="sequential writes of the cross-replica watch (1000; 100)"
    )
    parser.add_argument(
        "--rmw-duration", type=float, help="seconds of contended read-modify-write (10; quick 3)"
    )
    parser.add_argument("--rmw-writers", type=int, default=32, help="concurrent update() writers")
    parser.add_argument("--rmw-keys", type=int, default=4, help="hot keys they increment")
    parser.add_argument(
        "--subtasks", type=int, help="sub-tasks of the end-to-end task (10000; quick 1000)"
    )
    parser.add_argument(
        "--dist-agents", default="16,100", help="agents completing them, one run each (16,100)"
    )
    parser.add_argument("--capacity", type=int, default=4, help="capacity of each such agent")
    parser.add_argument("--cycles", type=int, help="sequential coordination cycles (500; 50)")
    parser.add_argument(
        "--replay-changes", type=int, help="change log length replayed (51000; quick 5000)"
    )
    parser.add_argument("--replayers", type=int, default=8, help="watchers replaying it (8)")
    parser.add_argument(
        "--fanout-watchers", type=int, help="watchers of one hot prefix (500; quick 100)"
    )
    parser.add_argument("--watch-writers", type=int, default=8, help="its writers (8)")
    parser.add_argument(
        "--watch-duration", type=float, help="seconds of GetAgent per watcher load (10; quick 3)"
    )
    parser.add_argument("--output", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    quick = args.quick
    args.agents = [int(n) for n in (args.agents or ("1000" if quick else "1000,10000")).split(",")]
    args.channels = (args.channels or ("16" if quick else "16,agent")).split(",")
    args.duration = args.duration or (5.0 if quick else 20.0)
    args.calls = args.calls or (200 if quick else 2000)
    args.rmw_duration = args.rmw_duration or (3.0 if quick else 10.0)
    args.expiry_agents = args.expiry_agents or (20 if quick else 50)
    args.subtasks = args.subtasks or (1000 if quick else 10_000)
    args.dist_agents = [int(n) for n in args.dist_agents.split(",")]
    args.cycles = args.cycles or (50 if quick else 500)
    args.watch_writes = args.watch_writes or (100 if quick else 1000)
    if args.store.startswith("postgres"):
        args.replica_store = args.store
    args.replay_changes = args.replay_changes or (5000 if quick else 51_000)
    args.fanout_watchers = args.fanout_watchers or (100 if quick else 500)
    args.watch_duration = args.watch_duration or (3.0 if quick else 10.0)
    args.pending_demo = not (quick or args.no_pending_demo) and max(args.agents) > LIMITED_PENDING
    if args.long_ttl is None:
        args.long_ttl = 0.0 if quick else 10.0
    return args


def progress(text: str) -> None:
    """One line of progress on stderr (the table goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Bench:
    """Runs every workload and fills the table."""

    def __init__(self, args: argparse.Namespace, workdir: Path, stack: ExitStack) -> None:
        self.args = args
        self.workdir = workdir
        self.stack = stack
        self.stores = procs.Stores(args.store, workdir)
        stack.callback(self.stores.drop_all)
        self.table = Table()
        self.serial = 0
        self.store_urls: dict[str, str] = {}
        """Store URL of each agentcoord server started, by server name."""
        self.replica_counts = (1, 3) if args.quick else REPLICA_COUNTS
        """Replicas of the replicas section's throughput and heartbeat runs."""

    def server(
        self,
        kind: str,
        extra: list[str] | None = None,
        store: str | None = None,
        env: dict[str, str] | None = None,
    ) -> procs.Server:
        """Start a server on a fresh store (or ``store``); it is stopped when the bench ends.

        ``env`` adds variables to its environment.
        """
        self.serial += 1
        name = f"{kind}-{self.serial}"
        if kind == "echo":
            server = procs.start_echo(name, self.workdir)
        else:
            url = store or self.stores.fresh(name)
            self.store_urls[name] = url
            server = procs.start_agentcoord(
                name,
                url,
                self.workdir,
                ["--default-ttl", str(self.args.ttl), *(extra or [])],
                profile=self.args.profile and kind in ("load", "state-rmw", "dist", "watchers"),
                env=env,
            )
        self.stack.callback(server.stop)
        return server

    def run(self) -> None:
        """All workloads in order; echo always next to the figure it is compared with."""
        echo = self.server("echo")
        only = self.args.only
        if only in (None, "statesync"):
            self.statesync(echo)
        if only in (None, "distribution"):
            self.distribution(echo)
        if only in (None, "replicas"):
            self.replicas()
        if only in (None, "watchers"):
            self.watchers()
        if only in ("statesync", "distribution", "replicas", "watchers"):
            return
        self.unary(echo)
        list_during: Callable[[procs.Server], Any] | None = self._list_during(echo)
        first = self.args.channels[0]
        for agents in self.args.agents:
            for channels in self.args.channels:
                if channels == "agent" and agents > PER_AGENT_CONNECTIONS_MAX:
                    progress(f"skipping 1 conn/agent for {agents:,} agents (see --help)")
                    continue
                self.pair(agents, _connections(agents, channels), self.args.ttl, list_during)
                list_during = None
            if self.args.long_ttl:
                self.pair(agents, _connections(agents, first), self.args.long_ttl)
        if self.args.pending_demo:
            largest = max(self.args.agents)
            ttl = self.args.long_ttl or self.args.ttl
            spec = LoadSpec(
                "discovery", largest, _connections(largest, first), self.args.workers, ttl
            )
            extra = ["--max-pending-requests", str(LIMITED_PENDING)]
            result = self.load(spec, extra, duration=min(5.0, self.args.duration))
            self.heartbeat_rows(result, None, f", --max-pending-requests {LIMITED_PENDING}")
            self.table.notes.append(
                f"The --max-pending-requests {LIMITED_PENDING} run (grpc core's default) is the "
                f"same load as the {spec.label} run above it, which uses our default "
                "(20,000); compare their start and storm rows."
            )
        self.expiry()

    def statesync(self, echo: procs.Server) -> None:
        """StateSync: unary PutState / GetState, then contended update() beside echo."""
        # The second server serves /metrics: its interceptor observes every call. The third
        # traces every call, exporting its spans over OTLP to a receiver in this process.
        with Collector() as collector:
            variants = (
                ([], {}, ""),
                (["--http-listen", "127.0.0.1:0"], {}, ", with /metrics"),
                ([], {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint}, ", with traces"),
            )
            for extra, env, note in variants:
                self.statesync_unary(echo, extra, env, note)
            if collector.spans:
                self.table.notes.append(
                    f"The traced StateSync server exported {collector.spans:,} spans over OTLP "
                    "(a server span per call, batched; the callers sent no trace context)."
                )
        self.statesync_rmw()

    def statesync_unary(
        self, echo: procs.Server, extra: list[str], env: dict[str, str], note: str
    ) -> None:
        """PutState and GetState, sequential, beside echo, on a server started with these."""
        server = self.server("state", extra, env=env)
        progress(f"StateSync unary latency{note}, {self.args.calls} sequential calls each")
        samples = asyncio.run(
            statesync.measure_unary(server.address, echo.address, self.args.calls, warmup=50)
        )
        server.stop()
        e50 = percentile(samples["echo"], 50)
        for name, bound in (("PutState", 1.5), ("GetState", 1.2)):  # issue 12's targets
            self.latency_row(
                f"unary {name}, 1 sequential caller{note}",
                samples[name],
                samples["echo"],
                f"p50 <= {bound:g}x echo",
                percentile(samples[name], 50) <= bound * e50,
            )

    def statesync_rmw(self) -> None:
        """Contended read-modify-write: update(), CAS and ModifyState, beside echo."""
        args = self.args
        runs: dict[str, statesync.RmwResult] = {}
        for mode in ("echo", "statesync", "cas", "modify"):
            spec = statesync.RmwSpec(
                mode, args.rmw_writers, args.rmw_keys, args.workers, args.rmw_duration
            )
            server = self.server("echo" if mode == "echo" else "state-rmw")
            progress(f"{RMW_NAMES.get(mode, 'echo')}: {spec.label}, {spec.duration:g} s")
            result = statesync.run_rmw(spec, server)
            server.stop()
            progress(
                f"  {result.rate:,.0f} increments/s, {result.conflicts:,} conflicts, "
                f"lost {result.lost if mode != 'echo' else '-'}, "
                f"server {result.server_cpu:.0%}, "
                f"clients {result.client_cpu:.0%} of a core"
            )
            if server.profile:
                print(f"## cProfile of {server.name} ({spec.label})\n{server.profile_summary()}")
            runs[mode] = result
        for mode in ("statesync", "cas", "modify"):
            self.rmw_rows(runs[mode], runs["echo"])

    def distribution(self, echo: procs.Server) -> None:
        """Distribution: sub-tasks end to end beside echo, then the coordination cycle."""
        args = self.args
        # The fleets of the throughput target, pushed, then the first of them pulling with
        # ClaimSubtask, then one agent of capacity 1: the latency of an assignment on an
        # otherwise idle server (one sub-task in flight at a time).
        shapes = [(args.subtasks, agents, args.capacity, False) for agents in args.dist_agents]
        shapes.append((args.subtasks, args.dist_agents[0], args.capacity, True))
        shapes.append((200 if args.quick else 500, 1, 1, False))
        for subtasks, agents, capacity, pull in shapes:
            runs: dict[str, distribution.FlowResult] = {}
            for mode in ("echo", "distribution"):
                workers = min(args.workers, agents)
                spec = distribution.FlowSpec(mode, subtasks, agents, capacity, workers, pull)
                server = self.server("echo" if mode == "echo" else "dist")
                progress(f"end to end, {mode}: {spec.label}")
                result = distribution.run_flow(spec, server)
                if mode == "distribution":
                    self._check_flow(server, result)
                server.stop()
                progress(
                    f"  {result.rate:,.0f} sub-tasks/s ({result.ok:,} in {result.seconds:.2f} s), "
                    f"server {result.server_cpu:.0%}, clients {result.client_cpu:.0%} of a core"
                    + (f", errors {dict(result.errors)}" if result.errors else "")
                )
                if server.profile:
                    print(
                        f"## cProfile of {server.name} ({spec.label})\n{server.profile_summary()}"
                    )
                runs[mode] = result
            self.flow_rows(runs["distribution"], runs["echo"])
        self.cycle(echo)

    def _check_flow(self, server: procs.Server, result: distribution.FlowResult) -> None:
        """Exactly-once checks, then SIGKILL and a restart on the same store."""
        if not result.task_id:
            return
        progress("  checking: GetTask(FULL), ListEvents subtask.succeeded")
        asyncio.run(distribution.check_exactly_once(server.address, result))
        if server.profile:
            server.stop()  # cProfile writes its output at a graceful exit only
            how = "stopped (SIGTERM: --profile)"
        else:
            server.proc.kill()
            server.proc.wait(10)
            how = "killed -9"
        restarted = self.server("dist-restart", store=self.store_urls[server.name])
        progress(f"  {how} and restarted on the same store: GetTask(FULL)")
        asyncio.run(distribution.check_after_restart(restarted.address, result))
        restarted.stop()

    def flow_rows(self, result: distribution.FlowResult, echo: distribution.FlowResult) -> None:
        """The rows of one end-to-end run, beside the echo run of the same shape."""
        spec, checks, total = result.spec, result.checks, result.spec.subtasks
        name = f"sub-tasks end to end, {spec.label}"
        target, met = ("", None)
        if spec.agents == 16:
            goal = 1500 if spec.pull else 2500
            target, met = f">= {goal:,}/s", result.finished and result.rate >= goal
        self.flow_rate_row(name, result, echo, target, met)
        self.table.add(
            name,
            "sub-tasks completed/s, first assignment -> last completion",
            f"{result.steady_rate:,.0f}",
            f"{echo.steady_rate:,.0f}",
            ratio(result.steady_rate, echo.steady_rate),
        )
        self.table.add(
            name,
            "SubmitTask call ms; submit -> first assignment ms",
            f"{ms(result.submit_seconds)}; {ms(result.first_assignment)}",
        )
        self.latency_row(
            name,
            result.refill,
            echo.refill,
            figure="assignment latency, capacity freed -> next assignment, p50 / p99 ms",
        )
        self.latency_row(
            name,
            result.queued,
            echo.queued,
            figure="READY (submit sent) -> assigned, p50 / p99 ms (queue wait)",
        )
        self.latency_row(
            name, result.complete, echo.complete, figure="CompleteSubtask p50 / p99 ms"
        )
        self.table.add(
            name,
            "server CPU, % of one core",
            f"{result.server_cpu:.0%}",
            f"{echo.server_cpu:.0%}",
            ratio(result.server_cpu, echo.server_cpu),
        )
        self.table.add(
            name,
            "load generator CPU, % of one core",
            f"{result.client_cpu:.0%}",
            f"{echo.client_cpu:.0%}",
        )
        state = checks.task_state.removeprefix("STATE_")
        self.table.add(
            name,
            "exactly once: task; sub-tasks SUCCEEDED holding their one completer's result",
            f"{state}; {checks.matching:,} of {total:,} ({checks.succeeded:,} SUCCEEDED)",
            target="all",
            met=state == "SUCCEEDED" and checks.matching == checks.succeeded == total,
        )
        errors = ", ".join(f"{k} {v:,}" for k, v in result.errors.most_common()) or "none"
        if result.revoked:
            errors += f"; {result.revoked:,} leases revoked"
        self.table.add(
            name,
            "successful CompleteSubtask responses; sub-tasks completed twice; errors",
            f"{result.ok:,}; {result.duplicates:,}; {errors}",
            target=f"{total:,}; 0",
            met=result.ok == total and not result.duplicates,
        )
        self.table.add(
            name,
            "change log subtask.succeeded entries (distinct sub-tasks; ListEvents pages)",
            f"{checks.events:,} ({checks.event_subtasks:,}; {checks.event_pages})",
            target="1 per sub-task",
            met=checks.events == checks.event_subtasks == total,
        )
        restarted = checks.restarted_state.removeprefix("STATE_")
        self.table.add(
            name,
            "durable: after SIGKILL + restart on the same store, GetTask(FULL)",
            f"{restarted}; {max(0, checks.restarted_matching):,} of {total:,} results intact",
            target="all",
            met=restarted == "SUCCEEDED" and checks.restarted_matching == total,
        )
        early = sum(1 for value in result.refill if value < 0)
        if early:
            self.table.notes.append(
                f"{name}: {early:,} of {len(result.refill):,} refills arrived before the agent "
                "had read the CompleteSubtask response that freed the slot (negative latency)."
            )

    def flow_rate_row(
        self,
        name: str,
        result: distribution.FlowResult,
        echo: distribution.FlowResult,
        target: str = "",
        met: bool | None = None,
    ) -> None:
        """The sub-tasks/s row of an end-to-end run, beside the echo run of its shape."""
        self.table.add(
            name,
            "sub-tasks completed/s, submit -> last completion (seconds)",
            f"{result.rate:,.0f} ({result.seconds:.2f} s)",
            f"{echo.rate:,.0f} ({echo.seconds:.2f} s)",
            ratio(result.rate, echo.rate),
            target,
            met,
        )

    def replicas(self) -> None:
        """Replicas on one PostgreSQL schema: watch latency, throughput, capacity, fail-over."""
        if not self.args.replica_store:
            self.table.notes.append(
                "Replicas: skipped (they need PostgreSQL: --store postgresql://..., "
                "--replica-store or AGENTCOORD_TEST_POSTGRES_DSN)."
            )
            return
        stores = procs.Stores(self.args.replica_store, self.workdir)
        self.stack.callback(stores.drop_all)
        url = stores.fresh("replicas")
        admin = ["--admin-token", replicas.ADMIN_TOKEN]
        a = self.server("replica-a", admin, store=url)
        b = self.server("replica-b", admin, store=url)
        writes = self.args.watch_writes
        for background in (0, REPLICA_BACKGROUND_WRITERS):
            progress(f"cross-replica watch latency, {writes} writes, {background} writers on B")
            samples, puts = asyncio.run(
                replicas.measure_watch_latency(a.address, b.address, writes, 50, background)
            )
            self.replica_rows(samples, puts, background)
        b.stop()
        a.stop()
        ceiling = self.replica_commits(stores)
        distributed = self.replica_distribution(stores)
        heartbeats = self.replica_heartbeats(stores)
        self.replica_projection(distributed, heartbeats, ceiling)
        self.replica_failover(stores)

    def _replica_set(self, stores: procs.Stores, name: str, count: int) -> list[procs.Server]:
        """``count`` replicas on one fresh schema of ``stores``."""
        url = stores.fresh(name)
        return [self.server(name, store=url) for _ in range(count)]

    def replica_commits(self, stores: procs.Stores) -> dict[int, float]:
        """PostgreSQL's write rate through one store, no gRPC: the ceiling all replicas share.

        Returns blind puts committed per second by number of concurrent writers.
        """
        duration = 1.0 if self.args.quick else 3.0
        rates: dict[int, float] = {}
        for writers in REPLICA_COMMIT_WRITERS:
            progress(f"PostgreSQL store alone: blind puts, {writers} writer(s), {duration:g} s")
            url = stores.fresh("replica-commits")
            rates[writers], _ = asyncio.run(store_writes.measure(url, "put", writers, duration))
        one = rates[1]
        self.table.add(
            "PostgreSQL store alone (no gRPC, one process): blind puts, one revision each",
            f"puts/s with {', '.join(str(n) for n in rates)} concurrent writers (1 writer: "
            "one commit at a time, ms each)",
            f"{one:,.0f} ({1000 / one:.2f} ms); "
            + "; ".join(f"{rate:,.0f}" for n, rate in rates.items() if n > 1),
        )
        return rates

    def replica_distribution(self, stores: procs.Stores) -> dict[int, distribution.FlowResult]:
        """Sub-tasks end to end on 1, 2 and 3 replicas of one schema, beside echo."""
        args = self.args
        agents = 16
        workers = min(args.workers, agents)
        echo_server = self.server("echo")
        spec = distribution.FlowSpec("echo", args.subtasks, agents, args.capacity, workers)
        progress(f"end to end, echo: {spec.label}")
        echo = distribution.run_flow(spec, echo_server)
        echo_server.stop()
        runs: dict[int, distribution.FlowResult] = {}
        for count in self.replica_counts:
            servers = self._replica_set(stores, f"replica-dist-{count}", count)
            spec = distribution.FlowSpec(
                "distribution", args.subtasks, agents, args.capacity, workers
            )
            progress(f"end to end on {count} replica(s): {spec.label}")
            result = distribution.run_flow(spec, servers[0], servers[1:])
            progress("  checking: GetTask(FULL), ListEvents subtask.succeeded")
            asyncio.run(distribution.check_exactly_once(servers[-1].address, result))
            result.revisions = asyncio.run(watchers.head_revision(servers[-1].address))
            for server in servers:
                server.stop()
            progress(
                f"  {result.rate:,.0f} sub-tasks/s ({result.ok:,} in {result.seconds:.2f} s), "
                f"servers {result.server_cpu:.0%} of a core"
            )
            runs[count] = result
            checks = result.checks
            name = (
                f"sub-tasks end to end on {count} replica(s) (PostgreSQL), {spec.label}, "
                "agents spread over the replicas"
            )
            self.flow_rate_row(name, result, echo)
            self.table.add(
                name,
                "server CPU, all replicas: % of one core; ms per sub-task; store revisions "
                "per sub-task",
                f"{result.server_cpu:.0%}; {1000 * _per_subtask(result):.2f} ms; "
                f"{result.revisions / args.subtasks:.2f}",
                f"{echo.server_cpu:.0%}; {1000 * _per_subtask(echo):.2f} ms",
                ratio(_per_subtask(result), _per_subtask(echo)),
            )
            self.table.add(
                name,
                "SUCCEEDED with the completer's result; OK responses; duplicates; log entries",
                f"{checks.matching:,}; {result.ok:,}; {result.duplicates:,}; {checks.events:,}",
                target=f"{args.subtasks:,}; {args.subtasks:,}; 0; {args.subtasks:,}",
                met=checks.exactly_once(args.subtasks, result.ok),
            )
        one = runs[1]
        self.table.add(
            "sub-tasks end to end, N replicas vs 1 (same machine, same 2 cores)",
            "throughput ratio; server CPU per sub-task ratio",
            "; ".join(
                f"{n}: {ratio(runs[n].rate, one.rate)}, "
                f"{ratio(_per_subtask(runs[n]), _per_subtask(one))}"
                for n in self.replica_counts[1:]
            ),
        )
        return runs

    def replica_heartbeats(self, stores: procs.Stores) -> dict[int, LoadResult]:
        """A heartbeat fleet spread over 1, 2 and 3 replicas of one schema, beside echo."""
        args = self.args
        shape = (REPLICA_FLEET, REPLICA_FLEET_CONNECTIONS, args.workers, args.ttl)
        echo = self.load(LoadSpec("echo", *shape))
        runs: dict[int, LoadResult] = {}
        for count in self.replica_counts:
            servers = self._replica_set(stores, f"replica-hb-{count}", count)
            spec = LoadSpec("discovery", *shape)
            progress(f"heartbeats on {count} replica(s): {spec.label}")
            result = run_load(spec, servers[0], args.duration, others=servers[1:])
            for server in servers:
                server.stop()
            stats = result.stats
            progress(
                f"  start: {_opens(stats.start)}; {result.rate:.0f}/{result.expected_rate:.0f} "
                f"msg/s, servers {', '.join(f'{c:.0%}' for c in result.server_cpus)}; storm: "
                f"{_opens(stats.storm) if result.stormed else 'skipped (fleet not up)'}"
            )
            runs[count] = result
            name = f"heartbeats on {count} replica(s) (PostgreSQL), {spec.label}, spread"
            self.table.add(
                name,
                "heartbeats/s sustained (expected)",
                f"{result.rate:,.0f} ({result.expected_rate:,.0f})",
                f"{echo.rate:,.0f}",
                ratio(result.rate, echo.rate),
            )
            shares = agents_by_server(spec, count)
            per_replica = [
                _micros(cpu, result.rate * share / spec.agents)
                for cpu, share in zip(result.server_cpus, shares, strict=True)
            ]
            self.table.add(
                name,
                "server CPU per heartbeat message, us: each replica (its agents); all "
                "replicas together (% of one core)",
                f"{', '.join(f'{us} ({n})' for us, n in zip(per_replica, shares, strict=True))}; "
                f"{_micros(result.server_cpu, result.rate)} ({result.server_cpu:.0%})",
                f"{_micros(echo.server_cpu, echo.rate)} ({echo.server_cpu:.0%})",
                ratio(result.server_cpu / result.rate, echo.server_cpu / echo.rate)
                if result.rate and echo.rate
                else "-",
            )
            held = (
                stats.start.opened == spec.agents
                and not stats.start.lost
                and not stats.storm.lost
                and not stats.breaks
            )
            self.latency_row(
                name, stats.latencies, echo.stats.latencies, figure="answer p50 / p99 ms"
            )
            self.table.add(
                name,
                "fleet held: start; reconnect storm; streams broken outside the storm",
                f"{_opens(stats.start)}; "
                f"{_opens(stats.storm) if result.stormed else 'skipped: fleet not up'}; "
                f"{dict(stats.breaks) or 0}",
                target="all up, no session lost",
                met=held,
            )
        self.replica_observer(stores, LoadSpec("discovery", *shape))
        return runs

    def replica_observer(self, stores: procs.Stores, spec: LoadSpec) -> None:
        """The cost of following agents that heartbeat another replica: B holds no stream."""
        a, b = self._replica_set(stores, "replica-obs", 2)
        progress(f"heartbeats all on replica A, B holds none: {spec.label}")
        started, before = time.monotonic(), b.cpu_seconds()
        result = run_load(spec, a, self.args.duration)
        b_cpu = (b.cpu_seconds() - before) / (time.monotonic() - started)
        a.stop()
        b.stop()
        progress(f"  A {result.server_cpu:.0%} in the window, B {b_cpu:.0%} over the load")
        self.table.add(
            f"heartbeats on 2 replicas (PostgreSQL), {spec.label}, all on A: B holds none",
            "A: server CPU per heartbeat message us (% of one core); B: % of one core over "
            "the whole load (start, window, storm)",
            f"{_micros(result.server_cpu, result.rate)} ({result.server_cpu:.0%}); {b_cpu:.0%}",
        )

    def replica_projection(
        self,
        distributed: dict[int, distribution.FlowResult],
        heartbeats: dict[int, LoadResult],
        commits: dict[int, float],
    ) -> None:
        """Computed rows: what N replicas on N cores of their own would carry, from CPU per op."""
        batches, puts = commits[1], max(commits.values())
        label = (
            "PROJECTION (computed, not measured): N replicas, each on a core of its own "
            "(PostgreSQL and the clients on others), from the server CPU per operation at N"
        )
        cells = []
        for n, result in distributed.items():
            cost = _per_subtask(result)
            cells.append(f"{n}: {n / cost:,.0f}/s" if cost else f"{n}: -")
        revisions = max(r.revisions for r in distributed.values()) / self.args.subtasks
        committed = max(r.rate * r.revisions / self.args.subtasks for r in distributed.values())
        self.table.add(
            f"{label}: sub-tasks/s",
            "N: N / (server CPU s per sub-task, all replicas); PostgreSQL: the most revisions/s "
            "the runs above committed; the store alone's best puts/s / revisions per sub-task",
            f"{'; '.join(cells)}; {committed:,.0f} revisions/s; ~{puts / revisions:,.0f}/s",
            target="projection",
            met="n/a",
        )
        cells = []
        for n, result in heartbeats.items():
            per_message = result.server_cpu / result.rate if result.rate else 0.0
            if per_message:
                rate = n / per_message
                agents = rate * result.stats.interval
                cells.append(
                    f"{n}: {rate:,.0f} msg/s ({agents:,.0f} agents at TTL {result.spec.ttl:g} s)"
                )
        self.table.add(
            f"{label}: heartbeats",
            "N: N / (server CPU s per heartbeat message, all replicas)",
            "; ".join(cells),
            target="projection",
            met="n/a",
        )
        self.table.notes.append(
            "Replica projection: every writing batch of every replica locks the one revision "
            f"counter row until it commits, so commits take turns: one writer alone commits "
            f"{batches:,.0f} batches/s here ({1000 / batches:.1f} ms each), a ceiling on "
            "batches/s for the whole cluster; group commit puts more writes in a batch as "
            f"the load grows (at best {puts:,.0f} puts/s through one store, see its row). "
            "PostgreSQL shares this machine's 2 cores with other sessions' tests, so its "
            "figures are of the moment measured. Heartbeats write one batch per replica per "
            "flush interval, whatever the fleet."
        )

    def replica_failover(self, stores: procs.Stores) -> None:
        """kill -9 of the replica agents use, then of the sweeping leader, three replicas."""
        args = self.args
        url = stores.fresh("replica-failover")
        extra = ["--http-listen", "127.0.0.1:0"]
        servers = [self.server("replica-fo", extra, store=url) for _ in range(3)]
        urls = [failover.metrics_url(server.log) for server in servers]
        leader = asyncio.run(failover.the_leader(urls))
        victim = (leader + 1) % len(servers)  # agents first on a replica that does not lead
        survivors = [s for i, s in enumerate(servers) if i != victim]
        progress(f"agent fail-over: {FAILOVER_AGENTS} SDK agents, TTL {args.ttl:g} s, kill -9")
        moved = asyncio.run(
            failover.measure_agent_failover(
                servers[victim].address,
                [s.address for s in survivors],
                servers[victim].proc.kill,
                FAILOVER_AGENTS,
                args.ttl,
            )
        )
        servers[victim].proc.wait(10)
        delays = list(moved.delays.values())
        progress(f"  moved {len(delays)} of {moved.agents}, kept {moved.kept}: {moved.moved_to}")
        name = (
            f"agent fail-over: {moved.agents} SDK agents (TTL {moved.ttl:g} s) on a replica "
            "killed with kill -9, 3 replicas"
        )
        self.table.add(
            name,
            "kill -> first heartbeat received by another replica, p50 / max ms; agents moved "
            "(to each survivor)",
            f"{ms(percentile(delays, 50))} / {ms(max(delays, default=float('nan')))}; "
            f"{len(delays)} ({', '.join(str(n) for n in moved.moved_to.values())})",
            target=f"all, max < TTL ({moved.ttl:g} s)",
            met=len(delays) == moved.agents and max(delays) < moved.ttl,
        )
        self.table.add(
            name,
            "sessions kept one TTL later (one registration, same epoch, LIVE)",
            f"{moved.kept} of {moved.agents}",
            target="all",
            met=moved.kept == moved.agents,
        )
        servers[victim] = self.server("replica-fo", extra, store=url)
        urls[victim] = failover.metrics_url(servers[victim].log)
        rounds = []
        for round_ in range(1 if args.quick else TAKEOVER_ROUNDS):
            leader = asyncio.run(failover.the_leader(urls))
            others = [i for i in range(len(servers)) if i != leader]
            progress(f"leader take-over {round_ + 1}: kill -9 of the leader")
            rounds.append(
                asyncio.run(
                    failover.measure_takeover(
                        [servers[i].address for i in others],
                        [urls[i] for i in others],
                        servers[leader].proc.kill,
                        f"idle-{round_}",
                        args.ttl,
                    )
                )
            )
            servers[leader].proc.wait(10)
            progress(f"  {rounds[-1]}")
            servers[leader] = self.server("replica-fo", extra, store=url)
            urls[leader] = failover.metrics_url(servers[leader].log)
        for server in servers:
            server.stop()
        takeovers = [r.takeover for r in rounds]
        expiries = [r.expiry for r in rounds]
        name = (
            f"leader take-over: kill -9 of the sweeping replica, 3 replicas, --leader-interval "
            f"1 s, {len(rounds)} round(s)"
        )
        self.table.add(
            name,
            "kill -> a survivor's agentcoord_replica_leader gauge reads 1, p50 / max ms",
            f"{ms(percentile(takeovers, 50))} / {ms(max(takeovers))}",
            target="<= leader interval (1 s) + scrape",
            met=max(takeovers) <= 1.1,
        )
        self.table.add(
            name,
            f"idle agent (TTL {args.ttl:g} s) registered just before the kill: Register -> "
            "EXPIRED on a survivor's WatchAgents, p50 / max s; EXPIRED events per round",
            f"{percentile(expiries, 50):.3f} / {max(expiries):.3f}; "
            f"{', '.join(str(r.expiries) for r in rounds)}",
            target=f"<= TTL + flush 1 s + sweep ({args.ttl + 1.25:g} s); 1 each",
            met=max(expiries) <= args.ttl + 1.25 and all(r.expiries == 1 for r in rounds),
        )

    def replica_rows(self, samples: dict[str, list[float]], puts: int, background: int) -> None:
        """The rows of one cross-replica watch measurement."""
        writes = len(samples["put"])
        name = f"watch across replicas (PostgreSQL), {writes} sequential PutState on A"
        if background:
            name += f", {background} writers on B meanwhile ({puts:,} puts)"
        figure = "PutState sent -> change received, p50 / p99 ms"
        p50, p99 = percentile(samples["cross"], 50), percentile(samples["cross"], 99)
        self.latency_row(
            f"{name}, WatchStates on B",
            samples["cross"],
            [],
            "p50 <= 20 ms, p99 <= 100 ms",
            p50 <= 0.020 and p99 <= 0.100,
            figure=figure,
        )
        self.latency_row(
            f"{name}, WatchStates on A (same process)", samples["local"], [], figure=figure
        )
        self.latency_row(f"{name}: the PutState itself", samples["put"], [])
        after = [cross - put for cross, put in zip(samples["cross"], samples["put"], strict=True)]
        self.latency_row(
            f"{name}, WatchStates on B, after the write's answer",
            after,
            [],
            figure="PutState response on A -> change received on B, p50 / p99 ms",
        )

    def cycle(self, echo: procs.Server) -> None:
        """The old prototype's coordination cycle, sequential, beside echo round trips."""
        server = self.server("cycle")
        cycles = self.args.cycles
        progress(f"coordination cycle, {cycles} sequential cycles")
        samples, split = asyncio.run(
            distribution.measure_cycle(server.address, echo.address, cycles, warmup=20)
        )
        server.stop()
        p50 = percentile(samples["cycle"], 50)
        self.latency_row(
            f"coordination cycle: ListAgents + SubmitTask (AUTO, 3 bullets -> {split} "
            "sub-tasks) + PutState, 1 sequential caller",
            samples["cycle"],
            samples["echo"],
            "p50 <= 2 ms",
            p50 <= 0.002,
            figure="cycle p50 / p99 ms (echo: one round trip)",
        )
        self.latency_row(
            "coordination cycle, SubmitTask and PutState sent together",
            samples["overlapped"],
            samples["echo"],
            figure="cycle p50 / p99 ms (echo: one round trip)",
        )
        for step in ("ListAgents", "SubmitTask", "PutState"):
            self.latency_row(f"coordination cycle, step {step}", samples[step], samples["echo"])
        self.table.add(
            "coordination cycle vs the old prototype (~160 ms per cycle)",
            "speed-up at p50",
            f"{0.160 / p50:,.0f}x" if p50 > 0 else "-",
        )

    def rmw_rows(self, result: statesync.RmwResult, echo: statesync.RmwResult) -> None:
        """The rows of the contended read-modify-write load."""
        spec = result.spec
        name = f"{RMW_NAMES[spec.mode]}, {spec.label}, {spec.duration:g} s"
        target = 5000 if spec.mode == "modify" else 1500
        self.table.add(
            name,
            "committed increments/s (echo: get + put pairs/s)",
            f"{result.rate:,.0f}",
            f"{echo.rate:,.0f}",
            ratio(result.rate, echo.rate),
            f">= {target:,}/s",
            result.rate >= target,
        )
        self.table.add(
            name,
            "conflicts retried (per commit); gave up; other errors",
            f"{result.conflicts:,} ({result.conflicts / max(1, result.committed):.2f}); "
            f"{result.gave_up:,}; {dict(result.errors) or 0}",
        )
        self.table.add(
            name,
            "lost updates (committed - sum of counters)",
            f"{result.lost:,} ({result.committed:,} committed, counters {result.counters:,})",
            target="0",
            met=result.lost == 0,
        )
        self.latency_row(
            name, result.latencies, echo.latencies, figure="increment p50 / p99 ms (with retries)"
        )
        self.table.add(
            name,
            "server CPU, % of one core",
            f"{result.server_cpu:.0%}",
            f"{echo.server_cpu:.0%}",
            ratio(result.server_cpu, echo.server_cpu),
        )
        self.table.add(
            name,
            "load generator CPU, % of one core",
            f"{result.client_cpu:.0%}",
            f"{echo.client_cpu:.0%}",
        )

    def pair(
        self,
        agents: int,
        channels: int,
        ttl: float,
        during: Callable[[procs.Server], Any] | None = None,
    ) -> None:
        """One heartbeat load on echo, then on Discovery, and their rows."""
        workers = self.args.workers
        for every in (False, True) if self.args.answer_every else (False,):
            shape = (agents, channels, workers, ttl)
            echo_result = self.load(LoadSpec("echo", *shape, answer_every=every))
            result = self.load(LoadSpec("discovery", *shape, answer_every=every), during=during)
            self.heartbeat_rows(result, echo_result)
            during = None

    def unary(self, echo: procs.Server) -> None:
        """Register and GetAgent against echo, sequential, idle server."""
        server = self.server("unary")
        progress(f"unary latency, {self.args.calls} sequential calls each")
        samples = asyncio.run(
            unary.measure_unary(server.address, echo.address, self.args.calls, warmup=50)
        )
        server.stop()
        echo_p50 = percentile(samples["echo"], 50)
        self.latency_row(
            "unary Register, 1 sequential caller",
            samples["Register"],
            samples["echo"],
            "p50 <= 1.5x echo",
            percentile(samples["Register"], 50) <= 1.5 * echo_p50,
        )
        self.latency_row(
            "unary GetAgent, 1 sequential caller",
            samples["GetAgent"],
            samples["echo"],
            "p50 <= 1.2x echo",
            percentile(samples["GetAgent"], 50) <= 1.2 * echo_p50,
        )

    def watchers(self) -> None:
        """GetAgent idle, under replaying watchers, and under fan-out to many watchers."""
        args = self.args
        server = self.server("watchers")
        progress(f"seeding {args.replay_changes:,} changes")
        asyncio.run(watchers.seed(server.address, args.replay_changes))
        head = asyncio.run(watchers.head_revision(server.address))
        specs = [
            watchers.WatchSpec("idle"),
            watchers.WatchSpec("replay", args.replayers),
            watchers.WatchSpec("fanout", args.fanout_watchers, args.watch_writers),
        ]
        results = []
        for spec in specs:
            progress(f"GetAgent, {args.watch_duration:g} s, {spec}")
            result = watchers.run(server, spec, args.watch_duration, head)
            progress(
                f"  {result.done}, server RSS {result.server_rss / 2**20:.0f} MiB, "
                f"CPU {result.server_cpu:.0%}"
            )
            results.append(result)
        server.stop()
        if server.profile:
            print(f"## cProfile of {server.name}\n{server.profile_summary()}")
        idle = results[0].latencies
        i50, i99 = percentile(idle, 50), percentile(idle, 99)
        labels = {
            "idle": "idle server",
            "replay": f"{args.replayers} watchers replaying {head:,} changes from revision 1",
            "fanout": f"{args.fanout_watchers} watchers of one prefix, {args.watch_writers} "
            "writers",
        }
        for result in results:
            values = result.latencies
            p50, p99 = percentile(values, 50), percentile(values, 99)
            loaded = result.spec.mode != "idle"
            done = result.done
            self.table.add(
                f"GetAgent, 1 sequential caller, {labels[result.spec.mode]}",
                "p50 / p99 ms (baseline column: the idle server)",
                f"{ms(p50)} / {ms(p99)}",
                f"{ms(i50)} / {ms(i99)}" if loaded else "-",
                f"{ratio(p50, i50)} / {ratio(p99, i99)}" if loaded else "-",
                "p50 <= 5x idle" if loaded else "",
                p50 <= 5 * i50 if loaded else None,
            )
            if loaded:
                what = "changes replayed" if result.spec.mode == "replay" else "messages received"
                self.table.add(
                    f"GetAgent, 1 sequential caller, {labels[result.spec.mode]}",
                    f"watchers' {what}; writes; failed streams; server RSS; server CPU",
                    f"{done['watched']:,}; {done['writes']:,}; {done['errors']}; "
                    f"{result.server_rss / 2**20:.0f} MiB; {result.server_cpu:.0%}",
                )

    def latency_row(
        self,
        workload: str,
        values: list[float],
        echo: list[float],
        target: str = "",
        met: bool | None = None,
        figure: str = "p50 / p99 ms",
    ) -> None:
        """A p50 / p99 row beside the echo's."""
        p50, p99 = percentile(values, 50), percentile(values, 99)
        e50, e99 = percentile(echo, 50), percentile(echo, 99)
        self.table.add(
            workload,
            figure,
            f"{ms(p50)} / {ms(p99)}",
            f"{ms(e50)} / {ms(e99)}" if echo else "-",
            f"{ratio(p50, e50)} / {ratio(p99, e99)}" if echo else "-",
            target,
            met,
        )

    def _list_during(self, echo: procs.Server) -> Callable[[procs.Server], Any]:
        def during(server: procs.Server) -> Any:
            return unary.measure_under_load(
                server.address, echo.address, self.args.calls, warmup=50
            )

        return during

    def load(
        self,
        spec: LoadSpec,
        extra: list[str] | None = None,
        during: Callable[[procs.Server], Any] | None = None,
        duration: float | None = None,
    ) -> LoadResult:
        """One heartbeat load on a fresh server, stopped afterwards."""
        server = self.server("echo" if spec.mode == "echo" else "load", extra)
        progress(f"{spec.mode}: {spec.label}, {' '.join(extra or [])}")
        result = run_load(
            spec,
            server,
            duration or self.args.duration,
            None if during is None else (lambda: during(server)),
        )
        server.stop()
        stats = result.stats
        progress(
            f"  start: {_opens(stats.start)}; {result.rate:.0f}/{result.expected_rate:.0f} "
            f"msg/s, server {result.server_cpu:.0%}, clients {result.client_cpu:.0%} of a core; "
            f"storm: {_opens(stats.storm) if result.stormed else 'skipped (fleet not up)'}"
        )
        if server.profile:
            print(f"## cProfile of {server.name} ({spec.label})\n{server.profile_summary()}")
        return result

    def heartbeat_rows(self, result: LoadResult, echo: LoadResult | None, note: str = "") -> None:
        """The rows of one heartbeat load, beside the echo load of the same shape."""
        spec, stats = result.spec, result.stats
        name = f"heartbeats, {spec.label}{note}"
        if spec.agents == 1000 and spec.ttl == 3:
            cpu_target, cpu_met = "<= 15% of a core", result.server_cpu <= 0.15
        else:
            cpu_target, cpu_met = "", None
        held = (
            stats.start.opened == spec.agents
            and not stats.start.lost
            and stats.start.seconds <= FLEET_UP_SECONDS
        )
        self.table.add(
            name,
            "heartbeats/s sustained (expected); answers/s",
            f"{result.rate:,.0f} ({result.expected_rate:,.0f}); {result.ack_rate:,.0f}",
            f"{echo.rate:,.0f}; {echo.ack_rate:,.0f}" if echo else "-",
            ratio(result.rate, echo.rate) if echo else "-",
        )
        self.table.add(
            name,
            "server CPU, % of one core",
            f"{result.server_cpu:.0%}",
            f"{echo.server_cpu:.0%}" if echo else "-",
            ratio(result.server_cpu, echo.server_cpu) if echo else "-",
            cpu_target,
            cpu_met,
        )
        per_message = _per_message(result)
        self.table.add(
            name,
            "server CPU per heartbeat message, us",
            _micros(result.server_cpu, result.rate),
            _micros(echo.server_cpu, echo.rate) if echo else "-",
            ratio(per_message, _per_message(echo)) if echo else "-",
            f"<= {HEARTBEAT_CPU_TARGET * 1e6:.0f} us",
            per_message <= HEARTBEAT_CPU_TARGET * 1e6,
        )
        self.table.add(
            name,
            "server RSS MB (KiB per stream)",
            _rss(result),
            _rss(echo) if echo else "-",
            ratio(result.rss - result.rss_idle, echo.rss - echo.rss_idle) if echo else "-",
        )
        if stats.latencies:  # without answers awaited, few or none in the window
            self.latency_row(
                name,
                stats.latencies,
                echo.stats.latencies if echo else [],
                figure="answer p50 / p99 ms (from the agent's last message)",
            )
        self.table.add(
            name,
            "start: streams up, after; failed opens; retries",
            _opens(stats.start),
            _opens(echo.stats.start) if echo else "-",
            target=(
                f"all {spec.agents:,} up within {FLEET_UP_SECONDS:g} s and held"
                if spec.agents >= 10_000
                else ""
            ),
            met=held if spec.agents >= 10_000 else None,
        )
        self.table.add(
            name,
            "reconnect storm: reopened, after; failed opens; retries",
            _opens(stats.storm) if result.stormed else "skipped: fleet not up",
            _opens(echo.stats.storm) if echo and echo.stormed else "-",
        )
        self.table.add(
            name,
            "load generator CPU, % of one core",
            f"{result.client_cpu:.0%}",
            f"{echo.client_cpu:.0%}" if echo else "-",
        )
        if result.during is not None:
            samples, returned = result.during
            self.latency_row(
                f"ListAgents gpu ({returned} of {spec.agents:,}), heartbeats running",
                samples["ListAgents"],
                samples["echo"],
                "p50 <= 1 ms",
                percentile(samples["ListAgents"], 50) <= 0.001,
            )
            for call in ("Register", "GetAgent"):
                self.latency_row(
                    f"unary {call}, 1 sequential caller, heartbeats running",
                    samples[call],
                    samples["echo"],
                )
        if stats.breaks:
            broken = dict(stats.breaks)
            self.table.notes.append(f"{name}: streams broken outside the storm {broken}")

    def expiry(self) -> None:
        """Kill agents and time the EXPIRED events."""
        agents, ttl = self.args.expiry_agents, self.args.expiry_ttl
        server = self.server("expiry", ["--min-ttl", "0.2"])
        progress(f"expiry: {agents} agents, TTL {ttl} s")
        result: ExpiryResult = asyncio.run(measure_expiry(server.address, agents, ttl))
        server.stop()
        p50, worst = percentile(result.delays, 50), max(result.delays, default=float("nan"))
        name = f"expiry, {agents} agents killed, TTL {result.ttl:g} s"
        complete = result.missing == 0
        self.table.add(
            name,
            "last heartbeat -> EXPIRED event, p50 / max s",
            f"{p50:.3f} / {worst:.3f}",
            target=f"max <= TTL + 0.25 s ({result.ttl + 0.25:g} s)",
            met=complete and worst <= result.ttl + 0.25,
        )
        self.table.add(
            name,
            "beyond TTL, p50 / max ms",
            f"{ms(p50 - result.ttl)} / {ms(worst - result.ttl)}",
            target="p50 <= TTL (see notes)",
            met="n/a",
        )
        self.table.notes.append(
            "Expiry p50 <= TTL cannot hold as written: an agent is live for one TTL after its "
            "last heartbeat by definition, so the delay is TTL plus detection; what the server "
            "adds is the 'beyond TTL' row (sweep every 100 ms, then one store write and the "
            "watch fan-out)."
        )
        if result.missing:
            self.table.notes.append(f"{name}: {result.missing} EXPIRED events never arrived")


def _connections(agents: int, channels: str) -> int:
    """A ``--channels`` value as a number of connections."""
    return agents if channels == "agent" else int(channels)


def _per_subtask(result: distribution.FlowResult) -> float:
    """Server CPU seconds per completed sub-task, all servers of the run together."""
    return result.server_cpu * result.seconds / max(1, result.ok)


def _micros(cpu: float, rate: float) -> str:
    """CPU (cores) per operation at ``rate`` operations per second, in microseconds."""
    return f"{1e6 * cpu / rate:,.0f}" if rate else "-"


def _per_message(result: LoadResult) -> float:
    """Server CPU per heartbeat sent in the window, us (NaN without heartbeats)."""
    return result.server_cpu / result.rate * 1e6 if result.rate else float("nan")


def _rss(result: LoadResult) -> str:
    per_stream = (result.rss - result.rss_idle) / max(1, result.stats.start.opened) / 1024
    return f"{result.rss / 2**20:.0f} ({per_stream:.0f})"


def _opens(stats: OpenStats) -> str:
    """Opened, when, give-ups, lost sessions; failures by code (median wait); retries."""
    by_count = sorted(stats.failures.items(), key=lambda item: -len(item[1]))
    codes = ", ".join(
        f"{code} {len(waits):,} after ~{percentile(waits, 50):.1f} s" for code, waits in by_count
    )
    failed = sum(len(waits) for waits in stats.failures.values())
    gave_up = f", {stats.gave_up:,} gave up" if stats.gave_up else ""
    lost = ", ".join(f"{cause} {n:,}" for cause, n in stats.lost.most_common())
    lost = f", sessions lost: {lost}" if lost else ""
    codes = codes or "none"
    return (
        f"{stats.opened:,} in {stats.seconds:.1f} s{gave_up}{lost}; {failed:,} ({codes}); "
        f"{stats.retries:,}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the bench; every server and worker it started is stopped before it returns."""
    args = parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="agentcoord-bench-") as tmp, ExitStack() as stack:
        bench = Bench(args, Path(tmp), stack)
        machine = report.machine(bench.stores.kind)
        progress(machine)
        try:
            bench.run()
        except KeyboardInterrupt:
            progress("interrupted; stopping every process started")
            return 130
        finally:
            stack.close()  # servers stop before the table is printed
        table = bench.table
        table.notes.insert(0, f"Machine: {machine}.")
        parts = []
        if args.only in (None, "discovery"):
            parts.append(
                f"Heartbeat loads: {args.workers} client processes, {args.duration:g} s "
                f"measured each, TTL {args.ttl:g} s"
            )
        if args.only in (None, "discovery", "statesync"):
            parts.append(f"unary: {args.calls} sequential calls per figure")
        if args.only in (None, "watchers"):
            parts.append(
                f"watcher loads: GetAgent for {args.watch_duration:g} s each, watchers and "
                "writers in one other client process"
            )
        if args.only in (None, "statesync"):
            parts.append(
                f"contended update(): {args.workers} client processes, {args.rmw_duration:g} s"
            )
        if args.only in (None, "replicas") and args.replica_store:
            parts.append(
                f"replicas: A and B (every service) on one PostgreSQL schema, "
                f"{args.watch_writes} sequential writes on A, alone and beside "
                f"{REPLICA_BACKGROUND_WRITERS} writers on B; throughput and heartbeat runs on "
                f"{', '.join(map(str, bench.replica_counts))} replicas, each on a fresh schema, "
                f"heartbeats {args.duration:g} s measured, TTL {args.ttl:g} s"
            )
        if args.only in (None, "distribution"):
            parts.append(
                f"end to end: {args.workers} client processes, agents of capacity "
                f"{args.capacity}, one connection each, TTL 60 s, heartbeats every 20 s; "
                f"coordination cycle: {args.cycles} sequential cycles"
            )
        table.notes.insert(
            1, "; ".join(parts) + f". Total bench time {time.monotonic() - started:.0f} s."
        )
        text = table.markdown()
        print(text)
        if args.output:
            args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
