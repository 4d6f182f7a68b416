"""The agentcoord demo (``make demo``): four agents cooperate on a task, and survive a death.

It starts the services on a temporary SQLite store (or, with ``AGENTCOORD_SERVER`` set to
one address, uses that server: ``make run``'s, whose dashboard then shows the demo live),
starts four agent processes
(``demo_agent.py``) with different capabilities, submits a task that the AUTO splitter turns
into a DAG (three parallel sub-tasks and a fan-in report), prints the plan and the live
progress, kills (SIGKILL) the agent working on the research sub-task to show that the
sub-task is handed to another agent, then prints the aggregated result and the change log of
who did what. It stops every process it started and removes the temporary folder.

Exit code 0 means the task succeeded and the reassignment was seen; 1 means something went
wrong (the output says what).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from agentcoord.client import (
    AgentcoordClient,
    FailureClass,
    SplitPolicy,
    SubtaskState,
    SubtaskTransition,
    TaskSpec,
    TaskState,
    TaskTransition,
)
from agentcoord.statesync.v1 import statesync_service_pb2 as statesync_pb

HERE = Path(__file__).resolve().parent
AGENTS: dict[str, list[str]] = {
    "ada": ["research", "write"],
    "bob": ["research", "code"],
    "cy": ["code", "review"],
    "dee": ["review", "write"],
}
"""Agents and their capabilities: every capability is held by two agents."""
DESCRIPTION = """\
Prepare the release notes of agentcoord 1.0, in any order:

- Survey what users asked for in the issues [capability: research]
- Benchmark the new scheduler against the old one [capability: code]
- Review the open pull requests (needs: review)
- Finally, write the report [capability: write]
"""
"""The task: the AUTO splitter makes three parallel sub-tasks and a fan-in."""
VICTIM_SUBTASK = "step-1"
"""The sub-task whose agent is killed while it works on it."""
AGENT_TTL = 2.0
"""Seconds without a heartbeat before the server declares an agent dead."""
DEADLINE = 60.0
"""Seconds the whole demo may take."""


class DemoError(Exception):
    """Something the demo shows did not happen."""


def free_port() -> int:
    """Return a TCP port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stamp(seconds: float | None = None) -> str:
    """Format a time as ``HH:MM:SS.mmm``, local time (now when None)."""
    now = time.time() if seconds is None else seconds
    return time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"


