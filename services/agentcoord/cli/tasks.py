"""``agentcoord tasks``: analyse, submit, list, show, watch and cancel tasks."""

from __future__ import annotations

import argparse
import uuid

from agentcoord.cli import inputs
from agentcoord.cli.exits import CliError, Exit
from agentcoord.cli.output import (
    NONE,
    Output,
    json_value,
    label,
    listing,
    shorten,
    when,
)
from agentcoord.cli.progress import (
    FINAL_STATES,
    Renderer,
    Silent,
    outcome,
    progress,
    renderer_for,
)
from agentcoord.cli.rpc import Commands, add_command, add_group, add_limit_argument, list_all
from agentcoord.client import AgentcoordClient, TaskMirror
from agentcoord.distribution.v1 import distribution_service_pb2 as pb

STATES = [label(pb.Task.State, value) for value in pb.Task.State.values() if value]
"""Task states as ``--state`` takes them."""
MAX_TITLE = 256
"""Longest task title."""


def register(commands: Commands) -> None:
    """Add ``agentcoord tasks`` and its actions."""
    actions = add_group(commands, "tasks", "analyse, submit, follow and cancel tasks")
    analyze = add_command(
        actions, "analyze", _analyze, "show how a task would be split, without submitting it"
    )
    _add_spec_arguments(analyze)
    submit = add_command(actions, "submit", _submit, "submit a task")
    _add_spec_arguments(submit)
    submit.add_argument(
        "--request-id",
        metavar="ID",
        help="idempotency key: a repeat returns the first task (default: random)",
    )
    submit.add_argument(
        "--wait",
        action="store_true",
        help="follow the task until it ends; exit 1 unless it succeeds",
    )
    submit.add_argument("-q", "--quiet", action="store_true", help="print only the task id")
    ls = add_command(actions, "ls", _list, "list tasks, newest first")
    ls.add_argument("--state", action="append", choices=STATES, default=[], help="repeatable")
    add_limit_argument(ls)
    show = add_command(actions, "show", _show, "show a task and its sub-tasks")
    show.add_argument("task_id", metavar="TASK_ID")
    watch = add_command(
        actions, "watch", _watch, "follow a task until it ends; exit 1 unless it succeeds"
    )
    watch.add_argument("task_id", metavar="TASK_ID")
    cancel = add_command(actions, "cancel", _cancel, "cancel a task")
    cancel.add_argument("task_id", metavar="TASK_ID")
    cancel.add_argument("--reason", default="", help="recorded as the task's state reason")


def _add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--description", metavar="TEXT", help="what to do; split by AUTO")
    source.add_argument("--file", metavar="FILE", help="read the description from FILE")
    source.add_argument(
        "--spec", metavar="FILE.json", help="a full TaskSpec in proto JSON ('-': stdin)"
    )
    source.add_argument(
        "stdin",
        nargs="?",
        choices=[inputs.STDIN],
        metavar=inputs.STDIN,
        help="read the description from stdin",
    )
    parser.add_argument("--title", help="default: the description's first line")
    parser.add_argument(
        "--capability",
        action="append",
        default=[],
        metavar="C",
        help="a capability every sub-task requires; repeatable",
    )
    parser.add_argument(
        "--skill",
        action="append",
        default=[],
        metavar="S",
        help="a skill (id or tag) every sub-task requires; repeatable",
    )
    parser.add_argument(
        "--priority", type=_priority, metavar="N", help="higher runs first; -1000 to 1000"
    )


def _priority(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not -1000 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"{value} is not between -1000 and 1000")
    return value


def _task_spec(args: argparse.Namespace) -> pb.TaskSpec:
    if args.spec:
        spec = inputs.parse_message(inputs.read_text(args.spec), pb.TaskSpec, "--spec")
    else:
        description = args.description
        if description is None:
            description = inputs.read_text(args.file or inputs.STDIN)
        spec = pb.TaskSpec(description=description, split_policy=pb.SPLIT_POLICY_AUTO)
    spec.title = args.title or spec.title or _first_line(spec.description)
    spec.required_capabilities.extend(args.capability)
    spec.required_skills.extend(args.skill)
    if args.priority is not None:
        spec.priority = args.priority
    return spec


def _first_line(text: str) -> str:
    for line in text.splitlines():
        words = line.strip().lstrip("#*-+> ").strip()
        if words:
            return shorten(words, MAX_TITLE)
    raise CliError("give --title: the description is empty")


