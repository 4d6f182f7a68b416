"""``agentcoord serve``: run the services in this process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from agentcoord.cli.exits import Exit
from agentcoord.cli.rpc import Commands
from agentcoord.core.errors import AgentcoordError, InvalidInput, Unavailable
from agentcoord.server import config as server_config
from agentcoord.server.logs import configure_logging


def register(commands: Commands) -> None:
    """Add ``agentcoord serve``."""
    parser = commands.add_parser(
        "serve",
        help="run the services (all three by default)",
        description="Run agentcoord services. Flags override AGENTCOORD_* variables, which "
        "override the defaults. Durations take a unit: 500ms, 30s, 5m, 1h, 7d (plain numbers "
        "are seconds).",
    )
    server_config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; return the exit status.

    Returns:
        0 after a graceful shutdown, USAGE for a bad configuration or store URL,
        UNAVAILABLE when the store cannot be reached.
    """
    try:
        config = server_config.from_sources(args)
    except InvalidInput as error:
        print(f"agentcoord: {server_config.describe(error)}", file=sys.stderr)
        return Exit.USAGE
    configure_logging(config.log_level, config.log_format, grpc_level=config.grpc_log_level)
    # Imported here: the server stack is not needed by (and would slow) the client commands.
    from agentcoord.server.app import serve

    try:
        asyncio.run(serve(config))
    except AgentcoordError as error:  # a bad store URL, the store unreachable, a busy port
        if config.log_format == "json":  # stderr stays one JSON object per line
            logging.getLogger("agentcoord.server.app").error(error.message)
        else:
            print(f"agentcoord: {error.message}", file=sys.stderr)
        return Exit.UNAVAILABLE if isinstance(error, Unavailable) else Exit.USAGE
    return Exit.OK
