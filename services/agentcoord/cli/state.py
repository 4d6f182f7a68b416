"""``agentcoord state``: read, write, delete, list and watch StateSync keys."""

from __future__ import annotations

import argparse
import base64
import math
import uuid

from google.protobuf import struct_pb2

from agentcoord.cli import inputs
from agentcoord.cli.exits import Exit
from agentcoord.cli.output import NONE, Output, clock, json_value, label, shorten, when
from agentcoord.cli.rpc import (
    Commands,
    add_command,
    add_group,
    add_watch_arguments,
    count,
    list_all,
    print_stream,
)
from agentcoord.client import AgentcoordClient
from agentcoord.statesync.v1 import statesync_service_pb2 as pb


def register(commands: Commands) -> None:
    """Add ``agentcoord state`` and its actions."""
    actions = add_group(commands, "state", "read and write shared state")
    get = add_command(actions, "get", _get, "show one key")
    get.add_argument("key", metavar="KEY")
    put = add_command(actions, "put", _put, "write one key (needs --token)")
    put.add_argument("key", metavar="KEY")
    put.add_argument("value", metavar="VALUE", help="a JSON value, or '-' to read it from stdin")
    put.add_argument(
        "--expected-version",
        type=count,
        metavar="N",
        help="write only at this version; 0: only if the key does not exist",
    )
    rm = add_command(actions, "rm", _remove, "delete one key (needs --token)")
    rm.add_argument("key", metavar="KEY")
    rm.add_argument(
        "--expected-version", type=count, metavar="N", help="delete only at this version"
    )
    incr = add_command(actions, "incr", _increment, "add a number to a number (needs --token)")
    incr.add_argument("key", metavar="KEY")
    incr.add_argument("by", metavar="BY", nargs="?", type=_number, default=1.0, help="default: 1")
    for name, kind, what in (
        ("append", "append", "append JSON values to an array (needs --token)"),
        ("add", "add_to_set", "add JSON values an array holds not yet (needs --token)"),
        ("discard", "remove_from_set", "remove JSON values from an array (needs --token)"),
    ):
        command = add_command(actions, name, _modify_items, what)
        command.add_argument("key", metavar="KEY")
        command.add_argument("values", metavar="VALUE", nargs="+", help="a JSON value")
        command.set_defaults(kind=kind)
    merge = add_command(
        actions, "merge", _merge, "merge a JSON merge patch (RFC 7396) into a value (needs --token)"
    )
    merge.add_argument("key", metavar="KEY")
    merge.add_argument("patch", metavar="PATCH", help="a JSON value, or '-' to read it from stdin")
    ls = add_command(actions, "ls", _list, "list keys and values under a prefix")
    ls.add_argument("prefix", metavar="PREFIX", nargs="?", default="", help="default: every key")
    watch = add_command(actions, "watch", _watch, "print changes of the keys under a prefix")
    watch.add_argument("prefix", metavar="PREFIX")
    add_watch_arguments(watch)


async def _get(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    response = await client.statesync.get_state(pb.GetStateRequest(key=args.key))
    if out.json:
        out.document(response)
        return Exit.OK
    state = response.state
    out.fields(
        [
            ("key", state.key),
            ("value", _value(state)),
            ("version", str(state.version)),
            ("revision", f"{state.mod_revision} (created at {state.create_revision})"),
            ("agent", _writer(state)),
            ("updated", when(state.update_time)),
            ("expires", when(state.expire_time)),
            ("metadata", ",".join(f"{k}={v}" for k, v in sorted(state.metadata.items())) or NONE),
        ]
    )
    return Exit.OK


async def _put(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    text = inputs.read_text(args.value) if args.value == inputs.STDIN else args.value
    request = pb.PutStateRequest(
        key=args.key,
        json=inputs.parse_value(text, "VALUE"),
        expected_version=args.expected_version,
        request_id=str(uuid.uuid4()),  # lets the client retry the write safely
    )
    response = await client.statesync.put_state(request)
    if out.json:
        out.document(response)
    else:
        out.line(f"{args.key}: version {response.state.version}, revision {response.revision}")
    return Exit.OK


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


async def _increment(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    return await _modify(client, args, out, pb.Modification(increment=args.by))


async def _modify_items(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    values = struct_pb2.ListValue(
        values=[inputs.parse_value(text, "VALUE") for text in args.values]
    )
    modification = pb.Modification()
    getattr(modification, args.kind).CopyFrom(values)
    return await _modify(client, args, out, modification)


async def _merge(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    text = inputs.read_text(args.patch) if args.patch == inputs.STDIN else args.patch
    patch = inputs.parse_value(text, "PATCH")
    return await _modify(client, args, out, pb.Modification(merge_patch=patch))


async def _modify(
    client: AgentcoordClient,
    args: argparse.Namespace,
    out: Output,
    modification: pb.Modification,
) -> int:
    request = pb.ModifyStateRequest(
        key=args.key, modification=modification, request_id=str(uuid.uuid4())
    )
    response = await client.statesync.modify_state(request)
    if out.json:
        out.document(response)
    else:
        state, revision = response.state, response.revision
        out.line(f"{args.key}: {_value(state)} (version {state.version}, revision {revision})")
    return Exit.OK


async def _remove(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    request = pb.DeleteStateRequest(
        key=args.key, expected_version=args.expected_version, request_id=str(uuid.uuid4())
    )
    response = await client.statesync.delete_state(request)
    if out.json:
        out.document(response)
    else:
        out.line(f"{args.key}: deleted version {response.previous.version}")
    return Exit.OK


async def _list(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    request = pb.ListStatesRequest(prefix=args.prefix)
    response = await list_all(client.statesync.list_states, request, "states")
    if out.json:
        out.document(response)
        return Exit.OK
    out.table(
        ["KEY", "VERSION", "REVISION", "AGENT", "UPDATED", "VALUE"],
        (
            [
                s.key,
                str(s.version),
                str(s.mod_revision),
                _writer(s),
                when(s.update_time),
                shorten(_value(s)),
            ]
            for s in response.states
        ),
    )
    return Exit.OK


async def _watch(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    request = pb.WatchStatesRequest(prefix=args.prefix, start_revision=args.since)
    return await print_stream(client.statesync.watch_states(request), "changes", args, out, _row)


def _row(change: pb.StateChange) -> list[str]:
    cells = [
        str(change.revision),
        clock(change.change_time),
        label(pb.StateChange.Type, change.type),
        change.key,
        change.agent_id or NONE,  # empty for admin writes and expiries
    ]
    if change.HasField("state"):
        cells += [f"v{change.state.version}", shorten(_value(change.state))]
    return cells


def _writer(state: pb.State) -> str:
    return state.agent_id or "(admin)"


def _value(state: pb.State) -> str:
    """Return a value as one line: its JSON, or its bytes in base64."""
    if state.WhichOneof("value") == "binary":
        return f"base64:{base64.b64encode(state.binary).decode()}"
    return json_value(state.json)