async def _analyze(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    response = await client.distribution.analyze_task(pb.AnalyzeTaskRequest(task=_task_spec(args)))
    if out.json:
        out.document(response)
        return Exit.OK
    out.fields(
        [
            ("parallel", "yes" if response.parallelizable else "no"),
            ("reason", response.reason),
            ("splitter", response.splitter),
            ("aggregation", response.aggregation_local_id or NONE),
        ]
    )
    out.line()
    out.table(
        ["SUBTASK", "DEPENDS ON", "CAPABILITIES", "SKILLS", "TITLE"],
        (
            [
                s.local_id,
                listing(s.depends_on),
                listing(s.required_capabilities),
                listing(s.required_skills),
                s.title,
            ]
            for s in response.subtasks
        ),
    )
    return Exit.OK


async def _submit(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    request = pb.SubmitTaskRequest(
        task=_task_spec(args), request_id=args.request_id or str(uuid.uuid4())
    )
    response = await client.distribution.submit_task(request)
    task = response.task
    if args.quiet:
        out.line(task.task_id)
    elif not out.json:
        out.line(f"submitted task {task.task_id}: {task.counts.total} sub-tasks")
    if args.wait:
        show_progress = not (args.quiet or out.json)
        task = await follow(client, task.task_id, renderer_for(out) if show_progress else Silent())
        if show_progress:
            _print_outcome(task, out)
    if out.json and not args.quiet:
        out.document(pb.SubmitTaskResponse(task=task) if args.wait else response)
    return _exit_for(task) if args.wait else Exit.OK


async def _list(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    request = pb.ListTasksRequest(
        states=[pb.Task.State.Value(f"STATE_{state.upper()}") for state in args.state]
    )
    response = await list_all(client.distribution.list_tasks, request, "tasks", limit=args.limit)
    if out.json:
        out.document(response)
        return Exit.OK
    out.table(
        ["TASK", "STATE", "DONE", "SUBMITTED", "TITLE"],
        (
            [
                t.task_id,
                label(pb.Task.State, t.state),
                f"{t.counts.succeeded}/{t.counts.total}",
                when(t.create_time),
                shorten(t.title),
            ]
            for t in response.tasks
        ),
    )
    return Exit.OK


async def _show(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    request = pb.GetTaskRequest(task_id=args.task_id, view=pb.TASK_VIEW_FULL)
    response = await client.distribution.get_task(request)
    task = response.task
    if response.next_subtasks_page_token:  # too many for one message: read the rest
        rest = pb.ListSubtasksRequest(
            task_id=task.task_id, page_token=response.next_subtasks_page_token
        )
        task.subtasks.extend(
            (await list_all(client.distribution.list_subtasks, rest, "subtasks")).subtasks
        )
        response.next_subtasks_page_token = ""
    if out.json:
        out.document(response)
        return Exit.OK
    local_ids = {s.subtask_id: s.local_id for s in task.subtasks}
    out.fields(
        [
            ("task", task.task_id),
            ("title", task.title),
            ("state", label(pb.Task.State, task.state)),
            ("reason", task.state_reason or NONE),
            ("progress", progress(task)),
            ("capabilities", listing(task.required_capabilities)),
            ("skills", listing(task.required_skills)),
            ("submitted", f"{when(task.create_time)} by {task.submitter_agent_id or NONE}"),
            ("ended", when(task.end_time)),
            ("result", _result(task)),
        ]
    )
    out.line()
    out.table(
        ["SUBTASK", "STATE", "AGENT", "ATTEMPT", "DEPENDS ON", "TITLE"],
        (
            [
                s.local_id,
                label(pb.Subtask.State, s.state),
                s.agent_id or NONE,
                f"{s.attempt}/{s.max_attempts}",
                listing(local_ids.get(d, d) for d in s.depends_on),
                shorten(s.title),
            ]
            for s in task.subtasks
        ),
    )
    return Exit.OK


async def _watch(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    final = await follow(client, args.task_id, renderer_for(out))
    if not out.json:
        _print_outcome(final, out)
    return _exit_for(final)


async def _cancel(client: AgentcoordClient, args: argparse.Namespace, out: Output) -> int:
    request = pb.CancelTaskRequest(task_id=args.task_id, reason=args.reason)
    response = await client.distribution.cancel_task(request)
    if out.json:
        out.document(response)
    else:
        out.line(outcome(response.task))
    return Exit.OK


async def follow(client: AgentcoordClient, task_id: str, renderer: Renderer) -> pb.Task:
    """Show a task's progress until it ends and return it as it ended (FULL view).

    Raises:
        CliError: the stream ended before the task did (exit status UNAVAILABLE).
        RPCError: the watch failed, for example NOT_FOUND.
    """
    request = pb.WatchTaskRequest(task_id=task_id, view=pb.TASK_VIEW_FULL)
    task: pb.Task | None = None
    mirror = TaskMirror()
    async for response in client.distribution.watch_task(request):
        full = mirror.update(response)
        if full is None:
            continue  # sub-tasks only: the message with the task follows
        renderer.update(
            pb.WatchTaskResponse(events=response.events, task=full, revision=response.revision)
        )
        task = full
    if task is None or task.state not in FINAL_STATES:
        raise CliError(
            f"the watch of task {task_id} ended before the task did; watch it again",
            Exit.UNAVAILABLE,
        )
    return task


def _print_outcome(task: pb.Task, out: Output) -> None:
    out.line(outcome(task))
    if task.HasField("result"):
        out.line(f"result: {json_value(task.result)}")


def _result(task: pb.Task) -> str:
    if task.HasField("result"):
        return json_value(task.result)
    if task.state == pb.Task.STATE_SUCCEEDED:
        return "too large to show: see each sub-task's result (--json)"
    return NONE


def _exit_for(task: pb.Task) -> Exit:
    return Exit.OK if task.state == pb.Task.STATE_SUCCEEDED else Exit.NEGATIVE
