"""``agentcoord`` entry point: parse the command line, run the command, map errors to exit codes."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import NoReturn, cast

from agentcoord import __version__
from agentcoord.cli import agents, events, health, mcp, serve, state, tasks
from agentcoord.cli.exits import CliError, Exit, exit_for_status
from agentcoord.cli.output import Output
from agentcoord.cli.rpc import Commands, add_client_flags, connect
from agentcoord.client import RPCError

CLIENT_COMMANDS = (agents, tasks, state, events, health)
"""Modules of the commands that talk to a server; each has ``register(commands)``."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit status 2 (USAGE)."""

    def error(self, message: str) -> NoReturn:
        """Print ``<prog>: <message>`` and a pointer to ``--help``; exit with USAGE."""
        self.exit(Exit.USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``agentcoord`` command."""
    parser = Parser(
        prog="agentcoord",
        description="Run agentcoord, or talk to it. Exit codes are listed in docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"agentcoord {__version__}")
    add_client_flags(parser, nested=False)
    # Sub-parsers are Parsers too (argparse makes them of the parent's class).
    commands = cast(
        "Commands", parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    )
    serve.register(commands)
    mcp.register(commands)
    for module in CLIENT_COMMANDS:
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (docs/cli.md lists them)."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve.run(args)
    if args.command == "mcp":
        return mcp.run(args)
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
