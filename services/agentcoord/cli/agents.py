"""``agentcoord agents``: list, show and watch the agents Discovery knows."""

from __future__ import annotations

import argparse

from agentcoord.cli.exits import Exit
from agentcoord.cli.output import NONE, Output, clock, label, listing, seconds, when
from agentcoord.cli.rpc import (
    Commands,
    add_command,
    add_group,
    add_watch_arguments,
    list_all,
    print_stream,
)
from agentcoord.client import AgentcoordClient
from agentcoord.discovery.v1 import discovery_service_pb2 as pb

EVERY_STATE = [state for state in pb.Agent.State.values() if state]
"""Live, left and expired: what ``--all`` lists."""


def register(commands: Commands) -> None:
    """Add ``agentcoord agents`` and its actions."""
    actions = add_group(commands, "agents", "list, show and watch agents")
    ls = add_command(actions, "ls", _list, "list agents (live ones unless --all)")
    _add_filters(ls)
    ls.add_argument(
        "--skill",
        action="append",
        default=[],
        metavar="ID",
        help="only agents with a skill of this id or tag (A2A card); repeatable (all must match)",
    )
    ls.add_argument("--all", action="store_true", help="include agents that left or expired")
    show_help = "show one agent, with its A2A card (description, version, provider, skills)"
    show = add_command(actions, "show", _show, show_help)
    show.add_argument("agent_id", metavar="AGENT_ID")
    watch = add_command(actions, "watch", _watch, "print agents joining, updating, leaving")
    _add_filters(watch)
    add_watch_arguments(watch)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--capability",
        action="append",
        default=[],
        metavar="C",
        help="only agents with this capability; repeatable (all must match)",
    )
    parser.add_argument("--role", default="", help="only agents with this role")


async def _list(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    request = pb.ListAgentsRequest(
        capabilities=args.capability,
        role=args.role,
        states=EVERY_STATE if args.all else [],
        skills=args.skill,
    )
    response = await list_all(client.discovery.list_agents, request, "agents")
    if out.json:
        out.document(response)
        return Exit.OK
    out.table(
        ["AGENT", "ROLE", "STATE", "STATUS", "LOAD", "CAPABILITIES", "NAME"],
        (
            [
                a.agent_id,
                a.role or NONE,
                label(pb.Agent.State, a.state),
                label(pb.Agent.Status, a.status),
                f"{a.load.active_subtasks}/{a.capacity}",
                listing(a.capabilities),
                a.name,
            ]
            for a in response.agents
        ),
    )
    return Exit.OK


async def _show(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    response = await client.discovery.get_agent(pb.GetAgentRequest(agent_id=args.agent_id))
    if out.json:
        out.document(response)
        return Exit.OK
    agent = response.agent
    out.fields(
        [
            ("agent", agent.agent_id),
            ("name", agent.name),
            ("role", agent.role or NONE),
            ("state", label(pb.Agent.State, agent.state)),
            ("status", label(pb.Agent.Status, agent.status)),
            ("capabilities", listing(agent.capabilities)),
            ("load", f"{agent.load.active_subtasks}/{agent.capacity}"),
            ("holds", listing(agent.load.held_subtask_ids)),
            ("labels", listing(f"{k}={v}" for k, v in sorted(agent.labels.items()))),
            ("description", agent.description or NONE),
            ("version", agent.version or NONE),
            ("provider", _provider(agent)),
            ("a2a url", agent.a2a_url or NONE),
            ("skills", listing(skill.id for skill in agent.skills)),
            *((f"skill {skill.id}", _skill(skill)) for skill in agent.skills),
            ("epoch", str(agent.epoch)),
            ("ttl", f"{seconds(agent.ttl)} ({seconds(agent.ttl_remaining)} left)"),
            ("registered", when(agent.register_time)),
            ("heartbeat", when(agent.last_heartbeat_time)),
            ("revision", str(agent.revision)),
        ]
    )
    return Exit.OK


def _provider(agent: pb.Agent) -> str:
    if not agent.HasField("provider"):
        return NONE
    provider = agent.provider
    return f"{provider.organization} ({provider.url})" if provider.url else provider.organization


def _skill(skill: pb.Skill) -> str:
    """One skill of the card on one line: name, description, then its lists."""
    parts = [skill.name + (f": {skill.description}" if skill.description else "")]
    for name, values in [
        ("tags", skill.tags),
        ("examples", skill.examples),
        ("in", skill.input_modes),
        ("out", skill.output_modes),
    ]:
        if values:
            parts.append(f"{name} {listing(values)}")
    return "; ".join(parts)


async def _watch(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    request = pb.WatchAgentsRequest(
        capabilities=args.capability, role=args.role, start_revision=args.since
    )
    return await print_stream(client.discovery.watch_agents(request), "events", args, out, _row)


def _row(event: pb.AgentEvent) -> list[str]:
    agent = event.agent
    return [
        str(event.revision),
        clock(event.event_time),
        label(pb.AgentEvent.Kind, event.kind),
        agent.agent_id,
        f"role={agent.role or NONE}",
        f"capabilities={listing(agent.capabilities)}",
    ]
