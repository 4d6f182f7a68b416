"""`make demo` runs as written: the task succeeds, a killed agent's sub-task is reassigned,
and nothing the demo started is left running."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo" / "run_demo.py"


def running(pid: int) -> bool:
    """Whether process ``pid`` exists (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    if status.exists():
        try:
            return status.read_text().split(") ", 1)[1][0] != "Z"
        except (OSError, IndexError):
            return False
    return True


def test_demo_runs_and_cleans_up() -> None:
    done = subprocess.run(
        [sys.executable, str(DEMO)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output

    assert "failure AGENT_DIED" in output
    assert re.search(r"step-1: agent \w+ died \(failure AGENT_DIED\), reassigned to \w+", output)
    assert re.search(r"task [0-9a-f-]+: SUCCEEDED", output)
    assert '"report": "Finally, write the report: 3 parts combined by' in output
    assert re.search(r"\w+ +subtask\.succeeded +step-4", output)  # the change log
    assert "demo OK" in output

    pids = {int(pid) for pid in re.findall(r"\(pid (\d+)\)", output)}
    assert len(pids) == 5, output  # the server and four agents
    assert not [pid for pid in pids if running(pid)], output
    removed = re.search(r"removed (\S+)", output)
    assert removed is not None and not Path(removed[1]).exists()
