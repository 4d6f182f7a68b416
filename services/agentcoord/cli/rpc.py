"""What every client command shares: its flags, its client, listing all pages, following streams."""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeAlias, TypeVar

from agentcoord.cli.exits import CliError, Exit
from agentcoord.cli.output import Output
from agentcoord.client import AgentcoordClient, RetryPolicy
from agentcoord.client._client import DEFAULT_TARGET, default_targets, parse_targets
from agentcoord.server.config import parse_duration

DEFAULT_TIMEOUT = 10.0
"""Seconds each call may take without ``--timeout``."""
MAX_PAGE_SIZE = 1000
"""Largest page a List RPC returns."""

Handler: TypeAlias = Callable[[AgentcoordClient, argparse.Namespace, Output], Awaitable[int]]
"""A client command: runs with an open client and returns the exit status."""
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""The sub-command list of a parser."""


class PageRequest(Protocol):
    """A List RPC's request (AIP-158)."""

    page_size: int
    page_token: str


class Page(Protocol):
    """A List RPC's response (AIP-158)."""

    next_page_token: str


Request = TypeVar("Request", bound=PageRequest)
Response = TypeVar("Response", bound=Page)
Row: TypeAlias = Callable[[Any], Sequence[str]]
"""Turns one item of a stream into the cells of its line."""


def add_client_flags(parser: argparse.ArgumentParser, *, nested: bool) -> None:
    """Add the flags of every client command.

    The top-level parser holds the defaults; each command repeats the flags with no
    default (``nested``), so they may come before or after the command's name.
    """

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if nested else value

    parser.add_argument(
        "--server",
        default=default(None),
        metavar="HOST:PORT",
        help=f"server address; several, comma-separated, fail over in turn "
        f"(env AGENTCOORD_SERVER, default {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--token",
        default=default(None),
        metavar="TOKEN",
        help="admin or session token (env AGENTCOORD_TOKEN)",
    )
    parser.add_argument(
        "--join-token",
        dest="client_join_token",
        default=default(None),
        metavar="TOKEN",
        help="join token, for servers that require one (env AGENTCOORD_JOIN_TOKEN)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print JSON: one document, or one line per item for watch and tail",
    )
    parser.add_argument(
        "--timeout",
        type=positive_duration,
        default=default(DEFAULT_TIMEOUT),
        metavar="DURATION",
        help=f"deadline of each call, such as 500ms, 30s, 5m or seconds "
        f"(default {DEFAULT_TIMEOUT:g}s)",
    )


def positive_duration(text: str) -> float:
    """Parse a flag's duration (``30s``, ``5m``, ``1h``, ``500ms`` or seconds), above 0."""
    try:
        value = parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration")
    return value


def count(text: str) -> int:
    """Parse a flag's whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def add_command(
    commands: Commands, name: str, handler: Handler, help: str, **kwargs: Any
) -> argparse.ArgumentParser:
    """Add the client command ``name``, run by ``handler``, and return its parser."""
    parser = commands.add_parser(name, help=help, description=help, **kwargs)
    add_client_flags(parser, nested=True)
    parser.set_defaults(handler=handler)
    return parser


def add_group(commands: Commands, name: str, help: str) -> Commands:
    """Add the command group ``name`` (such as ``agents``) and return its sub-command list."""
    parser = commands.add_parser(name, help=help, description=help)
    return parser.add_subparsers(dest="action", required=True, metavar="ACTION")


def servers(args: argparse.Namespace) -> tuple[str, ...]:
    """Return the server addresses: ``--server``, else ``AGENTCOORD_SERVER``, else the default.

    Raises:
        CliError: an address is malformed (the message names where it came from).
    """
    try:
        return parse_targets(args.server) if args.server else default_targets()
    except ValueError as error:
        flag = "--server: " if args.server else ""
        raise CliError(f"{flag}{error}") from None


def join_token(args: argparse.Namespace) -> str:
    """Return the join token: ``--join-token``, then ``AGENTCOORD_JOIN_TOKEN``."""
    return args.client_join_token or os.environ.get("AGENTCOORD_JOIN_TOKEN", "")


def connect(args: argparse.Namespace) -> AgentcoordClient:
    """Return a client configured by the flags, then ``AGENTCOORD_*`` variables, then defaults."""
    return AgentcoordClient(
        servers(args),
        token=args.token or os.environ.get("AGENTCOORD_TOKEN", ""),
        join_token=join_token(args),
        timeout=args.timeout,
        # A person is waiting: ride over a blip, but say soon that the server is down.
        retry=RetryPolicy(max_attempts=3, max_delay=args.timeout),
    )


async def list_all(
    call: Callable[[Request], Awaitable[Response]],
    request: Request,
    items: str,
    *,
    limit: int = 0,
) -> Response:
    """Call a List RPC page after page and return one response holding every item.

    Args:
        call: The RPC, such as ``client.discovery.list_agents``.
        request: Its first request; ``page_token`` is advanced in it.
        items: The name of the response's repeated field.
        limit: Stop after this many items; 0 for all of them.

    Returns:
        The first page's response with the other pages' items appended and no page token.
    """
    if limit:
        request.page_size = min(limit, MAX_PAGE_SIZE)
    merged = await call(request)
    collected = getattr(merged, items)
    while merged.next_page_token and not (limit and len(collected) >= limit):
        request.page_token = merged.next_page_token
        page = await call(request)
        collected.extend(getattr(page, items))
        merged.next_page_token = page.next_page_token
    if limit:
        del collected[limit:]
    merged.next_page_token = ""
    return merged


def add_limit_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--limit`` (100 by default) to a command that lists a possibly long history."""
    parser.add_argument(
        "--limit", type=count, default=100, metavar="N", help="at most N items; 0 for all"
    )


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--since`` and ``--count`` to a command that follows a stream."""
    parser.add_argument(
        "--since",
        type=count,
        default=0,
        metavar="REVISION",
        help="replay what happened after this store revision first (default: from now on)",
    )
    parser.add_argument(
        "--count",
        type=count,
        default=0,
        metavar="N",
        help="exit after N items (default: run until interrupted)",
    )


async def print_stream(
    stream: AsyncIterator[Any], items: str, args: argparse.Namespace, out: Output, row: Row
) -> int:
    """Print the items of a Watch stream, one line each, until ``--count`` of them.

    Args:
        stream: The stream, such as ``client.statesync.watch_events(request)``.
        items: The name of the repeated field of each message.
        args: The command's arguments (``--count``).
        out: Where to print; with ``--json`` each item is one JSON line.
        row: The cells of an item's line in text mode.

    Returns:
        The exit status: OK.
    """
    async for item in _items(stream, items, args.count):
        if out.json:
            out.json_line(item)
        else:
            out.line("  ".join(row(item)))
    return Exit.OK


async def _items(stream: AsyncIterator[Any], field: str, count: int) -> AsyncIterator[Any]:
    seen = 0
    try:
        async for message in stream:
            for item in getattr(message, field):
                yield item
                seen += 1
                if seen == count:
                    return
    finally:
        if isinstance(stream, AsyncGenerator):  # cancels the call
            await stream.aclose()
