"""Live progress of a task: a bar over its sub-tasks and which agent holds what.

On a terminal the progress is one block redrawn in place; elsewhere (a pipe, a log file) it
is one line per change, so the output reads as a log.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from typing import Protocol

from agentcoord.cli.output import Output, label, shorten
from agentcoord.distribution.v1 import distribution_service_pb2 as pb

BAR_WIDTH = 10
"""Characters inside the progress bar's brackets."""
FINAL_STATES = frozenset({pb.Task.STATE_SUCCEEDED, pb.Task.STATE_FAILED, pb.Task.STATE_CANCELLED})
"""Task states after which nothing changes."""
_AGENT_PREPOSITIONS = {
    pb.Subtask.STATE_LEASED: "to",
    pb.Subtask.STATE_SUCCEEDED: "by",
    pb.Subtask.STATE_FAILED: "by",
}
"""How a transition names the agent behind it: leased *to*, succeeded or failed *by*."""
_ERASE_UP = "\x1b[{}F\x1b[J"
"""ANSI: move to the start of the line ``n`` lines up, then clear to the end of the screen."""


def bar(done: int, total: int) -> str:
    """Return a progress bar such as ``[#####.....]``."""
    filled = BAR_WIDTH * done // total if total else 0
    return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"


def progress(task: pb.Task) -> str:
    """Return the bar and the counts, such as ``[#####.....] 5/10 succeeded, 2 leased``."""
    counts = task.counts
    others = [
        f"{number} {name}"
        for name, number in (
            ("leased", counts.leased),
            ("ready", counts.ready),
            ("blocked", counts.blocked),
            ("failed", counts.failed),
            ("cancelled", counts.cancelled),
        )
        if number
    ]
    done = f"{bar(counts.succeeded, counts.total)} {counts.succeeded}/{counts.total} succeeded"
    return ", ".join([done, *others])


def holders(task: pb.Task) -> dict[str, list[str]]:
    """Return the local ids of the leased sub-tasks by holding agent (needs the FULL view)."""
    held: dict[str, list[str]] = defaultdict(list)
    for subtask in task.subtasks:
        if subtask.state == pb.Subtask.STATE_LEASED:
            held[subtask.agent_id].append(subtask.local_id)
    return dict(sorted(held.items()))


def transition(event: pb.TaskEvent) -> str:
    """Return one transition of a task or sub-task, such as ``step-2 leased to worker-1``."""
    if event.WhichOneof("transition") == "task":
        return f"task {label(pb.Task.State, event.task.to_state)}"
    change = event.subtask
    text = f"{change.local_id} {label(pb.Subtask.State, change.to_state)}"
    preposition = _AGENT_PREPOSITIONS.get(change.to_state)
    if preposition and event.agent_id:
        text += f" {preposition} {event.agent_id}"
    if change.HasField("failure"):
        text += f" ({shorten(change.failure.message, 40)})"
    return text


def headline(task: pb.Task) -> str:
    """Return the task's id, state and title, such as ``task 1f… running: Release``."""
    return f"task {task.task_id} {label(pb.Task.State, task.state)}: {shorten(task.title)}"


def outcome(task: pb.Task) -> str:
    """Return how a finished task ended, such as ``task 1f… succeeded``."""
    text = f"task {task.task_id} {label(pb.Task.State, task.state)}"
    return f"{text}: {task.state_reason}" if task.state_reason else text


class Renderer(Protocol):
    """Shows the messages of a task's WatchTask stream as they come."""

    def update(self, response: pb.WatchTaskResponse) -> None:
        """Show one message of the stream."""


class Board:
    """On a terminal: the task's state, progress bar and holders, redrawn on each change."""

    def __init__(self, out: Output) -> None:
        """Draw on ``out``, which must be a terminal."""
        self._out = out
        self._drawn = 0

    def update(self, response: pb.WatchTaskResponse) -> None:
        """Redraw the block for the task as it now stands."""
        task = response.task
        size = shutil.get_terminal_size()
        lines = [headline(task), progress(task)]
        room = max(1, size.lines - len(lines) - 2)
        held = [f"  {agent}: {', '.join(ids)}" for agent, ids in holders(task).items()]
        if len(held) > room:
            held = [*held[: room - 1], f"  … and {len(held) - room + 1} more agents"]
        lines += held
        if self._drawn:
            self._out.stream.write(_ERASE_UP.format(self._drawn))
        for line in lines:
            self._out.line(line[: size.columns])  # a wrapped line would throw the redraw off
        self._drawn = len(lines)


class ChangeLog:
    """Anywhere else: one line per change, with the progress bar and the transitions."""

    def __init__(self, out: Output) -> None:
        """Print on ``out``."""
        self._out = out

    def update(self, response: pb.WatchTaskResponse) -> None:
        """Print the first message's state, then one line per message with transitions."""
        task = response.task
        if not response.events:
            self._out.line(f"{headline(task)} | {progress(task)}")
        else:
            changes = "; ".join(transition(event) for event in response.events)
            self._out.line(f"{progress(task)} | {changes}")


class JsonLines:
    """With ``--json``: each message of the stream as one JSON line."""

    def __init__(self, out: Output) -> None:
        """Print on ``out``."""
        self._out = out

    def update(self, response: pb.WatchTaskResponse) -> None:
        """Print the message."""
        self._out.json_line(response)


class Silent:
    """Shows nothing (``tasks submit --wait`` with ``--json`` or ``--quiet``)."""

    def update(self, response: pb.WatchTaskResponse) -> None:
        """Ignore the message."""


def renderer_for(out: Output) -> Renderer:
    """Return the renderer that suits ``out``: JSON lines, a redrawn board, or a change log."""
    if out.json:
        return JsonLines(out)
    return Board(out) if out.is_terminal else ChangeLog(out)
