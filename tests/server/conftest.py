"""Fixtures that run real servers on 127.0.0.1 with an ephemeral port."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentcoord.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from agentcoord.server.app import App, start_app
from agentcoord.server.config import ServerConfig
from tests.server.processes import Replicas

StartServer = Callable[..., Awaitable[App]]


@pytest.fixture
async def start_server(store_url: str) -> AsyncIterator[StartServer]:
    """Start servers on the test's store; every one still running is stopped afterwards."""
    apps: list[App] = []

    async def start(tracer_provider: Any = None, **overrides: Any) -> App:
        config = dataclasses.replace(
            ServerConfig(listen="127.0.0.1:0", store=store_url, min_ttl=0.2, grace=0.5),
            **overrides,
        )
        app = await start_app(config, tracer_provider=tracer_provider)
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop(0)


@pytest.fixture
async def server(start_server: StartServer) -> App:
    """One server hosting all three services."""
    return await start_server()


@pytest.fixture
async def channel(server: App) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to ``server``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


@pytest.fixture
def discovery(channel: grpc.aio.Channel) -> discovery_grpc.DiscoveryServiceStub:
    """A Discovery stub on ``channel``."""
    return discovery_grpc.DiscoveryServiceStub(channel)


@pytest.fixture
async def replicas(postgres_url: str, tmp_path: Path) -> AsyncIterator[Replicas]:
    """Replica processes (``agentcoord serve``) on a fresh PostgreSQL schema, killed after."""
    async with Replicas(postgres_url, tmp_path) as started:
        yield started
