"""``agentcoord mcp``: serve one LLM agent's MCP server (needs the ``mcp`` extra)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from agentcoord.cli.exits import CliError, Exit, exit_for_status
from agentcoord.cli.rpc import Commands, add_client_flags, join_token, servers
from agentcoord.client import RPCError


def register(commands: Commands) -> None:
    """Add ``agentcoord mcp``."""
    help = "serve an MCP server that makes one LLM agent a team member (docs/mcp.md)"
    parser = commands.add_parser("mcp", help=help, description=help)
    add_client_flags(parser, nested=True)
    parser.add_argument("--agent-id", default="", metavar="ID", help="id to register under")
    parser.add_argument("--name", default="", help="human-readable name (default: the id)")
    parser.add_argument("--role", default="", help="role, such as worker or planner")
    parser.add_argument(
        "--capabilities",
        default="",
        metavar="A,B",
        help="comma-separated capabilities; sub-tasks needing others are not assigned",
    )
    parser.add_argument(
        "--capacity", type=int, default=1, metavar="N", help="sub-tasks held at a time (default 1)"
    )
    parser.add_argument(
        "--ttl", type=float, default=None, metavar="SECONDS", help="heartbeat TTL (server default)"
    )
    parser.add_argument(
        "--card",
        default="",
        metavar="FILE",
        help="A2A agent card (JSON) of the agent: its skills, description, version, provider, "
        "URL; its name unless --name",
    )
    parser.add_argument(
        "--http",
        default="",
        metavar="HOST:PORT",
        help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio",
    )


def run(args: argparse.Namespace) -> int:
    """Serve until the host disconnects or SIGTERM; return the exit status."""
    try:
        from agentcoord.mcp import AgentOptions, load_card, serve
    except ImportError as error:
        print(
            f"agentcoord: the mcp extra is not installed ({error}); "
            "run pip install 'agentcoord[mcp]'",
            file=sys.stderr,
        )
        return Exit.USAGE
    http = None
    if args.http:
        host, _, port = args.http.rpartition(":")
        if not host or not port.isdigit():
            print(f"agentcoord: --http {args.http!r} is not HOST:PORT", file=sys.stderr)
            return Exit.USAGE
        http = (host.strip("[]"), int(port))
    if args.capacity < 1:
        print("agentcoord: --capacity must be at least 1", file=sys.stderr)
        return Exit.USAGE
    try:
        targets = servers(args)
        card = load_card(Path(args.card)) if args.card else None
    except CliError as error:
        print(f"agentcoord: {error.message}", file=sys.stderr)
        return error.status
    except ValueError as error:
        print(f"agentcoord: --card {error}", file=sys.stderr)
        return Exit.USAGE
    options = AgentOptions(
        targets=targets,
        agent_id=args.agent_id,
        name=args.name or (card.name if card else ""),
        role=args.role,
        capabilities=[c.strip() for c in args.capabilities.split(",") if c.strip()],
        capacity=args.capacity,
        skills=card.skills if card else (),
        card=card.info if card else None,
        ttl=args.ttl,
        join_token=join_token(args),
        timeout=args.timeout,
    )
    try:
        asyncio.run(serve(options, http=http))
    except RPCError as error:
        print(f"agentcoord: could not register: {error}", file=sys.stderr)
        return exit_for_status(error.code)
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    return Exit.OK
