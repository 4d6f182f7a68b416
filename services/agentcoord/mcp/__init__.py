"""``agentcoord mcp``: a Model Context Protocol server that makes one LLM agent a team member.

It registers one agent through the SDK (:mod:`agentcoord.client`), keeps its heartbeat and
leases alive in the background while the model thinks, exposes Discovery, Distribution and
StateSync as MCP tools and resources, and deregisters on exit. Needs the ``mcp`` extra
(``pip install 'agentcoord[mcp]'``); see docs/mcp.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

from agentcoord.mcp._card import CardFile, load_card
from agentcoord.mcp._server import build_server, rpc_message
from agentcoord.mcp._session import AgentOptions, AgentSession, LeaseLost

__all__ = [
    "AgentOptions",
    "AgentSession",
    "CardFile",
    "LeaseLost",
    "build_server",
    "load_card",
    "rpc_message",
    "serve",
]


async def serve(options: AgentOptions, *, http: tuple[str, int] | None = None) -> None:
    """Register the agent, serve MCP until the host hangs up (or SIGTERM), deregister.

    Args:
        options: How to register the agent.
        http: ``(host, port)`` to serve streamable HTTP on (path ``/mcp``); stdio when None.
    """
    async with AgentSession(options) as session:
        app = build_server(session)
        with _stopped_by_sigterm():
            if http is None:
                await app.run_stdio_async()
            else:
                await app.run_streamable_http_async(host=http[0], port=http[1])


@contextlib.contextmanager
def _stopped_by_sigterm() -> Iterator[None]:
    """Cancel the current task on SIGTERM, and end the context quietly when that happened."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    signalled = False

    def stop() -> None:
        nonlocal signalled
        signalled = True
        if task is not None:
            task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, stop)
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread
        yield
        return
    try:
        yield
    except asyncio.CancelledError:
        if not signalled or task is None:
            raise
        task.uncancel()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