@dataclass
class Processes:
    """The processes the demo started, so that they are all stopped in the end."""

    folder: Path
    """Temporary folder: the store, the markers and the logs."""
    server: subprocess.Popen[bytes] | None = None
    """The agentcoord server."""
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    """Agent processes by name."""

    def start_server(self, port: int) -> None:
        """Start ``agentcoord serve`` with every service on ``port``."""
        command = [
            sys.executable,
            "-m",
            "agentcoord.cli",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--store",
            f"sqlite:///{self.folder / 'demo.db'}",
            "--retry-backoff",
            "0.2",
            "--grace",
            "1",
            "--log-level",
            "warning",
        ]
        with open(self.folder / "server.log", "wb") as log:
            self.server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        print(f"started the server on 127.0.0.1:{port} (pid {self.server.pid})")

    def start_agent(self, name: str, capabilities: list[str], target: str) -> None:
        """Start one ``demo_agent.py`` process."""
        command = [
            sys.executable,
            str(HERE / "demo_agent.py"),
            "--target",
            target,
            "--name",
            name,
            "--capabilities",
            ",".join(capabilities),
            "--markers",
            str(self.folder / "markers"),
            "--ttl",
            str(AGENT_TTL),
        ]
        with open(self.folder / f"agent-{name}.log", "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.agents[name] = process
        print(f"started agent {name:<4} {', '.join(capabilities):<16} (pid {process.pid})")

    def kill_agent(self, name: str) -> None:
        """SIGKILL agent ``name``: no drain, no deregistration, its heartbeats just stop."""
        process = self.agents[name]
        process.send_signal(signal.SIGKILL)
        process.wait()
        print(f"{stamp()}  KILLED agent {name} (pid {process.pid}) with SIGKILL")

    def stop_all(self) -> None:
        """Stop the agents (SIGTERM: they drain), then the server; SIGKILL stragglers."""
        for process in self.agents.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.agents.values():
            _wait_or_kill(process)
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            _wait_or_kill(self.server)

    def dump_logs(self) -> None:
        """Print the processes' logs (after a failure)."""
        for log in sorted(self.folder.glob("*.log")):
            print(f"--- {log.name}")
            print(log.read_text(errors="replace").rstrip())


def _wait_or_kill(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def wait_serving(target: str, processes: Processes, timeout: float = 20.0) -> None:
    """Wait until the server's health service says SERVING."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(target) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        while time.monotonic() < deadline:
            if processes.server is not None and processes.server.poll() is not None:
                raise DemoError("the server exited at start")
            with contextlib.suppress(grpc.RpcError):
                response = await check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    print("the server is SERVING")
                    return
            await asyncio.sleep(0.1)
    raise DemoError("the server did not become SERVING")


async def wait_marker(folder: Path, pattern: str, timeout: float) -> Path:
    """Wait for a marker file matching ``pattern``; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        await asyncio.sleep(0.02)
    raise DemoError(f"no marker {pattern} within {timeout:g} s")


@dataclass
class Progress:
    """What the live progress saw."""

    transitions: list[SubtaskTransition] = field(default_factory=list)
    """Every sub-task transition, in order."""
    final: TaskState | None = None
    """The task's final state."""


async def follow(client: AgentcoordClient, task_id: str, revision: int) -> Progress:
    """Print one line per transition of the task until it ends."""
    progress = Progress()
    async for event in client.tasks.watch(task_id, start_revision=revision):
        counts = event.task.counts
        done = f"[{counts.succeeded}/{counts.total} done]"
        if isinstance(event, SubtaskTransition):
            progress.transitions.append(event)
            line = f"{event.local_id:<7} {event.to_state.name:<9} {event.agent_id or '-':<5}"
            if event.failure is not None:
                line += f" failure {event.failure.failure_class.name}: {event.failure.message}"
            print(f"{stamp()}  {line} {done}")
        elif isinstance(event, TaskTransition):
            print(f"{stamp()}  task    {event.to_state.name:<9} {'':<5} {done}")
            if event.to_state.is_final:
                progress.final = event.to_state
    return progress


async def change_log(client: AgentcoordClient, task_id: str) -> AsyncIterator[statesync_pb.Event]:
    """Yield the Distribution service's events of task ``task_id``, all pages."""
    request = statesync_pb.ListEventsRequest(
        service=statesync_pb.SERVICE_DISTRIBUTION, subject=task_id, page_size=1000
    )
    while True:
        response = await client.statesync.list_events(request)
        for event in response.events:
            yield event
        if not response.next_page_token:
            return
        request.page_token = response.next_page_token


async def demo(processes: Processes) -> None:
    """Run the demo; raise DemoError if something it should show did not happen."""
    markers = processes.folder / "markers"
    markers.mkdir()

    print("== 1. services and agents")
    target = os.environ.get("AGENTCOORD_SERVER", "")
    if target:
        print(f"using the server at {target} (AGENTCOORD_SERVER)")
    else:
        port = free_port()
        target = f"127.0.0.1:{port}"
        processes.start_server(port)
    await wait_serving(target, processes)
    for name, capabilities in AGENTS.items():
        processes.start_agent(name, capabilities, target)
    for name in AGENTS:
        await wait_marker(markers, f"ready-{name}", timeout=20)
    print(f"all {len(AGENTS)} agents registered (TTL {AGENT_TTL:g} s)")

    async with AgentcoordClient(target) as client:
        spec = TaskSpec("release notes", description=DESCRIPTION, split=SplitPolicy.AUTO)
        print("\n== 2. the plan (AnalyzeTask)")
        print(DESCRIPTION.rstrip())
        plan = await client.tasks.analyze(spec)
        print(f"\n{plan.reason}")
        for sub in plan.subtasks:
            after = ", ".join(sub.depends_on) or "nothing"
            needs = ", ".join(sub.capabilities)
            print(f"  {sub.local_id:<7} {sub.title:<48} needs {needs:<8} after {after}")
        print(f"  aggregation: {plan.aggregate or '-'}")

        print("\n== 3. live progress")
        task = await client.tasks.submit(spec)
        print(f"{stamp()}  submitted task {task.task_id}")
        watching = asyncio.create_task(follow(client, task.task_id, task.revision))

        marker = await wait_marker(markers, f"started-*-{VICTIM_SUBTASK}-1", timeout=20)
        victim = marker.name.removeprefix("started-").removesuffix(f"-{VICTIM_SUBTASK}-1")
        processes.kill_agent(victim)

        progress = await asyncio.wait_for(watching, timeout=DEADLINE)
        if progress.final is not TaskState.SUCCEEDED:
            raise DemoError(f"the task ended {progress.final}")

        print("\n== 4. the reassignment")
        died = [
            t
            for t in progress.transitions
            if t.local_id == VICTIM_SUBTASK
            and t.failure is not None
            and t.failure.failure_class is FailureClass.AGENT_DIED
        ]
        if not died:
            raise DemoError(f"{VICTIM_SUBTASK} was not handed back as AGENT_DIED")
        retried = [
            t
            for t in progress.transitions
            if t.local_id == VICTIM_SUBTASK
            and t.revision > died[0].revision
            and t.to_state is SubtaskState.LEASED
        ]
        if not retried or retried[0].agent_id == victim:
            raise DemoError(f"{VICTIM_SUBTASK} was not leased to another agent")
        print(
            f"{VICTIM_SUBTASK}: agent {victim} died (failure AGENT_DIED), "
            f"reassigned to {retried[0].agent_id} (attempt {retried[0].attempt})"
        )

        print("\n== 5. the aggregated result")
        result = await client.tasks.result(task.task_id, timeout=10)
        done = await client.tasks.get(task.task_id)
        print(f"task {task.task_id}: {done.state.name}")
        print(json.dumps(result, indent=2, sort_keys=True))

        print("\n== 6. the change log (Distribution events)")
        async for event in change_log(client, task.task_id):
            details = dict(event.details)
            local_id = str(details.get("local_id", "-"))
            when = stamp(event.event_time.ToNanoseconds() / 1e9)
            print(f"{when}  {event.agent_id or '-':<8} {event.kind:<18} {local_id}")


def main() -> int:
    """Run the demo and clean up; return the exit code."""
    started = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="agentcoord-demo-"))
    processes = Processes(folder)
    code = 0
    try:
        asyncio.run(asyncio.wait_for(demo(processes), timeout=DEADLINE))
    except (DemoError, TimeoutError) as error:
        print(f"\nDEMO FAILED: {error or 'timed out'}")
        processes.dump_logs()
        code = 1
    except KeyboardInterrupt:
        code = 130
    finally:
        print("\n== 7. stopping everything")
        processes.stop_all()
        shutil.rmtree(folder, ignore_errors=True)
    server = " and the server" if processes.server is not None else ""
    print(f"stopped {len(processes.agents)} agents{server}; removed {folder}")
    if code == 0:
        print(f"demo OK in {time.monotonic() - started:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
