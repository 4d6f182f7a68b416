"""``make demo-cluster``: three replicas, six agents on all three, one replica killed mid-task.

It starts three ``agentcoord serve`` replicas on a fresh schema of a PostgreSQL database
(``--store``, default ``make run-cluster``'s; the schema is dropped at the end), then six
agents (the Python SDK, in this process), two registered through each replica and each given
all three addresses to fail over to. A planner submits a task of 300 sub-tasks and four
writers put keys through the replicas. Once a third of the sub-tasks are done it kills
(SIGKILL) the replica that sweeps expiries, the leader, and shows the team carrying on: the
agents that used it move to another replica and keep their sessions, another replica takes
over the sweep, the task succeeds with every sub-task done once (its change log read back),
and every acknowledged write is there.

Exit code 0 when all of that was seen; 1 if something was not (the output says what), or the
database cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import asyncpg
from run_cluster import DEFAULT_STORE, Replica, create_database, serving, start, stop

sys.path.append(str(Path(__file__).resolve().parent.parent / "demo"))  # make demo's helpers
from run_demo import DemoError, free_port

from agentcoord.client import Agent, AgentcoordClient, RPCError, TaskSpec, TaskState, WorkItem
from agentcoord.statesync.v1 import statesync_service_pb2 as statesync_pb

ADMIN_TOKEN = "demo-cluster"
"""The replicas' admin token: the planner and the writers use it."""
SUBTASKS = 300
AGENTS_PER_REPLICA = 2
WRITERS = 4
WORK_SECONDS = 0.02
"""How long a handler pretends to work on a sub-task."""
AGENT_TTL = 3.0
"""Seconds without a heartbeat before an agent is expired (the agents must move sooner)."""
DEADLINE = 150.0
"""Seconds the whole demo may take."""


def with_schema(store: str, schema: str) -> str:
    """Return ``store`` with ``?schema=`` set to ``schema``."""
    parts = urllib.parse.urlsplit(store)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "schema"]
    query.append(("schema", schema))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


async def drop_schema(store: str, schema: str) -> None:
    """Drop ``schema`` of the database ``store`` names."""
    parts = urllib.parse.urlsplit(store)
    conn = await asyncpg.connect(urllib.parse.urlunsplit(parts._replace(query="")))
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def leads(replica: Replica) -> bool:
    """Whether ``replica`` leads: its last leadership line says it gained it."""
    lines = [
        line
        for line in replica.log.read_text(errors="replace").splitlines()
        if any(f"leadership {event}" in line for event in ("gained", "lost", "released"))
    ]
    return bool(lines) and "leadership gained" in lines[-1]


async def the_leader(replicas: Sequence[Replica], timeout: float = 20.0) -> Replica:
    """Wait until one of ``replicas`` leads; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leading = [replica for replica in replicas if leads(replica)]
        if len(leading) == 1:
            return leading[0]
        await asyncio.sleep(0.05)
    raise DemoError(f"no single leader among {[r.name for r in replicas]} in {timeout:g} s")


class Team:
    """The six agents, and what their handlers did."""

    def __init__(self, replicas: Sequence[Replica]) -> None:
        """Two agents per replica, each with its own replica first and the others after."""
        self.runs: Counter[str] = Counter()
        """Handler runs per sub-task id."""
        self.agents: list[Agent] = []
        for home in replicas:
            targets = [home.address] + [r.address for r in replicas if r is not home]
            for n in range(AGENTS_PER_REPLICA):
                name = f"agent-{home.name}{n}"
                self.agents.append(
                    Agent(
                        targets,
                        name=name,
                        agent_id=name,
                        handler=self._handle,
                        capacity=2,
                        ttl=AGENT_TTL,
                        timeout=3.0,
                    )
                )

    async def _handle(self, item: WorkItem) -> object:
        self.runs[item.subtask_id] += 1
        await asyncio.sleep(WORK_SECONDS)
        return {"n": item.input, "by": item.lease.agent_id}

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Register every agent and work until the block ends; then drain them."""
        async with contextlib.AsyncExitStack() as stack:
            for agent in self.agents:
                await stack.enter_async_context(agent)
            yield


