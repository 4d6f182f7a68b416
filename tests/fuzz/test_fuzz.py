"""Property-based fuzz test of every RPC of every service against a real server.

For each RPC (from the service descriptors), Hypothesis generates calls with live and
bad credentials and requests built from the input message's descriptor: seeded real
values, plausible ones and hostile ones (see ``strategies.py``). Each call must end in a
status the contract names: never UNKNOWN or INTERNAL, never a hang past the call
deadline, never an error or traceback in the server log, and the server must still
answer its health check afterwards. A failing call is shrunk to a minimal request and
reported with the server's traceback.

``AGENTCOORD_FUZZ_EXAMPLES`` sets the examples per RPC (default below);
``AGENTCOORD_FUZZ_SEED`` replaces the fixed derandomized run with a seeded random one.
See docs/development.md.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from hypothesis import HealthCheck, Phase, given, seed, settings

from agentcoord.server.config import ServerConfig
from tests.conftest import POSTGRES_DSN_VARIABLE, with_query
from tests.fuzz.harness import (
    ADMIN_TOKEN,
    JOIN_TOKEN,
    METHODS,
    Call,
    ServerLog,
    ServerThread,
    World,
    calls,
    describe,
    execute,
    healthy,
    method_path,
    problem,
)
from tests.fuzz.strategies import RequestStrategies

# Read at import: the autouse fixture hides AGENTCOORD_* variables from the tests.
EXAMPLES = int(os.environ.get("AGENTCOORD_FUZZ_EXAMPLES", "40"))
"""Examples per RPC on SQLite."""
POSTGRES_SHARE = 4
"""PostgreSQL runs EXAMPLES // POSTGRES_SHARE examples per RPC, to keep the suite's time."""
SEED = os.environ.get("AGENTCOORD_FUZZ_SEED", "")


@dataclass
class Target:
    """One running, seeded server and what the strategies need of it."""

    world: World
    requests: RequestStrategies
    log: ServerLog
    examples: int


def _postgres_url() -> tuple[str, str]:
    dsn = os.environ.get(POSTGRES_DSN_VARIABLE)
    if not dsn:
        pytest.skip(f"{POSTGRES_DSN_VARIABLE} is not set")
    schema = f"fuzz_{uuid.uuid4().hex}"
    return dsn, schema


async def _drop_schema(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    """A real server on a fresh store, seeded with agents, tasks, a lease and keys."""
    dsn = schema = ""
    if request.param == "sqlite":
        store = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'agentcoord.db'}"
        examples = EXAMPLES
    else:
        dsn, schema = _postgres_url()
        store = with_query(dsn, schema=schema)
        examples = max(1, EXAMPLES // POSTGRES_SHARE)
    config = ServerConfig(
        listen="127.0.0.1:0",
        store=store,
        join_token=JOIN_TOKEN,
        admin_token=ADMIN_TOKEN,
        grace=0.5,
    )
    server = ServerThread(config)
    port = server.start()
    log = ServerLog()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, log.installed():
            world = World(channel)
            world.seed()
            assert not log.take(), "seeding logged an error"
            yield Target(world, RequestStrategies(world.seeds), log, examples)
    finally:
        server.stop()
        if schema:
            asyncio.run(_drop_schema(dsn, schema))


def check_call(target: Target, call: Call) -> None:
    """Make one call; fail on a bad outcome or a dead server."""
    outcome = execute(target.world, call, target.log)
    what = problem(outcome)
    if what is not None:
        raise AssertionError(describe(outcome, what))
    if not healthy(target.world):
        raise AssertionError(describe(outcome, "the server is dead after this call"))
    target.world.repair()


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.full_name)
def test_no_request_breaks_the_server(target: Target, method: MethodDescriptor) -> None:
    assert method_path(method)  # every RPC of every service is a case of its own

    @settings(
        max_examples=target.examples,
        derandomize=not SEED,
        database=None,
        deadline=None,
        print_blob=True,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=(
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ),
    )
    @given(calls(target.requests, method))
    def fuzz(call: Call) -> None:
        check_call(target, call)

    if SEED:
        fuzz = seed(int(SEED))(fuzz)
    fuzz()
