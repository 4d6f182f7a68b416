"""A bare grpc.aio echo service on raw bytes: the baseline every Discovery figure is held to.

Run as ``python -m tests.bench.echo --listen 127.0.0.1:0``; it prints
``echo listening on host:port`` and serves until SIGTERM or SIGINT. It uses the same
server options as agentcoord (pending-request limits, keepalive), no protobuf and no
agentcoord code at all.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import resource
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc

SERVICE = "bench.Echo"
UNARY = f"/{SERVICE}/Unary"
"""Full method name of the unary echo."""
STREAM = f"/{SERVICE}/Stream"
"""Full method name of the bidirectional echo stream (one reply per message)."""
QUIET = f"/{SERVICE}/Quiet"
"""Full method name of the bidirectional stream that replies as Discovery does to SDK agents:
to the first message, then to a message only once ``ack-interval`` seconds (metadata) have
passed since the last reply."""
ACK_INTERVAL_KEY = "ack-interval"
"""Metadata key of the Quiet stream's seconds between replies."""
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
"""The keepalive settings of ``agentcoord.server.app``, copied so the baseline imports nothing."""


async def _unary(request: bytes, context: Any) -> bytes:
    return request


async def _stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def _quiet(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    every = float(dict(context.invocation_metadata())[ACK_INTERVAL_KEY])
    loop = asyncio.get_running_loop()
    replied = -math.inf
    async for request in requests:
        now = loop.time()
        if now - replied >= every:
            replied = now
            yield request


async def serve(listen: str, max_pending_requests: int) -> None:
    """Serve the echo service until SIGTERM or SIGINT."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = grpc.aio.server(
        options=[
            ("grpc.server.max_pending_requests", max_pending_requests),
            ("grpc.server.max_pending_requests_hard_limit", max_pending_requests),
            *KEEPALIVE_OPTIONS,
        ]
    )
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "Stream": grpc.stream_stream_rpc_method_handler(_stream),
            "Quiet": grpc.stream_stream_rpc_method_handler(_quiet),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"echo listening on {listen.rpartition(':')[0]}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    """Parse flags and serve."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.echo")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--max-pending-requests", type=int, default=20_000)
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.max_pending_requests))


if __name__ == "__main__":
    main()
