"""Percentiles, the machine description and the markdown table."""

from __future__ import annotations

import math
import os
import platform
import resource
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version

import psutil


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def ms(seconds: float) -> str:
    """Seconds as milliseconds with two decimals."""
    return f"{seconds * 1000:.2f}"


def ratio(value: float, baseline: float) -> str:
    """``value / baseline`` as ``1.23x``; ``-`` when the baseline is missing."""
    if not baseline or baseline != baseline or value != value:
        return "-"
    return f"{value / baseline:.2f}x"


def machine(store_kind: str) -> str:
    """One line naming the machine, the versions and the store."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ram = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} cores ({model}), {ram:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}; Python {sys.version.split()[0]}, grpcio {version('grpcio')}, "
        f"protobuf {version('protobuf')}; store {store_kind}; open files limit {soft}/{hard}"
    )


@dataclass
class Table:
    """Rows of figures: agentcoord beside the echo baseline, with the target."""

    rows: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    HEADER = ("workload", "figure", "agentcoord", "echo", "ratio", "target", "met")

    def add(
        self,
        workload: str,
        figure: str,
        value: str,
        echo: str = "-",
        ratio: str = "-",
        target: str = "",
        met: bool | str | None = None,
    ) -> None:
        """Add one row; ``met`` None leaves the verdict blank, a string is shown as is."""
        verdicts = {None: "", True: "yes", False: "**no**"}
        verdict = met if isinstance(met, str) else verdicts[met]
        self.rows.append((workload, figure, value, echo, ratio, target, verdict))

    def markdown(self) -> str:
        """The table as GitHub markdown, notes after it."""
        lines = ["| " + " | ".join(self.HEADER) + " |", "|" + "---|" * len(self.HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines)
