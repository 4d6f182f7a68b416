"""The seeded server both fuzz tests call, and how a fuzzed call is judged.

``AGENTCOORD_FUZZ_EXAMPLES`` sets the examples per RPC on SQLite (PostgreSQL runs a
quarter); ``AGENTCOORD_FUZZ_SEED`` replaces the fixed derandomized run with a seeded random
one. See docs/development.md.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from hypothesis import HealthCheck, Phase, seed, settings

from agentcoord.server.config import ServerConfig
from tests.conftest import POSTGRES_DSN_VARIABLE, with_query
from tests.fuzz.harness import (
    ADMIN_TOKEN,
    JOIN_TOKEN,
    Call,
    Outcome,
    ServerLog,
    ServerThread,
    World,
    describe,
    execute,
    healthy,
    problem,
)
from tests.fuzz.strategies import RequestStrategies

# Read at import: the autouse fixture hides AGENTCOORD_* variables from the tests.
EXAMPLES = int(os.environ.get("AGENTCOORD_FUZZ_EXAMPLES", "30"))
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


def check_call(
    target: Target, call: Call, judge: Callable[[Outcome], str | None] = problem
) -> None:
    """Make one call; fail on what ``judge`` finds wrong with it, or a dead server."""
    outcome = execute(target.world, call, target.log)
    what = judge(outcome)
    if what is not None:
        raise AssertionError(describe(outcome, what))
    if not healthy(target.world):
        raise AssertionError(describe(outcome, "the server is dead after this call"))
    target.world.repair()


def fuzzing(examples: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Hypothesis settings of a fuzz test (``examples`` per run), seeded if asked."""
    configured = settings(
        max_examples=examples,
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

    def apply(test: Callable[..., Any]) -> Callable[..., Any]:
        test = configured(test)
        return seed(int(SEED))(test) if SEED else test

    return apply