class Writers:
    """Clients putting keys ``writes/<writer>/<n>`` through the replicas, counting answers."""

    def __init__(self, replicas: Sequence[Replica]) -> None:
        """One writer per replica in turn, each failing over to the others."""
        self.acknowledged: dict[str, int] = {}
        self.refused = 0
        self._replicas = replicas
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start the writers."""
        for n in range(WRITERS):
            home = self._replicas[n % len(self._replicas)]
            targets = [home.address] + [r.address for r in self._replicas if r is not home]
            self._tasks.append(asyncio.create_task(self._write(f"w{n}", targets)))

    async def stop(self) -> None:
        """Stop the writers and wait for them."""
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _write(self, name: str, targets: list[str]) -> None:
        async with AgentcoordClient(targets, token=ADMIN_TOKEN, timeout=3.0) as client:
            n = 0
            while not self._stop.is_set():
                key = f"writes/{name}/{n}"
                try:
                    await client.state.put(key, n)
                    self.acknowledged[key] = n
                except RPCError:
                    self.refused += 1  # not acknowledged: it may or may not be stored
                n += 1


async def follow_moves(
    movers: dict[str, Agent], dead: Replica, killed_at: float, names: dict[str, str]
) -> list[str]:
    """Wait until each of ``movers`` (which used ``dead``) uses another replica; describe it.

    ``names`` maps each replica's address to its name.
    """
    lines = []
    while movers:
        for agent_id, agent in list(movers.items()):
            if agent.client.target != dead.address:
                after = time.monotonic() - killed_at
                target = agent.client.target
                lines.append(
                    f"{agent_id} moved to replica {names[target]} ({target}) after {after:.2f} s"
                )
                del movers[agent_id]
        if time.monotonic() - killed_at > AGENT_TTL * 4:
            raise DemoError(f"{sorted(movers)} did not leave the killed replica")
        await asyncio.sleep(0.02)
    return lines


async def check_log(client: AgentcoordClient, task_id: str) -> tuple[int, int]:
    """Read the task's change log: (sub-tasks succeeded, leases granted); each succeeded once.

    Raises:
        DemoError: a sub-task was leased twice at once or succeeded twice.
    """
    leased: dict[str, bool] = {}
    succeeded: Counter[str] = Counter()
    leases = 0
    request = statesync_pb.ListEventsRequest(
        service=statesync_pb.SERVICE_DISTRIBUTION, subject=task_id, page_size=1000
    )
    while True:
        page = await client.statesync.list_events(request)
        for event in page.events:
            if not event.kind.startswith("subtask."):
                continue
            subtask_id = str(dict(event.details)["subtask_id"])
            if event.kind == "subtask.leased":
                if leased.get(subtask_id):
                    raise DemoError(f"{subtask_id} was leased twice at once")
                leases += 1
            leased[subtask_id] = event.kind == "subtask.leased"
            if event.kind == "subtask.succeeded":
                succeeded[subtask_id] += 1
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    if set(succeeded.values()) != {1}:
        raise DemoError("a sub-task succeeded twice")
    return len(succeeded), leases


async def demo(store: str, logs: Path) -> None:
    """Run the demo on a database of ``store``; raise DemoError if something was not seen."""
    print("== 1. three replicas on one PostgreSQL database")
    replicas: list[Replica] = []
    try:
        for name in "abc":
            address = f"127.0.0.1:{free_port()}"
            extra = ["--admin-token", ADMIN_TOKEN, "--leader-interval", "0.5s"]
            replicas.append(await start(name, address, store, logs, extra))
        for replica in replicas:
            if not await serving(replica):
                raise DemoError(f"replica {replica.name} did not start: {replica.log}")
        leader = await the_leader(replicas)
        for replica in replicas:
            role = "the leader: it sweeps expiries" if replica is leader else "a follower"
            print(f"replica {replica.name}: {replica.address} (pid {replica.process.pid}), {role}")
        await work(replicas, leader)
    finally:
        await stop(replicas)


async def work(replicas: list[Replica], leader: Replica) -> None:
    """Run the team and the writers, kill ``leader`` mid-task, and check what came of it."""
    team = Team(replicas)
    writers = Writers(replicas)
    addresses = [replica.address for replica in replicas]
    print(f"\n== 2. {len(team.agents)} agents, two registered through each replica")
    async with team.running(), AgentcoordClient(addresses, token=ADMIN_TOKEN) as planner:
        epochs = {agent.agent_id: agent.epoch for agent in team.agents}
        for agent in team.agents:
            print(f"{agent.agent_id} uses {agent.client.target} (session epoch {agent.epoch})")

        print(f"\n== 3. a task of {SUBTASKS} sub-tasks, and {WRITERS} writers")
        writers.start()
        spec = TaskSpec(
            "cluster demo",
            subtasks=[{"local_id": f"s{i}", "input": i} for i in range(SUBTASKS)],
            lease_ttl=3.0,
            max_attempts=20,
        )
        task = await planner.tasks.submit(spec)
        print(f"submitted task {task.task_id}")
        while sum(team.runs.values()) < SUBTASKS // 3:
            await asyncio.sleep(0.02)
        print(f"{sum(team.runs.values())} of {SUBTASKS} sub-tasks done")

        print(f"\n== 4. kill -9 of replica {leader.name}, the leader")
        movers = {a.agent_id: a for a in team.agents if a.client.target == leader.address}
        killed_at = time.monotonic()
        leader.process.kill()
        await leader.process.wait()
        print(f"killed replica {leader.name} (pid {leader.process.pid}) with SIGKILL")
        names = {replica.address: replica.name for replica in replicas}
        for line in await follow_moves(movers, leader, killed_at, names):
            print(line)
        survivors = [replica for replica in replicas if replica is not leader]
        new_leader = await the_leader(survivors)
        after = time.monotonic() - killed_at
        print(f"replica {new_leader.name} leads now ({after:.2f} s after the kill)")

        result = await planner.tasks.result(task.task_id, timeout=DEADLINE / 2)
        done = await planner.tasks.get(task.task_id)
        await writers.stop()
        kept = [a.agent_id for a in team.agents if a.epoch == epochs[a.agent_id]]

        print("\n== 5. nothing lost, nothing done twice")
        if done.state is not TaskState.SUCCEEDED or len(result) != SUBTASKS:
            raise DemoError(f"the task ended {done.state.name}: {done.state_reason}")
        print(f"task {task.task_id}: {done.state.name}, {len(result)} results")
        succeeded, leases = await check_log(planner, task.task_id)
        if succeeded != SUBTASKS:
            raise DemoError(f"the change log shows {succeeded} sub-tasks succeeded")
        print(
            f"change log: {succeeded} sub-tasks succeeded once each, {leases} leases, "
            "none held twice at once"
        )
        twice = [subtask_id for subtask_id, runs in team.runs.items() if runs > 1]
        print(
            f"handler runs: {sum(team.runs.values())} ({len(twice)} sub-tasks run again after "
            "their lease was lost with the replica)"
        )
        if len(kept) != len(team.agents):
            raise DemoError(f"only {kept} kept their sessions")
        print(f"sessions kept: all {len(kept)} agents, same epoch")
        stored = {entry.key: entry.value for entry in await planner.state.list("writes/")}
        lost = [key for key, value in writers.acknowledged.items() if stored.get(key) != value]
        if lost:
            raise DemoError(f"{len(lost)} acknowledged writes are missing, e.g. {lost[0]}")
        print(
            f"writes: {len(writers.acknowledged)} acknowledged, all stored; "
            f"{writers.refused} not acknowledged (in flight on the killed replica)"
        )


async def run(store: str) -> int:
    """Create the database if missing, run the demo on a fresh schema, drop it; exit code."""
    started = time.monotonic()
    try:
        await create_database(store)
    except (OSError, asyncpg.PostgresError) as error:
        print(f"demo-cluster: cannot reach or create the database of {store}: {error}")
        return 1
    schema = f"demo_{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="agentcoord-demo-cluster-") as folder:
        logs = Path(folder)
        try:
            await asyncio.wait_for(demo(with_schema(store, schema), logs), DEADLINE)
        except (DemoError, TimeoutError) as error:
            print(f"\nDEMO FAILED: {error or 'timed out'}")
            for log in sorted(logs.glob("*.log")):
                print(f"--- {log.name}\n{log.read_text(errors='replace').rstrip()}")
            return 1
        finally:
            await drop_schema(store, schema)
            print(f"\n== 6. stopped the replicas; dropped schema {schema}")
    print(f"demo OK in {time.monotonic() - started:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the demo; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=DEFAULT_STORE, help="PostgreSQL URL of the database")
    args = parser.parse_args(argv)
    if not args.store.startswith(("postgresql://", "postgres://")):
        parser.error(f"--store: {args.store!r} is not a postgresql:// URL")
    return asyncio.run(run(args.store))


if __name__ == "__main__":
    sys.exit(main())
