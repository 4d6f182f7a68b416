"""One agent of the demo: a real process that takes sub-tasks through the Python SDK.

The orchestrator (``run_demo.py``) starts four of these with different capabilities. Each
agent registers with a short TTL, so that the server notices quickly when one is killed,
and runs a handler that pretends to work for a moment and returns a small JSON result. The
final fan-in sub-task combines the results of the sub-tasks it depends on.

Markers in ``--markers`` let the orchestrator follow the agent without parsing logs:
``ready-<agent>`` once registered, ``started-<agent>-<local id>-<attempt>`` when a handler
starts. SIGTERM drains the agent and deregisters it.

Usage::

    python demo_agent.py --target 127.0.0.1:50051 --name ada --capabilities research,write \
        --markers /tmp/markers
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from pathlib import Path
from typing import Any

from agentcoord.client import Agent, Handler, WorkItem

WORK_SECONDS = 1.5
"""How long a handler pretends to work."""


def touch(markers: Path, name: str) -> None:
    """Create the marker file ``name`` in ``markers``, atomically."""
    partial = markers / f".{name}.tmp"
    partial.write_text(f"{time.time():.3f}\n")
    partial.rename(markers / name)


def make_handler(name: str, markers: Path) -> Handler:
    """Return the sub-task handler of agent ``name``."""

    async def handle(item: WorkItem) -> dict[str, Any]:
        touch(markers, f"started-{name}-{item.local_id}-{item.attempt}")
        print(f"{name}: working on {item.local_id} (attempt {item.attempt})", flush=True)
        await asyncio.sleep(WORK_SECONDS)
        if item.subtask.depends_on:  # the fan-in: combine what the others found
            parts = await item.dependency_results()
            return {
                "report": f"{item.subtask.title}: {len(parts)} parts combined by {name}",
                "parts": parts,
            }
        return {"done": item.subtask.title, "by": name}

    return handle


async def main(args: argparse.Namespace) -> None:
    """Register, work until SIGTERM, then drain and deregister."""
    markers = Path(args.markers)
    agent = Agent(
        args.target,
        name=args.name,
        agent_id=args.name,
        capabilities=[c for c in args.capabilities.split(",") if c],
        capacity=1,
        ttl=args.ttl,
        drain_timeout=5.0,
        handler=make_handler(args.name, markers),
    )
    async with agent:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(agent.close()))
        touch(markers, f"ready-{args.name}")
        print(f"{args.name}: registered with {args.capabilities}", flush=True)
        await agent.wait_closed()
    print(f"{args.name}: drained and deregistered", flush=True)


def parse_args() -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of the server")
    parser.add_argument("--name", required=True, help="agent id and name")
    parser.add_argument("--capabilities", required=True, help="comma-separated")
    parser.add_argument("--markers", required=True, help="folder for marker files")
    parser.add_argument("--ttl", type=float, default=2.0, help="agent TTL in seconds")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
