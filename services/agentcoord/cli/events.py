"""``agentcoord events``: the change log of every service, listed or followed."""

from __future__ import annotations

import argparse
from typing import Any

from agentcoord.cli.exits import Exit
from agentcoord.cli.output import NONE, Output, compact, label, shorten, to_json, when
from agentcoord.cli.rpc import (
    Commands,
    add_command,
    add_group,
    add_limit_argument,
    add_watch_arguments,
    count,
    list_all,
    print_stream,
)
from agentcoord.client import AgentcoordClient
from agentcoord.statesync.v1 import statesync_service_pb2 as pb

SERVICES = [label(pb.Service, value) for value in pb.Service.values() if value]
"""Services as ``--service`` takes them."""
DETAILS_WIDTH = 80
"""Characters of an event's details shown in text mode (``--json`` has them all)."""
HEADERS = ["REVISION", "TIME", "SERVICE", "KIND", "SUBJECT", "AGENT", "DETAILS"]


def register(commands: Commands) -> None:
    """Add ``agentcoord events`` and its actions."""
    actions = add_group(commands, "events", "the change log: which agent did what")
    ls = add_command(actions, "ls", _list, "list events, oldest first")
    _add_filters(ls)
    ls.add_argument(
        "--since", type=count, default=0, metavar="REVISION", help="only events after this revision"
    )
    add_limit_argument(ls)
    tail = add_command(actions, "tail", _tail, "print events as they happen")
    _add_filters(tail)
    add_watch_arguments(tail)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service", choices=SERVICES, help="only events of this service")
    parser.add_argument(
        "--kind", default="", help="only events of this kind; 'subtask.' matches a family"
    )
    parser.add_argument("--agent", default="", help="only events caused by this agent")
    parser.add_argument("--subject", default="", help="only events about this agent, task or key")


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    """The filter fields ListEventsRequest and WatchEventsRequest share."""
    service = pb.Service.Value(f"SERVICE_{args.service.upper()}") if args.service else 0
    return {
        "service": service,
        "kind": args.kind,
        "agent_id": args.agent,
        "subject": args.subject,
        "start_revision": args.since,
    }


async def _list(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    request = pb.ListEventsRequest(**_filters(args))
    response = await list_all(client.statesync.list_events, request, "events", limit=args.limit)
    if out.json:
        out.document(response)
    else:
        out.table(HEADERS, (_row(event) for event in response.events))
    return Exit.OK


async def _tail(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    stream = client.statesync.watch_events(pb.WatchEventsRequest(**_filters(args)))
    return await print_stream(stream, "events", args, out, _row)


def _row(event: pb.Event) -> list[str]:
    return [
        str(event.revision),
        when(event.event_time),
        label(pb.Service, event.service),
        event.kind,
        event.subject,
        event.agent_id or NONE,
        _details(event),
    ]


def _details(event: pb.Event) -> str:
    """Return an event's details without empty values, sorted and cut to one short line."""
    details = {
        name: value
        for name, value in sorted(to_json(event.details).items())
        if value not in (None, "", [], {})
    }
    return shorten(compact(details), DETAILS_WIDTH) if details else NONE
