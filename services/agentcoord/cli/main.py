"""``agentcoord`` entry point: parse the command line, run the command, map errors to exit codes."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from agentcoord.cli import agents, events, health, serve, state, tasks
from agentcoord.cli.exits import CliError, Exit, exit_for_status
from agentcoord.cli.output import Output
from agentcoord.cli.rpc import add_client_flags, connect
from agentcoord.client import RPCError

CLIENT_COMMANDS = (agents, tasks, state, events, health)
"""Modules of the commands that talk to a server; each has ``register(commands)``."""


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``agentcoord`` command."""
    parser = argparse.ArgumentParser(
        prog="agentcoord",
        description="Run agentcoord, or talk to it. Exit codes are listed in docs/cli.md.",
    )
    add_client_flags(parser, nested=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.register(commands)
    for module in CLIENT_COMMANDS:
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (docs/cli.md lists them)."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve.run(args)
    try:
        return asyncio.run(_run(args, Output(json_mode=args.json)))
    except CliError as error:
        return _fail(error.message, error.status)
    except RPCError as error:
        return _fail(str(error), exit_for_status(error.code))
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return Exit.OK


async def _run(args: argparse.Namespace, out: Output) -> int:
    client = connect(args)
    try:
        async with client:
            status: int = await args.handler(client, args, out)
    except RPCError as error:
        if exit_for_status(error.code) is Exit.UNAVAILABLE:  # say which server
            raise CliError(f"{client.target}: {error}", Exit.UNAVAILABLE) from None
        raise
    return status


def _fail(message: str, status: Exit) -> int:
    print(f"agentcoord: {message}", file=sys.stderr)
    return status
