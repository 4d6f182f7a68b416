"""``agentcoord`` entry point."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from agentcoord.core.errors import AgentcoordError, InvalidInput, Unavailable
from agentcoord.server import config as server_config
from agentcoord.server.app import serve
from agentcoord.server.logs import configure_logging

EXIT_USAGE = 2
"""Exit code for bad flags or configuration."""
EXIT_UNAVAILABLE = 69
"""Exit code when the store cannot be reached (sysexits' EX_UNAVAILABLE)."""


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``agentcoord`` command."""
    parser = argparse.ArgumentParser(prog="agentcoord", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser(
        "serve",
        help="run the services (all three by default)",
        description="Run agentcoord services. Flags override AGENTCOORD_* variables.",
    )
    server_config.add_arguments(serve_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            config = server_config.from_sources(args)
        except InvalidInput as error:
            print(f"agentcoord: {error.message}", file=sys.stderr)
            return EXIT_USAGE
        configure_logging(config.log_level, config.log_format)
        try:
            asyncio.run(serve(config))
        except AgentcoordError as error:  # the store URL is wrong or the store unreachable
            print(f"agentcoord: {error.message}", file=sys.stderr)
            return EXIT_UNAVAILABLE if isinstance(error, Unavailable) else EXIT_USAGE
    return 0
